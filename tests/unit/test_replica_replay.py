"""The agent's replica applies in batches exactly what one-by-one application gives: replaying
its own log after a restart, and applying shipped batches as a duplica (a part at a time)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest

from demo_services.kv import KvService
from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.host import Agent
from failover.core.log_position import LogPosition
from failover.core.sessions import encode_request_id
from failover.core.state_machine import ReplicatedStateMachine
from failover.storage.records import Entry, encode_records
from failover.storage.wal import WriteAheadLog

UNREACHABLE = "127.0.0.1:1"


def _config(root: Path) -> AgentConfig:
    return AgentConfig.from_mapping({"host_id": "a", "listen": "127.0.0.1:7999",
                                     "data_dir": str(root), "snapshot_every_entries": 0})


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def _requests(first: int, count: int, epoch: int) -> list[Entry]:
    """A mixed log: puts (some large, so the byte bound cuts batches), retries of earlier
    request ids, invalid requests, requests without an id."""
    entries = []
    for k in range(count):
        index = first + k
        if k % 97 == 5:
            payload = msgpack.packb({"op": "put", "key": f"big{k % 3}", "value": b"x" * 400_000})
        elif k % 13 == 7:
            payload = b"\xc1 not msgpack"
        elif k % 11 == 3:
            payload = msgpack.packb({"op": "delete", "key": f"k{k - 3}"})
        else:
            payload = msgpack.packb({"op": "put", "key": f"k{k}", "value": "v" * (k % 150)})
        rid = b"" if k % 17 == 9 else encode_request_id(f"client{k % 3}",
                                                        k // 2 if k % 23 == 4 else k + 1,
                                                        opens=k < 3)
        entries.append(Entry(epoch, index, rid, payload))
    return entries


def _one_by_one(entries: list[Entry]) -> ReplicatedStateMachine:
    sm = ReplicatedStateMachine(KvService())
    for e in entries:
        if e.payload:
            sm.apply(*e)
        else:
            sm.apply_barrier(e.epoch, e.index)
    return sm


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    agent = Agent(_config(tmp_path))
    await agent.start()
    yield agent
    await agent.stop()


async def log_to_replay(config: AgentConfig, logged: list[Entry]) -> None:
    """Leaves primary kv1 at epoch 1 with `logged` after its barrier in its log, unapplied:
    an agent started on `config` next replays them."""
    agent = Agent(config)
    await agent.start()
    try:
        await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {}, set())
        await _until(lambda: agent.replicas["kv1"].sm.applied_index >= 1)
    finally:
        await agent.stop()
    wal = config.data_dir / "replicas" / "kv1" / "wal"
    with WriteAheadLog.open(wal, fsync_policy="never") as log:
        log.append(logged)


async def test_a_restarted_primary_replays_its_log_in_batches(tmp_path: Path) -> None:
    logged = _requests(2, 3 * defaults.APPLY_READ_ENTRIES + 50, 1)
    await log_to_replay(_config(tmp_path), logged)
    agent = Agent(_config(tmp_path))
    await agent.start()
    try:
        replica = agent.replicas["kv1"]
        await agent.assign_role("kv1", "kv", "primary", 2, "sync", None, {}, set())
        last = logged[-1].index + 1  # epoch 2's first entry
        await _until(lambda: replica.sm.applied_index >= last)
        expected = _one_by_one([Entry(1, 1, b"", b""), *logged, Entry(2, last, b"", b"")])
        assert replica.sm.digest() == expected.digest()
        assert replica.sm.sessions.to_bytes() == expected.sessions.to_bytes()
    finally:
        await agent.stop()


async def test_a_duplica_applies_shipped_batches_a_part_at_a_time(agent: Agent) -> None:
    replica = await agent.assign_role("kv1", "kv", "duplica", 1, "sync", ("p", UNREACHABLE),
                                      {}, set())
    entries = [Entry(1, 1, b"", b""), *_requests(2, 2 * defaults.BATCH_ENTRIES_MAX - 1, 1)]
    half = defaults.BATCH_ENTRIES_MAX
    for batch_id, batch in enumerate((entries[:half], entries[half:]), start=1):
        prev = batch[0].index - 1
        ack = await replica.receive_batch(1, batch_id, LogPosition(1 if prev else 0, prev),
                                          batch[0].index, batch[-1].index,
                                          encode_records(batch), commit_index=batch[-1].index)
        assert ack["status"] == "ok", ack
    await _until(lambda: replica.sm.applied_index >= entries[-1].index)
    assert replica.sm.digest() == _one_by_one(entries).digest()
    assert not replica.kept.shipped and replica.kept.shipped_bytes == 0
