"""What agents and clients are told of the cluster state (docs/design.md, Words: routes).

`Routes` turns the records into the role assignments each replica's host should hold (sent
again whenever a host may have missed one: assignments are idempotent) and the routes table
clients follow, with its persisted version. No event of its own: the rest of the core calls
it after a change, and carries its actions out in the same list.
"""

from __future__ import annotations

import msgpack

from failover.core.coordinator.actions import Action, AssignRole, Persist, PushRoutes, Route
from failover.core.coordinator.model import ROUTES_VERSION_KEY, CoreState, ServiceInfo
from failover.core.roles import DUPLICA, PRIMARY


class Routes(CoreState):
    """Part of `CoordinatorCore`: assignments and the routes table."""

    # The table last pushed (service -> route), to push only what changed; None before the
    # first push (a restore pushes the whole table). Set on the instance at the first push.
    _pushed_routes: dict[str, Route] | None = None

    def _assignments(self, service: ServiceInfo, only: str | None = None) -> list[Action]:
        """What each replica of the service should hold; the duplicas first, so they accept
        the new primary's stream when it starts."""
        addresses = {h: self.hosts[h].address for h in service.replicas if h in self.hosts}
        primary_address = addresses.get(service.primary, "")
        duplicas = {h: addresses[h] for h in service.duplicas() if h in addresses}
        actions: list[Action] = []
        for host in [*sorted(duplicas), service.primary]:
            if (only is not None and host != only) or host not in addresses:
                continue
            is_primary = host == service.primary
            actions.append(AssignRole(
                host_id=host, address=addresses[host], service=service.name, kind=service.kind,
                role=PRIMARY if is_primary else service.replicas.get(host, DUPLICA),
                epoch=service.epoch, mode=service.mode,
                primary=None if is_primary else (service.primary, primary_address),
                duplicas=duplicas if is_primary else {},
                in_sync=tuple(h for h in service.in_sync if h in duplicas) if is_primary else (),
                in_sync_generation=service.in_sync_generation if is_primary else 0,
            ))
        return actions

    def routes(self) -> tuple[Route, ...]:
        out = []
        for service in sorted(self.services.values(), key=lambda s: s.name):
            host = self.hosts.get(service.primary)
            out.append(Route(service.name, service.kind, service.primary,
                             host.address if host else "", service.epoch))
        return tuple(out)

    def _routes(self) -> PushRoutes:
        """The table at the current version, with what changed since the previous push."""
        table = self.routes()
        now = {route.service: route for route in table}
        before, self._pushed_routes = self._pushed_routes, now
        if before is None:
            return PushRoutes(self.routes_version, table)
        changed = tuple(route for route in table if before.get(route.service) != route)
        deleted = tuple(sorted(name for name in before if name not in now))
        return PushRoutes(self.routes_version, table, changed, deleted)

    def _bump_routes(self) -> list[Action]:
        """A new routes version, persisted, then the table pushed. Within a decision round
        (`CoordinatorCore._round`) the version is raised once and the table pushed once, at
        the round's end, however many primaries the round changed."""
        if self._rounds:
            if not self._routes_bumped:
                self.routes_version += 1
                self._routes_bumped = True
            return [Persist({ROUTES_VERSION_KEY: msgpack.packb(self.routes_version)})]
        self.routes_version += 1
        return [Persist({ROUTES_VERSION_KEY: msgpack.packb(self.routes_version)}),
                self._routes()]
