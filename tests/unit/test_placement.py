"""Placement policies over several resources, anti-affinity, zones and draining."""

from __future__ import annotations

import pytest

from failover.core.placement import (
    BEST_FIT,
    FIRST_FIT,
    WORST_FIT,
    HostView,
    Resources,
    capacity_and_free,
    check_policy,
    place,
)
from failover.errors import InvalidRequest

GIB = 1 << 30
NEEDS = Resources(cpu=1.0, memory_bytes=1 * GIB, disk_bytes=10 * GIB)
NOTHING = Resources()


def host(host_id: str, cpu: float = 8, memory_gib: float = 16, disk_gib: float = 100, *,
         zone: str = "", alive: bool = True, draining: bool = False,
         placed: Resources = NOTHING, free: Resources | None = None) -> HostView:
    capacity = Resources(cpu, memory_gib * GIB, disk_gib * GIB)
    return HostView(host_id, zone, alive, draining, capacity, free or capacity, placed=placed)


def test_policies_choose_differently_on_the_same_hosts() -> None:
    hosts = [host("a", memory_gib=4), host("b", memory_gib=64), host("c", memory_gib=2)]
    assert place(FIRST_FIT, NEEDS, 1, hosts, {}).hosts == ("a",)
    assert place(BEST_FIT, NEEDS, 1, hosts, {}).hosts == ("c",)  # the tightest fit
    assert place(WORST_FIT, NEEDS, 1, hosts, {}).hosts == ("b",)  # the roomiest


def test_every_resource_must_fit() -> None:
    hosts = [host("a", cpu=0.5), host("b", disk_gib=5), host("c", memory_gib=0.5),
             host("d")]
    for policy in (FIRST_FIT, BEST_FIT, WORST_FIT):
        assert place(policy, NEEDS, 1, hosts, {}).hosts == ("d",)
    found = place(FIRST_FIT, NEEDS, 2, hosts, {})
    assert found.hosts == ("d",)
    assert "1 of 2 replicas found no host" in found.reason
    assert "a: cpu 0.50 free" in found.reason
    assert "b: disk_bytes 5120 MiB free" in found.reason
    assert "c: memory_bytes 512 MiB free" in found.reason


def test_room_is_the_smaller_of_measured_and_reserved() -> None:
    # Reserved: 16 GiB capacity less 15.5 GiB placed leaves too little memory.
    booked = host("a", placed=Resources(0, 15.5 * GIB, 0))
    # Measured: the host says it has 0.5 GiB of memory free.
    busy = host("b", free=Resources(8, 0.5 * GIB, 100 * GIB))
    assert place(FIRST_FIT, NEEDS, 1, [booked, busy, host("c")], {}).hosts == ("c",)


def test_measured_cpu_does_not_block_placement() -> None:
    # CPU use swings between heartbeats: only CPU reservations count.
    hot = host("a", free=Resources(0.0, 16 * GIB, 100 * GIB))
    assert place(FIRST_FIT, NEEDS, 1, [hot], {}).hosts == ("a",)
    booked = host("a", placed=Resources(7.5, 0, 0))
    assert place(FIRST_FIT, NEEDS, 1, [booked], {}).hosts == ()


def test_hard_anti_affinity_and_host_state() -> None:
    hosts = [host("a"), host("b", alive=False), host("c", draining=True), host("d")]
    found = place(WORST_FIT, NEEDS, 2, hosts, {"d": ""})
    assert found.hosts == ("a",)
    assert "b: not alive" in found.reason
    assert "c: draining" in found.reason
    assert "d: holds a replica of it already" in found.reason


def test_several_replicas_never_share_a_host_and_count_each_other() -> None:
    # Room for two replicas on "a" only by memory; the second goes elsewhere anyway.
    hosts = [host("a", memory_gib=64), host("b", memory_gib=8), host("c", memory_gib=4)]
    assert place(WORST_FIT, NEEDS, 3, hosts, {}).hosts == ("a", "b", "c")
    assert place(BEST_FIT, NEEDS, 2, hosts, {}).hosts == ("c", "b")


def test_zones_spread_before_policy() -> None:
    hosts = [host("a1", zone="a", memory_gib=64), host("a2", zone="a", memory_gib=64),
             host("b1", zone="b", memory_gib=2), host("c1", zone="c", memory_gib=4)]
    # The primary is in zone a: the next replicas go to b and c, even though a2 is roomier.
    assert place(WORST_FIT, NEEDS, 2, hosts, {"a1": "a"}).hosts == ("c1", "b1")
    # Every zone holds one: the fewest-used zone rule lets a2 in.
    assert place(WORST_FIT, NEEDS, 1, hosts, {"a1": "a", "b1": "b", "c1": "c"}).hosts == ("a2",)
    # Only zone a has room left: a second replica in zone a beats none.
    full_b = [host("a1", zone="a"), host("a2", zone="a"), host("b1", zone="b", cpu=0.1)]
    assert place(FIRST_FIT, NEEDS, 2, full_b, {}).hosts == ("a1", "a2")


def test_hosts_without_metrics_are_skipped_with_a_reason() -> None:
    blind = HostView("a", "", True, False, None, None)
    found = place(FIRST_FIT, NEEDS, 1, [blind], {})
    assert found.hosts == ()
    assert "a: no metrics reported yet" in found.reason


def test_ties_go_to_the_smaller_host_id_and_replay() -> None:
    hosts = [host(h) for h in ("h3", "h1", "h2")]
    for policy in (FIRST_FIT, BEST_FIT, WORST_FIT):
        assert place(policy, NEEDS, 1, hosts, {}).hosts == ("h1",)
        assert place(policy, NEEDS, 3, hosts, {}) == place(policy, NEEDS, 3, hosts[::-1], {})


def test_capacity_and_free_from_heartbeat_metrics() -> None:
    assert capacity_and_free({}) is None
    capacity, free = capacity_and_free({
        "cpu_count": 4, "cpu_percent": 50, "memory_total_bytes": 8 * GIB,
        "memory_percent": 25, "disk_free_bytes": 30 * GIB, "disk_total_bytes": 100 * GIB})
    assert capacity == Resources(4, 8 * GIB, 100 * GIB)
    assert free == Resources(2, 6 * GIB, 30 * GIB)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="choose one of first-fit, best-fit, worst-fit"):
        check_policy("random-fit")
    with pytest.raises(InvalidRequest):
        place("random-fit", NEEDS, 1, [host("a")], {})


def test_the_first_host_chosen_has_the_fewest_primaries_among_those_that_fit() -> None:
    """It holds the new service's primary; the policy chooses among those tied, the rest of
    the replicas are placed as before."""
    hosts = [host("a", memory_gib=64), host("b", memory_gib=32), host("c", memory_gib=4),
             host("d", memory_gib=0.5)]
    counts = {"a": 3, "b": 1, "c": 1}  # d has none but does not fit
    assert place(WORST_FIT, NEEDS, 2, hosts, {}, counts).hosts == ("b", "a")
    assert place(BEST_FIT, NEEDS, 1, hosts, {}, counts).hosts == ("c",)
    assert place(WORST_FIT, NEEDS, 2, hosts, {}).hosts == ("a", "b")  # without: by room
