"""Redundancy comes back after a failure, with real processes (issue 6).

A host killed for good is replaced: a third host gets a new duplica built from the primary
(snapshot + log replay), with the same digest, and the in-sync set is whole again. A host
that comes back catches up by replay when the primary still has the log, and is rebuilt from
a snapshot when the primary compacted it away. A drained host ends up holding nothing while
clients see no failed request.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from failover.client import Client
from failover.localcluster import LocalCluster, wait_for
from failover.v1 import agent_pb2, common_pb2

from .test_coordinator import Workload
from .test_replication import put_many

pytestmark = pytest.mark.timeout(180)

HOST_DEAD_MS = 1500


def replicas_of(cluster: LocalCluster, service: str = "kv") -> dict[str, tuple[int, bool]]:
    """host -> (role, in sync), as the coordinator records them."""
    assert cluster.coordinator is not None
    for s in cluster.coordinator.status().services:
        if s.name == service:
            return {r.host_id: (r.role, r.in_sync) for r in s.replicas}
    return {}


def kinds(cluster: LocalCluster, service: str = "kv") -> list[str]:
    assert cluster.coordinator is not None
    return [e.kind for e in cluster.coordinator.history(service)]


@pytest.fixture
def three(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=3, coordinator=True,
                      coordinator_args=["--host-dead-ms", str(HOST_DEAD_MS)]) as c:
        c.start()
        c.create("kv", "kv", replicas=2)
        yield c


def spare_and_duplica(cluster: LocalCluster) -> tuple[str, str, str]:
    primary = cluster.primary_of("kv")
    assert primary is not None
    held = replicas_of(cluster)
    duplica = next(h for h in held if h != primary)
    spare = next(h for h in cluster.agents if h not in held)
    return primary, duplica, spare


async def test_a_host_killed_for_good_is_replaced_with_the_same_digest(
    three: LocalCluster,
) -> None:
    assert three.coordinator is not None
    primary, duplica, spare = spare_and_duplica(three)
    async with Client(coordinator=three.coordinator.address, tls=three.tls_client,
                      deadline_ms=10_000) as client:
        await put_many(client, "kv", range(2_000))
        work = Workload(client)

        async def kill_and_rebuild() -> None:
            three[duplica].kill()
            await asyncio.to_thread(
                wait_for, lambda: replicas_of(three).get(spare) == (common_pb2.ROLE_DUPLICA,
                                                                    True),
                30, f"{spare} to be built and join the in-sync set")

        await work.run_while(asyncio.ensure_future(kill_and_rebuild()), writers=4)
        assert not work.failures, work.failures[:5]
        await work.check_nothing_lost()
    # The dead host's copy is retired once the new one is in sync.
    wait_for(lambda: set(replicas_of(three)) == {primary, spare}, 10, "the dead copy retired")
    digest = three.wait_converged("kv", [primary, spare])
    assert digest
    events = kinds(three)
    for kind in ("placement", "rebuilt", "retired"):
        assert kind in events, (kind, events)
    # Writes keep going with the new in-sync duplica.
    async with Client(coordinator=three.coordinator.address, tls=three.tls_client) as client:
        await put_many(client, "kv", range(2_000, 2_100), prefix="after")
    three.wait_converged("kv", [primary, spare])


async def test_a_failed_primary_is_replaced_and_its_copy_dropped_when_it_returns(
    three: LocalCluster,
) -> None:
    assert three.coordinator is not None
    primary, duplica, spare = spare_and_duplica(three)
    async with Client(coordinator=three.coordinator.address, tls=three.tls_client,
                      deadline_ms=10_000) as client:
        await put_many(client, "kv", range(1_000))
        three[primary].kill()
        # A failover rebuilds at once: no waiting for the host to be declared dead.
        wait_for(lambda: three.primary_of("kv") == duplica, 15, "the failover")
        wait_for(lambda: replicas_of(three).get(spare) == (common_pb2.ROLE_DUPLICA, True),
                 30, f"{spare} to be built")
        wait_for(lambda: set(replicas_of(three)) == {duplica, spare}, 10, "the old copy retired")
        await put_many(client, "kv", range(1_000, 1_200))
    three.wait_converged("kv", [duplica, spare])
    # The old primary comes back holding its stale copy: it is told to drop it.
    three[primary].start()
    wait_for(lambda: three[primary].replica("kv") is None, 15,
             f"{primary} to drop its retired copy")
    assert set(replicas_of(three)) == {duplica, spare}


@pytest.fixture
def two(tmp_path: Path) -> Iterator[LocalCluster]:
    # Hosts are never declared dead here: a returning host must catch up, not be replaced.
    with LocalCluster(tmp_path, hosts=2, coordinator=True,
                      coordinator_args=["--host-dead-ms", "120000"]) as c:
        c.start()
        c.create("kv", "kv", replicas=2)
        yield c


async def test_a_host_back_after_ten_thousand_writes_catches_up_by_replay(
    two: LocalCluster,
) -> None:
    assert two.coordinator is not None
    primary = two.primary_of("kv")
    duplica = next(h for h in two.agents if h != primary)
    assert primary is not None
    async with Client(coordinator=two.coordinator.address, tls=two.tls_client,
                      deadline_ms=10_000) as client:
        await put_many(client, "kv", range(500))
        two[duplica].kill()
        await put_many(client, "kv", range(500, 10_500))
        two[duplica].start()
        wait_for(lambda: replicas_of(two).get(duplica) == (common_pb2.ROLE_DUPLICA, True), 30,
                 f"{duplica} back in sync")
    two.wait_converged("kv", [primary, duplica])
    assert "installed a snapshot" not in two[duplica].log_path.read_text()
    assert "placement" not in kinds(two)


async def test_a_host_back_after_compaction_is_rebuilt_from_a_snapshot(
    two: LocalCluster,
) -> None:
    assert two.coordinator is not None
    primary = two.primary_of("kv")
    duplica = next(h for h in two.agents if h != primary)
    assert primary is not None
    async with Client(coordinator=two.coordinator.address, tls=two.tls_client,
                      deadline_ms=10_000) as client:
        await put_many(client, "kv", range(500))
        two[duplica].kill()
        await put_many(client, "kv", range(500, 3_000))
        reply = two[primary].control().Compact(
            agent_pb2.CompactRequest(service="kv", retain_entries=0), timeout=10)
        assert reply.first_index > 600, "the log must no longer hold what the duplica lacks"
        two[duplica].start()
        wait_for(lambda: replicas_of(two).get(duplica) == (common_pb2.ROLE_DUPLICA, True), 30,
                 f"{duplica} back in sync")
        await put_many(client, "kv", range(3_000, 3_100))
    two.wait_converged("kv", [primary, duplica])
    assert "installed a snapshot" in two[duplica].log_path.read_text()


def failoverctl(cluster: LocalCluster, *args: str, timeout_s: float = 90) -> tuple[int, str,
                                                                                  str]:
    assert cluster.coordinator is not None
    done = subprocess.run(
        [sys.executable, "-m", "failover.cli", *cluster.cli_args(), *args],
        capture_output=True, text=True, timeout=timeout_s, start_new_session=True)
    return done.returncode, done.stdout, done.stderr


async def test_drain_empties_a_host_with_no_failed_request(three: LocalCluster) -> None:
    assert three.coordinator is not None
    primary, duplica, spare = spare_and_duplica(three)
    async with Client(coordinator=three.coordinator.address, tls=three.tls_client,
                      deadline_ms=10_000) as client:
        await put_many(client, "kv", range(1_000))
        work = Workload(client)

        async def drain() -> None:
            code, out, err = await asyncio.to_thread(
                failoverctl, three, "drain", primary, "--wait", "60")
            assert code == 0, err
            assert f"{primary} is drained" in out

        await work.run_while(asyncio.ensure_future(drain()), writers=4)
        assert not work.failures, work.failures[:5]
        await work.check_nothing_lost()
    held = replicas_of(three)
    assert primary not in held and set(held) == {duplica, spare}
    assert three.primary_of("kv") in (duplica, spare)
    three.wait_converged("kv", [duplica, spare])
    code, out, _ = failoverctl(three, "--format", "json", "hosts")
    assert code == 0
    hosts = {h["host_id"]: h for h in json.loads(out)}
    assert hosts[primary]["draining"] and hosts[primary]["services"] == []
    assert hosts[spare]["cpu_count"] >= 1 and hosts[spare]["memory_total_bytes"] > 0
    assert sum(h["replicas"]["primary"] for h in hosts.values()) == 1
    code, _, err = failoverctl(three, "undrain", primary)
    assert code == 0, err
    code, out, _ = failoverctl(three, "--format", "json", "hosts")
    assert not {h["host_id"]: h for h in json.loads(out)}[primary]["draining"]
