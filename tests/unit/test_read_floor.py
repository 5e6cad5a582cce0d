"""Invariant 10 on the real agent's replica: a primary serves a read only once the log it
inherited (from an earlier primary, or from itself before a restart) is committed and applied.

Each test reproduces a stale read the review found: without the read floor the read returns
the state from before writes that were acknowledged."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest

from failover.agent.host import Agent
from failover.agent.replica import monotonic_ms
from failover.core.log_position import LogPosition
from failover.core.sessions import encode_request_id
from failover.storage.records import Entry, encode_records
from tests.unit.inprocess import UNREACHABLE, agent_config, until


def put(key: str, value: str) -> bytes:
    return msgpack.packb({"op": "put", "key": key, "value": value})


def get(key: str) -> bytes:
    return msgpack.packb({"op": "get", "key": key})


def value_of(reply_data: bytes) -> object:
    return msgpack.unpackb(reply_data, raw=False)["value"]


async def test_a_promoted_duplica_does_not_read_before_the_inherited_log_is_committed(
    agent: Agent,
) -> None:
    # The old primary logged and acknowledged k=v1 (its in-sync duplica, this one, has it on
    # disk) but the commit index never reached this duplica before the old primary died.
    replica = await agent.assign_role("kv1", "kv", "duplica", 1, "sync", ("p", UNREACHABLE),
                                      {}, set())
    inherited = [Entry(1, 1, b"", b""),
                 Entry(1, 2, encode_request_id("c", 1, opens=True), put("k", "v1"))]
    ack = await replica.receive_batch(1, 1, LogPosition(0, 0), 1, 2, encode_records(inherited),
                                      commit_index=0)
    assert ack["status"] == "ok" and ack["durable_index"] == 2, ack
    assert replica.sm.applied_index == 0

    # Promoted at epoch 2, with an in-sync duplica that has not acked yet, and a lease.
    await agent.assign_role("kv1", "kv", "primary", 2, "sync", None, {"b": UNREACHABLE},
                            {"b"})
    replica.grant_lease(2, 60_000, monotonic_ms())
    read = asyncio.create_task(replica.query(get("k")))
    await until(lambda: replica.wal.durable_index >= 3)  # epoch 2's barrier is logged
    await asyncio.sleep(0.05)  # the read had every chance to answer (it must not)
    assert not read.done(), f"a stale read was served: {read.result() if read.done() else ''}"

    # b leaves the in-sync set: the inherited entries commit, and the read sees v1.
    await agent.assign_role("kv1", "kv", "primary", 2, "sync", None, {"b": UNREACHABLE}, set())
    reply = await asyncio.wait_for(read, 2.0)
    assert value_of(reply.data) == "v1"


async def test_a_primary_restarted_from_a_snapshot_reads_the_writes_logged_after_it(
    tmp_path: Path,
) -> None:
    agent = Agent(agent_config(tmp_path))
    await agent.start()
    try:
        replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {}, set())
        await replica.execute(0, "c", 1, put("k", "old"), 5.0)
        await replica.take_snapshot()
        reply, _duplicate, _epoch = await replica.execute(0, "c", 2, put("k", "new"), 5.0)
        assert reply.index > replica._last_snapshot_index
    finally:
        await agent.stop()

    restarted = Agent(agent_config(tmp_path))
    await restarted.start()
    try:
        replica = restarted.replicas["kv1"]
        assert replica.read_floor >= reply.index
        answer = await asyncio.wait_for(replica.query(get("k")), 2.0)
        assert value_of(answer.data) == "new"
    finally:
        await restarted.stop()


async def test_a_read_below_the_floor_is_refused_once_its_wait_runs_out(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from failover import defaults
    from failover.errors import Unavailable

    monkeypatch.setattr(defaults, "READ_FLOOR_TIMEOUT_MS", 100)
    replica = await agent.assign_role("kv1", "kv", "duplica", 1, "sync", ("p", UNREACHABLE),
                                      {}, set())
    inherited = [Entry(1, 1, b"", b""),
                 Entry(1, 2, encode_request_id("c", 1, opens=True), put("k", "v"))]
    await replica.receive_batch(1, 1, LogPosition(0, 0), 1, 2, encode_records(inherited),
                                commit_index=0)
    await agent.assign_role("kv1", "kv", "primary", 2, "sync", None, {"b": UNREACHABLE},
                            {"b"})
    replica.grant_lease(2, 60_000, monotonic_ms())
    with pytest.raises(Unavailable, match="inherited"):
        await replica.query(get("k"))
