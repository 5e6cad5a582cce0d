"""The streaming data path (issue 16) with real agent and coordinator processes: transfers on
one ExecuteStream per primary, through a switchover and a kill -9 failover. Every transfer
moves 1 from a writer's own account to its own sink, so each sink's balance counts exactly
the transfers applied: equal to those acknowledged means none lost and none applied twice
(retries after the kill carry the same request ids to the new primary)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from failover.client import Client
from failover.errors import FailoverError
from failover.localcluster import LocalCluster, wait_for
from failover.v1 import coordinator_pb2

pytestmark = pytest.mark.timeout(180)

WRITERS = 6
BATCH = 8  # half the writers send BATCH transfers at once with call_many
OPENING = 1_000_000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=3, coordinator=True) as c:
        c.start()
        c.create("bank", "bank", replicas=3)
        yield c


@dataclass
class Transfers:
    client: Client
    acked: dict[int, int] = field(default_factory=dict)  # writer -> transfers acknowledged
    duplicates: int = 0  # answers that were the recorded reply of an earlier attempt
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self, n: int) -> None:
        transfer = {"op": "transfer", "from": f"w{n}", "to": f"sink{n}", "amount": 1}
        self.acked[n] = 0
        while not self.stop.is_set():
            try:
                if n % 2:
                    await self.client.call_many("bank", [transfer] * BATCH)
                    self.acked[n] += BATCH
                else:
                    out = await self.client.call_detailed("bank", transfer)
                    self.duplicates += out.duplicate
                    self.acked[n] += 1
            except FailoverError as exc:
                self.failures.append(f"w{n}: {type(exc).__name__}: {exc}")

    async def run_while(self, action: asyncio.Future[None]) -> None:
        tasks = [asyncio.create_task(self.writer(n)) for n in range(WRITERS)]
        try:
            await action
        finally:
            self.stop.set()
            await asyncio.gather(*tasks)


async def test_stream_writes_survive_a_switchover_and_a_kill_applied_exactly_once(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    stub = cluster.coordinator.stub()
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                      deadline_ms=15_000, stream=True) as client:
        assert client.stream
        await client.call_many("bank", [
            {"op": "open", "account": f"{prefix}{n}", "balance": OPENING if prefix == "w"
             else 0} for n in range(WRITERS) for prefix in ("w", "sink")])
        work = Transfers(client)
        moved: list[tuple[str, str]] = []

        async def switchover_then_kill() -> None:
            await asyncio.sleep(1.0)
            before = cluster.primary_of("bank")
            reply = await asyncio.to_thread(
                stub.Switchover, coordinator_pb2.SwitchoverRequest(service="bank"), timeout=30)
            assert reply.primary_host_id != before
            moved.append(("switchover", reply.primary_host_id))
            await asyncio.sleep(1.0)
            victim = reply.primary_host_id
            cluster[victim].kill()  # kill -9, calls in flight on its stream
            await asyncio.to_thread(
                wait_for, lambda: cluster.primary_of("bank") not in (None, victim), 20,
                "a new primary")
            moved.append(("failover", cluster.primary_of("bank") or ""))
            await asyncio.sleep(1.0)

        await work.run_while(asyncio.ensure_future(switchover_then_kill()))
        assert not work.failures, work.failures[:5]
        assert [kind for kind, _ in moved] == ["switchover", "failover"]
        assert sum(work.acked.values()) > 200
        balances = await client.call_many("bank", [
            {"op": "balance", "account": f"sink{n}"} for n in range(WRITERS)])
        total = await client.call("bank", {"op": "total"})
    # Each sink holds exactly the transfers its writer saw acknowledged: none lost, none
    # applied twice, whatever was retried across the switchover and the kill.
    assert [b["balance"] for b in balances] == [work.acked[n] for n in range(WRITERS)]
    assert total["total"] == OPENING * WRITERS
