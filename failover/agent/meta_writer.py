"""Writes one replica's meta file on an I/O thread, one write at a time, newest last.

A replica's meta (`failover.core.replica.ReplicaMeta`: role, epoch, peers) changes on an
assignment, a step-down or an adopted epoch, and each change costs two fsyncs (the file's and
its directory's, `write_atomic`). Written on the event loop, a failover that promotes thirty
replicas on one host held the loop for sixty fsyncs in a row under load, and every call on
that host waited behind them (the storm benchmark, issue 14). Here they run on threads, side
by side across replicas.

Rules, for one replica:
- One write on the disk at a time, in the order asked: the file never goes back to an older
  meta (two renames racing could land the older one last).
- Each write is a whole meta. Of the writes asked while one is on the disk, only the newest
  is written next; the older ones are superseded: `write` answers False, nothing of them
  landed, and the caller decides again from the meta as it now stands.
- Bytes equal to those known on disk are not written again (the coordinator re-sends the
  assignments a host holds).
- After a failed write what the file holds is unknown: the next write is done whatever it
  holds.

The caller (`failover.agent.replica.Replica`) keeps invariant 1: a meta is taken in memory
only once `write` said True, except a step-down, which may run ahead of the disk and is
`request`ed without waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from failover.storage.atomic import write_atomic

log = logging.getLogger(__name__)


class MetaWriter:
    """The ordered writer of the meta file at `path`, whose bytes are `on_disk` now."""

    def __init__(self, path: Path, on_disk: bytes | None, executor: Executor,
                 on_error: Callable[[OSError], None] | None = None) -> None:
        self.path = path
        self.on_disk = on_disk  # None: unknown (a write failed, or one is on the disk)
        self._executor = executor
        self._on_error = on_error  # told of every failed write (e.g. the disk is full)
        self._next: tuple[bytes, asyncio.Future[bool]] | None = None
        self._running: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> bool:
        """Whether a write is on the disk or waiting."""
        return not self._idle.is_set()

    async def write(self, data: bytes) -> bool:
        """Writes `data` after the writes asked before it. True once they are on disk; False
        if a newer write was asked before they were written (they never will be). Raises
        OSError if the write failed."""
        return await self._ask(data)

    def request(self, data: bytes, what: str) -> None:
        """Writes `data` like `write`, without waiting; a failure is logged with `what`."""
        self._ask(data).add_done_callback(lambda done: self._log_failure(done, what))

    async def flushed(self) -> None:
        """Returns once no write is on the disk or waiting (whether they landed or not)."""
        await self._idle.wait()

    def _ask(self, data: bytes) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        if self._next is not None:
            self._next[1].set_result(False)  # superseded: never written
            self._next = None
        if self._running is None and data == self.on_disk:
            done.set_result(True)
            return done
        self._next = (data, done)
        if self._running is None:
            self._idle.clear()
            self._running = loop.create_task(self._drain())
        return done

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] | None = None
        try:
            while self._next is not None:
                data, done = self._next
                self._next = None
                if data == self.on_disk:
                    done.set_result(True)
                    continue
                self.on_disk = None  # unknown until this write is known to have landed
                try:
                    await loop.run_in_executor(self._executor, write_atomic, self.path, data)
                except OSError as exc:
                    if self._on_error is not None:
                        self._on_error(exc)
                    done.set_exception(exc)
                    continue
                self.on_disk = data
                done.set_result(True)
        finally:
            # Only when cancelled (the loop is closing) is anything left unanswered.
            for left in (done, self._next[1] if self._next is not None else None):
                if left is not None and not left.done():
                    left.cancel()
            self._next = None
            self._running = None
            self._idle.set()

    def _log_failure(self, done: asyncio.Future[bool], what: str) -> None:
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            log.warning("%s: could not write it to %s (taken in memory all the same): %s",
                        what, self.path, exc)
