"""The coordinator core's crash fast path (issue 16): a host's supervisor reports that its
agent process of incarnation X exited, and the core fails its primaries over without waiting
out their leases, after the same questions to the duplicas as on the timeout path. A report
that comes late, twice, or for a process restarted since must not cause a second promotion,
cut a live process's lease short, or promote a duplica that is not a promotable member."""

from __future__ import annotations

import pytest

from failover.core.coordinator import (
    AskHearsPrimary,
    CoordinatorCore,
    HearsAnswer,
    HostInfo,
    Persist,
    ReplicaReport,
    Timing,
)
from failover.errors import InvalidRequest

METRICS = {"cpu_count": 8.0, "memory_total_bytes": float(16 << 30),
           "disk_free_bytes": float(100 << 30), "disk_total_bytes": float(200 << 30)}


class Cluster:
    """One core, three supervised hosts (incarnation 1 each) and one sync service whose
    duplicas are promotable and whose primary holds a lease."""

    def __init__(self) -> None:
        self.core = CoordinatorCore(Timing())
        self.now = 1_000
        self.incarnation = {h: 1 for h in ("h1", "h2", "h3")}
        for host in self.incarnation:
            self.core.register(HostInfo(host, f"{host}:1", incarnation=1), self.now, METRICS)
        self.core.create_service("s", "kv", 3, "sync", self.now)
        self.service = self.core.services["s"]
        self.primary = self.service.primary
        self.duplicas = list(self.service.in_sync)
        self.beat_all(10)
        assert self.service.promotable == self.duplicas
        assert self.core.leases["s"][0] == self.primary

    def beat(self, host: str, index: int = 10) -> list[tuple[str, int, int]]:
        s = self.service
        if host == s.primary:
            report = ReplicaReport("s", "primary", s.epoch, index, index, index,
                                   matched_index=index, in_sync=tuple(s.in_sync),
                                   in_sync_generation=s.in_sync_generation)
        else:
            report = ReplicaReport("s", s.replicas[host], s.epoch, index, index, index,
                                   matched_index=index)
        leases, _ = self.core.heartbeat(host, METRICS, [report], self.now,
                                        incarnation=self.incarnation[host])
        return leases

    def beat_all(self, index: int = 10) -> None:
        for host in sorted(self.incarnation, key=lambda h: h != self.service.primary):
            self.beat(host, index)

    def report(self, host: str, incarnation: int, code: int = -9) -> list:
        return self.core.process_exited(host, incarnation, code, self.now)

    def answer(self, ask: AskHearsPrimary, hears: bool = False,
               index: dict[str, int] | None = None) -> list:
        answers = [HearsAnswer(h, True, hears, (index or {}).get(h, 10), ask.epoch)
                   for h in ask.hosts]
        return self.core.hears_primary(ask.service, answers, self.now)


def asks(actions: list) -> list[AskHearsPrimary]:
    return [a for a in actions if isinstance(a, AskHearsPrimary)]


def failovers(actions: list) -> int:
    return sum(1 for a in actions if isinstance(a, Persist)
               for row in a.history if row[1] == "failover")


def test_an_exit_report_fails_over_without_waiting_out_the_lease() -> None:
    c = Cluster()
    lease_end = c.core.leases["s"][1]
    c.now += 5
    (ask,) = asks(c.report(c.primary, 1))
    # The duplicas still "hear" the primary: a busy duplica was still taking the dead
    # process's last batches. That does not hold a failover the report started.
    c.now += 5
    decided = c.answer(ask, hears=True)
    assert c.now < lease_end
    assert failovers(decided) == 1
    assert c.service.epoch == 2 and c.service.primary in c.duplicas


