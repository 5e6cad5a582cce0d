"""A duplica leaves the in-sync set for silence only as its primary beats
(`Membership._shrink_silent_members`): a shrink takes effect when the primary is told, a
silent primary cannot be told, and a member taken out could no longer be promoted although it
holds every write that primary acknowledged. The storm benchmark (issue 14) lost 9 of 30
services this way: a loaded coordinator heard neither a duplica's late heartbeat nor its
killed primary in time, took the duplica out in the same tick, and then had nobody to
promote; with the tick waiting for the primary's own silence too, 1 of 30, as the two
silences crossed the timeout milliseconds apart."""

from __future__ import annotations

from failover import defaults
from failover.core.coordinator import (
    AskHearsPrimary,
    AssignRole,
    CoordinatorCore,
    HearsAnswer,
    HostInfo,
    Persist,
    ReplicaReport,
    Timing,
)
from tests.unit.test_coordinator_scale import METRICS


class Pair:
    """One core, two hosts and one sync service of two replicas, in sync and promotable."""

    def __init__(self) -> None:
        self.core = CoordinatorCore(Timing())
        self.now = 1_000
        for host in ("h1", "h2"):
            self.core.register(HostInfo(host, f"{host}:1"), self.now, METRICS)
        self.core.create_service("s", "kv", 2, "sync", self.now)
        self.service = self.core.services["s"]
        self.primary = self.service.primary
        self.duplica = self.service.duplicas()[0]
        self.beat(self.primary)
        self.beat(self.duplica)
        assert self.service.in_sync == [self.duplica]
        assert self.service.promotable == [self.duplica]

    def beat(self, host: str, index: int = 10, lag_ms: int = 0) -> list:
        """`lag_ms`: for a primary, how long it has waited on each member (0: it holds
        everything)."""
        s = self.service
        if host == s.primary:
            # As a real primary reports: every member's lag, 0 when it holds everything.
            report = ReplicaReport("s", "primary", s.epoch, index, index, index,
                                   matched_index=index, in_sync=tuple(s.in_sync),
                                   in_sync_generation=s.in_sync_generation,
                                   in_sync_lag_ms={h: lag_ms for h in s.in_sync})
        else:
            report = ReplicaReport("s", s.replicas[host], s.epoch, index, index, index,
                                   matched_index=index)
        _leases, actions = self.core.heartbeat(host, METRICS, [report], self.now)
        return actions

    def silence(self) -> list:
        """Time passes beyond the failure timeout with no heartbeat from anyone."""
        self.now += self.core.timing.failure_timeout_ms + 1
        return self.core.tick(self.now)


# A primary that has waited this long on a member no longer hears it (as a duplica stops
# hearing its primary, `hears_primary`).
WAITED_MS = defaults.HEARD_WITHIN_HEARTBEATS * Timing().heartbeat_ms


def left_in_sync(actions: list) -> list[str]:
    return [row[2] for a in actions if isinstance(a, Persist) for row in a.history
            if row[1] == "in_sync" and "left" in row[2]]


def assert_left_and_told(pair: Pair, actions: list) -> None:
    """The duplica left the in-sync set (no longer promotable), and its primary is told."""
    assert len(left_in_sync(actions)) == 1
    assert pair.service.in_sync == pair.service.promotable == []
    assert any(isinstance(a, AssignRole) and a.host_id == pair.primary for a in actions)


def test_a_duplica_silent_with_its_primary_stays_promotable_and_is_promoted() -> None:
    pair = Pair()
    actions = pair.silence()
    assert left_in_sync(actions) == []
    assert pair.service.in_sync == [pair.duplica]
    assert pair.service.promotable == [pair.duplica]
    # Asked then, the duplica did not answer in time: no failover yet.
    first = [a for a in actions if isinstance(a, AskHearsPrimary)]
    assert [a.service for a in first] == ["s"]
    pair.core.hears_primary("s", [HearsAnswer(pair.duplica, False, False, 0, 0)], pair.now)
    assert pair.service.primary == pair.primary
    # The duplica was only late; its primary is really gone.
    pair.now += 50
    pair.beat(pair.duplica)
    pair.now += pair.core.timing.failure_timeout_ms
    asks = [a for a in pair.core.tick(pair.now) if isinstance(a, AskHearsPrimary)]
    assert [a.service for a in asks] == ["s"]
    assert pair.duplica in asks[0].hosts
    promoted = pair.core.hears_primary(
        "s", [HearsAnswer(pair.duplica, True, False, 10, pair.service.epoch)], pair.now)
    promoted += pair.core.tick(pair.now + pair.core.timing.lease_ms * 2)
    assert pair.service.primary == pair.duplica, promoted


def test_a_silent_duplica_leaves_once_its_primary_is_heard_again() -> None:
    pair = Pair()
    pair.silence()
    assert pair.service.in_sync == [pair.duplica]
    # The primary comes back, the duplica stays silent and the primary's writes wait on it:
    # now it leaves, and the primary is told its new set.
    actions = pair.beat(pair.primary, lag_ms=WAITED_MS)
    assert_left_and_told(pair, actions)


