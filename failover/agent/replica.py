"""One replica of a service on this host: the I/O around its protocol core.

Every decision is `failover.core.replica.ReplicaCore`'s; this driver feeds it events with the
time and carries out the actions it returns (the loop is in the core's docstring): log
appends run on the agent's I/O threads (the write-ahead log's group commit overlaps their
fsyncs), the meta is written atomically, shipping goes through the agent's links, snapshots
are taken and installed here, and committed entries are applied in index order, answering
the futures that writers wait on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from failover import defaults, kinds
from failover.agent.apply_queue import ApplyQueue
from failover.agent.meta_writer import MetaWriter
from failover.agent.replica_host import ReplicaHost
from failover.agent.replica_state import ReplicaState
from failover.clock import monotonic_ms
from failover.core.log_position import LogPosition
from failover.core.replica import (
    APPLY,
    HOLD_RELEASED,
    LINK_UPS,
    ArmTimer,
    DropUnlogged,
    EnsureLinks,
    FailWaiters,
    LogBarrier,
    PersistMeta,
    Refuse,
    ReplicaAction,
    ReplicaCore,
    ReplicaMeta,
    Truncate,
)
from failover.core.replication import (
    DuplicaReplication,
    LogInfo,
    PrimaryReplication,
    SendBatch,
    SendProbe,
    SendSnapshot,
    SendTruncate,
    ShipLimits,
)
from failover.core.sessions import Reply, encode_request_id
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
    NotPrimaryError,
    ReplicaBrokenError,
    StorageError,
    Unavailable,
)
from failover.observe.logs import event_fields
from failover.storage.atomic import write_atomic
from failover.storage.modes import make_private_dir
from failover.storage.records import CheckedRecords, Entry
from failover.storage.snapshot import (
    ShippedSnapshot,
    SnapshotHeader,
    SnapshotStore,
    read_header,
)
from failover.storage.wal import WriteAheadLog

__all__ = ["Answered", "Replica", "ReplicaHost", "ReplicaMeta", "StreamCall"]

log = logging.getLogger(__name__)


_META = "replica.meta"
# How many times an assignment or shipped item is decided again because the meta changed
# while its write was on the disk (a step-down each time): a bound, never reached in practice.
_META_DECISIONS_MAX = 4

# A call of an ExecuteStream message, as `Replica.execute_many` takes it: (the stream's token
# for it, epoch_seen, client_id, seq, payload, opens_session).
StreamCall = tuple[int, int, str, int, bytes, bool]
# What `execute` returns: (reply, was_duplicate, epoch).
Answered = tuple[Reply, bool, int]


def _entry_answered(call: StreamCall, epoch: int,
                    answer: Callable[[StreamCall, Answered | Exception], None],
                    pending: asyncio.Future[Reply]) -> None:
    """Answers a stream's call once the entry that carries it was applied (or failed), as
    `Replica.execute` would: `epoch` is the one the call was logged or joined in."""
    if pending.cancelled():
        answer(call, Unavailable("the entry's wait was cancelled; the outcome is unknown: "
                                 "retry with the same request id"))
        return
    error = pending.exception()
    if error is not None:
        answer(call, error)  # type: ignore[arg-type]  # an Exception: FailWaiters sets them
        return
    reply = pending.result()
    # Applied by an entry of an earlier epoch (the same request logged before a failover): a
    # recorded reply, not a write of ours.
    answer(call, (reply, reply.epoch != epoch, reply.epoch or epoch))


def snapshot_due_entries(state_bytes: int, every_max: int) -> int:
    """Applied entries after which a replica takes its next snapshot, for a state of about
    `state_bytes`: as many as those bytes over `SNAPSHOT_STATE_BYTES_PER_ENTRY` (replaying
    them costs about what writing the snapshot does), but no fewer than
    `SNAPSHOT_MIN_ENTRIES` and no more than `every_max` (`snapshot_every_entries`)."""
    by_size = state_bytes // defaults.SNAPSHOT_STATE_BYTES_PER_ENTRY
    return min(every_max, max(defaults.SNAPSHOT_MIN_ENTRIES, by_size))


class Replica:
    """A replica of one service on this host."""

    def __init__(self, agent: ReplicaHost, root: Path, meta: ReplicaMeta) -> None:
        self.agent = agent
        self.root = root
        self.service = meta.service
        # Writes `replica.meta` on the agent's meta threads, in order; it starts out holding
        # `meta` (just written or read).
        self._meta_file = MetaWriter(root / _META, meta.to_bytes(), agent.meta_io,
                                     on_error=self._meta_write_failed)
        self.kind_cls = kinds.load_kind(meta.kind)
        c = agent.config
        self.core = ReplicaCore(
            meta, ReplicatedStateMachine(self.kind_cls()),
            limits=ShipLimits(c.batch_entries_max, c.batch_bytes_max, c.inflight_batches_max,
                              keepalive_ms=c.heartbeat_ms),
            heartbeat_ms=c.heartbeat_ms, coordinated=bool(c.coordinators))
        self.snapshots = SnapshotStore(root / "snapshots")
        self.state = ReplicaState(meta.service, self.kind_cls, self.snapshots)
        self.wal: WriteAheadLog = None  # type: ignore[assignment]  # set by open()
        # Entries logged (or being logged, or shipped) and not applied, kept to apply.
        self.kept = ApplyQueue()
        self._to_log: list[Entry] = []
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        self._log_wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._applier: asyncio.Task[None] | None = None
        self._last_snapshot_index = 0
        # The state's size at the newest snapshot and the payload applied since: what the
        # next snapshot would write, about (`snapshot_due_entries`).
        self._snapshot_bytes = 0
        self._applied_bytes = 0
        # A migration's auto-converge delays each write.
        self.write_throttle_ms = 0.0
        self.closed = False
        # Replaced and set on every ack, append, apply and hold release: waiters re-check the
        # core's predicates then.
        self._progress = asyncio.Event()
        self._refusal_logged_ms = -1000  # when a refused sender was last logged

    # --- what the core holds ---------------------------------------------------------------

    @property
    def meta(self) -> ReplicaMeta:
        return self.core.meta

    @property
    def sm(self) -> ReplicatedStateMachine:
        return self.core.sm

    @property
    def role(self) -> str:
        return self.core.meta.role

    @property
    def epoch(self) -> int:
        return self.core.meta.epoch

    @property
    def commit_index(self) -> int:
        return self.core.commit_index

    @property
    def primary(self) -> PrimaryReplication | None:
        return self.core.primary

    @property
    def duplica(self) -> DuplicaReplication | None:
        return self.core.duplica

    @property
    def broken(self) -> str:
        return self.core.broken

    @property
    def last_error(self) -> str:
        return self.core.last_error

    @last_error.setter
    def last_error(self, message: str) -> None:
        self.core.note_error(message)

    @property
    def read_floor(self) -> int:
        return self.core.read_floor

    @property
    def lease_expiry_ms(self) -> int:
        return self.core.lease_expiry_ms

    # --- lifecycle -----------------------------------------------------------------------

    @classmethod
    def create(cls, agent: ReplicaHost, root: Path, meta: ReplicaMeta) -> Replica:
        """Makes a new, empty replica on disk (meta first, so a crash leaves a known kind)."""
        kinds.load_kind(meta.kind)  # refuse an unknown kind before touching the disk
        make_private_dir(root)
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
        self.opened(self.open_storage(state))

    def open_storage(self, state: ReplicatedStateMachine | None = None,
                     ) -> ReplicatedStateMachine | str | None:
        """`open`'s disk part, which touches nothing else and may run on an I/O thread:
        opens the log and reads the newest good snapshot. Returns the state to start from
        (None: empty), or why the replica cannot be read. A new replica's log is created
        here: on the event loop, the files and fsyncs of a burst of rebuilds held an
        agent's loop for up to 650 ms on a busy disk, and its heartbeats were missed."""
        policy = self.agent.config.fsync_policy
        try:
            self.wal = WriteAheadLog.open(self.root / "wal", fsync_policy=policy)
            self.wal.fsync_observer = self.agent.wal_fsync_observer
            if state is not None:
                path = self.snapshots.latest()
                assert path is not None and read_header(path).applied_index == state.applied_index
                return state
            return self.state.recover(self.wal.first_index)
        except (StorageError, OSError) as exc:
            return str(exc)

    def opened(self, recovered: ReplicatedStateMachine | str | None) -> None:
        """`open`'s event-loop part, with what `open_storage` returned."""
        if isinstance(recovered, str):
            self.mark_broken(recovered)
            return
        report = self.wal.open_report
        if report.torn_bytes_dropped:
            log.warning("%s: dropped a torn log tail of %d bytes in %s", self.service,
                        report.torn_bytes_dropped, report.torn_segment)
        if recovered is not None:
            self.core.state_replaced(recovered)
            self._snapshot_loaded(recovered.applied_index)
        self._ensure_writer()
        log.info("%s: opened as %s at epoch %d (recorded role; the coordinator confirms it)",
                 self.service, self.role, self.epoch)
        self._carry_out(self.core.open(self._log_info(), monotonic_ms()))

    def mark_broken(self, reason: str) -> None:
        """This replica cannot read its own snapshot or log: from now on it serves nothing,
        takes no shipped batch, and reports itself broken (with `reason`), never in sync,
        so that the coordinator never promotes it and rebuilds it from a peer."""
        if self.core.broken:
            return
        log.error("%s: replica broken, it serves nothing until the coordinator rebuilds it "
                  "from a peer: %s", self.service, reason)
        self._carry_out(self.core.mark_broken(reason))

    def broken_error(self) -> ReplicaBrokenError:
        """The error a broken replica answers every call with."""
        return self.core.broken_error()

    def check_not_broken(self) -> None:
        """Raises `ReplicaBrokenError` if this replica is broken."""
        self.core.check_not_broken()

    async def close(self) -> None:
        self.closed = True
        try:  # a step-down taken in memory reaches the disk, unless the disk hangs
            async with asyncio.timeout(defaults.META_CLOSE_WAIT_MS / 1000):
                await self._meta_file.flushed()
        except TimeoutError:
            log.warning("%s: closed with its meta write still on the disk after %d ms",
                        self.service, defaults.META_CLOSE_WAIT_MS)
        self._fail_waiters(Unavailable(f"replica {self.service!r} is shutting down"))
        self.core.closed()
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

    # --- carrying out the core's actions -------------------------------------------------

    def _carry_out(self, actions: list[ReplicaAction]) -> None:
        """Carries out the core's actions in order (the shipping ones first: the hot path)."""
        for action in actions:
            if isinstance(action, SendBatch):
                self._send_batch(action)
            elif action is APPLY:
                if self.core.primary is not None:
                    self._apply_committed()
                else:
                    self._schedule_apply()
                self._notify_progress()
            elif isinstance(action, SendProbe):
                self.agent.ship_probe(action.host_id, self.service, self.epoch)
            elif isinstance(action, SendTruncate):
                self.agent.ship_truncate(action.host_id, self.service, self.epoch,
                                         action.after_index)
            elif isinstance(action, SendSnapshot):
                self.agent.spawn(self._send_snapshot(action.host_id))
            elif isinstance(action, PersistMeta):
                self._persist(action)
            elif isinstance(action, LogBarrier):
                self._enqueue(Entry(action.epoch, action.index, b"", b""))
            elif isinstance(action, FailWaiters):
                self._fail_waiters(action.error, action.from_index)
            elif isinstance(action, DropUnlogged):
                first = action.from_index
                self._to_log = [e for e in self._to_log if e.index < first]
                self.kept.drop_from(first)
            elif action is LINK_UPS:
                now = monotonic_ms()
                for host in self.core.peers:
                    if self.agent.link_is_up(host):
                        self._carry_out(self.core.link_up(host, now))
            elif isinstance(action, EnsureLinks):
                self.agent.ensure_links(action.peers)
            elif action is HOLD_RELEASED:
                self._notify_progress()
            elif isinstance(action, ArmTimer):
                delay_s = max(0, action.at_ms - monotonic_ms()) / 1000
                asyncio.get_running_loop().call_later(delay_s, self._timer, action.token)
            else:
                raise AssertionError(f"unknown action {action!r}")

    def _timer(self, token: int) -> None:
        actions = self.core.timer(token, monotonic_ms())
        if actions:
            log.warning("%s: switchover not completed in time: writes resume here",
                        self.service)
        self._carry_out(actions)

    def _meta_write_failed(self, exc: OSError) -> None:
        if exc.errno == errno.ENOSPC:
            self.core.disk_full = True

    def _meta_error(self, meta: ReplicaMeta, exc: OSError) -> Exception:
        if exc.errno == errno.ENOSPC:
            return DiskFullError(
                f"{self.service}: no space left to record role {meta.role} at epoch "
                f"{meta.epoch}; nothing changed: free space in the data dir")
        return exc

    def _persist(self, action: PersistMeta) -> None:
        """A step-down (the one meta change the core's events return outside the receive
        path): taken in memory at once, since giving up authority may run ahead of the disk,
        and written after any write in progress (`MetaWriter`)."""
        assert action.reason == "step_down", action.reason
        self._log_step_down(action)
        was = (self.role, self.epoch)
        actions = self.core.meta_persisted(action, monotonic_ms())
        self._meta_file.request(self.core.meta.to_bytes(),
                                f"{self.service}: step-down to epoch {self.epoch}")
        if (self.role, self.epoch) != was:
            self._notify_progress()  # calls waiting for this epoch (`_wait_for_epoch`) go on
        self._carry_out(actions)

    def _log_step_down(self, action: PersistMeta) -> None:
        log.warning("%s: role %s -> %s at epoch %d (was epoch %d): %s", self.service,
                    self.role, action.meta.role, action.meta.epoch, self.epoch, action.why,
                    extra=event_fields("role_change", service=self.service,
                                       role=action.meta.role, epoch=action.meta.epoch,
                                       was_role=self.role, was_epoch=self.epoch,
                                       why=action.why))

    async def _persist_durably(self, action: PersistMeta) -> str | None:
        """Writes the meta (off the event loop), then lets the core take it. Returns the
        refusal of the shipped item that asked for it ("" if none), or None when the meta
        changed while it was written (a step-down came in between): nothing was taken, and
        the caller decides again from the meta as it now stands. Raises when an assignment
        cannot be written."""
        if action.reason == "step_down":
            self._log_step_down(action)
        base = self.core.meta
        was = (self.role, self.epoch)
        try:
            landed = await self._meta_file.write(action.meta.to_bytes())
        except OSError as exc:
            error = self._meta_error(action.meta, exc)
            if self.core.meta is not base:
                return None
            log.warning("%s: cannot record role %s at epoch %d (%s), staying %s at %d: %s",
                        self.service, action.meta.role, action.meta.epoch, action.reason,
                        self.role, self.epoch, error)
            actions = self.core.meta_write_failed(action, error, monotonic_ms())
        else:
            if not landed or self.core.meta is not base:
                return None
            actions = self.core.meta_persisted(action, monotonic_ms())
        if (self.role, self.epoch) != was:
            self._notify_progress()  # calls waiting for this epoch (`_wait_for_epoch`) go on
        if actions and isinstance(actions[0], Refuse):
            return actions[0].status
        self._carry_out(actions)
        return ""

    async def meta_flushed(self) -> None:
        """Returns once the meta file holds every change asked of it so far (or a write of
        it failed, which was logged)."""
        await self._meta_file.flushed()

    # --- role ----------------------------------------------------------------------------

    async def assign(
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
        The caller holds the service's lock (`Agent.lock`).

        `why` is logged with the role change, if there is one."""
        was = (self.role, self.epoch)
        for _ in range(_META_DECISIONS_MAX):
            self._sync_log()
            persist = self.core.assign(role, epoch, mode, primary, duplicas, in_sync,
                                       in_sync_generation, why)
            if await self._persist_durably(persist) is not None:
                break
        else:
            raise Unavailable(f"{self.service}: its role changed {_META_DECISIONS_MAX} times "
                              f"while assignment {role} at epoch {epoch} was written; ask "
                              "the coordinator again")
        if was != (role, epoch):
            log.info("%s: role %s -> %s at epoch %d (was epoch %d): %s", self.service, was[0],
                     role, epoch, was[1], why,
                     extra=event_fields("role_change", service=self.service, role=role,
                                        epoch=epoch, was_role=was[0], was_epoch=was[1], why=why))

    def step_down(self, epoch: int, why: str) -> None:
        """A newer epoch exists: stop serving writes and wait to be told the new primary.
        Taken at once; `meta_flushed` waits for it to be on disk.

        `why` says who or what showed the newer epoch; it is logged with the change."""
        self._sync_log()
        persist = self.core.step_down(epoch, why)
        if persist is not None:
            self._persist(persist)

    def _sync_log(self) -> None:
        if self.wal is not None:
            self.core.set_log(self._log_info())

    def _log_info(self) -> LogInfo:
        w = self.wal
        return LogInfo(w.first_index, w.last_index, w.durable_index, tuple(w.epoch_history))

    def grant_lease(self, epoch: int, lease_ms: int, sent_ms: int) -> None:
        """A coordinator granted a lease in answer to a heartbeat sent at `sent_ms`."""
        self.core.grant_lease(epoch, lease_ms, sent_ms)

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
        core = self.core
        if epoch_seen > core.meta.epoch:
            await self._wait_for_epoch(epoch_seen)
        core.check_primary(epoch_seen)
        if payload != SESSION_OPEN_PAYLOAD:  # that one is logged as it is (no kind sees it)
            request = decode_request(payload)
            check_loggable(payload, request)
            if self.kind_cls.is_read_only(request):
                return await self.query(payload, epoch_seen), False, self.epoch
        size = len(payload)
        core.admit_bytes(size)
        handed_to_entry = False  # then the entry's answer releases the bytes, not this call
        try:
            await self._wait_hold(epoch_seen)
            if self.write_throttle_ms:
                # A migration's auto-converge: writes slow down until the copy catches up.
                await asyncio.sleep(self.write_throttle_ms / 1000)
            decided = core.write(client_id, seq, opens_session, size)
            if isinstance(decided, Reply):
                return decided, True, decided.epoch
            index, new = decided
            epoch = core.meta.epoch
            if new:
                self._enqueue(Entry(
                    epoch, index, encode_request_id(client_id, seq, opens_session), payload))
                pending = self._waiters[index] = asyncio.get_running_loop().create_future()
                handed_to_entry = True
            else:
                pending = self._waiters[index]  # an attempt in flight: share its entry
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
                core.release_bytes(size)

    def execute_many(self, calls: Sequence[StreamCall],
                     answer: Callable[[StreamCall, Answered | Exception], None],
                     ) -> list[StreamCall]:
        """Takes a stream message's calls to this service at once: each is checked (epoch,
        role, size, depth) and deduplicated as `execute` would, and the new writes among them
        are queued for the log together, so that they go into one group-commit append and
        one shipped batch. `answer(call, outcome)` is called once per call taken, now for a
        refusal or a recorded reply, else when its entry is applied: `outcome` is (reply,
        was_duplicate, epoch) as `execute` returns, or the error it would raise.

        Returns the calls not taken, for the caller to run one by one through `execute`:
        reads (they wait on the read floor and the lease) and every write while a
        switchover holds writes or a migration throttles them."""
        core = self.core
        writes: list[StreamCall] = []
        rest: list[StreamCall] = []
        is_read_only = self.kind_cls.is_read_only
        epoch = core.meta.epoch
        for call in calls:
            payload = call[4]
            if call[1] > epoch:
                rest.append(call)  # `execute` waits for that epoch's assignment first
                continue
            try:
                core.check_primary(call[1])
                if payload != SESSION_OPEN_PAYLOAD:
                    request = decode_request(payload)
                    check_loggable(payload, request)
                    if is_read_only(request):
                        rest.append(call)
                        continue
            except (InvalidRequest, NotPrimaryError, Unavailable) as exc:
                answer(call, exc)
                continue
            writes.append(call)
        if not writes:
            return rest
        if core.holding or self.write_throttle_ms:
            return rest + writes  # they wait for the hold or the throttle, one by one
        decided = core.write_many([(c[2], c[3], c[5], len(c[4])) for c in writes])
        waiters = self._waiters
        create_future = asyncio.get_running_loop().create_future
        logged = False
        for call, decision in zip(writes, decided, strict=True):
            if isinstance(decision, Exception):
                answer(call, decision)
            elif isinstance(decision, Reply):
                answer(call, (decision, True, decision.epoch))
            else:
                index, new = decision
                if new:
                    _token, _seen, client_id, seq, payload, opens = call
                    entry = Entry(epoch, index, encode_request_id(client_id, seq, opens),
                                  payload)
                    self._to_log.append(entry)
                    self.kept.logged(entry)
                    pending = waiters[index] = create_future()
                    logged = True
                else:
                    pending = waiters[index]  # an attempt in flight: share its entry
                pending.add_done_callback(functools.partial(_entry_answered, call, epoch,
                                                            answer))
        if logged:
            self._log_wakeup.set()  # once for the whole message: one append
        return rest

    async def query(self, payload: bytes, epoch_seen: int = 0) -> Reply:
        """Answers a read from applied state, which holds every acknowledged write.

        Inside its lease a primary answers alone; outside it, it first confirms with its
        in-sync duplicas that no newer epoch exists (invariant 6), and stops serving reads
        when it cannot.
        """
        core = self.core
        if epoch_seen > core.meta.epoch:
            await self._wait_for_epoch(epoch_seen)
        core.check_primary(epoch_seen)
        await self._wait_hold(epoch_seen)
        if not core.read_ready():
            # Until the entries it inherited are applied, its state may lack writes an
            # earlier primary acknowledged (invariant 10).
            deadline = core.read_floor_deadline_ms(monotonic_ms())
            while not core.read_ready():
                core.check_primary(epoch_seen)
                if not await self._wait_progress(deadline):
                    raise core.read_floor_error()
        if not core.lease_valid(monotonic_ms()):
            now = monotonic_ms()
            actions, token = core.confirm(now)
            self._carry_out(actions)
            deadline = core.confirm_deadline_ms(now)
            while not core.confirmed(token):
                if not await self._wait_progress(deadline):
                    raise core.confirm_error()
        return self.sm.query(payload)

    async def _wait_hold(self, epoch_seen: int) -> None:
        """A switchover holds reads and writes alike: the target is promoted without waiting
        for this primary's lease to run out, so a read answered here meanwhile could miss a
        write the new primary has acknowledged. They go on here if the switchover is
        abandoned, or are redirected to the new primary once this replica is a duplica."""
        while self.core.holding:
            await self._progress.wait()
            self.core.check_primary(epoch_seen)

    async def _wait_for_epoch(self, epoch_seen: int) -> None:
        """A client saw `epoch_seen`, newer than this replica's: the coordinator made a
        failover or switchover and routed the client here, and the assignment to this host
        is on its way (storm: the 30 promotions of a host death reached their hosts within
        460 ms of the commit, the routes before most of them). Waits for it, at most
        NEWER_EPOCH_WAIT_MS, so that the call is answered by the role this replica takes,
        not redirected to the primary it had (dead, in a failover) and retried on the
        client's backoff, which made services writable again up to 800 ms after their new
        primary was. Changes nothing: the caller checks role and epoch after it."""
        deadline_ms = monotonic_ms() + defaults.NEWER_EPOCH_WAIT_MS
        while self.core.meta.epoch < epoch_seen and await self._wait_progress(deadline_ms):
            pass

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
        core = self.core
        # A caller's timeout never holds writes longer than a switchover may take.
        timeout_ms = max(1, min(timeout_ms, defaults.SWITCHOVER_TIMEOUT_MS))
        core.prepare_switchover(epoch, target, switchover_id, monotonic_ms())
        try:
            deadline = core.switchover_deadline_ms(monotonic_ms(), timeout_ms)
            while (ready := core.switchover_ready(target, switchover_id)) is None:
                if not await self._wait_progress(deadline):
                    raise core.switchover_timeout_error(target, timeout_ms)
        except BaseException:
            # Timed out, no longer the primary, or cancelled (gRPC cancels this handler
            # when the coordinator goes away).
            self._carry_out(core.prepare_failed(switchover_id, monotonic_ms()))
            raise
        self._carry_out(core.switchover_prepared(monotonic_ms()))
        return ready

    def release_hold(self) -> None:
        """Lets held writes go on (or be redirected, once the role has changed)."""
        self._carry_out(self.core.release_hold())

    def release_switchover(self, epoch: int, switchover_id: str) -> None:
        """The coordinator abandoned switchover `switchover_id` at `epoch`: end its hold. A
        release for another switchover or epoch (late, or forged) changes nothing."""
        actions = self.core.release_switchover(epoch, switchover_id, monotonic_ms())
        if actions is None:
            log.info("%s: ignored a release of switchover %r at epoch %d (holding: %r, epoch %d)",
                     self.service, switchover_id, epoch,
                     self.core.hold_id if self.core.holding else None, self.epoch)
            return
        self._carry_out(actions)

    def _enqueue(self, entry: Entry) -> None:
        """Queues an entry for the log writer (and keeps it to apply)."""
        self._to_log.append(entry)
        self.kept.logged(entry)
        self._log_wakeup.set()

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
            self.core.append_started(batch[-1].index)
            if self._ship_before_sync():
                await self._append_shipping_first(batch)
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
            self._carry_out(self.core.appended(self._log_info()))

    def _ship_before_sync(self) -> bool:
        """Whether this append ships before its fsync: a primary whose log fsyncs by group
        commit, so that its duplicas' fsyncs overlap its own (one fsync on a sync write's
        path instead of two in a row)."""
        return self.core.primary is not None and self.wal.fsync_policy == "batch"

    async def _append_shipping_first(self, batch: list[Entry]) -> None:
        """Writes `batch`, ships it, then waits for its fsync and commits: one job on an I/O
        thread, which hands the written entries to the loop to ship (`_written`) before it
        fsyncs. A write that fails refuses the batch as before (nothing was shipped); an
        fsync that fails after the entries may have reached a duplica marks this replica
        broken, so that no other entry is ever written at their indexes in this epoch (the
        coordinator fails it over and rebuilds it); their writers are told the outcome is
        unknown."""
        loop = asyncio.get_running_loop()
        wal = self.wal
        last = batch[-1].index
        shipped = False

        def write_ship_sync() -> None:
            nonlocal shipped
            wal.append(batch, durable=False)
            shipped = True
            # Runs on the loop before this job's own completion (the same FIFO of callbacks).
            loop.call_soon_threadsafe(self._written)
            wal.wait_durable(last)

        try:
            await loop.run_in_executor(self.agent.io, write_ship_sync)
        except Exception as exc:
            if not shipped:
                if not isinstance(exc, (DiskFullError, StorageError, OSError)):
                    log.exception("%s: log append failed unexpectedly", self.service)
                self._refuse_unlogged(batch, exc)
                return
            log.error("%s: log fsync failed after entries %d..%d were shipped: %s",
                      self.service, batch[0].index, last, exc)
            self.mark_broken(f"syncing its log failed after entries {batch[0].index}.."
                             f"{last} were shipped: {exc}")
            return
        self._carry_out(self.core.appended(self._log_info()))

    def _written(self) -> None:
        """The log writer wrote entries (their fsync runs): ship them."""
        if not self.closed and not self.core.broken:
            self._carry_out(self.core.written(self._log_info()))

    def _refuse_unlogged(self, batch: list[Entry], exc: Exception) -> None:
        """The append failed: nothing of it (or after it) is in the log; refuse those writes."""
        log.error("%s: log append failed: %s", self.service, exc)
        self._carry_out(self.core.append_failed(batch[0].index, exc, self._log_info()))

    def _fail_waiters(self, error: Exception, from_index: int = 0) -> None:
        waiters = self._waiters
        indexes = list(waiters) if from_index <= 0 else [i for i in waiters if i >= from_index]
        for index in indexes:
            future = waiters.pop(index)
            if not future.done():
                future.set_exception(error)

    # --- shipping (primary side) ---------------------------------------------------------

    def _send_batch(self, action: SendBatch) -> None:
        if action.entries_max == 0:
            self.agent.ship_batch(action.host_id, self.service, self.epoch, action, b"",
                                  action.first_index - 1)
            return
        records, _first, last = self.wal.read_records(
            action.first_index, entries_max=action.entries_max, bytes_max=action.bytes_max)
        following = self.core.batch_read(action.host_id, action.batch_id, last)
        self.agent.ship_batch(action.host_id, self.service, self.epoch, action, records, last)
        self._carry_out(following)  # the window's next batch, now that this one's end is known

    def on_ack(self, host_id: str, ack: Any) -> None:
        """An answer from a duplica's host (an `AckView`)."""
        self._carry_out(self.core.on_ack(host_id, ack, monotonic_ms()))

    def on_link_up(self, host_id: str) -> None:
        self._carry_out(self.core.link_up(host_id, monotonic_ms()))

    def on_link_down(self, host_id: str) -> None:
        self.core.link_down(host_id)

    def tick(self, now_ms: int) -> None:
        self._carry_out(self.core.tick(now_ms))

    async def _send_snapshot(self, host_id: str) -> None:
        """Installs our newest snapshot on a duplica whose position we compacted away."""
        try:
            path = self.snapshots.latest()
            if path is None or self._last_snapshot_index < self.wal.first_index - 1:
                path = await self.take_snapshot()
            _header, index = await self.agent.install_snapshot(host_id, self.service,
                                                               self.epoch, path)
        except Exception as exc:  # any failure: report it and probe again on the next tick
            log.warning("%s: snapshot install on %s failed: %s", self.service, host_id, exc)
            self.core.snapshot_send_failed(host_id, str(exc))
            return
        self._carry_out(self.core.snapshot_sent(host_id, index))

    # --- applying ------------------------------------------------------------------------

    def hold_apply(self) -> None:
        """Stops applying (a migration's cut): the state stays at its applied index, while
        the log keeps taking entries, until `release_apply`."""
        self.core.apply_held = True

    def release_apply(self) -> None:
        self.core.apply_held = False
        self._carry_out([APPLY])

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
        waiting for its state machine, which may lag (hot standby) but never blocks acks.
        Nothing to apply starts no task: every keepalive of an idle replica set came here,
        and a task per keepalive that found nothing was a few percent of an idle agent."""
        if self._applier is None or self._applier.done():
            if self.sm.applied_index >= self.core.apply_limit(self.wal.durable_index):
                return
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
        core = self.core
        limit = core.apply_limit(self.wal.durable_index)
        sm = core.sm
        if sm.applied_index < limit:
            first = sm.applied_index + 1
            # While shipped batches wait, smaller chunks: taking them onto disk (and acking)
            # comes first, and a long apply turn holds the loop they arrive on.
            chunk = (defaults.APPLY_CHUNK_ENTRIES_RECEIVING if self.agent.receiving
                     else defaults.APPLY_CHUNK_ENTRIES)
            try:
                batch = self.kept.take(first, limit, chunk, self.wal.read)
            except (StorageError, OSError) as exc:
                # What it acked cannot be read back to apply: it must not count.
                self.mark_broken(f"reading its log to apply index {first} failed: {exc}")
                return False
            replies = sm.apply_many(batch)
            waiters = self._waiters
            if waiters:
                for entry, reply in zip(batch, replies, strict=True):
                    future = waiters.pop(entry.index, None)
                    if future is not None and not future.done():
                        future.set_result(reply)
            if core.applied(first, batch[-1].index):
                self._notify_progress()  # reads held below the read floor may go on
            self._applied_bytes += sum(len(entry.payload) for entry in batch)
            self._maybe_snapshot()
        return sm.applied_index < core.apply_limit(self.wal.durable_index)

    def _maybe_snapshot(self) -> None:
        every = self.agent.config.snapshot_every_entries
        if not every or (self._snapshot_task is not None and not self._snapshot_task.done()):
            return
        due = snapshot_due_entries(self._snapshot_bytes + self._applied_bytes, every)
        if self.sm.applied_index - self._last_snapshot_index >= due:
            self._snapshot_task = self.agent.spawn(self._snapshot_and_compact())

    def _snapshot_loaded(self, index: int) -> None:
        """The state now is the newest snapshot's, at `index`: its file's size stands for
        the state's until the next snapshot measures it."""
        self._last_snapshot_index = index
        path = self.snapshots.latest()
        self._snapshot_bytes = path.stat().st_size if path is not None else 0
        self._applied_bytes = 0

    async def _snapshot_and_compact(self) -> None:
        await self.take_snapshot()
        self.compact(self.agent.config.log_retain_entries)

    async def take_snapshot(self) -> Path:
        """Writes a snapshot of the applied state (serialised here, written on an I/O thread)."""
        sm = self.sm
        index = sm.applied_index
        header = self.state.header(sm, self.meta.kind, self.wal.epoch_history)
        # The chunks are taken now, while no entry can be applied in between.
        chunks = list(sm.snapshot())
        self._snapshot_bytes, self._applied_bytes = sum(len(chunk) for chunk in chunks), 0
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
        self._carry_out(self.core.log_compacted(self._log_info()))
        return first

    # --- the receive path (duplica side) -------------------------------------------------

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

    async def _feed(self, event: Callable[[], list[ReplicaAction]]) -> list[ReplicaAction]:
        """Feeds a shipped item to the core. A step-down (a newer primary ships to this one)
        or an adopted epoch is written first, then the item is fed again; a refusal (the meta
        could not be written) is the answer. A meta change still being written (a step-down
        taken ahead of the disk) lands before any shipped item is taken."""
        if self._meta_file.pending:
            await self._meta_file.flushed()
        actions = event()
        for _ in range(_META_DECISIONS_MAX):
            if not (actions and isinstance(actions[0], PersistMeta)):
                return actions
            refused = await self._persist_durably(actions[0])
            if refused:
                return [Refuse(refused)]
            actions = event()
        return [Refuse("storage_error")]  # the meta kept changing under it: probed again

    def _refused(self, status: str, epoch: int, sender: str | None,
                 batch_id: int = 0) -> dict[str, Any]:
        """The answer to a refused item; a sender that is not the named primary is logged
        (at most once a second per replica: a flood of forged items must not flood the log)."""
        message = ""
        if status == "not_primary":
            message = self.core.sender_error(epoch, sender)
            now = monotonic_ms()
            if now - self._refusal_logged_ms >= 1000:
                self._refusal_logged_ms = now
                log.warning("%s", message)
        return self._ack(status, batch_id, message)

    async def receive_probe(self, epoch: int, sender: str | None = None) -> dict[str, Any]:
        actions = await self._feed(lambda: self.core.on_probe(epoch, monotonic_ms(), sender))
        if actions and isinstance(actions[0], Refuse):
            return self._refused(actions[0].status, epoch, sender)
        return self._ack("mismatch")

    async def receive_truncate(self, epoch: int, after_index: int,
                               sender: str | None = None) -> dict[str, Any]:
        actions = await self._feed(lambda: self.core.on_truncate(epoch, after_index,
                                                                 monotonic_ms(), sender))
        cut = actions[0]
        if isinstance(cut, Refuse):
            return self._refused(cut.status, epoch, sender)
        assert isinstance(cut, Truncate), cut
        loop = asyncio.get_running_loop()
        if cut.rewind:
            # Entries this replica applied are not on the new primary (async mode only): the
            # state goes back to a snapshot at or below the cut (or to empty).
            try:
                fresh = await loop.run_in_executor(self.agent.io, self.state.rewound,
                                                   after_index, self.wal.first_index)
            except (StorageError, OSError) as exc:
                # No state at or below the cut is left (its log was compacted past it):
                # the replica cannot go back on its own. Broken, it is rebuilt from a peer
                # (invariant 12) instead of refusing every truncate forever.
                self.mark_broken(f"cannot rewind to index {after_index}: {exc}")
                return self._ack("storage_error", message=self.broken)
            log.warning("%s: rewound applied state from %d to %d to drop a divergent tail",
                        self.service, self.sm.applied_index, fresh.applied_index)
            # Swapped here, on the loop, so the applier never sees a half-replaced state.
            self.core.state_replaced(fresh)
            self._snapshot_loaded(fresh.applied_index)
            self.kept.clear()
        dropped = await loop.run_in_executor(self.agent.io, self.wal.truncate_after, after_index)
        self.kept.cut_after(after_index)
        self.core.truncated(after_index, dropped, self._log_info())
        if dropped:
            log.warning("%s: truncated %d divergent entries after index %d", self.service,
                        dropped, after_index)
        return self._ack("ok", truncated=dropped)

    async def receive_batch(self, epoch: int, batch_id: int, prev: LogPosition,
                            first_index: int, last_index: int, records: bytes,
                            commit_index: int,
                            check: asyncio.Future[CheckedRecords | None] | None = None,
                            sender: str | None = None) -> dict[str, Any]:
        """Takes a shipped batch. `check` is `check_records` of its records, started when it
        arrived (`Agent.precheck`); without it the records are checked here. `sender` is the
        host it came from (None: not checked)."""
        core = self.core
        actions = await self._feed(lambda: core.on_batch(
            epoch, prev, last_index, commit_index, self._log_info(), monotonic_ms(), sender))
        if actions and isinstance(actions[0], Refuse):
            return self._refused(actions[0].status, epoch, sender, batch_id)
        if actions:  # Append
            loop = asyncio.get_running_loop()
            entries: list[tuple[int, int, bytes, bytes]] = []
            # Every record is checked before any is written (invariant 12), and none may
            # claim an epoch after the shipping primary's.
            checked = await check if check is not None else None
            try:
                await loop.run_in_executor(self.agent.io, functools.partial(
                    self.wal.append_records, records, first_index, last_index, entries,
                    epoch_max=epoch, checked=checked))
            except (StorageError, OSError) as exc:
                refused = core.batch_append_failed(exc)
                if isinstance(exc, (LogCorruptError, DiskFullError)):
                    log.warning("%s: refused a shipped batch %d..%d: %s", self.service,
                                first_index, last_index, exc)
                return self._ack(refused.status, batch_id, str(exc))
            self.kept.shipped_batch(first_index, last_index, entries, len(records))
            core.batch_appended(self._log_info())
        self._schedule_apply()
        return self._ack("ok", batch_id)

    def hears_primary(self, now_ms: int) -> tuple[bool, int]:
        """Whether the primary's stream reached us within a failure timeout, and how long ago."""
        return self.core.hears_primary(now_ms)

    # --- snapshots received --------------------------------------------------------------

    def receive_snapshot(
        self, header: SnapshotHeader, frames: Iterable[bytes]
    ) -> tuple[ReplicatedStateMachine, ShippedSnapshot]:
        """Restores a snapshot from the primary into a fresh state machine as its frames
        arrive, writing them to a file that is not a snapshot yet (runs on an I/O thread;
        touches nothing of this replica, so a damaged or interrupted stream leaves its state
        and log as they were). `install_snapshot` then puts both in place."""
        return self.state.receive(header, frames)

    async def install_snapshot(self, header: SnapshotHeader, fresh: ReplicatedStateMachine,
                               shipped: ShippedSnapshot) -> None:
        """Replaces state and log with a received snapshot (the caller holds the replica's
        lock): the file and the log change on an I/O thread, the state here, on the loop,
        so the applier never sees a half-replaced state."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.agent.io, self.state.install, self.wal, header, shipped,
                                   self.sm.applied_index)
        self._snapshot_loaded(header.applied_index)
        self.kept.clear()
        self.core.snapshot_installed_here(fresh, header.applied_index, self._log_info())

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What heartbeats report of this replica (the core decides what it vouches for)."""
        durable = self.wal.durable_index if self.wal is not None else 0
        return self.core.status(durable, monotonic_ms())

