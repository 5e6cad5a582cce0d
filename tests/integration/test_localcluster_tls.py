"""A LocalCluster is on mutual TLS by default (issue 13): its certificates are private files,
every daemon refuses a caller in the clear, and each identity it hands out may do only what its
role allows."""

from __future__ import annotations

import stat
from collections.abc import Iterator

import grpc
import pytest

from failover.errors import FailoverError
from failover.localcluster import AgentProcess, LocalCluster, sync_channel
from failover.net.tls import TlsFiles
from failover.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("tls"), hosts=2, coordinator=True) as c:
        c.start()
        c.create("kv", "kv", replicas=2)
        yield c


def test_certificates_are_private_and_every_daemon_is_started_with_its_own(
    cluster: LocalCluster,
) -> None:
    assert cluster.tls and cluster.pki is not None and cluster.coordinator is not None
    pki = cluster.pki.directory
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    for key in pki.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for agent in cluster:
        command = agent.command()
        assert command[command.index("--tls-cert") + 1] == str(pki / f"{agent.host_id}.crt")
    command = cluster.coordinator.command()
    assert command[command.index("--tls-cert") + 1] == str(pki / "coordinator.crt")
    for files in (cluster.tls_admin, cluster.tls_operator, cluster.tls_client):
        assert isinstance(files, TlsFiles)
        files.load()  # signed by the cluster's CA, carries an identity, valid now


def test_every_daemon_refuses_a_caller_in_the_clear(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    with grpc.insecure_channel(cluster.coordinator.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            coordinator_pb2_grpc.CoordinatorStub(channel).GetClusterStatus(
                coordinator_pb2.ClusterStatusRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    for agent in cluster:
        with grpc.insecure_channel(agent.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                agent_pb2_grpc.AgentControlStub(channel).GetStatus(
                    agent_pb2.GetStatusRequest(), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_each_identity_it_hands_out_may_do_only_what_its_role_allows(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    before = cluster.coordinator.status()

    def coordinator_as(files: TlsFiles | None) -> coordinator_pb2_grpc.CoordinatorStub:
        return coordinator_pb2_grpc.CoordinatorStub(
            sync_channel(cluster.coordinator.address, files))  # type: ignore[union-attr]

    for files in (cluster.tls_client, cluster.tls_operator):
        with pytest.raises(grpc.RpcError) as info:
            coordinator_as(files).CreateService(coordinator_pb2.CreateServiceRequest(
                name="nope", kind="kv", replicas=1), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:
        coordinator_as(cluster.tls_client).GetClusterStatus(
            coordinator_pb2.ClusterStatusRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert coordinator_as(cluster.tls_operator).GetClusterStatus(
        coordinator_pb2.ClusterStatusRequest(), timeout=5).services
    # Only a coordinator identity drives an agent: the admin's certificate may read it.
    primary = cluster.primary_of("kv")
    assert primary is not None
    admin_on_agent = agent_pb2_grpc.AgentControlStub(
        sync_channel(cluster[primary].address, cluster.tls_admin))
    assert admin_on_agent.GetStatus(agent_pb2.GetStatusRequest(), timeout=5).replicas
    with pytest.raises(grpc.RpcError) as info:
        admin_on_agent.StepDown(agent_pb2.StepDownRequest(service="kv", epoch=99), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    after = cluster.coordinator.status()
    assert [(s.name, s.epoch) for s in after.services] == [
        (s.name, s.epoch) for s in before.services]
    assert cluster.primary_of("kv") == primary


def test_an_agent_is_ready_only_when_its_own_process_answers_on_its_port(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Another agent on the port (two given the same one) is not this agent being ready.
    agent = cluster[next(iter(cluster.agents))]
    imposter = AgentProcess(tmp_path_factory.mktemp("imposter"), "h-imposter",
                            caller_tls=agent.caller_tls)
    imposter.address = agent.address
    with pytest.raises(FailoverError, match="answers as agent"):
        imposter.probe()
    agent.probe()
