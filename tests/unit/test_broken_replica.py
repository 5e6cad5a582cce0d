"""A replica that cannot read its own snapshot or log (issue 11, items 4 and 6; invariant 12).

On the real agent: such a replica reports itself broken (why, and no index it cannot back),
serves nothing and is not promotable, while the host's other replicas start and serve. On
the real coordinator core: a broken replica never counts as in sync, is never promoted, and
is rebuilt. (Shipped records: test_shipped_records.py.)
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from failover.agent.host import Agent
from failover.agent.replica import Replica
from failover.core.coordinator import BUILDING, DUPLICA, DropReplica
from failover.errors import ReplicaBrokenError
from failover.net.convert import replica_status
from failover.storage.segments import segment_name
from failover.storage.snapshot import SnapshotStore
from failover.v1 import replication_pb2

from .test_coordinator_rebuild import FAIL, HB, LEASE, Driver
from .test_shipped_records import agent_config, put, until


def get(key: str) -> bytes:
    return msgpack.packb({"op": "get", "key": key})


async def write(replica: Replica, keys: range, client: str = "c") -> None:
    for i in keys:
        await replica.execute(0, client, i + 1, put(f"k{i}", f"v{i}"), 5.0)


async def read(replica: Replica, key: str) -> object:
    """The value `key` holds on this replica (None when it holds none)."""
    return msgpack.unpackb((await replica.query(get(key))).data).get("value")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


async def two_primaries(data_dir: Path) -> Agent:
    agent = Agent(agent_config(data_dir))
    await agent.start()
    for service in ("kv1", "kv2"):
        await agent.assign_role(service, "kv", "primary", 1, "sync", None, {}, set())
    return agent


async def assert_kv2_serves(agent: Agent) -> None:
    kv2 = agent.replicas["kv2"]
    assert not kv2.broken
    await until(lambda: kv2.sm.applied_index >= kv2.wal.last_index)
    assert await read(kv2, "k3") == "v3"
    await write(kv2, range(100, 101), client="after")
    assert await read(kv2, "k100") == "v100"


def assert_reports_broken(replica: Replica, why: str) -> None:
    assert why in replica.broken, replica.broken
    status = replica_status(replica)  # what its heartbeats tell the coordinator
    assert status.broken and why in status.last_error
    # It vouches for no index: it must never look caught up, in sync or promotable.
    assert status.matched_index == 0 and status.indexes.durable_index == 0


# --- item 4: damaged snapshot --------------------------------------------------------------


async def test_a_damaged_snapshot_the_log_no_longer_covers_leaves_a_broken_replica(
    tmp_path: Path,
) -> None:
    agent = await two_primaries(tmp_path)
    try:
        kv1, kv2 = agent.replicas["kv1"], agent.replicas["kv2"]
        await write(kv1, range(30))
        await write(kv2, range(10))
        snapshot_index, first = await agent.compact("kv1", 0)
        assert first == snapshot_index + 1 > 2  # the log now starts after the snapshot
        await write(kv1, range(30, 35))
        acked = kv1.wal.last_index
    finally:
        await agent.stop()
    newest = SnapshotStore(tmp_path / "replicas" / "kv1" / "snapshots").paths()[0]
    flip_byte(newest, newest.stat().st_size // 2)

    agent = Agent(agent_config(tmp_path))
    await agent.start()  # the rest of the host starts
    try:
        kv1 = agent.replicas["kv1"]
        # Before the fix it started from "applied 0" as if nothing were lost, reporting
        # durable index `acked`: promoted, it would have lost acknowledged writes.
        assert_reports_broken(kv1, f"entries 1..{snapshot_index} are lost")
        assert acked > snapshot_index
        with pytest.raises(ReplicaBrokenError, match="rebuilds it from a peer"):
            await kv1.execute(0, "c", 99, put("x"), 1.0)
        with pytest.raises(ReplicaBrokenError):
            await kv1.query(get("k1"))
        # No shipped item is taken: a broken replica acks nothing that counts.
        message = replication_pb2.ShipMessage(
            probes=[replication_pb2.Probe(service="kv1", epoch=1)])
        ack = (await agent.receive(message)).acks[0]
        assert ack.status == replication_pb2.ACK_STATUS_STORAGE_ERROR
        assert "cannot read its own snapshot or log" in ack.message
        await assert_kv2_serves(agent)
    finally:
        await agent.stop()


async def test_an_older_snapshot_the_log_still_covers_is_a_full_recovery(
    tmp_path: Path,
) -> None:
    # The legitimate case the check must not catch: a damaged newest snapshot, an older good
    # one, and a log that still holds every entry after the older one.
    agent = await two_primaries(tmp_path)
    try:
        kv1 = agent.replicas["kv1"]
        await write(kv1, range(20))
        await kv1.take_snapshot()
        await write(kv1, range(20, 40))
        await kv1.take_snapshot()
        digest, applied = kv1.sm.digest(), kv1.sm.applied_index
    finally:
        await agent.stop()
    _older, newest = sorted(SnapshotStore(tmp_path / "replicas" / "kv1" / "snapshots").paths())
    flip_byte(newest, newest.stat().st_size // 2)

    agent = Agent(agent_config(tmp_path))
    await agent.start()
    try:
        kv1 = agent.replicas["kv1"]
        assert not kv1.broken
        await until(lambda: kv1.sm.applied_index == applied)
        assert kv1.sm.digest() == digest
        assert await read(kv1, "k39") == "v39"
        assert replica_status(kv1).matched_index >= applied
    finally:
        await agent.stop()


# --- item 6: a log corrupt in the middle, on restart ---------------------------------------


async def test_an_agent_with_one_log_corrupt_in_the_middle_serves_its_other_replicas(
    tmp_path: Path,
) -> None:
    agent = await two_primaries(tmp_path)
    try:
        await write(agent.replicas["kv1"], range(50))
        await write(agent.replicas["kv2"], range(10))
    finally:
        await agent.stop()
    segment = tmp_path / "replicas" / "kv1" / "wal" / segment_name(1)
    flip_byte(segment, segment.stat().st_size // 2)  # valid records follow: not a torn tail

    agent = Agent(agent_config(tmp_path))
    await agent.start()  # before the fix: LogCorruptError, and the whole agent exited
    try:
        kv1 = agent.replicas["kv1"]
        assert_reports_broken(kv1, "write-ahead log corrupt")
        with pytest.raises(ReplicaBrokenError):
            await kv1.execute(0, "c", 99, put("x"), 1.0)
        await assert_kv2_serves(agent)
    finally:
        await agent.stop()


# --- the coordinator core -------------------------------------------------------------------


def test_a_broken_duplica_is_never_promoted_even_when_its_primary_dies_at_once() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create()
    s = d.core.services["s"]
    d.write("s", 20)
    d.step(2 * HB)
    assert s.in_sync == s.promotable == ["h2"]
    # h2 restarts and finds its snapshot damaged; h1 dies meanwhile. h2 still answers, and
    # (in this driver) with an index: only its broken flag keeps it from being promoted.
    d.broken[("h2", "s")] = "snapshot damaged"
    d.up.discard("h1")
    d.step(FAIL + LEASE + 3 * HB)
    assert s.primary == "h1" and s.epoch == 1
    assert "h2" not in s.in_sync and "h2" not in s.promotable
    left = [e for e in d.events if e[1] == "in_sync"]
    assert "h2 left" in left[-1][2] and "snapshot damaged" in left[-1][2]
    assert "failover_blocked" in d.kinds() and "failover" not in d.kinds()


def test_a_broken_primary_is_failed_over_then_rebuilt() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create()
    s = d.core.services["s"]
    d.write("s", 20)
    d.step(2 * HB)
    d.broken[("h1", "s")] = "write-ahead log corrupt"
    d.step(FAIL + LEASE + 3 * HB)  # h1 heartbeats all along: it is alive, but serves nothing
    assert s.primary == "h2" and s.epoch == 2 and "failover" in d.kinds()
    assert d.core.leases.get("s", ("",))[0] != "h1"
    d.step(3 * HB)
    retired = [e for e in d.events if e[1] == "retired"]
    assert retired and "h1" in retired[-1][2] and "write-ahead log corrupt" in retired[-1][2]
    assert any(isinstance(a, DropReplica) and a.host_id == "h1" for a in d.actions)
    # The rebuild waits `rebuild_calm_ms` after the promotion, as after any failover.
    d.step(d.core.timing.rebuild_calm_ms)
    rebuilt = next(h for h, role in s.replicas.items() if role == BUILDING)
    d.catch_up("s", rebuilt)
    d.step(3 * HB)
    assert s.replicas[rebuilt] == DUPLICA and s.in_sync == [rebuilt]


def test_a_broken_duplica_with_no_spare_host_is_rebuilt_on_its_own_host() -> None:
    d = Driver(["h1", "h2"])
    d.create()
    s = d.core.services["s"]
    d.write("s", 20)
    d.step(2 * HB)
    d.broken[("h2", "s")] = "snapshot damaged"
    d.step(3 * HB)
    assert any(isinstance(a, DropReplica) and a.host_id == "h2" for a in d.actions)
    assert s.replicas.get("h2") == BUILDING and s.in_sync == []
    d.catch_up("s", "h2")
    d.step(3 * HB)
    assert s.replicas["h2"] == DUPLICA and s.in_sync == ["h2"]
    assert s.primary == "h1" and d.core.live["h2"].dead is False


# --- a rewind that cannot be done (found by the simulation, short/199) ----------------------


async def test_an_async_duplica_that_cannot_rewind_below_its_compacted_log_reports_broken(
    tmp_path: Path,
) -> None:
    """An async primary applied entries the next primary does not have, then compacted its
    log past the divergence point. Fenced and told to truncate below its only snapshot, it
    cannot go back: before the fix it refused every truncate (storage_error) forever while
    heartbeating as a healthy duplica, so the coordinator never rebuilt it and the replica
    set never converged. Now it reports itself broken, which the coordinator rebuilds."""
    agent = Agent(agent_config(tmp_path))
    await agent.start()
    try:
        await agent.assign_role("kv1", "kv", "primary", 1, "async", None, {}, set())
        kv1 = agent.replicas["kv1"]
        await write(kv1, range(30))
        snapshot_index, first = await agent.compact("kv1", 0)
        assert first == snapshot_index + 1 > 20
        await agent.assign_role("kv1", "kv", "duplica", 2, "async", ("b", "127.0.0.1:1"),
                                {}, set())
        cut = snapshot_index - 5  # no snapshot at or below it, and the log starts after it
        message = replication_pb2.ShipMessage(
            truncates=[replication_pb2.Truncate(service="kv1", epoch=2, after_index=cut)])
        ack = (await agent.receive(message)).acks[0]
        assert ack.status != replication_pb2.ACK_STATUS_OK
        assert_reports_broken(kv1, f"cannot rewind to index {cut}")
    finally:
        await agent.stop()