def test_a_silent_duplica_of_a_live_primary_leaves_as_the_primary_beats() -> None:
    pair = Pair()
    pair.now += pair.core.timing.failure_timeout_ms + 1
    pair.beat(pair.primary)
    # Not at the tick that finds it silent, even though its primary was just heard: the
    # primary could have died since (their silences crossed the timeout a few ms apart).
    assert left_in_sync(pair.core.tick(pair.now)) == []
    assert pair.service.in_sync == [pair.duplica]
    # The primary's next beat shows it alive and waiting on the member: the member leaves,
    # and the primary is told.
    pair.now += 20
    actions = pair.beat(pair.primary, lag_ms=WAITED_MS)
    assert_left_and_told(pair, actions)


def test_a_primary_reporting_no_lag_takes_the_short_way_from_its_second_beat() -> None:
    """A primary reports every in-sync member's lag, 0 when it holds everything. Any report
    of lags used to count as a change: every beat of every primary went through the full
    rules (`_beat`, `_count_members`), a third of a coordinator's heartbeat work at rest."""
    from failover.core.coordinator.membership import Membership

    pair = Pair()
    full: list[str] = []
    original = Membership._beat

    def counting(self, service, host_id, report, now_ms, leases):  # type: ignore[no-untyped-def]
        full.append(host_id)
        return original(self, service, host_id, report, now_ms, leases)

    Membership._beat = counting  # type: ignore[method-assign]
    try:
        for _ in range(5):
            pair.now += 100
            pair.beat(pair.primary)
            pair.beat(pair.duplica)
    finally:
        Membership._beat = original  # type: ignore[method-assign]
    assert len(full) <= 1, full  # the first may set what the next ones compare with


def test_a_duplica_silent_just_before_its_dying_primary_stays_promotable() -> None:
    """The sub-case the first fix missed: the primary's last beat came 100 ms after the
    duplica's, so when the duplica's silence crossed the timeout the primary still counted
    as heard, although it had died meanwhile."""
    pair = Pair()
    pair.now += 100
    pair.beat(pair.primary)  # its last beat
    pair.now += pair.core.timing.failure_timeout_ms - 99  # the duplica is past the timeout
    assert left_in_sync(pair.core.tick(pair.now)) == []
    assert pair.service.in_sync == pair.service.promotable == [pair.duplica]


def test_a_suspected_duplica_its_primary_hears_stays_promotable_and_is_promoted() -> None:
    """The coordinator suspects a live duplica's host (its heartbeats are late on a saturated
    machine), but the primary still hears it take entries: it stays in sync and promotable.
    Taken out, it could not be promoted when the primary died right after (storm: two
    services were left with nobody to promote, and stayed unwritable until the killed host
    came back)."""
    pair = Pair()
    pair.now += pair.core.timing.failure_timeout_ms + 1
    pair.beat(pair.primary, lag_ms=WAITED_MS - 1)
    pair.core.tick(pair.now)  # the duplica's host is suspected now
    for _ in range(3):
        pair.now += 20
        actions = pair.beat(pair.primary, lag_ms=WAITED_MS - 1)
        assert left_in_sync(actions) == []
    assert pair.service.in_sync == pair.service.promotable == [pair.duplica]
    # The duplica's heartbeats come again; the primary dies.
    pair.beat(pair.duplica)
    pair.now += pair.core.timing.failure_timeout_ms + 1
    pair.beat(pair.duplica)
    asks = [a for a in pair.core.tick(pair.now) if isinstance(a, AskHearsPrimary)]
    assert [a.service for a in asks] == ["s"] and pair.duplica in asks[0].hosts
    pair.core.hears_primary(
        "s", [HearsAnswer(pair.duplica, True, False, 10, pair.service.epoch)], pair.now)
    pair.now += pair.core.timing.lease_ms * 2
    pair.beat(pair.duplica)
    pair.core.tick(pair.now)
    assert pair.service.primary == pair.duplica


def test_a_silent_member_of_an_idle_primary_leaves_once_a_write_waits_on_it() -> None:
    """An idle primary holds nothing its member lacks (lag 0): nothing waits, the member
    stays. A write that then waits two heartbeat intervals on it takes it out."""
    pair = Pair()
    pair.now += pair.core.timing.failure_timeout_ms + 1
    pair.beat(pair.primary)
    pair.core.tick(pair.now)
    pair.now += 20
    assert left_in_sync(pair.beat(pair.primary, lag_ms=0)) == []
    pair.now += 100
    assert left_in_sync(pair.beat(pair.primary, lag_ms=WAITED_MS - 1)) == []
    assert pair.service.in_sync == [pair.duplica]
    pair.now += 100
    actions = pair.beat(pair.primary, lag_ms=WAITED_MS)
    assert_left_and_told(pair, actions)


def test_a_silent_member_of_an_idle_primary_leaves_after_twice_the_failure_timeout() -> None:
    """Lag 0 cannot tell a dead member of an idle primary from a live one holding everything:
    it leaves once silent for twice the failure timeout, no late heartbeat then, so the
    primary's next write does not wait on it. One that lags a little (it takes entries)
    stays however long the coordinator does not hear it."""
    pair = Pair()
    last_heard = pair.now  # the duplica's last heartbeat
    timeout_ms = pair.core.timing.failure_timeout_ms
    pair.now += timeout_ms + 1
    pair.beat(pair.primary)
    pair.core.tick(pair.now)
    pair.now = last_heard + 2 * timeout_ms - 1
    assert left_in_sync(pair.beat(pair.primary, lag_ms=0)) == []
    pair.now += 1_000
    assert left_in_sync(pair.beat(pair.primary, lag_ms=WAITED_MS - 1)) == []
    actions = pair.beat(pair.primary, lag_ms=0)
    assert_left_and_told(pair, actions)
