"""The real coordinator (`failover.coordinator.server.Coordinator`, its core and a SQLite store)
against a scripted agent on a real gRPC port: a switchover that ends early is abandoned on
every path, and memory never runs ahead of the store (invariant 15)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from failover.coordinator.server import Coordinator
from failover.core.coordinator import SERVICE_PREFIX, AssignRole, HostInfo, Timing
from failover.errors import InvalidRequest, Unavailable
from failover.storage.sqlite_store import SqliteStore
from failover.v1 import agent_pb2, agent_pb2_grpc
from tests.unit.inprocess import until

METRICS = {"cpu_count": 8.0, "memory_total_bytes": float(16 << 30),
           "disk_free_bytes": float(100 << 30), "disk_total_bytes": float(200 << 30),
           "cpu_percent": 5.0, "memory_percent": 5.0}


class ScriptedAgent(agent_pb2_grpc.AgentControlServicer):
    """Records control calls; a switchover prepare waits until the test lets it go."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.prepare_may_answer = asyncio.Event()

    async def AssignRole(self, request: Any, context: Any) -> Any:
        self.calls.append(("AssignRole", request))
        return agent_pb2.AssignRoleReply()

    async def StepDown(self, request: Any, context: Any) -> Any:
        self.calls.append(("StepDown", request))
        return agent_pb2.StepDownReply()

    async def DropReplica(self, request: Any, context: Any) -> Any:
        self.calls.append(("DropReplica", request))
        return agent_pb2.DropReplicaReply()

    async def PrepareSwitchover(self, request: Any, context: Any) -> Any:
        self.calls.append(("PrepareSwitchover", request))
        if not request.release:
            await self.prepare_may_answer.wait()
        return agent_pb2.PrepareSwitchoverReply()


