"""How often a replica snapshots its state (`snapshot_due_entries`): after as many applied
entries as the state's bytes over `SNAPSHOT_STATE_BYTES_PER_ENTRY`, within
`SNAPSHOT_MIN_ENTRIES` and `snapshot_every_entries`; the state's bytes are the newest
snapshot's plus the payload applied since. With only the fixed 100,000, a small state's
restart replayed up to 100,000 entries, and a crash failover to a duplica still replaying
took 100-145 ms (benchmarks/failover.py)."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.host import Agent
from failover.agent.replica import Replica, snapshot_due_entries
from failover.core.sessions import encode_request_id
from failover.storage.records import Entry
from tests.unit.test_replica_replay import _until, log_to_replay

MIN = 40  # SNAPSHOT_MIN_ENTRIES here
BYTES_PER_ENTRY = 64  # SNAPSHOT_STATE_BYTES_PER_ENTRY here


def _config(root: Path) -> AgentConfig:
    return AgentConfig.from_mapping({"host_id": "a", "listen": "127.0.0.1:7999",
                                     "data_dir": str(root), "snapshot_every_entries": 10_000,
                                     "fsync_policy": "never"})


def _puts(count: int, value_bytes: int) -> list[Entry]:
    """Puts of distinct keys after the barrier at index 1, each value `value_bytes` long."""
    return [Entry(1, 2 + k, encode_request_id("c", k + 1, opens=k == 0),
                  msgpack.packb({"op": "put", "key": f"k{k}", "value": "v" * value_bytes}))
            for k in range(count)]


async def _replayed(root: Path, logged: list[Entry]) -> tuple[Agent, Replica]:
    """kv1 restarted as primary after `logged`, every entry applied and any snapshot done."""
    await log_to_replay(_config(root), logged)
    agent = Agent(_config(root))
    await agent.start()
    replica = agent.replicas["kv1"]
    await agent.assign_role("kv1", "kv", "primary", 2, "sync", None, {}, set())
    await _until(lambda: replica.sm.applied_index >= logged[-1].index + 1)
    await _until(lambda: replica._snapshot_task is None or replica._snapshot_task.done())
    return agent, replica


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "SNAPSHOT_MIN_ENTRIES", MIN)
    monkeypatch.setattr(defaults, "SNAPSHOT_STATE_BYTES_PER_ENTRY", BYTES_PER_ENTRY)


@pytest.mark.usefixtures("small_bounds")
async def test_a_small_state_is_snapshotted_long_before_the_entry_bound(tmp_path: Path) -> None:
    agent, replica = await _replayed(tmp_path, _puts(300, 1))
    try:
        # 300 entries of a few bytes: a snapshot after the first 40, far below 10,000.
        assert replica._last_snapshot_index >= MIN
        # The next one waits for as many entries as the state's size calls for.
        assert replica._snapshot_bytes > BYTES_PER_ENTRY * MIN
    finally:
        await agent.stop()


@pytest.mark.usefixtures("small_bounds")
async def test_a_large_state_is_not_snapshotted_at_the_minimum(tmp_path: Path) -> None:
    # 300 entries of 1 KiB values: about 300 KiB of state, due after some 4,800 entries.
    agent, replica = await _replayed(tmp_path, _puts(300, 1024))
    try:
        assert replica._last_snapshot_index == 0
        assert replica._applied_bytes > 300 * 1024
    finally:
        await agent.stop()


def test_the_bounds_hold_whatever_the_state_size() -> None:
    for size, due in ((0, defaults.SNAPSHOT_MIN_ENTRIES),
                      (1 << 40, 50_000),
                      (30_000 * defaults.SNAPSHOT_STATE_BYTES_PER_ENTRY, 30_000)):
        assert snapshot_due_entries(size, 50_000) == due
