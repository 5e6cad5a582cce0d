"""A real network partition (namespaces, veth, link down) of the primary: failover, healing,
convergence, and nothing left behind. Skipped, with the reason, where namespaces are not
available (not root, no `ip`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from failover.client import Client
from failover.localcluster import LocalCluster
from failover.netns import unavailable_reason

REASON = unavailable_reason()
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(REASON is not None, reason=REASON or "")]


async def test_partitioned_primary_is_failed_over_and_rejoins(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, hosts=3, coordinator=True, netns=True) as cluster:
        assert cluster.net is not None and cluster.coordinator is not None
        bridge = cluster.net.bridge
        cluster.start()
        cluster.create("kv", "kv", replicas=3)
        old = cluster.primary_of("kv")
        assert old is not None
        async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                          deadline_ms=15_000) as client:
            for i in range(50):
                await client.call("kv", {"op": "put", "key": f"k{i}", "value": "before"})
            cluster.partition(old)
            for i in range(50, 80):
                await client.call("kv", {"op": "put", "key": f"k{i}", "value": "after"})
            new = cluster.primary_of("kv")
            assert new not in (None, old)
            cluster.heal(old)
            for i in range(80):
                got = await client.call("kv", {"op": "get", "key": f"k{i}"})
                assert got["value"] == ("before" if i < 50 else "after")
        cluster.wait_converged("kv", list(cluster.agents), timeout_s=30)
        kinds = [e.kind for e in cluster.coordinator.history("kv")]
        assert "failover" in kinds
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert bridge not in links
    assert not any(ns.startswith(bridge.replace("fob", "fo"))
                   for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                            text=True).stdout.split())
