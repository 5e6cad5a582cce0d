"""Real `failover-agent` processes with mutual TLS under a real TLS coordinator (issue 13, the
agents' side): the agents register, take roles, ship to each other and serve a client, all
over TLS checked by host id; another identity cannot drive an agent; the daemon refuses a
certificate that is not its own, and the clear beyond loopback, at start."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
import pytest

from failover.client import Client
from failover.localcluster import free_port, wait_for
from failover.net.tls import TlsFiles, channel_credentials
from failover.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
)

pytestmark = pytest.mark.timeout(180)

HOSTS = ("h1", "h2")


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "failover.cli", *args], check=True,
                   capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "certs"
    cli("certs", "init", str(directory))
    for role, name in (("coordinator", "coord"), ("admin", "root"), ("agent", "h1"),
                       ("agent", "h2"), ("agent", "h3")):
        cli("certs", "issue", str(directory), "--role", role, "--name", name,
            "--san", "127.0.0.1")
    return directory


def tls_flags(pki: Path, name: str) -> list[str]:
    return ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / f"{name}.crt"),
            "--tls-key", str(pki / f"{name}.key")]


def tls_files(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(pki / "ca.crt", pki / f"{name}.crt", pki / f"{name}.key")


def secure(pki: Path, name: str, address: str, server_name: str) -> grpc.Channel:
    return grpc.secure_channel(address, channel_credentials(tls_files(pki, name).load()),
                               options=[("grpc.ssl_target_name_override", server_name)])


@dataclass
class Cluster:
    pki: Path
    root: Path
    coordinator: str = ""
    agents: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    def spawn(self, name: str, command: list[str]) -> None:
        log = (self.root / f"{name}.log").open("wb")
        self.logs.append(log)
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def coordinator_stub(self, name: str) -> coordinator_pb2_grpc.CoordinatorStub:
        return coordinator_pb2_grpc.CoordinatorStub(
            secure(self.pki, name, self.coordinator, "coord"))

    def agent_stub(self, name: str, host: str) -> agent_pb2_grpc.AgentControlStub:
        return agent_pb2_grpc.AgentControlStub(
            secure(self.pki, name, self.agents[host], host))


@pytest.fixture
def cluster(tmp_path: Path, pki: Path) -> Iterator[Cluster]:
    c = Cluster(pki, tmp_path)
    c.coordinator = f"127.0.0.1:{free_port()}"
    c.spawn("coordinator", [sys.executable, "-m", "failover.coordinator", "--listen",
                            c.coordinator, "--data-dir", str(tmp_path / "coordinator"),
                            *tls_flags(pki, "coord")])
    for host in HOSTS:
        c.agents[host] = f"127.0.0.1:{free_port()}"
        c.spawn(host, [sys.executable, "-m", "failover.agent", "--host-id", host,
                       "--listen", c.agents[host], "--data-dir", str(tmp_path / host),
                       "--coordinator", c.coordinator, *tls_flags(pki, host)])
    try:
        wait_for(lambda: len(c.coordinator_stub("root").GetClusterStatus(
            coordinator_pb2.ClusterStatusRequest(), timeout=0.5).hosts) == len(HOSTS), 30,
            "both TLS agents registered over TLS")
        yield c
    finally:
        for proc in c.procs:
            proc.terminate()
        for proc in c.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for log in c.logs:
            log.close()


def test_agents_with_tls_replicate_and_only_the_coordinator_drives_them(
    cluster: Cluster,
) -> None:
    cluster.coordinator_stub("root").CreateService(coordinator_pb2.CreateServiceRequest(
        name="kv1", kind="kv", replicas=2), timeout=10)

    async def writes() -> None:
        async with Client(coordinator=cluster.coordinator, tls=tls_files(cluster.pki, "root"),
                          deadline_ms=20_000) as client:
            for i in range(20):
                await client.call("kv1", {"op": "put", "key": f"k{i}", "value": "v"})

    asyncio.run(writes())

    def digests() -> list[bytes] | None:
        # Compared at the same applied index: the duplica learns the last commit only with
        # the primary's next message, so for a moment it has applied one entry less (a
        # fresh-clone run compared the two then and found them different).
        replies = [cluster.agent_stub("coord", h).GetDigest(
            agent_pb2.GetDigestRequest(service="kv1"), timeout=2) for h in HOSTS]
        done = (all(r.applied_index >= 20 for r in replies)
                and len({r.applied_index for r in replies}) == 1)
        return [r.digest for r in replies] if done else None

    # The duplica took the primary's stream over TLS (checked by host id) and caught up.
    first, second = wait_for(digests, 30, "both replicas applied every write")
    assert first == second
    status = {h: cluster.agent_stub("coord", h).GetStatus(agent_pb2.GetStatusRequest(),
                                                         timeout=2) for h in HOSTS}
    epochs = {h: [r.epoch for r in s.replicas] for h, s in status.items()}
    # Another agent's certificate (h3), or an admin's, cannot drive an agent.
    for name in ("h3", "root"):
        stub = cluster.agent_stub(name, "h1")
        for call, request in (
            (stub.AssignRole, agent_pb2.AssignRoleRequest(
                service="kv1", kind="kv", role=common_pb2.ROLE_PRIMARY, epoch=50)),
            (stub.StepDown, agent_pb2.StepDownRequest(service="kv1", epoch=(1 << 63) - 1)),
            (stub.DropReplica, agent_pb2.DropReplicaRequest(service="kv1", epoch=1,
                                                            delete_data=True)),
            (stub.Restart, agent_pb2.RestartRequest(command="head /etc/shadow")),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=5)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The coordinator itself may not run a shell string either: only allowlist names.
    with pytest.raises(grpc.RpcError) as refused:
        cluster.agent_stub("coord", "h1").Restart(
            agent_pb2.RestartRequest(command="head /etc/shadow"), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = {h: cluster.agent_stub("coord", h).GetStatus(agent_pb2.GetStatusRequest(),
                                                        timeout=2) for h in HOSTS}
    assert {h: [r.epoch for r in s.replicas] for h, s in after.items()} == epochs
    assert {h: s.started_at for h, s in after.items()} == {
        h: s.started_at for h, s in status.items()}
    for host in HOSTS:
        data_dir = cluster.root / host
        for path in (data_dir, data_dir / "replicas", data_dir / "replicas" / "kv1"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_an_agent_refuses_a_certificate_of_another_host_and_the_clear_beyond_loopback(
    tmp_path: Path, pki: Path,
) -> None:
    def start(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "failover.agent", "--host-id", "h1",
                               "--data-dir", str(tmp_path / "h1"), *args],
                              capture_output=True, text=True, timeout=60)

    wrong = start("--listen", f"127.0.0.1:{free_port()}", *tls_flags(pki, "h2"))
    assert wrong.returncode == 2
    assert "is for agent 'h2', but this agent is host 'h1'" in wrong.stderr
    clear = start("--listen", f"0.0.0.0:{free_port()}")
    assert clear.returncode == 2 and "refusing to listen on 0.0.0.0" in clear.stderr
    assert not (tmp_path / "h1").exists()  # refused before anything was made
