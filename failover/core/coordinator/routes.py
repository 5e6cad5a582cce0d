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
    """Part of `CoordinatorCore`: assignments and the routes table.

    The table is kept, not rebuilt: every change of a route (a service created or deleted,
    a new primary or epoch, a host at a new address) calls `_bump_routes` with the services
    it changed, and only those are worked out again. A push costs O(changed) plus one copy
    of the table."""

    # service -> its route, in the order of service names (None until first asked: then
    # built from every service once); `_unsorted` when a name went in out of order.
    _table: dict[str, Route] | None = None
    _unsorted = False
    # The services whose route may have changed since the table was brought up to date.
    _stale_routes: set[str] | None = None
    # service -> its route at the previous push (None: not routed then), for the services
    # changed since; None before the first push (a restore pushes the whole table).
    _since_push: dict[str, Route | None] | None = None

    def _assignments(self, service: ServiceInfo, only: str | None = None,
                     reason: str = "") -> list[Action]:
        """What each replica of the service should hold; the duplicas first, so they accept
        the new primary's stream when it starts. `reason` says why they are sent ("failover":
        a failover made them)."""
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
                reason=reason,
            ))
        return actions

    def _route(self, service: ServiceInfo) -> Route:
        host = self.hosts.get(service.primary)
        return Route(service.name, service.kind, service.primary,
                     host.address if host else "", service.epoch)

    def _route_table(self) -> dict[str, Route]:
        """The table brought up to date with the services changed since it last was."""
        table = self._table
        if table is None:
            self._stale_routes = set()
            table = self._table = {name: self._route(self.services[name])
                                   for name in sorted(self.services)}
        stale = self._stale_routes
        if stale:
            since = self._since_push
            for name in sorted(stale):
                before = table.get(name)
                if since is not None and name not in since:
                    since[name] = before
                service = self.services.get(name)
                if service is None:
                    table.pop(name, None)
                    continue
                if before is None and table and name < next(reversed(table)):
                    self._unsorted = True
                table[name] = self._route(service)
            stale.clear()
        if self._unsorted:
            self._unsorted = False
            table = self._table = {name: table[name] for name in sorted(table)}
        return table

    def routes(self) -> tuple[Route, ...]:
        """Every service's route, by service name."""
        return tuple(self._route_table().values())

    def _routes(self) -> PushRoutes:
        """The table at the current version, with what changed since the previous push."""
        table = self._route_table()
        since, self._since_push = self._since_push, {}
        if since is None:
            return PushRoutes(self.routes_version, tuple(table.values()))
        changed = tuple(table[name] for name in sorted(since)
                        if name in table and table[name] != since[name])
        deleted = tuple(sorted(name for name, route in since.items()
                               if route is not None and name not in table))
        return PushRoutes(self.routes_version, tuple(table.values()), changed, deleted)

    def _route_changed(self, *names: str) -> None:
        """The routes of `names` may have changed: worked out again when next asked."""
        if self._table is not None and names:
            if self._stale_routes is None:
                self._stale_routes = set()
            self._stale_routes.update(names)

    def _bump_routes(self, *changed: str) -> list[Action]:
        """A new routes version, persisted, then the table pushed; `changed` names the
        services whose route this changed. Within a decision round
        (`CoordinatorCore._round`) the version is raised once and the table pushed once, at
        the round's end, however many primaries the round changed."""
        self._route_changed(*changed)
        if self._rounds:
            if not self._routes_bumped:
                self.routes_version += 1
                self._routes_bumped = True
            return [Persist({ROUTES_VERSION_KEY: msgpack.packb(self.routes_version)})]
        self.routes_version += 1
        return [Persist({ROUTES_VERSION_KEY: msgpack.packb(self.routes_version)}),
                self._routes()]
