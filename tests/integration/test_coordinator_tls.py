"""A real `failover-coordinator` process with mutual TLS, called directly with a certificate of
each role (issue 13, the coordinator's side): who may do what, an agent only as its own host
id, the audit rows, `failoverctl` and `Client` with certificates, and the daemon's refusals
at start. No agent is needed: the "agents" here are registrations made with agent
certificates (their control calls go nowhere and are only logged)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import msgpack
import pytest

from failover.client import Client
from failover.errors import PermissionDenied, Unavailable
from failover.localcluster import free_port, wait_for
from failover.net.tls import TlsFiles, channel_credentials
from failover.v1 import agent_pb2, coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.timeout(120)

GIB = 1 << 30
METRICS = agent_pb2.HostMetrics(cpu_percent=5, memory_percent=5, disk_free_bytes=100 * GIB,
                                disk_total_bytes=200 * GIB, memory_total_bytes=16 * GIB,
                                cpu_count=8)
NAMES = {"coordinator": "coord", "client": "app", "operator": "alice", "admin": "root-1"}
AGENTS = ("h1", "h2", "h3")


def issue(directory: Path, role: str, name: str, *sans: str) -> None:
    subprocess.run([sys.executable, "-m", "failover.cli", "certs", "issue", str(directory),
                    "--role", role, "--name", name, *(a for s in sans for a in ("--san", s))],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "certs"
    subprocess.run([sys.executable, "-m", "failover.cli", "certs", "init", str(directory)],
                   check=True, capture_output=True, timeout=60)
    issue(directory, "coordinator", NAMES["coordinator"], "127.0.0.1")
    for role in ("client", "operator", "admin"):
        issue(directory, role, NAMES[role])
    for host in AGENTS:
        issue(directory, "agent", host, "127.0.0.1")
    return directory


def tls_files(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(pki / "ca.crt", pki / f"{name}.crt", pki / f"{name}.key")


def coordinator_command(data_dir: Path, listen: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "failover.coordinator", "--listen", listen,
            "--data-dir", str(data_dir), *args]


@dataclass
class Running:
    address: str
    pki: Path
    data_dir: Path
    proc: subprocess.Popen[bytes]

    def stub(self, name: str) -> coordinator_pb2_grpc.CoordinatorStub:
        material = tls_files(self.pki, name).load()
        channel = grpc.secure_channel(self.address, channel_credentials(material))
        return coordinator_pb2_grpc.CoordinatorStub(channel)

    def history(self) -> list[coordinator_pb2.HistoryEvent]:
        return list(self.stub(NAMES["operator"]).GetHistory(
            coordinator_pb2.HistoryRequest(limit=1000), timeout=5).events)


@pytest.fixture
def coordinator(tmp_path: Path, pki: Path) -> Iterator[Running]:
    address = f"127.0.0.1:{free_port()}"
    data_dir = tmp_path / "new" / "coordinator"
    name = NAMES["coordinator"]
    log = (tmp_path / "coordinator.log").open("wb")
    proc = subprocess.Popen(coordinator_command(
        data_dir, address, "--tls-ca", str(pki / "ca.crt"), "--tls-cert",
        str(pki / f"{name}.crt"), "--tls-key", str(pki / f"{name}.key")),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    running = Running(address, pki, data_dir, proc)
    try:
        wait_for(lambda: running.stub(NAMES["operator"]).GetClusterStatus(
            coordinator_pb2.ClusterStatusRequest(), timeout=0.5), 20, "the TLS coordinator")
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def refused(call: object, code: grpc.StatusCode, *args: object, **kwargs: object) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=5, **kwargs)  # type: ignore[operator]
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


def register(running: Running, name: str, host_id: str, port: int = 7101) -> None:
    running.stub(name).Register(coordinator_pb2.RegisterRequest(
        host_id=host_id, address=f"127.0.0.1:{port}", metrics=METRICS), timeout=5)


def state(running: Running) -> object:
    status = running.stub(NAMES["operator"]).GetClusterStatus(
        coordinator_pb2.ClusterStatusRequest(), timeout=5)
    return ([(h.host_id, h.address) for h in status.hosts],
            [(s.name, s.epoch, sorted((r.host_id, r.role) for r in s.replicas))
             for s in status.services])


def test_agents_register_and_heartbeat_only_as_their_own_host_id(coordinator: Running) -> None:
    for port, host in enumerate(AGENTS, start=7101):
        register(coordinator, host, host, port)
    before = state(coordinator)
    # h3's certificate cannot move h1, register as a new host, or heartbeat for h1.
    details = refused(coordinator.stub("h3").Register, grpc.StatusCode.PERMISSION_DENIED,
                      coordinator_pb2.RegisterRequest(host_id="h1", address="10.6.6.6:7101",
                                                      metrics=METRICS))
    assert "agent 'h3'" in details and "'h1'" in details
    refused(coordinator.stub("h3").Register, grpc.StatusCode.PERMISSION_DENIED,
            coordinator_pb2.RegisterRequest(host_id="h9", address="127.0.0.1:7109",
                                            metrics=METRICS))
    refused(coordinator.stub("h3").Heartbeat, grpc.StatusCode.PERMISSION_DENIED,
            coordinator_pb2.HeartbeatRequest(host_id="h1", metrics=METRICS))
    # Nor may any other role register or heartbeat at all.
    for role in ("client", "operator", "admin", "coordinator"):
        refused(coordinator.stub(NAMES[role]).Heartbeat, grpc.StatusCode.PERMISSION_DENIED,
                coordinator_pb2.HeartbeatRequest(host_id="h1", metrics=METRICS))
    # Its own host id, with absurd metrics or a bad address: refused as invalid.
    refused(coordinator.stub("h1").Heartbeat, grpc.StatusCode.INVALID_ARGUMENT,
            coordinator_pb2.HeartbeatRequest(host_id="h1", metrics=agent_pb2.HostMetrics(
                disk_free_bytes=2**60, disk_total_bytes=2**60, cpu_count=8,
                memory_total_bytes=16 * GIB)))
    refused(coordinator.stub("h1").Register, grpc.StatusCode.INVALID_ARGUMENT,
            coordinator_pb2.RegisterRequest(host_id="h1", address="nowhere", metrics=METRICS))
    # h1 itself, moving while it is alive: refused too.
    coordinator.stub("h1").Heartbeat(
        coordinator_pb2.HeartbeatRequest(host_id="h1", metrics=METRICS), timeout=5)
    refused(coordinator.stub("h1").Register, grpc.StatusCode.INVALID_ARGUMENT,
            coordinator_pb2.RegisterRequest(host_id="h1", address="127.0.0.1:7999",
                                            metrics=METRICS))
    assert state(coordinator) == before


def test_each_role_may_do_what_its_certificate_allows_and_is_audited(
        coordinator: Running) -> None:
    for port, host in enumerate(AGENTS, start=7101):
        register(coordinator, host, host, port)
    create = coordinator_pb2.CreateServiceRequest(name="kv1", kind="kv", replicas=2)
    for role in ("client", "operator"):
        details = refused(coordinator.stub(NAMES[role]).CreateService,
                          grpc.StatusCode.PERMISSION_DENIED, create)
        assert f"{role} '{NAMES[role]}'" in details and "admin" in details
    assert state(coordinator)[1] == []
    coordinator.stub(NAMES["admin"]).CreateService(create, timeout=5)
    before = state(coordinator)
    assert [s[0] for s in before[1]] == ["kv1"]  # type: ignore[index]
    # A client may not switch over, drain or read the cluster's status.
    client = coordinator.stub(NAMES["client"])
    refused(client.Switchover, grpc.StatusCode.PERMISSION_DENIED,
            coordinator_pb2.SwitchoverRequest(service="kv1"))
    refused(client.DrainHost, grpc.StatusCode.PERMISSION_DENIED,
            coordinator_pb2.DrainHostRequest(host_id="h1", draining=True))
    refused(client.GetClusterStatus, grpc.StatusCode.PERMISSION_DENIED,
            coordinator_pb2.ClusterStatusRequest())
    # An operator may not delete or patch; the patch stream is refused before anything runs.
    operator = coordinator.stub(NAMES["operator"])
    refused(operator.DeleteService, grpc.StatusCode.PERMISSION_DENIED,
            coordinator_pb2.DeleteServiceRequest(name="kv1"))
    with pytest.raises(grpc.RpcError) as patch:
        list(operator.Patch(coordinator_pb2.PatchRequest(host_ids=["h2"]), timeout=5))
    assert patch.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # An operator's switchover reaches the coordinator (and is refused for what it asks:
    # no duplica has reported in sync); its drain is done.
    refused(operator.Switchover, grpc.StatusCode.INVALID_ARGUMENT,
            coordinator_pb2.SwitchoverRequest(service="kv1", to_host_id="../../x"))
    operator.DrainHost(coordinator_pb2.DrainHostRequest(host_id="h3", draining=True), timeout=5)
    operator.DrainHost(coordinator_pb2.DrainHostRequest(host_id="h3", draining=False),
                       timeout=5)
    # An admin's patch with a shell string is refused by the name rule.
    with pytest.raises(grpc.RpcError) as shell:
        list(coordinator.stub(NAMES["admin"]).Patch(coordinator_pb2.PatchRequest(
            host_ids=["h2"], command="head /etc/shadow"), timeout=5))
    assert shell.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert state(coordinator) == before
    coordinator.stub(NAMES["admin"]).DeleteService(
        coordinator_pb2.DeleteServiceRequest(name="kv1"), timeout=5)
    assert state(coordinator)[1] == []

    audits = [msgpack.unpackb(e.details, raw=False) for e in coordinator.history()
              if e.kind == "audit"]
    seen = [(a["caller"], a["rpc"], a["outcome"].split(":")[0]) for a in audits]
    assert seen == [
        ("admin 'root-1'", "create", "ok"),
        ("operator 'alice'", "switchover", "refused"),
        ("operator 'alice'", "drain", "ok"),
        ("operator 'alice'", "undrain", "ok"),
        ("admin 'root-1'", "patch", "refused"),
        ("admin 'root-1'", "delete", "ok"),
    ], seen
    assert audits[0]["target"] == "kv1 (kv)"
    assert "patch command name" in audits[4]["outcome"]


def test_a_caller_without_a_certificate_is_refused_at_the_handshake(
        coordinator: Running) -> None:
    channel = grpc.insecure_channel(coordinator.address)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_an_admin_certificate_of_another_ca_is_refused_at_the_handshake(
        coordinator: Running, tmp_path: Path) -> None:
    other = tmp_path / "other-pki"
    subprocess.run([sys.executable, "-m", "failover.cli", "certs", "init", str(other)],
                   check=True, capture_output=True, timeout=60)
    issue(other, "admin", NAMES["admin"])
    stub = Running(coordinator.address, other, coordinator.data_dir, coordinator.proc).stub(
        NAMES["admin"])
    with pytest.raises(grpc.RpcError) as caught:
        stub.DeleteService(coordinator_pb2.DeleteServiceRequest(name="kv1"), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not any(e.kind == "audit" for e in coordinator.history())


def test_the_data_dir_is_private(coordinator: Running) -> None:
    assert stat.S_IMODE(coordinator.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(coordinator.data_dir.parent.stat().st_mode) == 0o700


def test_failoverctl_with_certificates(coordinator: Running, pki: Path) -> None:
    def ctl(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FAILOVER_TLS_CA": str(pki / "ca.crt"),
               "FAILOVER_TLS_CERT": str(pki / f"{name}.crt"),
               "FAILOVER_TLS_KEY": str(pki / f"{name}.key")}
        return subprocess.run([sys.executable, "-m", "failover.cli", "--coordinator",
                               coordinator.address, *args], capture_output=True, text=True,
                              timeout=60, env=env)

    ok = ctl(NAMES["operator"], "--format", "json", "status")
    assert ok.returncode == 0, ok.stderr
    denied = ctl(NAMES["operator"], "delete", "kv1", "--yes")
    assert denied.returncode == 2
    assert denied.stderr.count("\n") == 1 and "permission denied" in denied.stderr
    assert "operator 'alice'" in denied.stderr
    plain = subprocess.run([sys.executable, "-m", "failover.cli", "--coordinator",
                            coordinator.address, "status", "--timeout-ms", "1500"],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1
    bad = ctl("nobody", "status")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nobody.crt" in bad.stderr


async def test_the_client_follows_routes_over_tls_and_raises_permission_denied(
        coordinator: Running, pki: Path) -> None:
    # An agent's certificate may not watch routes: the client says so, not "unavailable".
    async with Client(coordinator=coordinator.address, deadline_ms=3000,
                      tls=tls_files(pki, "h1")) as client:
        with pytest.raises(PermissionDenied, match="agent 'h1'"):
            await client.call("kv1", {"op": "get", "key": "k"})
    # A client's certificate watches routes over TLS: the table arrives (an empty one here).
    async with Client(coordinator=coordinator.address, deadline_ms=1500,
                      tls=tls_files(pki, NAMES["client"])) as client:
        with pytest.raises(Unavailable, match="no route"):
            await client.call("kv1", {"op": "get", "key": "k"})
        assert client._denied is None


def test_the_daemon_refuses_bad_tls_files_and_clear_text_beyond_loopback(
        tmp_path: Path, pki: Path) -> None:
    def start(*args: str, listen: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(coordinator_command(
            tmp_path / "c", listen or f"127.0.0.1:{free_port()}", *args),
            capture_output=True, text=True, timeout=60)

    name = NAMES["coordinator"]
    missing = start("--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / f"{name}.crt"))
    assert missing.returncode == 2 and "--tls-key missing" in missing.stderr
    wrong_key = start("--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / f"{name}.crt"),
                      "--tls-key", str(pki / "h1.key"))
    assert wrong_key.returncode == 2 and wrong_key.stderr.count("\n") == 1
    assert "h1.key" in wrong_key.stderr
    clear = start(listen=f"0.0.0.0:{free_port()}")
    assert clear.returncode == 2 and "--insecure" in clear.stderr
    assert clear.stderr.count("\n") == 1
    assert not (tmp_path / "c").exists()
    helped = subprocess.run([*coordinator_command(tmp_path / "c", "127.0.0.1:1"), "--help"],
                            capture_output=True, text=True, timeout=60)
    # The etcd store is built (issue 15): the help offers it, with its leadership flags.
    assert "etcd://HOST" in helped.stdout and "--leader-ttl-ms" in helped.stdout
    assert "--tls-ca" in helped.stdout and "--insecure" in helped.stdout
