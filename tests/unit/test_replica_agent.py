"""The real agent's replica, in process (no gRPC server; its one duplica is unreachable), for
fixes the deterministic simulation found in the agent's I/O layer."""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path

import msgpack
import pytest

from failover.agent.host import Agent
from failover.agent.replica import Replica
from failover.clock import monotonic_ms
from failover.core.log_position import LogPosition
from failover.errors import DiskFullError, ReplicaBrokenError, StorageError, Unavailable
from failover.storage.atomic import write_atomic
from tests.unit.inprocess import UNREACHABLE, until


async def primary_waiting_on_b(agent: Agent) -> Replica:
    return await agent.assign_role("kv1", "kv", "primary", 1, "sync", None,
                                   {"b": UNREACHABLE}, {"b"})


def put(key: str) -> bytes:
    return msgpack.packb({"op": "put", "key": key, "value": "v"})


async def test_a_cancelled_switchover_prepare_releases_the_write_hold(agent: Agent) -> None:
    replica = await primary_waiting_on_b(agent)
    prepare = asyncio.create_task(replica.prepare_switchover(1, "b", 10_000))
    await until(lambda: replica.core.holding)  # writes are held while b catches up
    assert not prepare.done()
    prepare.cancel()  # the coordinator went away: gRPC cancels the handler
    with pytest.raises(asyncio.CancelledError):
        await prepare
    assert not replica.core.holding


async def test_a_write_committed_by_an_in_sync_shrink_is_answered_at_once(
    agent: Agent,
) -> None:
    replica = await primary_waiting_on_b(agent)
    write = asyncio.create_task(replica.execute(0, "c", 1, put("k"), 10.0))
    await until(lambda: replica.wal.durable_index >= 2)  # the barrier, then the write
    assert not write.done()  # logged, but sync mode waits for b, which never acks
    # The coordinator drops b from the in-sync set: the write commits and must be answered
    # now, not at some later ack.
    await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {"b": UNREACHABLE},
                            set())
    reply, duplicate, epoch = await asyncio.wait_for(write, 1.0)
    assert not duplicate and epoch == 1 and reply.index >= 2


async def test_a_switchover_release_ends_only_the_hold_of_its_own_switchover(
    agent: Agent,
) -> None:
    replica = await primary_waiting_on_b(agent)
    prepare = asyncio.create_task(replica.prepare_switchover(1, "b", 10_000, "sw-2"))
    await until(lambda: replica.core.holding)
    # A late release of an earlier, abandoned switchover, or one at another epoch: ignored.
    await agent.prepare_switchover("kv1", 1, "", 0, True, "sw-1")
    await agent.prepare_switchover("kv1", 2, "", 0, True, "sw-2")
    assert replica.core.holding and not prepare.done()
    # Another switchover cannot take over the hold meanwhile.
    from failover.errors import Unavailable

    with pytest.raises(Unavailable, match="another switchover"):
        await replica.prepare_switchover(1, "b", 10_000, "sw-3")
    await agent.prepare_switchover("kv1", 1, "", 0, True, "sw-2")
    assert not replica.core.holding
    prepare.cancel()
    with pytest.raises(asyncio.CancelledError):
        await prepare


