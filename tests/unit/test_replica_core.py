"""ReplicaCore, driven synchronously over in-memory logs (no asyncio, no files, no clock).

`Node` is a complete driver in a few dozen lines: it carries out the core's actions in order
(docs of `ReplicaCore`), which is what the agent's Replica and the simulation do with I/O.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from demo_services.kv import KvService
from failover import defaults
from failover.core.log_position import LogPosition
from failover.core.replica import (
    APPLY,
    HOLD_RELEASED,
    LINK_UPS,
    Append,
    ArmTimer,
    DropUnlogged,
    EnsureLinks,
    FailWaiters,
    LogBarrier,
    PersistMeta,
    Refuse,
    ReplicaCore,
    ReplicaMeta,
    Truncate,
)
from failover.core.replication import AckView, LogInfo, SendBatch, SendProbe
from failover.core.roles import DUPLICA, PRIMARY
from failover.core.sessions import Reply, encode_request_id
from failover.core.state_machine import ReplicatedStateMachine
from failover.errors import (
    DiskFullError,
    NotPrimaryError,
    Overloaded,
    ReplicaBrokenError,
    SessionExpired,
    ShippedRecordsCorruptError,
    StaleEpochError,
    Unavailable,
)


def put(key: str) -> bytes:
    return msgpack.packb({"op": "put", "key": key, "value": "v"})


class Node:
    """A replica: a ReplicaCore, a log as a list of (epoch, index, request id, payload), and
    the futures' stand-ins (`answers`: index -> reply or error)."""

    def __init__(self, role: str = DUPLICA, epoch: int = 1, mode: str = "sync",
                 coordinated: bool = False) -> None:
        self.meta_on_disk = ReplicaMeta("svc", "kv", role, epoch, mode)
        self.core = ReplicaCore(self.meta_on_disk, ReplicatedStateMachine(KvService()),
                                coordinated=coordinated)
        self.log: list[tuple[int, int, bytes, bytes]] = []
        self.queued: list[tuple[int, int, bytes, bytes]] = []
        self.waiting: set[int] = set()
        self.answers: dict[int, Any] = {}
        self.sent: list[Any] = []
        self.timers: list[ArmTimer] = []
        self.links_up: set[str] = set()
        self.meta_fails = False
        self.now = 0
        self.run(self.core.open(self.info(), self.now))

    def info(self) -> LogInfo:
        history: list[tuple[int, int]] = []
        for epoch, index, _, _ in self.log:
            if not history or history[-1][0] != epoch:
                history.append((epoch, index))
        last = self.log[-1][1] if self.log else 0
        return LogInfo(1, last, last, tuple(history))

    def run(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, PersistMeta):
                if self.meta_fails and action.required:
                    raise OSError("disk full")
                if not self.meta_fails:
                    self.meta_on_disk = action.meta
                self.run(self.core.meta_persisted(action, self.now))
            elif isinstance(action, LogBarrier):
                self.queued.append((action.epoch, action.index, b"", b""))
            elif isinstance(action, FailWaiters):
                for index in [i for i in self.waiting if i >= action.from_index]:
                    self.waiting.discard(index)
                    self.answers[index] = action.error
            elif isinstance(action, DropUnlogged):
                self.queued = [e for e in self.queued if e[1] < action.from_index]
            elif action is APPLY:
                self.apply()
            elif action is LINK_UPS:
                for host in self.core.peers:
                    if host in self.links_up:
                        self.run(self.core.link_up(host, self.now))
            elif isinstance(action, ArmTimer):
                self.timers.append(action)
            elif isinstance(action, SendBatch) and action.entries_max:
                last = min(self.log[-1][1], action.first_index + action.entries_max - 1)
                self.sent.append(action)
                self.run(self.core.batch_read(action.host_id, action.batch_id, last))
            elif isinstance(action, (SendBatch, SendProbe, EnsureLinks)) or (
                    action is HOLD_RELEASED):
                self.sent.append(action)
            else:
                raise AssertionError(f"unexpected {action!r}")

    def flush(self) -> None:
        """The log writer: appends whatever is queued (group commit)."""
        batch, self.queued = self.queued, []
        if batch:
            self.core.append_started(batch[-1][1])
            self.log.extend(batch)
            self.run(self.core.appended(self.info()))

    def apply(self) -> None:
        limit = self.core.apply_limit(self.info().durable_index)
        sm = self.core.sm
        if sm.applied_index >= limit:
            return
        first = sm.applied_index + 1
        entries = [e for e in self.log if first <= e[1] <= limit]
        for entry, reply in zip(entries, sm.apply_many(entries), strict=True):
            if entry[1] in self.waiting:
                self.waiting.discard(entry[1])
                self.answers[entry[1]] = reply
        self.core.applied(first, limit)

    def write(self, client: str, seq: int, payload: bytes) -> Reply | int:
        self.core.check_primary(0)
        self.core.admit_bytes(len(payload))
        got = self.core.write(client, seq, True, len(payload))
        if isinstance(got, Reply):
            self.core.release_bytes(len(payload))
            return got
        index, new = got
        if new:
            self.queued.append((self.core.epoch, index,
                                encode_request_id(client, seq, True), payload))
            self.waiting.add(index)
        else:
            self.core.release_bytes(len(payload))
        return index

    def assign(self, role: str, epoch: int, duplicas: dict[str, str] | None = None,
               in_sync: set[str] | None = None) -> None:
        duplicas = duplicas or {}
        self.run([self.core.assign(role, epoch, "sync", None, duplicas,
                                   in_sync if in_sync is not None else set(duplicas))])


