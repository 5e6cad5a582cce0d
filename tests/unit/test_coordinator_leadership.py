"""A coordinator among several (issue 15), on the SQLite store's leadership (resign ends a
term, campaign starts the next): a follower redirects, a deposed leader stops at once, every
control call and heartbeat reply carries the term."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from failover.coordinator import leadership
from failover.coordinator.server import TERM_METADATA, Coordinator
from failover.core.coordinator import Timing
from failover.errors import LeadershipLostError, Unavailable
from failover.net.channels import LEADER_METADATA_KEY
from failover.storage.sqlite_store import SqliteStore
from failover.storage.store import CoordinatorInfo
from failover.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from tests.unit.inprocess import until

METRICS = agent_pb2.HostMetrics(cpu_count=8, memory_total_bytes=16 << 30,
                                disk_free_bytes=100 << 30, disk_total_bytes=200 << 30,
                                cpu_percent=5.0, memory_percent=5.0)


class RecordingAgent(agent_pb2_grpc.AgentControlServicer):
    """Records each control call with the term it carried."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def _record(self, name: str, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.calls.append((name, metadata.get(TERM_METADATA)))

    async def AssignRole(self, request: Any, context: Any) -> Any:
        self._record("AssignRole", context)
        return agent_pb2.AssignRoleReply()

    async def StepDown(self, request: Any, context: Any) -> Any:
        self._record("StepDown", context)
        return agent_pb2.StepDownReply()

    async def DropReplica(self, request: Any, context: Any) -> Any:
        self._record("DropReplica", context)
        return agent_pb2.DropReplicaReply()


OTHER = CoordinatorInfo("127.0.0.1:2", True, 99)


class RefusingStore(SqliteStore):
    """On demand, another coordinator leads, as etcd would say: commits raise
    LeadershipLostError, a campaign waits, `leader` names the other."""

    refuse = False
    unsure = False  # the lease was not renewed in time: `leading` is False before wait_lost

    @property
    def leading(self) -> bool:
        return not self.unsure and super().leading

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        if self.refuse:
            raise LeadershipLostError("the leader key is another coordinator's (injected)")
        return await super().commit(*args, **kwargs)

    async def campaign(self, address: str) -> int:
        await until(lambda: not self.refuse)
        return await super().campaign(address)

    async def leader(self) -> CoordinatorInfo | None:
        return OTHER if self.refuse else await super().leader()


@pytest.fixture
async def agent() -> AsyncIterator[tuple[RecordingAgent, str]]:
    servicer = RecordingAgent()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentControlServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Coordinator, str]]:
    """A coordinator served as the daemon serves it (the leader gate, the term in replies),
    opened but not yet leading."""
    coordinator = Coordinator(RefusingStore(tmp_path / "cluster.db"), Timing(),
                              address="127.0.0.1:1", shared_store=True)
    coordinator.follow()
    await coordinator.store.open()
    await coordinator.store.resign()  # SQLite leads from open: start as a follower
    server = grpc.aio.server(interceptors=[leadership.LeaderGate(coordinator)])
    leadership.add_to_server(server, coordinator)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield coordinator, f"127.0.0.1:{port}"
    await server.stop(0)
    coordinator.deposed("test over")
    await coordinator.stop()


