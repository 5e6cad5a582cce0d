"""Runs the coordinator: open the store, serve gRPC at once (as a follower until it leads),
campaign for leadership in the background and lead when elected (`leadership.campaign_loop`),
stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from failover import defaults
from failover.coordinator import leadership
from failover.coordinator.server import Coordinator
from failover.core.coordinator import Timing
from failover.errors import ConfigError
from failover.net import channels
from failover.net.authorization import RoleCheck
from failover.net.grpc_logs import limit_decode_error_logs
from failover.net.tls import TlsMaterial
from failover.observe import health, logs
from failover.observe.coordinator_metrics import CoordinatorMetrics
from failover.observe.endpoint import MetricsEndpoint
from failover.observe.logs import event_fields
from failover.storage.modes import make_private_dir
from failover.storage.store_url import open_store

log = logging.getLogger("failover.coordinator")


async def serve(listen: str, data_dir: str, store_url: str | None, host_dead_ms: int,
                placement: str, tls: TlsMaterial | None = None, *, cluster: str = "default",
                etcd_tls: Any = None, leader_ttl_ms: int = defaults.LEADER_TTL_MS,
                advertise: str | None = None, metrics_listen: str | None = None) -> None:
    make_private_dir(data_dir)
    if store_url is not None and store_url.strip().lower().startswith("etcd"):
        store = open_store(store_url, data_dir, cluster=cluster, etcd_tls=etcd_tls,
                           leader_ttl_ms=leader_ttl_ms)
        shared = True
    else:  # one coordinator on its SQLite file: it leads as soon as the file is open
        store = open_store(store_url, data_dir)
        shared = False
    coordinator = Coordinator(store, Timing(host_dead_ms=host_dead_ms), placement, tls,
                              address=advertise or listen,
                              takeover_grace_ms=defaults.COORDINATOR_TAKEOVER_GRACE_MS if shared
                              else 0, shared_store=shared)
    coordinator.follow()
    if metrics_listen is not None:
        coordinator.metrics = CoordinatorMetrics(coordinator)
    await store.open()
    # With TLS every call is checked against the role in its caller's certificate first;
    # without, nobody has an identity, and the daemon listens on loopback only (or was told
    # --insecure). Then a follower redirects what only the leader does.
    gate = leadership.LeaderGate(coordinator)
    server = channels.server(interceptors=[RoleCheck(), gate] if tls is not None else [gate])
    leadership.add_to_server(server, coordinator)
    health.add_to_server(server, health.coordinator_health(coordinator.acting))
    try:
        port = channels.add_port(server, listen, tls)
    except RuntimeError as exc:
        raise SystemExit(f"failover-coordinator: cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise SystemExit(f"failover-coordinator: cannot listen on {listen} (in use?)")
    if not shared:
        # As before issue 15: the state is loaded before the first call is answered.
        await coordinator.lead(await store.campaign(coordinator.address))
    await server.start()
    endpoint = None
    if coordinator.metrics is not None and metrics_listen is not None:
        endpoint = MetricsEndpoint(coordinator.metrics.registry,
                                   health.coordinator_routes(coordinator.acting), tls)
        try:
            metrics_port = await endpoint.start(metrics_listen)
        except ConfigError as exc:
            raise SystemExit(f"failover-coordinator: {exc}") from None
        log.info("coordinator serves metrics and health on %s port %d",
                 "HTTPS" if tls is not None else "HTTP", metrics_port,
                 extra=event_fields("metrics_listening", port=metrics_port))
    log.info("coordinator serving on %s as %s (%s), store %s, pid %d", listen,
             coordinator.address,
             f"mutual TLS as {tls.identity}" if tls is not None else "no TLS",
             store.description, os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    campaigning = loop.create_task(leadership.campaign_loop(coordinator, stop))
    stopped = loop.create_task(stop.wait())
    fatal = loop.create_task(coordinator.fatal.wait())
    await asyncio.wait((stopped, fatal, campaigning), return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    campaigning.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await campaigning
    coordinator.deposed("stopping")
    with contextlib.suppress(Exception):
        await store.resign()  # another coordinator takes over at once, not after the lease
    if endpoint is not None:
        await endpoint.stop()
    await server.stop(grace=1.0)
    await coordinator.stop()
    if coordinator.fatal.is_set():
        raise SystemExit("failover-coordinator: the store cannot be read; see the log above")


def run(listen: str, data_dir: str, store: str | None,
        host_dead_ms: int = defaults.HOST_DEAD_MS,
        placement: str = defaults.PLACEMENT_POLICY, tls: TlsMaterial | None = None, *,
        cluster: str = "default", etcd_tls: Any = None,
        leader_ttl_ms: int = defaults.LEADER_TTL_MS, advertise: str | None = None,
        metrics_listen: str | None = None, log_format: str = defaults.LOG_FORMAT,
        log_level: str = defaults.LOG_LEVEL) -> None:
    """Blocking entry point used by `failover-coordinator`."""
    logs.configure("coordinator", log_format, log_level, sys.stderr)
    limit_decode_error_logs()
    asyncio.run(serve(listen, data_dir, store, host_dead_ms, placement, tls, cluster=cluster,
                      etcd_tls=etcd_tls, leader_ttl_ms=leader_ttl_ms, advertise=advertise,
                      metrics_listen=metrics_listen))
