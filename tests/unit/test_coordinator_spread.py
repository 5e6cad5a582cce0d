"""Placement spreads primaries, and rebuilds after a mass failure are throttled (issue 14,
items 4 and 5)."""

from __future__ import annotations

from collections import Counter

from failover.core.coordinator import CoordinatorCore, Persist, Timing
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
