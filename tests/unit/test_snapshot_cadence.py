"""How often a replica snapshots its state (`Replica.snapshot_due_entries`): after as many
applied entries as the last snapshot's bytes over `SNAPSHOT_STATE_BYTES_PER_ENTRY`, within
`SNAPSHOT_MIN_ENTRIES` and `snapshot_every_entries`. With only the fixed 100,000, a small
state's restart replayed up to 100,000 entries, and a crash failover to a duplica still
replaying took 100-145 ms (benchmarks/failover.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.host import Agent
from tests.unit.test_replica_replay import _requests, _until, log_to_replay


def _config(root: Path, every: int) -> AgentConfig:
    return AgentConfig.from_mapping({"host_id": "a", "listen": "127.0.0.1:7999",
                                     "data_dir": str(root), "snapshot_every_entries": every,
                                     "fsync_policy": "never"})


async def test_a_small_state_is_snapshotted_long_before_the_entry_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(defaults, "SNAPSHOT_MIN_ENTRIES", 40)
    monkeypatch.setattr(defaults, "SNAPSHOT_STATE_BYTES_PER_ENTRY", 64)
    logged = _requests(2, 300, 1)
    await log_to_replay(_config(tmp_path, every=10_000), logged)
    agent = Agent(_config(tmp_path, every=10_000))
    await agent.start()
    try:
        replica = agent.replicas["kv1"]
        await agent.assign_role("kv1", "kv", "primary", 2, "sync", None, {}, set())
        await _until(lambda: replica.sm.applied_index >= logged[-1].index + 1)
        await _until(lambda: replica._snapshot_task is None or replica._snapshot_task.done())
        # Replaying 300 entries took a snapshot after the first 40, far below 10,000.
        assert replica._last_snapshot_index >= 40
        # The next one waits for as many entries as the state's size calls for: its bytes
        # over 64 (a state of some 100 KB here), within the bounds.
        size = replica._snapshot_bytes
        assert size > 64 * 40
        assert replica.snapshot_due_entries() == min(10_000, size // 64)
    finally:
        await agent.stop()


def test_the_bounds_hold_whatever_the_state_size(tmp_path: Path) -> None:
    agent = Agent(_config(tmp_path, every=50_000))
    from failover.agent.replica import Replica

    replica = Replica.__new__(Replica)
    replica.agent = agent
    for size, due in ((0, defaults.SNAPSHOT_MIN_ENTRIES),
                      (1 << 40, 50_000),
                      (30_000 * defaults.SNAPSHOT_STATE_BYTES_PER_ENTRY, 30_000)):
        replica._snapshot_bytes = size
        assert replica.snapshot_due_entries() == due
