"""The primary/duplica log-shipping protocol as pure state machines (docs/design.md, Replication).

`PrimaryReplication` tracks, for one replica set on its primary, how far each duplica has
durably logged, decides what to send next within the per-replica-set bounds, and computes
the commit index. `DuplicaReplication` decides, for one replica set on a duplica, whether an
incoming batch is appended, rejected as stale, or answered with a mismatch, and how far the
duplica may apply. Neither does I/O or reads a clock: the agent feeds events (log state,
acks, the current monotonic time) and carries out the returned actions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from failover import defaults
from failover.core.log_position import EpochHistory, LogPosition, epoch_at, match_index


class Mode(Enum):
    """When the primary may acknowledge a write."""

    SYNC = "sync"  # after every in-sync duplica has it on disk
    ASYNC = "async"  # after the primary has it on disk


@dataclass(frozen=True, slots=True)
class LogInfo:
    """What the protocol needs to know of a replica's own log at one moment."""

    first_index: int  # first entry held (compacted before it)
    last_index: int
    durable_index: int
    history: EpochHistory  # (epoch, first_index), survives compaction

    def position(self) -> LogPosition:
        return LogPosition(epoch_at(self.history, self.last_index), self.last_index)


@dataclass(frozen=True, slots=True)
class ShipLimits:
    """Bounds per replica set on one host-to-host stream."""

    batch_entries_max: int = defaults.BATCH_ENTRIES_MAX
    batch_bytes_max: int = defaults.BATCH_BYTES_MAX
    inflight_batches_max: int = defaults.INFLIGHT_BATCHES_MAX
    keepalive_ms: int = defaults.HEARTBEAT_MS


# --- actions the primary asks the agent to carry out -------------------------------------


@dataclass(frozen=True, slots=True)
class SendProbe:
    host_id: str


@dataclass(frozen=True, slots=True)
class SendTruncate:
    host_id: str
    after_index: int


@dataclass(frozen=True, slots=True)
class SendBatch:
    """Read entries first_index.. (at most entries_max, bytes_max) and ship them.

    The agent reports what it actually read with `PrimaryReplication.batch_read`, ships the
    batch, then carries out what `batch_read` returns (the next batch of the window: only then
    is its first index known, since `bytes_max` may cut this one short). An empty batch
    (entries_max == 0) is a keepalive carrying the commit index. An empty batch with `notice`
    only tells an idle duplica that the commit moved (hot standby): the agent may send it
    with its link's next message, shortly after (nothing waits on its answer).
    """

    host_id: str
    batch_id: int
    prev: LogPosition
    first_index: int
    entries_max: int
    bytes_max: int
    commit_index: int
    notice: bool = False


@dataclass(frozen=True, slots=True)
class SendSnapshot:
    """The duplica needs entries the log no longer holds: install a snapshot on it."""

    host_id: str


@dataclass(frozen=True, slots=True)
class StepDown:
    """A duplica holds a higher epoch: this primary has been fenced."""

    epoch: int


PrimaryAction = SendProbe | SendTruncate | SendBatch | SendSnapshot | StepDown


class PeerState(Enum):
    DISCONNECTED = "disconnected"
    PROBING = "probing"
    TRUNCATING = "truncating"
    STREAMING = "streaming"
    SNAPSHOT = "snapshot"
    FAILED = "failed"  # the duplica cannot take entries (no such replica, disk full)


@dataclass
class DuplicaProgress:
    """The primary's view of one duplica."""

    host_id: str
    state: PeerState = PeerState.DISCONNECTED
    next_index: int = 1  # next entry to send
    match_index: int = 0  # highest index the duplica has durably, matching this log
    inflight: deque[tuple[int, int]] = field(default_factory=deque)  # (batch_id, last_index)
    next_batch_id: int = 1
    commit_sent: int = 0
    last_send_ms: int = 0
    last_heard_ms: int = 0
    truncated_entries: int = 0
    last_error: str = ""
    acked_batch_id: int = 0  # highest batch id answered ok in this epoch
    stream_start_batch_id: int = 0  # first batch id of the current stream (after a restart)
    keepalive_due: bool = False  # send a keepalive as soon as the window is empty
    # When it last took entries (its match index moved) or held everything durable here;
    # None until the first tick. How long a sync write can have waited on it (`lag_ms`).
    progress_ms: int | None = None


@dataclass(frozen=True, slots=True)
class AckView:
    """A duplica's answer, as the protocol needs it (decoded from the wire by the agent)."""

    status: str  # "ok", "stale_epoch", "mismatch", "unknown_service", "corrupt", "storage_error"
    epoch: int
    batch_id: int = 0
    durable_index: int = 0
    last: LogPosition = LogPosition(0, 0)
    history: EpochHistory = ()
    truncated_entries: int = -1  # >= 0 only in the answer to a Truncate
    message: str = ""