def catch_up(node: Node, host: str) -> None:
    """Brings the stream to `host` up and has it answer every batch with the whole log."""
    if host not in node.links_up:
        node.links_up.add(host)
        node.run(node.core.link_up(host, node.now))
        node.run(node.core.on_ack(host, AckView("mismatch", node.core.epoch), node.now))
    last = node.log[-1][1] if node.log else 0
    batches = [a for a in node.sent if isinstance(a, SendBatch) and a.host_id == host]
    node.run(node.core.on_ack(host, AckView("ok", node.core.epoch, batches[-1].batch_id,
                                            durable_index=last), node.now))


def primary_alone() -> Node:
    node = Node()
    node.assign(PRIMARY, 1)
    node.flush()
    return node


def test_an_assignment_is_taken_only_once_its_meta_is_persisted() -> None:
    node = Node()
    persist = node.core.assign(PRIMARY, 2, "sync", None, {}, set())
    assert isinstance(persist, PersistMeta) and persist.required
    assert node.core.role == DUPLICA and node.core.epoch == 1  # nothing taken yet
    actions = node.core.meta_persisted(persist, 0)
    assert node.core.role == PRIMARY and node.core.epoch == 2
    # The new epoch opens with an empty entry, and reads wait for it (invariants 1, 10).
    assert LogBarrier(2, 1) in actions and node.core.read_floor == 1


def test_an_older_assignment_is_refused() -> None:
    node = Node(epoch=3)
    with pytest.raises(StaleEpochError):
        node.core.assign(PRIMARY, 2, "sync", None, {}, set())


def test_a_retry_in_flight_shares_the_entry_and_a_retry_after_gets_the_recorded_reply() -> None:
    node = primary_alone()
    first = node.write("c", 1, put("a"))
    assert node.write("c", 1, put("a")) == first  # in flight: the same entry
    assert node.core.pending_bytes == len(put("a"))
    node.flush()
    reply = node.answers[first]
    assert isinstance(reply, Reply) and reply.index == first
    assert node.write("c", 1, put("a")) == reply  # answered: the recorded reply
    assert node.core.pending_bytes == 0 and len(node.log) == 2  # barrier + one write


def test_writes_past_the_byte_bound_are_refused_before_they_are_logged() -> None:
    node = primary_alone()
    node.core.admit_bytes(defaults.PENDING_REQUEST_BYTES_MAX)
    with pytest.raises(Overloaded):
        node.core.admit_bytes(1)
    node.core.release_bytes(defaults.PENDING_REQUEST_BYTES_MAX)
    node.core.admit_bytes(1)


