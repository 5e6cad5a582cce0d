"""The shipping protocol cores, driven over in-memory logs (no I/O, deterministic)."""

from __future__ import annotations

import random
from collections.abc import Callable

from failover import defaults
from failover.core.log_position import LogPosition
from failover.core.replication import (
    AckView,
    AdoptEpoch,
    Append,
    DuplicaReplication,
    LogInfo,
    Mode,
    PrimaryReplication,
    Refuse,
    SendBatch,
    SendProbe,
    SendSnapshot,
    SendTruncate,
    ShipLimits,
    StepDown,
)


def feed(d: DuplicaReplication, event: Callable[[], list]) -> list:
    """Feeds an event to a duplica core as the agent does: a newer epoch is persisted (here,
    at once), reported with `epoch_persisted`, and the event fed again."""
    out = event()
    if out and isinstance(out[0], AdoptEpoch):
        d.epoch_persisted(out[0].epoch)
        out = event()
    return out


class MemLog:
    """A log as a list of entry epochs; entry i (1-based) has epochs[i - 1 - base]."""

    def __init__(self, epochs: list[int] | None = None) -> None:
        self.base = 0  # compacted up to here
        self.base_epoch = 0
        self.epochs: list[int] = list(epochs or [])

    @property
    def last(self) -> int:
        return self.base + len(self.epochs)

    def history(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = [(self.base_epoch, self.base)] if self.base else []
        for i, e in enumerate(self.epochs, start=self.base + 1):
            if not out or out[-1][0] != e:
                out.append((e, i))
        return out

    def info(self) -> LogInfo:
        return LogInfo(self.base + 1, self.last, self.last, self.history())

    def epoch_of(self, index: int) -> int:
        return self.epochs[index - self.base - 1]


class Cluster:
    """One primary core, several duplica cores, messages delivered in order."""

    def __init__(self, mode: Mode = Mode.SYNC, limits: ShipLimits | None = None) -> None:
        self.plog = MemLog()
        self.epoch = 1
        self.dlogs: dict[str, MemLog] = {"b": MemLog(), "c": MemLog()}
        self.dups = {h: DuplicaReplication(epoch=1, applied_index=0) for h in self.dlogs}
        self.primary = PrimaryReplication(1, mode, ["b", "c"], {"b", "c"}, self.plog.info(),
                                          limits or ShipLimits())
        self.now = 0
        self.max_inflight = 0
        self.truncated: dict[str, int] = {}
        self.read_max = 1 << 30  # entries the agent's read returns (bytes_max cuts it short)

    def write(self, n: int) -> None:
        self.plog.epochs.extend([self.epoch] * n)
        self.run(self.primary.log_changed(self.plog.info()))

    def run(self, actions: list) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            queue.extend(self.deliver(action))

    def deliver(self, action) -> list:
        p = self.primary
        if isinstance(action, SendProbe):
            log = self.dlogs[action.host_id]
            d = self.dups[action.host_id]
            out = feed(d, lambda: d.on_probe(self.epoch, self.now))
            if out and isinstance(out[0], Refuse):
                return p.ack(action.host_id, AckView("stale_epoch", d.epoch), self.now)
            pos = LogPosition(log.history()[-1][0] if log.last else 0, log.last)
            return p.ack(action.host_id, AckView("mismatch", d.epoch, last=pos,
                                                 history=log.history()), self.now)
        if isinstance(action, SendTruncate):
            log = self.dlogs[action.host_id]
            dropped = log.last - action.after_index
            del log.epochs[action.after_index - log.base:]
            self.truncated[action.host_id] = dropped
            d = self.dups[action.host_id]
            feed(d, lambda: d.on_truncate(self.epoch, action.after_index, self.now))
            pos = LogPosition(log.epoch_of(log.last) if log.last > log.base else 0, log.last)
            return p.ack(action.host_id, AckView("ok", self.epoch, last=pos,
                                                 truncated_entries=dropped), self.now)
        if isinstance(action, SendBatch):
            last = min(self.plog.last, action.first_index + action.entries_max - 1,
                       action.first_index + self.read_max - 1)
            following = p.batch_read(action.host_id, action.batch_id, last)
            self.max_inflight = max(self.max_inflight, len(p.peers[action.host_id].inflight))
            # The window's next batch goes out right behind this one.
            return following + self._deliver_batch(action, last)
        if isinstance(action, SendSnapshot):
            log = self.dlogs[action.host_id]
            log.epochs, log.base = [], self.plog.last
            log.base_epoch = self.plog.epoch_of(self.plog.last)
            return p.snapshot_installed(action.host_id, self.plog.last)
        raise AssertionError(action)

    def _deliver_batch(self, action: SendBatch, last: int) -> list:
        p = self.primary
        log = self.dlogs[action.host_id]
        d = self.dups[action.host_id]
        out = feed(d, lambda: d.on_batch(self.epoch, action.prev, last, action.commit_index,
                                         log.info(), self.now))
        if any(isinstance(a, Refuse) for a in out):
            status = next(a.status for a in out if isinstance(a, Refuse))
            pos = LogPosition(log.epoch_of(log.last) if log.last > log.base else 0, log.last)
            return p.ack(action.host_id, AckView(status, d.epoch, action.batch_id, log.last,
                                                 last=pos, history=log.history()), self.now)
        if any(isinstance(a, Append) for a in out):
            for i in range(action.first_index, last + 1):
                log.epochs.append(self.plog.epoch_of(i))
        return p.ack(action.host_id, AckView("ok", d.epoch, action.batch_id, log.last),
                     self.now)


def test_batches_cut_short_by_bytes_are_followed_by_the_rest_in_order() -> None:
    # Large entries: the agent's read stops at bytes_max after 3 of the 8 entries asked for.
    # Each next batch must start right after what was read, with the window still filled.
    c = Cluster(limits=ShipLimits(batch_entries_max=8, inflight_batches_max=4))
    c.read_max = 3
    c.run(c.primary.link_up("b", 0) + c.primary.link_up("c", 0))
    c.write(100)
    assert c.primary.commit_index == 100
    assert c.dlogs["b"].epochs == c.plog.epochs == c.dlogs["c"].epochs
    # Pipelined: the next batch leaves before the last one is answered.
    assert c.max_inflight >= 2


def test_streams_and_commits_on_every_in_sync_duplica() -> None:
    c = Cluster(limits=ShipLimits(batch_entries_max=7, inflight_batches_max=3))
    c.run(c.primary.link_up("b", 0) + c.primary.link_up("c", 0))
    c.write(100)
    assert c.primary.commit_index == 100
    assert c.dlogs["b"].epochs == c.plog.epochs == c.dlogs["c"].epochs
    assert 1 <= c.max_inflight <= 3
    # The duplicas learn the commit index and may apply up to it.
    assert c.dups["b"].apply_limit(c.dlogs["b"].last) == 100


def test_sync_commit_waits_for_a_silent_in_sync_duplica() -> None:
    c = Cluster()
    c.run(c.primary.link_up("b", 0))  # c's stream never comes up
    c.write(10)
    assert c.primary.commit_index == 0
    c.run(c.primary.set_members(["b", "c"], {"b"}))  # the coordinator drops c from in-sync
    assert c.primary.commit_index == 10


def test_async_commit_needs_only_the_primary() -> None:
    c = Cluster(mode=Mode.ASYNC)
    c.write(5)
    assert c.primary.commit_index == 5


def test_diverged_duplica_truncates_and_reports_the_count() -> None:
    c = Cluster()
    c.plog.epochs = [1, 1, 1, 3, 3]
    c.epoch = 3
    c.dlogs["b"].epochs = [1, 1, 1, 2, 2, 2]  # written by the fenced epoch-2 primary
    c.dups["b"] = DuplicaReplication(epoch=2, applied_index=3)
    c.dups["b"].commit_index = 3
    c.primary = PrimaryReplication(3, Mode.SYNC, ["b"], {"b"}, c.plog.info(), commit_index=3)
    c.run(c.primary.link_up("b", 0))
    assert c.truncated["b"] == 3
    assert c.dlogs["b"].epochs == [1, 1, 1, 3, 3]
    assert c.primary.commit_index == 5


def test_stale_epoch_batch_is_refused_and_fences_the_sender() -> None:
    d = DuplicaReplication(epoch=5, applied_index=0)
    out = d.on_batch(4, LogPosition(0, 0), 3, 0, MemLog().info(), 0)
    assert out == [Refuse("stale_epoch")]
    p = PrimaryReplication(4, Mode.SYNC, ["b"], {"b"}, MemLog().info())
    assert p.ack("b", AckView("stale_epoch", 5), 0) == [StepDown(5)]
    assert p.fenced


def test_higher_epoch_is_adopted_before_anything_else() -> None:
    d = DuplicaReplication(epoch=1, applied_index=0)
    out = d.on_batch(2, LogPosition(0, 0), 2, 0, MemLog().info(), 0)
    # Nothing of the batch is taken before the epoch is on disk.
    assert out == [AdoptEpoch(2)]
    d.epoch_persisted(2)
    assert d.on_batch(2, LogPosition(0, 0), 2, 0, MemLog().info(), 0) == [Append()]


def test_a_newer_epoch_is_not_taken_until_it_is_persisted() -> None:
    # Issue 11 item 9: the agent's write of the epoch may fail (disk full). Until the driver
    # reports it persisted, the core stays at the epoch on disk and takes nothing of the
    # event, so the next event asks again for the epoch to be written.
    d = DuplicaReplication(epoch=1, applied_index=0)
    events = [lambda: d.on_probe(2, 5), lambda: d.on_truncate(2, 0, 5),
              lambda: d.on_batch(2, LogPosition(0, 0), 2, 3, MemLog().info(), 5)]
    for event in events * 2:
        assert event() == [AdoptEpoch(2)]
        assert (d.epoch, d.last_heard_ms, d.commit_index) == (1, None, 0)
    d.epoch_persisted(2)
    assert d.epoch == 2
    assert d.on_probe(2, 6) == [] and d.last_heard_ms == 6
    assert d.on_probe(1, 7) == [Refuse("stale_epoch")]
    d.epoch_persisted(1)  # a late report of an older write never lowers the epoch
    assert d.epoch == 2


def test_unverified_tail_is_not_applied_after_a_new_epoch() -> None:
    log = MemLog([1, 1, 1, 1])
    d = DuplicaReplication(epoch=1, applied_index=0)
    d.on_batch(1, LogPosition(0, 0), 4, 2, MemLog().info(), 0)
    assert d.apply_limit(log.last) == 2
    d.on_probe(2, 1)  # a new primary: entries 3..4 may be truncated by it
    d.commit_index = 4
    assert d.apply_limit(log.last) == 2


def test_compacted_log_sends_a_snapshot_then_streams() -> None:
    c = Cluster()
    c.plog.epochs = [1] * 50
    c.plog.epochs, c.plog.base, c.plog.base_epoch = [1] * 10, 40, 1  # compacted to 40
    c.primary = PrimaryReplication(1, Mode.SYNC, ["b"], {"b"}, c.plog.info())
    actions = c.primary.link_up("b", 0)
    first = c.deliver(actions[0])
    assert isinstance(first[0], SendSnapshot)
    c.run(first)
    c.write(5)
    assert c.dlogs["b"].last == 55 and c.primary.commit_index == 55


def test_random_interleavings_converge() -> None:
    for seed in range(50):
        rnd = random.Random(seed)
        c = Cluster(limits=ShipLimits(batch_entries_max=rnd.randint(1, 9),
                                      inflight_batches_max=rnd.randint(1, 4)))
        c.run(c.primary.link_up("b", 0) + c.primary.link_up("c", 0))
        for _ in range(20):
            c.write(rnd.randint(0, 15))
            if rnd.random() < 0.3:
                host = rnd.choice(["b", "c"])
                c.primary.link_down(host)
                c.run(c.primary.link_up(host, 0))
        assert c.dlogs["b"].epochs == c.plog.epochs == c.dlogs["c"].epochs, seed
        assert c.primary.commit_index == c.plog.last, seed


def test_epoch_confirmation_needs_an_answer_to_a_batch_sent_after_the_read() -> None:
    c = Cluster()
    c.run(c.primary.link_up("b", 0) + c.primary.link_up("c", 0))
    c.write(3)
    actions, token = c.primary.confirm(10)
    assert not c.primary.confirmed(token)
    assert {a.host_id for a in actions} == {"b", "c"} and all(a.entries_max == 0 for a in actions)
    c.run(actions)
    assert c.primary.confirmed(token)


def test_only_a_commit_notice_to_an_idle_duplica_may_wait_for_the_links_next_message(
) -> None:
    """`SendBatch.notice` lets the agent's link hold an empty batch for its next message
    (`failover.agent.links`): only the one that tells an idle duplica the commit moved. A
    keepalive whose answer confirms the epoch, the periodic keepalive (liveness) and the
    batches of entries go at once."""
    c = Cluster()
    sent: list[SendBatch] = []
    deliver = c.deliver

    def counting(action):  # type: ignore[no-untyped-def]
        if isinstance(action, SendBatch):
            sent.append(action)
        return deliver(action)

    c.deliver = counting  # type: ignore[method-assign]
    c.run(c.primary.link_up("b", 0) + c.primary.link_up("c", 0))
    sent.clear()
    c.write(3)
    entries = [b for b in sent if b.entries_max]
    notices = [b for b in sent if not b.entries_max]
    assert entries and not any(b.notice for b in entries)
    # The last answer moved the commit: that idle duplica is told, as a notice.
    assert [(b.host_id, b.commit_index, b.notice) for b in notices] == [("c", 3, True)]
    actions, _token = c.primary.confirm(10)
    assert actions and not any(a.notice for a in actions)
    ticked = c.primary.tick(10 * defaults.HEARTBEAT_MS)
    assert ticked and not any(a.notice for a in ticked)


def test_epoch_confirmation_fails_once_a_duplica_holds_a_newer_epoch() -> None:
    c = Cluster()
    c.run(c.primary.link_up("b", 0) + c.primary.link_up("c", 0))
    c.write(3)
    c.dups["b"].epoch = 2  # b follows a newer primary now
    actions, token = c.primary.confirm(10)
    for action in actions:
        if action.host_id == "b":
            d = c.dups["b"]
            out = d.on_batch(1, action.prev, action.first_index - 1, 0, c.dlogs["b"].info(), 0)
            assert out == [Refuse("stale_epoch")]
            assert c.primary.ack("b", AckView("stale_epoch", 2, action.batch_id), 0) == [
                StepDown(2)]
    assert not c.primary.confirmed(token)


def test_a_streaming_duplica_behind_a_compaction_gets_a_snapshot_not_a_batch_of_gone_entries(
) -> None:
    """Found by the simulation (short/45, async mode): the primary compacted its log while an
    out-of-sync duplica streamed behind the new first index; the next ack pumped a SendBatch
    of entries that were gone (the agent's log read raised LogGapError) and the duplica never
    got a snapshot."""
    c = Cluster(Mode.ASYNC, ShipLimits(batch_entries_max=2, inflight_batches_max=1))
    c.primary = PrimaryReplication(1, Mode.ASYNC, ["b"], set(), c.plog.info(),
                                   ShipLimits(batch_entries_max=2, inflight_batches_max=1))
    c.run(c.primary.link_up("b", 0))
    c.plog.epochs.extend([1] * 10)
    sent = c.primary.log_changed(c.plog.info())  # a window of one 2-entry batch: 1..2
    assert [type(a) for a in sent] == [SendBatch] and sent[0].first_index == 1
    following = c.primary.batch_read("b", sent[0].batch_id, 2)
    assert following == []  # the window is full
    # The primary snapshots at 8 and compacts its log up to 6 while batch 1..2 is in flight.
    c.plog.epochs, c.plog.base, c.plog.base_epoch = c.plog.epochs[6:], 6, 1
    actions = c.primary.log_changed(c.plog.info())
    c.dlogs["b"].epochs.extend([1, 1])  # the duplica took batch 1..2
    actions += c.primary.ack("b", AckView("ok", 1, sent[0].batch_id, 2), 0)
    gone = [a for a in actions if isinstance(a, SendBatch) and a.first_index <= 6]
    assert not gone, gone
    assert [type(a) for a in actions] == [SendSnapshot], actions
    c.run(actions)
    c.write(3)
    assert c.dlogs["b"].last == c.plog.last == 13


def test_a_probe_refused_by_a_duplica_not_yet_told_of_this_primary_is_sent_again_soon() -> None:
    """A new primary's links come up before the coordinator's assignment reaches its
    duplicas: a duplica refuses the probe ("not_primary", at its older epoch). The primary
    used to ignore that answer as a late one and probe again a keepalive period later, and
    the first write after a crash failover waited for it (169 ms where 40 is usual)."""
    limits = ShipLimits(keepalive_ms=100)
    p = PrimaryReplication(2, Mode.SYNC, ["b"], {"b"}, LogInfo(1, 0, 0, ()), limits)
    (probe,) = p.link_up("b", 1_000)
    assert isinstance(probe, SendProbe)
    assert p.ack("b", AckView("not_primary", 1), 1_005) == []
    assert p.tick(1_010) == []  # not at once: the duplica's assignment is on its way
    assert [type(a) for a in p.tick(1_030)] == [SendProbe]
    # A refusal of another kind at an older epoch is still a late answer: nothing sooner.
    assert p.ack("b", AckView("stale_epoch", 1), 1_035) == []
    assert p.tick(1_060) == []


def test_keepalives_of_idle_replica_sets_go_out_together_once_per_period() -> None:
    """Each replica set used to send its keepalive a period after its own last send, so a
    host's idle sets spread over the period and its link carried one message per tick to
    each peer; per-message gRPC work was a fifth of an agent's CPU at rest (60 replicas).
    On the period's grid they all go in one tick, and each still sends at least once a
    period and a tick (duplicas hear the primary within two periods)."""
    period_ms, tick_ms = 100, 25
    limits = ShipLimits(keepalive_ms=period_ms)
    sets = []
    for start_ms in (1_003, 1_031, 1_058, 1_086):  # links up at four phases of the period
        c = Cluster(limits=limits)
        c.now = start_ms
        c.run(c.primary.link_up("b", start_ms))
        c.run(c.primary.link_up("c", start_ms))
        c.write(2)
        sets.append(c)
    sent_at: dict[int, list[int]] = {i: [] for i in range(len(sets))}
    for now in range(1_100, 2_100, tick_ms):
        for i, c in enumerate(sets):
            c.now = now
            actions = c.primary.tick(now)
            if actions:
                assert all(isinstance(a, SendBatch) and a.entries_max == 0 for a in actions)
                sent_at[i].append(now)
            c.run(actions)
    # Every set sends in the same ticks: the first of each period.
    assert len({tuple(times) for times in sent_at.values()}) == 1
    times = sent_at[0]
    assert times == [t for t in range(1_100, 2_100, tick_ms) if t % period_ms < tick_ms]
    assert all(b - a <= period_ms + tick_ms for a, b in zip(times, times[1:], strict=False))