class PrimaryReplication:
    """Shipping and commit for one replica set on its primary."""

    def __init__(
        self,
        epoch: int,
        mode: Mode,
        duplicas: list[str],
        in_sync: set[str],
        log: LogInfo,
        limits: ShipLimits = ShipLimits(),
        commit_index: int = 0,
    ) -> None:
        assert epoch > 0
        assert in_sync <= set(duplicas), (in_sync, duplicas)
        self.epoch = epoch
        self.mode = mode
        self.limits = limits
        self.in_sync = set(in_sync)
        self.peers: dict[str, DuplicaProgress] = {h: DuplicaProgress(h) for h in duplicas}
        self.log = log
        # The commit index survives a change of primary: entries up to it are on every
        # in-sync replica already.
        self.commit_index = min(commit_index, log.durable_index)
        self.fenced = False

    # --- configuration -------------------------------------------------------------------

    def set_members(self, duplicas: list[str], in_sync: set[str]) -> list[PrimaryAction]:
        """Applies a new duplica list and in-sync set from the coordinator (or an admin)."""
        assert in_sync <= set(duplicas), (in_sync, duplicas)
        for host in list(self.peers):
            if host not in duplicas:
                del self.peers[host]
        for host in duplicas:
            self.peers.setdefault(host, DuplicaProgress(host))
        self.in_sync = set(in_sync)
        self._advance_commit()
        return []

    # --- events --------------------------------------------------------------------------

    def link_up(self, host_id: str, now_ms: int) -> list[PrimaryAction]:
        """The stream to host_id is (re)established: find where its log ends."""
        peer = self.peers.get(host_id)
        if peer is None or self.fenced:
            return []
        peer.state = PeerState.PROBING
        peer.inflight.clear()
        peer.last_send_ms = now_ms
        return [SendProbe(host_id)]

    def link_down(self, host_id: str) -> None:
        """The stream broke: nothing in flight will be answered."""
        peer = self.peers.get(host_id)
        if peer is not None:
            peer.state = PeerState.DISCONNECTED
            peer.inflight.clear()

    def log_changed(self, log: LogInfo) -> list[PrimaryAction]:
        """The local log grew (or became durable further): commit and ship."""
        assert log.last_index >= self.log.last_index or log.first_index > self.log.first_index
        self.log = log
        self._advance_commit()
        return self._pump_all()

    def batch_read(self, host_id: str, batch_id: int, last_index: int) -> list[PrimaryAction]:
        """The agent read entries up to last_index for this batch; returns the window's next
        batch, to carry out after shipping this one."""
        peer = self.peers.get(host_id)
        if peer is None or not peer.inflight or peer.inflight[-1][0] != batch_id:
            return []
        # bytes_max may cut the read short, never make it longer than asked.
        assert last_index <= peer.inflight[-1][1], (last_index, peer.inflight[-1])
        peer.inflight[-1] = (batch_id, last_index)
        peer.next_index = last_index + 1
        return self._pump(peer)

    def ack(self, host_id: str, ack: AckView, now_ms: int) -> list[PrimaryAction]:
        """A duplica answered a probe, batch or truncate."""
        peer = self.peers.get(host_id)
        if peer is None or self.fenced:
            return []
        peer.last_heard_ms = now_ms
        if ack.epoch > self.epoch:
            self.fenced = True
            return [StepDown(ack.epoch)]
        if ack.epoch < self.epoch:
            # A late answer to a message an earlier core of this replica sent (the duplica
            # answers with the epoch it then had): it says nothing about this epoch. Or a
            # duplica whose own assignment naming this primary has not arrived yet refused
            # our probe: probe it again at the next tick, not after a whole keepalive period
            # (the first write after a crash failover waited 100 ms more for it).
            if ack.status == "not_primary" and peer.state == PeerState.PROBING:
                retry_ms = now_ms - self.limits.keepalive_ms + defaults.REFUSED_PROBE_RETRY_MS
                peer.last_send_ms = min(peer.last_send_ms, retry_ms)
            return []
        if ack.status == "ok":
            return self._on_ok(peer, ack)
        if ack.status == "mismatch":
            return self._on_position(peer, ack)
        if ack.status == "corrupt":
            # Damaged in transit: resend everything after what the duplica holds.
            peer.last_error = ack.message
            return self._restart_stream(peer)
        if ack.status in ("unknown_service", "storage_error", "not_primary"):
            peer.state = PeerState.FAILED
            peer.inflight.clear()
            peer.last_error = ack.message or ack.status
            return []
        if ack.status == "stale_epoch":
            # At our own epoch a duplica cannot find our batches stale: a late or confused
            # answer. Never fence on it, and never invent an epoch the coordinator did not
            # issue; a real newer epoch shows as ack.epoch > ours, handled above.
            return []
        raise AssertionError(f"unknown ack status {ack.status!r}")

    def tick(self, now_ms: int) -> list[PrimaryAction]:
        """Keepalives to idle duplicas (they carry the commit index and prove liveness);
        retries for failed ones."""
        actions: list[PrimaryAction] = []
        if self.fenced:
            return actions
        for peer in self.peers.values():
            if peer.progress_ms is None or peer.match_index >= self.log.durable_index:
                peer.progress_ms = now_ms
            if peer.state == PeerState.STREAMING and not peer.inflight:
                # Keepalives go out on a grid, once per keepalive period of the clock
                # (nothing sent yet in this period), not a period after each replica set's
                # last send: every idle replica set of a host then sends in the same tick,
                # and its link carries them all in one message per peer instead of one per
                # tick (at rest, per-message gRPC work was a fifth of an agent's CPU). The
                # gap between two sends stays at most a period and a tick, as before.
                period_ms = self.limits.keepalive_ms
                if now_ms // period_ms > peer.last_send_ms // period_ms:
                    actions.append(self._batch(peer, 0, now_ms))
                continue
            if now_ms - peer.last_send_ms < self.limits.keepalive_ms:
                continue
            if peer.state in (PeerState.FAILED, PeerState.PROBING, PeerState.TRUNCATING):
                # Probe again: a failed duplica may have been fixed, a probe may have been lost.
                peer.state = PeerState.PROBING
                peer.inflight.clear()
                peer.last_send_ms = now_ms
                actions.append(SendProbe(peer.host_id))
        return actions

    def snapshot_installed(self, host_id: str, index: int) -> list[PrimaryAction]:
        """The duplica now holds the state up to index (its log is empty after it)."""
        peer = self.peers.get(host_id)
        if peer is None:
            return []
        peer.match_index = max(peer.match_index, index)
        return self._restart_stream(peer)

    def snapshot_failed(self, host_id: str, message: str) -> None:
        peer = self.peers.get(host_id)
        if peer is not None:
            peer.state = PeerState.FAILED
            peer.last_error = message

    def lag_ms(self, now_ms: int) -> dict[str, int]:
        """For each in-sync duplica, how long it has taken no entry while lacking some that
        are durable here (0 when it holds them all): a sync write may have waited that long on
        it. The coordinator takes a member past `insync_lag_ms` out of the in-sync set, so a
        duplica that heartbeats but cannot take the stream does not block writes forever."""
        lags: dict[str, int] = {}
        for host in sorted(self.in_sync):
            peer = self.peers[host]
            behind = peer.match_index < self.log.durable_index
            lags[host] = max(0, now_ms - peer.progress_ms) if (
                behind and peer.progress_ms is not None) else 0
        return lags

    def confirm(self, now_ms: int) -> tuple[list[PrimaryAction], dict[str, int]]:
        """Starts confirming the epoch with every in-sync duplica (a read outside the lease):
        returns the keepalives to send and a token for `confirmed`. A batch sent from now on
        and answered ok proves the duplica still follows this epoch at or after `now_ms`."""
        actions: list[PrimaryAction] = []
        token: dict[str, int] = {}
        for host in sorted(self.in_sync):  # sorted: the same actions in the same order
            peer = self.peers[host]
            token[host] = peer.next_batch_id
            if peer.state == PeerState.STREAMING and not peer.inflight:
                actions.append(self._batch(peer, 0, now_ms))
            else:
                # A keepalive behind batches in flight would not match the duplica's log yet:
                # send it when the window empties (or the stream is back).
                peer.keepalive_due = True
        return actions, token

    def confirmed(self, token: dict[str, int]) -> bool:
        """Whether every duplica in the token answered a batch sent after it was taken."""
        return not self.fenced and all(
            host in self.peers and self.peers[host].acked_batch_id >= batch_id
            for host, batch_id in token.items()
        )

    # --- internals -----------------------------------------------------------------------

    def _on_ok(self, peer: DuplicaProgress, ack: AckView) -> list[PrimaryAction]:
        if ack.truncated_entries >= 0:
            # The answer to a Truncate: the duplica's log is now a prefix of ours.
            peer.truncated_entries = ack.truncated_entries
            peer.match_index = ack.last.index
            return self._restart_stream(peer)
        if peer.state != PeerState.STREAMING:
            return []  # a late answer from before a restart of the stream
        while peer.inflight and peer.inflight[0][0] <= ack.batch_id:
            peer.inflight.popleft()
        peer.acked_batch_id = max(peer.acked_batch_id, ack.batch_id)
        if ack.durable_index > peer.match_index:
            assert ack.durable_index <= self.log.last_index, (ack, self.log)
            peer.match_index = ack.durable_index
            peer.progress_ms = peer.last_heard_ms  # this ack's time
            self._advance_commit()
        return self._pump(peer)

    def _on_position(self, peer: DuplicaProgress, ack: AckView) -> list[PrimaryAction]:
        """A probe answer or a mismatch: find the divergence point and resume from it.

        Answers that predate the current stream are ignored: a mismatch for a batch sent
        before the last restart, or a second answer to a re-sent probe. Each restart sends a
        whole window, so acting on them would multiply the batches in flight."""
        if ack.batch_id:
            if peer.state != PeerState.STREAMING or ack.batch_id < peer.stream_start_batch_id:
                return []
        elif peer.state != PeerState.PROBING:
            return []
        matched = match_index(self.log.history, self.log.last_index, ack.history, ack.last.index)
        peer.inflight.clear()
        if ack.last.index > matched:
            peer.state = PeerState.TRUNCATING
            return [SendTruncate(peer.host_id, matched)]
        peer.match_index = matched
        return self._restart_stream(peer)

    def _restart_stream(self, peer: DuplicaProgress) -> list[PrimaryAction]:
        peer.inflight.clear()
        peer.stream_start_batch_id = peer.next_batch_id
        peer.next_index = peer.match_index + 1
        if peer.next_index < self.log.first_index:
            peer.state = PeerState.SNAPSHOT
            return [SendSnapshot(peer.host_id)]
        peer.state = PeerState.STREAMING
        peer.commit_sent = 0
        self._advance_commit()
        actions = self._pump(peer)
        if not actions:
            # Nothing to send: a keepalive tells the duplica where the log and commit are.
            actions.append(self._batch(peer, 0, peer.last_send_ms))
        return actions

    def _pump_all(self) -> list[PrimaryAction]:
        actions: list[PrimaryAction] = []
        for peer in self.peers.values():
            actions.extend(self._pump(peer))
        return actions

    def _pump(self, peer: DuplicaProgress) -> list[PrimaryAction]:
        """The next batch of what the duplica has not been sent, if its window has room.

        One batch at a time: `bytes_max` may cut it short, so where the next one starts is
        known only from `batch_read`, which asks for the next batch in turn (until the window
        is full), so that several batches are in flight."""
        actions: list[PrimaryAction] = []
        if peer.state != PeerState.STREAMING or self.fenced:
            return actions
        if peer.next_index < self.log.first_index:
            # The log was compacted past what this duplica has been sent (it streams behind,
            # out of the in-sync set or in async mode): those entries are gone, so it
            # catches up from a snapshot; late answers to its batches are ignored meanwhile.
            peer.inflight.clear()
            peer.state = PeerState.SNAPSHOT
            return [SendSnapshot(peer.host_id)]
        limits = self.limits
        if (
            len(peer.inflight) < limits.inflight_batches_max
            and peer.next_index <= self.log.last_index
        ):
            count = min(limits.batch_entries_max, self.log.last_index - peer.next_index + 1)
            batch = self._batch(peer, count, peer.last_send_ms)
            actions.append(batch)
            # Until the agent reports what it read, assume the whole count was sent.
            peer.next_index += count
        if (
            not actions
            and not peer.inflight
            and (peer.commit_sent < self.commit_index or peer.keepalive_due)
        ):
            # Idle duplica behind on the commit index (tell it, so it applies: hot standby),
            # or a keepalive was asked for to confirm the epoch (its answer is awaited).
            notice = not peer.keepalive_due
            peer.keepalive_due = False
            actions.append(self._batch(peer, 0, peer.last_send_ms, notice=notice))
        return actions

    def _batch(self, peer: DuplicaProgress, count: int, now_ms: int,
               notice: bool = False) -> SendBatch:
        batch_id = peer.next_batch_id
        peer.next_batch_id += 1
        prev_index = peer.next_index - 1
        if count:
            peer.inflight.append((batch_id, prev_index + count))
        peer.commit_sent = self.commit_index
        peer.last_send_ms = max(peer.last_send_ms, now_ms)
        return SendBatch(
            host_id=peer.host_id,
            batch_id=batch_id,
            prev=LogPosition(epoch_at(self.log.history, prev_index), prev_index),
            first_index=prev_index + 1,
            entries_max=count,
            bytes_max=self.limits.batch_bytes_max,
            commit_index=self.commit_index,
            notice=notice,
        )

    def _advance_commit(self) -> None:
        candidate = self.log.durable_index
        if self.mode == Mode.SYNC:
            for host in self.in_sync:
                candidate = min(candidate, self.peers[host].match_index)
        # The commit index never moves back (invariant 4: applied entries stay applied).
        self.commit_index = max(self.commit_index, candidate)


