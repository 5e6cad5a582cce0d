"""Item 9 of issue 11: an in-sync duplica that heartbeats but cannot take the primary's stream
blocked sync writes forever. The primary now reports how long each member has taken no entry
while lacking some, and the coordinator takes a member past `insync_lag_ms` out of the set."""

from __future__ import annotations

import asyncio

import msgpack

from failover.agent.host import Agent
from failover.agent.replica import monotonic_ms
from failover.core.coordinator import CoordinatorCore, HostInfo, ReplicaReport, Timing
from tests.unit.inprocess import UNREACHABLE

METRICS = {"cpu_count": 8.0, "memory_total_bytes": float(16 << 30),
           "disk_free_bytes": float(100 << 30), "disk_total_bytes": float(200 << 30),
           "cpu_percent": 5.0, "memory_percent": 5.0}


async def test_the_real_primary_reports_how_long_a_member_has_blocked_its_writes(
    agent: Agent,
) -> None:
    replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None,
                                      {"b": UNREACHABLE}, {"b"})
    start = monotonic_ms()
    replica.tick(start)
    assert replica.status()["in_sync_lag_ms"] == {"b": 0}
    write = asyncio.create_task(replica.execute(
        0, "c", 1, msgpack.packb({"op": "put", "key": "k", "value": "v"}), 30.0))
    deadline = asyncio.get_running_loop().time() + 5
    while replica.wal.durable_index < 2:  # the barrier and the write are on disk here
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)
    replica.tick(monotonic_ms())
    await asyncio.sleep(0.2)
    lag = replica.status()["in_sync_lag_ms"]["b"]
    assert lag >= 150, lag  # b holds nothing of it, and has for as long as the write waited
    assert not write.done()
    # The coordinator drops b: the write commits.
    await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {"b": UNREACHABLE}, set())
    await asyncio.wait_for(write, 2.0)
    assert replica.status()["in_sync_lag_ms"] == {}


def test_the_coordinator_drops_a_member_that_blocks_writes_and_does_not_let_it_straight_back(
) -> None:
    timing = Timing(insync_lag_ms=1000)
    core = CoordinatorCore(timing)
    now = 1_000
    for host in ("h1", "h2", "h3"):
        core.register(HostInfo(host, f"{host}:1"), now, METRICS)
    core.create_service("s", "kv", 3, "sync", now)
    service = core.services["s"]
    primary, (stuck, good) = service.primary, service.in_sync

    def beat_primary(durable: int, commit: int, lags: dict[str, int]) -> None:
        report = ReplicaReport("s", "primary", 1, durable, commit, commit,
                               matched_index=durable, in_sync=tuple(service.in_sync),
                               in_sync_generation=service.in_sync_generation,
                               in_sync_lag_ms=lags)
        core.heartbeat(primary, METRICS, [report], now)

    def beat(host: str, matched: int) -> None:
        core.heartbeat(host, METRICS, [ReplicaReport("s", "duplica", 1, matched, matched,
                                                     matched, matched_index=matched)], now)

    # Both heartbeat; the stuck one never takes entries past 10, so commit stays at 10.
    beat_primary(50, 10, {stuck: 900, good: 0})
    beat(stuck, 10)
    beat(good, 50)
    assert stuck in service.in_sync  # under the bound: kept
    beat_primary(60, 10, {stuck: 1500, good: 0})
    assert stuck not in service.in_sync and stuck not in service.promotable
    # Its heartbeats go on, and the report the primary sent before applying the shrink still
    # shows commit 10: the member must not come straight back on it.
    beat(stuck, 10)
    assert stuck not in service.in_sync
    # The primary applies the new set: commit moves to its durable index; the stuck member,
    # still at 10, stays out until it has caught up.
    beat_primary(60, 60, {good: 0})
    beat(stuck, 10)
    assert stuck not in service.in_sync
    beat(stuck, 60)
    assert stuck in service.in_sync
