"""What the failover storm (issue 14 item 7) found in the coordinator daemon's calls to agents.

One decision round asks each surviving host once (one HearsPrimary naming every service,
answered with each one's matched index).

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
import pytest

from failover import defaults
from failover.clock import monotonic_ms
from failover.coordinator.server import Coordinator
from failover.core.coordinator import (
    AskHearsPrimary,
    AssignRole,
    DropReplica,
    HearsAnswer,
    HostInfo,
    ReleaseSwitchover,
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
        self.hears_calls = 0
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
        self.hears_calls += 1
        assert request.services and not request.service  # every service of the round at once
        # As costly as a status of every replica it holds: one answer reads each one's index.
        return await self._answer(STATUS_MS / 1000, timeout, agent_pb2.HearsPrimaryReply(
            answers=[agent_pb2.HearsPrimaryAnswer(service=s, held=True, hears=False, epoch=1,
                                                  matched_index=100 + int(s[2:]))
                     for s in request.services]))

    async def GetStatus(self, request: agent_pb2.GetStatusRequest, timeout: float,
                        metadata: Any = ()) -> agent_pb2.AgentStatus:
        self.status_calls += 1
        return await self._answer(STATUS_MS / 1000, timeout, agent_pb2.AgentStatus(replicas=[
            agent_pb2.ReplicaStatus(service=f"kv{i}", matched_index=100 + i)
            for i in range(SERVICES)]))


def capture_decisions(coordinator: Coordinator) -> dict[str, list[HearsAnswer]]:
    """The answers each round hands the core, per service (the core decides nothing)."""
    decided: dict[str, list[HearsAnswer]] = {}

    def hears_primary_many(answers: dict[str, list[HearsAnswer]], now_ms: int) -> list[Any]:
        decided.update(answers)
        return []

    coordinator.core.hears_primary_many = hears_primary_many  # type: ignore[method-assign]
    return decided


async def test_a_round_of_many_failovers_asks_each_host_once_and_every_answer_arrives(
        ) -> None:
    assert SERVICES * STATUS_MS > defaults.HEARS_PRIMARY_TIMEOUT_MS  # one status per service:
    # the later ones would miss the deadline
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]
    hosts = {h: BusyHost(h) for h in HOSTS}
    coordinator._caller = lambda host_id, address: hosts[host_id]  # type: ignore[assignment, method-assign, return-value]
    decided = capture_decisions(coordinator)
    asks = [AskHearsPrimary(f"kv{i}", 1, dict(HOSTS)) for i in range(SERVICES)]
    await coordinator._ask_hears_primary(asks)

    assert sorted(decided) == sorted(a.service for a in asks)
    for i in range(SERVICES):
        assert decided[f"kv{i}"] == [HearsAnswer(h, True, False, 100 + i, 1) for h in HOSTS]
    # One call per host for the whole round, answering with the matched indexes too.
    assert [h.hears_calls for h in hosts.values()] == [1, 1]
    assert [h.status_calls for h in hosts.values()] == [0, 0]


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
        assert caller.qsize() == 1
        coordinator._enqueue(DropReplica("host2", HOSTS["host2"], "kv1", 1))
        coordinator._enqueue(assign("kv1"))
        coordinator._enqueue(assign("kv0"))  # kv0's is sent already: this one is queued
        assert caller.qsize() == 4
        agent.release.set()
        await until(lambda: len(agent.calls) == 5)
        # Services go out side by side; each service's calls in the order they were queued.
        assert [c for c in agent.calls if c[1] == "kv0"] == [("assign", "kv0")] * 2
        assert [c for c in agent.calls if c[1] == "kv1"] == [
            ("assign", "kv1"), ("drop", "kv1"), ("assign", "kv1")]
    finally:
        await caller.close()


class GatedAgent:
    """An agent whose every call waits for its own gate: shows which calls are in flight."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []  # (service, epoch), in the order they began
        self.gates: dict[tuple[str, int], asyncio.Event] = {}

    async def AssignRole(self, request: Any, timeout: float, metadata: Any = ()) -> None:
        key = (request.service, request.epoch)
        self.started.append(key)
        await self.gates.setdefault(key, asyncio.Event()).wait()

    def release(self, service: str, epoch: int) -> None:
        self.gates.setdefault((service, epoch), asyncio.Event()).set()


def _assign(service: str, epoch: int = 1) -> AssignRole:
    return AssignRole("host2", HOSTS["host2"], service, "kv", "primary", epoch, "sync",
                      None, {}, ())


