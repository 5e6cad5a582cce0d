"""Routes pushed as deltas (issue 14, item 2): the core's push says what changed since its
previous one, the coordinator daemon sends watchers the whole table on connect (or when they
fall behind) and the deltas after it, and a client applies deltas in version order and
subscribes again for the whole table when it misses one. A watch may name its services: it
gets only their routes, and only the pushes that change them."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from failover import defaults
from failover.client import Client, _RoutesGap
from failover.client_stream import CallRefusal
from failover.coordinator.server import ROUTE_WATCHER_QUEUE, Coordinator
from failover.core.coordinator import Action, CoordinatorCore, PushRoutes, Route, Timing
from failover.errors import ConfigError, InvalidRequest
from failover.v1 import common_pb2, coordinator_pb2
from tests.unit.test_coordinator_rebuild import DEAD, FAIL, HB, LEASE
from tests.unit.test_coordinator_scale import Cluster


def pushes(actions: list[Action]) -> list[PushRoutes]:
    return [a for a in actions if isinstance(a, PushRoutes)]


def test_the_core_pushes_only_the_services_that_changed() -> None:
    """Following every push by its delta gives the core's table at each version, and a host
    death pushes its primaries' routes, not the whole table."""
    c = Cluster(6, 40)
    seen: list[PushRoutes] = []
    run = c.run

    def recording(actions: list[Action]) -> list[Action]:
        seen.extend(pushes(actions))
        return run(actions)

    c.run = recording  # type: ignore[method-assign]
    table = {r.service: r for r in c.core.routes()}
    version = c.core.routes_version
    victim = max(sorted(c.up), key=lambda h: sum(s.primary == h
                                                for s in c.core.services.values()))
    primaries = {s.name for s in c.core.services.values() if s.primary == victim}
    c.up.discard(victim)
    for _ in range(DEAD // HB + 10):
        c.round()
    c.run(c.core.delete_service("s0000"))
    assert seen
    for push in seen:
        assert push.changed is not None and push.version == version + 1
        before = dict(table)
        for name in push.deleted:
            table.pop(name)
        table.update({r.service: r for r in push.changed})
        assert table == {r.service: r for r in push.routes}, "the delta misses a change"
        assert all(before.get(r.service) != r for r in push.changed), "an unchanged route"
        version = push.version
    assert table == {r.service: r for r in c.core.routes()}
    assert version == c.core.routes_version
    moved = {r.service for p in seen for r in p.changed or ()}
    assert primaries <= moved and len(moved) < len(c.core.services)
    assert seen[-1].deleted == ("s0000",) and seen[-1].entries_pushed() == 1


def test_a_restored_core_pushes_the_whole_table() -> None:
    """After a (re)start the core has pushed nothing: its first push is only the table."""
    restored = CoordinatorCore(Timing(HB, FAIL, LEASE, DEAD))
    (push,) = pushes(restored.restore({}, 1000))
    assert push.changed is None and push.entries_pushed() == len(push.routes)


def route(service: str, address: str, epoch: int) -> coordinator_pb2.Route:
    return coordinator_pb2.Route(service=service, kind="kv", primary_address=address,
                                 primary_host_id=address, epoch=epoch)


def test_a_client_applies_deltas_in_version_order_and_a_gap_asks_for_the_table() -> None:
    client = Client(coordinator="127.0.0.1:1")
    update = coordinator_pb2.RoutesUpdate
    with pytest.raises(_RoutesGap):  # a delta before any whole table
        client._apply_routes(update(version=3, routes=[route("a", "h1:1", 1)]))
    client._apply_routes(update(version=3, full=True, routes=[route("a", "h1:1", 1),
                                                              route("b", "h2:1", 1)]))
    assert client._routes == {"a": ("h1:1", 1), "b": ("h2:1", 1)}
    client._apply_routes(update(version=3, routes=[route("a", "h9:1", 9)]))  # held already
    assert client._routes["a"] == ("h1:1", 1)
    client._apply_routes(update(version=4, routes=[route("a", "h2:1", 2)], deleted=["b"]))
    assert client._routes == {"a": ("h2:1", 2)} and client._routes_version == 4
    with pytest.raises(_RoutesGap):  # version 5 never came
        client._apply_routes(update(version=6, routes=[route("a", "h3:1", 3)]))
    assert client._routes == {"a": ("h2:1", 2)}
    client._apply_routes(update(version=7, full=True, routes=[route("a", "h3:1", 3)]))
    assert client._routes["a"] == ("h3:1", 3) and client._routes_version == 7


def routes_push(version: int, table: dict[str, int], changed: list[str] | None,
                deleted: tuple[str, ...] = ()) -> PushRoutes:
    routes = tuple(Route(n, "kv", f"h{e}", f"h{e}:1", e) for n, e in sorted(table.items()))
    return PushRoutes(version, routes,
                      None if changed is None else tuple(r for r in routes
                                                         if r.service in changed), deleted)


async def next_update(stream: Any) -> coordinator_pb2.RoutesUpdate:
    return await asyncio.wait_for(stream.__anext__(), 1)


async def test_watchers_get_the_table_then_deltas_and_a_slow_one_the_table_again() -> None:
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]
    coordinator._push_routes(routes_push(5, {"a": 1, "b": 1}, None))
    stream = coordinator.watch_routes()
    first = await next_update(stream)
    assert first.full and first.version == 5 and [r.service for r in first.routes] == ["a", "b"]
    coordinator._push_routes(routes_push(6, {"a": 2, "b": 1}, ["a"]))
    coordinator._push_routes(routes_push(7, {"a": 2}, [], ("b",)))
    delta = await next_update(stream)
    assert not delta.full and delta.version == 6
    assert [(r.service, r.epoch) for r in delta.routes] == [("a", 2)]
    delta = await next_update(stream)
    assert (delta.version, list(delta.routes), list(delta.deleted)) == (7, [], ["b"])
    # A watcher that does not read falls behind: the pushes never wait for it, and what it
    # reads next is the whole table at the newest version.
    table = {"a": 2}
    for version in range(8, 8 + ROUTE_WATCHER_QUEUE + 3):
        table["a"] = version
        coordinator._push_routes(routes_push(version, table, ["a"]))
    resync = await next_update(stream)
    assert resync.full and resync.version == version
    assert [(r.service, r.epoch) for r in resync.routes] == [("a", version)]
    # A push that does not follow the previous one (one lost on the way) is sent whole.
    coordinator._push_routes(routes_push(version + 2, table, ["a"]))
    assert (await next_update(stream)).full
    await stream.aclose()
    assert not coordinator._watchers


