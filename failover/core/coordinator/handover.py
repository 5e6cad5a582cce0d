"""The steps that change a service's primary or members on purpose: a switchover (target
chosen, begun, abandoned, completed) and a live migration (source chosen, begun, aborted,
completed) (docs/design.md, Switchover and Live migration).

Each step is one call with what it needs as arguments and returns actions; the plans of
`failover.core.coordinator.operations` sequence them around the agents' answers. While a
switchover or a migration is in progress the rest of the core leaves the service's
primary and members alone (no failover, rebuild or in-sync change of its own).
`switchover_complete` is one of the two places an epoch is raised (invariant 1): the new
epoch is persisted before any assignment goes out.
"""

from __future__ import annotations

from typing import Any

from failover.core.coordinator.actions import Action, Persist
from failover.core.coordinator.model import (
    SERVICE_PREFIX,
    CoreState,
    HostLive,
    ServiceInfo,
    hand_over,
    pack,
    set_in_sync,
)
from failover.core.roles import BUILDING, DUPLICA, PRIMARY
from failover.errors import InvalidRequest


class Handover(CoreState):
    """Part of `CoordinatorCore`: switchover and migration bookkeeping."""

    def migration_source(self, name: str, to_host: str, replica: str, from_host: str) -> str:
        """Validates a migration of one of `name`'s replicas to `to_host`; returns the host
        whose replica is the source (the primary, or a duplica)."""
        service = self.services.get(name)
        if service is None:
            raise InvalidRequest(f"no service {name!r}")
        if replica not in (PRIMARY, DUPLICA):
            raise InvalidRequest(f"replica {replica!r}: choose primary or duplica")
        busy = (name in self.failovers or name in self.switchovers or name in self.migrations
                or service.leaving)
        if busy:
            raise InvalidRequest(f"{name} is already changing replicas; try again shortly")
        info = self.hosts.get(to_host)
        if info is None:
            raise InvalidRequest(f"no host {to_host!r}; `failoverctl hosts` lists them")
        if to_host in service.replicas:
            held = service.replicas[to_host]
            hint = (f"to make it the primary: failoverctl switchover {name} --to {to_host}"
                    if replica == PRIMARY and held != PRIMARY else
                    f"a migration moves a replica to a host without one; "
                    f"{self.migration_targets(name)}")
            raise InvalidRequest(f"{to_host} already holds a replica of {name} (its "
                                 f"{held}): {hint}")
        if info.draining or not self.live.get(to_host, HostLive(0, False)).alive:
            state = "draining" if info.draining else "not alive"
            raise InvalidRequest(f"{to_host} is {state}: it takes no replica; "
                                 f"{self.migration_targets(name)}")
        if replica == PRIMARY:
            source = service.primary
        else:
            duplicas = [h for h in service.duplicas() if service.replicas[h] == DUPLICA]
            if from_host and from_host not in duplicas:
                raise InvalidRequest(f"{from_host} holds no duplica of {name}; choose one of "
                                     f"{duplicas or 'none'}")
            if not duplicas:
                raise InvalidRequest(f"{name} has no duplica to move")
            source = from_host or duplicas[0]
        if not self.live.get(source, HostLive(0, False)).alive:
            raise InvalidRequest(f"the source {source} is not alive")
        others = self._counted_without(service, source)
        if others + 1 < service.desired_replicas:  # the target and the others fall short
            raise InvalidRequest(
                f"{name} has {others + 1} of its {service.desired_replicas} replicas: the "
                f"missing ones are rebuilt first (the move would have to keep {source}); try "
                f"again once `failoverctl status` shows them all")
        return source

    def _counted_without(self, service: ServiceInfo, host: str) -> int:
        """How many of the service's replicas but `host`'s count toward its desired number
        (a move may retire its source only when these make it)."""
        return sum(1 for h in service.replicas if h != host and self._counts(service, h))

    def migration_begin(self, name: str, source: str, target: str) -> None:
        self.migrations[name] = (source, target)

    def migration_abort(self, name: str, why: str) -> list[Action]:
        moving = self.migrations.pop(name, None)
        if moving is None:
            return []
        return [Persist({}, history=((name, "migration_aborted", (
            f"migration of {name} from {moving[0]} to {moving[1]} aborted, {moving[0]} "
            f"still serves: {why}"), {"source": moving[0], "target": moving[1],
                                     "why": why}),))]

    def migration_complete(self, name: str, stats: dict[str, Any],
                           now_ms: int) -> list[Action]:
        """The target holds a checked, durable copy (or, for a rebuild by replay, is to be
        built): it becomes a building replica, and the source is leaving. The rest is the
        usual machinery: the target catches up and joins the in-sync set, a leaving primary
        is switched over, and the source is retired. Unless the service lost a replica
        since the move began and is short even with the target: the target then replaces
        the lost one and the source stays as it is (`source_stays` in history). Marked leaving, it
        could never be retired (no replacement counts before it goes), nor a primary moved."""
        source, target = self.migrations.pop(name)
        service = self.services[name]
        assert target not in service.replicas, (name, target)
        service.replicas[target] = BUILDING
        self._track(service)
        self._building_since[(name, target)] = now_ms
        others = self._counted_without(service, source)  # the target is one of them now
        retire = (source in service.replicas and source not in service.leaving
                  and others >= service.desired_replicas)
        if retire:
            service.leaving = sorted({*service.leaving, source})
            if source == service.primary:
                self._move_to[name] = target
        method = stats.get("method", "")
        then = (f"then {source} is retired" if retire else
                f"{source} stays: {name} has {others} of its "
                f"{service.desired_replicas} replicas without it")
        return [
            Persist({SERVICE_PREFIX + name: pack(service)}, history=((
                name, "migration",
                f"{name}: {method} copy from {source} to {target} done; {target} catches up, "
                f"{then}",
                {"source": source, "target": target, "source_stays": not retire, **stats}),)),
            *self._assignments(service),
        ]

    def switchover_target(self, name: str, to_host: str) -> str:
        """Validates a switchover and returns its target (an in-sync, live duplica)."""
        service = self.services.get(name)
        if service is None:
            raise InvalidRequest(f"no service {name!r}")
        if name in self.failovers or name in self.switchovers:
            raise InvalidRequest(f"{name} is already changing primary; try again shortly")
        # Promotable, not only in sync: a member the primary counts but that may not hold
        # every write acknowledged before it was counted must not become the primary.
        candidates = [h for h in service.in_sync
                      if h in service.promotable
                      and self.live.get(h, HostLive(0, False)).alive
                      and not self.hosts[h].draining]
        if to_host:
            if to_host == service.primary:
                raise InvalidRequest(f"{to_host} is already the primary of {name}")
            if to_host not in candidates:
                raise InvalidRequest(f"{to_host} is not a live in-sync duplica of {name} "
                                     "known to hold every acknowledged write (promotable); "
                                     f"choose one of {candidates or 'none'}")
            return to_host
        if not candidates:
            raise InvalidRequest(f"{name} has no live, promotable in-sync duplica to switch "
                                 "over to")
        reports = {h: self.live[h].replicas.get(name) for h in candidates}
        return max(candidates, key=lambda h: (reports[h].durable_index if reports[h] else 0, h))

    def switchover_begin(self, name: str, to_host: str) -> None:
        self.switchovers[name] = to_host

    def switchover_abort(self, name: str) -> None:
        self.switchovers.pop(name, None)

    def switchover_complete(self, name: str, to_host: str, stall_ms: int) -> list[Action]:
        """The old primary holds writes and the target has its whole log: raise the epoch
        and hand over (the old primary becomes a duplica of the target)."""
        self.switchovers.pop(name, None)
        service = self.services[name]
        old = service.primary
        hand_over(service, old, to_host)
        set_in_sync(service, sorted({*service.in_sync, old} - {to_host}))
        # The old primary holds every write (it held them until the target had them all).
        service.promotable = sorted({*service.promotable, old} & set(service.in_sync))
        self._forget_thresholds(name)
        self.leases.pop(name, None)
        return [
            Persist({SERVICE_PREFIX + name: pack(service)}, history=((
                name, "switchover",
                f"{name}: primary moved from {old} to {to_host} at epoch {service.epoch}",
                {"old_primary": old, "new_primary": to_host, "epoch": service.epoch,
                 "stall_ms": stall_ms}),)),
            *self._assignments(service),
            *self._bump_routes(name),
        ]
