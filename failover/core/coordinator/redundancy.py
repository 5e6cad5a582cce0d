"""Redundancy: placement, rebuild, retirement and draining (docs/design.md, Redundancy and
Draining).

Events in: a tick with the monotonic time (`_restore_redundancy` and `_move_primary` for
every service), an operator's drain (`set_draining`). Actions out: new `building` replicas
placed by `failover.core.placement` (persisted before their assignments), retirements
(persisted, then `DropReplica`), history rows when nothing fits, and `StartSwitchover` for a
primary that must leave its host (draining, disk full, or leaving after a migration) or
that a rebalance moves to a host with fewer primaries (`_rebalance`). At most
`rebuild_concurrency_max` replicas build at once. A replica is built only from a serving
primary, and a copy is retired only once enough others are good, so none is dropped before
its replacement holds everything.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from failover import defaults
from failover.core import placement
from failover.core.coordinator.actions import Action, DropReplica, Persist, StartSwitchover
from failover.core.coordinator.model import (
    HOST_PREFIX,
    SERVICE_PREFIX,
    CoreState,
    HostLive,
    ServiceInfo,
    pack,
    set_in_sync,
)
from failover.core.names import check_host_id
from failover.core.placement import HostView, Resources
from failover.core.roles import BUILDING, PRIMARY
from failover.errors import DrainCannotFinish, InvalidRequest


class Redundancy(CoreState):
    """Part of `CoordinatorCore`: how many replicas each service has, and where."""

    def _counts(self, service: ServiceInfo, host_id: str) -> bool:
        """Whether this replica counts toward the desired number: not on a dead or draining
        host, not a primary deposed by a failover that has stayed silent since, and not
        broken."""
        live = self.live.get(host_id)
        info = self.hosts.get(host_id)
        return (live is not None and not live.dead and info is not None and not info.draining
                and (service.name, host_id) not in self._deposed
                and host_id not in service.leaving
                and not self._broken(service, host_id))

    def _broken(self, service: ServiceInfo, host_id: str) -> str:
        """Why this host's replica of `service` cannot read its own snapshot or log, as its
        host last reported; "" when it can (or its host has not said)."""
        live = self.live.get(host_id)
        report = live.replicas.get(service.name) if live is not None else None
        return report.broken if report is not None else ""

    def _restore_redundancy(self, service: ServiceInfo, now_ms: int) -> list[Action]:
        """Brings the service back to its desired replica count: places building replicas
        for the missing ones; once enough replicas are in sync, retires the rest (a copy on a
        dead or draining host, a building replica that lost the race to a returning one)."""
        if (service.name in self.failovers or service.name in self.switchovers
                or service.name in self.migrations):
            return []
        primary_live = self.live.get(service.primary)
        primary_report = primary_live.replicas.get(service.name) if primary_live else None
        if (primary_live is None or not primary_live.alive or primary_report is None
                or primary_report.epoch != service.epoch
                or primary_report.role != PRIMARY or primary_report.broken):
            return []  # a replica is built from a serving primary only
        if self._complete(service):
            return []
        broken = [h for h in sorted(service.replicas)
                  if h != service.primary and self._broken(service, h)]
        if broken:
            # A broken copy holds nothing anyone can use, and the serving primary holds every
            # write: it is dropped now, so that its own host can take a fresh copy when no
            # other host can (invariant 12); the next tick places the missing replica.
            return [a for h in broken for a in self._retire(service, h)]
        counted = [h for h in service.replicas if self._counts(service, h)]
        missing = service.desired_replicas - len(counted)
        if missing > 0:
            if self._rebuild_calming(service.name, now_ms):
                return []
            return self._place(service, missing, now_ms)
        actions: list[Action] = []
        self._rebuild_waiting.discard(service.name)
        if self.unplaced.pop(service.name, None) is not None:
            actions.append(Persist({}, history=((
                service.name, "placement", f"{service.name} has its "
                f"{service.desired_replicas} replicas again", {}),)))
        # Good: serving or in sync, alive, and counted. Retire only once enough are good,
        # so a copy is never dropped before its replacement holds everything.
        good = [h for h in sorted(counted) if h == service.primary or (
            h in service.in_sync and self.live[h].alive)]
        if len(good) < service.desired_replicas:
            return actions
        extra = [h for h in service.replicas if h not in good and h != service.primary]
        spare = [h for h in good if h != service.primary]
        surplus = len(good) - service.desired_replicas
        if surplus > 0:
            # Keep zones spread: first retire where the zone holds another good replica.
            zones = [self.hosts[h].zone for h in good]
            spare.sort(key=lambda h: (zones.count(self.hosts[h].zone) > 1, h), reverse=True)
            extra.extend(spare[:surplus])
        for host in sorted(extra):
            actions.extend(self._retire(service, host))
        return actions

    def _rebuild_calming(self, name: str, now_ms: int) -> bool:
        """Whether a rebuild of `name` waits: within `rebuild_calm_ms` of the failover that
        promoted its primary. A host death promotes all its primaries at one moment, and
        rebuilding every lost copy at once, each streamed by a primary just promoted, took
        the CPU the promotions and the clients rerouting needed. Only the service's own
        failover counts, so a cluster that keeps failing somewhere still rebuilds; the tick
        keeps visiting the service (it is not settled) until the wait is over, and forgets
        the promotion once the service is settled or deleted."""
        promoted_ms = self._promoted_ms.get(name)
        return promoted_ms is not None and now_ms - promoted_ms < self.timing.rebuild_calm_ms

    def _settled(self, service: ServiceInfo) -> bool:
        """Whether `_restore_redundancy` and `_move_primary` would do nothing for `service`
        and change nothing, in one pass (a tick asks it of every service first): nothing in
        progress, a serving primary whose disk is not full, and `_complete`."""
        name = service.name
        if name in self.failovers or name in self.switchovers or name in self.migrations:
            return False
        live = self.live.get(service.primary)
        if live is None or not live.alive:
            return False
        report = live.replicas.get(name)
        return (report is not None and report.epoch == service.epoch
                and report.role == PRIMARY and not report.broken and not report.disk_full
                and self._complete(service))

    def _complete(self, service: ServiceInfo) -> bool:
        """The common case, in one pass over the replicas (a tick visits every service): as
        many replicas as desired, every one counted and good (alive and in sync, or the
        primary), none leaving, nothing unplaced. Then nothing is to be placed or retired,
        as the full rules below would find."""
        if (len(service.replicas) != service.desired_replicas or service.leaving
                or service.name in self.unplaced):
            return False
        name, primary, in_sync = service.name, service.primary, service.in_sync
        for host in service.replicas:
            live = self.live.get(host)
            info = self.hosts.get(host)
            if (live is None or live.dead or not live.alive or info is None or info.draining
                    or (host != primary and host not in in_sync)
                    or (name, host) in self._deposed):
                return False
            report = live.replicas.get(name)
            if report is not None and report.broken:
                return False
        return True

    def _place(self, service: ServiceInfo, missing: int, now_ms: int) -> list[Action]:
        policy = service.placement or self.placement_policy
        # Throttled: at most `rebuild_concurrency_max` building replicas cluster-wide; the
        # rest wait, retried on later ticks, recorded once in history as waiting.
        limit = self.timing.rebuild_concurrency_max
        slots = limit - len(self._building_since)
        if slots <= 0:
            return self._rebuild_wait(service, missing, f"{limit} building at most at once")
        missing = min(missing, slots)
        holding = {h: self.hosts[h].zone if h in self.hosts else "" for h in service.replicas}
        # ... and at most `rebuild_per_host_max` on any one host: a host building that many
        # is no candidate now. Replicas left unplaced for that reason wait as above rather
        # than fail: a busy host is free again within a build.
        views = self._host_views()
        per_host_max = self.timing.rebuild_per_host_max
        per_host = Counter(host for _name, host in self._building_since)
        busy = {h for h, n in per_host.items() if n >= per_host_max}
        if busy:
            views = [v for v in views if v.host_id not in busy]
        found = placement.place(policy, Resources.from_dict(service.needs), missing, views,
                                holding)
        if busy and found.reason:
            if not found.hosts:
                return self._rebuild_wait(service, missing,
                                          f"{per_host_max} building at most on a host")
            found = placement.Placement(found.hosts)  # the rest is placed on a later tick
        self._rebuild_waiting.discard(service.name)
        actions: list[Action] = []
        for host in found.hosts:
            service.replicas[host] = BUILDING
            self._building_since[(service.name, host)] = now_ms
        self._track(service)
        if found.hosts:
            actions.append(Persist({SERVICE_PREFIX + service.name: pack(service)}, history=((
                service.name, "placement",
                f"{service.name}: building a new replica on {', '.join(found.hosts)} "
                f"({policy}) to restore {service.desired_replicas} replicas",
                {"hosts": list(found.hosts), "policy": policy}),)))
            actions.extend(self._assignments(service, only=None))
        if not found.reason:
            self.unplaced.pop(service.name, None)
            return actions
        first = service.name not in self.unplaced
        self.unplaced[service.name] = found.reason
        # Free room changes with every heartbeat: one event when it starts, then at most one
        # per host_dead_ms while it lasts (status always shows the newest reason).
        last = self._unplaced_logged_ms.get(service.name)
        if first or last is None or now_ms - last >= self.timing.host_dead_ms:
            self._unplaced_logged_ms[service.name] = now_ms
            actions.append(Persist({}, history=((
                service.name, "placement_failed", f"{service.name}: {found.reason}; "
                "retried as hosts change", {"reason": found.reason, "policy": policy}),)))
        return actions

    def _rebuild_wait(self, service: ServiceInfo, missing: int, why: str) -> list[Action]:
        """`missing` replicas of `service` wait for a rebuild slot: one history row when the
        wait starts, none on the ticks that retry it."""
        if service.name in self._rebuild_waiting:
            return []
        self._rebuild_waiting.add(service.name)
        return [Persist({}, history=((
            service.name, "placement_waiting", f"{service.name}: {missing} replica(s) wait "
            f"for a rebuild slot ({why})",
            {"missing": missing, "limit": self.timing.rebuild_concurrency_max,
             "per_host_limit": self.timing.rebuild_per_host_max}),))]

    def _host_views(self) -> list[HostView]:
        """Every host as placement sees it, with the needs of the replicas placed on it:
        O(hosts). Each host's view is kept (`_views`) until its loads (its replicas, or
        which of them it reports), its metrics, liveness, draining or zone change: a
        heartbeat with the same metrics keeps them (`Membership.heartbeat`)."""
        order = self._host_order
        if len(order) != len(self.hosts):
            order = self._host_order = sorted(self.hosts)
        views = []
        kept = self._views
        hosts, live_of, loads_of, patching = self.hosts, self.live, self._loads, self.patching
        for host_id in order:
            info = hosts[host_id]
            loads = loads_of.get(host_id)
            if loads is None:
                loads = loads_of[host_id] = self._host_load(host_id)
            live = live_of.get(host_id)
            metrics = live.metrics if live is not None else None
            alive = live is not None and live.alive
            draining = info.draining or host_id in patching
            known = kept.get(host_id)
            if known is not None:
                view = known[0]
                if (known[1] is metrics and view.placed is loads[0]
                        and view.pending is loads[1] and view.alive == alive
                        and view.draining == draining and view.zone == info.zone):
                    views.append(view)
                    continue
            measured = placement.capacity_and_free(metrics) if metrics is not None else None
            view = HostView(
                host_id=host_id, zone=info.zone, alive=alive, draining=draining,
                capacity=measured[0] if measured else None, free=measured[1] if measured else None,
                placed=loads[0], pending=loads[1],
            )
            kept[host_id] = (view, metrics)
            views.append(view)
        return views

    def _host_load(self, host_id: str) -> tuple[Resources, Resources]:
        """The needs of every replica placed on the host, and of those it does not report
        yet, summed in the order of `services` (as a walk over all of them would)."""
        placed = pending = Resources()
        live = self.live.get(host_id)
        for service in self._holding(host_id):
            needs = Resources.from_dict(service.needs)
            placed = placed.plus(needs)
            if live is None or service.name not in live.replicas:
                pending = pending.plus(needs)
        return placed, pending

    def _retire(self, service: ServiceInfo, host: str) -> list[Action]:
        """Removes a replica from the service (persisted first) and tells its host to drop
        it; the primary stops shipping to it. A host that does not hear it now is told again
        when it next reports the replica."""
        assert host != service.primary, (service.name, host)
        role = service.replicas.pop(host)
        self._untrack(service.name, host)
        set_in_sync(service, [h for h in service.in_sync if h != host])
        service.promotable = [h for h in service.promotable if h != host]
        self._promotable_at.get(service.name, {}).pop(host, None)
        self._building_since.pop((service.name, host), None)
        self._deposed.discard((service.name, host))
        leaving = host in service.leaving
        service.leaving = [h for h in service.leaving if h != host]
        if not service.leaving:
            self._move_to.pop(service.name, None)
        live = self.live.get(host)
        broken = self._broken(service, host)
        why = ("its host is dead" if live is None or live.dead
               else f"it cannot read its own snapshot or log ({broken}); it is rebuilt from "
                    "the primary" if broken
               else "it moved to another host" if leaving
               else "its host is draining" if self.hosts[host].draining
               else f"{service.desired_replicas} other replicas are in sync")
        actions: list[Action] = [Persist({SERVICE_PREFIX + service.name: pack(service)},
                                         history=((
            service.name, "retired", f"{host} ({role}) retired from {service.name}: {why}",
            {"host_id": host, "role": role}),))]
        info = self.hosts.get(host)
        if info is not None:
            actions.append(DropReplica(host, info.address, service.name, service.epoch))
        actions.extend(self._assignments(service, only=service.primary))
        return actions

    def _move_primary(self, service: ServiceInfo, now_ms: int) -> list[Action]:
        """A primary on a draining host, or whose disk is full (it refuses every write),
        moves by switchover to a live, promotable in-sync duplica on a host that is not
        draining (asked again every failure timeout)."""
        info = self.hosts.get(service.primary)
        live = self.live.get(service.primary)
        report = live.replicas.get(service.name) if live else None
        full = (report is not None and report.disk_full and report.role == PRIMARY
                and report.epoch == service.epoch)
        leaving = service.primary in service.leaving
        if (info is None or not (info.draining or full or leaving)
                or service.name in self.failovers or service.name in self.switchovers):
            return []
        last = self._drain_moved_ms.get(service.name)
        if last is not None and now_ms - last < self.timing.failure_timeout_ms:
            return []
        targets = [h for h in service.in_sync if h in service.promotable
                   and self.live.get(h, HostLive(0, False)).alive
                   and not self.hosts[h].draining and h not in service.leaving]
        if not targets:
            return []
        self._drain_moved_ms[service.name] = now_ms
        preferred = self._move_to.get(service.name)
        if preferred in targets:
            return [StartSwitchover(service.name, preferred)]
        if preferred in service.replicas:
            return []  # a migration's copy: hand over to it once it is in sync
        return [StartSwitchover(service.name, max(targets, key=lambda h: (
            self._matched(service, h, self.live[h].replicas[service.name])
            if service.name in self.live[h].replicas else 0, h)))]

    def _rebalance(self, now_ms: int) -> list[Action]:
        """Evens out primaries across hosts after hosts come back: a `StartSwitchover` of one
        primary from a host holding the most to a member that can take over at once
        (`_can_lead`) on a host holding at least two fewer (so every move narrows the
        spread, and none undoes another). When no such move exists but the spread is still
        two or more, one step toward it: a primary from a host holding the most to a host
        holding one fewer that can then move one of its own to a host holding two fewer
        than the most (so one host one above even and another one below do not stay so).
        Rate limited (one at a time, at most one per `rebalance_gap_ms`, counted from the
        end of the last switchover, migration or patch, and doubled after each abandoned
        move up to REBALANCE_BACKOFF_DOUBLINGS_MAX times), never while a failover is in
        progress or within `rebalance_calm_ms` of one (a storm), nor while a switchover,
        migration or patch is in progress, and only for a service whose replicas are all in
        place (`_settled`) and none leaving or draining. O(hosts) plus the replicas on the
        hosts holding the most, at most once per gap."""
        gap = self.timing.rebalance_gap_ms
        if self.failovers or self._calm_since_ms is None:
            self._calm_since_ms = now_ms
        if self.switchovers or self.migrations or self.patching:
            # The gap runs from the end of the move: one that held writes for the whole
            # switchover timeout, then failed, was tried again at once, and a move that
            # always fails held the service's writes nearly all the time.
            if self._rebalanced_ms is not None:
                self._rebalanced_ms = now_ms
            return []
        gap <<= min(self._rebalance_failures, defaults.REBALANCE_BACKOFF_DOUBLINGS_MAX)
        if (gap <= 0 or now_ms - self._calm_since_ms < self.timing.rebalance_calm_ms
                or (self._rebalanced_ms is not None and now_ms - self._rebalanced_ms < gap)):
            return []
        self._rebalanced_ms = now_ms
        counts = self._primaries
        eligible = sorted(h for h, info in self.hosts.items() if not info.draining
                          and self.live.get(h, HostLive(0, False)).alive)
        if len(eligible) < 2:
            return []
        fewest = min(counts.get(h, 0) for h in eligible)
        sources = sorted(eligible, key=lambda h: (-counts.get(h, 0), h))
        most = counts.get(sources[0], 0)
        if most - fewest < 2:
            return []
        disk_ok: dict[str, bool] = {}  # host -> whether its disk can take a primary's load
        for source in sources:
            have = counts.get(source, 0)
            if have - fewest < 2:
                break
            best = self._move_from(source, have - 2, fewest, disk_ok)
            if best is not None:
                return self._rebalance_move(source, have, *best)
        # No move narrows the spread at once: a step to a host holding one fewer than the
        # most, from which one can then go to a host holding two fewer.
        onward: dict[str, bool] = {}  # host -> whether it has such a move
        for source in sources:
            if counts.get(source, 0) < most:
                break
            for service in self._holding(source):
                if service.primary != source or service.leaving or not self._settled(service):
                    continue
                for target in service.in_sync:
                    if counts.get(target, 0) != most - 1:
                        continue
                    if target not in onward:
                        onward[target] = self._move_from(target, most - 2, fewest,
                                                         disk_ok) is not None
                    if onward[target] and self._can_lead(service, target, disk_ok):
                        return self._rebalance_move(source, most, most - 1, service.name,
                                                    target)
        return []

    def rebalance_ended(self, completed: bool) -> None:
        """A rebalance's switchover completed, or was abandoned (the next waits longer)."""
        self._rebalance_failures = 0 if completed else self._rebalance_failures + 1

    def _move_from(self, source: str, have_max: int, fewest: int,
                   disk_ok: dict[str, bool]) -> tuple[int, str, str] | None:
        """The move of a primary off `source` to a member that can take over at once on a
        host holding at most `have_max` primaries: (its count, service, target), the fewest
        first (stopping at `fewest`), or None."""
        counts = self._primaries
        best: tuple[int, str, str] | None = None
        for service in self._holding(source):
            if service.primary != source or service.leaving or not self._settled(service):
                continue
            for target in service.in_sync:
                have = counts.get(target, 0)
                if (have <= have_max and (best is None or (have, service.name, target) < best)
                        and self._can_lead(service, target, disk_ok)):
                    best = (have, service.name, target)
            if best is not None and best[0] == fewest:
                break
        return best

    def _rebalance_move(self, source: str, most: int, have: int, name: str,
                        target: str) -> list[Action]:
        self._rebalancing = {name}  # its switchover plan is named a rebalance
        return [Persist({}, history=((
            name, "rebalance", f"moving {name}'s primary from {source} ({most} "
            f"primaries) to {target} ({have}) to even out primaries",
            {"from": source, "to_host": target}),)),
            StartSwitchover(name, target)]

    def _can_lead(self, service: ServiceInfo, target: str, disk_ok: dict[str, bool]) -> bool:
        """Whether `target` can take `service`'s primary over at once, as a rebalance asks
        (its switchover holds writes until the target has the whole log and every logged
        write is committed): a promotable in-sync member on a host that is not draining,
        and `_keeps_up`, as must every other in-sync member, since the commit waits for
        them all; the primary's host must have disk to spare too (`disk_ok`). A rebalance
        that started while another member's disk was full held writes for the whole
        switchover timeout (5 s; tests/chaos/test_disk_full.py): that member is evicted
        from the in-sync set only after the hold."""
        if target not in service.promotable or target not in service.in_sync:
            return False
        info = self.hosts.get(target)
        primary_live = self.live.get(service.primary)
        if info is None or info.draining or primary_live is None:
            return False
        primary_report = primary_live.replicas.get(service.name)
        if (primary_report is None or primary_report.broken
                or not self._disk_ok(service.primary, disk_ok)):
            return False
        return all(self._keeps_up(service, member, primary_report.durable_index, disk_ok)
                   for member in sorted(service.in_sync))

    def _keeps_up(self, service: ServiceInfo, host: str, durable_index: int,
                  disk_ok: dict[str, bool]) -> bool:
        """Whether `host`'s replica of `service` can take writes at once: on a live host,
        reporting the current epoch as a duplica, not broken, not full, within
        `REBALANCE_TARGET_LAG_ENTRIES_MAX` entries of the primary's `durable_index` (both as
        last reported), its host's disk fine (`_disk_ok`)."""
        live = self.live.get(host)
        if live is None or not live.alive:
            return False
        report = live.replicas.get(service.name)
        if (report is None or report.epoch != service.epoch or report.role == PRIMARY
                or report.broken or report.disk_full):
            return False
        matched = self._matched(service, host, report)
        if matched < 0 or durable_index - matched > defaults.REBALANCE_TARGET_LAG_ENTRIES_MAX:
            return False
        return self._disk_ok(host, disk_ok)

    def _disk_ok(self, host: str, disk_ok: dict[str, bool]) -> bool:
        """No replica on `host` reports a full disk and it has
        `REBALANCE_TARGET_DISK_FREE_BYTES_MIN` free (as it last reported; `disk_ok` keeps
        what was found of each host during one rebalance)."""
        ok = disk_ok.get(host)
        if ok is None:
            live = self.live.get(host)
            ok = disk_ok[host] = live is not None and (
                live.metrics.get("disk_free_bytes", 0.0)
                >= defaults.REBALANCE_TARGET_DISK_FREE_BYTES_MIN
                and not any(r.disk_full for r in live.replicas.values()))
        return ok

    def spare_host(self, name: str) -> str:
        """A host placement would choose for one more replica of `name`, or "" if none."""
        service = self.services[name]
        holding = {h: self.hosts[h].zone if h in self.hosts else "" for h in service.replicas}
        found = placement.place(service.placement or self.placement_policy,
                                Resources.from_dict(service.needs), 1, self._host_views(),
                                holding)
        return found.hosts[0] if found.hosts else ""

    def migration_targets(self, name: str) -> str:
        """Where a replica of `name` could move, for a refusal's message
        (`Handover.migration_source`): the hosts placement would take (`placement.place`,
        as a rebuild asks), or its reasons why none."""
        service = self.services[name]
        holding = {h: self.hosts[h].zone if h in self.hosts else "" for h in service.replicas}
        views = self._host_views()
        found = placement.place(service.placement or self.placement_policy,
                                Resources.from_dict(service.needs), len(views), views, holding)
        if found.hosts:
            return f"hosts that could take it: {', '.join(sorted(found.hosts))}"
        return f"no host could take it now ({found.reason})"

    def drain_blockers(self, host_id: str) -> list[str]:
        """Why draining `host_id` could not finish as things stand, one line per service it
        holds a replica of whose replacement no host can take: the reasons of the same
        placement a rebuild runs (`placement.place`), with the host draining. Empty when
        every replica has somewhere to go. O(hosts) per service on the host."""
        views = [replace(v, draining=True) if v.host_id == host_id else v
                 for v in self._host_views()]
        blockers: list[str] = []
        for service in self._holding(host_id):
            counted = [h for h in service.replicas if h != host_id and self._counts(service, h)]
            missing = service.desired_replicas - len(counted)
            if missing <= 0:
                continue
            holding = {h: self.hosts[h].zone if h in self.hosts else ""
                       for h in service.replicas}
            found = placement.place(service.placement or self.placement_policy,
                                    Resources.from_dict(service.needs), missing, views, holding)
            if found.reason:
                blockers.append(f"{service.name} ({service.desired_replicas} replicas): "
                                f"{found.reason}")
        return blockers

    def set_draining(self, host_id: str, draining: bool,
                     must_finish: bool = False) -> list[Action]:
        """Marks a host draining (no new replicas; its primaries move off by switchover and
        its replicas are rebuilt elsewhere, then retired) or not. With `must_finish`, a drain
        that cannot finish (`drain_blockers`) is refused, nothing changed: an operator who
        waits for it learns why at once, not at the end of the wait."""
        check_host_id(host_id)
        info = self.hosts.get(host_id)
        if info is None:
            raise InvalidRequest(f"no host {host_id!r}; `failoverctl hosts` lists them")
        if draining and must_finish:
            blockers = self.drain_blockers(host_id)
            if blockers:
                done = "it stays draining" if info.draining else "so it was not started"
                raise DrainCannotFinish(
                    f"draining {host_id} cannot finish, {done}: "
                    f"{'; '.join(blockers)}. A host with room must join first (or drain "
                    "without waiting: its primaries still move off)")
        if info.draining == draining:
            return []
        info.draining = draining
        self._attend_host(host_id)  # its replicas count, or no longer count
        verb = "draining" if draining else "no longer draining"
        return [Persist({HOST_PREFIX + host_id: pack(info)}, history=((
            "", "host", f"host {host_id} is {verb}", {"host_id": host_id,
                                                      "draining": draining}),))]
