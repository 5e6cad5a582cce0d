"""The agent's side of trust (issue 13): each attack on an agent from the issue, tried over a
real gRPC server on 127.0.0.1 with mutual TLS (certificates made by `failover.net.certs` in a
tmp dir), now gets PERMISSION_DENIED, INVALID_ARGUMENT or a refused ack, and leaves data,
roles and epochs as they were."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import msgpack
import pytest

from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.host import Agent
from failover.agent.replica import Replica
from failover.client import Client
from failover.core.roles import DUPLICA, PRIMARY
from failover.errors import ConfigError, PermissionDenied
from failover.net import certs, channels
from failover.net.agent_servicers import add_to_server
from failover.net.authorization import RoleCheck
from failover.net.tls import TlsFiles
from failover.observe.agent_metrics import AgentMetrics, count_refused
from failover.storage.records import Entry, encode_records
from failover.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    data_pb2,
    data_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
)
from tests.unit.inprocess import UNREACHABLE, agent_config, until

HUGE = (1 << 63) - 1
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
HELLO_ARGV = [sys.executable, "-c", "print('x' * 100000)"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA; agents a (the one under test), p (kv1's primary) and x (another host); a
    coordinator and an admin."""
    directory = tmp_path_factory.mktemp("pki") / "certs"
    certs.init_ca(directory)
    for role, name in (("agent", "a"), ("agent", "p"), ("agent", "x"),
                       ("coordinator", "coord"), ("admin", "root")):
        certs.issue_to_dir(directory, role, name, sans=["127.0.0.1"])
    return directory


