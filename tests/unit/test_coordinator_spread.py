"""Placement spreads primaries, and rebuilds after a mass failure are throttled (issue 14,
items 4 and 5)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from failover import defaults
from failover.core.coordinator import (
    DUPLICA,
    PRIMARY,
    SERVICE_PREFIX,
    Action,
    CoordinatorCore,
    Persist,
    PrepareSwitchover,
    ServiceInfo,
    StartSwitchover,
    Timing,
)
from failover.core.coordinator.actions import Prepared
from failover.core.coordinator.model import pack
from failover.core.coordinator.operations import PREPARE_ANSWER_GRACE_MS
from failover.core.roles import BUILDING
from tests.unit.test_coordinator_rebuild import DEAD, FAIL, HB, LEASE
from tests.unit.test_coordinator_scale import METRICS, NEEDS, Cluster


def primaries(core: CoordinatorCore) -> Counter[str]:
    """Primaries per host by a walk over every service (the rule)."""
    return Counter(s.primary for s in core.services.values())


def building(core: CoordinatorCore) -> int:
    return sum(role == BUILDING for s in core.services.values() for role in s.replicas.values())


def test_new_services_spread_their_primaries_evenly() -> None:
    c = Cluster(10, 100)
    counts = primaries(c.core)
    assert sorted(counts) == sorted(c.up)
    assert max(counts.values()) == min(counts.values()) == 10, counts
    assert c.core._primaries == dict(counts)


def test_primaries_per_host_are_kept_as_failovers_move_them() -> None:
    c = Cluster(8, 60)
    victim = max(sorted(c.up), key=lambda h: (primaries(c.core)[h], h))
    c.up.discard(victim)
    for _ in range(DEAD // HB + 10):
        c.round()
        assert c.core._primaries == dict(primaries(c.core))
    assert primaries(c.core)[victim] == 0
    # Services created now go to the hosts with the fewest primaries.
    before = primaries(c.core)
    least = min(before[h] for h in c.up)
    c.run(c.core.create_service("fresh", "kv", 2, "sync", c.now))
    assert before[c.core.services["fresh"].primary] == least
    c.run(c.core.delete_service("fresh"))
    assert c.core._primaries == dict(primaries(c.core))


def building_per_host(core: CoordinatorCore) -> Counter[str]:
    return Counter(h for s in core.services.values() for h, role in s.replicas.items()
                   if role == BUILDING)


def rebuild_after_a_death(c: Cluster, victim: str, per_round: Callable[[], None]) -> int:
    """Kills `victim` and runs rounds until its replicas are rebuilt elsewhere, calling
    `per_round` after each; returns the most replicas building at once. The waiting ones
    are recorded once each (not once per tick), and every replica is rebuilt."""
    c.up.discard(victim)
    lost = sum(victim in s.replicas for s in c.core.services.values())
    waiting: Counter[str] = Counter()
    most = 0
    for _ in range(DEAD // HB + 10 + 4 * lost):
        for a in c.round():
            if isinstance(a, Persist):
                waiting.update(row[0] for row in a.history if row[1] == "placement_waiting")
        per_round()
        most = max(most, building(c.core))
    assert waiting and max(waiting.values()) == 1, waiting  # recorded once, not per tick
    assert building(c.core) == 0
    assert all(victim not in s.replicas and len(s.replicas) == s.desired_replicas
               for s in c.core.services.values())
    return most


def test_rebuilds_after_a_host_death_are_throttled() -> None:
    """At most `rebuild_concurrency_max` building replicas at once, cluster-wide; the rest
    wait (one history row each, not one per tick) and are placed as slots free up."""
    limit = 2
    c = Cluster(6, 40, Timing(HB, FAIL, LEASE, DEAD, rebuild_concurrency_max=limit))
    assert sum("h000" in s.replicas for s in c.core.services.values()) > 3 * limit

    def within_limit() -> None:
        assert building(c.core) <= limit

    assert rebuild_after_a_death(c, "h000", within_limit) == limit


def test_rebuilds_after_a_host_death_build_one_replica_per_host_at_a_time() -> None:
    """At most `rebuild_per_host_max` building replicas on any one host, however many the
    cluster-wide limit allows: a host death's rebuilds all started at one tick, three on
    each survivor of ten, and the fsyncs of their new files on a shared disk stalled agents
    into missed heartbeats (benchmarks/storm.py). The rest wait and every replica is
    rebuilt."""
    c = Cluster(6, 40, Timing(HB, FAIL, LEASE, DEAD, rebuild_concurrency_max=32,
                              rebuild_per_host_max=1))
    survivors = len(c.core.hosts) - 1
    # More than the survivors take in one go.
    assert sum("h000" in s.replicas for s in c.core.services.values()) > 2 * survivors

    def one_per_host() -> None:
        per_host = building_per_host(c.core)
        assert max(per_host.values(), default=0) <= 1, per_host

    assert rebuild_after_a_death(c, "h000", one_per_host) == survivors


class Switching(Cluster):
    """A cluster whose daemon carries out `StartSwitchover` as the server does (a switchover
    plan by `start_primary_move`) and whose primaries answer the prepare at once."""

    def __init__(self, hosts: int, services: int, timing: Timing) -> None:
        self.started: list[tuple[int, str, str]] = []  # (when, service, target)
        self.ops = 0
        super().__init__(hosts, services, timing)

    def run(self, actions: list[Action]) -> list[Action]:
        super().run(actions)
        for a in actions:
            if isinstance(a, StartSwitchover):
                service = self.core.services[a.service]
                assert a.to_host in service.in_sync and a.to_host in service.promotable
                assert not self.core.failovers
                self.started.append((self.now, a.service, a.to_host))
                self.ops += 1
                self.run(self.core.start_primary_move(f"op{self.ops}", a, self.now))
            elif isinstance(a, PrepareSwitchover) and a.host_id in self.up:
                self.run(self.core.answer(a.op_id, Prepared(True), self.now))
        return actions


def test_rebalance_evens_primaries_after_a_host_returns_at_the_rate_limit() -> None:
    gap, calm = 500, 1500
    c = Switching(6, 36, Timing(HB, FAIL, LEASE, DEAD, rebalance_gap_ms=gap,
                                rebalance_calm_ms=calm))
    assert set(primaries(c.core).values()) == {6} and not c.started
    victim = "h000"
    c.up.discard(victim)
    last_failover = 0
    for _ in range(FAIL // HB + 6):  # its primaries fail over; it comes back before dead
        c.round()
        if c.core.failovers:
            last_failover = c.now
    assert primaries(c.core)[victim] == 0 and not c.core.failovers
    c.up.add(victim)
    for _ in range(3):
        c.round()
    assert max(primaries(c.core).values()) >= 7
    for _ in range((calm + 6 * 2 * gap) // HB + 20):
        c.round()
        if c.core.failovers:
            last_failover = c.now
    counts = primaries(c.core)
    # Within one of even (6): a move needs a promotable member on a host holding at least
    # two fewer, so two hosts one above and one below even may stay so.
    assert max(counts.values()) <= 7 and min(counts[h] for h in c.up) >= 5, counts
    assert c.core._primaries == dict(counts)
    assert len(c.started) >= 5
    times = [when for when, _, _ in c.started]
    assert times[0] - last_failover >= calm  # not during the failover storm
    assert all(b - a >= gap for a, b in zip(times, times[1:], strict=False))
    moved = len(c.started)
    for _ in range(20):  # even: nothing more moves
        c.round()
    assert len(c.started) == moved


def test_no_rebalance_when_it_is_off_or_a_failover_is_pending() -> None:
    c = Switching(6, 36, Timing(HB, FAIL, LEASE, DEAD, rebalance_gap_ms=0))
    c.up.discard("h000")
    for _ in range(FAIL // HB + 6):
        c.round()
    c.up.add("h000")
    for _ in range(100):
        c.round()
    assert not c.started and primaries(c.core)["h000"] == 0


def returned(problem: str) -> tuple[Switching, int]:
    """A cluster whose h000 lost its primaries to failovers and came back, its replicas in
    sync again, then showing `problem` ("" for none) while the rebalance could move
    primaries to it; returns the cluster and the rounds until the rebalance may start."""
    gap, calm = 500, 1500
    c = Switching(6, 36, Timing(HB, FAIL, LEASE, DEAD, rebalance_gap_ms=gap,
                                rebalance_calm_ms=calm))
    c.up.discard("h000")
    for _ in range(FAIL // HB + 6):
        c.round()
    assert primaries(c.core)["h000"] == 0 and not c.core.failovers
    c.up.add("h000")
    for _ in range(5):  # back in every in-sync set, promotable
        c.round()
    assert all("h000" in s.promotable for s in c.core.services.values() if "h000" in s.replicas)
    if problem == "disk_free":  # its disk is nearly full, as its metrics say
        c.metrics["h000"] = {**METRICS, "disk_free_bytes": float(64 << 20)}
    elif problem == "disk_full":  # a replica's append failed there for want of space
        name = min(s.name for s in c.core.services.values() if "h000" in s.replicas)
        c.full.add(("h000", name))
    elif problem == "lagging":  # in sync, but far behind its primaries
        for name in c.index:
            c.index[name] += 1000
        c.behind["h000"] = 1000
    assert not c.started
    return c, (calm + 6 * 2 * gap) // HB + 20


@pytest.mark.parametrize("problem", ["disk_free", "disk_full", "lagging"])
def test_rebalance_moves_no_primary_to_a_host_that_cannot_take_it_at_once(problem: str) -> None:
    """A rebalance switchover holds writes until its target has the whole log: a target
    that lags or whose disk is full would hold them past their deadlines. None goes there;
    once the host is well again, primaries move to it."""
    c, rounds = returned(problem)
    for _ in range(rounds):
        c.round()
    assert all(target != "h000" for _, _, target in c.started), c.started
    assert primaries(c.core)["h000"] == 0
    c.metrics.clear()
    c.full.clear()
    c.behind.clear()
    for _ in range(rounds):
        c.round()
    assert any(target == "h000" for _, _, target in c.started), c.started
    assert primaries(c.core)["h000"] >= 5


def test_rebalance_moves_no_primary_whose_commit_waits_on_another_lagging_member() -> None:
    """The switchover holds writes until every logged write is committed, and a commit
    waits for every in-sync member, not only the target: a rebalance begun while a third
    member could not keep up (its disk full, its role not even recorded) held writes for
    the whole switchover timeout (tests/chaos/test_disk_full.py with the rebalance on).
    Services with a lagging member do not move; the others still do."""
    c, rounds = returned("")
    # The host most often a third member beside h000 (where the primaries will move).
    slow, _ = Counter(h for s in c.core.services.values() if "h000" in s.in_sync
                      for h in s.in_sync if h != "h000").most_common(1)[0]
    for name in c.index:
        c.index[name] += 1000
    c.behind[slow] = 1000
    waiting = {s.name for s in c.core.services.values() if slow in s.in_sync}
    assert waiting
    for _ in range(rounds):
        c.round()
    assert c.started, "no rebalance at all"
    assert not [(service, target) for _, service, target in c.started if service in waiting]


def test_rebalance_steps_through_a_host_holding_one_fewer() -> None:
    """h000 holds one primary above even, h002 one below, and no service of h000 has a
    member on h002: a move straight there does not exist. One step to h001 (one fewer than
    h000), which has a member on h002, then on to h002: every host ends even."""
    layout = {  # service -> its hosts, the primary first
        "a1": ("h000", "h001"), "a2": ("h000", "h003"), "a3": ("h000", "h001"),
        "b1": ("h001", "h002"), "b2": ("h001", "h003"),
        "c1": ("h002", "h003"),
        "d1": ("h003", "h001"), "d2": ("h003", "h000"),
    }
    gap, calm = 500, 1000
    c = Switching(4, 0, Timing(HB, FAIL, LEASE, DEAD, rebalance_gap_ms=gap,
                               rebalance_calm_ms=calm))
    state = {}
    for name, (primary, duplica) in layout.items():
        record = ServiceInfo(name, "kv", "sync", 2, 1, primary,
                             {primary: PRIMARY, duplica: DUPLICA}, [duplica], [duplica], 1,
                             NEEDS.to_dict())
        state[SERVICE_PREFIX + name] = pack(record)
    c.run(c.core.restore(state, c.now))
    for _ in range(3):
        c.round()
    assert dict(primaries(c.core)) == {"h000": 3, "h001": 2, "h002": 1, "h003": 2}
    for _ in range((calm + 4 * gap) // HB + 10):
        c.round()
    counts = primaries(c.core)
    assert max(counts.values()) - min(counts[h] for h in c.up) <= 1, counts
    assert [(service, target) for _, service, target in c.started][:2] == [
        ("a1", "h001"), ("b1", "h002")], c.started


def test_building_replicas_restored_take_rebuild_slots_until_built_or_deleted() -> None:
    """A coordinator restarted while replicas build counts them against
    `rebuild_concurrency_max` as the one before did; a deleted service's building replica
    frees its slot."""
    limit = 2
    c = Cluster(4, 0, Timing(HB, FAIL, LEASE, DEAD, rebuild_concurrency_max=limit))
    c.behind["h001"] = 1 << 40  # its copies stay building: they never catch up
    layout = {"b1": {"h000": PRIMARY, "h001": BUILDING},
              "b2": {"h002": PRIMARY, "h001": BUILDING}, "m1": {"h003": PRIMARY}}
    state = {SERVICE_PREFIX + name: pack(ServiceInfo(
        name, "kv", "sync", 2, 1, next(iter(replicas)), replicas, [], [], 1, NEEDS.to_dict()))
        for name, replicas in layout.items()}
    c.run(c.core.restore(state, c.now))
    waiting = []
    for _ in range(5):
        for a in c.round():
            if isinstance(a, Persist):
                waiting.extend(row[0] for row in a.history if row[1] == "placement_waiting")
    assert building(c.core) == limit and len(c.core.services["m1"].replicas) == 1
    assert waiting == ["m1"]
    c.run(c.core.delete_service("b1"))
    c.round()
    assert len(c.core.services["m1"].replicas) == 2  # placed in the slot b1's copy freed


def test_a_member_that_cannot_keep_up_leaves_the_in_sync_set_during_a_switchover() -> None:
    """A switchover holds writes until every logged write is committed, and the commit
    waits for every in-sync member: a third member whose disk filled stayed in the set
    for the whole switchover (no in-sync change while one was in progress), so writes were
    held until it timed out (5 s). Any member but the target may leave; the target stays,
    since the switchover is about to promote it."""
    c = Cluster(6, 12)
    service = next(s for s in c.core.services.values() if len(s.replicas) == 3
                   and len(s.in_sync) == 2)
    target, other = sorted(service.in_sync)
    c.run(c.core.start_primary_move("op1", StartSwitchover(service.name, target), c.now))
    assert c.core.switchovers == {service.name: target}
    c.full.update({(other, service.name), (target, service.name)})
    for _ in range(3):
        c.round()
    assert service.name in c.core.switchovers  # nobody answered its prepare: still going on
    assert service.in_sync == [target]


class Unanswered(Switching):
    """A cluster whose primaries never answer a rebalance's prepare: each switchover holds
    the service's writes until the coordinator abandons it (SWITCHOVER_TIMEOUT_MS)."""

    def run(self, actions: list[Action]) -> list[Action]:
        Cluster.run(self, actions)
        for a in actions:
            if isinstance(a, StartSwitchover):
                self.started.append((self.now, a.service, a.to_host))
                self.ops += 1
                self.run(self.core.start_primary_move(f"op{self.ops}", a, self.now))
        return actions