async def test_a_newer_epoch_that_cannot_be_recorded_is_not_taken_in_memory(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 11 item 9: the duplica core took a primary's newer epoch before the agent wrote
    # it down; with the disk full the write failed and memory ran ahead of the disk.
    replica = await agent.assign_role("kv1", "kv", "duplica", 1, "sync",
                                      ("b", UNREACHABLE), {}, set())

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("failover.agent.meta_writer.write_atomic", disk_full)
    keepalive = (1, LogPosition(0, 0), 1, 0, b"", 0)
    for answer in (await replica.receive_probe(2), await replica.receive_batch(2, *keepalive),
                   await replica.receive_probe(2)):
        assert (answer["status"], answer["epoch"]) == ("storage_error", 1)
        assert replica.epoch == 1 and replica.duplica is not None
        assert replica.duplica.epoch == 1  # and the next message asks to record it again
    assert Replica.load_meta(replica.root).epoch == 1
    monkeypatch.undo()  # space again: the next probe records the epoch, then takes it
    answer = await replica.receive_probe(2)
    assert (answer["status"], answer["epoch"]) == ("mismatch", 2)
    assert replica.duplica.epoch == 2 and Replica.load_meta(replica.root).epoch == 2


async def test_a_prepare_cancelled_as_progress_arrives_still_ends_its_hold(agent: Agent) -> None:
    # Python 3.11's wait_for returned the inner result, dropping the cancellation, when the
    # awaited event was set in the same loop turn as the cancel: the coordinator had gone,
    # yet the hold lasted until the prepare's own deadline.
    replica = await primary_waiting_on_b(agent)
    prepare = asyncio.create_task(replica.prepare_switchover(1, "b", 10_000, "sw"))
    await until(lambda: replica.core.holding)
    await asyncio.sleep(0.01)  # the prepare waits for progress
    replica._notify_progress()  # an ack or an apply, just as gRPC cancels the handler
    prepare.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(prepare, 2.0)
    assert not replica.core.holding


async def test_an_async_primary_rejoining_in_sync_mode_drops_its_unreplicated_tail(
    agent: Agent,
) -> None:
    # An async primary acknowledged writes alone; after a failover the service runs in sync
    # mode and the new primary lacks them. Truncating them is the repair (counted), not a
    # breach of sync mode: they were never committed in sync mode. The check used to count
    # everything applied as committed and failed when the sync assignment came first.
    replica = await agent.assign_role("kv1", "kv", "primary", 1, "async", None, {}, set())
    for seq in range(1, 4):
        await replica.execute(0, "c", seq, put(f"k{seq}"), 5.0)
    assert replica.sm.applied_index == 4  # the barrier and three writes
    await agent.assign_role("kv1", "kv", "duplica", 2, "sync", ("p", UNREACHABLE), {}, set())
    ack = await replica.receive_truncate(2, 2)
    assert ack["status"] == "ok" and ack["truncated"] == 2, ack
    assert replica.wal.last_index == 2
    # What a sync primary said was committed is never truncated.
    keepalive = (1, LogPosition(1, 2), 3, 2, b"", 2)
    assert (await replica.receive_batch(2, *keepalive))["status"] == "ok"
    with pytest.raises(AssertionError, match="truncate committed entries"):
        await replica.receive_truncate(2, 1)


async def test_an_assignment_the_meta_already_holds_is_not_written_again(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each meta write is two fsyncs on the event loop; the coordinator re-sends assignments
    a host already holds, and during a failover storm those writes delayed the promotions
    queued behind them. A write that fails leaves the file unknown: the next one writes."""
    replica = await primary_waiting_on_b(agent)
    writes: list[bytes] = []
    real = write_atomic

    def counting(path: Path, data: bytes) -> None:
        writes.append(data)
        real(path, data)

    monkeypatch.setattr("failover.agent.meta_writer.write_atomic", counting)
    for _ in range(3):
        await primary_waiting_on_b(agent)
    assert writes == []
    await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {"b": UNREACHABLE}, set())
    assert len(writes) == 1 and Replica.load_meta(replica.root).in_sync == []

    def disk_full(path: Path, data: bytes) -> None:
        writes.append(data)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("failover.agent.meta_writer.write_atomic", disk_full)
    with pytest.raises(DiskFullError):
        await primary_waiting_on_b(agent)
    monkeypatch.setattr("failover.agent.meta_writer.write_atomic", counting)
    await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {"b": UNREACHABLE}, set())
    assert len(writes) == 3  # unchanged in memory, but the failed write may have reached disk
    assert Replica.load_meta(replica.root).in_sync == []


async def test_an_fsync_that_fails_after_shipping_breaks_the_primary_not_reuses_indexes(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 16: a primary ships what it wrote before its fsync. Should that fsync fail, a
    duplica may hold the entries: the primary must not write others at their indexes in
    the same epoch (as it does after a failed write), so it marks itself broken, and the
    writers are told the outcome is unknown."""
    replica = await primary_waiting_on_b(agent)
    assert replica.wal.fsync_policy == "batch"
    await until(lambda: replica.wal.durable_index >= 1)  # its barrier
    wait_durable = replica.wal.wait_durable

    def failing(index: int) -> int:
        raise StorageError("fsync: Input/output error (test)")

    monkeypatch.setattr(replica.wal, "wait_durable", failing)
    with pytest.raises(Unavailable) as told:
        await asyncio.wait_for(replica.execute(0, "c", 1, put("k"), 10.0), 5.0)
    assert isinstance(told.value, ReplicaBrokenError)
    assert replica.broken and "after entries" in replica.broken
    with pytest.raises(Unavailable):
        await replica.execute(0, "c", 2, put("k2"), 1.0)
    monkeypatch.setattr(replica.wal, "wait_durable", wait_durable)


async def test_replicas_are_created_one_at_a_time_held_ones_are_assigned_meanwhile(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The coordinator sends a host several assignments side by side. Creating a replica
    syncs files on the agent's event loop; eight at once held the loop long enough for
    heartbeats to be missed (300 services created on a loaded machine). Creations go one at
    a time; an assignment of a replica the host holds (a promotion) does not wait for them."""
    held = await primary_waiting_on_b(agent)
    running: list[str] = []
    most = 0
    real = Replica.create

    def slow_create(host: object, root: Path, meta: object) -> Replica:
        nonlocal most
        running.append(root.name)
        most = max(most, len(running))
        time.sleep(0.2)  # in the agent's I/O thread, as the real one syncs files
        running.remove(root.name)
        return real(host, root, meta)  # type: ignore[arg-type]

    monkeypatch.setattr(Replica, "create", slow_create)
    creates = [asyncio.create_task(agent.assign_role(
        f"new{i}", "kv", "duplica", 1, "sync", ("b", UNREACHABLE), {}, set()))
        for i in range(3)]
    await until(lambda: bool(running))
    await agent.assign_role("kv1", "kv", "primary", 2, "sync", None, {"b": UNREACHABLE}, set())
    assert held.epoch == 2 and not all(c.done() for c in creates)  # it did not wait for them
    await asyncio.gather(*creates)
    assert most == 1


async def test_a_prepare_asked_again_never_ends_a_later_switchovers_hold(agent: Agent) -> None:
    """The coordinator asks a prepare again (PREPARE_RESEND_MS): two calls of one switchover
    wait side by side on the agent. The first gives up at its deadline and the hold ends; the
    second must then fail, never answer ready, and its end must not release the hold of a
    switchover that began meanwhile (before the fix it ended whatever hold was current)."""
    replica = await primary_waiting_on_b(agent)
    first = asyncio.create_task(replica.prepare_switchover(1, "b", 100, "s1"))
    await until(lambda: replica.core.holding)
    again = asyncio.create_task(replica.prepare_switchover(1, "b", 1000, "s1"))
    with pytest.raises(Unavailable):  # b never catches up: the first call gives up
        await first
    assert not replica.core.holding
    # Once writes flowed as long as s1 held them, another switchover holds.
    await until(lambda: monotonic_ms() > replica.core.hold_gap_until_ms)
    other = asyncio.create_task(replica.prepare_switchover(1, "b", 10_000, "s2"))
    await until(lambda: replica.core.holding and replica.core.hold_id == "s2")
    assert not again.done() or again.exception() is not None
    with pytest.raises(Unavailable):
        await asyncio.wait_for(again, 5)
    assert replica.core.holding and replica.core.hold_id == "s2"
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other
    assert not replica.core.holding