# --- the duplica side ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Append:
    """Append the batch's records; then answer ok with the durable index."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer without appending."""

    # "stale_epoch", "mismatch", or (ReplicaCore) "not_primary": the sender is not the primary
    # the coordinator named for this replica.
    status: str


@dataclass(frozen=True, slots=True)
class AdoptEpoch:
    """A new primary has been promoted: persist this epoch, report it with
    `DuplicaReplication.epoch_persisted`, then feed the event again. The core takes nothing
    of the event before that, so its epoch never runs ahead of the disk."""

    epoch: int


DuplicaAction = Append | Refuse | AdoptEpoch


class DuplicaReplication:
    """Accepts or refuses shipped batches for one replica set on a duplica."""

    def __init__(self, epoch: int, applied_index: int) -> None:
        self.epoch = epoch
        # Up to here our log is known to equal the current primary's: only that part may be
        # applied, since a tail written under an older primary may be truncated yet.
        self.verified_index = applied_index
        self.commit_index = applied_index
        self.last_heard_ms: int | None = None

    def _check_epoch(self, epoch: int) -> list[DuplicaAction] | None:
        """A refusal, or the epoch to persist first; None when the event is at our epoch."""
        if epoch < self.epoch:
            return [Refuse("stale_epoch")]
        if epoch > self.epoch:
            # A new primary: nothing past what we applied is known to match its log. Lowering
            # the verified index only delays applying, so it need not wait for the disk; the
            # epoch itself is ours only once persisted (`epoch_persisted`).
            self.verified_index = min(self.verified_index, self.commit_index)
            return [AdoptEpoch(epoch)]
        return None

    def epoch_persisted(self, epoch: int) -> None:
        """The driver wrote `epoch` (asked for by `AdoptEpoch`) to disk: it is ours now, and
        the event that carried it is to be fed again."""
        if epoch > self.epoch:  # epochs only grow (invariant 1)
            self.epoch = epoch
            self.verified_index = min(self.verified_index, self.commit_index)

    def on_probe(self, epoch: int, now_ms: int) -> list[DuplicaAction]:
        """A probe: answer with our position and history (the agent does that)."""
        checked = self._check_epoch(epoch)
        if checked:
            return checked
        self.last_heard_ms = now_ms
        return []

    def on_truncate(self, epoch: int, after_index: int, now_ms: int) -> list[DuplicaAction]:
        """The primary found our log diverges after `after_index`."""
        checked = self._check_epoch(epoch)
        if checked:
            return checked
        self.last_heard_ms = now_ms
        # In sync mode this never cuts below the commit index (the new primary was in sync);
        # in async mode it may: those are the acknowledged writes async mode can lose, and
        # the agent counts and reports them (invariant 7).
        self.commit_index = min(self.commit_index, after_index)
        self.verified_index = after_index
        return []

    def on_batch(
        self,
        epoch: int,
        prev: LogPosition,
        last_index: int,
        commit_index: int,
        log: LogInfo,
        now_ms: int,
    ) -> list[DuplicaAction]:
        """A batch (or keepalive when last_index == prev.index) arrived."""
        checked = self._check_epoch(epoch)
        if checked:
            return checked
        actions: list[DuplicaAction] = []
        self.last_heard_ms = now_ms
        if (
            prev.index > log.last_index  # a gap: entries before this batch are missing
            or prev.index < log.first_index - 1  # compacted here: cannot verify
            or epoch_at(log.history, prev.index) != prev.epoch  # diverged at prev
            or (last_index > prev.index and prev.index < log.last_index)  # overlap: resync
        ):
            return [Refuse("mismatch")]
        # prev matches our log at prev.index: everything up to it equals the primary's.
        self.verified_index = max(self.verified_index, prev.index)
        if last_index > prev.index:
            assert prev.index == log.last_index
            self.verified_index = last_index
            actions.append(Append())
        self.commit_index = max(self.commit_index, commit_index)
        return actions

    def apply_limit(self, durable_index: int) -> int:
        """How far this duplica may apply: committed, durable, and verified."""
        return min(self.commit_index, durable_index, self.verified_index)