def test_a_duplicated_report_promotes_once() -> None:
    c = Cluster()
    (ask,) = asks(c.report(c.primary, 1))
    assert c.report(c.primary, 1) == []  # delivered twice while the failover asks
    assert failovers(c.answer(ask)) == 1
    new_primary = c.service.primary
    c.now += 10
    assert c.report(c.primary, 1) == []  # and again once it is done
    assert c.service.epoch == 2 and c.service.primary == new_primary
    assert not c.core.failovers


def test_a_late_report_of_a_restarted_process_changes_nothing() -> None:
    """Incarnation 2 registered and holds a lease: a report of incarnation 1 arriving now
    must not fail it over, least of all without waiting for that lease."""
    c = Cluster()
    c.now += 50
    c.incarnation[c.primary] = 2
    c.core.register(HostInfo(c.primary, f"{c.primary}:1", incarnation=2), c.now, METRICS)
    assert c.beat(c.primary)  # a lease for incarnation 2
    c.now += 5
    assert c.report(c.primary, 1) == []
    assert c.core.live[c.primary].alive and not c.core.failovers
    assert c.service.epoch == 1


def test_late_heartbeats_and_registrations_of_an_exited_process_are_refused() -> None:
    c = Cluster()
    c.report(c.primary, 1)
    with pytest.raises(InvalidRequest, match="not registered"):
        c.beat(c.primary)  # sent before the crash, delivered after the report
    with pytest.raises(InvalidRequest, match="reported exited"):
        c.core.register(HostInfo(c.primary, f"{c.primary}:1", incarnation=1), c.now, METRICS)
    c.core.register(HostInfo(c.primary, f"{c.primary}:1", incarnation=2), c.now, METRICS)
    # Once the next process registered, the older one's late registration is still refused.
    with pytest.raises(InvalidRequest, match="reported exited"):
        c.core.register(HostInfo(c.primary, f"{c.primary}:1", incarnation=1), c.now, METRICS)


def test_an_older_process_does_not_register_over_a_live_newer_one() -> None:
    """Else a late report of the older one would cut the newer one's lease short."""
    c = Cluster()
    c.incarnation[c.primary] = 3
    c.core.register(HostInfo(c.primary, f"{c.primary}:1", incarnation=3), c.now, METRICS)
    c.beat(c.primary)
    with pytest.raises(InvalidRequest, match="older"):
        c.core.register(HostInfo(c.primary, f"{c.primary}:1", incarnation=2), c.now, METRICS)


def test_a_heartbeat_of_another_incarnation_than_the_registered_one_gets_no_lease() -> None:
    c = Cluster()
    c.incarnation[c.primary] = 2  # a process that has not registered
    with pytest.raises(InvalidRequest, match="not registered"):
        c.beat(c.primary)


def test_a_report_racing_the_timeout_path_cuts_the_lease_wait_and_promotes_once() -> None:
    c = Cluster()
    # The primary goes silent; the duplicas beat on. Just past the failure timeout the lease
    # has ended, so hold it artificially later to see the report cut the wait short.
    c.now += c.core.timing.failure_timeout_ms + 1
    for host in c.duplicas:
        c.beat(host)
    (ask,) = asks(c.core.tick(c.now))
    c.core.leases["s"] = (c.primary, c.now + 200)  # a lease the coordinator still counts
    assert failovers(c.answer(ask)) == 0
    assert c.core.failovers["s"].state == "waiting_lease"
    c.now += 5
    decided = c.report(c.primary, 1)
    assert failovers(decided) == 1 and not asks(decided)
    assert c.report(c.primary, 1) == []
    c.now += 300
    assert failovers(c.core.tick(c.now)) == 0
    assert c.service.epoch == 2


def test_on_the_timeout_path_a_duplica_that_hears_the_primary_holds_the_failover() -> None:
    """Without a report "I hear it" still means the coordinator's link is at fault."""
    c = Cluster()
    c.now += c.core.timing.failure_timeout_ms + 1
    for host in c.duplicas:
        c.beat(host)
    (ask,) = asks(c.core.tick(c.now))
    assert failovers(c.answer(ask, hears=True)) == 0 and c.service.epoch == 1


