"""Live migration with real processes (issue 7): a 64 MiB kv primary moves under writes with
no failed request and equal digests; a writer that outruns the copy is throttled and the
migration still ends; a target killed mid-migration leaves the source serving."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from failover.client import Client
from failover.localcluster import LocalCluster, wait_for
from failover.v1 import coordinator_pb2

from .test_coordinator import Workload

pytestmark = pytest.mark.timeout(240)

MIB = 1 << 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=3, coordinator=True) as c:
        c.start()
        c.create("kv", "kv", replicas=2)
        yield c


def roles(cluster: LocalCluster) -> dict[str, int]:
    assert cluster.coordinator is not None
    service = next(s for s in cluster.coordinator.status().services if s.name == "kv")
    return {r.host_id: r.role for r in service.replicas}


def spare(cluster: LocalCluster) -> str:
    return next(h for h in cluster.agents if h not in roles(cluster))


async def fill(client: Client, total_bytes: int, value_bytes: int = MIB) -> None:
    """Puts `total_bytes` of half-compressible values (random bytes, then a pattern)."""
    async def put(i: int) -> None:
        half = value_bytes // 2
        value = os.urandom(half) + bytes([i % 251]) * (value_bytes - half)
        await client.call("kv", {"op": "put", "key": f"big{i}", "value": value})

    count = total_bytes // value_bytes
    for first in range(0, count, 8):
        await asyncio.gather(*(put(i) for i in range(first, min(count, first + 8))))


def migrate(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    assert cluster.coordinator is not None
    return subprocess.run(
        [sys.executable, "-m", "failover.cli", *cluster.cli_args(),
         "--format", "json", "migrate", "kv", *args],
        capture_output=True, text=True, timeout=200, start_new_session=True)


async def test_a_64_mib_primary_moves_under_writes_with_no_failed_request(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    old, target = cluster.primary_of("kv"), spare(cluster)
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                      deadline_ms=10_000) as client:
        await fill(client, 64 * MIB)
        work = Workload(client)
        result: list[subprocess.CompletedProcess[str]] = []

        async def move() -> None:
            result.append(await asyncio.to_thread(migrate, cluster, "--to", target))

        await work.run_while(asyncio.ensure_future(move()), writers=4, reads=True)
        assert not work.failures, work.failures[:5]
        await work.check_nothing_lost()
    done = result[0]
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["method"] == "precopy" and stats["state_bytes"] >= 64 * MIB
    assert stats["rounds"] >= 2 and stats["downtime_ms"] < 1000
    assert stats["wire_bytes"] < stats["raw_bytes"]
    assert cluster.primary_of("kv") == target
    assert old not in roles(cluster)
    hosts = list(roles(cluster))
    cluster.wait_converged("kv", hosts)
    kinds = [e.kind for e in cluster.coordinator.history("kv")]
    for kind in ("migration", "switchover", "retired"):
        assert kind in kinds, kinds


async def test_a_writer_that_outruns_the_copy_is_throttled_and_the_move_ends(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    target = spare(cluster)
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                      deadline_ms=20_000) as client:
        await fill(client, 16 * MIB)
        stop = asyncio.Event()
        failures: list[str] = []

        async def rewriter(n: int) -> None:
            # Rewrites the same 64 KiB values over and over (random, so they do not compress
            # under the bandwidth cap): the dirty set does not shrink without a throttle.
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    await client.call("kv", {"op": "put", "key": f"hot{n}-{i % 16}",
                                             "value": os.urandom(64 << 10)})
                except Exception as exc:  # counted, not hidden
                    failures.append(repr(exc))

        writers = [asyncio.create_task(rewriter(n)) for n in range(8)]
        try:
            # A copy capped at 8 MiB/s against writers dirtying more than that.
            done = await asyncio.to_thread(migrate, cluster, "--to", target,
                                           "--max-bandwidth-mib-s", "8",
                                           "--max-downtime-ms", "5")
        finally:
            stop.set()
            await asyncio.gather(*writers)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    throttles = [r["throttle_ms"] for r in stats["per_round"]]
    assert max(throttles) > 0, stats["per_round"]
    assert stats["rounds"] >= 3
    assert not failures, failures[:5]
    cluster.wait_converged("kv", list(roles(cluster)))


async def test_killing_the_target_mid_migration_leaves_the_source_serving(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    source, target = cluster.primary_of("kv"), spare(cluster)
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                      deadline_ms=10_000) as client:
        await fill(client, 32 * MIB)
        work = Workload(client)

        async def move_and_kill() -> None:
            stub = cluster.coordinator.stub()  # type: ignore[union-attr]
            call = stub.Migrate(coordinator_pb2.MigrateRequest(
                service="kv", to_host_id=target, max_downtime_ms=1), timeout=60)

            def consume() -> str:
                try:
                    for progress in call:
                        if progress.phase == "round" and cluster[target].alive:
                            cluster[target].kill()
                except grpc.RpcError as exc:
                    return exc.details() or ""
                return "completed"

            said = await asyncio.to_thread(consume)
            assert "aborted" in said, said

        await work.run_while(asyncio.ensure_future(move_and_kill()), writers=4)
        assert not work.failures, work.failures[:5]
        await work.check_nothing_lost()
    assert cluster.primary_of("kv") == source
    assert target not in roles(cluster)
    events = cluster.coordinator.history("kv")
    assert any(e.kind == "migration_aborted" for e in events)
    # The target comes back without the half copy.
    cluster[target].start()
    wait_for(lambda: cluster[target].replica("kv") is None, 10, "no copy on the target")
    assert not (cluster[target].data_dir / "replicas" / "kv").exists()
