"""The coordinator against forged reports and hostile names (issue 13, the coordinator's side):
each attack of the issue's list is refused (InvalidRequest, INVALID_ARGUMENT on the wire) or
ignored, and leaves hosts, addresses, roles, epochs and the in-sync sets as they were. The
core is driven by hand (`Driver`), the daemon's queues and streams by the real `Coordinator`
on a real gRPC port. What needs a certificate (PERMISSION_DENIED by role or host id) is in
tests/integration/test_coordinator_tls.py, against a real `failover-coordinator` process."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from failover import defaults
from failover.coordinator.server import Coordinator
from failover.core.coordinator import (
    DUPLICA,
    DropReplica,
    HostInfo,
    Persist,
    ReplicaReport,
    Timing,
)
from failover.core.names import check_command_name, check_host_id, check_service_name
from failover.errors import InvalidRequest
from failover.net import channels, coordinator_servicer
from failover.storage.sqlite_store import SqliteStore
from failover.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from tests.unit.inprocess import until

from .test_coordinator_rebuild import FAIL, HB, METRICS, Driver

BAD_NAMES = ["", "../x", "../../../../tmp/x", "a/b", "a\x00b", "..", ".hidden", "a..b",
             "x" * 200, "h1\n", "-h"]


def ready() -> Driver:
    """Service s on h1 (primary), h2 and h3, all in sync and promotable, at index 10."""
    d = Driver(["h1", "h2", "h3"])
    d.create(replicas=3)
    d.write("s", 10)
    d.step(3 * HB)
    s = d.core.services["s"]
    assert s.primary == "h1" and s.in_sync == ["h2", "h3"] and s.promotable == ["h2", "h3"]
    return d


def snapshot(d: Driver) -> Any:
    s = d.core.services["s"]
    return ({h: i.address for h, i in d.core.hosts.items()}, s.primary, s.epoch,
            dict(s.replicas), list(s.in_sync), d.core.routes_version)


# --- the one name rule ---------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_the_name_rule_refuses_what_could_reach_a_path(name: str) -> None:
    for check in (check_service_name, check_host_id, check_command_name):
        with pytest.raises(InvalidRequest):
            check(name)


def test_the_name_rule_takes_ordinary_names() -> None:
    for name in ("h1", "host-2.zone_a", "kv", "A9"):
        check_service_name(name)
        check_host_id(name)
        check_command_name(name)


@pytest.mark.parametrize("name", ["../x", "a/b", "a\x00b", ".."])
def test_every_entry_point_of_the_core_checks_names(name: str) -> None:
    d = ready()
    before = snapshot(d)
    core = d.core
    attempts = [
        lambda: core.register(HostInfo(name, "127.0.0.1:9"), d.now, METRICS),
        lambda: core.heartbeat(name, METRICS, [], d.now),
        lambda: core.heartbeat("h2", METRICS, [ReplicaReport(name, DUPLICA, 1, 0, 0, 0)],
                               d.now),
        lambda: core.create_service(name, "kv", 2, "sync", d.now),
        lambda: core.delete_service(name),
        lambda: core.set_draining(name, True),
        lambda: core.start_switchover("op1", name, "", d.now),
        lambda: core.start_switchover("op2", "s", name, d.now),
        lambda: core.start_migration("op3", name, "h2", d.now),
        lambda: core.start_migration("op4", "s", name, d.now),
        lambda: core.start_migration("op5", "s", "h2", d.now, DUPLICA, from_host=name),
        lambda: core.start_patch("op6", [name], d.now),
        lambda: core.start_patch("op7", ["h2"], d.now, command=name),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidRequest, match="letters, digits"):
            attempt()
    assert snapshot(d) == before
    assert not core.operations and not core.switchovers and not core.patching


def test_a_patch_command_is_a_name_never_a_command_line() -> None:
    d = ready()
    for command in ("head /etc/shadow", "echo patched", "rm -rf /; true", "$(id)"):
        with pytest.raises(InvalidRequest, match="patch command name"):
            d.core.start_patch("op", ["h2"], d.now, command=command)
        assert not d.core.patching
    d.core.start_patch("op", ["h2"], d.now, command="upgrade-packages")
    assert d.core.patching == {"h2"}


# --- a forged registration -----------------------------------------------------------------


def test_a_forged_register_cannot_move_a_live_host() -> None:
    d = ready()
    before = snapshot(d)
    with pytest.raises(InvalidRequest, match="alive at h3:1"):
        d.core.register(HostInfo("h3", "10.6.6.6:7100"), d.now, METRICS)
    assert snapshot(d) == before
    d.step(3 * HB)
    assert snapshot(d) == before
    # The same host moving after it stopped for a failure timeout is taken.
    d.up.discard("h3")
    d.step(FAIL + HB)
    d.run(d.core.register(HostInfo("h3", "10.0.0.3:7100"), d.now, METRICS))
    assert d.core.hosts["h3"].address == "10.0.0.3:7100"


@pytest.mark.parametrize("metric, value", [
    ("disk_free_bytes", float(2**60)),
    ("disk_total_bytes", float(2**60)),
    ("memory_total_bytes", float(2**60)),
    ("cpu_count", 1e9),
    ("cpu_percent", -5.0),
    ("memory_percent", 250.0),
    ("disk_free_bytes", math.inf),
    ("cpu_count", math.nan),
])
def test_absurd_metrics_are_refused(metric: str, value: float) -> None:
    d = ready()
    rogue = {**METRICS, metric: value}
    with pytest.raises(InvalidRequest, match="not a real host"):
        d.core.register(HostInfo("h9", "127.0.0.1:9"), d.now, rogue)
    assert "h9" not in d.core.hosts and "h9" not in d.core.live
    with pytest.raises(InvalidRequest, match="not a real host"):
        d.core.heartbeat("h2", rogue, [], d.now)
    assert d.core.live["h2"].metrics == METRICS


def test_a_rogue_host_claiming_2_to_the_60_free_bytes_does_not_win_placement() -> None:
    d = Driver(["h1", "h2", "h3"])
    rogue = {**METRICS, "disk_free_bytes": float(2**60), "disk_total_bytes": float(2**60)}
    with pytest.raises(InvalidRequest):
        d.core.register(HostInfo("h9", "127.0.0.1:9"), d.now, rogue)
    with pytest.raises(InvalidRequest):  # nor claims more free disk than it has
        d.core.register(HostInfo("h9", "127.0.0.1:9"), d.now,
                        {**METRICS, "disk_free_bytes": METRICS["disk_total_bytes"] + 1})
    d.create(replicas=1)
    assert d.core.services["s"].primary in {"h1", "h2", "h3"}


# --- forged heartbeats ---------------------------------------------------------------------


def forged(d: Driver, host: str, matched_index: int) -> list[ReplicaReport]:
    s = d.core.services["s"]
    return [ReplicaReport("s", DUPLICA, s.epoch, matched_index, 0, 0,
                          matched_index=matched_index)]


def test_a_forged_matched_index_puts_no_frozen_duplica_back_in_sync() -> None:
    d = ready()
    # h3 freezes: it heartbeats but takes no entries, and leaves the in-sync set.
    d.up.discard("h3")
    d.step(FAIL + HB)
    assert d.core.services["s"].in_sync == ["h2"]
    d.write("s", 50)
    d.step(2 * HB)
    epoch = d.core.services["s"].epoch
    for _ in range(10):
        _, actions = d.core.heartbeat("h3", METRICS, forged(d, "h3", 10**9), d.now)
        d.run(actions)
        d.step(HB)
    s = d.core.services["s"]
    assert s.in_sync == ["h2"] and s.promotable == ["h2"] and s.epoch == epoch
    notices = d.core.take_notices()
    assert any("matched index 1000000000" in n and "ignored" in n for n in notices), notices
    # An honest report, no further than the primary logged, is taken at once.
    d.catch_up("s", "h3")
    d.up.add("h3")
    d.step(3 * HB)
    assert d.core.services["s"].in_sync == ["h2", "h3"]


def test_a_heartbeat_of_30000_unknown_services_is_refused() -> None:
    d = ready()
    before = snapshot(d)
    reports = [ReplicaReport(f"ghost{i}", DUPLICA, 1, 0, 0, 0) for i in range(30_000)]
    with pytest.raises(InvalidRequest, match="heartbeat_replicas_max"):
        d.core.heartbeat("h2", METRICS, reports, d.now)
    assert snapshot(d) == before
    assert not any(isinstance(a, DropReplica) for a in d.actions)


def test_unknown_services_in_one_heartbeat_cause_a_bounded_number_of_drops() -> None:
    d = ready()
    count = defaults.HEARTBEAT_REPLICAS_MAX - 1
    reports = [ReplicaReport(f"ghost{i}", DUPLICA, 1, 0, 0, 0) for i in range(count)]
    _, actions = d.core.heartbeat("h2", METRICS, reports, d.now)
    drops = [a for a in actions if isinstance(a, DropReplica)]
    assert len(drops) == defaults.HEARTBEAT_DROPS_MAX
    assert any("later heartbeats" in n for n in d.core.take_notices())
    # The next heartbeat drops the next ones, never the same again within a failure timeout.
    _, again = d.core.heartbeat("h2", METRICS, reports, d.now + 1)
    later = [a for a in again if isinstance(a, DropReplica)]
    assert len(later) == defaults.HEARTBEAT_DROPS_MAX
    assert not {a.service for a in later} & {a.service for a in drops}


def test_the_core_records_an_audit_row() -> None:
    d = ready()
    [persist] = d.core.audit("operator 'alice'", "switchover", "s to h2", "ok", "s")
    assert isinstance(persist, Persist) and not persist.puts
    [(service, kind, message, details)] = persist.history
    assert (service, kind) == ("s", "audit")
    assert details == {"caller": "operator 'alice'", "rpc": "switchover", "target": "s to h2",
                       "outcome": "ok"}
    assert "alice" in message


# --- the daemon: queues and streams --------------------------------------------------------


class SlowAgent(agent_pb2_grpc.AgentControlServicer):
    """Answers every control call only when the test lets it."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.calls = 0

    async def DropReplica(self, request: Any, context: Any) -> Any:
        self.calls += 1
        await self.go.wait()
        return agent_pb2.DropReplicaReply()

    async def AssignRole(self, request: Any, context: Any) -> Any:
        self.calls += 1
        await self.go.wait()
        return agent_pb2.AssignRoleReply()


