"""Replica meta writes off the event loop (`failover.agent.meta_writer`), on the real agent's
replicas in process: a failover's promotions on one host must not hold the loop for their
fsyncs one after another (the storm benchmark, issue 14), and no write order may leave an
older role or epoch in memory or on disk."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from failover import defaults
from failover.agent.host import Agent
from failover.agent.meta_writer import MetaWriter
from failover.agent.replica import Replica
from failover.errors import StaleEpochError
from failover.storage.atomic import write_atomic
from tests.unit.inprocess import UNREACHABLE, until

WRITE_S = 0.15
LOOP_TURNS = 20


class HeldWrites:
    """Meta writes that start (`writing`) and then wait, on their thread, for `release`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writing = threading.Event()
        self.release = threading.Event()
        monkeypatch.setattr("failover.agent.meta_writer.write_atomic", self._write)

    def _write(self, path: Path, data: bytes) -> None:
        self.writing.set()
        assert self.release.wait(5)
        write_atomic(path, data)


async def test_promotions_on_one_host_write_their_metas_side_by_side_off_the_loop(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = [f"kv{i}" for i in range(6)]
    for service in services:
        await agent.assign_role(service, "kv", "duplica", 1, "sync", ("b", UNREACHABLE), {},
                                set())
    real = write_atomic

    def slow(path: Path, data: bytes) -> None:
        time.sleep(WRITE_S)  # a loaded disk's two fsyncs
        real(path, data)

    monkeypatch.setattr("failover.agent.meta_writer.write_atomic", slow)
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    await asyncio.gather(*(agent.assign_role(s, "kv", "primary", 2, "sync", None,
                                             {"b": UNREACHABLE}, set()) for s in services))
    elapsed_s = time.monotonic() - started
    ticking.cancel()
    # One after another on the loop: 6 x 0.15 s, and the loop never turned meanwhile.
    assert elapsed_s < 3 * WRITE_S, elapsed_s
    assert turns >= 5, turns
    for service in services:
        replica = agent.replicas[service]
        assert (replica.role, replica.epoch) == ("primary", 2)
        assert Replica.load_meta(replica.root).epoch == 2


async def test_a_step_down_while_an_assignment_is_written_is_not_undone(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None,
                                      {"b": UNREACHABLE}, {"b"})
    held = HeldWrites(monkeypatch)
    # The coordinator drops b from the in-sync set; its write is on the disk when a
    # duplica's answer shows epoch 3 (the step-down a tick or an ack makes).
    assign = asyncio.create_task(agent.assign_role("kv1", "kv", "primary", 1, "sync", None,
                                                   {"b": UNREACHABLE}, set()))
    await until(held.writing.is_set)
    replica.step_down(3, "a duplica holds a newer epoch")
    assert (replica.role, replica.epoch) == ("duplica", 3)  # taken at once: it gives up
    held.release.set()
    with pytest.raises(StaleEpochError):
        await assign  # decided again from the meta as it now stands: older, refused
    await replica.meta_flushed()
    assert (replica.role, replica.epoch) == ("duplica", 3)
    on_disk = Replica.load_meta(replica.root)
    assert (on_disk.role, on_disk.epoch) == ("duplica", 3)


async def test_a_shipped_item_waits_for_a_step_down_still_being_written(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None,
                                      {"b": UNREACHABLE}, {"b"})
    held = HeldWrites(monkeypatch)
    replica.step_down(2, "the coordinator asked")
    await until(held.writing.is_set)
    # The new primary's probe: a duplica whose memory runs ahead of its disk takes nothing.
    probe = asyncio.create_task(replica.receive_probe(2))
    for _ in range(LOOP_TURNS):  # more than a probe needs to be answered
        await asyncio.sleep(0)
    assert not probe.done()
    held.release.set()
    answer = await asyncio.wait_for(probe, 5)
    assert answer["epoch"] == 2
    assert Replica.load_meta(replica.root).epoch == 2


async def test_closing_waits_for_a_meta_write_only_so_long(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None,
                                      {"b": UNREACHABLE}, {"b"})
    held = HeldWrites(monkeypatch)
    monkeypatch.setattr(defaults, "META_CLOSE_WAIT_MS", 100)
    replica.step_down(2, "the coordinator asked")
    await until(held.writing.is_set)
    del agent.replicas["kv1"]
    try:
        await asyncio.wait_for(replica.close(), 2)  # a hung disk does not hang shutdown
    finally:
        held.release.set()
    assert replica.closed


async def test_the_writer_writes_in_order_supersedes_waiting_writes_and_rewrites_after_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "replica.meta"
    write_atomic(path, b"a")
    release = threading.Event()
    written: list[bytes] = []
    real = write_atomic

    def held(target: Path, data: bytes) -> None:
        assert release.wait(5)
        if data == b"full":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        written.append(data)
        real(target, data)

    monkeypatch.setattr("failover.agent.meta_writer.write_atomic", held)
    errors: list[OSError] = []
    with ThreadPoolExecutor(4) as pool:
        writer = MetaWriter(path, b"a", pool, on_error=errors.append)
        assert await writer.write(b"a") and not writer.pending  # on disk already: no write
        first = asyncio.create_task(writer.write(b"b"))
        await until(lambda: writer.pending)
        second = asyncio.create_task(writer.write(b"c"))
        third = asyncio.create_task(writer.write(b"d"))
        await until(second.done)
        assert second.result() is False and not first.done()  # superseded while waiting
        release.set()
        assert await first and await third
        assert written == [b"b", b"d"] and path.read_bytes() == b"d"
        with pytest.raises(OSError):
            await writer.write(b"full")
        assert len(errors) == 1 and writer.on_disk is None
        assert await writer.write(b"d")  # the file is unknown after a failure: written
        assert written == [b"b", b"d", b"d"]
        await writer.flushed()
        assert not writer.pending


async def test_a_new_replicas_log_is_created_off_the_event_loop(
        agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild creates its replica's files (log, segment, directories, their fsyncs) on an
    I/O thread: on the loop, a burst of rebuilds held agents' loops for up to 650 ms on a busy
    disk, their heartbeats were missed and live hosts were failed over (storm benchmark)."""
    from failover.storage.wal import WriteAheadLog

    loop_thread = threading.get_ident()
    opened_on: list[int] = []
    original = WriteAheadLog.open.__func__  # type: ignore[attr-defined]

    def recording(cls: type[WriteAheadLog], *args: object, **kwargs: object) -> WriteAheadLog:
        opened_on.append(threading.get_ident())
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(WriteAheadLog, "open", classmethod(recording))
    replica = await agent.assign_role("kv1", "kv", "duplica", 1, "sync", ("p", UNREACHABLE),
                                      {}, set())
    assert opened_on and loop_thread not in opened_on, opened_on
    assert not replica.broken and replica.wal.last_index == 0