def test_a_report_promotes_only_a_promotable_in_sync_duplica() -> None:
    """A duplica that left the in-sync set is never chosen, however much log it claims."""
    c = Cluster()
    stale, fresh = c.duplicas
    c.now += c.core.timing.failure_timeout_ms + 1
    c.beat(c.primary)
    c.beat(fresh)
    c.core.tick(c.now)  # `stale` went silent
    c.beat(c.primary)  # ... and leaves the in-sync set as its primary beats
    assert stale not in c.service.in_sync
    c.beat(stale)
    (ask,) = asks(c.report(c.primary, 1))
    c.answer(ask, index={stale: 99, fresh: 10})
    assert c.service.primary == fresh


def test_reports_outside_the_rules_are_refused() -> None:
    c = Cluster()
    with pytest.raises(InvalidRequest, match="incarnation"):
        c.report(c.primary, 0)
    with pytest.raises(InvalidRequest, match="exit code"):
        c.report(c.primary, 1, code=4096)
    with pytest.raises(InvalidRequest, match="not registered"):
        c.report("h9", 1)
    with pytest.raises(InvalidRequest):
        c.report("../etc", 1)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_duplica_still_replaying_its_log_is_promoted_only_when_none_is_ready(
        mode: str) -> None:
    """A duplica whose process restarted a moment ago replays its log into its state; as
    a new primary it answers no write before that is done (benchmarks/failover.py: 277 ms
    where 35 is usual). In sync mode every candidate holds every acknowledged write, so a
    ready one is promoted even with less of the log; in async mode the most of the log
    keeps the most acknowledged writes."""
    c = Cluster()
    if mode == "async":
        c.service.mode = "async"
    replaying, ready = sorted(c.duplicas)
    s = c.service
    # `replaying` has more of the log than `ready`, but applied little of it.
    c.core.heartbeat(replaying, METRICS, [ReplicaReport(
        "s", s.replicas[replaying], s.epoch, 90_000, 90_000, 10, matched_index=90_000)],
        c.now, incarnation=1)
    c.core.heartbeat(ready, METRICS, [ReplicaReport(
        "s", s.replicas[ready], s.epoch, 89_990, 89_990, 89_990, matched_index=89_990)],
        c.now, incarnation=1)
    (ask,) = asks(c.report(c.primary, 1))
    c.answer(ask, index={replaying: 90_000, ready: 89_990})
    assert c.service.primary == (ready if mode == "sync" else replaying)


def test_a_replaying_duplica_is_promoted_when_no_other_is_ready() -> None:
    c = Cluster()
    s = c.service
    for host in c.duplicas:
        c.core.heartbeat(host, METRICS, [ReplicaReport(
            "s", s.replicas[host], s.epoch, 90_000, 90_000, 10, matched_index=90_000)],
            c.now, incarnation=1)
    (ask,) = asks(c.report(c.primary, 1))
    c.answer(ask, index={h: 90_000 for h in c.duplicas})
    assert c.service.epoch == 2 and c.service.primary == max(c.duplicas)


def test_a_member_reported_exited_leaves_even_while_its_primary_waits_on_nothing() -> None:
    """A suspected member leaves only once its primary waits on it; one reported exited is
    dead for certain and leaves at the primary's next beat, even an idle primary's (lag 0),
    so the next sync write does not wait on it."""
    c = Cluster()
    gone, other = c.duplicas
    c.report(gone, 1)
    s = c.service
    idle = ReplicaReport("s", "primary", s.epoch, 10, 10, 10, matched_index=10,
                         in_sync=tuple(s.in_sync), in_sync_generation=s.in_sync_generation,
                         in_sync_lag_ms={h: 0 for h in s.in_sync})
    c.core.heartbeat(c.primary, METRICS, [idle], c.now, incarnation=1)
    assert s.in_sync == [other]
