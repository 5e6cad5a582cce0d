"""A second failover right after the first primary restarted and rejoined (issue 11, item 11).

The failover benchmark stalled here: kill the primary, restart it, let it rejoin in sync, kill
the new primary. Real agent and coordinator processes, real SIGKILLs, a real client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from failover.client import Client
from failover.errors import FailoverError
from failover.localcluster import LocalCluster, wait_for
from failover.v1 import common_pb2

pytestmark = pytest.mark.timeout(180)

SERVED_AGAIN_S = 3.0  # a failover is detected and promoted well within this on 127.0.0.1
WAIT_S = 30.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=3, coordinator=True) as c:
        c.start()
        c.create("kv", "kv", replicas=3)
        yield c


def whole(cluster: LocalCluster) -> str | None:
    """The serving primary once every agent is up and both duplicas are in sync."""
    assert cluster.coordinator is not None
    view = next(s for s in cluster.coordinator.status().services if s.name == "kv")
    duplicas = [r for r in view.replicas if r.role == common_pb2.ROLE_DUPLICA]
    if len(duplicas) != 2 or not all(r.in_sync for r in duplicas):
        return None
    if not all(a.alive for a in cluster):
        return None
    return cluster.primary_of("kv")


@dataclass
class Writers:
    """Puts of unique keys back to back; remembers what was acknowledged, when and by whom."""

    client: Client
    acked: dict[str, str] = field(default_factory=dict)
    served: list[tuple[float, str]] = field(default_factory=list)  # (completed, address)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self, name: str) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            key, value = f"{name}-{i}", f"v{i}"
            try:
                result = await self.client.call_detailed(
                    "kv", {"op": "put", "key": key, "value": value})
            except FailoverError as exc:
                self.failures.append(f"{key}: {type(exc).__name__}: {exc}")
                continue
            self.served.append((time.monotonic(), result.address))
            self.acked[key] = value

    def served_by_other_since(self, t: float, address: str) -> float | None:
        """When the first request that another address served completed after `t`."""
        return next((done for done, by in self.served if done > t and by != address), None)

    async def check_nothing_lost(self) -> None:
        for key, value in self.acked.items():
            got = await self.client.call("kv", {"op": "get", "key": key})
            assert got["found"] and got["value"] == value, f"acknowledged {key} lost: {got}"


async def poll(condition, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    return await asyncio.to_thread(wait_for, condition, timeout_s, what, interval_s=0.02)


async def kill_primary(cluster: LocalCluster, writers: Writers) -> tuple[str, float]:
    """Kills the serving primary; returns it and how long until another host served."""
    old = await poll(lambda: whole(cluster), WAIT_S, "the replica set to be whole")
    address = cluster[old].address
    t_kill = time.monotonic()
    cluster[old].kill()
    served = await poll(lambda: writers.served_by_other_since(t_kill, address), WAIT_S,
                        f"the client to be served after killing {old}")
    return old, served - t_kill


async def seed_only_client_is_served(cluster: LocalCluster, host: str) -> float:
    """How long a client that knows only `host` (a duplica) takes to be served: the duplica
    must name the current primary in its redirect."""
    start = time.monotonic()
    async with Client(agents=cluster[host].address, tls=cluster.tls_client,
                      deadline_ms=int(SERVED_AGAIN_S * 1000)) as client:
        await client.call("kv", {"op": "put", "key": f"via-{host}", "value": "redirected"})
    return time.monotonic() - start


async def kill_rejoin_kill(cluster: LocalCluster, client: Client) -> None:
    """Kill the primary, restart it, let it rejoin in sync, kill the new primary: the client
    is served again within the bound after each kill, and no acknowledged write is lost."""
    writers = Writers(client)
    tasks = [asyncio.create_task(writers.writer(f"w{n}")) for n in range(6)]
    try:
        await poll(lambda: len(writers.acked) > 50, WAIT_S, "writes before the first kill")
        first, first_s = await kill_primary(cluster, writers)
        cluster[first].start()
        await poll(lambda: whole(cluster), WAIT_S, f"{first} to rejoin in sync")
        redirected_s = await seed_only_client_is_served(cluster, first)
        acked_before = len(writers.acked)
        await poll(lambda: len(writers.acked) > acked_before + 50, WAIT_S,
                   "writes before the second kill")
        second, second_s = await kill_primary(cluster, writers)
        acked_after = len(writers.acked)
        await poll(lambda: len(writers.acked) > acked_after + 50, WAIT_S,
                   "steady writes after the second kill")
    finally:
        writers.stop.set()
        await asyncio.gather(*tasks)
    assert first_s < SERVED_AGAIN_S, (first, first_s)
    assert redirected_s < SERVED_AGAIN_S, (first, redirected_s)
    assert second_s < SERVED_AGAIN_S, (second, second_s)
    await writers.check_nothing_lost()


async def test_second_kill_after_the_first_primary_rejoined_is_served_within_bound(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                      deadline_ms=5_000) as client:
        await kill_rejoin_kill(cluster, client)


class RoutesFailOnceClient(Client):
    """Handling the first routes push that moves the service raises, as any bug in that
    path would (the failover benchmark's instrumented client did): the client must go on
    following the routes, not stay on a dead primary forever."""

    failed = False

    def _apply_routes(self, update) -> None:  # type: ignore[no-untyped-def]
        super()._apply_routes(update)
        if update.version > 1 and not self.failed:
            self.failed = True
            raise RuntimeError("injected: handling this routes push failed")


async def test_client_follows_routes_after_a_failed_routes_update(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    async with RoutesFailOnceClient(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                                    deadline_ms=5_000) as client:
        await kill_rejoin_kill(cluster, client)
        assert client.failed
