"""The coordinator core's work is proportional to what changed (issue 14, items 1 and 3).

A heartbeat visits only its host's services, placement keeps each host's load without a walk
over every service, and everything a host's death decides is one `Persist` ahead of the
actions that tell agents and clients of it.
"""

from __future__ import annotations

from typing import Any

from failover.core.coordinator import (
    PRIMARY,
    Action,
    AskHearsPrimary,
    AssignRole,
    CoordinatorCore,
    DropReplica,
    HearsAnswer,
    HostInfo,
    Persist,
    PushRoutes,
    ReplicaReport,
    StepDown,
    Timing,
)
from failover.core.coordinator.actions import merge_persists
from failover.core.placement import Resources
from tests.unit.test_coordinator_rebuild import DEAD, FAIL, GIB, HB, LEASE

METRICS = {"cpu_count": 64.0, "memory_total_bytes": float(256 * GIB),
           "disk_free_bytes": float(1024 * GIB), "disk_total_bytes": float(1024 * GIB),
           "cpu_percent": 5.0, "memory_percent": 5.0}
NEEDS = Resources(0.1, 64 << 20, 256 << 20)


class Walks(dict[str, Any]):
    """`services` that counts walks over every service and single look-ups."""

    walks = 0
    lookups = 0

    def __iter__(self) -> Any:
        Walks.walks += 1
        return super().__iter__()

    def values(self) -> Any:
        Walks.walks += 1
        return super().values()

    def items(self) -> Any:
        Walks.walks += 1
        return super().items()

    def __getitem__(self, key: str) -> Any:
        Walks.lookups += 1
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        Walks.lookups += 1
        return super().get(key, default)


