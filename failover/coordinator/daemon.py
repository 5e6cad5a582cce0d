"""Runs the coordinator: resume from the store, serve gRPC, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from failover import defaults
from failover.coordinator.server import Coordinator
from failover.core.coordinator import Timing
from failover.net import channels, coordinator_servicer
from failover.storage.store import open_store

log = logging.getLogger("failover.coordinator")


async def serve(listen: str, data_dir: str, store_url: str | None, host_dead_ms: int,
                placement: str) -> None:
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    store = open_store(store_url, data_dir)
    coordinator = Coordinator(store, Timing(host_dead_ms=host_dead_ms), placement)
    await coordinator.start()
    server = channels.server()
    coordinator_servicer.add_to_server(server, coordinator)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise SystemExit(f"failover-coordinator: cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise SystemExit(f"failover-coordinator: cannot listen on {listen} (in use?)")
    await server.start()
    log.info("coordinator serving on %s, store %s, pid %d", listen, store.description,
             os.getpid())
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
        placement: str = defaults.PLACEMENT_POLICY) -> None:
    """Blocking entry point used by `failover-coordinator`."""
    logging.basicConfig(
        level=os.environ.get("FAILOVER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s coordinator %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(serve(listen, data_dir, store, host_dead_ms, placement))