def test_a_request_older_than_the_retry_window_is_refused() -> None:
    node = primary_alone()
    for seq in range(1, defaults.SESSION_REPLIES_PER_CLIENT_MAX + 2):
        node.write("c", seq, put(f"k{seq}"))
        node.flush()
    # Its outcome can no longer be told: not InvalidRequest ("state untouched"), since an
    # earlier attempt may have been applied.
    with pytest.raises(SessionExpired, match="older than the retry window"):
        node.core.write("c", 1, True, 1)


def test_a_step_down_fails_waiters_and_drops_what_never_reached_the_log() -> None:
    node = primary_alone()
    logged = node.write("c", 1, put("a"))
    node.flush()  # applied alone (no in-sync duplica)
    queued = node.write("c", 2, put("b"))
    assert node.queued and node.core.next_index == queued + 1
    node.run([node.core.step_down(2, "test")])
    assert isinstance(node.answers[queued], Unavailable)
    assert not node.queued  # invariant 4: never applied, the new primary's entry will be
    assert node.core.next_index == node.log[-1][1] + 1 == queued
    assert node.core.pending_bytes == 0 and node.core.role == DUPLICA
    assert isinstance(node.answers[logged], Reply)


def test_a_failed_append_refuses_its_writes_and_reuses_their_indexes() -> None:
    node = primary_alone()
    index = node.write("c", 1, put("a"))
    node.core.append_started(index)
    actions = node.core.append_failed(index, OSError("io"), node.info())
    assert actions[0] == FailWaiters(actions[0].error, index)
    assert isinstance(actions[0].error, Unavailable)
    assert DropUnlogged(index) in actions
    assert node.core.next_index == index and node.core.pending_bytes == 0


def test_reads_wait_for_the_read_floor() -> None:
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.flush()
    assert not node.core.read_ready()  # the barrier is not committed: b has not acked
    catch_up(node, "b")
    assert node.core.read_ready()


def test_a_lease_ends_a_drift_margin_early_and_only_at_its_epoch() -> None:
    node = primary_alone()
    node.core.grant_lease(1, 1000, sent_ms=500)
    assert node.core.lease_expiry_ms == 1500 - defaults.LEASE_DRIFT_MARGIN_MS
    assert node.core.lease_valid(1500 - defaults.LEASE_DRIFT_MARGIN_MS - 1)
    assert not node.core.lease_valid(1500 - defaults.LEASE_DRIFT_MARGIN_MS)
    node.core.grant_lease(2, 5000, sent_ms=500)  # not our epoch
    assert node.core.lease_expiry_ms == 1500 - defaults.LEASE_DRIFT_MARGIN_MS


def test_a_restarted_primary_serves_nothing_until_the_coordinator_confirms_it() -> None:
    node = Node(role=PRIMARY, coordinated=True)
    with pytest.raises(Unavailable):
        node.core.check_primary(0)
    node.core.grant_lease(1, 1000, 0)
    node.core.check_primary(0)
    with pytest.raises(NotPrimaryError):
        node.core.check_primary(2)  # the client saw a newer epoch


def test_a_switchover_holds_until_the_target_caught_up_then_until_its_deadline() -> None:
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.flush()
    node.core.prepare_switchover(1, "b", "s1")
    assert node.core.holding
    with pytest.raises(Unavailable):
        node.core.prepare_switchover(1, "b", "s2")  # one switchover at a time
    assert node.core.switchover_ready("b", "s1") is None
    catch_up(node, "b")
    assert node.core.switchover_ready("b", "s1") == (1, 1)
    timer = node.core.switchover_prepared(100)[0]
    assert timer == ArmTimer(100 + defaults.SWITCHOVER_TIMEOUT_MS, timer.token)
    assert node.core.timer(timer.token + 1, 0) == []  # another hold's timer
    assert HOLD_RELEASED not in node.core.tick(timer.at_ms - 1) and node.core.holding
    assert HOLD_RELEASED in node.core.tick(timer.at_ms)
    assert not node.core.holding


