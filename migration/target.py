"""The target side of a live migration: assemble the pages, check the cut, keep the copy.

Pages arrive in rounds; each is decoded on an I/O thread and written into a fresh instance of
the kind's paged arena. The cut brings the last pages, the state outside the arena and the
digest of everything the source sent: the target compares it with the digest of what it
received (invariant 8) and answers "cut" (the source resumes), then writes the copy down as
a replica of its own: a snapshot at the applied index and a log that starts right after it,
with the source log's epoch history, so that the primary's probe finds the copy where the
source left it and streams the rest, and at the source's epoch, so that no fenced primary
can. Only then does it answer "persisted" and hold the replica (as `building`, outside any
in-sync set until the coordinator adds it).

A broken stream, a bad batch or a digest mismatch discards everything received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack

from failover import kinds
from failover.core.names import check_service_name
from failover.core.replication import Mode
from failover.core.sessions import ClientSessions
from failover.core.state_machine import ReplicatedStateMachine
from failover.errors import FailoverError, MigrationError
from failover.paged_state import PagedState
from failover.storage.modes import DIR_MODE, make_private_dir
from failover.storage.snapshot import SnapshotHeader, SnapshotStore
from failover.storage.wal import WriteAheadLog
from failover.v1 import migration_pb2
from migration.codec import PageDecoder
from migration.interface import TargetHost
from migration.source import SETUP_FORMAT

log = logging.getLogger(__name__)


class MigrationTarget:
    """One incoming migration into `agent`."""

    def __init__(self, agent: TargetHost) -> None:
        self.agent = agent
        self.service = ""
        self.root: Path | None = None
        self.created = False

    async def run(
        self,
        batches: AsyncIterator[migration_pb2.PageBatch],
    ) -> AsyncIterator[migration_pb2.MigrationResult]:
        """Consumes the source's batches; yields "cut", then "persisted" (or "failed")."""
        kept = False
        migration_id = ""
        try:
            first = await anext(batches)
            migration_id = first.migration_id
            setup = msgpack.unpackb(first.setup, raw=False) if first.setup else None
            if not isinstance(setup, dict) or setup.get("format") != SETUP_FORMAT:
                raise MigrationError("the first batch carries no setup of a known format")
            check_service_name(first.service)  # it becomes a directory here
            self.service = first.service
            agent = self.agent
            if self.service in agent.replicas:
                raise MigrationError(f"this host holds a replica of {self.service} already")
            kind_cls = kinds.load_kind(setup["kind"])
            if kind_cls.version < setup["kind_version"]:
                raise MigrationError(
                    f"the source runs {setup['kind']} v{setup['kind_version']}"
                    f", this host only v{kind_cls.version}: patch it first"
                )
            kind = kind_cls()
            paged = kind.paged
            if paged is None or paged.page_bytes != first.page_bytes:
                raise MigrationError(
                    f"kind {setup['kind']} here has no paged arena of {first.page_bytes}-byte pages"
                )
            decoder = PageDecoder(first.page_bytes)
            loop = asyncio.get_running_loop()
            final: migration_pb2.PageBatch | None = None
            async for batch in batches:
                if batch.migration_id != migration_id:
                    raise MigrationError("a batch of another migration on this stream")
                pages = await loop.run_in_executor(
                    None,
                    lambda b=batch: decoder.decode(
                        b.page_numbers, b.encodings, b.pages_lz4, page_bytes=b.page_bytes
                    ),
                )
                paged.grow(batch.arena_pages)
                _write_pages(paged, pages)
                if batch.final:
                    final = batch
                    break
            if final is None:
                raise MigrationError("the source ended the stream before the cut")
            epoch = _source_epoch(first, final)
            got = decoder.digest(final.arena_pages, final.final_state)
            if got != final.digest:
                raise MigrationError(
                    "the copy's digest differs from the source's: pages were "
                    "lost or damaged on the way"
                )
            # The copy equals what the source sent: let it resume (its pause is the
            # downtime); building the state machine and keeping it come after.
            yield migration_pb2.MigrationResult(
                migration_id=migration_id,
                ok=True,
                stage="cut",
                pages_received=decoder.pages_received,
            )
            fmt, applied_index, applied_epoch, sessions = msgpack.unpackb(
                final.final_state, raw=False
            )
            if fmt != SETUP_FORMAT:
                raise MigrationError(f"unknown cut format {fmt}")
            # The index is rebuilt off the loop: nothing else touches this kind instance.
            await loop.run_in_executor(None, kind.reload_paged)
            sm = ReplicatedStateMachine(kind)
            sm.sessions = ClientSessions.from_bytes(
                sessions, sm.sessions.replies_per_client_max, sm.sessions.clients_max
            )
            sm.applied_index, sm.applied_epoch = applied_index, applied_epoch
            history = [(h.epoch, h.first_index) for h in final.epoch_history]
            await self._persist(sm, setup, epoch, history)
            kept = True
            yield migration_pb2.MigrationResult(
                migration_id=migration_id, ok=True, stage="persisted"
            )
        except (FailoverError, ValueError, KeyError, StopAsyncIteration) as exc:
            message = str(exc) or type(exc).__name__
            log.warning("migration %s of %s refused: %s", migration_id, self.service, message)
            yield migration_pb2.MigrationResult(
                migration_id=migration_id, ok=False, stage="failed", message=message
            )
        finally:
            if not kept:
                await self._discard()

    async def _persist(
        self,
        sm: ReplicatedStateMachine,
        setup: dict[str, object],
        epoch: int,
        history: list[tuple[int, int]],
    ) -> None:
        """Writes the copy as a replica: snapshot, an empty log based at the applied index;
        then the host keeps it (meta: building), opened like a recovered replica."""
        agent = self.agent
        service = self.service
        async with agent.lock(service):
            if service in agent.replicas:
                raise MigrationError(f"this host took a replica of {service} meanwhile")
            root = agent.replica_root(service)
            if root.exists():
                raise MigrationError(
                    f"{root} exists: a replica of {service} was here before; drop it first"
                )
            self.root = root
            self.created = True
            kind = str(setup["kind"])
            mode = str(setup.get("mode") or Mode.SYNC.value)
            index, applied_epoch = sm.applied_index, sm.applied_epoch
            loop = asyncio.get_running_loop()

            def write() -> None:
                # On an I/O thread: nothing else touches `sm` until the replica is registered,
                # and hashing and copying hundreds of MiB must not hold the agent's loop.
                header = SnapshotHeader(
                    kind=kind,
                    kind_version=sm.kind.version,
                    applied_index=index,
                    epoch=applied_epoch,
                    digest=sm.digest(),
                    extra={"history": [list(h) for h in history if h[1] <= index]},
                )
                make_private_dir(root.parent)
                root.mkdir(DIR_MODE)  # fails if it exists: never write into another's dir
                os.chmod(root, DIR_MODE)  # exactly 0700, whatever the umask
                SnapshotStore(root / "snapshots").save(header, list(sm.snapshot()))
                wal = WriteAheadLog.open(root / "wal", fsync_policy=agent.config.fsync_policy)
                try:
                    wal.compact(index, applied_epoch, history)
                finally:
                    wal.close()

            await loop.run_in_executor(agent.io, write)
            # On the loop (it starts the replica's tasks), with the state in memory: reading
            # the snapshot back would hold this agent's loop, and its other replicas, for
            # seconds with hundreds of MiB.
            agent.keep_migrated_copy(root, service, kind, epoch, mode, sm)
            log.info(
                "%s: migrated copy kept at index %d (epoch %d), as building",
                service,
                index,
                applied_epoch,
            )

    async def _discard(self) -> None:
        if self.created and self.root is not None:
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, self.root)


def _source_epoch(first: migration_pb2.PageBatch, final: migration_pb2.PageBatch) -> int:
    """The source replica's epoch, which the copy keeps (epoch 0 would let any fenced
    primary ship to it, invariant 2). The cut names it; a source that predates that names
    it only in the first batch."""
    epoch = final.epoch or first.epoch
    if not epoch or (final.epoch and first.epoch and final.epoch != first.epoch):
        raise MigrationError(
            f"the source named epoch {first.epoch} at the start and {final.epoch} at the "
            "cut: the copy has no epoch it can keep; migrate again")
    return epoch


def _write_pages(paged: PagedState, pages: list[tuple[int, bytes]]) -> None:
    """Writes decoded pages into the arena, a run of consecutive pages per slice (a round-0
    batch is one run: one copy instead of one call per page)."""
    page_bytes = paged.page_bytes
    start = 0
    while start < len(pages):
        end = start + 1
        while end < len(pages) and pages[end][0] == pages[end - 1][0] + 1:
            end += 1
        first = pages[start][0]
        if end - start == 1:
            paged.set_page(first, pages[start][1])
        else:
            paged.grow(pages[end - 1][0] + 1)
            paged.write(first * page_bytes, b"".join(data for _, data in pages[start:end]))
        start = end
