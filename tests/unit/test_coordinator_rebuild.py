"""The coordinator core restores redundancy: rebuilds, retirements, draining (issue 6).

A small driver stands in for the agents: each host reports what the core last assigned it,
with indexes the test sets, so every decision is deterministic and checked step by step.
"""

from __future__ import annotations

from typing import Any

import pytest

from failover.core.coordinator import (
    BUILDING,
    DUPLICA,
    PRIMARY,
    Action,
    AskHearsPrimary,
    AssignRole,
    CoordinatorCore,
    DropReplica,
    HearsAnswer,
    HostInfo,
    Persist,
    ReplicaReport,
    StartSwitchover,
    StepDown,
    Timing,
)
from failover.core.placement import Resources
from failover.errors import InvalidRequest

HB, FAIL, LEASE, DEAD = 100, 400, 300, 2000
GIB = 1 << 30
METRICS = {"cpu_count": 8.0, "memory_total_bytes": float(16 * GIB),
           "disk_free_bytes": float(100 * GIB), "disk_total_bytes": float(200 * GIB),
           "cpu_percent": 5.0, "memory_percent": 5.0}
NEEDS = Resources(0.5, 1 * GIB, 1 * GIB)


class Driver:
    def __init__(self, hosts: list[str], zones: dict[str, str] | None = None,
                 rebuild_calm_ms: int = DEAD) -> None:
        self.core = CoordinatorCore(Timing(HB, FAIL, LEASE, DEAD,
                                           rebuild_calm_ms=rebuild_calm_ms))
        self.now = 1000
        self.roles: dict[tuple[str, str], tuple[str, int]] = {}  # (host, svc) -> role, epoch
        # (host, svc) -> the in-sync set and its generation a primary was last assigned
        self.members: dict[tuple[str, str], tuple[tuple[str, ...], int]] = {}
        self.index: dict[tuple[str, str], int] = {}
        self.up = set(hosts)
        self.full: set[str] = set()  # hosts whose disk is full
        # (host, svc) -> why that replica cannot read its own snapshot or log
        self.broken: dict[tuple[str, str], str] = {}
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []
        self.actions: list[Action] = []
        for h in hosts:
            self.run(self.core.register(HostInfo(h, f"{h}:1", (zones or {}).get(h, "")),
                                        self.now, METRICS))

    def run(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            self.actions.append(a)
            if isinstance(a, Persist):
                self.events.extend(a.history)
            elif isinstance(a, AssignRole) and a.host_id in self.up:
                self.roles[(a.host_id, a.service)] = (a.role, a.epoch)
                self.members[(a.host_id, a.service)] = (a.in_sync, a.in_sync_generation)
            elif isinstance(a, DropReplica) and a.host_id in self.up:
                self.roles.pop((a.host_id, a.service), None)
                self.index.pop((a.host_id, a.service), None)
                self.broken.pop((a.host_id, a.service), None)  # its data is gone with it
        return actions

    def beat(self, host: str) -> None:
        reports = []
        for (h, svc), (role, epoch) in sorted(self.roles.items()):
            if h != host:
                continue
            idx = self.index.get((h, svc), 0)
            # A primary reports the in-sync set it applies: the one it was last assigned.
            in_sync, generation = self.members.get((h, svc), ((), 0))
            reports.append(ReplicaReport(svc, role, epoch, idx, idx if role == PRIMARY else 0,
                                         idx, matched_index=idx,
                                         in_sync=in_sync if role == PRIMARY else None,
                                         disk_full=h in self.full,
                                         broken=self.broken.get((h, svc), ""),
                                         in_sync_generation=generation))
        _, actions = self.core.heartbeat(host, METRICS, reports, self.now)
        self.run(actions)

    def step(self, ms: int = HB) -> None:
        """Time passes in heartbeat steps: live hosts beat, the core ticks."""
        end = self.now + ms
        while self.now < end:
            self.now += min(HB // 4, end - self.now)
            if self.now % HB == 0:
                for h in sorted(self.up):
                    self.beat(h)
            self.run(self.core.tick(self.now))
            for a in [a for a in self.actions if isinstance(a, AskHearsPrimary)]:
                self.actions.remove(a)
                answers = [HearsAnswer(h, h in self.up, False, self.index.get((h, a.service), 0),
                                       a.epoch) for h in a.hosts]
                self.run(self.core.hears_primary(a.service, answers, self.now))

    def kinds(self) -> list[str]:
        return [e[1] for e in self.events]

    def create(self, name: str = "s", replicas: int = 2) -> None:
        self.run(self.core.create_service(name, "kv", replicas, "sync", self.now, NEEDS))
        self.step(2 * HB)

    def write(self, name: str, count: int) -> None:
        """The primary and every in-sync duplica reach `count` more entries."""
        service = self.core.services[name]
        for h in [service.primary, *service.in_sync]:
            self.index[(h, name)] = self.index.get((h, name), 0) + count

    def catch_up(self, name: str, host: str) -> None:
        service = self.core.services[name]
        self.index[(host, name)] = self.index.get((service.primary, name), 0)


def test_dead_duplica_host_is_rebuilt_elsewhere_then_retired() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create()
    s = d.core.services["s"]
    assert (s.primary, s.duplicas()) == ("h1", ["h2"])
    d.write("s", 50)
    d.up.discard("h2")
    d.step(DEAD - HB)
    # Suspected, out of the in-sync set, but not yet dead: no rebuild for a short outage.
    assert s.in_sync == [] and "h3" not in s.replicas
    d.step(3 * HB)
    assert s.replicas["h3"] == BUILDING and s.in_sync == []
    assert "placement" in d.kinds()
    # Building until it has everything the primary committed.
    d.step(3 * HB)
    assert s.replicas["h3"] == BUILDING
    d.catch_up("s", "h3")
    d.step(2 * HB)
    assert s.replicas["h3"] == DUPLICA and s.in_sync == ["h3"]
    assert "rebuilt" in d.kinds()
    # Now the dead host's copy is retired, and it is told to drop it when it hears.
    assert "h2" not in s.replicas
    assert any(isinstance(a, DropReplica) and a.host_id == "h2" for a in d.actions)
    retired = [e for e in d.events if e[1] == "retired"]
    assert retired and "its host is dead" in retired[0][2]
    # A primary's assignment names the new duplica set.
    last = [a for a in d.actions if isinstance(a, AssignRole) and a.host_id == "h1"][-1]
    assert last.duplicas == {"h3": "h3:1"} and last.in_sync == ("h3",)


def test_a_retired_host_that_returns_is_told_to_drop_its_copy() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create()
    d.up.discard("h2")
    d.step(DEAD + 2 * HB)
    d.catch_up("s", "h3")
    d.step(3 * HB)
    assert "h2" not in d.core.services["s"].replicas
    d.actions.clear()
    d.up.add("h2")  # it still holds its old copy
    d.step(2 * HB)
    drops = [a for a in d.actions if isinstance(a, DropReplica) and a.host_id == "h2"]
    assert len(drops) == 1 and ("h2", "s") not in d.roles
    assert d.core.live["h2"].dead is False


def failed_over(rebuild_calm_ms: int) -> Driver:
    """Service s on h1 (primary) and h2, h1 silent from then on: stepped until h2 was
    promoted, no further."""
    d = Driver(["h1", "h2", "h3"], rebuild_calm_ms=rebuild_calm_ms)
    d.create()
    d.write("s", 10)
    d.up.discard("h1")
    s = d.core.services["s"]
    while s.epoch == 1:
        assert d.now < 10_000, "no failover"
        d.step(HB)
    assert s.primary == "h2" and s.epoch == 2
    return d


def test_failover_rebuilds_after_the_calm_and_the_first_in_sync_copy_wins() -> None:
    # The calm is shorter than host_dead_ms here: the rebuild waits for the calm only, not
    # for the old primary's host to be declared dead (the deposed primary does not count).
    calm = 500
    d = failed_over(calm)
    s = d.core.services["s"]
    promoted_ms = d.core._promoted_ms["s"]
    # Nothing is rebuilt while the promotion lands and clients find the new primary.
    while "h3" not in s.replicas:
        assert d.now - promoted_ms <= calm + HB, "the rebuild waited past its calm"
        d.step(HB)
    assert s.replicas["h3"] == BUILDING
    assert d.now - promoted_ms >= calm
    assert not d.core.live["h1"].dead
    # The old primary comes back and catches up first: the building copy is retired.
    d.up.add("h1")
    d.step(2 * HB)
    d.catch_up("s", "h1")
    d.step(3 * HB)
    assert "h1" in s.in_sync
    assert "h3" not in s.replicas and set(s.replicas) == {"h1", "h2"}
    assert any(isinstance(a, DropReplica) and a.host_id == "h3" for a in d.actions)


def test_a_deposed_primary_back_within_the_calm_catches_up_and_nothing_is_rebuilt() -> None:
    # An agent process that crashed comes back within about a second: its copy of the
    # service holds nearly everything, and a snapshot streamed to a third host is waste.
    calm = 1500
    d = failed_over(calm)
    s = d.core.services["s"]
    d.up.add("h1")
    d.step(2 * HB)
    d.catch_up("s", "h1")
    d.step(calm + 3 * HB)
    assert "h1" in s.in_sync and set(s.replicas) == {"h1", "h2"}
    assert not any(isinstance(a, AssignRole) and a.host_id == "h3" for a in d.actions)
    assert not any(e[1] == "placement" for e in d.events)
    assert "s" not in d.core._promoted_ms  # forgotten once the service is whole again


def test_no_spare_host_records_one_event_and_retries_when_hosts_change() -> None:
    d = Driver(["h1", "h2"])
    d.create()
    d.write("s", 5)
    d.up.discard("h2")
    d.step(DEAD + 5 * HB)
    failed = [e for e in d.events if e[1] == "placement_failed"]
    assert len(failed) == 1
    assert "h1: holds a replica of it already" in failed[0][2]
    assert "h2: holds a replica of it already" in failed[0][2]
    assert "found no host" in d.core.unplaced["s"]
    # A new host arrives: placement is retried without anyone asking.
    d.up.add("h3")
    d.run(d.core.register(HostInfo("h3", "h3:1"), d.now, METRICS))
    d.step(2 * HB)
    assert d.core.services["s"].replicas["h3"] == BUILDING
    assert "s" not in d.core.unplaced


def test_drain_moves_the_primary_and_rebuilds_its_replicas_elsewhere() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create()
    s = d.core.services["s"]
    d.write("s", 5)
    d.run(d.core.set_draining("h1", True))
    assert d.core.hosts["h1"].draining
    d.step(2 * HB)
    # The primary's host does not count: a third copy is built first (surge).
    assert s.replicas["h3"] == BUILDING
    moves = [a for a in d.actions if isinstance(a, StartSwitchover)]
    assert moves == [StartSwitchover("s", "h2")]
    # The daemon runs the switchover protocol; here it succeeds at once.
    d.core.switchover_begin("s", "h2")
    d.run(d.core.switchover_complete("s", "h2", stall_ms=3))
    d.step(2 * HB)
    assert s.primary == "h2"
    d.catch_up("s", "h3")
    d.catch_up("s", "h1")
    d.step(3 * HB)
    assert set(s.replicas) == {"h2", "h3"} and s.in_sync == ["h3"]
    retired = [e for e in d.events if e[1] == "retired"]
    assert retired and "draining" in retired[0][2]
    # Undrain: the host takes new replicas again.
    d.run(d.core.set_draining("h1", False))
    assert not d.core.hosts["h1"].draining
    with pytest.raises(InvalidRequest, match="no host 'h9'"):
        d.core.set_draining("h9", True)


def test_switchover_never_targets_a_draining_host() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create(replicas=3)
    d.run(d.core.set_draining("h3", True))
    assert d.core.switchover_target("s", "") == "h2"
    with pytest.raises(InvalidRequest, match="not a live in-sync duplica"):
        d.core.switchover_target("s", "h3")


def test_create_places_by_policy_and_refuses_with_the_reason() -> None:
    d = Driver(["h1", "h2", "h3"], zones={"h1": "a", "h2": "a", "h3": "b"})
    d.run(d.core.create_service("s", "kv", 2, "sync", d.now, NEEDS))
    # Zones spread: one replica in each zone.
    assert set(d.core.services["s"].replicas) == {"h1", "h3"}
    with pytest.raises(InvalidRequest, match="cannot place t: 1 of 4 replicas found no host"):
        d.core.create_service("t", "kv", 4, "sync", d.now, NEEDS)
    with pytest.raises(InvalidRequest, match="placement policy 'nope'"):
        d.core.create_service("t", "kv", 1, "sync", d.now, NEEDS, policy="nope")
    d.run(d.core.create_service("t", "kv", 1, "sync", d.now, NEEDS, policy="first-fit"))
    assert d.core.services["t"].placement == "first-fit"


def test_placed_state_survives_a_coordinator_restart() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create()
    d.write("s", 5)
    d.up.discard("h2")
    d.step(DEAD + 2 * HB)
    store: dict[str, bytes] = {}
    for a in d.actions:
        if isinstance(a, Persist):
            store.update(a.puts)
    again = CoordinatorCore(Timing(HB, FAIL, LEASE, DEAD))
    actions = again.restore(store, d.now)
    assert again.services["s"].replicas["h3"] == BUILDING
    assert again.services["s"].needs == NEEDS.to_dict()
    # The building replica is told its role again.
    assert any(isinstance(a, AssignRole) and a.host_id == "h3" and a.role == BUILDING
               for a in actions)


def test_a_full_duplica_leaves_the_in_sync_set_until_it_has_room_again() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create(replicas=3)
    s = d.core.services["s"]
    assert s.in_sync == ["h2", "h3"]
    d.write("s", 10)
    d.full.add("h3")
    d.step(2 * HB)
    assert s.in_sync == ["h2"]
    shrink = [e for e in d.events if e[1] == "in_sync" and "h3" in e[2]]
    assert "its disk is full" in shrink[-1][2]
    # Caught up but still full: it stays out.
    d.catch_up("s", "h3")
    d.step(3 * HB)
    assert s.in_sync == ["h2"]
    d.full.discard("h3")
    d.step(2 * HB)
    assert s.in_sync == ["h2", "h3"]
    # A full duplica is not replaced: it still holds the data, and will catch up.
    assert set(s.replicas) == {"h1", "h2", "h3"}


def test_a_full_primary_is_moved_off_by_switchover() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create(replicas=3)
    d.write("s", 10)
    d.full.add("h1")
    d.step(2 * HB)
    moves = [a for a in d.actions if isinstance(a, StartSwitchover)]
    assert moves and moves[0].service == "s" and moves[0].to_host in ("h2", "h3")


def test_a_migration_copy_is_not_dropped_before_it_joins() -> None:
    d = Driver(["h1", "h2", "h3"])
    d.create()
    source = d.core.migration_source("s", "h3", "primary", "")
    d.core.migration_begin("s", source, "h3")
    # The target already holds the copy and reports it before the coordinator adds it.
    d.roles[("h3", "s")] = ("building", d.core.services["s"].epoch)
    d.actions.clear()
    d.step(3 * HB)
    assert not any(isinstance(a, DropReplica) and a.host_id == "h3" for a in d.actions)
    d.run(d.core.migration_complete("s", {"method": "precopy"}, d.now))
    assert d.core.services["s"].replicas["h3"] == BUILDING


def test_a_retired_primary_that_was_cut_off_is_stepped_down_before_it_is_told_to_drop() -> None:
    """A primary cut off long enough to be failed over, declared dead and retired comes back
    without a restart, still primary at its old epoch and confirmed: the agent refuses to
    delete a serving primary's data at another epoch (`ReplicaCore.check_drop`), so a drop
    alone would leave it a primary on disk forever. It is stepped down at the service's epoch
    first, on the same ordered queue, then dropped."""
    d = Driver(["h1", "h2", "h3"])
    d.create()
    d.write("s", 10)
    d.up.discard("h1")
    d.step(DEAD + FAIL + LEASE + 3 * HB)
    d.catch_up("s", "h3")
    d.step(3 * HB)
    s = d.core.services["s"]
    assert s.primary != "h1" and "h1" not in s.replicas and s.epoch == 2
    d.actions.clear()
    d.up.add("h1")
    assert d.roles[("h1", "s")] == (PRIMARY, 1)  # it never heard of epoch 2
    d.step(2 * HB)
    to_h1 = [a for a in d.actions if isinstance(a, (StepDown, DropReplica)) and a.host_id == "h1"]
    assert [type(a) for a in to_h1[:2]] == [StepDown, DropReplica], to_h1
    assert to_h1[0].epoch == to_h1[1].epoch == 2


def test_an_assignment_whose_peers_the_replica_does_not_hold_is_sent_again() -> None:
    """Found by the simulation (short/86) and by tests/chaos/test_disk_full.py: a deposed
    primary took the StepDown (role and epoch, written or not) but its AssignRole naming the
    new primary failed for a full disk and was never re-sent, since role and epoch matched;
    knowing no primary, it refused the new primary's stream for good (a duplica takes items
    only from its named primary). A primary that missed its new duplica set likewise never fed
    a rebuilt copy. Each replica now reports the peers it holds; a mismatch is re-sent."""
    d = Driver(["h1", "h2", "h3"])
    d.create()
    s = d.core.services["s"]
    primary, duplica = s.primary, s.duplicas()[0]

    def beat(host: str, role: str, **peers: Any) -> list[Action]:
        report = ReplicaReport("s", role, s.epoch, 0, 0, 0, **peers)
        return d.core.heartbeat(host, METRICS, [report], d.now)[1]

    def sent_to(actions: list[Action], host: str) -> list[AssignRole]:
        return [a for a in actions if isinstance(a, AssignRole) and a.host_id == host]

    assert sent_to(beat(duplica, DUPLICA, primary_host_id=primary), duplica) == []
    again = sent_to(beat(duplica, DUPLICA, primary_host_id=""), duplica)
    assert again and again[0].primary is not None and again[0].primary[0] == primary
    assert sent_to(beat(primary, PRIMARY, duplicas=(duplica,)), primary) == []
    again = sent_to(beat(primary, PRIMARY, duplicas=()), primary)
    assert again and set(again[0].duplicas) == {duplica}


def test_a_drain_that_cannot_finish_is_refused_at_once_with_the_placement_reasons() -> None:
    """Issue 17 item 8: three hosts, three replicas: no host can take host h1's replica, so
    a drain that must finish is refused with why, and changes nothing; one that need not
    finish is started and says why it cannot (its primaries still move off)."""
    from failover.errors import DrainCannotFinish

    d = Driver(["h1", "h2", "h3"])
    d.create("accounts", replicas=3)
    with pytest.raises(DrainCannotFinish) as refused:
        d.core.set_draining("h1", True, must_finish=True)
    text = str(refused.value)
    assert "draining h1 cannot finish" in text and "accounts (3 replicas)" in text
    assert "h2: holds a replica of it already" in text
    assert not d.core.hosts["h1"].draining
    d.run(d.core.set_draining("h1", True))
    assert d.core.hosts["h1"].draining
    assert "accounts" in "; ".join(d.core.drain_blockers("h1"))
    with pytest.raises(DrainCannotFinish, match="cannot finish, it stays draining"):
        d.core.set_draining("h1", True, must_finish=True)
    # A fourth host can take it: the drain can finish, and nothing blocks it.
    d.run(d.core.set_draining("h1", False))
    d.run(d.core.register(HostInfo("h4", "h4:1", ""), d.now, METRICS))
    d.step(HB)
    assert d.core.drain_blockers("h1") == []
    d.run(d.core.set_draining("h1", True, must_finish=True))
    assert d.core.hosts["h1"].draining


def test_a_migration_to_a_host_that_holds_a_replica_says_why_and_what_would_do() -> None:
    d = Driver(["h1", "h2", "h3", "h4"])
    d.create("accounts", replicas=2)
    s = d.core.services["accounts"]
    duplica = s.duplicas()[0]
    with pytest.raises(InvalidRequest) as refused:
        d.core.migration_source("accounts", duplica, PRIMARY, "")
    assert f"failoverctl switchover accounts --to {duplica}" in str(refused.value)
    with pytest.raises(InvalidRequest) as refused:
        d.core.migration_source("accounts", s.primary, DUPLICA, "")
    spare = sorted({"h1", "h2", "h3", "h4"} - set(s.replicas))
    assert f"hosts that could take it: {', '.join(spare)}" in str(refused.value)
