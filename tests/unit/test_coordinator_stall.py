"""A coordinator that did not run for a while (CPU starvation, a pause, a stop signal) does
not charge the hosts for the heartbeats it could not read: creating 300 services on a loaded
machine, a stalled coordinator woke up and suspected all ten hosts at once, and placement
refused every new service ("host1: not alive; ... host10: not alive")."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from failover.coordinator.server import Coordinator
from failover.core.coordinator import CoordinatorCore, HostInfo, Timing
from failover.storage.sqlite_store import SqliteStore
from tests.unit.inprocess import until
from tests.unit.test_coordinator_rebuild import DEAD, FAIL, HB, LEASE
from tests.unit.test_coordinator_scale import METRICS

HOSTS = ("h1", "h2", "h3")


def test_the_core_counts_silence_in_its_own_running_time() -> None:
    core = CoordinatorCore(Timing(HB, FAIL, LEASE, DEAD))
    for host in HOSTS:
        core.register(HostInfo(host, f"{host}:1"), 0, dict(METRICS))
    core.tick(50)
    core.stalled(1000)  # the driver's tick came a second late
    core.tick(1100)
    assert all(core.live[h].alive for h in HOSTS)
    for now in range(1200, 1700, HB):  # h3 stays silent while the coordinator runs
        for host in HOSTS[:2]:
            core.heartbeat(host, dict(METRICS), [], now)
        core.tick(now)
    assert [h for h in HOSTS if not core.live[h].alive] == ["h3"]
    core.heartbeat("h3", dict(METRICS), [], 1700)
    core.stalled(5000)
    core.tick(6800)
    assert all(core.live[h].alive for h in HOSTS)  # the credit starts at each heartbeat


async def test_a_coordinator_that_stalled_does_not_suspect_every_host(tmp_path: Path) -> None:
    coordinator = Coordinator(SqliteStore(tmp_path / "cluster.db"), Timing(HB, FAIL, LEASE, DEAD),
                              address="127.0.0.1:1")
    await coordinator.start()
    try:
        for host in HOSTS:
            await coordinator.register(HostInfo(host, "127.0.0.1:1"), dict(METRICS))
        for _ in range(3):
            for host in HOSTS:
                await coordinator.heartbeat(host, dict(METRICS), [])
            await asyncio.sleep(HB / 1000)
        time.sleep(3 * FAIL / 1000)  # the whole process stops: nothing runs, nothing is read
        # The tick loop runs first (no heartbeat is sent meanwhile) and reports the stall.
        await until(lambda: coordinator.core.stalled_ms >= 2 * FAIL, timeout_s=2)
        assert all(coordinator.core.live[h].alive for h in HOSTS)
        # A host that really stays silent is still suspected, a failure timeout later.
        async def beat_two() -> None:
            while True:
                for host in HOSTS[:2]:
                    await coordinator.heartbeat(host, dict(METRICS), [])
                await asyncio.sleep(HB / 1000)

        beating = asyncio.get_running_loop().create_task(beat_two())
        try:
            await until(lambda: not coordinator.core.live["h3"].alive, timeout_s=3)
            assert all(coordinator.core.live[h].alive for h in HOSTS[:2])
        finally:
            beating.cancel()
    finally:
        await coordinator.stop()