async def test_calls_of_different_services_go_out_together_one_service_waits_its_turn() -> None:
    """A host death promotes several services on each survivor at once: their assignments
    go out side by side (one at a time, each waiting out the agent's meta sync, the sixth
    promotion on a host landed a second after the first), up to the in-flight bound; a
    second call of a service waits for its first to be answered."""
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]
    caller = coordinator._caller("host2", HOSTS["host2"])
    agent = GatedAgent()
    caller.stub = agent  # type: ignore[assignment]
    bound = defaults.COORDINATOR_HOST_CALLS_IN_FLIGHT_MAX
    try:
        for i in range(bound + 2):
            coordinator._enqueue(_assign(f"kv{i}"))
        coordinator._enqueue(_assign("kv0", epoch=2))
        await until(lambda: len(agent.started) == bound)
        assert agent.started == [(f"kv{i}", 1) for i in range(bound)]
        assert caller.in_flight() == bound and caller.qsize() == 3
        agent.release("kv1", 1)  # kv1 answered: the next waiting service goes out
        await until(lambda: len(agent.started) == bound + 1)
        assert agent.started[-1] == (f"kv{bound}", 1)  # kv0's second waits for its first
        agent.release("kv0", 1)
        await until(lambda: len(agent.started) == bound + 2)
        assert agent.started[-1] == ("kv0", 2)
        for key in list(agent.gates) + [(f"kv{bound + 1}", 1)]:
            agent.release(*key)
        await until(lambda: len(agent.started) == bound + 3 and caller.in_flight() == 0)
        assert caller.qsize() == 0
    finally:
        await caller.close()


async def test_a_full_host_queue_drops_the_call_and_keeps_the_rest() -> None:
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]
    caller = coordinator._caller("host2", HOSTS["host2"])
    caller.queue_max = 2
    agent = GatedAgent()
    caller.stub = agent  # type: ignore[assignment]
    try:
        caller.put(_assign("kv0"))
        caller.put(_assign("kv0", epoch=2))
        with pytest.raises(asyncio.QueueFull):
            caller.put(_assign("kv1"))
        coordinator._enqueue(_assign("kv1"))  # dropped and counted, never raised
        assert coordinator._dropped_calls == 1
        agent.release("kv0", 1)
        agent.release("kv0", 2)
        await until(lambda: agent.started == [("kv0", 1), ("kv0", 2)] and caller.qsize() == 0)
    finally:
        await caller.close()


class LossyRelease:
    """A primary whose first `lost` release calls fail as `code`."""

    def __init__(self, lost: int, code: grpc.StatusCode) -> None:
        self.lost = lost
        self.code = code
        self.calls = 0

    async def PrepareSwitchover(self, request: Any, timeout: float, metadata: Any = ()) -> None:
        assert request.release and request.switchover_id == "sw-1"
        self.calls += 1
        if self.calls <= self.lost:
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="lost (test)")


@pytest.mark.parametrize(("code", "calls"), [(grpc.StatusCode.UNAVAILABLE, 3),
                                             (grpc.StatusCode.FAILED_PRECONDITION, 1)])
async def test_a_lost_release_of_a_switchover_hold_is_sent_again(
    code: grpc.StatusCode, calls: int,
) -> None:
    """Lost once, a release left the primary holding writes for the whole switchover
    timeout (5 s). One that got no answer is sent again; a definite refusal is not."""
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]
    caller = coordinator._caller("host2", HOSTS["host2"])
    agent = LossyRelease(2, code)
    caller.stub = agent  # type: ignore[assignment]
    try:
        await asyncio.wait_for(coordinator._release(ReleaseSwitchover(
            "host2", HOSTS["host2"], "kv0", 1, "sw-1")), 5)
        assert agent.calls == calls
    finally:
        await caller.close()


async def test_a_live_host_slow_to_answer_is_waited_for_a_silent_one_is_not() -> None:
    """Under the storm's load a live survivor answered the round in 200-300 ms: past the
    200 ms deadline its answer was lost, its services' failovers were blocked, and they were
    decided a failure timeout later (480 ms more). A host the coordinator hears is now waited
    for as long as it would take to suspect it (`hears_timeout_ms`); one it does not hear,
    no longer than before."""
    timing = Timing()
    coordinator = Coordinator(store=None, timing=timing)  # type: ignore[arg-type]
    now = monotonic_ms()
    for host_id, address in HOSTS.items():
        coordinator.core.register(HostInfo(host_id, address), now, METRICS)
        coordinator.core.heartbeat(host_id, METRICS, [], now)
    assert coordinator.core.hears_timeout_ms("host2", now) == timing.failure_timeout_ms
    assert coordinator.core.hears_timeout_ms("nobody", now) == \
        defaults.HEARS_PRIMARY_TIMEOUT_MS
    later = now + timing.failure_timeout_ms + 1
    assert coordinator.core.hears_timeout_ms("host2", later) == \
        defaults.HEARS_PRIMARY_TIMEOUT_MS

    class SlowHost(BusyHost):
        async def HearsPrimary(self, request: agent_pb2.HearsPrimaryRequest, timeout: float,
                               metadata: Any = ()) -> agent_pb2.HearsPrimaryReply:
            self.hears_calls += 1
            return await self._answer(0.3, timeout, agent_pb2.HearsPrimaryReply(answers=[
                agent_pb2.HearsPrimaryAnswer(service=s, held=True, hears=False, epoch=1,
                                             matched_index=7) for s in request.services]))

    hosts = {h: SlowHost(h) for h in HOSTS}
    coordinator._caller = lambda host_id, address: hosts[host_id]  # type: ignore[assignment, method-assign, return-value]
    decided = capture_decisions(coordinator)
    await coordinator._ask_hears_primary([AskHearsPrimary("kv0", 1, dict(HOSTS))])
    assert decided["kv0"] == [HearsAnswer(h, True, False, 7, 1) for h in HOSTS]