def test_a_rebalance_that_keeps_failing_backs_off_from_the_end_of_each_attempt() -> None:
    """The gap was counted from the start of the last move: one that held writes for the
    whole switchover timeout and failed was tried again at the next tick, and a move that
    always fails held the service's writes nearly all the time."""
    gap, calm = 500, 1500
    c = Unanswered(6, 36, Timing(HB, FAIL, LEASE, DEAD, rebalance_gap_ms=gap,
                                 rebalance_calm_ms=calm))
    c.up.discard("h000")
    for _ in range(FAIL // HB + 6):
        c.round()
    c.up.add("h000")  # back, holding no primary: a rebalance is due, and it always fails
    attempts = 5
    held_ms = defaults.SWITCHOVER_TIMEOUT_MS + PREPARE_ANSWER_GRACE_MS
    for _ in range((calm + (attempts + 1) * held_ms + gap * 2 ** (attempts + 1)) // HB):
        c.round()
        if len(c.started) > attempts:
            break
    assert len(c.started) > attempts
    times = [when for when, _, _ in c.started]
    # Each attempt holds for the timeout; the next starts a gap after it ended, doubled
    # after every failure.
    for n, (a, b) in enumerate(zip(times, times[1:], strict=False)):
        assert b - a >= held_ms + gap * 2 ** (n + 1), (n, times)
    held = (len(times) - 1) * held_ms
    assert held / (times[-1] - times[0]) < 0.8, times