async def test_a_follower_redirects_but_serves_status_and_history(
        served: tuple[Coordinator, str]) -> None:
    coordinator, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Heartbeat(coordinator_pb2.HeartbeatRequest(host_id="h1"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "coordinator 127.0.0.1:1 is not the leader" in (refused.value.details() or "")
        # No leader is known (the store has none): no hint to follow.
        assert LEADER_METADATA_KEY not in dict(refused.value.trailing_metadata() or ())
        with pytest.raises(grpc.aio.AioRpcError) as refused_watch:
            async for _update in stub.WatchRoutes(coordinator_pb2.WatchRoutesRequest()):
                pass
        assert refused_watch.value.code() == grpc.StatusCode.UNAVAILABLE
        status = await stub.GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=5)
        assert [(c.address, c.leader, c.term) for c in status.coordinators] == [
            ("127.0.0.1:1", False, 0)]
        await stub.GetHistory(coordinator_pb2.HistoryRequest(), timeout=5)
    assert not coordinator.store.leading  # a follower's heartbeat committed nothing


async def test_the_leader_stamps_its_term_and_a_deposed_one_stops_at_once(
        served: tuple[Coordinator, str], agent: tuple[RecordingAgent, str]) -> None:
    coordinator, address = served
    recorder, agent_address = agent
    stopping = asyncio.Event()
    loop = asyncio.create_task(leadership.campaign_loop(coordinator, stopping))
    await until(lambda: coordinator.leading)
    term = coordinator.term
    assert term > 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for host in ("h1", "h2"):
            reply = await stub.Register(coordinator_pb2.RegisterRequest(
                host_id=host, address=agent_address, metrics=METRICS), timeout=5)
            assert reply.coordinator_term == term
        heartbeat = await stub.Heartbeat(
            coordinator_pb2.HeartbeatRequest(host_id="h1", metrics=METRICS), timeout=5)
        assert heartbeat.coordinator_term == term
        await coordinator.create_service("s", "kv", 2, "sync")
        await until(lambda: len(recorder.calls) >= 2)
        assert {t for _name, t in recorder.calls} == {str(term)}
        status = await stub.GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=5)
        assert [(c.leader, c.term) for c in status.coordinators] == [(True, term)]

        # The store ends the term: the coordinator stops at once, then leads again under a
        # new term, restored from the store, and its calls say so.
        await coordinator.store.resign()
        await until(lambda: coordinator.term > term)
        assert coordinator.leading and set(coordinator.core.services) == {"s"}
        # Both of the service's assignments are sent again under the new term; the test
        # counted the calls while the second was still in flight (a flake once in CI).
        await until(lambda: sum(t == str(coordinator.term) for _n, t in recorder.calls) >= 2)
        assert all(t in (str(term), str(coordinator.term)) for _n, t in recorder.calls)

        # The store refuses a commit (another leads): nothing of it goes out, the
        # coordinator stops leading at once and redirects.
        calls_before = len(recorder.calls)
        store = coordinator.store
        assert isinstance(store, RefusingStore)
        store.refuse = True
        with pytest.raises(Unavailable, match="not the leader"):
            await coordinator.delete_service("s")
        assert not coordinator.leading
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Heartbeat(coordinator_pb2.HeartbeatRequest(host_id="h1"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the leader is 127.0.0.1:2 (term 99)" in (refused.value.details() or "")
        assert dict(refused.value.trailing_metadata() or ())[LEADER_METADATA_KEY] == OTHER.address
        # Nothing queued to go out later either (a reload after the refused commit would
        # have re-sent every assignment).
        assert not coordinator._callers
        assert len(recorder.calls) == calls_before
    stopping.set()
    store.refuse = False
    await asyncio.wait_for(loop, 5)


async def test_a_sqlite_coordinator_that_led_at_start_does_not_lead_again(
        tmp_path: Path) -> None:
    """The daemon leads on SQLite before serving; its campaign loop then finds the same
    term and must not restore a second core (every assignment re-sent, two tick loops)."""
    coordinator = Coordinator(SqliteStore(tmp_path / "cluster.db"), Timing(),
                              address="127.0.0.1:1")
    coordinator.follow()
    await coordinator.start()
    leads: list[int] = []
    campaigned = asyncio.Event()
    lead, campaign = coordinator.lead, coordinator.store.campaign

    async def counted_lead(term: int) -> None:
        leads.append(term)
        await lead(term)

    async def signalled_campaign(address: str) -> int:
        term = await campaign(address)
        campaigned.set()  # the loop goes on to lead (or not) before this test runs again
        return term

    coordinator.lead = counted_lead  # type: ignore[method-assign]
    coordinator.store.campaign = signalled_campaign  # type: ignore[method-assign]
    stopping = asyncio.Event()
    loop = asyncio.create_task(leadership.campaign_loop(coordinator, stopping))
    await asyncio.wait_for(campaigned.wait(), 5)
    assert leads == []
    assert coordinator.leading
    stopping.set()
    await asyncio.wait_for(loop, 5)
    await coordinator.stop()


async def test_a_leader_unsure_of_its_term_grants_no_lease(tmp_path: Path) -> None:
    """Between the store ceasing to be sure of the term (its lease not renewed in time) and
    the deposal, a heartbeat gets no lease, even one that needs nothing committed or sent: a
    follower may take over when etcd expires the lease, and would not wait out a lease it
    never heard of."""
    coordinator = Coordinator(RefusingStore(tmp_path / "cluster.db"), Timing(),
                              address="127.0.0.1:1", shared_store=True)
    await coordinator.start()
    grant = [("s", 1, 300)]
    # The core's part is not under test: a heartbeat it answers with a lease and no action.
    coordinator.core.heartbeat = lambda *_args: (grant, [])  # type: ignore[method-assign]
    assert await coordinator.heartbeat("h1", {}, []) == grant
    store = coordinator.store
    assert isinstance(store, RefusingStore)
    store.unsure = True
    assert coordinator.leading  # not deposed yet: only the store knows
    with pytest.raises(Unavailable, match="not the leader"):
        await coordinator.heartbeat("h1", {}, [])
    store.unsure = False
    coordinator.deposed("test over")
    await coordinator.stop()


async def test_a_leader_unsure_of_its_term_ticks_no_decision(tmp_path: Path) -> None:
    """Once the store is no longer sure of the term, the tick loop leaves the core alone
    until the deposal (a decision then could only be dropped, and was logged as a failure)."""
    coordinator = Coordinator(RefusingStore(tmp_path / "cluster.db"), Timing(),
                              address="127.0.0.1:1", shared_store=True)
    await coordinator.start()
    ticks: list[int] = []
    checks: list[bool] = []
    coordinator.core.tick = lambda now: ticks.append(now) or []  # type: ignore[method-assign]
    acting = coordinator._acting

    def counted() -> bool:
        checks.append(acting())
        return checks[-1]

    coordinator._acting = counted  # type: ignore[method-assign]
    await until(lambda: len(ticks) >= 2)  # it ticks while sure
    store = coordinator.store
    assert isinstance(store, RefusingStore)
    store.unsure = True
    ticked = len(ticks)
    await until(lambda: checks.count(False) >= 3)  # three periods of the loop, at least
    assert len(ticks) == ticked
    store.unsure = False
    coordinator.deposed("test over")
    await coordinator.stop()