def test_a_call_of_a_switchover_whose_hold_ended_is_never_answered_ready() -> None:
    """A prepare asked again (the coordinator's PREPARE_RESEND_MS) waits beside the first
    call. When the first gives up at its deadline, the hold ends and writes flow: the other
    call must not then answer ready (the coordinator would promote the target while this
    primary serves), nor release a hold that a later switchover took meanwhile."""
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.flush()
    node.core.prepare_switchover(1, "b", "s1", now_ms=0)
    node.core.prepare_switchover(1, "b", "s1", now_ms=500)  # asked again: joins the hold
    node.run(node.core.prepare_failed("s1", now_ms=5000))  # the first call's deadline
    assert not node.core.holding
    catch_up(node, "b")
    with pytest.raises(Unavailable, match="hold of switchover 's1' ended"):
        node.core.switchover_ready("b", "s1")
    # Later, another switchover holds; the late call of s1 ending releases nothing of it.
    node.core.prepare_switchover(1, "b", "s2", now_ms=20_000)
    assert node.core.prepare_failed("s1", now_ms=20_001) == []
    assert node.core.holding and node.core.hold_id == "s2"
    with pytest.raises(Unavailable):
        node.core.switchover_ready("b", "s1")
    assert node.core.switchover_ready("b", "s2") == (1, 1)


def test_a_call_that_fails_after_another_call_of_its_switchover_was_ready_keeps_the_hold(
) -> None:
    """Two calls of one switchover wait (the prepare was asked again); one answers ready and
    the coordinator promotes the target on it, then the other fails (its caller cancelled
    it as the operation ended, or its deadline). The hold must last: writes and reads
    resumed here could miss what the new primary acknowledges."""
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.flush()
    node.core.prepare_switchover(1, "b", "s1", now_ms=0)
    node.core.prepare_switchover(1, "b", "s1", now_ms=500)  # asked again: joins the hold
    catch_up(node, "b")
    assert node.core.switchover_ready("b", "s1") == (1, 1)
    node.run(node.core.switchover_prepared(now_ms=600))  # the first call answers ready
    assert node.core.prepare_failed("s1", now_ms=700) == []  # the other call ends
    assert node.core.holding and node.core.hold_id == "s1"
    # It ends at its deadline, as a prepared hold whose coordinator went silent does.
    node.run(node.core.tick(600 + defaults.SWITCHOVER_TIMEOUT_MS))
    assert not node.core.holding


def test_a_release_for_another_switchover_changes_nothing() -> None:
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.core.prepare_switchover(1, "b", "s1")
    assert node.core.release_switchover(1, "other") is None
    assert node.core.release_switchover(2, "s1") is None
    assert node.core.release_switchover(1, "s1") == [HOLD_RELEASED]


def test_a_newer_epoch_is_persisted_before_the_batch_is_taken() -> None:
    node = Node()
    empty = LogPosition(0, 0)
    actions = node.core.on_batch(2, empty, 1, 0, node.info(), 0)
    assert [type(a) for a in actions] == [PersistMeta]
    assert actions[0].reason == "adopt_epoch" and node.core.epoch == 1
    node.run(actions)
    assert node.core.epoch == 2 and node.meta_on_disk.epoch == 2
    assert node.core.on_batch(2, empty, 1, 0, node.info(), 0) == [Append()]


def test_a_primary_refuses_a_batch_of_its_own_epoch_and_steps_down_for_a_newer_one() -> None:
    node = primary_alone()
    empty = LogPosition(0, 0)
    assert node.core.on_batch(1, empty, 0, 0, node.info(), 0) == [Refuse("stale_epoch")]
    actions = node.core.on_batch(2, empty, 0, 0, node.info(), 0)
    assert actions[0].reason == "step_down" and not actions[0].required
    node.run(actions)
    assert node.core.role == DUPLICA and node.core.epoch == 2


