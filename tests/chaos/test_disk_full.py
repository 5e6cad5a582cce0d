"""A full disk (a small tmpfs per agent, filled with ballast) on a duplica and on a primary:
clean refusals, no corruption, the service goes on and heals. Skipped, with the reason,
where a tmpfs cannot be mounted (not root)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from failover.chaos.runner import ChaosConfig, run_chaos
from failover.client import Client
from failover.localcluster import LocalCluster, wait_for
from failover.smalldisk import unavailable_reason

REASON = unavailable_reason()
pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def in_sync(cluster: LocalCluster, host: str) -> bool:
    assert cluster.coordinator is not None
    service = next(s for s in cluster.coordinator.status().services if s.name == "kv")
    return any(r.host_id == host and r.in_sync for r in service.replicas)


async def test_full_duplica_leaves_in_sync_and_full_primary_is_moved(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, hosts=3, coordinator=True, disk_bytes=1 << 30) as cluster:
        assert cluster.coordinator is not None
        cluster.start()
        cluster.create("kv", "kv", replicas=3)
        primary = cluster.primary_of("kv")
        assert primary is not None
        duplica = next(h for h in cluster.agents if h != primary)
        async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                          deadline_ms=10_000) as client:
            for i in range(100):
                await client.call("kv", {"op": "put", "key": f"k{i}", "value": "before"})
            # A full duplica: sync writes must not wait on it.
            cluster.disks[duplica].fill()
            for i in range(100, 200):
                await client.call("kv", {"op": "put", "key": f"k{i}", "value": "full-duplica"})
            assert not in_sync(cluster, duplica)
            cluster.disks[duplica].free()
            await asyncio.to_thread(wait_for, lambda: in_sync(cluster, duplica), 30,
                                    f"{duplica} back in the in-sync set")
            # A full primary: it refuses writes, is moved off, and the client's retries land.
            cluster.disks[primary].fill()
            for i in range(200, 300):
                await client.call("kv", {"op": "put", "key": f"k{i}", "value": "full-primary"})
            moved = cluster.primary_of("kv")
            assert moved not in (None, primary)
            cluster.disks[primary].free()
            for i in range(300):
                got = await client.call("kv", {"op": "get", "key": f"k{i}"})
                assert got["found"], i
        cluster.wait_converged("kv", list(cluster.agents), timeout_s=30)
        messages = [e.message for e in cluster.coordinator.history("kv")]
        assert any("its disk is full" in m for m in messages), messages
        assert any("primary moved from" in m for m in messages), messages
    mounts = subprocess.run(["mount"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in mounts


async def test_chaos_run_with_full_disks_passes(tmp_path: Path) -> None:
    # The deadline of before the hot-key workload: long enough that a client sees only the
    # full disks' clean refusals (no unknown outcome), which is what this run checks.
    report = await run_chaos(ChaosConfig(duration_s=20, seed=3, faults=("disk",),
                                         op_deadline_ms=3000,
                                         report_dir=tmp_path / "report"),
                             progress=lambda _: None)
    assert report["faults"].get("disk", 0) >= 3, report["faults"]
    assert not report["faults_skipped"], report["faults_skipped"]
    assert report["violations"] == [] and report["passed"], report["violations"]
    assert report["ops_unknown"] == 0 and report["lost_acked_writes"] == 0
