"""One replica's protocol decisions as a pure state machine (docs/design.md, Layers).

`ReplicaCore` owns everything a replica decides: its role and the transitions between roles,
which index a write is logged at, request dedupe and admission, the read floor, the lease and
epoch confirmation, the switchover hold and its deadline, what a step-down or a failed append
drops, when a shipped batch is appended, truncated or refused, how far entries may be applied,
and what the replica reports. It drives the log-shipping cores (`PrimaryReplication`,
`DuplicaReplication`) and holds the replicated state machine it applies to, but it does no I/O,
holds no future and reads no clock: the driver (`failover.agent.replica.Replica` on a host,
tests/sim in the simulation) feeds it events with the current time and carries out the actions
it returns, in order, feeding the results back (a persisted meta, an append done, a batch
read, a snapshot installed). The driver's loop is written down in the docstring of
`ReplicaCore`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from failover import defaults
from failover.core.log_position import LogPosition
from failover.core.replication import (
    AckView,
    AdoptEpoch,
    Append,
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
from failover.core.state_machine import ReplicatedStateMachine, too_old_message
from failover.errors import (
    DiskFullError,
    FailoverError,
    InvalidRequest,
    LogCorruptError,
    NotPrimaryError,
    Overloaded,
    PermissionDenied,
    ReplicaBrokenError,
    SessionExpired,
    StaleEpochError,
    Unavailable,
)

__all__ = [
    "APPLY", "HOLD_RELEASED", "LINK_UPS", "Append", "Apply", "ArmTimer", "ConfirmToken",
    "DropUnlogged", "EnsureLinks", "FailWaiters", "HoldReleased", "LinkUps", "LogBarrier",
    "PersistMeta", "Refuse", "ReplicaAction", "ReplicaCore", "ReplicaMeta", "SendBatch",
    "SendProbe", "SendSnapshot", "SendTruncate", "Truncate",
]


@dataclass
class ReplicaMeta:
    """What must survive a restart besides the log and snapshots; written atomically."""

    service: str
    kind: str
    role: str
    epoch: int
    mode: str = Mode.SYNC.value
    primary_host_id: str = ""
    primary_address: str = ""
    # A primary's membership survives its restart: in sync mode it must not come back
    # committing alone.
    duplicas: dict[str, str] = field(default_factory=dict)
    in_sync: list[str] = field(default_factory=list)
    # The coordinator's generation of `in_sync`, echoed in heartbeats (see ServiceInfo).
    in_sync_generation: int = 0

    def to_bytes(self) -> bytes:
        return msgpack.packb(self.__dict__, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplicaMeta:
        return cls(**msgpack.unpackb(data, raw=False))


# --- actions ------------------------------------------------------------------------------
# Besides these, the core returns the primary's shipping actions as they are: SendBatch,
# SendProbe, SendTruncate, SendSnapshot (failover.core.replication), and on the receive path
# Append and Refuse.


@dataclass(frozen=True, slots=True)
class PersistMeta:
    """Write `meta` atomically, then report it with `ReplicaCore.meta_persisted(action, now)`
    (or, if the write failed, `meta_write_failed`) and carry out what that returns. Nothing of
    the change is taken before: memory never runs ahead of the disk (invariant 1). `reason`
    is "assign", "step_down" or "adopt_epoch"; after "adopt_epoch" (and a "step_down" on the
    receive path) the driver feeds the shipped item again."""

    meta: ReplicaMeta
    required: bool
    reason: str
    why: str = ""


@dataclass(frozen=True, slots=True)
class LogBarrier:
    """Queue an empty entry (epoch, index) for the log: it opens the epoch in the history
    and commits what the new primary inherited. Its answer is counted as a pending write."""

    epoch: int
    index: int


@dataclass(frozen=True, slots=True)
class FailWaiters:
    """Fail every waiter for an entry at or after `from_index` (0: all) with `error`."""

    error: Exception
    from_index: int = 0


@dataclass(frozen=True, slots=True)
class DropUnlogged:
    """Forget the entries queued or kept to apply at or after `from_index`: they never reached
    the log, and the entries a new primary writes at those indexes are the ones to apply
    (invariant 4)."""

    from_index: int


@dataclass(frozen=True, slots=True)
class Truncate:
    """Cut the log after `after_index` (rewinding the applied state first when `rewind`: only
    in async mode), then report it with `ReplicaCore.truncated`."""

    after_index: int
    rewind: bool


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Call `ReplicaCore.timer(token, now)` at `at_ms` (the switchover hold's deadline)."""

    at_ms: int
    token: int


@dataclass(frozen=True, slots=True)
class EnsureLinks:
    """Keep a stream open to each of these peer hosts (host id -> address)."""

    peers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Apply:
    """Committed entries may be applied (up to `ReplicaCore.apply_limit`)."""


@dataclass(frozen=True, slots=True)
class HoldReleased:
    """The switchover hold ended: wake the reads and writes it held (they re-check)."""


@dataclass(frozen=True, slots=True)
class LinkUps:
    """Report `ReplicaCore.link_up(host, now)` for each peer of `ReplicaCore.peers` whose
    stream is up now (a new primary core starts with every stream down)."""


# Singletons: these carry nothing, so the hot path allocates none.
APPLY = Apply()
HOLD_RELEASED = HoldReleased()
LINK_UPS = LinkUps()

ReplicaAction = (
    PersistMeta | LogBarrier | FailWaiters | DropUnlogged | Truncate | ArmTimer | EnsureLinks
    | Apply | HoldReleased | LinkUps | SendBatch | SendProbe | SendTruncate | SendSnapshot
    | Append | Refuse
)


@dataclass(frozen=True, slots=True)
class ConfirmToken:
    """A read's confirmation of the epoch in progress (`ReplicaCore.confirm`)."""

    primary: PrimaryReplication
    batches: dict[str, int]


@dataclass(slots=True)
class _Hold:
    switchover_id: str
    token: int
    deadline_ms: int | None = None  # set once the target caught up
    started_ms: int | None = None  # when it began (None: the driver gave no time)


