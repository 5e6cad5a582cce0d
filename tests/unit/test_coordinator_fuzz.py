"""Random and mutated messages at every handler of a live coordinator with mutual TLS, holding
a certificate of each role in turn (issue 13, Tests): no crash (no UNKNOWN or INTERNAL), no
hang past the call's deadline for a unary call, and no change of hosts or services by a call
its role may not make. The coordinator runs on a loop of its own thread, behind its real
servicer, `RoleCheck` and a TLS port; the calls are blocking stubs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failover.cli.main import cli
from failover.coordinator.server import Coordinator
from failover.core.coordinator import HostInfo, Timing
from failover.net import channels, coordinator_servicer
from failover.net.authorization import RoleCheck
from failover.net.tls import TlsFiles, channel_credentials
from failover.storage.sqlite_store import SqliteStore
from failover.v1 import agent_pb2, common_pb2, coordinator_pb2, coordinator_pb2_grpc

ROLES = {"agent": "h1", "coordinator": "coord", "client": "app", "operator": "alice",
         "admin": "root-1"}
# What a role may change: an agent its own host (register, heartbeat); an operator the
# draining flag and, by a switchover or migration, roles and epochs; an admin anything.
MAY_CHANGE_HOSTS = {"agent", "operator", "admin"}
MAY_CHANGE_SERVICES = {"operator", "admin", "agent"}  # an agent's reports move in-sync sets
CRASH = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}

names = st.one_of(
    st.sampled_from(["h1", "h2", "kv", "s1", "", "../x", "../../../../tmp/x", "a/b", "a\x00b",
                     "..", "x" * 300, "h1\n", "bank", "kv\u00e9"]),
    st.text(max_size=40))
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
doubles = st.floats(allow_nan=True, allow_infinity=True)
addresses = st.one_of(st.sampled_from(["127.0.0.1:1", "nowhere", "[::1", "h:99999", "",
                                       "127.0.0.1:65535"]), st.text(max_size=30))
metrics = st.builds(agent_pb2.HostMetrics, cpu_percent=doubles, memory_percent=doubles,
                    disk_free_bytes=u64, memory_total_bytes=u64, cpu_count=u32,
                    disk_total_bytes=u64)
replica_status = st.builds(
    agent_pb2.ReplicaStatus, service=names, role=st.integers(0, 5), epoch=u64,
    indexes=st.builds(common_pb2.ReplicaIndexes, durable_index=u64, commit_index=u64,
                      applied_index=u64),
    matched_index=u64, in_sync=st.lists(names, max_size=3))

REQUESTS: dict[str, st.SearchStrategy[Any]] = {
    "Register": st.builds(coordinator_pb2.RegisterRequest, host_id=names, address=addresses,
                          zone=names, version=names, started_at=doubles, metrics=metrics),
    "Heartbeat": st.builds(coordinator_pb2.HeartbeatRequest, host_id=names, metrics=metrics,
                           replicas=st.lists(replica_status, max_size=4)),
    "GetClusterStatus": st.just(coordinator_pb2.ClusterStatusRequest()),
    "CreateService": st.builds(coordinator_pb2.CreateServiceRequest, name=names,
                               kind=st.sampled_from(["kv", "bank", "nope", ""]),
                               replicas=st.integers(0, 40), mode=st.integers(0, 3),
                               placement=st.sampled_from(["", "worst-fit", "bad"])),
    "DeleteService": st.builds(coordinator_pb2.DeleteServiceRequest, name=names),
    "Switchover": st.builds(coordinator_pb2.SwitchoverRequest, service=names,
                            to_host_id=names),
    "GetHistory": st.builds(coordinator_pb2.HistoryRequest, service=names, limit=u32),
    "DrainHost": st.builds(coordinator_pb2.DrainHostRequest, host_id=names,
                           draining=st.booleans()),
    "Migrate": st.builds(coordinator_pb2.MigrateRequest, service=names, to_host_id=names,
                         replica=st.sampled_from(["", "primary", "duplica", "x"]),
                         max_downtime_ms=u32, method=names, from_host_id=names,
                         max_bandwidth_bytes_s=u64),
    "Patch": st.builds(coordinator_pb2.PatchRequest, host_ids=st.lists(names, max_size=3),
                       all=st.just(False), command=names, failback=st.booleans(),
                       method=names, command_timeout_ms=u32),
    "WatchRoutes": st.just(coordinator_pb2.WatchRoutesRequest()),
}
STREAMS = {"Migrate", "Patch", "WatchRoutes"}
SEED_METRICS = {"cpu_count": 8.0, "memory_total_bytes": float(16 << 30),
                "disk_free_bytes": float(100 << 30), "disk_total_bytes": float(200 << 30),
                "cpu_percent": 5.0, "memory_percent": 5.0}


def _mutated(message: Any, flips: list[tuple[int, int]]) -> Any:
    """`message` with some bytes of its encoding changed, if that still parses."""
    data = bytearray(message.SerializeToString())
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    try:
        return type(message).FromString(bytes(data))
    except Exception:
        return message


class Served:
    """A TLS coordinator on a loop of its own thread."""

    def __init__(self, root: Path, pki: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        tls = files(pki, "coord").load()
        self.coordinator, self.port, self.server = self.run(self._start(root, tls))

    async def _start(self, root: Path, tls: Any) -> Any:
        coordinator = Coordinator(SqliteStore(root / "cluster.db"), Timing(), tls=tls)
        await coordinator.start()
        # Something to change: three hosts (no agent answers at their addresses) and kv.
        for host in ("h1", "h2", "h3"):
            await coordinator.register(HostInfo(host, f"127.0.0.1:{7100 + int(host[1])}"),
                                       SEED_METRICS)
        await coordinator.create_service("kv", "kv", 3, "sync")
        server = channels.server(interceptors=[RoleCheck()])
        coordinator_servicer.add_to_server(server, coordinator)
        port = channels.add_port(server, "127.0.0.1:0", tls)
        await server.start()
        return coordinator, port, server

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def state(self) -> tuple[Any, Any]:
        async def read() -> tuple[Any, Any]:
            async with self.coordinator._lock:
                core = self.coordinator.core
                hosts = {h: (i.address, i.draining) for h, i in core.hosts.items()}
                services = {n: (s.epoch, s.primary, dict(s.replicas))
                            for n, s in core.services.items()}
                return hosts, services

        return self.run(read())

    def close(self) -> None:
        async def stop() -> None:
            await self.server.stop(0)
            await self.coordinator.stop()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def files(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(pki / "ca.crt", pki / f"{name}.crt", pki / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "certs"

    def certs(*args: str) -> None:
        result = CliRunner().invoke(cli, ["certs", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    certs("init", str(directory))
    for role, name in ROLES.items():
        certs("issue", str(directory), "--role", role, "--name", name, "--san", "127.0.0.1")
    return directory


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Served]:
    running = Served(tmp_path_factory.mktemp("coordinator"), pki)
    yield running
    running.close()


@pytest.fixture(scope="module")
def stubs(served: Served, pki: Path) -> Iterator[dict[str, coordinator_pb2_grpc.CoordinatorStub]]:
    opened = {role: grpc.secure_channel(f"127.0.0.1:{served.port}",
                                        channel_credentials(files(pki, name).load()))
              for role, name in ROLES.items()}
    yield {role: coordinator_pb2_grpc.CoordinatorStub(c) for role, c in opened.items()}
    for channel in opened.values():
        channel.close()


def _call(stub: coordinator_pb2_grpc.CoordinatorStub, method: str,
          request: Any) -> grpc.StatusCode:
    call: Callable[..., Any] = getattr(stub, method)
    try:
        if method in STREAMS:
            stream = call(request, timeout=2)
            for _ in stream:
                if method == "WatchRoutes":
                    stream.cancel()
                    break
        else:
            call(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(role=st.sampled_from(sorted(ROLES)), method=st.sampled_from(sorted(REQUESTS)),
       data=st.data(), flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)),
                                      max_size=3))
def test_random_messages_crash_nothing_and_change_only_what_the_role_may(
    served: Served, stubs: dict[str, coordinator_pb2_grpc.CoordinatorStub], role: str,
    method: str, data: st.DataObject, flips: list[tuple[int, int]],
) -> None:
    request = _mutated(data.draw(REQUESTS[method]), flips)
    before = served.state()
    code = _call(stubs[role], method, request)
    assert code not in CRASH, (role, method, request, code)
    if method not in STREAMS:
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, (role, method, request)
    hosts, services = served.state()
    if code == grpc.StatusCode.PERMISSION_DENIED or role not in MAY_CHANGE_HOSTS:
        assert hosts == before[0], (role, method, request, code)
    if code == grpc.StatusCode.PERMISSION_DENIED or role not in MAY_CHANGE_SERVICES:
        assert services == before[1], (role, method, request, code)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        assert role not in ("admin",) or method in ("Register", "Heartbeat"), (method, code)
