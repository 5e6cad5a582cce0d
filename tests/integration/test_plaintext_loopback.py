"""The one cluster run without TLS (issue 13): every other test's LocalCluster has mutual TLS
on. On loopback the daemons still serve in the clear when given no certificates, so a cluster
of real processes on 127.0.0.1 replicates, fails over and records its callers as anonymous."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from failover.client import Client
from failover.localcluster import LocalCluster, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=2, coordinator=True, tls=False) as c:
        c.start()
        c.create("kv", "kv", replicas=2)
        yield c


async def test_plaintext_cluster_on_loopback_replicates_and_fails_over(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    assert not cluster.tls and cluster.tls_client is None and cluster.pki is None
    assert not (cluster.root / "pki").exists()
    assert all("--tls-ca" not in a.command() and "--insecure" not in a.command()
               for a in cluster)
    async with Client(coordinator=cluster.coordinator.address, deadline_ms=10_000) as client:
        for i in range(50):
            await client.call("kv", {"op": "put", "key": f"k{i}", "value": f"v{i}"})
        old = cluster.primary_of("kv")
        assert old is not None
        cluster[old].kill()
        new = wait_for(lambda: (p := cluster.primary_of("kv")) not in (None, old) and p, 20,
                       "a new kv primary")
        for i in range(50):
            assert (await client.call("kv", {"op": "get", "key": f"k{i}"}))["value"] == f"v{i}"
    assert new != old
    events = cluster.coordinator.history("kv")
    assert any(e.kind == "failover" for e in events)
    audits = [msgpack.unpackb(e.details, raw=False) for e in events if e.kind == "audit"]
    assert [(a["caller"], a["rpc"]) for a in audits] == [("anonymous (no TLS)", "create")]
