"""The agent's coordinator term fence (issue 15): a control call stamped with a term older
than the highest the agent has seen (a deposed leader's) is refused with FAILED_PRECONDITION
before its handler runs and changes nothing; the term is kept in the data dir across restarts.

An agent in this process behind a real gRPC server on 127.0.0.1 with the daemon's own
interceptors (`failover.agent.daemon.interceptors`), in the clear and with mutual TLS."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from failover.agent.daemon import interceptors
from failover.agent.host import Agent
from failover.agent.replica import Replica
from failover.agent.term import TERM_FILE, CoordinatorTerm
from failover.core.roles import DUPLICA
from failover.errors import StaleCoordinatorTermError, StorageError
from failover.net import certs, channels
from failover.net.agent_servicers import add_to_server
from failover.net.channels import COORDINATOR_TERM_METADATA_KEY, ERROR_TYPE_METADATA_KEY
from failover.net.tls import TlsFiles
from failover.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.unit.inprocess import UNREACHABLE, agent_config

STALE = grpc.StatusCode.FAILED_PRECONDITION


def stamp(term: int | str) -> tuple[tuple[str, str], ...]:
    return ((COORDINATOR_TERM_METADATA_KEY, str(term)),)


@asynccontextmanager
async def serving(data_dir: Path, tls: TlsFiles | None = None,
                  ) -> AsyncIterator[tuple[Agent, str]]:
    """An agent on `data_dir` behind the daemon's interceptors, at a free port."""
    extra: dict[str, Any] = {"patch": {"commands": {"true": ["true"]}}}
    if tls is not None:
        extra.update(tls_ca=str(tls.ca), tls_cert=str(tls.cert), tls_key=str(tls.key))
    config = agent_config(data_dir, **extra)
    material = config.load_tls()
    agent = Agent(config, material)
    await agent.start()
    server = channels.server(interceptors=interceptors(agent, material))
    add_to_server(server, agent)
    port = channels.add_port(server, "127.0.0.1:0", material)
    await server.start()
    try:
        yield agent, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await agent.stop()


def assign(service: str, epoch: int, role: int = common_pb2.ROLE_DUPLICA,
           ) -> agent_pb2.AssignRoleRequest:
    request = agent_pb2.AssignRoleRequest(
        service=service, kind="kv", role=role, epoch=epoch,
        mode=common_pb2.REPLICATION_MODE_SYNC)
    if role == common_pb2.ROLE_DUPLICA:
        request.primary.CopyFrom(agent_pb2.ReplicaPeer(host_id="p", address=UNREACHABLE))
    return request


def on_disk(agent: Agent, service: str) -> tuple[str, int]:
    meta = Replica.load_meta(agent.replicas[service].root)
    return meta.role, meta.epoch


def changing_calls(stub: agent_pb2_grpc.AgentControlStub,
                   ) -> list[tuple[str, Callable[..., Any]]]:
    """Every fenced control call, aimed at kv1 (a duplica at epoch 1), each one that would
    change it if it ran."""
    return [
        ("AssignRole", lambda md: stub.AssignRole(
            assign("kv1", 9, common_pb2.ROLE_PRIMARY), metadata=md, timeout=5)),
        ("StepDown", lambda md: stub.StepDown(
            agent_pb2.StepDownRequest(service="kv1", epoch=9), metadata=md, timeout=5)),
        ("DropReplica", lambda md: stub.DropReplica(agent_pb2.DropReplicaRequest(
            service="kv1", epoch=9, delete_data=True), metadata=md, timeout=5)),
        ("PrepareSwitchover", lambda md: stub.PrepareSwitchover(
            agent_pb2.PrepareSwitchoverRequest(service="kv1", epoch=1, target_host_id="p",
                                               timeout_ms=100), metadata=md, timeout=5)),
        ("Restart", lambda md: stub.Restart(agent_pb2.RestartRequest(command="true"),
                                            metadata=md, timeout=5)),
    ]


