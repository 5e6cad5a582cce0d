"""The coordinator with real agent processes: failover, false alarms, outages, switchover."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from failover.client import Client
from failover.errors import FailoverError
from failover.localcluster import LocalCluster, wait_for
from failover.v1 import coordinator_pb2

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=3, coordinator=True) as c:
        c.start()
        c.create("kv", "kv", replicas=3)
        yield c


@dataclass
class Workload:
    """Writers putting unique keys, recording what was acknowledged and what failed."""

    client: Client
    acked: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    reads_ok: int = 0
    last_ok: float = 0.0
    gaps: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self, name: str, reads: bool = False) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            key, value = f"{name}-{i}", f"v{i}"
            try:
                await self.client.call("kv", {"op": "put", "key": key, "value": value})
                if reads:
                    got = await self.client.call("kv", {"op": "get", "key": key})
                    assert got["value"] == value, (key, got)
                    self.reads_ok += 1
            except FailoverError as exc:
                self.failures.append(f"{key}: {type(exc).__name__}: {exc}")
                continue
            now = time.monotonic()
            if self.last_ok:
                self.gaps.append(now - self.last_ok)
            self.last_ok = now
            self.acked[key] = value

    async def run_while(self, action: asyncio.Future | None = None, writers: int = 6,
                        reads: bool = False) -> None:
        tasks = [asyncio.create_task(self.writer(f"w{n}", reads)) for n in range(writers)]
        try:
            if action is not None:
                await action
        finally:
            self.stop.set()
            await asyncio.gather(*tasks)

    async def check_nothing_lost(self) -> None:
        for key, value in self.acked.items():
            got = await self.client.call("kv", {"op": "get", "key": key})
            assert got["found"] and got["value"] == value, f"acknowledged {key} lost: {got}"


def epoch_of(cluster: LocalCluster, service: str = "kv") -> int:
    assert cluster.coordinator is not None
    return next(s.epoch for s in cluster.coordinator.status().services if s.name == service)


async def kill_under_load(cluster: LocalCluster, kill: str) -> tuple[str, Workload]:
    """Writers run; the primary's agent child (`kill="child"`) or whole agent ("agent") is
    SIGKILLed; returns the old primary once a new one serves and the writers stopped."""
    assert cluster.coordinator is not None
    old = cluster.primary_of("kv")
    assert old is not None
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                      deadline_ms=10_000) as client:
        work = Workload(client)

        async def kill_then_wait() -> None:
            await asyncio.to_thread(wait_for, lambda: len(work.acked) >= 50, 10, "writes")
            if kill == "child":
                cluster[old].kill_child()
            else:
                cluster[old].kill()
            await asyncio.to_thread(
                wait_for, lambda: cluster.primary_of("kv") not in (None, old), 15,
                "a new primary")
            acked = len(work.acked)
            await asyncio.to_thread(wait_for, lambda: len(work.acked) >= acked + 50, 10,
                                    "writes at the new primary")

        await work.run_while(asyncio.ensure_future(kill_then_wait()), writers=4)
        assert not work.failures, work.failures[:5]
        await work.check_nothing_lost()
    return old, work


async def test_killed_primary_fails_over_and_no_acked_write_is_lost(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    old, work = await kill_under_load(cluster, "agent")
    assert len(work.acked) > 100
    assert epoch_of(cluster) == 2
    events = cluster.coordinator.history("kv")
    failover = next(e for e in events if e.kind == "failover")
    assert old in failover.message
    # The old primary comes back as a duplica and catches up.
    cluster[old].start()
    hosts = list(cluster.agents)
    cluster.wait_converged("kv", hosts, timeout_s=30)


async def test_sigstop_of_150_ms_is_not_a_failover(cluster: LocalCluster) -> None:
    primary = cluster.primary_of("kv")
    assert primary is not None
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client) as client:  # type: ignore[union-attr]
        work = Workload(client)

        async def pauses() -> None:
            for _ in range(5):
                await asyncio.sleep(0.3)
                cluster[primary].signal(signal.SIGSTOP)
                await asyncio.sleep(0.15)
                cluster[primary].signal(signal.SIGCONT)
            await asyncio.sleep(1.0)

        await work.run_while(asyncio.ensure_future(pauses()), writers=4)
        assert not work.failures, work.failures[:5]
    assert epoch_of(cluster) == 1
    assert cluster.primary_of("kv") == primary


async def test_coordinator_outage_of_10_s_fails_no_request(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client) as client:
        work = Workload(client)

        async def outage() -> None:
            await asyncio.sleep(0.5)
            cluster.coordinator.kill()  # type: ignore[union-attr]
            await asyncio.sleep(10)
            cluster.coordinator.start()  # type: ignore[union-attr]
            await asyncio.sleep(1.0)

        # Reads too: outside its lease the primary confirms its epoch with its duplicas.
        await work.run_while(asyncio.ensure_future(outage()), writers=4, reads=True)
        assert not work.failures, work.failures[:5]
        assert work.reads_ok > 100
        await work.check_nothing_lost()
    assert epoch_of(cluster) == 1


async def test_switchover_under_load_fails_no_request(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    stub = cluster.coordinator.stub()
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client) as client:
        work = Workload(client)
        replies: list[coordinator_pb2.SwitchoverReply] = []

        async def switchovers() -> None:
            for _ in range(3):
                await asyncio.sleep(0.5)
                replies.append(await asyncio.to_thread(
                    stub.Switchover, coordinator_pb2.SwitchoverRequest(service="kv"),
                    timeout=15))
            await asyncio.sleep(0.5)

        await work.run_while(asyncio.ensure_future(switchovers()))
        assert not work.failures, work.failures[:5]
        await work.check_nothing_lost()
    assert [r.epoch for r in replies] == [2, 3, 4]
    assert all(r.stall_ms < 1000 for r in replies), [r.stall_ms for r in replies]
    assert cluster.primary_of("kv") == replies[-1].primary_host_id
    # The client saw a stall at most, never an error; no gap near a failover's.
    assert max(work.gaps) < 2.0


async def test_coordinator_restart_mid_failover_completes_it(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    old = cluster.primary_of("kv")
    assert old is not None
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                      deadline_ms=15_000) as client:
        work = Workload(client)

        async def crash_both() -> None:
            await asyncio.sleep(0.5)
            cluster[old].kill()
            # Kill the coordinator around the moment it detects the failure...
            await asyncio.sleep(0.45)
            cluster.coordinator.kill()  # type: ignore[union-attr]
            await asyncio.sleep(0.5)
            cluster.coordinator.start()  # type: ignore[union-attr]
            # ...the restarted one must finish the job without contradicting itself.
            await asyncio.to_thread(
                wait_for, lambda: cluster.primary_of("kv") not in (None, old), 20,
                "a new primary after the coordinator's restart")
            await asyncio.sleep(0.5)

        await work.run_while(asyncio.ensure_future(crash_both()), writers=4)
        assert not work.failures, work.failures[:5]
        await work.check_nothing_lost()
    epoch = epoch_of(cluster)
    assert epoch >= 2
    failovers = [e for e in cluster.coordinator.history("kv") if e.kind == "failover"]
    assert len(failovers) == epoch - 1  # one promotion per epoch raise, none repeated


def test_failoverctl_against_a_real_coordinator(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    ctl = [sys.executable, "-m", "failover.cli", *cluster.cli_args()]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ctl, *args], capture_output=True, text=True, timeout=30)

    created = run("create", "accounts", "--kind", "bank", "--replicas", "2")
    assert created.returncode == 0, created.stderr
    wait_for(lambda: cluster.primary_of("accounts"), 15, "accounts to serve")
    opened = run("--format", "json", "call", "accounts",
                 '{"op": "open", "account": "a", "balance": 10}')
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["balance"] == 10
    status = json.loads(run("--format", "json", "status").stdout)
    assert {h["host_id"] for h in status["hosts"]} == set(cluster.agents)
    accounts = next(s for s in status["services"] if s["name"] == "accounts")
    assert accounts["kind"] == "bank" and len(accounts["replicas"]) == 2
    assert {r["role"] for r in accounts["replicas"]} == {"primary", "duplica"}
    switched = run("--format", "json", "switchover", "accounts")
    assert switched.returncode == 0, switched.stderr
    history = json.loads(run("--format", "json", "history", "accounts").stdout)
    assert [e["kind"] for e in history][-2:] == ["switchover", "audit"]
    audit = history[-1]["details"]
    assert (audit["caller"], audit["rpc"], audit["outcome"]) == (
        "admin 'admin'", "switchover", "ok")
    bad = run("create", "x", "--kind", "nosuchkind")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_sync_client_for_scripts(cluster: LocalCluster) -> None:
    from failover.client import SyncClient
    from failover.errors import InvalidRequest

    assert cluster.coordinator is not None
    with SyncClient(coordinator=cluster.coordinator.address, tls=cluster.tls_client) as client:
        assert client.call("kv", {"op": "put", "key": "a", "value": b"\x00bytes"})["ok"]
        got = client.call("kv", {"op": "get", "key": "a"})
        assert got["value"] == b"\x00bytes"  # bytes stay bytes end to end
        with pytest.raises(InvalidRequest):
            client.call("kv", {"op": "frobnicate"})


async def test_restarted_primary_serves_only_once_the_coordinator_confirms_it(
    cluster: LocalCluster,
) -> None:
    import grpc
    import msgpack

    from failover.v1 import common_pb2, data_pb2, data_pb2_grpc

    assert cluster.coordinator is not None
    primary = cluster.primary_of("kv")
    assert primary is not None
    cluster.coordinator.kill()
    cluster[primary].kill()
    cluster[primary].start()
    channel = cluster.aio_channel(cluster[primary].address)
    try:
        stub = data_pb2_grpc.DataStub(channel)
        request = data_pb2.ExecuteRequest(
            service="kv", request_id=common_pb2.RequestId(client_id="probe", seq=1),
            payload=msgpack.packb({"op": "put", "key": "k", "value": "v"}), opens_session=True)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Execute(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "confirm" in (info.value.details() or "")
        cluster.coordinator.start()
        reply = await asyncio.wait_for(_retry_until_ok(stub, request), 20)
        assert reply.epoch == 1  # confirmed: it was still the primary
    finally:
        await channel.close()


async def _retry_until_ok(stub, request):  # type: ignore[no-untyped-def]
    import grpc

    while True:
        try:
            return await stub.Execute(request, timeout=2)
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)
