"""Runs the coordinator: resume from the store, serve gRPC, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from failover import defaults
from failover.coordinator.server import Coordinator
from failover.core.coordinator import Timing
from failover.net import channels, coordinator_servicer
from failover.net.authorization import RoleCheck
from failover.net.grpc_logs import limit_decode_error_logs
from failover.net.tls import TlsMaterial
from failover.storage.modes import make_private_dir
from failover.storage.store import open_store

log = logging.getLogger("failover.coordinator")


async def serve(listen: str, data_dir: str, store_url: str | None, host_dead_ms: int,
                placement: str, tls: TlsMaterial | None = None) -> None:
    make_private_dir(data_dir)
    store = open_store(store_url, data_dir)
    coordinator = Coordinator(store, Timing(host_dead_ms=host_dead_ms), placement, tls)
    await coordinator.start()
    # With TLS every call is checked against the role in its caller's certificate first;
    # without, nobody has an identity, and the daemon listens on loopback only (or was told
    # --insecure).
    server = channels.server(interceptors=[RoleCheck()] if tls is not None else ())
    coordinator_servicer.add_to_server(server, coordinator)
    try:
        port = channels.add_port(server, listen, tls)
    except RuntimeError as exc:
        raise SystemExit(f"failover-coordinator: cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise SystemExit(f"failover-coordinator: cannot listen on {listen} (in use?)")
    await server.start()
    log.info("coordinator serving on %s (%s), store %s, pid %d", listen,
             f"mutual TLS as {tls.identity}" if tls is not None else "no TLS",
             store.description, os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = loop.create_task(stop.wait())
    fatal = loop.create_task(coordinator.fatal.wait())
    await asyncio.wait((stopped, fatal), return_when=asyncio.FIRST_COMPLETED)
    await server.stop(grace=1.0)
    await coordinator.stop()
    if coordinator.fatal.is_set():
        raise SystemExit("failover-coordinator: the store cannot be read; see the log above")


def run(listen: str, data_dir: str, store: str | None,
        host_dead_ms: int = defaults.HOST_DEAD_MS,
        placement: str = defaults.PLACEMENT_POLICY, tls: TlsMaterial | None = None) -> None:
    """Blocking entry point used by `failover-coordinator`."""
    logging.basicConfig(
        level=os.environ.get("FAILOVER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s coordinator %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    limit_decode_error_logs()
    asyncio.run(serve(listen, data_dir, store, host_dead_ms, placement, tls))