def files(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(pki / "ca.crt", pki / f"{name}.crt", pki / f"{name}.key")


@dataclass
class Served:
    agent: Agent
    address: str
    pki: Path

    def channel(self, name: str) -> grpc.aio.Channel:
        """A channel to the agent as identity `name`, checking the agent's certificate."""
        return channels.secure_channel(self.address, files(self.pki, name).load(),
                                       server_name="a")


@pytest.fixture
async def served(tmp_path: Path, pki: Path) -> AsyncIterator[Served]:
    """Agent "a" behind a TLS server with the role check, holding kv0 (the primary, alone,
    with an out-of-sync duplica b) and kv1 (a duplica of p), both at epoch 1."""
    tls = files(pki, "a")
    config = agent_config(tmp_path / "data", tls_ca=str(tls.ca), tls_cert=str(tls.cert),
                          tls_key=str(tls.key), patch={"commands": {"hello": HELLO_ARGV}})
    material = config.load_tls()
    agent = Agent(config, material)
    await agent.start()
    agent.metrics = AgentMetrics(agent)  # as with --metrics-listen: refusals are counted
    server = channels.server(interceptors=[RoleCheck(refused=count_refused(agent))])
    add_to_server(server, agent)
    port = channels.add_port(server, "127.0.0.1:0", material)
    await server.start()
    await agent.assign_role("kv0", "kv", PRIMARY, 1, "sync", None, {"b": UNREACHABLE}, set())
    await agent.assign_role("kv1", "kv", DUPLICA, 1, "sync", ("p", UNREACHABLE), {}, set())
    try:
        yield Served(agent, f"127.0.0.1:{port}", pki)
    finally:
        await server.stop(None)
        await agent.stop()


def put(key: str) -> bytes:
    return msgpack.packb({"op": "put", "key": key, "value": "v"})


async def write(agent: Agent, seq: int, timeout_s: float = 5.0) -> None:
    replica = agent.data_replica("kv0")
    await replica.execute(0, "w", seq, put(f"k{seq}"), timeout_s, seq == 1)


def batch(service: str, epoch: int, first: int = 1, count: int = 3) -> replication_pb2.ShipBatch:
    entries = [Entry(1, i, b"", put(f"k{i}")) for i in range(first, first + count)]
    return replication_pb2.ShipBatch(
        service=service, epoch=epoch, batch_id=1,
        prev=common_pb2.LogPosition(epoch=0 if first == 1 else 1, index=first - 1),
        first_index=first, last_index=first + count - 1, records=encode_records(entries),
        commit_index=first + count - 1)


def untouched(agent: Agent, service: str, role: str, epoch: int = 1) -> None:
    """The replica still holds `role` at `epoch`, in memory and on disk."""
    replica = agent.replicas[service]
    assert (replica.role, replica.epoch) == (role, epoch)
    on_disk = Replica.load_meta(replica.root)
    assert (on_disk.role, on_disk.epoch) == (role, epoch)


async def ship(channel: grpc.aio.Channel, *messages: replication_pb2.ShipMessage,
               ) -> list[replication_pb2.ReplicaAck]:
    call = replication_pb2_grpc.ReplicationStub(channel).Ship()
    acks: list[replication_pb2.ReplicaAck] = []
    for message in messages:
        await call.write(message)
        acks.extend((await call.read()).acks)
    await call.done_writing()
    return acks


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# --- control calls only from the coordinator ------------------------------------------------


@pytest.mark.parametrize("caller", ["x", "root"])
async def test_control_calls_from_a_non_coordinator_identity_are_refused(
    served: Served, caller: str,
) -> None:
    await write(served.agent, 1)
    async with served.channel(caller) as channel:
        stub = agent_pb2_grpc.AgentControlStub(channel)
        calls = [
            stub.AssignRole(agent_pb2.AssignRoleRequest(
                service="kv1", kind="kv", role=common_pb2.ROLE_PRIMARY, epoch=50)),
            stub.StepDown(agent_pb2.StepDownRequest(service="kv0", epoch=HUGE)),
            stub.DropReplica(agent_pb2.DropReplicaRequest(service="kv0", epoch=1,
                                                          delete_data=True)),
            stub.PrepareSwitchover(agent_pb2.PrepareSwitchoverRequest(
                service="kv0", epoch=1, target_host_id="b", timeout_ms=60_000)),
            stub.Restart(agent_pb2.RestartRequest(command="hello")),
        ]
        for call in calls:
            assert await code_of(call) == DENIED
        migrate = stub.MigrateOut(agent_pb2.MigrateOutRequest(
            service="kv0", migration_id="m", target_host_id="x", target_address="x:1"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await migrate.read()
        assert refused.value.code() == DENIED
        assert "needs role coordinator" in (refused.value.details() or "")
    untouched(served.agent, "kv0", PRIMARY)
    untouched(served.agent, "kv1", DUPLICA)
    assert not served.agent.replicas["kv0"].core.holding
    assert not served.agent.restart_requested.is_set()
    assert served.agent.replicas["kv0"].wal.last_index == 2  # the barrier and the write


# --- Ship: only from the named primary, never a forged epoch --------------------------------


async def test_an_agent_ships_only_as_the_host_in_its_certificate(served: Served) -> None:
    async with served.channel("x") as channel:
        call = replication_pb2_grpc.ReplicationStub(channel).Ship()
        await call.write(replication_pb2.ShipMessage(source_host_id="p",
                                                     batches=[batch("kv1", 1)]))
        assert await call.code() == DENIED
        assert "act as host 'p'" in (await call.details())
    assert served.agent.replicas["kv1"].wal.last_index == 0


async def test_a_same_epoch_ship_from_a_host_that_is_not_the_primary_is_refused(
    served: Served,
) -> None:
    kv1 = served.agent.replicas["kv1"]
    async with served.channel("x") as channel:
        acks = await ship(channel, replication_pb2.ShipMessage(
            source_host_id="x", batches=[batch("kv1", 1)],
            probes=[replication_pb2.Probe(service="kv1", epoch=1)]))
    assert [a.status for a in acks] == [replication_pb2.ACK_STATUS_NOT_PRIMARY] * 2
    assert all("from host 'x': its primary is 'p'" in a.message for a in acks)
    assert kv1.wal.last_index == 0 and kv1.core.hears_primary(10**12)[1] == 0  # not acked
    untouched(served.agent, "kv1", DUPLICA)
    # The primary the coordinator named is taken on the same terms.
    async with served.channel("p") as channel:
        acks = await ship(channel, replication_pb2.ShipMessage(batches=[batch("kv1", 1)]))
    assert [a.status for a in acks] == [replication_pb2.ACK_STATUS_OK]
    assert kv1.wal.last_index == 3


@pytest.mark.parametrize("service", ["kv0", "kv1"])
async def test_a_ship_at_epoch_2_63_from_another_host_is_not_adopted(
    served: Served, service: str,
) -> None:
    role = PRIMARY if service == "kv0" else DUPLICA
    async with served.channel("x") as channel:
        acks = await ship(channel, replication_pb2.ShipMessage(
            source_host_id="x", batches=[batch(service, HUGE)],
            probes=[replication_pb2.Probe(service=service, epoch=HUGE)],
            truncates=[replication_pb2.Truncate(service=service, epoch=HUGE, after_index=0)]))
    assert all(a.status == replication_pb2.ACK_STATUS_NOT_PRIMARY for a in acks), acks
    assert all(a.epoch == 1 for a in acks)
    untouched(served.agent, service, role)
    if service == "kv0":
        await write(served.agent, 1)  # the primary serves on


async def test_a_higher_epoch_from_the_named_primary_is_adopted(served: Served) -> None:
    async with served.channel("p") as channel:
        acks = await ship(channel, replication_pb2.ShipMessage(
            probes=[replication_pb2.Probe(service="kv1", epoch=2)]))
    assert acks[0].status == replication_pb2.ACK_STATUS_MISMATCH and acks[0].epoch == 2
    untouched(served.agent, "kv1", DUPLICA, epoch=2)


# --- snapshots, drops, migrations -----------------------------------------------------------


async def test_install_snapshot_on_a_primary_is_refused(served: Served) -> None:
    await write(served.agent, 1)
    kv0 = served.agent.replicas["kv0"]
    header = replication_pb2.SnapshotHeader(kind="kv", kind_version=1, applied_index=100,
                                            epoch=1, digest=b"\0" * 16)

    async def chunks() -> AsyncIterator[replication_pb2.SnapshotChunk]:
        yield replication_pb2.SnapshotChunk(service="kv0", epoch=1, header=header, last=True)

    for caller in ("p", "x"):
        async with served.channel(caller) as channel:
            stub = replication_pb2_grpc.ReplicationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.InstallSnapshot(chunks())
        assert refused.value.code() == DENIED
        assert "replace the data of kv0" in (refused.value.details() or "")
    untouched(served.agent, "kv0", PRIMARY)
    assert kv0.sm.applied_index == 2 and kv0.wal.last_index == 2


async def test_drop_with_delete_data_on_a_primary_is_refused_unless_at_its_own_epoch(
    served: Served,
) -> None:
    await write(served.agent, 1)
    kv0 = served.agent.replicas["kv0"]
    async with served.channel("coord") as channel:
        stub = agent_pb2_grpc.AgentControlStub(channel)
        for epoch in (2, HUGE):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.DropReplica(agent_pb2.DropReplicaRequest(
                    service="kv0", epoch=epoch, delete_data=True))
            assert refused.value.code() == DENIED
            assert "a primary is demoted before its data is dropped" in (
                refused.value.details() or "")
        untouched(served.agent, "kv0", PRIMARY)
        assert kv0.root.exists() and kv0.wal.last_index == 2
        # Its service deleted (the coordinator's drop at the primary's own epoch): it goes.
        await stub.DropReplica(agent_pb2.DropReplicaRequest(service="kv0", epoch=1,
                                                            delete_data=True))
    assert "kv0" not in served.agent.replicas and not kv0.root.exists()


async def test_migrate_pages_to_a_path_outside_the_data_dir_is_refused_and_makes_nothing(
    served: Served,
) -> None:
    name = "../../../../tmp/x"
    outside = (served.agent.replica_root("kv0").parent / name).resolve()
    existed = outside.exists()

    async def batches() -> AsyncIterator[migration_pb2.PageBatch]:
        yield migration_pb2.PageBatch(migration_id="m", service=name, epoch=1,
                                      setup=msgpack.packb({"format": 1, "kind": "kvpaged"}))

    async with served.channel("x") as channel:
        call = migration_pb2_grpc.MigrationStub(channel).MigratePages(batches())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == INVALID
    assert "service name" in (refused.value.details() or "")
    assert outside.exists() == existed
    assert sorted(p.name for p in served.agent.replica_root("kv0").parent.iterdir()) == [
        "kv0", "kv1"]


async def test_every_name_that_reaches_the_agent_is_checked(served: Served) -> None:
    bad = "../kv0"
    async with served.channel("coord") as channel:
        stub = agent_pb2_grpc.AgentControlStub(channel)
        calls = [
            stub.AssignRole(agent_pb2.AssignRoleRequest(
                service=bad, kind="kv", role=common_pb2.ROLE_DUPLICA, epoch=1,
                primary=agent_pb2.ReplicaPeer(host_id="p", address="p:1"))),
            stub.AssignRole(agent_pb2.AssignRoleRequest(
                service="kv2", kind="kv", role=common_pb2.ROLE_DUPLICA, epoch=1,
                primary=agent_pb2.ReplicaPeer(host_id="../p", address="p:1"))),
            stub.DropReplica(agent_pb2.DropReplicaRequest(service=bad, epoch=1)),
            stub.StepDown(agent_pb2.StepDownRequest(service=bad, epoch=1)),
            stub.PrepareSwitchover(agent_pb2.PrepareSwitchoverRequest(
                service="kv0", epoch=1, target_host_id="b/../c")),
        ]
        for call in calls:
            assert await code_of(call) == INVALID
    async with served.channel("root") as channel:
        data = data_pb2_grpc.DataStub(channel)
        assert await code_of(data.Query(data_pb2.QueryRequest(service=bad))) == INVALID
        assert await code_of(data.Execute(data_pb2.ExecuteRequest(
            service=bad, request_id=common_pb2.RequestId(client_id="c", seq=1)))) == INVALID
    async with served.channel("p") as channel:
        acks = await ship(channel, replication_pb2.ShipMessage(batches=[batch(bad, 1)]))
    assert acks[0].status == replication_pb2.ACK_STATUS_UNKNOWN_SERVICE
    assert sorted(served.agent.replicas) == ["kv0", "kv1"]


async def test_execute_stream_needs_the_execute_permission_and_checks_each_name(
    served: Served,
) -> None:
    """ExecuteStream is authorized like Execute (an agent identity may not execute), and
    each call's service name is checked on its own."""
    one = data_pb2.CallBatch(service=["kv0"], epoch_seen=[0], client_id=["c"], seq=[1],
                             payload=[put("k")], deadline_ms=[5000], opens_session=[True])
    async with served.channel("x") as channel:
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        await call.write(one)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == DENIED
    assert served.agent.replicas["kv0"].wal.last_index == 1  # its barrier only
    async with served.channel("root") as channel:
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        await call.write(data_pb2.CallBatch(
            service=["../kv0", "kv0"], epoch_seen=[0, 0], client_id=["c", "c"], seq=[1, 2],
            payload=[put("a"), put("b")], deadline_ms=[5000, 5000],
            opens_session=[True, True]))
        answers = await call.read()
        while len(answers.seq) + len(answers.refused) < 2:
            more = await call.read()
            answers.MergeFrom(more)
        await call.done_writing()
    assert [(r.seq, r.code) for r in answers.refused] == [(1, INVALID.value[0])]
    assert list(answers.seq) == [2]


@pytest.mark.parametrize("stream", [True, False])
async def test_the_client_raises_permission_denied_for_an_identity_that_may_not_execute(
    served: Served, stream: bool,
) -> None:
    """On either data path, a refused certificate is PermissionDenied naming the identity,
    at once, not Unavailable at the deadline."""
    async with Client(agents=served.address, tls=files(served.pki, "x"), deadline_ms=5000,
                      stream=stream) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(PermissionDenied, match="agent 'x'"):
            await client.call("kv0", {"op": "put", "key": "k", "value": "v"})
        assert asyncio.get_running_loop().time() - started < 3
    assert served.agent.replicas["kv0"].wal.last_index == 1  # its barrier only
    # Counted as a request refused, on the service it named (a stream's calls are not read).
    assert served.agent.metrics is not None
    refused = {tuple(sorted(sample.labels.items())): sample.value
               for family in served.agent.metrics.registry.collect()
               for sample in family.samples
               if sample.name == "failover_requests_total"
               and sample.labels.get("outcome") == "permission_denied"}
    assert list(refused) == [(("host", "a"), ("op_kind", "execute"),
                              ("outcome", "permission_denied"),
                              ("service", "" if stream else "kv0"))]
    assert list(refused.values())[0] >= 1


# --- patch: an allowlist, no shell ----------------------------------------------------------


async def test_restart_with_a_shell_string_or_an_unknown_name_is_refused(
    served: Served,
) -> None:
    async with served.channel("coord") as channel:
        stub = agent_pb2_grpc.AgentControlStub(channel)
        for command in ("head /etc/shadow", "hello; id", "nope"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Restart(agent_pb2.RestartRequest(command=command))
            assert refused.value.code() == INVALID
            if command == "nope":
                assert "known: hello" in (refused.value.details() or "")
        assert not served.agent.restart_requested.is_set()
        # An entry of the allowlist runs (no shell), its output bounded.
        reply = await stub.Restart(agent_pb2.RestartRequest(command="hello"))
    assert reply.exit_code == 0
    assert reply.output.strip() == "x" * (defaults.PATCH_OUTPUT_CHARS_MAX - 1)
    await until(served.agent.restart_requested.is_set)


def test_no_shell_in_the_agents_restart() -> None:
    source = Path("failover/agent/restart.py").read_text()
    assert "create_subprocess_shell" not in source and "shell=True" not in source


# --- floods ---------------------------------------------------------------------------------


async def test_a_looping_prepare_switchover_does_not_freeze_writes(
    served: Served, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(defaults, "SWITCHOVER_TIMEOUT_MS", 300)
    await write(served.agent, 1)
    stop = asyncio.Event()
    refused: list[grpc.StatusCode] = []

    async def loop_prepares() -> None:
        async with served.channel("coord") as channel:
            stub = agent_pb2_grpc.AgentControlStub(channel)
            n = 0
            while not stop.is_set():
                n += 1  # b never catches up: each prepare holds until its timeout
                refused.append(await code_of(stub.PrepareSwitchover(
                    agent_pb2.PrepareSwitchoverRequest(
                        service="kv0", epoch=1, target_host_id="b", timeout_ms=60_000,
                        switchover_id=f"s{n % 2}"))))

    looper = asyncio.ensure_future(loop_prepares())
    await until(lambda: served.agent.replicas["kv0"].core.holding)
    loop = asyncio.get_running_loop()
    started = loop.time()
    seq = 1
    while loop.time() - started < 2.0:
        seq += 1
        await write(served.agent, seq, timeout_s=1.0)  # never waits a whole hold twice
    stop.set()
    await looper
    assert seq > 10
    assert grpc.StatusCode.UNAVAILABLE in refused


async def test_ship_streams_past_the_bound_per_peer_are_resource_exhausted(
    served: Served,
) -> None:
    served.agent.ship_streams.per_peer_max = 2
    async with served.channel("p") as channel:
        stub = replication_pb2_grpc.ReplicationStub(channel)
        open_calls = []
        for _ in range(2):
            call = stub.Ship()
            await call.write(replication_pb2.ShipMessage())
            await call.read()
            open_calls.append(call)
        extra = stub.Ship()
        await extra.write(replication_pb2.ShipMessage())
        assert await extra.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with served.channel("x") as other:  # another peer is not held back
            assert await ship(other, replication_pb2.ShipMessage()) == []
        for call in open_calls:
            call.cancel()
    await until(lambda: served.agent.ship_streams.total == 0)


# --- files and config -----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_replica_dirs_are_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        agent = Agent(agent_config(tmp_path / "data"))
        await agent.start()
        try:
            await agent.assign_role("kv0", "kv", PRIMARY, 1, "sync", None, {}, set())
        finally:
            await agent.stop()
    finally:
        os.umask(old)
    for path in (tmp_path / "data", tmp_path / "data" / "replicas",
                 tmp_path / "data" / "replicas" / "kv0"):
        assert mode(path) == 0o700, path


def test_the_certificate_must_name_this_host(pki: Path, tmp_path: Path) -> None:
    tls = files(pki, "x")
    config = agent_config(tmp_path, tls_ca=str(tls.ca), tls_cert=str(tls.cert),
                          tls_key=str(tls.key))
    with pytest.raises(ConfigError, match="for agent 'x', but this agent is host 'a'"):
        config.load_tls()
    coordinator = files(pki, "coord")
    config = AgentConfig.from_mapping({"host_id": "coord", "listen": "127.0.0.1:1",
                                       "data_dir": str(tmp_path), "tls_ca": str(tls.ca),
                                       "tls_cert": str(coordinator.cert),
                                       "tls_key": str(coordinator.key)})
    with pytest.raises(ConfigError, match="role agent"):
        config.load_tls()
    with pytest.raises(ConfigError, match="--tls-key missing"):
        agent_config(tmp_path, tls_ca=str(tls.ca), tls_cert=str(tls.cert))


@pytest.mark.parametrize(("patch", "message"), [
    ({"commands": {"up": "apt-get upgrade"}}, "list of strings"),
    ({"commands": {"up": []}}, "list of strings"),
    ({"commands": {"../up": ["/bin/true"]}}, "patch command name"),
    ({"command": {}}, "only the table"),
])
def test_patch_commands_are_checked_at_start(tmp_path: Path, patch: dict[str, object],
                                             message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        agent_config(tmp_path, patch=patch)


def test_patch_commands_load_from_the_toml(tmp_path: Path) -> None:
    from failover.agent.config import load_toml

    path = tmp_path / "agent.toml"
    path.write_text('host_id = "a"\nlisten = "127.0.0.1:1"\ndata_dir = "d"\ninsecure = true\n'
                    '[patch.commands]\nupgrade = ["/usr/bin/apt-get", "-y", "upgrade"]\n')
    config = AgentConfig.from_mapping(load_toml(path))
    assert config.patch_commands == {"upgrade": ("/usr/bin/apt-get", "-y", "upgrade")}
    assert config.insecure is True and config.tls is None


def test_stream_admission_bounds_each_peer_and_all() -> None:
    from failover.agent.admission import StreamAdmission
    from failover.errors import Overloaded

    admission = StreamAdmission("InstallSnapshot", per_peer_max=2, total_max=3)
    with admission.admit("agent 'p'"), admission.admit("agent 'p'"):
        with pytest.raises(Overloaded, match="agent 'p' has 2 InstallSnapshot streams"), \
                admission.admit("agent 'p'"):
            pass
        with admission.admit("agent 'x'"), pytest.raises(
                Overloaded, match="3 InstallSnapshot streams open"), admission.admit("agent 'y'"):
            pass
    assert admission.total == 0 and admission.open == {}


async def test_shipped_bytes_in_flight_past_the_bound_hold_a_stream_with_its_own_unanswered(
    agent: Agent, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(defaults, "AGENT_SHIP_INFLIGHT_BYTES_MAX", 100)
    agent.ship_bytes_taken(150)
    idle = asyncio.ensure_future(agent.ship_bytes_room(lambda: True))
    busy = asyncio.ensure_future(agent.ship_bytes_room(lambda: False))
    await until(idle.done)  # a stream with nothing unanswered always reads on
    await asyncio.sleep(0.01)
    assert not busy.done()
    agent.ship_bytes_taken(-100)
    await until(busy.done)
    assert agent.ship_inflight_bytes == 50


async def test_a_snapshot_for_a_duplica_only_from_its_named_primary_at_its_epoch(
    served: Served,
) -> None:
    kv1 = served.agent.replicas["kv1"]
    header = replication_pb2.SnapshotHeader(kind="kv", kind_version=1, applied_index=100,
                                            epoch=1, digest=b"\0" * 16)

    def chunks(epoch: int) -> AsyncIterator[replication_pb2.SnapshotChunk]:
        async def gen() -> AsyncIterator[replication_pb2.SnapshotChunk]:
            yield replication_pb2.SnapshotChunk(service="kv1", epoch=epoch, header=header,
                                                last=True)
        return gen()

    for caller, epoch, code in (("x", 1, DENIED), ("p", HUGE, grpc.StatusCode.FAILED_PRECONDITION),
                                ("coord", 1, DENIED)):
        async with served.channel(caller) as channel:
            stub = replication_pb2_grpc.ReplicationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.InstallSnapshot(chunks(epoch))
        assert refused.value.code() == code, (caller, refused.value.details())
    untouched(served.agent, "kv1", DUPLICA)
    assert kv1.sm.applied_index == 0 and kv1.wal.last_index == 0
    assert served.agent.snapshot_streams.total == 0


async def test_hears_primary_of_several_services_answers_each_and_checks_its_input(
        served: Served) -> None:
    """One HearsPrimary per host and suspicion round (issue 14): each service answered with
    its matched index, a service not held (or broken) as not held; names and bounds checked
    before anything is read."""
    async with served.channel("coord") as channel:
        stub = agent_pb2_grpc.AgentControlStub(channel)
        reply = await stub.HearsPrimary(agent_pb2.HearsPrimaryRequest(
            services=["kv1", "kv9", "kv0"]))
        assert [(a.service, a.held) for a in reply.answers] == [
            ("kv1", True), ("kv9", False), ("kv0", True)]
        kv1 = served.agent.replicas["kv1"]
        assert reply.answers[0].epoch == 1 and reply.answers[0].hears is False
        assert reply.answers[0].matched_index == kv1.status()["matched_index"]
        served.agent.replicas["kv0"].mark_broken("a test broke it")
        reply = await stub.HearsPrimary(agent_pb2.HearsPrimaryRequest(services=["kv0"]))
        assert [(a.service, a.held) for a in reply.answers] == [("kv0", False)]
        for bad in (agent_pb2.HearsPrimaryRequest(services=["kv1", "../kv0"]),
                    agent_pb2.HearsPrimaryRequest(service="kv1", services=["kv1"]),
                    agent_pb2.HearsPrimaryRequest(
                        services=["kv1"] * (defaults.HEARTBEAT_REPLICAS_MAX + 1))):
            assert await code_of(stub.HearsPrimary(bad)) == INVALID
