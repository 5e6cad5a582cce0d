"""Callers follow the leader among several coordinators (issue 15): a follower answers
UNAVAILABLE naming the leader in trailing metadata, and the agent's link, the client's routes
watch and `failoverctl` go there at once; without a hint, the next address after a bounded
backoff. Fake coordinators served in-process with grpc.aio on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from failover.agent.coordinator_link import CoordinatorLink
from failover.agent.host import Agent
from failover.cli.admin import CoordinatorCaller
from failover.cli.main import main
from failover.client import Client
from failover.core.roles import PRIMARY
from failover.net import channels
from failover.net import leader as leader_module
from failover.net.channels import LEADER_METADATA_KEY
from failover.net.leader import LeaderFollower, leader_hint
from failover.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.unit.inprocess import agent_config, until

PRIMARY_ADDRESS = "127.0.0.1:7101"


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """A leader (`term` > 0: answers everything) or a follower (refuses all but the reads
    with UNAVAILABLE, naming `hint` when it is set). Every call goes to the shared `log`."""

    def __init__(self, log: list[tuple[str, str]], term: int = 0, hint: str = "",
                 lease_ms: int = 0) -> None:
        self.log = log
        self.term = term
        self.hint = hint
        self.lease_ms = lease_ms
        self.address = ""
        self.status: coordinator_pb2.ClusterStatus | None = None

    def calls(self, method: str) -> int:
        return sum(1 for a, m in self.log if (a, m) == (self.address, method))

    async def _lead(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.log.append((self.address, method))
        if self.term:
            return
        if self.hint:
            context.set_trailing_metadata(((LEADER_METADATA_KEY, self.hint),))
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"coordinator {self.address} is not the leader; the leader is "
                            f"{self.hint or 'unknown'}")

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._lead("Register", context)
        return coordinator_pb2.RegisterReply(heartbeat_ms=20, lease_ms=self.lease_ms,
                                             coordinator_term=self.term)

    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._lead("Heartbeat", context)
        return coordinator_pb2.HeartbeatReply(
            coordinator_term=self.term,
            leases=[coordinator_pb2.LeaseGrant(service=r.service, epoch=r.epoch,
                                               lease_ms=self.lease_ms)
                    for r in request.replicas if self.lease_ms])

    async def WatchRoutes(self, request: Any, context: grpc.aio.ServicerContext,
                          ) -> AsyncIterator[coordinator_pb2.RoutesUpdate]:
        await self._lead("WatchRoutes", context)
        yield coordinator_pb2.RoutesUpdate(version=1, full=True, routes=[coordinator_pb2.Route(
            service="kv", kind="kv", primary_address=PRIMARY_ADDRESS, epoch=3)])
        await asyncio.Event().wait()  # the stream stays open, as a leader's does

    async def Switchover(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._lead("Switchover", context)
        return coordinator_pb2.SwitchoverReply(epoch=4, primary_host_id="h2", stall_ms=3)

    async def Patch(self, request: Any, context: grpc.aio.ServicerContext,
                    ) -> AsyncIterator[coordinator_pb2.PatchProgress]:
        await self._lead("Patch", context)
        yield coordinator_pb2.PatchProgress(host_id="h1", step="done", message="patched h1",
                                            ok=True)

    async def GetClusterStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.log.append((self.address, "GetClusterStatus"))  # any coordinator answers it
        if self.status is not None:
            return self.status
        return coordinator_pb2.ClusterStatus(coordinators=[
            coordinator_pb2.CoordinatorStatus(address="127.0.0.1:7000", leader=False),
            coordinator_pb2.CoordinatorStatus(address="127.0.0.1:7001", leader=True, term=42),
        ])


class Coordinators:
    """Fake coordinators at free ports; `dead` is an address nothing listens on."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.servers: list[grpc.aio.Server] = []

    async def add(self, fake: FakeCoordinator) -> FakeCoordinator:
        server = channels.server()
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
        port = channels.add_port(server, "127.0.0.1:0", None)
        await server.start()
        self.servers.append(server)
        fake.address = f"127.0.0.1:{port}"
        return fake

    async def trio(self) -> tuple[FakeCoordinator, FakeCoordinator, FakeCoordinator]:
        """A follower naming the leader, a follower naming none, and the leader (term 7)."""
        leader = await self.add(FakeCoordinator(self.log, term=7))
        hinting = await self.add(FakeCoordinator(self.log, hint=leader.address))
        silent = await self.add(FakeCoordinator(self.log))
        return hinting, silent, leader

    def after(self, follower: FakeCoordinator) -> set[str]:
        """The addresses called right after each call to `follower`."""
        return {self.log[i + 1][0] for i, (a, _) in enumerate(self.log[:-1])
                if a == follower.address}

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop(None)