def RedirectError(address: str, epoch: int) -> CallRefusal:  # noqa: N802 (reads as a type)
    """A non-primary's refusal naming `address` at `epoch` (either data path's)."""
    return CallRefusal(grpc.StatusCode.FAILED_PRECONDITION, "not the primary",
                       redirect=common_pb2.Redirect(primary_address=address, epoch=epoch))


def test_a_stale_redirect_does_not_replace_a_newer_route() -> None:
    """A route comes once, as a delta: a hint older than it must not overwrite it, or the
    client would follow a dead primary with nothing to correct it."""
    client = Client(coordinator="127.0.0.1:1")
    client._routes["a"] = ("new:1", 2)
    assert not client._follow_redirect("a", "x:1", RedirectError("old:1", 1))
    assert client._routes["a"] == ("new:1", 2)
    assert client._follow_redirect("a", "new:1", RedirectError("newer:1", 3))
    assert client._routes["a"] == ("newer:1", 3)


async def test_a_watch_of_some_services_gets_only_theirs_and_pushes_that_change_them() -> None:
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]
    coordinator._push_routes(routes_push(5, {"a": 1, "b": 1, "c": 1}, None))
    mine = coordinator.watch_routes(["a", "c"])
    every = coordinator.watch_routes()
    first = await next_update(mine)
    assert first.full and first.version == 5 and [r.service for r in first.routes] == ["a", "c"]
    assert [r.service for r in (await next_update(every)).routes] == ["a", "b", "c"]
    coordinator._push_routes(routes_push(6, {"a": 1, "b": 2, "c": 1}, ["b"]))  # not its
    coordinator._push_routes(routes_push(7, {"a": 1, "b": 3, "c": 1}, ["b"]))  # not its
    coordinator._push_routes(routes_push(8, {"a": 1, "b": 3}, [], ("c",)))
    delta = await next_update(mine)
    # It follows version 5, the last this watch got: the client holds 5 and applies it.
    assert (delta.version, delta.base_version, list(delta.routes), list(delta.deleted)) == (
        8, 5, [], ["c"])
    assert [u.version for u in [await next_update(every) for _ in range(3)]] == [6, 7, 8]
    client = Client(coordinator="127.0.0.1:1", services=["a", "c"])
    client._apply_routes(first)
    client._apply_routes(delta)
    assert client._routes == {"a": ("h1:1", 1)} and client._routes_version == 8
    # A delta after a version the client never saw is still a gap.
    with pytest.raises(_RoutesGap):
        client._apply_routes(coordinator_pb2.RoutesUpdate(version=12, base_version=10))
    await mine.aclose()
    await every.aclose()
    assert not coordinator._watchers


async def test_a_watch_naming_a_bad_or_too_many_services_is_refused() -> None:
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="service name"):
        await next_update(coordinator.watch_routes(["a", "../etc"]))
    too_many = [f"s{i}" for i in range(defaults.ROUTE_WATCH_SERVICES_MAX + 1)]
    with pytest.raises(InvalidRequest, match="route_watch_services_max"):
        await next_update(coordinator.watch_routes(too_many))
    assert not coordinator._watchers


async def test_a_client_watching_some_services_refuses_a_call_to_another() -> None:
    async with Client(coordinator="127.0.0.1:1", services=["a"], deadline_ms=200) as client:
        with pytest.raises(ConfigError, match="not among the services this client watches"):
            await client._target("b", 0.0)
    with pytest.raises(ConfigError, match="not one string"):
        Client(coordinator="127.0.0.1:1", services="a")  # type: ignore[arg-type]