class ReplicaCore:
    """The decisions of one replica, events in and actions out.

    The driver's loop (like etcd-raft's Ready loop), all on one thread:

    1. Feed an event: a client write (`admit_bytes`, `write`) or read (`check_primary`,
       `read_ready`, `lease_valid`, `confirm`), an assignment (`assign`) or step-down
       (`step_down`), a shipped probe, truncate or batch (`on_probe`, `on_truncate`,
       `on_batch`), an ack (`on_ack`), a link change, a tick (`tick(now)`), a timer, or the
       result of I/O: `append_started` / `appended` / `append_failed` for the log writer,
       `batch_appended` / `note_error` for shipped records, `batch_read`, `truncated`,
       `snapshot_installed_here`, `log_compacted`, `state_replaced`, `applied`.
    2. Carry out the returned actions in order. `PersistMeta` first writes the meta and feeds
       `meta_persisted`, whose actions are carried out in turn.
    3. Apply: whenever `Apply` came back, apply entries up to `apply_limit(durable_index)` in
       index order through `sm.apply_many`, answer the waiters of those indexes with the
       replies, and report `applied(last_index)`.

    Waiting is the driver's: what a waiter waits for is one of the predicates here
    (`read_ready`, `confirmed`, `switchover_ready`, `holding`), re-checked after each event.
    The core keeps `log` (a `LogInfo`) as the driver last told it (`set_log`, or the events
    that carry one); events that read it are fed after the driver updated it.
    """

    def __init__(self, meta: ReplicaMeta, sm: ReplicatedStateMachine, *,
                 limits: ShipLimits | None = None, heartbeat_ms: int = defaults.HEARTBEAT_MS,
                 coordinated: bool = True) -> None:
        assert meta.role in ROLES, meta.role
        self.meta = meta
        self.service = meta.service
        self.sm = sm
        self.limits = limits if limits is not None else ShipLimits()
        self.heartbeat_ms = heartbeat_ms
        self.log = LogInfo(1, 0, 0, ())
        self.primary: PrimaryReplication | None = None
        self.duplica: DuplicaReplication | None = None
        self.duplica_addresses: dict[str, str] = dict(meta.duplicas)
        # The next index a write is logged at; entries below it up to `handed_index` are with
        # the log writer, the rest queued (`append_started`).
        self.next_index = 1
        self.handed_index = 0
        # Entries logged or queued and not applied that someone may wait on, by index (in
        # index order): (request key or b"" for a barrier, payload bytes). Pending writes
        # with a request id are found by key, so attempts in flight share one entry.
        self._pending: dict[int, tuple[bytes, int]] = {}
        self._pending_ids: dict[bytes, int] = {}
        self.pending_bytes = 0  # payload bytes of writes admitted and not yet answered
        self.truncated_entries = 0
        self.last_error = ""
        # Why this replica cannot read its own snapshot or log ("" while it can). A broken
        # replica serves nothing, acks nothing that counts and is not promotable; it says so
        # in its status until the coordinator rebuilds it from a peer (invariant 12).
        self.broken = ""
        # The last log append failed for want of space (reported in heartbeats).
        self.disk_full = False
        # A migration's cut holds applying.
        self.apply_held = False
        # Monotonic ms until which this primary may answer reads alone (a coordinator grant).
        self.lease_expiry_ms = 0
        # A replica that recovers from disk as primary, in a cluster with a coordinator,
        # serves nothing until the coordinator confirms it (a lease or an assignment at its
        # epoch): it may have been failed over while it was down.
        self.coordinator_confirmed = not (coordinated and meta.role == PRIMARY)
        self._hold: _Hold | None = None
        self._hold_tokens = 0
        # After a hold that ended without a switchover, no new hold starts before this
        # (monotonic ms): writes flow at least as long as they were held (issue 13).
        self.hold_gap_until_ms = 0
        # A primary answers reads only once commit and apply reach this index: the last
        # entry it inherited when it took the role (invariant 10).
        self.read_floor = 0
        # The highest index known committed in sync mode (told by a sync primary, or
        # committed by this replica as one): a sync primary never truncates below it.
        self.sync_commit_index = 0

    # --- lifecycle -----------------------------------------------------------------------

    def open(self, log: LogInfo, now_ms: int) -> list[ReplicaAction]:
        """The log opened (recovered) as `log`: take the recorded role (the coordinator
        confirms it)."""
        self.log = log
        self.next_index = log.last_index + 1
        self.handed_index = log.last_index
        actions = self._become(self.meta.role, self.meta.epoch, self.meta.in_sync, now_ms)
        if self.meta.role == PRIMARY:
            actions.append(EnsureLinks(dict(self.duplica_addresses)))
        return actions

    def mark_broken(self, reason: str) -> list[ReplicaAction]:
        """This replica cannot read its own snapshot or log: from now on it serves nothing,
        takes no shipped batch, and reports itself broken (with `reason`), never in sync."""
        if self.broken:
            return []
        self.broken = self.last_error = reason
        self.lease_expiry_ms = 0
        actions: list[ReplicaAction] = [FailWaiters(self.broken_error())]
        self._forget_pending(0)
        actions.extend(self.release_hold())
        return actions

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

    def closed(self) -> None:
        """The driver closed the replica and failed every waiter: nothing is pending."""
        self._forget_pending(0)

    # --- role ----------------------------------------------------------------------------

    @property
    def role(self) -> str:
        return self.meta.role

    @property
    def epoch(self) -> int:
        return self.meta.epoch

    @property
    def commit_index(self) -> int:
        if self.primary is not None:
            return self.primary.commit_index
        if self.duplica is not None:
            return self.duplica.commit_index
        return self.sm.applied_index

    @property
    def peers(self) -> list[str]:
        """The duplicas a primary ships to (empty on a duplica)."""
        return list(self.primary.peers) if self.primary is not None else []

    def assign(self, role: str, epoch: int, mode: str, primary: tuple[str, str] | None,
               duplicas: dict[str, str], in_sync: Iterable[str], in_sync_generation: int = 0,
               why: str = "assigned by the coordinator") -> PersistMeta:
        """An assignment (idempotent): refuses an older epoch (invariant 1, 2), else returns
        the meta to persist before any of it is used. Being told counts as the coordinator's
        confirmation, also when the write then fails."""
        if epoch < self.epoch:
            raise StaleEpochError(
                f"{self.service}: assignment at epoch {epoch} is older than this replica's "
                f"epoch {self.epoch}; ask the coordinator for the current assignment"
            )
        self.coordinator_confirmed = True
        meta = dataclasses.replace(
            self.meta, role=role, epoch=epoch, mode=mode,
            primary_host_id=primary[0] if primary else "",
            primary_address=primary[1] if primary else "",
            duplicas=dict(duplicas), in_sync=sorted(in_sync),
            in_sync_generation=in_sync_generation,
        )
        return PersistMeta(meta, required=True, reason="assign", why=why)

    def meta_write_failed(self, action: PersistMeta, error: Exception,
                          now_ms: int) -> list[ReplicaAction]:
        """The write of `action.meta` failed. An adopted epoch is not taken: the shipped item
        that carried it is refused "storage_error" (the primary's next probe or batch tries
        again). A step-down for want of space is taken all the same: giving up authority may
        run ahead of the disk, since a primary restarted from the old meta serves nothing
        until the coordinator confirms it. Anything else raises `error` (an assignment
        fails, and the replica stays as it was)."""
        if action.reason == "adopt_epoch":
            self.last_error = str(error)
            return [Refuse("storage_error")]
        if not action.required and isinstance(error, DiskFullError):
            return self.meta_persisted(action, now_ms)
        raise error

    def step_down(self, epoch: int, why: str) -> PersistMeta | None:
        """A newer epoch exists: the meta to persist to stop serving writes (None: nothing to
        do). Giving up authority may run ahead of the disk (`required` is False)."""
        if epoch <= self.epoch and self.role != PRIMARY:
            return None
        meta = dataclasses.replace(self.meta, role=DUPLICA, epoch=max(epoch, self.epoch))
        return PersistMeta(meta, required=False, reason="step_down", why=why)

    def meta_persisted(self, action: PersistMeta, now_ms: int) -> list[ReplicaAction]:
        """`action.meta` is on disk (or, for a step-down, could not be written and is taken
        all the same): adopt it and make the transition it stands for."""
        meta = action.meta
        if action.reason == "adopt_epoch":
            self.meta = meta
            if self.duplica is not None:
                self.duplica.epoch_persisted(meta.epoch)
            return []
        if action.reason == "step_down":
            self.meta = meta
            if self.broken:
                return []
            return self._become(DUPLICA, meta.epoch, (), now_ms)
        assert action.reason == "assign", action.reason
        old = self.meta
        role, epoch = meta.role, meta.epoch
        # A building replica that joins as a duplica keeps its stream and position: only
        # becoming or leaving primary, or a new epoch, starts the protocol core afresh.
        changed = (role == PRIMARY) != (old.role == PRIMARY) or epoch != old.epoch
        self.meta = meta
        if self.broken:
            # Recorded, so that its report matches the coordinator's record; but a replica
            # that cannot read its own data takes no role (invariant 12).
            raise self.broken_error()
        self.duplica_addresses = dict(meta.duplicas)
        actions: list[ReplicaAction]
        if changed or (role == PRIMARY and self.primary is None):
            actions = self._become(role, epoch, meta.in_sync, now_ms)
        elif role == PRIMARY and self.primary is not None:
            actions = list(self.primary.set_members(sorted(meta.duplicas), set(meta.in_sync)))
            actions.append(LINK_UPS)
            # A smaller in-sync set may commit writes that waited on the member that left:
            # apply and answer them now, not at the next ack.
            actions.append(APPLY)
        else:
            actions = []
        if role == PRIMARY:
            actions.append(EnsureLinks(dict(meta.duplicas)))
        return actions

    def _become(self, role: str, epoch: int, in_sync: Iterable[str],
                now_ms: int) -> list[ReplicaAction]:
        previous = self.primary
        actions: list[ReplicaAction] = []
        unlogged = self.next_index - 1 > self.handed_index  # writes queued for the log
        if role == PRIMARY:
            if previous is None and not unlogged:
                # From duplica: the log's end is where this primary's entries start.
                self.next_index = self.log.last_index + 1
            commit = self.sm.applied_index
            if self.duplica is not None:
                commit = max(commit, self.duplica.apply_limit(self.log.durable_index))
            self.duplica = None
            self.primary = PrimaryReplication(
                epoch, Mode(self.meta.mode), sorted(self.duplica_addresses),
                set(in_sync) & set(self.duplica_addresses), self.log, self.limits,
                commit_index=commit,
            )
            if self.log.position().epoch < epoch and not unlogged:
                # An empty entry opens the new epoch in the log: it marks the epoch's first
                # index in the history and commits the entries inherited from the last one.
                actions.append(LogBarrier(epoch, self.next_index))
                self._pending[self.next_index] = (b"", 0)
                self.next_index += 1
            # Whatever is in the log (or queued for it) now may have been acknowledged by an
            # earlier primary, or by this one before a restart: reads wait until it is
            # committed and applied here (invariant 10).
            self.read_floor = self.next_index - 1
            # The commit index of a primary with no in-sync duplica is its durable index:
            # computed now, not at the next write (after a restart, the log's tail would
            # otherwise stay unapplied until a client writes).
            actions.extend(self.primary.log_changed(self.log))
            actions.append(LINK_UPS)
            actions.append(APPLY)
        else:
            actions.extend(self.release_hold())
            self.lease_expiry_ms = 0
            if previous is not None:
                actions.append(FailWaiters(Unavailable(
                    f"{self.service}: this replica stopped being the primary (epoch {epoch}); "
                    "the outcome is unknown: retry with the same request id"
                )))
                self._forget_pending(0)
                # Entries that never reached the log must not be applied: the new primary's
                # entries at those indexes will be (invariant 4).
                self.next_index = self.log.last_index + 1
                self.handed_index = self.log.last_index
                actions.append(DropUnlogged(self.next_index))
                if previous.mode == Mode.SYNC:
                    self.sync_commit_index = max(self.sync_commit_index, previous.commit_index)
            self.primary = None
            self.duplica = DuplicaReplication(epoch, self.sm.applied_index)
        return actions

    def link_up(self, host_id: str, now_ms: int) -> list[ReplicaAction]:
        """The stream to `host_id` is up (or was up when the primary core started)."""
        if self.primary is None or self.broken:
            return []
        return self.primary.link_up(host_id, now_ms)  # type: ignore[return-value]

    def link_down(self, host_id: str) -> None:
        if self.primary is not None:
            self.primary.link_down(host_id)

    # --- the write path (primary) --------------------------------------------------------

    def check_primary(self, epoch_seen: int) -> None:
        """Raises unless this replica serves clients now: not broken, the primary, not
        fenced, confirmed after a restart, and not behind the epoch the client saw."""
        self.check_not_broken()
        if self.meta.role != PRIMARY or self.primary is None or self.primary.fenced:
            raise NotPrimaryError(self.service, self.meta.primary_address, self.meta.epoch)
        if not self.coordinator_confirmed:
            raise Unavailable(f"{self.service}: this primary restarted and waits for the "
                              "coordinator to confirm it is still the primary")
        if epoch_seen > self.meta.epoch:
            # The client saw a newer epoch: we are a fenced primary that has not heard yet.
            raise NotPrimaryError(self.service, "", epoch_seen)

    def admit_bytes(self, size: int) -> None:
        """Counts a write's payload against PENDING_REQUEST_BYTES_MAX, or refuses it: what
        waits in the log pipeline stays bounded in bytes, not only in count. The driver gives
        the bytes back with `release_bytes` unless `write` handed them to a new entry."""
        queued = self.pending_bytes
        if queued + size > defaults.PENDING_REQUEST_BYTES_MAX:
            raise Overloaded(
                f"Overloaded: {self.service} holds {queued} bytes of writes not yet answered; "
                f"this one ({size} bytes) would pass pending_request_bytes_max "
                f"({defaults.PENDING_REQUEST_BYTES_MAX}) and was not logged: retry after a "
                "backoff, or send smaller writes")
        self.pending_bytes = queued + size

    def release_bytes(self, size: int) -> None:
        self.pending_bytes -= size

    def write(self, client_id: str, seq: int, opens_session: bool,
              size: int) -> Reply | tuple[int, bool]:
        """Decides what to do with a write (after `check_primary` and the hold): the recorded
        reply of a request applied before (invariant 5), or (index, new): the entry that
        carries it, `new` when the driver is to log it now at `index` (with the current
        epoch; its `size` admitted bytes go with it), else an entry in flight to share.
        Raises SessionExpired for a request older than the retry window (its outcome can no
        longer be told), Overloaded past
        PENDING_REQUESTS_MAX entries in flight."""
        seen = self.sm.sessions.lookup(client_id, seq, opens_session)
        if isinstance(seen, Reply):
            return seen
        if isinstance(seen, TooOld):
            # Not InvalidRequest ("state untouched"): an earlier attempt may have been
            # applied, and a caller told otherwise would send it again.
            raise SessionExpired(too_old_message(client_id, seq, seen))
        # EXPIRED is not refused here: the applied state may lag the log, which may hold the
        # request that opens the session. The entry's apply decides, on every replica.
        key = encode_request_id(client_id, seq)  # attempts with and without the open flag
        index = self._pending_ids.get(key)
        if index is not None:
            return index, False
        if len(self._pending) >= defaults.PENDING_REQUESTS_MAX:
            raise Overloaded(f"Overloaded: {self.service} has {len(self._pending)} writes in "
                             "flight (pending_requests_max); this one was not logged: retry "
                             "after a backoff")
        index = self.next_index
        self.next_index = index + 1
        self._pending[index] = (key, size)
        self._pending_ids[key] = index
        return index, True

    def write_many(self, calls: Sequence[tuple[str, int, bool, int]],
                   ) -> list[Reply | tuple[int, bool] | FailoverError]:
        """`admit_bytes` and `write` for each of a stream message's writes, in order, as
        (client_id, seq, opens_session, size): one decision per call, a refusal returned
        (not raised) so that one refused call leaves the others of its message going. The
        new entries get consecutive indexes, so the driver logs them as one append (and
        ships them as one batch). A call's bytes stay admitted only when it is new (its
        entry answers them); otherwise they are given back here."""
        decided: list[Reply | tuple[int, bool] | FailoverError] = []
        for client_id, seq, opens, size in calls:
            try:
                self.admit_bytes(size)
            except Overloaded as exc:
                decided.append(exc)
                continue
            try:
                one = self.write(client_id, seq, opens, size)
            except (InvalidRequest, Overloaded, SessionExpired) as exc:
                self.release_bytes(size)
                decided.append(exc)
                continue
            if isinstance(one, Reply) or not one[1]:
                self.release_bytes(size)
            decided.append(one)
        return decided

    def append_started(self, last_index: int) -> None:
        """The log writer took every queued entry up to `last_index` to append."""
        self.handed_index = last_index

    def written(self, log: LogInfo) -> list[ReplicaAction]:
        """The log writer wrote entries up to `log.last_index`, not yet durable: a primary
        ships them now, so that its duplicas' fsyncs run while its own does. Nothing
        commits before `appended` says they are durable here too (the commit index is at
        most this log's durable index). Should that fsync fail, the driver marks the replica
        broken (`mark_broken`): entries that may be on a duplica are never replaced by
        others at the same index and epoch."""
        self.log = log
        primary = self.primary
        if primary is None or primary.fenced:
            return []
        return primary.log_changed(log)  # type: ignore[return-value]

    def appended(self, log: LogInfo) -> list[ReplicaAction]:
        """The log writer's append is durable: the log is now `log`. Ships and commits."""
        self.log = log
        self.disk_full = False
        primary = self.primary
        if primary is None or primary.fenced:
            return []
        actions: list[ReplicaAction] = primary.log_changed(log)  # type: ignore[assignment]
        actions.append(APPLY)
        return actions

    def append_failed(self, first_index: int, error: Exception,
                      log: LogInfo) -> list[ReplicaAction]:
        """The append of the entries from `first_index` failed: nothing of them (or after
        them) is in the log; their writers are refused and the indexes reused."""
        self.log = log
        self.last_error = str(error)
        self.disk_full = isinstance(error, DiskFullError)
        refusal = error if isinstance(error, DiskFullError) else Unavailable(
            f"{self.service}: the log could not be written ({error}); nothing was applied")
        self._forget_pending(first_index)
        self.next_index = log.last_index + 1
        self.handed_index = log.last_index
        return [FailWaiters(refusal, first_index), DropUnlogged(first_index)]

    def _forget_pending(self, from_index: int) -> None:
        """Writes from `from_index` on are answered (failed): their bytes and ids go."""
        pending = self._pending
        if not pending:
            return
        if from_index <= 0:
            gone = list(pending.items())
            pending.clear()
        else:
            gone = [(i, v) for i, v in pending.items() if i >= from_index]
            for i, _ in gone:
                del pending[i]
        for _, (key, size) in gone:
            self.pending_bytes -= size
            if key:
                self._pending_ids.pop(key, None)

    # --- reads ---------------------------------------------------------------------------

    def read_ready(self) -> bool:
        """Whether the entries this primary inherited are applied (invariant 10)."""
        return self.sm.applied_index >= self.read_floor

    def read_floor_deadline_ms(self, now_ms: int) -> int:
        """Until when a read that arrived at `now_ms` waits for `read_ready`."""
        return now_ms + defaults.READ_FLOOR_TIMEOUT_MS

    def read_floor_error(self) -> Unavailable:
        return Unavailable(
            f"{self.service}: this primary has applied {self.sm.applied_index} of the "
            f"{self.read_floor} entries it inherited; it serves reads once its in-sync "
            "duplicas have them: retry shortly")

    def lease_valid(self, now_ms: int) -> bool:
        """Whether this primary may answer a read alone (invariant 6)."""
        return now_ms < self.lease_expiry_ms

    def grant_lease(self, epoch: int, lease_ms: int, sent_ms: int) -> None:
        """A coordinator granted a lease in answer to a heartbeat sent at `sent_ms`: counting
        from the send, less the drift margin, keeps our lease ending before the coordinator's
        view of it even when this host's clock runs a little slow."""
        if self.meta.role == PRIMARY and epoch == self.meta.epoch:
            self.coordinator_confirmed = True
            self.lease_expiry_ms = max(self.lease_expiry_ms,
                                       sent_ms + lease_ms - defaults.LEASE_DRIFT_MARGIN_MS)

    def confirm(self, now_ms: int) -> tuple[list[ReplicaAction], ConfirmToken]:
        """Starts confirming the epoch with every in-sync duplica (a read outside the lease):
        the keepalives to send, and the token for `confirmed`."""
        primary = self.primary
        assert primary is not None
        actions, batches = primary.confirm(now_ms)
        return actions, ConfirmToken(primary, batches)  # type: ignore[return-value]

    def confirmed(self, token: ConfirmToken) -> bool:
        """Whether every in-sync duplica answered a batch sent after the read arrived; raises
        NotPrimaryError once this replica stopped being that primary."""
        primary = token.primary
        if self.primary is not primary or primary.fenced:
            raise NotPrimaryError(self.service, self.meta.primary_address, self.meta.epoch)
        return primary.confirmed(token.batches)

    def confirm_deadline_ms(self, now_ms: int) -> int:
        """Until when a read that started confirming at `now_ms` waits for `confirmed`: a
        failure timeout, after which the coordinator may have promoted another primary."""
        return now_ms + defaults.FAILURE_TIMEOUT_MS

    def confirm_error(self) -> Unavailable:
        return Unavailable(
            f"{self.service}: the primary's lease ran out and its duplicas did not confirm its "
            "epoch in time; it stops serving reads until they do")

    # --- switchover ----------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        """Whether a switchover holds reads and writes here."""
        return self._hold is not None

    @property
    def hold_id(self) -> str:
        return self._hold.switchover_id if self._hold is not None else ""

    def prepare_switchover(self, epoch: int, target: str, switchover_id: str,
                           now_ms: int | None = None) -> None:
        """Starts (or joins, for the same id) the hold of new reads and writes for a
        switchover to `target`. One switchover holds at a time, and a hold that ended without
        a switchover (released, failed or past its deadline) keeps the next one off for as
        long as it held (`hold_gap_until_ms`; checked when the driver gives `now_ms`): a
        looping caller cannot freeze writes, it holds them at most half of the time."""
        self.check_primary(0)
        primary = self.primary
        assert primary is not None
        if epoch != self.meta.epoch:
            raise StaleEpochError(f"{self.service}: switchover for epoch {epoch}, but this "
                                  f"primary is at epoch {self.meta.epoch}")
        if target not in primary.peers:
            raise InvalidRequest(f"{self.service}: {target} is not a duplica of this primary")
        if self._hold is not None and self._hold.switchover_id != switchover_id:
            raise Unavailable(f"{self.service}: another switchover "
                              f"({self._hold.switchover_id or 'unnamed'}) holds writes here; "
                              "try again once it has ended")
        if self._hold is None:
            if now_ms is not None and now_ms < self.hold_gap_until_ms:
                raise Unavailable(
                    f"{self.service}: a switchover held writes here until recently and ended "
                    f"without a switchover; writes flow for "
                    f"{self.hold_gap_until_ms - now_ms} ms more before another may hold them")
            self._hold_tokens += 1
            self._hold = _Hold(switchover_id, self._hold_tokens, started_ms=now_ms)

    def switchover_ready(self, target: str, switchover_id: str) -> tuple[int, int] | None:
        """(last index, target's durable index) once `target` holds everything logged here
        and every logged write is committed and applied; None while not yet. Raises
        NotPrimaryError when this replica stopped being the primary or `target` left, and
        Unavailable once the hold of `switchover_id` has ended: a prepare asked again waits
        beside the first call, and when that one gave up (its deadline) writes flow again; an
        answer of ready then would let the coordinator promote the target while this primary
        still serves reads and writes."""
        primary = self.primary
        peer = primary.peers.get(target) if primary is not None else None
        if peer is None or primary is None or primary.fenced:
            raise NotPrimaryError(self.service, self.meta.primary_address, self.meta.epoch)
        if self._hold is None or self._hold.switchover_id != switchover_id:
            raise Unavailable(f"{self.service}: the hold of switchover {switchover_id!r} "
                              "ended before its target caught up; switchover abandoned, this "
                              "primary serves on")
        last = self.next_index - 1
        if (self.log.last_index == last and peer.match_index >= last
                and primary.commit_index >= last and self.sm.applied_index >= last):
            return last, peer.match_index
        return None

    def switchover_prepared(self, now_ms: int) -> list[ReplicaAction]:
        """The target caught up: the coordinator now raises the epoch and reassigns roles.
        Should it die first, the hold must not last forever: it ends at a deadline."""
        hold = self._hold
        if hold is None:
            return []
        if hold.deadline_ms is not None:
            return []  # joined by the same id again: the first deadline stands, never extended
        hold.deadline_ms = now_ms + defaults.SWITCHOVER_TIMEOUT_MS
        return [ArmTimer(hold.deadline_ms, hold.token)]

    def switchover_timeout_error(self, target: str, timeout_ms: int) -> Unavailable:
        peer = self.primary.peers.get(target) if self.primary is not None else None
        return Unavailable(
            f"{self.service}: {target} did not catch up within {timeout_ms} ms "
            f"(it has {peer.match_index if peer else 0} of {self.next_index - 1}); "
            "switchover abandoned, this primary serves on")

    def switchover_deadline_ms(self, now_ms: int, timeout_ms: int) -> int:
        """Until when a prepare that began at `now_ms` waits for `switchover_ready`."""
        return now_ms + timeout_ms

    def prepare_failed(self, switchover_id: str,
                       now_ms: int | None = None) -> list[ReplicaAction]:
        """A prepare of `switchover_id` ended without `switchover_prepared` (timed out, this
        replica stopped being the primary, or its caller went away): nobody will complete
        that switchover, so the reads and writes held for it resume here. A hold of another
        switchover (begun after this one's ended, while a call of this one still waited) is
        not this call's to end, nor is a hold another call of this switchover answered
        ready: the coordinator may be promoting the target on that answer, and writes and
        reads resumed here could miss what the new primary acknowledges. That hold ends at
        its deadline, by the coordinator's release, or with this replica's role."""
        hold = self._hold
        if hold is None or hold.switchover_id != switchover_id or hold.deadline_ms is not None:
            return []
        self._hold_ended(now_ms)
        return self.release_hold()

    def _hold_ended(self, now_ms: int | None) -> None:
        """The hold ends at `now_ms` without a switchover: the next may start only after
        writes flowed as long as it held them."""
        hold = self._hold
        if hold is not None and now_ms is not None and hold.started_ms is not None:
            self.hold_gap_until_ms = now_ms + max(0, now_ms - hold.started_ms)

    def timer(self, token: int, now_ms: int) -> list[ReplicaAction]:
        """An `ArmTimer` fired: a hold whose switchover was not completed in time ends."""
        if self._hold is not None and self._hold.token == token:
            self._hold_ended(now_ms)
            return self.release_hold()
        return []

    def release_hold(self) -> list[ReplicaAction]:
        """Lets held reads and writes go on (or be redirected, once the role has changed)."""
        if self._hold is None:
            return []
        self._hold = None
        return [HOLD_RELEASED]

    def release_switchover(self, epoch: int, switchover_id: str,
                           now_ms: int | None = None) -> list[ReplicaAction] | None:
        """The coordinator abandoned switchover `switchover_id` at `epoch`: end its hold.
        None when it is not the one holding (late, or forged): nothing changes."""
        if self._hold is None or epoch != self.meta.epoch or (
                switchover_id != self._hold.switchover_id):
            return None
        self._hold_ended(now_ms)
        return self.release_hold()

    # --- shipping (primary side) ---------------------------------------------------------

    def on_ack(self, host_id: str, ack: AckView, now_ms: int) -> list[ReplicaAction]:
        """A duplica's answer: advances commit and shipping; a newer epoch steps down."""
        if self.primary is None or self.broken:
            return []
        actions: list[Any] = self.primary.ack(host_id, ack, now_ms)
        for i, action in enumerate(actions):
            if isinstance(action, StepDown):
                persist = self.step_down(action.epoch, "a duplica holds a newer epoch")
                actions[i:i + 1] = [persist] if persist is not None else []
                break
        actions.append(APPLY)
        return actions

    def batch_read(self, host_id: str, batch_id: int, last_index: int) -> list[ReplicaAction]:
        """The driver read a `SendBatch`'s entries up to `last_index`: the window's next
        batch, to carry out after shipping this one."""
        if self.primary is None:
            return []
        return self.primary.batch_read(host_id, batch_id, last_index)  # type: ignore[return-value]

    def tick(self, now_ms: int) -> list[ReplicaAction]:
        """Keepalives and retries; a switchover hold past its deadline ends. A broken
        primary ships nothing more: its duplicas stop hearing it, so the coordinator fails
        over."""
        actions: list[ReplicaAction] = []
        hold = self._hold
        if hold is not None and hold.deadline_ms is not None and now_ms >= hold.deadline_ms:
            self._hold_ended(now_ms)
            actions.extend(self.release_hold())
        if self.primary is not None and not self.broken:
            actions.extend(self._primary_actions(self.primary.tick(now_ms)))
        return actions

    def snapshot_sent(self, host_id: str, index: int) -> list[ReplicaAction]:
        """A `SendSnapshot` installed our state up to `index` on `host_id`."""
        if self.primary is None:
            return []
        return self.primary.snapshot_installed(host_id, index)  # type: ignore[return-value]

    def snapshot_send_failed(self, host_id: str, message: str) -> None:
        if self.primary is not None:
            self.primary.snapshot_failed(host_id, message)

    def log_compacted(self, log: LogInfo) -> list[ReplicaAction]:
        """The log dropped entries before a snapshot: a duplica that reconnects must be sent
        the snapshot, not entries that are gone."""
        self.log = log
        if self.primary is None:
            return []
        return self._primary_actions(self.primary.log_changed(log))

    def _primary_actions(self, actions: list[PrimaryAction]) -> list[ReplicaAction]:
        for i, action in enumerate(actions):
            if isinstance(action, StepDown):
                persist = self.step_down(action.epoch, "a duplica holds a newer epoch")
                actions[i:i + 1] = [persist] if persist is not None else []  # type: ignore[list-item]
                break
        return actions  # type: ignore[return-value]

    # --- the receive path (duplica side) -------------------------------------------------

    def set_log(self, log: LogInfo) -> None:
        """The log is now `log` (after any change the driver made outside the events here)."""
        self.log = log

    def sender_refusal(self, epoch: int, sender: str | None) -> Refuse | None:
        """Whether a shipped item (or snapshot) from host `sender` is refused for who sent
        it (invariant 14): only the primary the coordinator named (`meta.primary_host_id`)
        ships to a duplica, and only it may carry a newer epoch here; a primary takes no
        shipped item at all (a newer epoch reaches it from the coordinator, or in its own
        duplicas' answers). An item at an older epoch than ours is left to the epoch check,
        whoever sent it: its "stale_epoch" answer fences a deposed primary and changes nothing
        here. None: not refused (or `sender` None: the driver does not check senders)."""
        if sender is None or epoch < self.meta.epoch:
            return None
        if self.meta.role == PRIMARY or not sender or sender != self.meta.primary_host_id:
            return Refuse("not_primary")
        return None

    def sender_error(self, epoch: int, sender: str | None) -> str:
        """The message of a `not_primary` refusal, for the log and the answer."""
        named = ("it is the primary itself" if self.meta.role == PRIMARY else
                 f"its primary is {self.meta.primary_host_id!r}" if self.meta.primary_host_id
                 else "the coordinator named no primary for it yet")
        return (f"{self.service}: refused an item at epoch {epoch} from host {sender!r}: "
                f"{named} (epoch {self.meta.epoch}); nothing was taken")

    def _duplica_for(self, epoch: int,
                     sender: str | None = None) -> DuplicaReplication | list[ReplicaAction]:
        """The duplica core; or the refusal of an item from a host other than the named
        primary (`sender_refusal`); or the step-down to persist first if a newer primary ships
        to this primary; or the refusal of a batch at or below a primary's own epoch (two
        primaries in one epoch cannot be)."""
        refused = self.sender_refusal(epoch, sender)
        if refused is not None:
            return [refused]
        if self.meta.role == PRIMARY:
            if epoch <= self.meta.epoch:
                return [Refuse("stale_epoch")]
            persist = self.step_down(epoch, "a primary at a newer epoch ships to this replica")
            assert persist is not None
            return [persist]
        assert self.duplica is not None, self.meta.role
        return self.duplica

    def _adopt(self, actions: list[Any]) -> list[ReplicaAction]:
        if actions and isinstance(actions[0], AdoptEpoch):
            meta = dataclasses.replace(self.meta, epoch=actions[0].epoch)
            return [PersistMeta(meta, required=True, reason="adopt_epoch")]
        return actions

    def on_probe(self, epoch: int, now_ms: int,
                 sender: str | None = None) -> list[ReplicaAction]:
        """A probe: [] to answer "mismatch" with our position, or [Refuse], or a
        `PersistMeta` to carry out before feeding the probe again. `sender` is the host it
        came from (None: not checked; see `sender_refusal`), likewise below."""
        duplica = self._duplica_for(epoch, sender)
        if isinstance(duplica, list):
            return duplica
        return self._adopt(duplica.on_probe(epoch, now_ms))

    def on_truncate(self, epoch: int, after_index: int, now_ms: int,
                    sender: str | None = None) -> list[ReplicaAction]:
        """The primary found our log diverges after `after_index`: [Truncate], [Refuse], or a
        `PersistMeta` to carry out before feeding it again."""
        duplica = self._duplica_for(epoch, sender)
        if isinstance(duplica, list):
            return duplica
        actions = self._adopt(duplica.on_truncate(epoch, after_index, now_ms))
        if actions:
            return actions  # refused (a late truncate of a deposed primary), or a new epoch
        # Checked only once the truncate is known to come from the current primary.
        assert self.meta.mode != Mode.SYNC.value or after_index >= self.sync_commit_index, (
            f"{self.service}: sync mode, yet a primary asked to truncate committed entries "
            f"(after {after_index}, committed in sync mode {self.sync_commit_index})"
        )
        # Only in async mode: entries this replica applied are not on the new primary. The
        # state must go back to before them (reloaded from a snapshot at or below the cut,
        # or empty, then replayed from the log as the commit index allows).
        return [Truncate(after_index, rewind=after_index < self.sm.applied_index)]

    def truncated(self, after_index: int, dropped: int, log: LogInfo) -> None:
        """The log was cut after `after_index`, dropping `dropped` entries (counted and
        reported, invariant 7). A rewound state was reported first (`state_replaced`)."""
        self.log = log
        self.next_index = log.last_index + 1
        self.handed_index = log.last_index
        self.truncated_entries = dropped

    def on_batch(self, epoch: int, prev: LogPosition, last_index: int, commit_index: int,
                 log: LogInfo, now_ms: int, sender: str | None = None) -> list[ReplicaAction]:
        """A shipped batch (a keepalive when last_index == prev.index) against our log `log`:
        [Append] (append its records, then `batch_appended`), [] (nothing to append),
        [Refuse], or a `PersistMeta` to carry out before feeding it again."""
        self.log = log
        duplica = self._duplica_for(epoch, sender)
        if isinstance(duplica, list):
            return duplica
        actions = self._adopt(duplica.on_batch(epoch, prev, last_index, commit_index, log,
                                               now_ms))
        if actions and not isinstance(actions[0], Append):
            return actions
        if self.meta.mode == Mode.SYNC.value:
            self.sync_commit_index = max(self.sync_commit_index, commit_index)
        return actions

    def batch_appended(self, log: LogInfo) -> None:
        """A shipped batch's records are durable: the log is now `log`."""
        self.log = log
        self.disk_full = False
        self.next_index = log.last_index + 1
        self.handed_index = log.last_index

    def batch_append_failed(self, error: Exception) -> Refuse:
        """Appending a shipped batch's records failed: a record damaged in transit is
        refused "corrupt" (the primary resends from what we hold), anything else
        "storage_error" (the primary marks us failed and probes again later)."""
        self.last_error = str(error)
        if isinstance(error, LogCorruptError):
            return Refuse("corrupt")
        self.disk_full = isinstance(error, DiskFullError)
        return Refuse("storage_error")

    def note_error(self, message: str, disk_full: bool | None = None) -> None:
        """An I/O error the replica reports in its status (and, with `disk_full`, whether it
        was for want of space)."""
        self.last_error = message
        if disk_full is not None:
            self.disk_full = disk_full

    def hears_primary(self, now_ms: int) -> tuple[bool, int]:
        """Whether the primary's stream reached us within `HEARD_WITHIN_HEARTBEATS` heartbeat
        intervals, and how
        long ago (well under the coordinator's failure timeout: a duplica asked right after a
        crash must not still claim to hear)."""
        heard = self.duplica.last_heard_ms if self.duplica is not None else None
        if heard is None:
            return False, 0
        silent = max(0, now_ms - heard)
        return silent < defaults.HEARD_WITHIN_HEARTBEATS * self.heartbeat_ms, silent

    def check_snapshot(self, epoch: int, sender: str | None = None) -> None:
        """Raises unless a snapshot at `epoch` from host `sender` (None: not checked) may
        replace this replica's state: never a primary's (its data is the service's), only
        at this replica's own epoch, and only from the primary the coordinator named
        (`sender_refusal`)."""
        self.check_not_broken()
        caller = f"host {sender!r}" if sender is not None else "a caller"
        if self.meta.role == PRIMARY:
            raise PermissionDenied(caller, f"replace the data of {self.service}",
                                   "a replica that is not the primary (this one is, at "
                                   f"epoch {self.meta.epoch})")
        if epoch != self.meta.epoch:
            raise StaleEpochError(f"{self.service}: a snapshot from epoch {epoch}, but this "
                                  f"replica is at epoch {self.meta.epoch}; not installed")
        if self.sender_refusal(epoch, sender) is not None:
            raise PermissionDenied(caller, f"install a snapshot of {self.service}",
                                   "to be the primary the coordinator named "
                                   f"({self.meta.primary_host_id or 'none yet'}) at epoch "
                                   f"{self.meta.epoch}")

    def check_drop(self, epoch: int, delete_data: bool) -> None:
        """Raises unless a drop at `epoch` may close this replica (and with `delete_data`,
        delete its files): never at an older epoch than ours; a serving primary's data only
        at its own epoch (its service was deleted). An HA user expects the copy that serves to
        outlive any other drop: a primary is demoted (AssignRole, StepDown) before a drop at
        a newer epoch may delete it, and such a drop adopts no epoch. A primary that recovered
        from disk and that the coordinator never confirmed serves nothing: it was deposed
        while it was down, and its data may go at the coordinator's newer epoch."""
        if epoch < self.meta.epoch:
            raise StaleEpochError(f"{self.service}: drop at epoch {epoch} is older than "
                                  f"{self.meta.epoch}")
        if (delete_data and self.meta.role == PRIMARY and epoch != self.meta.epoch
                and self.coordinator_confirmed):
            raise PermissionDenied(
                f"a drop at epoch {epoch}", f"delete the data of {self.service}",
                f"the primary's own epoch ({self.meta.epoch}): a primary is demoted before "
                "its data is dropped")

    # --- state replaced ------------------------------------------------------------------

    def state_replaced(self, sm: ReplicatedStateMachine) -> None:
        """The driver swapped in another state (a rewind before a truncate)."""
        self.sm = sm

    def snapshot_installed_here(self, sm: ReplicatedStateMachine, index: int,
                                log: LogInfo) -> None:
        """A snapshot from the primary replaced state and log: applied and verified to
        `index`, the log starting after it."""
        self.sm = sm
        self.log = log
        self.next_index = log.last_index + 1
        self.handed_index = log.last_index
        if self.duplica is not None:
            self.duplica.verified_index = index
            self.duplica.commit_index = max(self.duplica.commit_index, index)

    # --- applying ------------------------------------------------------------------------

    def apply_limit(self, durable_index: int) -> int:
        """How far entries may be applied (invariant 4): committed, durable and, on a
        duplica, verified; never past what is queued here (the log's durable index moves on
        an I/O thread a moment before shipped entries are reported); not at all while a
        migration's cut holds applying or the replica is broken."""
        applied = self.sm.applied_index
        if self.apply_held or self.broken:
            return applied
        if self.primary is not None:
            limit = min(self.primary.commit_index, durable_index)
        elif self.duplica is not None:
            limit = self.duplica.apply_limit(durable_index)
        else:
            return applied
        return min(limit, self.next_index - 1)

    def applied(self, first_index: int, last_index: int) -> bool:
        """Entries first_index..last_index were applied (and their waiters answered); True
        when that crossed the read floor (reads held below it may go on)."""
        pending = self._pending
        if pending:
            ids = self._pending_ids
            released = 0
            for index in range(first_index, last_index + 1):
                got = pending.pop(index, None)
                if got is not None:
                    released += got[1]
                    if got[0]:
                        ids.pop(got[0], None)
            self.pending_bytes -= released
        return self.read_floor >= first_index

    # --- status --------------------------------------------------------------------------

    def status(self, durable_index: int, now_ms: int) -> dict[str, Any]:
        """What the replica reports in heartbeats. A broken replica vouches for nothing it
        holds: no durable or matched index, so nobody counts it in sync or promotes it
        (invariant 12)."""
        durable = 0 if self.broken else durable_index
        primary = self.primary
        # A duplica's lag as far as it knows: committed on the primary, not yet on our disk.
        lag = 0 if primary is not None or self.broken else max(0, self.commit_index - durable)
        matched = 0 if self.broken else durable if primary is not None else (
            min(durable, self.duplica.verified_index) if self.duplica is not None else 0)
        meta = self.meta
        return {
            "service": self.service, "kind": meta.kind, "role": meta.role,
            "epoch": meta.epoch, "mode": meta.mode, "matched_index": matched,
            "in_sync": sorted(primary.in_sync) if primary is not None else [],
            "in_sync_generation": meta.in_sync_generation if primary is not None else 0,
            "in_sync_lag_ms": primary.lag_ms(now_ms) if primary is not None else {},
            "durable_index": durable, "commit_index": self.commit_index,
            "applied_index": self.sm.applied_index, "lag_entries": lag,
            "truncated_entries": self.truncated_entries, "last_error": self.last_error,
            "disk_full": self.disk_full, "broken": bool(self.broken),
            "primary_host_id": "" if primary is not None else meta.primary_host_id,
            "duplicas": sorted(meta.duplicas) if primary is not None else [],
        }