@pytest.fixture
async def fakes() -> AsyncIterator[Coordinators]:
    coordinators = Coordinators()
    yield coordinators
    await coordinators.stop()


# --- the bookkeeping ----------------------------------------------------------------------


class Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, metadata: tuple[tuple[str, str], ...] = ()):
        self._code, self._metadata = code, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def not_leader(hint: str) -> Refusal:
    return Refusal(grpc.StatusCode.UNAVAILABLE, ((LEADER_METADATA_KEY, hint),))


def test_a_hint_to_a_configured_address_is_followed_at_once_and_the_leader_remembered() -> None:
    follower = LeaderFollower(["a:1", "b:2", "c:3"], backoff_min_ms=10, backoff_max_ms=80)
    assert follower.current == "a:1"
    assert follower.failed(not_leader("c:3")) == 0.0 and follower.redirected
    assert follower.current == "c:3"
    follower.answered()
    assert follower.leader == "c:3" and follower.current == "c:3"
    assert follower.describe() == "a:1, b:2, c:3 (leader)"
    # The leader fails: forgotten, and the next address is tried after the backoff.
    assert follower.failed(Refusal(grpc.StatusCode.UNAVAILABLE)) == 0.01
    assert follower.leader is None and follower.current == "a:1" and not follower.redirected


def test_hints_outside_the_list_or_malformed_or_on_other_codes_are_not_followed() -> None:
    follower = LeaderFollower(["a:1", "b:2", "c:3"], backoff_min_ms=10, backoff_max_ms=80)
    for refusal in (not_leader("evil:666"), not_leader("c:3:4"), not_leader(""),
                    not_leader("a:1"),  # names itself: it is not leading either
                    Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                            ((LEADER_METADATA_KEY, "c:3"),))):
        start = follower.current
        assert follower.failed(refusal) > 0 and not follower.redirected
        assert follower.current != start
    assert leader_hint(not_leader("[::1]:7000")) == "[::1]:7000"
    assert leader_hint(not_leader(" b:2")) == "b:2"


def test_the_backoff_doubles_to_its_bound_and_an_answer_resets_it() -> None:
    follower = LeaderFollower(["a:1", "b:2"], backoff_min_ms=10, backoff_max_ms=80)
    waits = [follower.failed(Refusal(grpc.StatusCode.UNAVAILABLE)) for _ in range(6)]
    assert waits == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
    follower.answered()
    assert follower.failed() == 0.01


def test_redirects_in_a_row_are_bounded_while_leadership_moves() -> None:
    follower = LeaderFollower(["a:1", "b:2"], backoff_min_ms=10, backoff_max_ms=80)
    # a says b leads, b says a leads, ...: at most one redirect per address in a row.
    waits = []
    for _ in range(4):
        other = "b:2" if follower.current == "a:1" else "a:1"
        waits.append(follower.failed(not_leader(other)))
    assert waits[:2] == [0.0, 0.0] and waits[2] > 0


# --- the agent's link ---------------------------------------------------------------------


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    agent = Agent(agent_config(tmp_path / "a", heartbeat_ms=50))
    await agent.start()
    yield agent
    await agent.stop()