class FailingStore(SqliteStore):
    """A SQLite store whose next commit fails, or waits until released, on demand."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail_next = False
        self.gate: asyncio.Event | None = None

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk I/O error (injected)")
        if self.gate is not None:
            await self.gate.wait()
        return await super().commit(*args, **kwargs)


async def stored_services(store: SqliteStore) -> set[str]:
    return {k.removeprefix(SERVICE_PREFIX) for k in await store.load()
            if k.startswith(SERVICE_PREFIX)}


@pytest.fixture
async def agent_server() -> AsyncIterator[tuple[ScriptedAgent, str]]:
    agent = ScriptedAgent()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentControlServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield agent, f"127.0.0.1:{port}"
    agent.prepare_may_answer.set()
    await server.stop(0)


@pytest.fixture
async def coordinator(tmp_path: Path, agent_server: tuple[ScriptedAgent, str],
                      ) -> AsyncIterator[Coordinator]:
    """A coordinator with three hosts (all served by the scripted agent) and service s on
    h1 (primary), h2 and h3. Its tick loop is not started: the test drives it."""
    _agent, address = agent_server
    coordinator = Coordinator(FailingStore(tmp_path / "cluster.db"), Timing())
    await coordinator.store.open()
    for host in ("h1", "h2", "h3"):
        await coordinator.register(HostInfo(host, address), METRICS)
    await coordinator.create_service("s", "kv", 3, "sync")
    yield coordinator
    await coordinator.stop()


async def test_a_cancelled_switchover_is_abandoned_and_releases_the_primary(
    coordinator: Coordinator, agent_server: tuple[ScriptedAgent, str],
) -> None:
    agent, _address = agent_server
    service = coordinator.core.services["s"]
    target = next(h for h in service.in_sync)
    switchover = asyncio.create_task(coordinator.switchover("s", target))
    await until(lambda: any(c[0] == "PrepareSwitchover" for c in agent.calls))
    assert coordinator.core.switchovers == {"s": target}
    switchover.cancel()  # the CLI's deadline passed, or Ctrl-C: gRPC cancels the handler
    with pytest.raises(asyncio.CancelledError):
        await switchover
    # Failover, rebuilds and later switchovers are not blocked for this service.
    assert "s" not in coordinator.core.switchovers
    await until(lambda: sum(c[0] == "PrepareSwitchover" for c in agent.calls) == 2)
    prepare, release = [c[1] for c in agent.calls if c[0] == "PrepareSwitchover"]
    assert release.release and release.epoch == prepare.epoch
    assert release.switchover_id and release.switchover_id == prepare.switchover_id
    # The next switchover starts.
    agent.prepare_may_answer.set()
    epoch, primary, _stall_ms = await coordinator.switchover("s", target)
    assert primary == target and epoch == 2


async def test_a_switchover_whose_hand_over_fails_to_commit_releases_the_primary(
    coordinator: Coordinator, agent_server: tuple[ScriptedAgent, str],
) -> None:
    """The plan had completed in memory, but its new epoch never reached the store: the
    reload ends the operation, and the primary is told to release its hold."""
    agent, _address = agent_server
    store = coordinator.store
    assert isinstance(store, FailingStore)
    primary = coordinator.core.services["s"].primary
    target = coordinator.core.services["s"].in_sync[0]
    switchover = asyncio.create_task(coordinator.switchover("s", target))
    await until(lambda: any(c[0] == "PrepareSwitchover" for c in agent.calls))
    store.fail_next = True  # the hand-over's commit
    agent.prepare_may_answer.set()
    with pytest.raises(Unavailable, match="reloaded its state from the store"):
        await switchover
    service = coordinator.core.services["s"]
    assert (service.primary, service.epoch) == (primary, 1)
    assert coordinator.core.switchovers == {}
    await until(lambda: sum(c[0] == "PrepareSwitchover" for c in agent.calls) == 2)
    prepare, release = [c[1] for c in agent.calls if c[0] == "PrepareSwitchover"]
    assert release.release and release.switchover_id == prepare.switchover_id
    assert not any(c[0] == "AssignRole" and c[1].epoch == 2 for c in agent.calls)


async def test_a_failed_commit_is_followed_by_a_reload_not_by_acting_on_memory(
    coordinator: Coordinator, agent_server: tuple[ScriptedAgent, str],
) -> None:
    agent, _address = agent_server
    assigned_before = sum(c[0] == "AssignRole" for c in agent.calls)
    store = coordinator.store
    assert isinstance(store, FailingStore)
    store.fail_next = True
    with pytest.raises(Unavailable, match="reloaded its state from the store"):
        await coordinator.create_service("t", "kv", 2, "sync")
    # The core changed its memory before the commit; after the failure it holds only what
    # the store has, and no agent was told of the service that was never persisted.
    assert "t" not in coordinator.core.services
    assert set(coordinator.core.services) == await stored_services(store)
    # The reload re-sends what the store holds (assignments are idempotent): s to its three
    # hosts. Calls to one address go out in order, so once those arrived, any assignment
    # queued before them would have too.
    await until(lambda: sum(c[0] == "AssignRole" for c in agent.calls) >= assigned_before + 3)
    assert not any(c[0] == "AssignRole" and c[1].service == "t" for c in agent.calls)
    # And the coordinator goes on working (once heartbeats have told it the hosts' room
    # again, as after a restart).
    for host in ("h1", "h2", "h3"):
        await coordinator.heartbeat(host, METRICS, [])
    await coordinator.create_service("t", "kv", 2, "sync")
    assert "t" in coordinator.core.services


async def test_a_commit_is_carried_out_to_the_end_when_its_caller_is_cancelled(
    coordinator: Coordinator, agent_server: tuple[ScriptedAgent, str],
) -> None:
    agent, _address = agent_server
    store = coordinator.store
    assert isinstance(store, FailingStore)
    store.gate = asyncio.Event()
    create = asyncio.create_task(coordinator.create_service("t", "kv", 2, "sync"))
    await until(lambda: "t" in coordinator.core.services)  # decided, the commit waits
    create.cancel()
    await asyncio.sleep(0.05)
    assert not create.done(), "the cancelled caller must wait for its commit to finish"
    store.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await create
    # The commit went through and so did the assignments that depended on it.
    assert "t" in await stored_services(store)
    await until(lambda: any(c[0] == "AssignRole" and c[1].service == "t" for c in agent.calls))


def test_a_switchover_targets_only_promotable_members() -> None:
    from failover.core.coordinator import CoordinatorCore

    core = CoordinatorCore(Timing())
    for host in ("h1", "h2", "h3"):
        core.register(HostInfo(host, f"{host}:1"), 0, METRICS)
    actions = core.create_service("s", "kv", 3, "sync", 0)
    assert any(isinstance(a, AssignRole) for a in actions)
    service = core.services["s"]
    member = service.in_sync[0]
    # In sync, but not (yet) known to hold every acknowledged write: a member that rejoined.
    service.promotable = [h for h in service.promotable if h != member]
    with pytest.raises(InvalidRequest, match="promotable"):
        core.switchover_target("s", member)
    assert core.switchover_target("s", "") != member


def test_a_heartbeat_built_before_an_in_sync_change_sets_no_promotion_threshold() -> None:
    """Item 8: a primary's heartbeat that was built before a queued in-sync shrink arrived
    after the member rejoined; its (equal-looking) in-sync set made the member promotable
    from the old report's durable index, though the primary had acknowledged later writes
    without it."""
    from failover.core.coordinator import CoordinatorCore, ReplicaReport

    core = CoordinatorCore(Timing())
    now = 1_000
    for host in ("h1", "h2", "h3"):
        core.register(HostInfo(host, f"{host}:1"), now, METRICS)
    core.create_service("s", "kv", 3, "sync", now)
    service = core.services["s"]
    primary, (d1, d2) = service.primary, service.in_sync

    def primary_report(durable: int, in_sync: tuple[str, ...], generation: int) -> ReplicaReport:
        return ReplicaReport("s", "primary", 1, durable, durable, durable, matched_index=durable,
                             in_sync=in_sync, in_sync_generation=generation)

    def duplica_report(matched: int) -> ReplicaReport:
        return ReplicaReport("s", "duplica", 1, matched, matched, matched, matched_index=matched)

    def beat(host: str, report: ReplicaReport) -> None:
        core.heartbeat(host, METRICS, [report], now)

    generation = service.in_sync_generation
    beat(primary, primary_report(10, (d1, d2), generation))
    stale = primary_report(10, (d1, d2), generation)  # built now, delivered late
    beat(d1, duplica_report(10))
    beat(d2, duplica_report(10))
    # d1 goes silent and leaves the in-sync set; the primary acknowledges writes without it.
    for _ in range(6):
        now += 100
        beat(primary, primary_report(10, tuple(service.in_sync), service.in_sync_generation))
        beat(d2, duplica_report(10))
        core.tick(now)
    assert d1 not in service.in_sync and d1 not in service.promotable
    beat(primary, primary_report(50, (d2,), service.in_sync_generation))
    beat(d2, duplica_report(50))
    # d1 catches up to 50 and rejoins; the primary has not applied that yet and goes on
    # acknowledging without it (up to 80).
    beat(d1, duplica_report(50))
    assert d1 in service.in_sync and d1 not in service.promotable
    beat(d2, duplica_report(80))
    # The stale heartbeat arrives: it must not make d1 promotable (d1 lacks 51..80).
    beat(primary, stale)
    beat(d1, duplica_report(50))
    assert d1 not in service.promotable
    # Once the primary reports counting d1 at the current generation, d1 is promotable
    # when it holds what the primary had then acknowledged.
    beat(primary, primary_report(80, (d1, d2), service.in_sync_generation))
    beat(d1, duplica_report(79))
    assert d1 not in service.promotable
    beat(d1, duplica_report(80))
    assert d1 in service.promotable
