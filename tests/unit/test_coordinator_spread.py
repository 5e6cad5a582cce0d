"""Placement spreads primaries, and rebuilds after a mass failure are throttled (issue 14,
items 4 and 5)."""

from __future__ import annotations

from collections import Counter

from failover.core.coordinator import (
    Action,
    CoordinatorCore,
    Persist,
    PrepareSwitchover,
    StartSwitchover,
    Timing,
)
from failover.core.coordinator.actions import Prepared
from failover.core.roles import BUILDING
from tests.unit.test_coordinator_rebuild import DEAD, FAIL, HB, LEASE
from tests.unit.test_coordinator_scale import Cluster


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


def test_rebuilds_after_a_host_death_are_throttled() -> None:
    """At most `rebuild_concurrency_max` building replicas at once, cluster-wide; the rest
    wait (one history row each, not one per tick) and are placed as slots free up."""
    limit = 2
    c = Cluster(6, 40, Timing(HB, FAIL, LEASE, DEAD, rebuild_concurrency_max=limit))
    victim = "h000"
    lost = sum(victim in s.replicas for s in c.core.services.values())
    assert lost > 3 * limit
    c.up.discard(victim)
    waiting: Counter[str] = Counter()
    most = 0
    for _ in range(DEAD // HB + 10 + 4 * lost):
        for a in c.round():
            if isinstance(a, Persist):
                waiting.update(row[0] for row in a.history if row[1] == "placement_waiting")
        most = max(most, building(c.core))
        assert building(c.core) <= limit
    assert most == limit
    assert waiting and max(waiting.values()) == 1, waiting  # recorded once, not per tick
    assert building(c.core) == 0
    assert all(victim not in s.replicas and len(s.replicas) == s.desired_replicas
               for s in c.core.services.values())


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