async def test_a_call_at_an_older_term_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with serving(tmp_path / "a") as (agent, address), \
            channels.channel(address, None) as channel:
        stub = agent_pb2_grpc.AgentControlStub(channel)
        # The leader of term 5 forms kv1; that raises the agent's term to 5, on disk too.
        await stub.AssignRole(assign("kv1", 1), metadata=stamp(5), timeout=5)
        assert agent.coordinator_term.seen == 5
        path = tmp_path / "a" / TERM_FILE
        assert path.read_text() == "5\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        kv1_root = agent.replicas["kv1"].root
        # The deposed leader of term 4, and a caller with no term at all (term 0).
        for metadata in (stamp(4), None):
            for name, call in changing_calls(stub):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(metadata)
                assert refused.value.code() == STALE, name
                assert refused.value.details() == (
                    f"coordinator term {4 if metadata else 0} is older than term 5 this agent "
                    "has seen: that coordinator was deposed"), name
                trailing = dict(refused.value.trailing_metadata() or ())
                assert trailing[ERROR_TYPE_METADATA_KEY] == "StaleCoordinatorTermError", name
            migrate = stub.MigrateOut(agent_pb2.MigrateOutRequest(
                service="kv1", target_host_id="x", target_address=UNREACHABLE,
                migration_id="m"), metadata=metadata, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await migrate.read()
            assert refused.value.code() == STALE
        replica = agent.replicas["kv1"]
        assert (replica.role, replica.epoch) == (DUPLICA, 1)
        assert on_disk(agent, "kv1") == (DUPLICA, 1) and kv1_root.exists()
        assert not agent.restart_requested.is_set()
        assert agent.coordinator_term.seen == 5 and path.read_text() == "5\n"
        # The leader itself (term 5), and a newer one (term 6), are obeyed.
        await stub.StepDown(agent_pb2.StepDownRequest(service="kv1", epoch=2),
                            metadata=stamp(5), timeout=5)
        await stub.AssignRole(assign("kv1", 3), metadata=stamp(6), timeout=5)
        assert replica.epoch == 3 and agent.coordinator_term.seen == 6
        assert path.read_text() == "6\n"


async def test_without_a_term_seen_an_unstamped_call_is_obeyed_as_before(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path / "a") as (agent, address), \
            channels.channel(address, None) as channel:
        stub = agent_pb2_grpc.AgentControlStub(channel)
        await stub.AssignRole(assign("kv1", 1), timeout=5)
        await stub.StepDown(agent_pb2.StepDownRequest(service="kv1", epoch=2), timeout=5)
        assert agent.replicas["kv1"].epoch == 2
        assert agent.coordinator_term.seen == 0
        assert not (tmp_path / "a" / TERM_FILE).exists()


async def test_reads_and_compaction_are_answered_at_any_term(tmp_path: Path) -> None:
    async with serving(tmp_path / "a") as (agent, address), \
            channels.channel(address, None) as channel:
        stub = agent_pb2_grpc.AgentControlStub(channel)
        await stub.AssignRole(assign("kv0", 1, common_pb2.ROLE_PRIMARY), metadata=stamp(7),
                              timeout=5)
        for metadata in (stamp(3), None):
            status = await stub.GetStatus(agent_pb2.GetStatusRequest(), metadata=metadata,
                                          timeout=5)
            assert [r.service for r in status.replicas] == ["kv0"]
            await stub.GetDigest(agent_pb2.GetDigestRequest(service="kv0"), metadata=metadata,
                                 timeout=5)
            await stub.HearsPrimary(agent_pb2.HearsPrimaryRequest(service="kv0"),
                                    metadata=metadata, timeout=5)
            await stub.Compact(agent_pb2.CompactRequest(service="kv0", retain_entries=10),
                               metadata=metadata, timeout=5)
        # A read at a newer term teaches it too.
        await stub.GetStatus(agent_pb2.GetStatusRequest(), metadata=stamp(8), timeout=5)
        assert agent.coordinator_term.seen == 8


async def test_a_malformed_request_is_invalid_whatever_its_term(tmp_path: Path) -> None:
    async with serving(tmp_path / "a") as (agent, address), \
            channels.channel(address, None) as channel:
        stub = agent_pb2_grpc.AgentControlStub(channel)
        await stub.AssignRole(assign("kv1", 1), metadata=stamp(5), timeout=5)
        # A Restart naming no allowed command, at a stale term: the command is judged first.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Restart(agent_pb2.RestartRequest(command="head /etc/shadow"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A term that is not one whole number, or two of them.
        for metadata in (stamp("x"), stamp("-1"), stamp(1 << 64), stamp("1" * 30),
                         stamp(9) + stamp(9)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.StepDown(agent_pb2.StepDownRequest(service="kv1", epoch=9),
                                    metadata=metadata, timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, metadata
        assert agent.replicas["kv1"].epoch == 1 and agent.coordinator_term.seen == 5
        assert not agent.restart_requested.is_set()


async def test_the_term_survives_a_restart_of_the_agent(tmp_path: Path) -> None:
    async with serving(tmp_path / "a") as (agent, address), \
            channels.channel(address, None) as channel:
        await agent_pb2_grpc.AgentControlStub(channel).AssignRole(
            assign("kv1", 1), metadata=stamp(12), timeout=5)
    async with serving(tmp_path / "a") as (agent, address), \
            channels.channel(address, None) as channel:
        assert agent.coordinator_term.seen == 12
        stub = agent_pb2_grpc.AgentControlStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.AssignRole(assign("kv1", 2, common_pb2.ROLE_PRIMARY),
                                  metadata=stamp(11), timeout=5)
        assert refused.value.code() == STALE
        assert (agent.replicas["kv1"].role, agent.replicas["kv1"].epoch) == (DUPLICA, 1)
        assert on_disk(agent, "kv1") == (DUPLICA, 1)


def test_the_term_file_is_replaced_whole_and_a_damaged_one_stops_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    term = CoordinatorTerm(tmp_path)
    assert term.seen == 0
    assert term.observe(3) and not term.observe(2) and not term.observe(3)
    for _ in range(3):
        with pytest.raises(StaleCoordinatorTermError):
            term.admit(2)
    # Said once, with what to do should the store's terms have started over.
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and f"delete {tmp_path / TERM_FILE}" in refusals[0]
    term.admit(4)
    assert CoordinatorTerm(tmp_path).seen == 4
    assert sorted(os.listdir(tmp_path)) == [TERM_FILE]  # no temp file left behind
    for damaged in (b"", b"x\n", b"1" * 100, b"99999999999999999999999\n"):
        (tmp_path / TERM_FILE).write_bytes(damaged)
        with pytest.raises(StorageError, match="coordinator term file"):
            CoordinatorTerm(tmp_path)


def test_a_term_that_cannot_be_recorded_still_fences_this_process(tmp_path: Path) -> None:
    term = CoordinatorTerm(tmp_path / "missing")  # its directory does not exist
    with pytest.raises(StorageError, match="cannot record coordinator term 5"):
        term.observe(5)
    with pytest.raises(StaleCoordinatorTermError):
        term.check(4)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "certs"
    certs.init_ca(directory)
    for role, name in (("agent", "a"), ("coordinator", "coord"), ("admin", "root")):
        certs.issue_to_dir(directory, role, name, sans=["127.0.0.1"])
    return directory


def files(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(pki / "ca.crt", pki / f"{name}.crt", pki / f"{name}.key")


async def test_with_tls_only_a_coordinator_raises_the_term(tmp_path: Path, pki: Path) -> None:
    async with serving(tmp_path / "a", files(pki, "a")) as (agent, address):
        async with channels.secure_channel(address, files(pki, "root").load(),
                                           server_name="a") as channel:
            stub = agent_pb2_grpc.AgentControlStub(channel)
            # An admin may read the agent, but a term it claims is not learnt: it would
            # otherwise fence the real coordinator out.
            await stub.GetStatus(agent_pb2.GetStatusRequest(), metadata=stamp(1 << 40),
                                 timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.StepDown(agent_pb2.StepDownRequest(service="kv1", epoch=9),
                                    metadata=stamp(1 << 40), timeout=5)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert agent.coordinator_term.seen == 0
        async with channels.secure_channel(address, files(pki, "coord").load(),
                                           server_name="a") as channel:
            stub = agent_pb2_grpc.AgentControlStub(channel)
            await stub.AssignRole(assign("kv1", 1), metadata=stamp(3), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.AssignRole(assign("kv1", 2), metadata=stamp(2), timeout=5)
            assert refused.value.code() == STALE
        assert agent.coordinator_term.seen == 3 and agent.replicas["kv1"].epoch == 1