def test_truncation_rewinds_only_what_was_applied_and_never_cuts_sync_commits() -> None:
    node = Node(mode="async")
    node.log = [(1, i, b"", b"") for i in range(1, 4)]
    node.core.set_log(node.info())
    node.core.on_batch(1, LogPosition(1, 3), 3, 3, node.info(), 0)
    node.core.batch_appended(node.info())
    node.apply()
    assert node.core.sm.applied_index == 3
    assert node.core.on_truncate(1, 2, 0) == [Truncate(2, rewind=True)]
    sync = Node()
    sync.core.on_batch(1, LogPosition(0, 0), 0, 5, sync.info(), 0)
    with pytest.raises(AssertionError):
        sync.core.on_truncate(1, 2, 0)  # sync mode: 5 was committed


def test_a_broken_replica_fails_its_waiters_and_vouches_for_nothing() -> None:
    node = primary_alone()
    index = node.write("c", 1, put("a"))
    node.run(node.core.mark_broken("bad disk"))
    assert isinstance(node.answers[index], ReplicaBrokenError)
    status = node.core.status(durable_index=5, now_ms=0)
    assert status["broken"] and status["durable_index"] == 0 and status["matched_index"] == 0
    assert node.core.apply_limit(5) == node.core.sm.applied_index
    with pytest.raises(ReplicaBrokenError):
        node.core.check_primary(0)


def test_applying_is_held_during_a_migration_cut() -> None:
    node = primary_alone()
    node.core.apply_held = True
    node.write("c", 1, put("a"))
    node.flush()
    assert node.core.sm.applied_index == 1  # the barrier only
    node.core.apply_held = False
    node.apply()
    assert node.core.sm.applied_index == 2


def test_a_duplica_applies_only_what_the_new_primary_verified() -> None:
    node = Node()
    node.log = [(1, i, b"", b"") for i in range(1, 6)]
    node.core.batch_appended(node.info())
    assert node.core.on_batch(1, LogPosition(1, 5), 5, 5, node.info(), 0) == []
    assert node.core.apply_limit(5) == 5
    # A newer primary: nothing past what was applied is verified until its log confirms it.
    node2 = Node()
    node2.log = list(node.log)
    node2.core.batch_appended(node2.info())
    node2.run(node2.core.on_batch(2, LogPosition(0, 0), 0, 0, node2.info(), 0)[:1])
    assert node2.core.apply_limit(5) == 0


def test_an_epoch_that_cannot_be_recorded_refuses_the_item_and_is_not_taken() -> None:
    node = Node()
    persist = node.core.on_probe(2, 0)[0]
    assert isinstance(persist, PersistMeta) and persist.reason == "adopt_epoch"
    refusal = node.core.meta_write_failed(persist, DiskFullError("full"), 0)
    assert refusal == [Refuse("storage_error")] and node.core.epoch == 1
    assert node.core.duplica is not None and node.core.duplica.epoch == 1
    assert node.core.last_error == "full"


def test_a_step_down_is_taken_without_space_to_record_it_but_an_assignment_is_not() -> None:
    node = primary_alone()
    assign = node.core.assign(PRIMARY, 2, "sync", None, {}, set())
    with pytest.raises(DiskFullError):
        node.core.meta_write_failed(assign, DiskFullError("full"), 0)
    assert node.core.epoch == 1
    step_down = node.core.step_down(3, "test")
    assert step_down is not None
    node.run(node.core.meta_write_failed(step_down, DiskFullError("full"), 0))
    assert node.core.role == DUPLICA and node.core.epoch == 3


def test_a_shipped_batch_that_cannot_be_appended_is_refused_by_cause() -> None:
    node = Node()
    corrupt = ShippedRecordsCorruptError(0, "bad crc")
    assert node.core.batch_append_failed(corrupt) == Refuse("corrupt")
    assert not node.core.disk_full
    assert node.core.batch_append_failed(DiskFullError("full")) == Refuse("storage_error")
    assert node.core.disk_full and node.core.status(0, 0)["disk_full"]


def test_epoch_confirmation_needs_the_in_sync_duplica_and_ends_with_the_role() -> None:
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.flush()
    catch_up(node, "b")
    actions, token = node.core.confirm(10)
    node.run(actions)
    assert not node.core.confirmed(token)  # b has not answered a batch sent after the read
    catch_up(node, "b")
    assert node.core.confirmed(token)
    _, token = node.core.confirm(20)
    node.run([node.core.step_down(2, "test")])
    with pytest.raises(NotPrimaryError):
        node.core.confirmed(token)