@pytest.fixture
async def slow_agent() -> AsyncIterator[tuple[SlowAgent, str]]:
    agent = SlowAgent()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentControlServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield agent, f"127.0.0.1:{port}"
    agent.go.set()
    await server.stop(0)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Coordinator, str]]:
    """A coordinator (no TLS) behind its real servicer on a loopback port."""
    coordinator = Coordinator(SqliteStore(tmp_path / "cluster.db"), Timing())
    await coordinator.store.open()
    server = channels.server()
    coordinator_servicer.add_to_server(server, coordinator)
    port = channels.add_port(server, "127.0.0.1:0")
    await server.start()
    yield coordinator, f"127.0.0.1:{port}"
    await server.stop(0)
    await coordinator.stop()


async def test_a_full_call_queue_drops_calls_and_never_fails_the_heartbeat(
    served: tuple[Coordinator, str], slow_agent: tuple[SlowAgent, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    coordinator, _address = served
    agent, agent_address = slow_agent
    monkeypatch.setattr(defaults, "COORDINATOR_HOST_QUEUE_MAX", 4)
    await coordinator.register(HostInfo("h1", agent_address), METRICS)
    reports = [ReplicaReport(f"ghost{i}", DUPLICA, 1, 0, 0, 0) for i in range(200)]
    for _ in range(3):
        leases = await coordinator.heartbeat("h1", METRICS, reports)
        assert leases == []
    caller = next(iter(coordinator._callers.values()))
    assert caller.qsize() <= 4
    assert coordinator._dropped_calls > 0
    # The coordinator still serves: a service is created and assigned as ever.
    await coordinator.register(HostInfo("h2", agent_address), METRICS)
    await coordinator.create_service("kv1", "kv", 2, "sync")
    assert coordinator.core.services["kv1"].replicas.keys() == {"h1", "h2"}
    agent.go.set()
    await until(lambda: agent.calls >= 4)


async def test_route_watchers_past_the_limit_get_resource_exhausted(
    served: tuple[Coordinator, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    _coordinator, address = served
    monkeypatch.setattr(defaults, "ROUTE_WATCHERS_MAX", 2)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        streams = [stub.WatchRoutes(coordinator_pb2.WatchRoutesRequest()) for _ in range(2)]
        for stream in streams:
            await asyncio.wait_for(stream.read(), 5)  # the first table: it is watching
        third = stub.WatchRoutes(coordinator_pb2.WatchRoutesRequest())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(third.read(), 5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "route_watchers_max" in (refused.value.details() or "")
        streams[0].cancel()
        await until(lambda: len(_coordinator._watchers) < 2)
        fourth = stub.WatchRoutes(coordinator_pb2.WatchRoutesRequest())
        await asyncio.wait_for(fourth.read(), 5)
        fourth.cancel()
        streams[1].cancel()


async def test_register_refuses_an_address_that_does_not_parse_and_bad_host_ids(
    served: tuple[Coordinator, str],
) -> None:
    coordinator, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for host_id, where in [("h1", "nowhere"), ("h1", "127.0.0.1:99999"),
                               ("h1", "[::1"), ("../x", "127.0.0.1:7100"),
                               ("a/b", "127.0.0.1:7100"), ("a\x00b", "127.0.0.1:7100")]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Register(coordinator_pb2.RegisterRequest(
                    host_id=host_id, address=where), timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, host_id
            assert refused.value.details()
    assert coordinator.core.hosts == {}


async def test_operator_calls_without_tls_are_audited_as_anonymous(
    served: tuple[Coordinator, str],
) -> None:
    coordinator, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Switchover(coordinator_pb2.SwitchoverRequest(service="nope"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.DrainHost(coordinator_pb2.DrainHostRequest(host_id="h7", draining=True),
                                 timeout=5)
    rows = [r for r in await coordinator.history("", 100) if r.kind == "audit"]
    assert [(r.details["rpc"], r.details["caller"]) for r in rows] == [
        ("switchover", "anonymous (no TLS)"), ("drain", "anonymous (no TLS)")]
    assert all(r.details["outcome"].startswith("refused: ") for r in rows)
    assert rows[0].service == "nope" and rows[1].details["target"] == "h7"


def test_an_honest_matched_index_racing_ahead_of_its_primarys_report_counts() -> None:
    """Under a steady load a duplica that caught up reports more than its primary's last
    heartbeat said it had logged (the primary logged more since): that is taken, or a
    rebuilt copy would never join while writes go on. Only an index beyond what the primary
    can have logged meanwhile is ignored."""
    d = ready()
    d.up.discard("h3")
    d.step(FAIL + HB)
    assert d.core.services["s"].in_sync == ["h2"]
    for _ in range(20):
        d.now += HB
        d.write("s", 100)
        d.beat("h1")
        d.beat("h2")
        d.write("s", 100)  # logged after h1 reported; h3 takes it before h1 reports again
        d.catch_up("s", "h3")
        _, actions = d.core.heartbeat("h3", METRICS, forged(d, "h3", d.index[("h3", "s")]),
                                      d.now + HB // 2)
        d.run(actions)
        d.run(d.core.tick(d.now + HB // 2))
        if "h3" in d.core.services["s"].in_sync:
            break
    assert d.core.services["s"].in_sync == ["h2", "h3"]
    assert not d.core.take_notices()


class RestartingAgent(agent_pb2_grpc.AgentControlServicer):
    """Answers Restart with what its allowlisted command printed, or refuses it."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.refuse = ""

    async def AssignRole(self, request: Any, context: Any) -> Any:
        return agent_pb2.AssignRoleReply()

    async def Restart(self, request: Any, context: Any) -> Any:
        self.commands.append(request.command)
        if self.refuse:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.refuse)
        return agent_pb2.RestartReply(exit_code=0, output="SECRET " + "x" * 10_000,
                                      version="1")


@pytest.fixture
async def patched(tmp_path: Path) -> AsyncIterator[tuple[RestartingAgent, Coordinator]]:
    """A coordinator (its tick loop not started) with one host, h1, served by a
    `RestartingAgent`."""
    agent = RestartingAgent()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentControlServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    coordinator = Coordinator(SqliteStore(tmp_path / "cluster.db"), Timing())
    await coordinator.store.open()
    await coordinator.register(HostInfo("h1", f"127.0.0.1:{port}"), METRICS)
    yield agent, coordinator
    await coordinator.stop()
    await server.stop(0)


@pytest.mark.parametrize("admin", [True, False])
async def test_a_patch_command_output_goes_to_an_admin_only_bounded_never_to_history(
    patched: tuple[RestartingAgent, Coordinator], admin: bool,
) -> None:
    agent, coordinator = patched
    steps: list[Any] = []
    patch = coordinator.patch(["h1"], False, "upgrade", False, "switchover", 0,
                              show_output=admin)
    async for step in patch:
        steps.append(step)
        if step.step == "restart":
            break

    async def reexecutes() -> bool:
        return any("re-executes" in r.message for r in await coordinator.history("", 100))

    # The output (if any) is queued before the plan hears the answer and records it.
    deadline = asyncio.get_running_loop().time() + 5
    while not await reexecutes():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    with contextlib.suppress(TimeoutError):
        while True:
            steps.append(await asyncio.wait_for(anext(patch), 0.2))
    await patch.aclose()
    assert agent.commands == ["upgrade"]
    outputs = [s.message for s in steps if s.step == "output"]
    if admin:
        assert len(outputs) == 1 and len(outputs[0]) == defaults.PATCH_OUTPUT_CHARS_MAX
    else:
        assert outputs == []
    rows = await coordinator.history("", 100)
    assert not any("SECRET" in r.message or "xxxx" in str(r.details) for r in rows)


async def test_an_agent_refusal_of_a_patch_reaches_history_bounded(
    patched: tuple[RestartingAgent, Coordinator],
) -> None:
    agent, coordinator = patched
    agent.refuse = "the patch command exited with 3; its output: " + "SECRET " * 500
    steps = [s async for s in coordinator.patch(["h1"], False, "upgrade", False,
                                                "switchover", 0, show_output=True)]
    assert steps[-1].step == "failed" and "exited with 3" in steps[-1].message
    [output] = [s.message for s in steps if s.step == "output"]
    assert output.count("SECRET") == 500  # the admin sees what the agent said
    [failed] = [r for r in await coordinator.history("", 100) if r.kind == "patch_failed"]
    assert len(failed.message) < defaults.PATCH_REFUSAL_CHARS_MAX + 100


def test_registrations_past_the_host_bound_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from failover.errors import Overloaded

    d = ready()
    monkeypatch.setattr(defaults, "COORDINATOR_HOSTS_MAX", 4)
    d.run(d.core.register(HostInfo("h4", "h4:1"), d.now, METRICS))
    with pytest.raises(Overloaded, match="coordinator_hosts_max"):
        d.core.register(HostInfo("h5", "h5:1"), d.now, METRICS)
    assert sorted(d.core.hosts) == ["h1", "h2", "h3", "h4"]
    d.run(d.core.register(HostInfo("h4", "h4:1"), d.now, METRICS))  # a known one: taken
