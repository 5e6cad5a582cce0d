"""What an idle replica set costs: the work at rest that repeats nothing new is skipped.

Ten agents of 60 replicas each took most of two cores doing nothing (storm benchmark,
issue 14), and a saturated machine delayed heartbeats into false failovers. Each test pins
one saving and checks that what is reported or applied stays exactly what it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import msgpack

from failover.agent.coordinator_link import CoordinatorLink
from failover.agent.host import Agent
from failover.core.log_position import LogPosition
from failover.core.sessions import encode_request_id
from failover.net.convert import ReportCache, replica_report, replica_status
from failover.storage.records import Entry, encode_records
from failover.v1 import agent_pb2, common_pb2, coordinator_pb2
from tests.unit.inprocess import UNREACHABLE, until


def put(key: str) -> bytes:
    return msgpack.packb({"op": "put", "key": key, "value": "v"})


async def test_a_keepalive_with_nothing_to_apply_starts_no_task(agent: Agent) -> None:
    replica = await agent.assign_role("kv1", "kv", "duplica", 1, "sync", ("p", UNREACHABLE),
                                      {}, set())
    spawned: list[str] = []
    spawn = agent.spawn

    def counting(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        spawned.append(coro.__qualname__)
        return spawn(coro)

    agent.spawn = counting  # type: ignore[method-assign]
    entries = [Entry(1, 1, b"", b""),
               Entry(1, 2, encode_request_id("c", 1, opens=True), put("k"))]
    ack = await replica.receive_batch(1, 1, LogPosition(0, 0), 1, 2, encode_records(entries),
                                      commit_index=0)
    assert ack["status"] == "ok" and ack["durable_index"] == 2, ack
    # Keepalives that commit nothing new: nothing to apply, so no applier is started.
    for batch_id in (2, 3, 4):
        ack = await replica.receive_batch(1, batch_id, LogPosition(1, 2), 3, 2, b"",
                                          commit_index=0)
        assert ack["status"] == "ok", ack
    assert "Replica._apply_rest" not in spawned, spawned
    assert replica.sm.applied_index == 0
    # The keepalive that carries the commit applies both entries.
    ack = await replica.receive_batch(1, 5, LogPosition(1, 2), 3, 2, b"", commit_index=2)
    assert ack["status"] == "ok", ack
    assert spawned == ["Replica._apply_rest"]
    await until(lambda: replica.sm.applied_index == 2)


async def test_a_heartbeat_reuses_the_message_of_a_status_that_did_not_change(
    agent: Agent,
) -> None:
    primary = await agent.assign_role("kv1", "kv", "primary", 1, "async", None, {}, set())
    await agent.assign_role("kv2", "kv", "duplica", 1, "sync", ("p", UNREACHABLE), {}, set())
    link = CoordinatorLink(agent, ["127.0.0.1:1"])  # never started: only its messages
    first = link._statuses()
    again = link._statuses()
    assert [m.service for m in first] == ["kv1", "kv2"]
    assert all(a is b for a, b in zip(first, again, strict=True))
    # A write changes the primary's indexes: its message is new and says so; the idle
    # duplica's is still the one sent before.
    await primary.execute(0, "c", 1, put("k"), 5.0)
    changed = link._statuses()
    assert changed[0] is not first[0] and changed[1] is first[1]
    assert changed[0] == replica_status(primary)
    assert changed[0].indexes.applied_index > first[0].indexes.applied_index
    # A dropped replica is no longer reported, nor kept.
    await agent.drop_replica("kv2", 1, delete_data=True)
    assert [m.service for m in link._statuses()] == ["kv1"]
    assert set(link._sent) == {"kv1"}


def beat(host: str, **applied: int) -> coordinator_pb2.HeartbeatRequest:
    return coordinator_pb2.HeartbeatRequest(host_id=host, replicas=[
        agent_pb2.ReplicaStatus(
            service=service, role=common_pb2.ROLE_PRIMARY, epoch=3,
            indexes=common_pb2.ReplicaIndexes(durable_index=index, commit_index=index,
                                              applied_index=index),
            in_sync=["h2"], in_sync_lag_ms={"h2": 0, "h3": 7}, duplicas=["h2", "h3"])
        for service, index in applied.items()])


def test_the_coordinator_reuses_the_report_of_a_status_sent_in_the_same_bytes() -> None:
    cache = ReportCache(hosts_max=2)
    first = cache.reports(beat("h1", kv1=5, kv2=9), keep=True)
    assert first == [replica_report(r) for r in beat("h1", kv1=5, kv2=9).replicas]
    again = cache.reports(beat("h1", kv1=5, kv2=10), keep=True)
    assert again[0] is first[0]  # the same bytes: the same (frozen) report
    assert again[1] is not first[1] and again[1].applied_index == 10
    # Another host's equal status is its own entry; a service not reported again is dropped.
    assert cache.reports(beat("h2", kv1=5), keep=True)[0] == first[0]
    cache.reports(beat("h1", kv1=5), keep=True)
    assert set(cache._hosts["h1"]) == {"kv1"}
    # Past hosts_max, a new host is converted every time and not kept.
    third = cache.reports(beat("h3", kv1=5), keep=True)
    assert third == [replica_report(beat("h3", kv1=5).replicas[0])]
    assert set(cache._hosts) == {"h1", "h2"}


def test_the_coordinator_keeps_no_report_of_a_host_nobody_registered() -> None:
    # Without TLS anyone may name any host: what an unregistered one sends is converted
    # for the core (which refuses it) and not held; a host that leaves is dropped.
    cache = ReportCache(hosts_max=10)
    for n in range(5):
        reports = cache.reports(beat(f"forged{n}", kv1=n, kv2=n), keep=False)
        assert [r.applied_index for r in reports] == [n, n]
    assert cache._hosts == {}
    cache.reports(beat("h1", kv1=5), keep=True)
    assert set(cache._hosts) == {"h1"}
    cache.reports(beat("h1", kv1=5), keep=False)  # removed from the cluster meanwhile
    assert cache._hosts == {}