class Cluster:
    def __init__(self, hosts: int, services: int, timing: Timing | None = None) -> None:
        self.core = CoordinatorCore(timing or Timing(HB, FAIL, LEASE, DEAD))
        self.now = 1000
        self.held: dict[str, dict[str, tuple[str, int, tuple[str, ...], int]]] = {}
        self.index: dict[str, int] = {}
        self.up = {f"h{i:03d}" for i in range(hosts)}
        # What a host reports other than the defaults: its metrics, duplicas' matched
        # indexes this many entries behind, the (host, service) whose disk is full.
        self.metrics: dict[str, dict[str, float]] = {}
        self.behind: dict[str, int] = {}
        self.full: set[tuple[str, str]] = set()
        for h in sorted(self.up):
            self.run(self.core.register(HostInfo(h, f"{h}:1"), self.now, dict(METRICS)))
        for i in range(services):
            self.run(self.core.create_service(f"s{i:04d}", "kv", 2 + i % 2, "sync", self.now,
                                              NEEDS))
        for _ in range(3):  # in sync, counted, promotable
            self.round()

    def run(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            if isinstance(a, AssignRole) and a.host_id in self.up:
                self.held.setdefault(a.host_id, {})[a.service] = (
                    a.role, a.epoch, a.in_sync, a.in_sync_generation)
            elif isinstance(a, DropReplica) and a.host_id in self.up:
                self.held.get(a.host_id, {}).pop(a.service, None)
        return actions

    def beat(self, host: str) -> list[Action]:
        reports = []
        for svc, (role, epoch, in_sync, generation) in sorted(self.held.get(host, {}).items()):
            idx = self.index.get(svc, 0)
            primary = role == PRIMARY
            matched = idx if primary else max(0, idx - self.behind.get(host, 0))
            reports.append(ReplicaReport(svc, role, epoch, idx, idx if primary else 0, idx,
                                         matched_index=matched,
                                         in_sync=in_sync if primary else None,
                                         disk_full=(host, svc) in self.full,
                                         in_sync_generation=generation if primary else 0))
        _, actions = self.core.heartbeat(host, self.metrics.get(host, dict(METRICS)), reports,
                                         self.now)
        return self.run(actions)

    def round(self) -> list[Action]:
        """A heartbeat from every host up, then a tick; returns what the tick decided."""
        self.now += HB
        for svc in self.core.services:
            self.index[svc] = self.index.get(svc, 0) + 1
        for h in sorted(self.up):
            self.beat(h)
        ticked = self.run(self.core.tick(self.now))
        for a in ticked:
            if isinstance(a, AskHearsPrimary):
                self.run(self.core.hears_primary(a.service, [
                    HearsAnswer(h, h in self.up, False, self.index.get(a.service, 0), a.epoch)
                    for h in a.hosts], self.now))
        return ticked


def reference_loads(core: CoordinatorCore) -> dict[str, tuple[Resources, Resources]]:
    """Each host's placed and pending needs by a walk over every service (the rule)."""
    placed: dict[str, Resources] = {}
    pending: dict[str, Resources] = {}
    for service in core.services.values():
        needs = Resources.from_dict(service.needs)
        for host in service.replicas:
            placed[host] = placed.get(host, Resources()).plus(needs)
            live = core.live.get(host)
            if live is None or service.name not in live.replicas:
                pending[host] = pending.get(host, Resources()).plus(needs)
    return {h: (placed.get(h, Resources()), pending.get(h, Resources())) for h in core.hosts}


def test_a_heartbeat_visits_only_its_hosts_services() -> None:
    """No walk over every service, and look-ups bounded by the host's own replicas: the same
    count in a cluster ten times larger with the same load per host."""
    counts = []
    for hosts, services in ((6, 30), (60, 300)):
        c = Cluster(hosts, services)
        c.core.services = Walks(c.core.services)
        c.now += HB
        host = "h001"
        Walks.walks = Walks.lookups = 0
        c.beat(host)
        held = len(c.held[host])
        assert Walks.walks == 0, "a heartbeat walked every service"
        assert Walks.lookups <= 4 * held, (Walks.lookups, held)
        counts.append((held, Walks.lookups))
    assert all(lookups <= 4 * held for held, lookups in counts), counts


def test_placement_keeps_each_hosts_load_without_walking_every_service() -> None:
    c = Cluster(6, 30)
    assert {h: (v.placed, v.pending) for h, v in
            ((v.host_id, v) for v in c.core._host_views())} == reference_loads(c.core)
    c.core.services = Walks(c.core.services)
    Walks.walks = 0
    assert c.core.spare_host("s0000")
    assert Walks.walks == 0, "placement walked every service"
    c.core.services = dict(c.core.services)
    # A host dies: its primaries fail over, replacements are placed, the copies on it
    # retired; the loads kept as things change equal a fresh walk at every step.
    victim = max(sorted(c.up), key=lambda h: sum(s.primary == h
                                                for s in c.core.services.values()))
    c.up.discard(victim)
    for _ in range(DEAD // HB + 10):
        c.round()
        views = {v.host_id: (v.placed, v.pending) for v in c.core._host_views()}
        assert views == reference_loads(c.core)
    assert all(victim not in s.replicas for s in c.core.services.values())


def test_a_host_death_is_one_persist_ahead_of_what_it_tells() -> None:
    """The tick that suspects a host asks about its primaries and persists nothing; the
    round of beats that follows takes it out of the in-sync sets of the primaries that beat
    (`_shrink_silent_members`): one `Persist` for the round (the server merges a round's),
    ahead of their assignments. The failovers of all its primaries, decided from their
    duplicas' answers together, are one more, ahead of every assignment, step-down and the
    routes, which are pushed once with the version raised once."""
    c = Cluster(6, 40)
    victim = max(sorted(c.up), key=lambda h: sum(s.primary == h
                                                for s in c.core.services.values()))
    primaries = sorted(s.name for s in c.core.services.values() if s.primary == victim)
    shrinks = [s.name for s in c.core.services.values()
               if victim in s.in_sync and s.primary != victim]
    assert len(primaries) >= 3 and len(shrinks) >= 3
    c.up.discard(victim)
    c.now += FAIL + 1
    for h in sorted(c.up):
        c.beat(h)
    suspected = c.run(c.core.tick(c.now))
    assert not [a for a in suspected if isinstance(a, Persist | AssignRole)]
    beats: list[Action] = []
    for h in sorted(c.up):
        beats.extend(c.beat(h))
    beats = merge_persists(beats)
    persists = [a for a in beats if isinstance(a, Persist)]
    assert len(persists) == 1
    assert beats.index(persists[0]) < min(
        i for i, a in enumerate(beats) if isinstance(a, AssignRole))
    assert sorted(row[0] for row in persists[0].history if row[1] == "in_sync") == sorted(
        shrinks)
    asks = {a.service: a for a in suspected if isinstance(a, AskHearsPrimary)}
    assert sorted(asks) == primaries
    version = c.core.routes_version
    decided = c.run(c.core.hears_primary_many({
        name: [HearsAnswer(h, True, False, c.index.get(name, 0), a.epoch) for h in a.hosts]
        for name, a in asks.items()}, c.now))
    persists = [a for a in decided if isinstance(a, Persist)]
    assert len(persists) == 1 and decided[0] is persists[0]
    assert sorted(row[0] for row in persists[0].history if row[1] == "failover") == primaries
    told = [a for a in decided if isinstance(a, AssignRole | StepDown | PushRoutes)]
    assert {a.service for a in told if isinstance(a, StepDown)} == set(primaries)
    pushes = [a for a in decided if isinstance(a, PushRoutes)]
    assert len(pushes) == 1 and pushes[0].version == version + 1 == c.core.routes_version
    assert {r.service: r.primary_host_id for r in pushes[0].routes
            if r.service in primaries} == {n: c.core.services[n].primary for n in primaries}
    assert all(c.core.services[n].primary != victim for n in primaries)


def test_a_tick_walks_no_service_and_skips_only_settled_ones() -> None:
    """A tick looks only at the services that may need it (`_attention`), not at every
    one: through a host's death, the failovers, rebuilds and retirements, and a return,
    every service it skips is settled (the full rules would do nothing for it), and the
    in-sync sets hold only duplicas."""
    c = Cluster(8, 60)
    victim = max(sorted(c.up), key=lambda h: sum(s.primary == h
                                                for s in c.core.services.values()))
    c.up.discard(victim)
    looked = []
    for step in range(DEAD // HB + 20):
        if step == DEAD // HB + 10:
            c.up.add(victim)  # back: the copies it still reports are dropped
        c.now += HB
        for svc in c.core.services:
            c.index[svc] = c.index.get(svc, 0) + 1
        for h in sorted(c.up):
            c.beat(h)
        unsettled = {s.name for s in c.core.services.values() if not c.core._settled(s)}
        assert unsettled <= c.core._attention, unsettled - c.core._attention
        for s in c.core.services.values():
            assert set(s.in_sync) <= set(s.replicas) - {s.primary}, s
            assert len(set(s.in_sync)) == len(s.in_sync), s
        c.core.services = Walks(c.core.services)
        Walks.walks = 0
        looked.append(len(c.core._attention))
        ticked = c.run(c.core.tick(c.now))
        assert Walks.walks == 0, "a tick walked every service"
        c.core.services = dict(c.core.services)
        for a in ticked:
            if isinstance(a, AskHearsPrimary):
                c.run(c.core.hears_primary(a.service, [
                    HearsAnswer(h, h in c.up, False, c.index.get(a.service, 0), a.epoch)
                    for h in a.hosts], c.now))
    assert max(looked) > 0 and looked[-1] == 0, looked
    assert all(victim not in s.replicas or s.primary != victim
               for s in c.core.services.values())