def test_writes_past_the_count_bound_are_refused_before_they_are_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = primary_alone()
    monkeypatch.setattr(defaults, "PENDING_REQUESTS_MAX", 2)
    node.write("c", 1, put("a"))
    node.write("c", 2, put("b"))
    assert node.write("c", 2, put("b")) == 3  # a retry in flight shares its entry
    with pytest.raises(Overloaded):
        node.core.write("c", 3, True, 1)
    node.flush()
    assert node.write("c", 3, put("c")) == 4  # answered writes make room


def test_a_late_truncate_from_a_deposed_primary_is_refused_as_stale_not_asserted() -> None:
    """Found by the simulation (long/14, sync mode): a SendTruncate of the epoch-2 primary
    arrived on its own stream after this duplica adopted epoch 3 and heard commit 13 from
    the new primary; the sync-mode floor was asserted before the epoch was checked, so a
    stale message raised AssertionError on the receive path instead of being refused."""
    node = Node(epoch=2)
    empty = LogPosition(0, 0)
    node.run(node.core.on_batch(3, empty, 0, 13, node.info(), 0))  # adopts epoch 3
    assert node.core.epoch == 3
    node.core.on_batch(3, empty, 0, 13, node.info(), 0)  # told commit 13 by the new primary
    assert node.core.on_truncate(2, 9, 0) == [Refuse("stale_epoch")]


def test_write_many_decides_each_write_of_a_message_and_gives_their_indexes_in_a_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream message's writes (issue 16): new ones get consecutive indexes (one append),
    a request id twice shares one entry, a recorded one gets its reply, and a write past a
    bound is refused on its own, its bytes given back, while the rest go on."""
    node = primary_alone()
    answered = node.write("c", 1, put("a"))
    node.flush()
    monkeypatch.setattr(defaults, "PENDING_REQUESTS_MAX", 3)
    size = len(put("x"))
    decided = node.core.write_many([
        ("c", 1, False, size),  # applied before: its recorded reply
        ("c", 2, False, size), ("c", 3, False, size),
        ("c", 2, False, size),  # the same id again in one message: the same entry
        ("c", 4, False, size), ("c", 5, False, size),  # past PENDING_REQUESTS_MAX
        ("c", 6, False, defaults.PENDING_REQUEST_BYTES_MAX),  # past the byte bound
    ])
    recorded = decided[0]
    assert isinstance(recorded, Reply) and recorded.index == answered
    first = answered + 1
    assert decided[1:5] == [(first, True), (first + 1, True), (first, False),
                            (first + 2, True)]
    assert isinstance(decided[5], Overloaded) and "pending_requests_max" in str(decided[5])
    assert isinstance(decided[6], Overloaded) and "pending_request_bytes_max" in str(decided[6])
    assert node.core.pending_bytes == 3 * size  # only the three new entries hold bytes
    assert node.core.next_index == first + 3


def test_a_primary_ships_what_it_wrote_before_its_own_fsync_but_commits_after_it() -> None:
    """Issue 16: `written` (before the primary's fsync) ships the entries, so the duplica's
    fsync overlaps the primary's; the commit still waits for the primary's own durability
    (`appended`), whatever the duplica acks."""
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.flush()
    catch_up(node, "b")
    index = node.write("c", 1, put("a"))
    batch, node.queued = node.queued, []
    node.core.append_started(index)
    node.log.extend(batch)
    last = node.log[-1][1]
    written = LogInfo(1, last, last - 1, node.info().history)  # not durable here yet
    node.sent.clear()
    node.run(node.core.written(written))
    shipped = [a for a in node.sent if isinstance(a, SendBatch) and a.entries_max]
    assert shipped and shipped[0].first_index == index
    node.run(node.core.on_ack("b", AckView("ok", 1, shipped[-1].batch_id,
                                           durable_index=index), node.now))
    assert node.core.commit_index == index - 1 and index not in node.answers
    node.run(node.core.appended(node.info()))  # now durable here too
    assert node.core.commit_index == index and isinstance(node.answers[index], Reply)
