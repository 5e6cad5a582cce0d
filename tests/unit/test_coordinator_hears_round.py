"""What the failover storm (issue 14 item 7) found in the coordinator daemon's calls to agents.

One decision round asks each surviving host for its status once.

The failover storm (benchmarks/storm.py) kills a host holding many primaries: the coordinator
asks the duplicas of all of them at once and decides them in one round. It used to ask each
host for its status (every replica it holds) once per service: a busy host answering one call
at a time let most of them run past the 200 ms deadline, and those failovers were blocked for
another failure timeout. A fake host here answers one call at a time, STATUS_MS each.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from failover.coordinator.server import HEARS_PRIMARY_TIMEOUT_S, Coordinator
from failover.core.coordinator import (
    AskHearsPrimary,
    AssignRole,
    DropReplica,
    HearsAnswer,
    HostInfo,
    Timing,
)
from failover.storage.sqlite_store import SqliteStore
from failover.v1 import agent_pb2
from tests.unit.inprocess import until

SERVICES = 10
STATUS_MS = 60  # a status of a host holding many replicas, on a loaded machine
HOSTS = {"host2": "127.0.0.1:2", "host3": "127.0.0.1:3"}
METRICS = {"cpu_count": 8.0, "memory_total_bytes": float(16 << 30),
           "disk_free_bytes": float(100 << 30), "disk_total_bytes": float(200 << 30)}


class BusyHost:
    """An agent's control stub that answers one call at a time, like one busy event loop."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id
        self.metadata = ()
        self.stub = self
        self.status_calls = 0
        self._one_at_a_time = asyncio.Lock()

    async def _answer(self, cost_s: float, timeout: float, reply: Any) -> Any:
        async def serve() -> Any:
            async with self._one_at_a_time:
                await asyncio.sleep(cost_s)  # the host's work, not a wait for anything
                return reply

        try:
            return await asyncio.wait_for(serve(), timeout)
        except TimeoutError:
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "Deadline Exceeded") from None

    async def HearsPrimary(self, request: agent_pb2.HearsPrimaryRequest, timeout: float,
                           metadata: Any = ()) -> agent_pb2.HearsPrimaryReply:
        return await self._answer(0.001, timeout,
                                  agent_pb2.HearsPrimaryReply(hears=False, epoch=1))

    async def GetStatus(self, request: agent_pb2.GetStatusRequest, timeout: float,
                        metadata: Any = ()) -> agent_pb2.AgentStatus:
        self.status_calls += 1
        return await self._answer(STATUS_MS / 1000, timeout, agent_pb2.AgentStatus(replicas=[
            agent_pb2.ReplicaStatus(service=f"kv{i}", matched_index=100 + i)
            for i in range(SERVICES)]))


async def test_a_round_of_many_failovers_asks_each_host_once_and_every_answer_arrives(
        ) -> None:
    assert SERVICES * STATUS_MS / 1000 > HEARS_PRIMARY_TIMEOUT_S  # one status per service:
    # the later ones would miss the deadline
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]
    hosts = {h: BusyHost(h) for h in HOSTS}
    coordinator._caller = lambda host_id, address: hosts[host_id]  # type: ignore[assignment, method-assign, return-value]
    decided: dict[str, list[HearsAnswer]] = {}

    def hears_primary_many(answers: dict[str, list[HearsAnswer]], now_ms: int) -> list[Any]:
        decided.update(answers)
        return []

    coordinator.core.hears_primary_many = hears_primary_many  # type: ignore[method-assign]
    asks = [AskHearsPrimary(f"kv{i}", 1, dict(HOSTS)) for i in range(SERVICES)]
    await coordinator._ask_hears_primary(asks)

    assert sorted(decided) == sorted(a.service for a in asks)
    for i in range(SERVICES):
        assert decided[f"kv{i}"] == [HearsAnswer(h, True, False, 100 + i, 1) for h in HOSTS]
    assert [h.status_calls for h in hosts.values()] == [1, 1]


async def test_a_live_host_registering_again_keeps_its_channel_a_restarted_one_gets_a_new_one(
        tmp_path: Path) -> None:
    """An agent registers again after any failed heartbeat (a slow one on a loaded machine):
    the coordinator's channel to it stays. A new channel (a new TLS connection, on a host
    already slow) only for a restarted agent or a host the coordinator stopped hearing."""
    coordinator = Coordinator(SqliteStore(tmp_path / "cluster.db"), Timing())
    await coordinator.store.open()
    try:
        info = HostInfo("host2", HOSTS["host2"], started_at=1.0)
        await coordinator.register(info, METRICS)
        channel = coordinator._caller("host2", HOSTS["host2"]).channel

        await coordinator.register(HostInfo("host2", HOSTS["host2"], started_at=1.0), METRICS)
        assert coordinator._caller("host2", HOSTS["host2"]).channel is channel

        await coordinator.register(HostInfo("host2", HOSTS["host2"], started_at=2.0), METRICS)
        restarted = coordinator._caller("host2", HOSTS["host2"]).channel
        assert restarted is not channel

        coordinator.core.live["host2"].alive = False  # silent past the failure timeout
        await coordinator.register(HostInfo("host2", HOSTS["host2"], started_at=2.0), METRICS)
        assert coordinator._caller("host2", HOSTS["host2"]).channel is not restarted
    finally:
        await coordinator.stop()


class HeldAgent:
    """An agent control stub whose first call is held until `release` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.first_call = asyncio.Event()
        self.release = asyncio.Event()

    async def _take(self, what: str, request: Any) -> None:
        self.calls.append((what, request.service))
        self.first_call.set()
        await self.release.wait()

    async def AssignRole(self, request: Any, timeout: float, metadata: Any = ()) -> None:
        await self._take("assign", request)

    async def DropReplica(self, request: Any, timeout: float, metadata: Any = ()) -> None:
        await self._take("drop", request)


async def test_an_assignment_already_queued_is_not_queued_again_and_order_is_kept() -> None:
    """A host that registers again is re-sent every assignment it holds: while the same
    assignment waits in its queue (its agent busy), re-sends add nothing to the queue; a
    different call of that service in between keeps the re-send, in order."""
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]
    caller = coordinator._caller("host2", HOSTS["host2"])
    agent = HeldAgent()
    caller.stub = agent  # type: ignore[assignment]
    try:
        def assign(service: str) -> AssignRole:
            return AssignRole("host2", HOSTS["host2"], service, "kv", "duplica", 1, "sync",
                              ("host1", "127.0.0.1:1"), {}, ())

        coordinator._enqueue(assign("kv0"))
        await agent.first_call.wait()  # kv0 in flight: the agent is busy
        for _ in range(3):  # a host re-registering three times while busy
            coordinator._enqueue(assign("kv1"))
        assert caller.queue.qsize() == 1
        coordinator._enqueue(DropReplica("host2", HOSTS["host2"], "kv1", 1))
        coordinator._enqueue(assign("kv1"))
        coordinator._enqueue(assign("kv0"))  # kv0's is sent already: this one is queued
        assert caller.queue.qsize() == 4
        agent.release.set()
        await until(lambda: len(agent.calls) == 5)
        assert agent.calls == [("assign", "kv0"), ("assign", "kv1"), ("drop", "kv1"),
                               ("assign", "kv1"), ("assign", "kv0")]
    finally:
        await caller.close()
