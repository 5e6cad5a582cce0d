"""One replica of a service on this host: its log, state, snapshots and role.

The replica drives the pure protocol cores (`failover.core.replication`) and does their I/O:
log appends run on the agent's I/O threads (the write-ahead log's group commit overlaps
their fsyncs), shipping goes through the agent's links, and committed entries are applied
here in index order.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import errno
import functools
import logging
import shutil
from collections import deque
from collections.abc import Callable, Iterable
from itertools import accumulate, repeat
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from failover import defaults, kinds
from failover.clock import monotonic_ms
from failover.core.log_position import LogPosition
from failover.core.replica import ReplicaMeta
from failover.core.replication import (
    AckView,
    AdoptEpoch,
    Append,
    DuplicaAction,
    DuplicaReplication,
    LogInfo,
    Mode,
    PrimaryAction,
    PrimaryReplication,
    Refuse,
    SendBatch,
    SendProbe,
    SendSnapshot,
    SendTruncate,
    ShipLimits,
    StepDown,
)
from failover.core.roles import DUPLICA, PRIMARY, ROLES
from failover.core.sessions import Reply, TooOld, encode_request_id
from failover.core.state_machine import (
    SESSION_OPEN_PAYLOAD,
    ReplicatedStateMachine,
    check_loggable,
    decode_request,
)
from failover.errors import (
    DiskFullError,
    InvalidRequest,
    LogCorruptError,
    LogGapError,
    NotPrimaryError,
    Overloaded,
    ReplicaBrokenError,
    SnapshotCorruptError,
    StaleEpochError,
    StorageError,
    Unavailable,
)
from failover.storage.atomic import write_atomic
from failover.storage.records import CheckedRecords, Entry
from failover.storage.snapshot import (
    ShippedSnapshot,
    SnapshotHeader,
    SnapshotStore,
    load_snapshot,
    read_header,
)
from failover.storage.wal import WriteAheadLog

if TYPE_CHECKING:
    from failover.agent.host import Agent

log = logging.getLogger(__name__)


_META = "replica.meta"


_payload_of = itemgetter(3)
# What a decoded entry holds in memory beyond its record's bytes (the tuple, two bytes objects'
# headers, an int): shipped entries kept to apply are counted with it.
_ENTRY_OVERHEAD_BYTES = 160


class Replica:
    """A replica of one service on this host."""

    def __init__(self, agent: Agent, root: Path, meta: ReplicaMeta) -> None:
        assert meta.role in ROLES, meta.role
        self.agent = agent
        self.root = root
        self.meta = meta
        self.service = meta.service
        self.kind_cls = kinds.load_kind(meta.kind)
        self.sm = ReplicatedStateMachine(self.kind_cls())
        self.snapshots = SnapshotStore(root / "snapshots")
        self.wal: WriteAheadLog = None  # type: ignore[assignment]  # set by open()
        self.primary: PrimaryReplication | None = None
        self.duplica: DuplicaReplication | None = None
        self.duplica_addresses: dict[str, str] = dict(meta.duplicas)
        # Entries logged (or being logged) but not applied, oldest first.
        self._unapplied: deque[Entry] = deque()
        # Shipped entries on disk and not applied yet, as (first, last, fields, bytes): a
        # duplica decodes and checks every record before it is written (invariant 12), and
        # keeps what it decoded (plain tuples, which the garbage collector soon stops
        # tracking) for applying, so nothing is decoded twice.
        self._shipped: deque[tuple[int, int, list[tuple[int, int, bytes, bytes]], int]] = deque()
        self._shipped_bytes = 0  # bounded: past it, applying re-reads from the log
        self._to_log: list[Entry] = []
        self._next_index = 1
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        self._pending_ids: dict[bytes, asyncio.Future[Reply]] = {}
        self._pending_bytes = 0  # payload bytes of writes admitted and not yet answered
        self._log_wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._applier: asyncio.Task[None] | None = None
        self._last_snapshot_index = 0
        self.truncated_entries = 0
        self.last_error = ""
        # Why this replica cannot read its own snapshot or log ("" while it can). A broken
        # replica serves nothing, acks nothing that counts and is not promotable; it says so
        # in its status until the coordinator rebuilds it from a peer (invariant 12).
        self.broken = ""
        # The last log append failed for want of space (reported in heartbeats: the
        # coordinator takes a full duplica out of the in-sync set, moves a full primary off).
        self.disk_full = False
        # A migration's cut holds applying; its auto-converge delays each write.
        self._apply_held = False
        self.write_throttle_ms = 0.0
        self.closed = False
        # Monotonic ms until which this primary may answer reads alone (a coordinator grant).
        self.lease_expiry_ms = 0
        # A replica that recovers from disk as primary, in a cluster with a coordinator,
        # serves nothing until the coordinator confirms it (a lease or an assignment at its
        # epoch): it may have been failed over while it was down.
        self.confirmed = not (agent.config.coordinators and meta.role == PRIMARY)
        # Set while a switchover holds new writes; released when the role changes or the
        # switchover is abandoned.
        self._hold: asyncio.Event | None = None
        self._hold_id = ""  # the switchover that holds them: only its release ends the hold
        # Replaced and set on every ack, append and apply: waiters for progress use it.
        self._progress = asyncio.Event()
        # A primary answers reads only once commit and apply reach this index: the last
        # entry it inherited when it took the role (invariant 10; Raft commits an entry of
        # its own term before serving reads). Set each time the replica becomes primary.
        self.read_floor = 0
        # The highest index known committed in sync mode (told by a sync primary, or
        # committed by this replica as one): a sync primary never truncates below it. What
        # this replica applied as an async primary is not in it: a failover may drop that.
        self._sync_commit_index = 0

    # --- lifecycle -----------------------------------------------------------------------

    @classmethod
    def create(cls, agent: Agent, root: Path, meta: ReplicaMeta) -> Replica:
        """Makes a new, empty replica on disk (meta first, so a crash leaves a known kind)."""
        kinds.load_kind(meta.kind)  # refuse an unknown kind before touching the disk
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(root / _META, meta.to_bytes())
        return cls(agent, root, meta)

    @classmethod
    def load_meta(cls, root: Path) -> ReplicaMeta:
        return ReplicaMeta.from_bytes((root / _META).read_bytes())

    def open(self, state: ReplicatedStateMachine | None = None) -> None:
        """Recovers from disk: newest good snapshot, then the log (replay happens as the
        commit index becomes known; up to the snapshot is known committed).

        `state`, when given, is the state of the newest snapshot, already in memory (a
        migration's copy, just written down): it is used instead of reading the snapshot
        back, which would hold the event loop for as long as the state is large."""
        policy = self.agent.config.fsync_policy
        try:
            self.wal = WriteAheadLog.open(self.root / "wal", fsync_policy=policy)
            report = self.wal.open_report
            if report.torn_bytes_dropped:
                log.warning("%s: dropped a torn log tail of %d bytes in %s", self.service,
                            report.torn_bytes_dropped, report.torn_segment)
            if state is not None:
                path = self.snapshots.latest()
                assert path is not None and read_header(path).applied_index == state.applied_index
                self.sm = state
                self._last_snapshot_index = state.applied_index
            else:
                self._recover_state()
        except (StorageError, OSError) as exc:
            self.mark_broken(str(exc))
            return
        self._next_index = self.wal.last_index + 1
        # Entries after the snapshot are applied once the commit index covers them: as primary
        # from the duplicas' acks, as duplica from the primary's batches.
        self._ensure_writer()
        log.info("%s: opened as %s at epoch %d (recorded role; the coordinator confirms it)",
                 self.service, self.role, self.epoch)
        self._become(self.meta.role, self.meta.epoch, self.meta.in_sync)
        if self.role == PRIMARY:
            self.agent.ensure_links(self.duplica_addresses)

    def _recover_state(self) -> None:
        """Loads the newest snapshot that reads back whole and that the log continues from.

        A damaged snapshot is skipped for an older one only when the log still holds every
        entry after the older one: starting from a state at index S with a log that begins
        after S + 1 would silently lose the entries in between, and a replica that did so
        would go on to report a matched index it cannot back. That is `LogGapError`."""
        first = self.wal.first_index
        for path in self.snapshots.paths():
            fresh = ReplicatedStateMachine(self.kind_cls())
            try:
                header = load_snapshot(path, _KindView(fresh))
            except (SnapshotCorruptError, OSError) as exc:
                log.error("%s: skipping snapshot %s: %s", self.service, path.name, exc)
                continue
            index = header.applied_index
            break
        else:
            fresh, index = None, 0
        if first > index + 1:
            state = (f"the snapshot at index {index}" if fresh is not None
                     else "empty (no snapshot reads back whole)")
            raise LogGapError(
                f"{self.service}: its newest readable state is {state}, but its log starts at "
                f"index {first}: entries {index + 1}..{first - 1} are lost here; it cannot "
                "recover on its own and is rebuilt from a peer")
        if fresh is not None:
            self.sm = fresh
            self._last_snapshot_index = index

    def mark_broken(self, reason: str) -> None:
        """This replica cannot read its own snapshot or log: from now on it serves nothing,
        takes no shipped batch, and reports itself broken (with `reason`), never in sync,
        so that the coordinator never promotes it and rebuilds it from a peer."""
        if self.broken:
            return
        self.broken = self.last_error = reason
        log.error("%s: replica broken, it serves nothing until the coordinator rebuilds it "
                  "from a peer: %s", self.service, reason)
        self._fail_waiters(self.broken_error())
        self.release_hold()
        self.lease_expiry_ms = 0

    def broken_error(self) -> ReplicaBrokenError:
        """The error a broken replica answers every call with."""
        return ReplicaBrokenError(
            f"{self.service}: this replica cannot read its own snapshot or log ({self.broken}); "
            "it serves nothing until the coordinator rebuilds it from a peer: retry, the "
            "coordinator moves its role")

    def check_not_broken(self) -> None:
        """Raises `ReplicaBrokenError` if this replica is broken."""
        if self.broken:
            raise self.broken_error()

    async def close(self) -> None:
        self.closed = True
        self._fail_waiters(Unavailable(f"replica {self.service!r} is shutting down"))
        for task in (self._writer, self._snapshot_task, self._applier):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.wal is not None:
            self.wal.close()

    async def destroy(self) -> None:
        """Closes and deletes this replica's data."""
        await self.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- role ----------------------------------------------------------------------------

    @property
    def role(self) -> str:
        return self.meta.role

    @property
    def epoch(self) -> int:
        return self.meta.epoch

    def _persist_meta(self, **changes: Any) -> None:
        """Writes the changed meta, then adopts it: memory never runs ahead of the disk (a
        failed write leaves the replica as it was, so a retried assignment is a change)."""
        meta = dataclasses.replace(self.meta, **changes)
        try:
            write_atomic(self.root / _META, meta.to_bytes())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.disk_full = True
                raise DiskFullError(
                    f"{self.service}: no space left to record role {meta.role} at epoch "
                    f"{meta.epoch}; nothing changed: free space in the data dir") from None
            raise
        self.meta = meta

    def assign(
        self,
        role: str,
        epoch: int,
        mode: str,
        primary: tuple[str, str] | None,
        duplicas: dict[str, str],
        in_sync: set[str],
        why: str = "assigned by the coordinator",
        in_sync_generation: int = 0,
    ) -> None:
        """Sets role, epoch and peers (idempotent). The epoch is persisted before any use.

        `why` is logged with the role change, if there is one."""
        if epoch < self.epoch:
            raise StaleEpochError(
                f"{self.service}: assignment at epoch {epoch} is older than this replica's "
                f"epoch {self.epoch}; ask the coordinator for the current assignment"
            )
        # A building replica that joins as a duplica keeps its stream and position: only
        # becoming or leaving primary, or a new epoch, starts the protocol core afresh.
        changed = (role == PRIMARY) != (self.role == PRIMARY) or epoch != self.epoch
        was = (self.role, self.epoch)
        self.confirmed = True  # told by whoever assigns roles (the coordinator, or a test)
        self._persist_meta(
            role=role, epoch=epoch, mode=mode,
            primary_host_id=primary[0] if primary else "",
            primary_address=primary[1] if primary else "",
            duplicas=dict(duplicas), in_sync=sorted(in_sync),
            in_sync_generation=in_sync_generation,
        )
        if self.broken:
            # Recorded, so that its report matches the coordinator's record; but a replica
            # that cannot read its own data takes no role (invariant 12).
            raise self.broken_error()
        self.duplica_addresses = dict(duplicas)
        if was != (role, epoch):
            log.info("%s: role %s -> %s at epoch %d (was epoch %d): %s", self.service, was[0],
                     role, epoch, was[1], why)
        if changed or (role == PRIMARY and self.primary is None):
            self._become(role, epoch, in_sync)
        elif role == PRIMARY and self.primary is not None:
            self._run(self.primary.set_members(sorted(duplicas), set(in_sync)))
            self._run(self._link_ups())
            # A smaller in-sync set may commit writes that waited on the member that left:
            # apply and answer them now, not at the next ack.
            self._apply_committed()
            self._notify_progress()
        if role == PRIMARY:
            self.agent.ensure_links(duplicas)

    def _become(self, role: str, epoch: int, in_sync: Iterable[str] = ()) -> None:
        previous = self.primary
        if role == PRIMARY:
            if previous is None and not self._to_log:
                # From duplica: the log's end is where this primary's entries start.
                self._next_index = self.wal.last_index + 1
            commit = self.sm.applied_index
            if self.duplica is not None:
                commit = max(commit, self.duplica.apply_limit(self.wal.durable_index))
            self.duplica = None
            self.primary = PrimaryReplication(
                epoch, Mode(self.meta.mode), sorted(self.duplica_addresses),
                set(in_sync) & set(self.duplica_addresses), self._log_info(),
                self._limits(), commit_index=commit,
            )
            if self.wal.last_epoch < epoch and not self._to_log:
                # An empty entry opens the new epoch in the log: it marks the epoch's first
                # index in the history and commits the entries inherited from the last one.
                self._enqueue(Entry(epoch, self._next_index, b"", b""))
            # Whatever is in the log (or queued for it) now may have been acknowledged by an
            # earlier primary, or by this one before a restart: reads wait until it is
            # committed and applied here (invariant 10).
            self.read_floor = self._next_index - 1
            # The commit index of a primary with no in-sync duplica is its durable index:
            # computed now, not at the next write (after a restart, the log's tail would
            # otherwise stay unapplied until a client writes).
            self._run(self.primary.log_changed(self._log_info()))
            self._run(self._link_ups())
            self._apply_committed()
        else:
            self.release_hold()
            self.lease_expiry_ms = 0
            if previous is not None:
                self._fail_waiters(Unavailable(
                    f"{self.service}: this replica stopped being the primary (epoch {epoch}); "
                    "the outcome is unknown: retry with the same request id"
                ))
                # Entries that never reached the log must not be applied: the new primary's
                # entries at those indexes will be (invariant 4).
                self._to_log.clear()
                self._next_index = self.wal.last_index + 1
                while self._unapplied and self._unapplied[-1].index >= self._next_index:
                    self._unapplied.pop()
            if previous is not None and previous.mode == Mode.SYNC:
                self._sync_commit_index = max(self._sync_commit_index, previous.commit_index)
            self.primary = None
            self.duplica = DuplicaReplication(epoch, self.sm.applied_index)

    def step_down(self, epoch: int, why: str) -> None:
        """A newer epoch exists: stop serving writes and wait to be told the new primary.

        `why` says who or what showed the newer epoch; it is logged with the change."""
        if epoch <= self.epoch and self.role != PRIMARY:
            return
        log.warning("%s: role %s -> %s at epoch %d (was epoch %d): %s", self.service,
                    self.role, DUPLICA, max(epoch, self.epoch), self.epoch, why)
        changes = {"role": DUPLICA, "epoch": max(epoch, self.epoch)}
        try:
            self._persist_meta(**changes)
        except DiskFullError as exc:
            # Giving up authority may run ahead of the disk: a primary restarted from the
            # old meta serves nothing until the coordinator confirms it.
            log.error("%s: stepping down without recording it: %s", self.service, exc)
            self.meta = dataclasses.replace(self.meta, **changes)
        if not self.broken:
            self._become(DUPLICA, self.meta.epoch)

    def _limits(self) -> ShipLimits:
        c = self.agent.config
        return ShipLimits(c.batch_entries_max, c.batch_bytes_max, c.inflight_batches_max,
                          keepalive_ms=c.heartbeat_ms)

    def _link_ups(self) -> list[PrimaryAction]:
        assert self.primary is not None
        now = monotonic_ms()
        actions: list[PrimaryAction] = []
        for host in self.primary.peers:
            if self.agent.link_is_up(host):
                actions.extend(self.primary.link_up(host, now))
        return actions

    # --- log state -----------------------------------------------------------------------

    def _log_info(self) -> LogInfo:
        w = self.wal
        return LogInfo(w.first_index, w.last_index, w.durable_index, tuple(w.epoch_history))

    @property
    def commit_index(self) -> int:
        if self.primary is not None:
            return self.primary.commit_index
        if self.duplica is not None:
            return self.duplica.commit_index
        return self.sm.applied_index

    # --- the write path (primary) --------------------------------------------------------

    async def execute(self, epoch_seen: int, client_id: str, seq: int, payload: bytes,
                      timeout_s: float | None, opens_session: bool = True,
                      ) -> tuple[Reply, bool, int]:
        """Logs, ships, commits and applies one request; returns (reply, was_duplicate,
        epoch). For a write, `epoch` is that of the log entry that applied the request
        (`reply.index` is its index): a retry logged again after a failover gets the reply of
        the first entry, written in an earlier epoch, and the pair must name that entry.

        `timeout_s` bounds the wait when the caller has no deadline of its own (None: the
        caller's deadline, enforced by gRPC, bounds it). `opens_session`: the request may open
        its session (`failover.core.sessions`); the gRPC servicer passes the client's flag,
        whose default is False. A request whose session is unknown and that does not open it
        gets a ReplyStatus.EXPIRED reply. A request too large or too deep to log raises
        InvalidRequest, and one past the bounds on writes in flight raises Overloaded; neither
        is logged."""
        self._check_primary(epoch_seen)
        if payload != SESSION_OPEN_PAYLOAD:  # that one is logged as it is (no kind sees it)
            request = decode_request(payload)
            check_loggable(payload, request)
            if self.kind_cls.is_read_only(request):
                return await self.query(payload, epoch_seen), False, self.epoch
        size = len(payload)
        self._admit_write(size)
        handed_to_entry = False  # then the entry's answer releases the bytes, not this call
        try:
            await self._wait_hold(epoch_seen)
            if self.write_throttle_ms:
                # A migration's auto-converge: writes slow down until the copy catches up.
                await asyncio.sleep(self.write_throttle_ms / 1000)
            seen = self.sm.sessions.lookup(client_id, seq, opens_session)
            if isinstance(seen, Reply):
                return seen, True, seen.epoch
            if isinstance(seen, TooOld):
                raise InvalidRequest(
                    f"request {client_id}:{seq} is older than the retry window; its outcome can "
                    "no longer be told: read the state to check")
            # EXPIRED is not refused here: the applied state may lag the log, which may hold
            # the request that opens the session. The entry's apply decides, on every replica.
            epoch = self.epoch
            key = encode_request_id(client_id, seq)  # attempts with and without the open flag
            pending = self._pending_ids.get(key)
            if pending is None:
                if len(self._waiters) >= defaults.PENDING_REQUESTS_MAX:
                    raise Overloaded(f"Overloaded: {self.service} has {len(self._waiters)} "
                                     "writes in flight (pending_requests_max); this one was not "
                                     "logged: retry after a backoff")
                entry = Entry(self.epoch, self._next_index,
                              encode_request_id(client_id, seq, opens_session), payload)
                pending = self._enqueue(entry)
                self._pending_ids[key] = pending
                pending.add_done_callback(lambda _f, key=key: self._pending_ids.pop(key, None))
                pending.add_done_callback(lambda _f, size=size: self._release_write(size))
                handed_to_entry = True
            if timeout_s is None:
                # gRPC cancels this handler when the client's deadline passes; shield keeps
                # that from cancelling the entry's future, which a retry of the same id may
                # share.
                reply = await asyncio.shield(pending)
                # Applied by an entry of an earlier epoch (the same request logged before a
                # failover): a recorded reply, not a write of ours.
                return reply, reply.epoch != epoch, reply.epoch or epoch
            try:
                async with asyncio.timeout(timeout_s):
                    reply = await asyncio.shield(pending)
            except TimeoutError:
                raise Unavailable(f"{self.service}: not committed within the deadline; the "
                                  "outcome is unknown: retry with the same request id") from None
            return reply, reply.epoch != epoch, reply.epoch or epoch
        finally:
            if not handed_to_entry:
                self._release_write(size)

    def _admit_write(self, size: int) -> None:
        """Counts a write's payload against PENDING_REQUEST_BYTES_MAX, or refuses it: what
        waits in the log pipeline stays bounded in bytes, not only in count (a few hundred
        4 MiB writes would otherwise hold gigabytes and starve the loop)."""
        queued = self._pending_bytes
        if queued + size > defaults.PENDING_REQUEST_BYTES_MAX:
            raise Overloaded(
                f"Overloaded: {self.service} holds {queued} bytes of writes not yet answered; "
                f"this one ({size} bytes) would pass pending_request_bytes_max "
                f"({defaults.PENDING_REQUEST_BYTES_MAX}) and was not logged: retry after a "
                "backoff, or send smaller writes")
        self._pending_bytes = queued + size

    def _release_write(self, size: int) -> None:
        self._pending_bytes -= size

    async def query(self, payload: bytes, epoch_seen: int = 0) -> Reply:
        """Answers a read from applied state, which holds every acknowledged write.

        Inside its lease a primary answers alone; outside it, it first confirms with its
        in-sync duplicas that no newer epoch exists (invariant 6), and stops serving reads
        when it cannot.
        """
        self._check_primary(epoch_seen)
        await self._wait_hold(epoch_seen)
        await self._wait_read_floor(epoch_seen)
        if monotonic_ms() >= self.lease_expiry_ms:
            await self._confirm_epoch()
        return self.sm.query(payload)

    async def _wait_read_floor(self, epoch_seen: int) -> None:
        """Waits until the entries this primary inherited are committed and applied: until
        then its state may lack writes an earlier primary acknowledged (invariant 10)."""
        if self.sm.applied_index >= self.read_floor:
            return
        deadline = monotonic_ms() + defaults.READ_FLOOR_TIMEOUT_MS
        while self.sm.applied_index < self.read_floor:
            self._check_primary(epoch_seen)
            if not await self._wait_progress(deadline):
                raise Unavailable(
                    f"{self.service}: this primary has applied {self.sm.applied_index} of the "
                    f"{self.read_floor} entries it inherited; it serves reads once its in-sync "
                    "duplicas have them: retry shortly")

    async def _wait_hold(self, epoch_seen: int) -> None:
        """A switchover holds reads and writes alike: the target is promoted without waiting
        for this primary's lease to run out, so a read answered here meanwhile could miss a
        write the new primary has acknowledged. They go on here if the switchover is
        abandoned, or are redirected to the new primary once this replica is a duplica."""
        while self._hold is not None:
            await self._hold.wait()
            self._check_primary(epoch_seen)

    def grant_lease(self, epoch: int, lease_ms: int, sent_ms: int) -> None:
        """A coordinator granted a lease in answer to a heartbeat sent at `sent_ms`: counting
        from the send, less the drift margin, keeps our lease ending before the coordinator's
        view of it even when this host's clock runs a little slow."""
        if self.role == PRIMARY and epoch == self.epoch:
            self.confirmed = True
            self.lease_expiry_ms = max(self.lease_expiry_ms,
                                       sent_ms + lease_ms - defaults.LEASE_DRIFT_MARGIN_MS)

    async def _confirm_epoch(self) -> None:
        primary = self.primary
        assert primary is not None
        actions, token = primary.confirm(monotonic_ms())
        self._run(actions)
        deadline = monotonic_ms() + defaults.FAILURE_TIMEOUT_MS
        while not primary.confirmed(token):
            if self.primary is not primary or primary.fenced:
                raise NotPrimaryError(self.service, self.meta.primary_address, self.epoch)
            if not await self._wait_progress(deadline):
                raise Unavailable(
                    f"{self.service}: the primary's lease ran out and its duplicas did not "
                    "confirm its epoch in time; it stops serving reads until they do")

    def _notify_progress(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def _wait_progress(self, deadline_ms: int) -> bool:
        """Waits for the next ack, append or apply; False once the deadline has passed."""
        remaining_ms = deadline_ms - monotonic_ms()
        if remaining_ms <= 0:
            return False
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that
        # arrives as the event is set, and a cancelled switchover prepare would then hold
        # writes until its own deadline.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining_ms / 1000):
                await self._progress.wait()
        return True

    async def prepare_switchover(self, epoch: int, target: str, timeout_ms: int,
                                 switchover_id: str = "") -> tuple[int, int]:
        """Holds new writes until `target` has durably logged everything logged here and every
        logged write is committed and answered; returns (last index, target's durable index).
        On timeout the hold is released and the primary serves on. One switchover holds at a
        time: another one (another id) is refused while the hold lasts."""
        self._check_primary(0)
        primary = self.primary
        assert primary is not None
        if epoch != self.epoch:
            raise StaleEpochError(f"{self.service}: switchover for epoch {epoch}, but this "
                                  f"primary is at epoch {self.epoch}")
        if target not in primary.peers:
            raise InvalidRequest(f"{self.service}: {target} is not a duplica of this primary")
        if self._hold is not None and self._hold_id != switchover_id:
            raise Unavailable(f"{self.service}: another switchover ({self._hold_id or 'unnamed'}) "
                              "holds writes here; try again once it has ended")
        if self._hold is None:
            self._hold = asyncio.Event()
            self._hold_id = switchover_id
        try:
            return await self._await_switchover_target(primary, target, timeout_ms)
        except asyncio.CancelledError:
            # The coordinator went away mid-prepare (gRPC cancels this handler): nobody will
            # complete the switchover, so the writes held for it resume here.
            self.release_hold()
            raise

    async def _await_switchover_target(self, primary: PrimaryReplication, target: str,
                                       timeout_ms: int) -> tuple[int, int]:
        deadline = monotonic_ms() + timeout_ms
        while True:
            last = self._next_index - 1
            peer = primary.peers.get(target)
            if peer is None or self.primary is not primary:
                self.release_hold()
                raise NotPrimaryError(self.service, self.meta.primary_address, self.epoch)
            if (
                not self._to_log and self.wal.last_index == last
                and peer.match_index >= last and primary.commit_index >= last
                and self.sm.applied_index >= last
            ):
                # The coordinator now raises the epoch and reassigns roles; should it die
                # first, the hold must not last forever: it ends after the switchover timeout.
                asyncio.get_running_loop().call_later(
                    defaults.SWITCHOVER_TIMEOUT_MS / 1000, self._release_hold_if, self._hold)
                return last, peer.match_index
            if not await self._wait_progress(deadline):
                self.release_hold()
                raise Unavailable(
                    f"{self.service}: {target} did not catch up within {timeout_ms} ms "
                    f"(it has {peer.match_index} of {last}); switchover abandoned, this "
                    "primary serves on")

    def _release_hold_if(self, hold: asyncio.Event | None) -> None:
        if hold is not None and self._hold is hold:
            log.warning("%s: switchover not completed in time: writes resume here",
                        self.service)
            self.release_hold()

    def release_hold(self) -> None:
        """Lets held writes go on (or be redirected, once the role has changed)."""
        if self._hold is not None:
            self._hold.set()
            self._hold = None
            self._hold_id = ""

    def release_switchover(self, epoch: int, switchover_id: str) -> None:
        """The coordinator abandoned switchover `switchover_id` at `epoch`: end its hold. A
        release for another switchover or epoch (late, or forged) changes nothing."""
        if self._hold is None or epoch != self.epoch or switchover_id != self._hold_id:
            log.info("%s: ignored a release of switchover %r at epoch %d (holding: %r, epoch %d)",
                     self.service, switchover_id, epoch, self._hold_id if self._hold else None,
                     self.epoch)
            return
        self.release_hold()

    def _check_primary(self, epoch_seen: int) -> None:
        self.check_not_broken()
        if self.role != PRIMARY or self.primary is None or self.primary.fenced:
            raise NotPrimaryError(self.service, self.meta.primary_address, self.epoch)
        if not self.confirmed:
            raise Unavailable(f"{self.service}: this primary restarted and waits for the "
                              "coordinator to confirm it is still the primary")
        if epoch_seen > self.epoch:
            # The client saw a newer epoch: we are a fenced primary that has not heard yet.
            raise NotPrimaryError(self.service, "", epoch_seen)

    def _enqueue(self, entry: Entry) -> asyncio.Future[Reply]:
        assert entry.index == self._next_index, (entry.index, self._next_index)
        self._next_index += 1
        self._to_log.append(entry)
        self._unapplied.append(entry)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[entry.index] = future
        self._log_wakeup.set()
        return future

    def _ensure_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name=f"wal-writer-{self.service}")

    async def _write_loop(self) -> None:
        """Appends whatever accumulated while the last append ran: group commit."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            await self._log_wakeup.wait()
            self._log_wakeup.clear()
            batch, self._to_log = self._to_log, []
            if not batch:
                continue
            try:
                await loop.run_in_executor(self.agent.io, self.wal.append, batch)
            except (DiskFullError, StorageError, OSError) as exc:
                self._refuse_unlogged(batch, exc)
                continue
            except Exception as exc:
                # A bug (say, entries that do not continue the log): never let the writer die
                # silently, which would leave every later write hanging.
                log.exception("%s: log append failed unexpectedly", self.service)
                self._refuse_unlogged(batch, exc)
                continue
            self.disk_full = False
            if self.primary is not None and not self.primary.fenced:
                self._run(self.primary.log_changed(self._log_info()))
                self._apply_committed()
                self._notify_progress()

    def _refuse_unlogged(self, batch: list[Entry], exc: Exception) -> None:
        """The append failed: nothing of it (or after it) is in the log; refuse those writes."""
        self.last_error = str(exc)
        self.disk_full = isinstance(exc, DiskFullError)
        log.error("%s: log append failed: %s", self.service, exc)
        refused = batch + self._to_log
        self._to_log = []
        error = exc if isinstance(exc, DiskFullError) else Unavailable(
            f"{self.service}: the log could not be written ({exc}); nothing was applied")
        for entry in refused:
            future = self._waiters.pop(entry.index, None)
            if future is not None and not future.done():
                future.set_exception(error)
        first = refused[0].index
        while self._unapplied and self._unapplied[-1].index >= first:
            self._unapplied.pop()
        self._next_index = self.wal.last_index + 1

    # --- shipping (primary side) ---------------------------------------------------------

    def _run(self, actions: list[PrimaryAction]) -> None:
        for action in actions:
            if isinstance(action, SendBatch):
                self._send_batch(action)
            elif isinstance(action, SendProbe):
                self.agent.ship_probe(action.host_id, self.service, self.epoch)
            elif isinstance(action, SendTruncate):
                self.agent.ship_truncate(action.host_id, self.service, self.epoch,
                                         action.after_index)
            elif isinstance(action, SendSnapshot):
                self.agent.spawn(self._send_snapshot(action.host_id))
            elif isinstance(action, StepDown):
                log.warning("%s: a duplica holds epoch %d > %d: stepping down", self.service,
                            action.epoch, self.epoch)
                self.step_down(action.epoch, "a duplica holds a newer epoch")
            else:
                raise AssertionError(f"unknown action {action!r}")

    def _send_batch(self, action: SendBatch) -> None:
        assert self.primary is not None
        if action.entries_max == 0:
            records, last = b"", action.first_index - 1
        else:
            records, _first, last = self.wal.read_records(
                action.first_index, entries_max=action.entries_max, bytes_max=action.bytes_max)
            following = self.primary.batch_read(action.host_id, action.batch_id, last)
            self.agent.ship_batch(action.host_id, self.service, self.epoch, action, records,
                                  last)
            self._run(following)  # the window's next batch, now that this one's end is known
            return
        self.agent.ship_batch(action.host_id, self.service, self.epoch, action, records, last)

    def on_ack(self, host_id: str, ack: AckView) -> None:
        """An answer from a duplica's host."""
        if self.primary is None or self.broken:
            return
        self._run(self.primary.ack(host_id, ack, monotonic_ms()))
        self._apply_committed()
        self._notify_progress()

    def on_link_up(self, host_id: str) -> None:
        if self.primary is not None and not self.broken:
            self._run(self.primary.link_up(host_id, monotonic_ms()))

    def on_link_down(self, host_id: str) -> None:
        if self.primary is not None:
            self.primary.link_down(host_id)

    def tick(self, now_ms: int) -> None:
        # A broken primary ships nothing more: its duplicas stop hearing it, which lets the
        # coordinator fail over.
        if self.primary is not None and not self.broken:
            self._run(self.primary.tick(now_ms))

    async def _send_snapshot(self, host_id: str) -> None:
        """Installs our newest snapshot on a duplica whose position we compacted away."""
        assert self.primary is not None
        try:
            path = self.snapshots.latest()
            if path is None or self._last_snapshot_index < self.wal.first_index - 1:
                path = await self.take_snapshot()
            header, index = await self.agent.install_snapshot(host_id, self.service,
                                                              self.epoch, path)
        except Exception as exc:  # any failure: report it and probe again on the next tick
            log.warning("%s: snapshot install on %s failed: %s", self.service, host_id, exc)
            if self.primary is not None:
                self.primary.snapshot_failed(host_id, str(exc))
            return
        if self.primary is not None:
            self._run(self.primary.snapshot_installed(host_id, index))

    # --- applying ------------------------------------------------------------------------

    def hold_apply(self) -> None:
        """Stops applying (a migration's cut): the state stays at its applied index, while
        the log keeps taking entries, until `release_apply`."""
        self._apply_held = True

    def release_apply(self) -> None:
        self._apply_held = False
        if self.primary is not None:
            self._apply_committed()
        else:
            self._schedule_apply()

    def _apply_limit(self) -> int:
        if self._apply_held or self.broken:
            return self.sm.applied_index
        # Never past what this loop has queued (`_next_index - 1`): the log's durable index
        # moves on an I/O thread a moment before shipped entries are queued here, and
        # applying in that gap would read them back from disk for nothing.
        if self.primary is not None:
            limit = min(self.primary.commit_index, self.wal.durable_index)
        elif self.duplica is not None:
            limit = self.duplica.apply_limit(self.wal.durable_index)
        else:
            return self.sm.applied_index
        return min(limit, self._next_index - 1)

    def _apply_committed(self) -> None:
        """Applies committed entries in index order and answers their waiters.

        At most one chunk is applied inline (the common case: a few entries, answered at
        once); a longer run continues on a task that yields between chunks, so that a
        catching-up replica keeps answering its stream.
        """
        if self._apply_chunk() and (self._applier is None or self._applier.done()):
            self._applier = self.agent.spawn(self._apply_rest())

    def _schedule_apply(self) -> None:
        """Applies on the background task only: a duplica acks what it has on disk without
        waiting for its state machine, which may lag (hot standby) but never blocks acks."""
        if self._applier is None or self._applier.done():
            self._applier = self.agent.spawn(self._apply_rest())

    async def _apply_rest(self) -> None:
        agent = self.agent
        while self._apply_chunk():
            if agent.receiving:
                # Shipped batches are waiting: taking them onto disk comes first (acks and
                # in-sync membership depend on it); apply keeps a chunk per APPLY_YIELD_MS.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(defaults.APPLY_YIELD_MS / 1000):
                        await agent.receive_idle.wait()
            else:
                await asyncio.sleep(0)

    def _apply_chunk(self) -> bool:
        """Applies the next committed entries, up to APPLY_CHUNK_ENTRIES of them and
        APPLY_CHUNK_BYTES of payload (at least one), as one batch; True if committed entries
        remain."""
        limit = self._apply_limit()
        sm = self.sm
        if sm.applied_index < limit:
            first = sm.applied_index + 1
            unapplied = self._unapplied
            if not unapplied or unapplied[0].index != first:
                try:
                    self._reload_unapplied(limit)
                except (StorageError, OSError) as exc:
                    # What it acked cannot be read back to apply: it must not count.
                    self.mark_broken(f"reading its log to apply index {first} failed: {exc}")
                    return False
                unapplied = self._unapplied
            # While shipped batches wait, smaller chunks: taking them onto disk (and acking)
            # comes first, and a long apply turn holds the loop they arrive on.
            chunk = (defaults.APPLY_CHUNK_ENTRIES_RECEIVING if self.agent.receiving
                     else defaults.APPLY_CHUNK_ENTRIES)
            batch = self._take_batch(first, min(limit - first + 1, chunk))
            replies = sm.apply_many(batch)
            waiters = self._waiters
            if waiters:
                for entry, reply in zip(batch, replies, strict=True):
                    future = waiters.pop(entry.index, None)
                    if future is not None and not future.done():
                        future.set_result(reply)
            if self.read_floor >= first:
                self._notify_progress()  # reads held below the read floor may go on
            self._maybe_snapshot()
        return sm.applied_index < self._apply_limit()

    def _take_batch(self, first: int, count: int) -> list[Entry]:
        """Takes from the front of `_unapplied` (which starts at `first`) the consecutive
        entries to apply next: at most `count`, and APPLY_CHUNK_BYTES of payload."""
        unapplied = self._unapplied
        if count >= len(unapplied):
            batch = list(unapplied)
            unapplied.clear()
        else:
            popleft = unapplied.popleft
            batch = [popleft() for _ in range(count)]
        if batch[-1].index != first + len(batch) - 1:
            # A gap (not seen in practice): apply up to it; the next chunk reloads after it.
            keep = next(k for k, e in enumerate(batch) if e.index != first + k)
            unapplied.extendleft(reversed(batch[keep:]))
            del batch[keep:]
        if sum(map(len, map(_payload_of, batch))) > defaults.APPLY_CHUNK_BYTES:
            sizes = list(accumulate(map(len, map(_payload_of, batch))))
            keep = max(1, bisect.bisect_right(sizes, defaults.APPLY_CHUNK_BYTES))
            unapplied.extendleft(reversed(batch[keep:]))
            del batch[keep:]
        assert batch and batch[0].index == first, (first, batch[:1])
        return batch

    def _reload_unapplied(self, limit: int) -> None:
        """Finds the next entries to apply, up to `limit`: in shipped entries kept in memory,
        else in the log (after a restart, or when they were not kept in memory), reading
        ahead up to APPLY_READ_ENTRIES."""
        first = self.sm.applied_index + 1
        while self._shipped and self._shipped[0][1] < first:
            self._shipped_bytes -= self._shipped.popleft()[3]
        if self._shipped and self._shipped[0][0] <= first:
            # Decoded when it arrived; made entries a part at a time (a batch holds up to
            # BATCH_ENTRIES_MAX of them), so few entries live long.
            shipped_first, shipped_last, rows, size = self._shipped.popleft()
            self._shipped_bytes -= size
            start = first - shipped_first
            cut = start + defaults.APPLY_READ_ENTRIES
            entries = list(map(tuple.__new__, repeat(Entry), rows[start:cut]))
            last = entries[-1].index
            if cut < len(rows):
                rest = rows[cut:]
                rest_size = size * len(rest) // len(rows)
                self._shipped.appendleft((last + 1, shipped_last, rest, rest_size))
                self._shipped_bytes += rest_size
        else:
            last = min(limit, first + defaults.APPLY_READ_ENTRIES - 1)
            entries = self.wal.read(first, last)
        kept = [e for e in self._unapplied if e.index > last]
        self._unapplied = deque(entries)
        self._unapplied.extend(kept)

    def _maybe_snapshot(self) -> None:
        every = self.agent.config.snapshot_every_entries
        if (
            every
            and self.sm.applied_index - self._last_snapshot_index >= every
            and (self._snapshot_task is None or self._snapshot_task.done())
        ):
            self._snapshot_task = self.agent.spawn(self._snapshot_and_compact())

    async def _snapshot_and_compact(self) -> None:
        await self.take_snapshot()
        self.compact(self.agent.config.log_retain_entries)

    async def take_snapshot(self) -> Path:
        """Writes a snapshot of the applied state (serialised here, written on an I/O thread)."""
        sm = self.sm
        index = sm.applied_index
        header = SnapshotHeader(
            kind=self.meta.kind, kind_version=self.kind_cls.version, applied_index=index,
            epoch=sm.applied_epoch, digest=sm.digest(), raw_bytes=0,
            extra={"history": [list(h) for h in self.wal.epoch_history if h[1] <= index]},
        )
        # The chunks are taken now, while no entry can be applied in between.
        chunks = list(sm.snapshot())
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(self.agent.io, self.snapshots.save, header, chunks)
        self._last_snapshot_index = max(self._last_snapshot_index, index)
        await loop.run_in_executor(self.agent.io, self.snapshots.prune, 2)
        return path

    def compact(self, retain_entries: int) -> int:
        """Drops log entries before the newest snapshot, keeping `retain_entries` behind it."""
        base = self._last_snapshot_index - retain_entries
        if base < self.wal.first_index:
            return self.wal.first_index
        first = self.wal.compact(base, self.wal.epoch_at(base))
        if self.primary is not None:
            # The core must know where the log starts now, or a duplica that reconnects
            # before the next write is streamed entries that are gone instead of a snapshot.
            self._run(self.primary.log_changed(self._log_info()))
        return first

    # --- the receive path (duplica side) -------------------------------------------------

    def _duplica_for(self, epoch: int) -> DuplicaReplication | None:
        """The duplica core, stepping down first if a newer primary is shipping to us."""
        if self.role == PRIMARY:
            if epoch <= self.epoch:
                return None  # two primaries in one epoch cannot be: refuse as stale
            self.step_down(epoch, "a primary at a newer epoch ships to this replica")
        return self.duplica

    def _ack(self, status: str, batch_id: int = 0, message: str = "",
             truncated: int = -1) -> dict[str, Any]:
        w = self.wal
        return {
            "service": self.service, "epoch": self.epoch, "status": status,
            "batch_id": batch_id, "durable_index": w.durable_index,
            "applied_index": self.sm.applied_index,
            "last": LogPosition(w.last_epoch, w.last_index),
            # Only a position answer needs the history (to find the divergence point).
            "history": list(w.epoch_history) if status != "ok" else [],
            "truncated": truncated,
            "first_index": w.first_index, "message": message,
        }

    async def _adopt(self, duplica: DuplicaReplication,
                     event: Callable[[], list[DuplicaAction]],
                     ) -> tuple[list[DuplicaAction], str | None]:
        """Feeds one event to the duplica core; returns its actions and the refusal, if any.

        A newer epoch is written to disk before the core takes it (`epoch_persisted`), and
        the event is then fed again: memory never runs ahead of the disk. When the write
        fails the replica stays at its epoch and answers "storage_error"; the primary's
        next probe or batch tries again."""
        actions = event()
        if actions and isinstance(actions[0], AdoptEpoch):
            epoch = actions[0].epoch
            try:
                self._persist_meta(epoch=epoch)
            except (StorageError, OSError) as exc:
                self.last_error = str(exc)
                log.warning("%s: cannot record epoch %d, staying at %d: %s", self.service,
                            epoch, self.epoch, exc)
                return [], "storage_error"
            duplica.epoch_persisted(epoch)
            actions = event()
        refused = next((a.status for a in actions if isinstance(a, Refuse)), None)
        return actions, refused

    async def receive_probe(self, epoch: int) -> dict[str, Any]:
        duplica = self._duplica_for(epoch)
        if duplica is None:
            return self._ack("stale_epoch")
        _, refused = await self._adopt(duplica, lambda: duplica.on_probe(epoch, monotonic_ms()))
        return self._ack(refused or "mismatch")

    async def receive_truncate(self, epoch: int, after_index: int) -> dict[str, Any]:
        duplica = self._duplica_for(epoch)
        if duplica is None:
            return self._ack("stale_epoch")
        assert self.meta.mode != Mode.SYNC.value or after_index >= self._sync_commit_index, (
            f"{self.service}: sync mode, yet a primary asked to truncate committed entries "
            f"(after {after_index}, committed in sync mode {self._sync_commit_index})"
        )
        _, refused = await self._adopt(
            duplica, lambda: duplica.on_truncate(epoch, after_index, monotonic_ms()))
        if refused:
            return self._ack(refused)
        loop = asyncio.get_running_loop()
        if after_index < self.sm.applied_index:
            # Only in async mode: entries this replica applied are not on the new primary.
            # The state must go back to before them: reload from a snapshot at or below the
            # cut (or from empty) and replay the log up to it as the commit index allows.
            fresh = await loop.run_in_executor(self.agent.io, self._rewound_state, after_index)
            log.warning("%s: rewound applied state from %d to %d to drop a divergent tail",
                        self.service, self.sm.applied_index, fresh.applied_index)
            # Swapped here, on the loop, so the applier never sees a half-replaced state.
            self.sm = fresh
            self._last_snapshot_index = fresh.applied_index
            self._unapplied.clear()
            self._shipped.clear()
            self._shipped_bytes = 0
        dropped = await loop.run_in_executor(self.agent.io, self.wal.truncate_after, after_index)
        while self._unapplied and self._unapplied[-1].index > after_index:
            self._unapplied.pop()
        # Batches past the cut go, and one straddling it too: its kept part is read back
        # from the log when it is applied.
        while self._shipped and self._shipped[-1][0] > after_index:
            self._shipped_bytes -= self._shipped.pop()[3]
        if self._shipped and self._shipped[-1][1] > after_index:
            self._shipped_bytes -= self._shipped.pop()[3]
        self._next_index = self.wal.last_index + 1
        self.truncated_entries = dropped
        if dropped:
            log.warning("%s: truncated %d divergent entries after index %d", self.service,
                        dropped, after_index)
        return self._ack("ok", truncated=dropped)

    def _rewound_state(self, index: int) -> ReplicatedStateMachine:
        """A state at or below `index`: the newest snapshot there, or empty (runs on an I/O
        thread; the log replays the rest as the commit index allows)."""
        fresh = ReplicatedStateMachine(self.kind_cls())
        for path in reversed(self.snapshots.paths()):
            header = read_header(path)
            if header.applied_index <= index:
                load_snapshot(path, _KindView(fresh))
                break
            path.unlink()  # holds entries that are being truncated
        if fresh.applied_index < self.wal.first_index - 1:
            raise StorageError(
                f"{self.service}: cannot rewind to index {index}: no snapshot at or below it "
                "and the log before it was compacted; discard this replica to rebuild it")
        return fresh

    async def receive_batch(self, epoch: int, batch_id: int, prev: LogPosition,
                            first_index: int, last_index: int, records: bytes,
                            commit_index: int,
                            check: asyncio.Future[CheckedRecords | None] | None = None,
                            ) -> dict[str, Any]:
        """Takes a shipped batch. `check` is `check_records` of its records, started when it
        arrived (`Agent.precheck`); without it the records are checked here."""
        duplica = self._duplica_for(epoch)
        if duplica is None:
            return self._ack("stale_epoch", batch_id)
        actions, refused = await self._adopt(duplica, lambda: duplica.on_batch(
            epoch, prev, last_index, commit_index, self._log_info(), monotonic_ms()))
        if refused:
            return self._ack(refused, batch_id)
        if self.meta.mode == Mode.SYNC.value:
            self._sync_commit_index = max(self._sync_commit_index, commit_index)
        if any(isinstance(a, Append) for a in actions):
            loop = asyncio.get_running_loop()
            entries: list[tuple[int, int, bytes, bytes]] = []
            # Every record is checked before any is written (invariant 12), and none may
            # claim an epoch after the shipping primary's.
            checked = await check if check is not None else None
            try:
                await loop.run_in_executor(self.agent.io, functools.partial(
                    self.wal.append_records, records, first_index, last_index, entries,
                    epoch_max=epoch, checked=checked))
            except LogCorruptError as exc:
                self.last_error = str(exc)
                log.warning("%s: refused a shipped batch %d..%d: %s", self.service,
                            first_index, last_index, exc)
                return self._ack("corrupt", batch_id, str(exc))
            except (DiskFullError, StorageError, OSError) as exc:
                self.last_error = str(exc)
                self.disk_full = isinstance(exc, DiskFullError)
                if self.disk_full:
                    log.warning("%s: cannot take shipped entries: %s", self.service, exc)
                return self._ack("storage_error", batch_id, str(exc))
            self.disk_full = False
            size = len(records) + len(entries) * _ENTRY_OVERHEAD_BYTES
            if self._shipped_bytes + size <= defaults.SHIPPED_KEPT_BYTES_MAX:
                self._shipped.append((first_index, last_index, entries, size))
                self._shipped_bytes += size
            self._next_index = self.wal.last_index + 1
        self._schedule_apply()
        return self._ack("ok", batch_id)

    def hears_primary(self, now_ms: int) -> tuple[bool, int]:
        """Whether the primary's stream reached us within a failure timeout, and how long ago."""
        heard = self.duplica.last_heard_ms if self.duplica is not None else None
        if heard is None:
            return False, 0
        silent = max(0, now_ms - heard)
        # A live primary speaks at least every heartbeat interval (data or keepalive); two
        # missed intervals is silence. This must be well under the coordinator's failure
        # timeout, or a duplica asked right after a crash would still claim to hear.
        return silent < 2 * self.agent.config.heartbeat_ms, silent

    # --- snapshots received --------------------------------------------------------------

    def receive_snapshot(
        self, header: SnapshotHeader, frames: Iterable[bytes]
    ) -> tuple[ReplicatedStateMachine, ShippedSnapshot]:
        """Restores a snapshot from the primary into a fresh state machine as its frames
        arrive, writing them to a file that is not a snapshot yet (runs on an I/O thread;
        touches nothing of this replica, so a damaged or interrupted stream leaves its state
        and log as they were). `install_snapshot` then puts both in place."""
        fresh = ReplicatedStateMachine(self.kind_cls())
        shipped = self.snapshots.receive(header)
        shipped.receive(frames, _KindView(fresh))
        return fresh, shipped

    async def install_snapshot(self, header: SnapshotHeader, fresh: ReplicatedStateMachine,
                               shipped: ShippedSnapshot) -> None:
        """Replaces state and log with a received snapshot (the caller holds the replica's
        lock): the file and the log change on an I/O thread, the state here, on the loop,
        so the applier never sees a half-replaced state."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.agent.io, self._install_snapshot_files, header, shipped)
        self.sm = fresh
        self._last_snapshot_index = header.applied_index
        self._unapplied.clear()
        self._shipped.clear()
        self._shipped_bytes = 0
        self._next_index = self.wal.last_index + 1
        if self.duplica is not None:
            self.duplica.verified_index = header.applied_index
            self.duplica.commit_index = max(self.duplica.commit_index, header.applied_index)

    def _install_snapshot_files(self, header: SnapshotHeader, shipped: ShippedSnapshot) -> None:
        shipped.publish()
        # The old log is behind or diverged from the snapshot: start the log at its index.
        self.wal.truncate_after(max(self.wal.first_index - 1, min(self.wal.last_index,
                                                                   self.sm.applied_index)))
        history = header.extra.get("history") if header.extra else None
        self.wal.compact(header.applied_index, header.epoch,
                         [(int(e), int(i)) for e, i in history] if history else None)

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        # A broken replica vouches for nothing it holds: no durable or matched index (its log
        # may not even open), so nobody counts it in sync or promotes it (invariant 12).
        durable = 0 if self.broken else self.wal.durable_index
        # A duplica's lag as far as it knows: committed on the primary, not yet on our disk.
        lag = 0 if self.primary is not None or self.broken else max(
            0, self.commit_index - durable)
        matched = 0 if self.broken else durable if self.primary is not None else (
            min(durable, self.duplica.verified_index) if self.duplica is not None else 0)
        return {
            "service": self.service, "kind": self.meta.kind, "role": self.role,
            "epoch": self.epoch, "mode": self.meta.mode, "matched_index": matched,
            "in_sync": sorted(self.primary.in_sync) if self.primary is not None else [],
            "in_sync_generation": self.meta.in_sync_generation if self.primary is not None else 0,
            "in_sync_lag_ms": (self.primary.lag_ms(monotonic_ms()) if self.primary is not None
                               else {}),
            "durable_index": durable, "commit_index": self.commit_index,
            "applied_index": self.sm.applied_index, "lag_entries": lag,
            "truncated_entries": self.truncated_entries, "last_error": self.last_error,
            "disk_full": self.disk_full, "broken": bool(self.broken),
        }

    def _fail_waiters(self, error: Exception) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()


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