async def test_the_agent_goes_to_the_leader_a_follower_names(
    fakes: Coordinators, agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    hinting, silent, leader = await fakes.trio()
    monkeypatch.setattr(leader_module.random, "randrange", lambda n: 0)  # starts at `hinting`
    link = CoordinatorLink(agent, [hinting.address, silent.address, leader.address])
    link.start()
    try:
        await until(lambda: leader.calls("Heartbeat") >= 3 and hinting.calls("Register") >= 1
                    and link.leader == leader.address, timeout_s=10)
        assert agent.coordinator_term.seen == 7
        # Right after the follower that named the leader, the leader: never the next address.
        assert fakes.after(hinting) == {leader.address}
        # It stays with the leader: the followers are not asked while it answers.
        heartbeats = leader.calls("Heartbeat")
        asked = len(fakes.log) - heartbeats - leader.calls("Register")
        await until(lambda: leader.calls("Heartbeat") >= heartbeats + 5)
        assert len(fakes.log) - leader.calls("Heartbeat") - leader.calls("Register") == asked
    finally:
        await link.stop()


async def test_the_agent_takes_no_lease_from_a_deposed_leader(
    fakes: Coordinators, agent: Agent,
) -> None:
    await agent.assign_role("kv0", "kv", PRIMARY, 1, "sync", None, {}, set())
    core = agent.replicas["kv0"].core
    old = await fakes.add(FakeCoordinator(fakes.log, term=3, lease_ms=60_000))
    link = CoordinatorLink(agent, [old.address])
    link.start()
    try:
        await until(lambda: core.lease_expiry_ms > 0, timeout_s=10)
        # A newer leader's control call taught the agent term 5: the old one was deposed.
        agent.coordinator_term.observe(5)
        granted = core.lease_expiry_ms
        registers = old.calls("Register")
        await until(lambda: old.calls("Register") >= registers + 2, timeout_s=10)
        assert core.lease_expiry_ms == granted
        assert link.leader is None
    finally:
        await link.stop()


# --- the client's routes watch -------------------------------------------------------------


async def test_the_client_watches_the_routes_of_the_leader_a_follower_names(
    fakes: Coordinators, monkeypatch: pytest.MonkeyPatch,
) -> None:
    hinting, silent, leader = await fakes.trio()
    monkeypatch.setattr(leader_module.random, "randrange", lambda n: 0)  # starts at `hinting`
    async with Client(coordinator=[hinting.address, silent.address, leader.address],
                      deadline_ms=5_000) as client:
        route = await client._target("kv", time.monotonic() + 5)
        assert route == (PRIMARY_ADDRESS, 3)
        assert client.coordinator_leader == leader.address
    assert [a for a, _ in fakes.log] == [hinting.address, leader.address]


# --- failoverctl ---------------------------------------------------------------------------


async def test_failoverctl_sends_changes_to_the_leader_a_follower_names(
    fakes: Coordinators,
) -> None:
    hinting, silent, leader = await fakes.trio()
    caller = CoordinatorCaller([hinting.address, silent.address, leader.address])
    reply = await caller._call("Switchover", coordinator_pb2.SwitchoverRequest(service="kv"),
                               timeout_ms=5_000, idempotent=False)
    assert reply.primary_host_id == "h2"
    assert [(a, m) for a, m in fakes.log] == [(hinting.address, "Switchover"),
                                              (leader.address, "Switchover")]
    fakes.log.clear()
    steps: list[str] = []
    await caller._stream("Patch", coordinator_pb2.PatchRequest(all=True),
                         lambda p: steps.append(p.step), timeout_ms=5_000)
    assert steps == ["done"]
    assert [a for a, _ in fakes.log] == [hinting.address, leader.address]
    # Followers that name no leader: each address once, then one line naming why.
    fakes.log.clear()
    caller = CoordinatorCaller([silent.address, silent.address])
    with pytest.raises(Exception, match="not the leader; no leader known"):
        await caller._call("Switchover", coordinator_pb2.SwitchoverRequest(service="kv"),
                           timeout_ms=5_000, idempotent=False)
    assert len(fakes.log) == 2


async def test_failoverctl_status_shows_the_coordinators(
    fakes: Coordinators, capsys: pytest.CaptureFixture[str],
) -> None:
    follower = await fakes.add(FakeCoordinator(fakes.log))

    def run(*argv: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main(["--coordinator", follower.address, *argv])
        out, err = capsys.readouterr()
        assert (exited.value.code, err) == (0, ""), err
        return out

    # A follower answers status itself (reads go to any coordinator).
    document = json.loads(await asyncio.to_thread(run, "--format", "json", "status"))
    assert document["coordinators"] == [
        {"address": "127.0.0.1:7000", "leader": False, "term": 0},
        {"address": "127.0.0.1:7001", "leader": True, "term": 42},
    ]
    table = await asyncio.to_thread(run, "status")
    assert "Coordinators" in table
    lines = [line for line in table.splitlines() if "127.0.0.1:700" in line]
    assert len(lines) == 2
    assert "no" in lines[0] and "yes" in lines[1] and "42" in lines[1]
    assert fakes.log == [(follower.address, "GetClusterStatus")] * 2


def status_naming(leader: str, heartbeat_age_ms: int) -> coordinator_pb2.ClusterStatus:
    return coordinator_pb2.ClusterStatus(
        hosts=[coordinator_pb2.HostStatus(host_id="h1", alive=True,
                                          heartbeat_age_ms=heartbeat_age_ms)],
        coordinators=[coordinator_pb2.CoordinatorStatus(address=leader, leader=True, term=9)])


async def test_failoverctl_status_comes_from_the_leader_when_it_is_one_of_the_addresses(
    fakes: Coordinators, capsys: pytest.CaptureFixture[str], dead: str,
) -> None:
    follower = await fakes.add(FakeCoordinator(fakes.log))
    leader = await fakes.add(FakeCoordinator(fakes.log, term=9))
    # A follower reads the store: no live heartbeat ages. The leader has them.
    follower.status = status_naming(leader.address, 0)
    leader.status = status_naming(leader.address, 42)

    def status(addresses: str) -> dict[str, Any]:
        with pytest.raises(SystemExit) as exited:
            main(["--coordinator", addresses, "--format", "json", "status"])
        out, err = capsys.readouterr()
        assert (exited.value.code, err) == (0, ""), err
        return json.loads(out)

    document = await asyncio.to_thread(status, f"{follower.address},{leader.address}")
    assert document["hosts"][0]["heartbeat_age_ms"] == 42
    assert [a for a, _ in fakes.log] == [follower.address, leader.address]
    # The leader it names does not answer: the follower's status stands.
    follower.status = status_naming(dead, 0)
    fakes.log.clear()
    document = await asyncio.to_thread(status, f"{follower.address},{dead}")
    assert document["hosts"][0]["heartbeat_age_ms"] == 0
    assert document["coordinators"] == [{"address": dead, "leader": True, "term": 9}]


@pytest.fixture
def dead() -> str:
    """A 127.0.0.1 address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_every_caller_is_bounded_when_no_coordinator_answers(
    fakes: Coordinators,
) -> None:
    silent = await fakes.add(FakeCoordinator(fakes.log))
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            Client(coordinator=silent.address, deadline_ms=300))
        started = asyncio.get_running_loop().time()
        with pytest.raises(Exception, match="no route from the coordinators"):
            await client._target("kv", time.monotonic() + 0.3)
        assert asyncio.get_running_loop().time() - started < 2
    # The watcher backed off: a handful of tries in 300 ms, not a spin.
    assert 1 <= silent.calls("WatchRoutes") <= 12


class SlowBeats(FakeCoordinator):
    """A leader whose heartbeats `slow` answer only after the agent's timeout."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        super().__init__(log, term=2)
        self.slow = 0

    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.slow:
            self.slow -= 1
            await asyncio.sleep(1.0)  # past the agent's 2 x heartbeat_ms timeout
        return await super().Heartbeat(request, context)


async def test_a_slow_heartbeat_does_not_make_the_agent_register_again(
    fakes: Coordinators, agent: Agent,
) -> None:
    # Each registration makes the coordinator re-send every assignment of the host: a storm's
    # slow beats turned into tens of thousands of queued control calls (issue 14 item 7).
    leader = await fakes.add(SlowBeats(fakes.log))
    link = CoordinatorLink(agent, [leader.address])
    link.start()
    try:
        await until(lambda: leader.calls("Heartbeat") >= 2, timeout_s=10)
        leader.slow = 3
        await until(lambda: leader.slow == 0 and leader.calls("Heartbeat") >= 8, timeout_s=20)
        assert leader.calls("Register") == 1
    finally:
        await link.stop()


class TimedSlowBeats(SlowBeats):
    """SlowBeats that notes when each heartbeat arrived."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        super().__init__(log)
        self.arrived: list[float] = []

    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.arrived.append(asyncio.get_running_loop().time())
        return await super().Heartbeat(request, context)


async def test_a_beat_that_ran_out_its_deadline_is_followed_by_the_next_at_once(
    fakes: Coordinators, agent: Agent,
) -> None:
    # A saturated machine answered every beat late. Backing off on top of each timeout (up to
    # 4 periods) left gaps of a whole failure timeout between beats, and the coordinator
    # failed over the primaries of a host that served (storm benchmark). Each beat here
    # times out (the agent's deadline is 2 x heartbeat_ms = 100 ms): the next must follow
    # at once, every ~100 ms, where the backoff made it every 200 ms after the third.
    leader = await fakes.add(TimedSlowBeats(fakes.log))
    arrived = leader.arrived
    link = CoordinatorLink(agent, [leader.address])
    link.start()
    try:
        await until(lambda: leader.calls("Heartbeat") >= 2, timeout_s=10)
        leader.slow = 8
        first = len(arrived)
        await until(lambda: len(arrived) >= first + 8, timeout_s=10)
        beats = arrived[first:first + 8]
        gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
        # 7 gaps of one deadline each (~0.7 s); with the backoff, 1.2 s or more.
        assert sum(gaps) < 0.95, [round(g, 3) for g in gaps]
    finally:
        await link.stop()
