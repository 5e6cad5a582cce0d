"""Routes as deltas with real processes (issue 14, item 2): a client following the routes
gets the whole table once, then only the services each change touched."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from failover.client import Client
from failover.localcluster import LocalCluster
from failover.v1 import coordinator_pb2

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=2, coordinator=True) as c:
        c.start()
        c.create("kv0", "kv", replicas=2)
        yield c


class RecordingClient(Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.updates: list[tuple[bool, int, list[str]]] = []

    def _apply_routes(self, update: Any) -> None:
        super()._apply_routes(update)
        self.updates.append((update.full, update.version, [r.service for r in update.routes]))


async def test_a_client_gets_the_table_then_the_changed_routes(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    async with RecordingClient(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                               deadline_ms=5_000) as client:
        await client.call("kv0", {"op": "put", "key": "k", "value": "v"})
        for name in ("kv1", "kv2"):
            await asyncio.to_thread(cluster.create, name, "kv", 2)
        async with asyncio.timeout(10):
            while not {"kv1", "kv2"} <= set(client._routes):
                await asyncio.sleep(0.02)
    full, version, names = client.updates[0]
    assert full and "kv0" in names
    deltas = client.updates[1:]
    assert deltas and not any(d[0] for d in deltas), client.updates
    assert [d[1] for d in deltas] == list(range(version + 1, version + 1 + len(deltas)))
    assert all("kv0" not in d[2] for d in deltas), "an unchanged route was pushed again"
    assert {"kv1", "kv2"} <= {n for d in deltas for n in d[2]}


async def test_a_client_watching_one_service_gets_only_its_route(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    async with RecordingClient(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                               deadline_ms=5_000, services=["kv0"]) as client:
        await client.call("kv0", {"op": "put", "key": "k", "value": "v"})
        await asyncio.to_thread(cluster.create, "kv1", "kv", 2)  # a push it does not get
        await asyncio.to_thread(  # a push it gets
            cluster.coordinator.stub().Switchover,
            coordinator_pb2.SwitchoverRequest(service="kv0"), timeout=15)
        async with asyncio.timeout(10):
            while len(client.updates) < 2:
                await asyncio.sleep(0.02)
        await client.call("kv0", {"op": "get", "key": "k"})
    assert set(client._routes) == {"kv0"}
    assert all(names == ["kv0"] for _, _, names in client.updates), client.updates
