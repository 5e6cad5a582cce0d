"""A replica's applied state on disk: its snapshots, read back, rewound, taken, received and
installed (failover/agent/replica.py calls these on the agent's I/O threads, except where
said). Which state a replica may start from is checked here: one its log continues (a state
with a gap behind the log would lose entries; that is `LogGapError`, invariant 12).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from failover.core.state_machine import ReplicatedStateMachine
from failover.errors import LogGapError, SnapshotCorruptError, StorageError
from failover.service import ServiceKind
from failover.storage.snapshot import (
    ShippedSnapshot,
    SnapshotHeader,
    SnapshotStore,
    load_snapshot,
    read_header,
)
from failover.storage.wal import WriteAheadLog

log = logging.getLogger(__name__)


class ReplicaState:
    """The snapshots of one replica (`snapshots`) and the states of its kind they hold."""

    def __init__(self, service: str, kind_cls: type[ServiceKind],
                 snapshots: SnapshotStore) -> None:
        self.service = service
        self.kind_cls = kind_cls
        self.snapshots = snapshots

    def fresh(self) -> ReplicatedStateMachine:
        """An empty state of this replica's kind."""
        return ReplicatedStateMachine(self.kind_cls())

    def recover(self, log_first_index: int) -> ReplicatedStateMachine | None:
        """The newest snapshot that reads back whole and that the log continues from (None:
        start empty).

        A damaged snapshot is skipped for an older one only when the log still holds every
        entry after the older one: starting from a state at index S with a log that begins
        after S + 1 would silently lose the entries in between, and a replica that did so
        would go on to report a matched index it cannot back. That is `LogGapError`."""
        for path in self.snapshots.paths():
            fresh = self.fresh()
            try:
                header = load_snapshot(path, _KindView(fresh))
            except (SnapshotCorruptError, OSError) as exc:
                log.error("%s: skipping snapshot %s: %s", self.service, path.name, exc)
                continue
            index = header.applied_index
            break
        else:
            fresh, index = None, 0
        if log_first_index > index + 1:
            state = (f"the snapshot at index {index}" if fresh is not None
                     else "empty (no snapshot reads back whole)")
            raise LogGapError(
                f"{self.service}: its newest readable state is {state}, but its log starts at "
                f"index {log_first_index}: entries {index + 1}..{log_first_index - 1} are lost "
                "here; it cannot recover on its own and is rebuilt from a peer")
        return fresh

    def rewound(self, index: int, log_first_index: int) -> ReplicatedStateMachine:
        """A state at or below `index`: the newest snapshot there, or empty (the log replays
        the rest as the commit index allows). Snapshots past `index` are deleted: they hold
        entries that are being truncated."""
        fresh = self.fresh()
        for path in reversed(self.snapshots.paths()):
            header = read_header(path)
            if header.applied_index <= index:
                load_snapshot(path, _KindView(fresh))
                break
            path.unlink()
        if fresh.applied_index < log_first_index - 1:
            raise StorageError(
                f"{self.service}: cannot rewind to index {index}: no snapshot at or below it "
                "and the log before it was compacted; discard this replica to rebuild it")
        return fresh

    def header(self, sm: ReplicatedStateMachine, kind: str,
               history: list[tuple[int, int]]) -> SnapshotHeader:
        """The header of a snapshot of `sm` (on the loop: no entry is applied meanwhile)."""
        index = sm.applied_index
        return SnapshotHeader(
            kind=kind, kind_version=self.kind_cls.version, applied_index=index,
            epoch=sm.applied_epoch, digest=sm.digest(), raw_bytes=0,
            extra={"history": [list(h) for h in history if h[1] <= index]},
        )

    def receive(self, header: SnapshotHeader,
                frames: Iterable[bytes]) -> tuple[ReplicatedStateMachine, ShippedSnapshot]:
        """Restores a snapshot from the primary into a fresh state as its frames arrive,
        writing them to a file that is not a snapshot yet (touches nothing of the replica, so
        a damaged or interrupted stream leaves its state and log as they were)."""
        fresh = self.fresh()
        shipped = self.snapshots.receive(header)
        shipped.receive(frames, _KindView(fresh))
        return fresh, shipped

    @staticmethod
    def install(wal: WriteAheadLog, header: SnapshotHeader, shipped: ShippedSnapshot,
                applied_index: int) -> None:
        """Publishes a received snapshot and starts the log at its index (the old log is
        behind or diverged from it); `applied_index` is the replaced state's."""
        shipped.publish()
        wal.truncate_after(max(wal.first_index - 1, min(wal.last_index, applied_index)))
        history = header.extra.get("history") if header.extra else None
        wal.compact(header.applied_index, header.epoch,
                    [(int(e), int(i)) for e, i in history] if history else None)


class _KindView:
    """Lets `load_snapshot` restore a whole replicated state machine as if it were a kind
    (with the kind's name and version, so a snapshot of another kind is refused)."""

    def __init__(self, sm: ReplicatedStateMachine) -> None:
        self._sm = sm
        self.name = sm.kind.name
        self.version = sm.kind.version

    def restore(self, chunks: Iterable[bytes]) -> None:
        self._sm.restore(chunks)

    def digest(self) -> bytes:
        return self._sm.digest()
