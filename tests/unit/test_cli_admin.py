"""`failoverctl` operator commands against a fake Coordinator served in-process."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import msgpack
import pytest

from failover.cli import admin, output
from failover.cli.main import main
from failover.errors import RequestRejected, Unavailable
from failover.v1 import agent_pb2, common_pb2, coordinator_pb2, coordinator_pb2_grpc

HOST_KEYS = ["host_id", "address", "zone", "draining", "alive", "version", "started_at",
             "cpu_percent", "memory_percent", "disk_free_bytes", "disk_total_bytes",
             "memory_total_bytes", "cpu_count", "heartbeat_age_ms", "dead",
             "incarnation", "exited_incarnation"]
SERVICE_KEYS = ["name", "kind", "mode", "epoch", "desired_replicas", "placement", "unplaced",
                "replicas"]
REPLICA_KEYS = ["host_id", "role", "durable_index", "commit_index", "applied_index",
                "lag_entries", "in_sync", "promotable"]


def _service(name: str = "kv", kind: str = "kv") -> coordinator_pb2.ServiceStatus:
    return coordinator_pb2.ServiceStatus(
        name=name, kind=kind, mode=common_pb2.REPLICATION_MODE_SYNC, epoch=7,
        desired_replicas=2,
        replicas=[
            coordinator_pb2.ReplicaView(
                host_id="host1", role=common_pb2.ROLE_PRIMARY,
                indexes=common_pb2.ReplicaIndexes(durable_index=120, commit_index=118,
                                                  applied_index=117),
                lag_entries=0, in_sync=True),
            coordinator_pb2.ReplicaView(
                host_id="host2", role=common_pb2.ROLE_DUPLICA,
                indexes=common_pb2.ReplicaIndexes(durable_index=110, commit_index=110,
                                                  applied_index=109),
                lag_entries=10, in_sync=False),
        ])


CLUSTER = coordinator_pb2.ClusterStatus(
    hosts=[
        coordinator_pb2.HostStatus(
            host_id="host1", address="127.0.0.1:7101", zone="a", draining=False, alive=True,
            version="0.1.0", started_at=1_700_000_000.5,
            metrics=agent_pb2.HostMetrics(cpu_percent=12.5, memory_percent=40.25,
                                          disk_free_bytes=5 * 1024**3),
            heartbeat_age_ms=42, incarnation=3, exited_incarnation=2),
        coordinator_pb2.HostStatus(
            host_id="host2", address="127.0.0.1:7102", zone="b", draining=True, alive=False,
            version="0.1.0", started_at=1_700_000_001.0,
            metrics=agent_pb2.HostMetrics(cpu_percent=1.0, memory_percent=2.0,
                                          disk_free_bytes=512),
            heartbeat_age_ms=1_500),
    ],
    services=[_service(), _service("ledger", "bank")],
)

FAILOVER_DETAILS = {"detection_ms": 412, "promotion_ms": 35, "unavailability_ms": 460,
                    "old_primary": "host1", "new_primary": "host2", "epoch": 8,
                    "truncated_entries": 0}

HISTORY = coordinator_pb2.HistoryReply(events=[
    coordinator_pb2.HistoryEvent(seq=1, at=1_700_000_100.25, service="kv", kind="suspicion",
                                 message="host1 missed heartbeats"),
    coordinator_pb2.HistoryEvent(seq=2, at=1_700_000_100.75, service="kv", kind="failover",
                                 message="promoted host2",
                                 details=msgpack.packb(FAILOVER_DETAILS)),
])


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Answers with canned data, records every request, and fails on demand."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.failures: dict[str, tuple[grpc.StatusCode, str]] = {}

    def _record(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        self.requests.append((method, request))
        if method in self.failures:
            code, details = self.failures[method]
            context.abort(code, details)

    def GetClusterStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("GetClusterStatus", request, context)
        return CLUSTER

    def CreateService(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("CreateService", request, context)
        service = _service(request.name, request.kind)
        service.mode = request.mode
        service.desired_replicas = request.replicas
        return coordinator_pb2.CreateServiceReply(service=service)

    def DeleteService(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("DeleteService", request, context)
        return coordinator_pb2.DeleteServiceReply()

    def Switchover(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("Switchover", request, context)
        return coordinator_pb2.SwitchoverReply(
            epoch=8, primary_host_id=request.to_host_id or "host2", stall_ms=14)

    def GetHistory(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("GetHistory", request, context)
        return HISTORY

    def DrainHost(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("DrainHost", request, context)
        host = coordinator_pb2.HostStatus()
        host.CopyFrom(next(h for h in CLUSTER.hosts if h.host_id == request.host_id))
        host.draining = request.draining
        return coordinator_pb2.DrainHostReply(host=host)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeCoordinator, str]]:
    fake = FakeCoordinator()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield fake, f"127.0.0.1:{port}"
    grpc_server.stop(0)


@pytest.fixture
def coordinator(server: tuple[FakeCoordinator, str]) -> tuple[FakeCoordinator, str]:
    fake, address = server
    fake.requests.clear()
    fake.failures.clear()
    return fake, address


@pytest.fixture
def dead_address() -> str:
    """A 127.0.0.1 port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs failoverctl; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out, err


def assert_one_error_line(err: str, prefix: str = "failoverctl: error: ") -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


# --- status --------------------------------------------------------------------------------


def test_status_table_shows_hosts_services_and_replicas(capsys, coordinator) -> None:
    fake, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "status")
    assert (code, err) == (0, "")
    assert [m for m, _ in fake.requests] == ["GetClusterStatus", "GetHistory"]
    for text in ("host1", "127.0.0.1:7102", "5.0 GiB", "512 B", "12.5", "40.2", "1,500",
                 "ledger", "bank", "primary", "duplica", "120", "118", "117", "sync",
                 "3 (2 exited)"):
        assert text in out, text
    assert out.index("Hosts") < out.index("Services")
    # Issue 17 item 7: the last event of each service (kv's newest is the failover).
    last = out[out.index("Last event per service"):]
    assert "kv" in last and "failover: promoted host2" in last
    assert "ledger  - (none among the newest events)" in last


def test_status_stands_when_history_cannot_be_read(capsys, coordinator) -> None:
    fake, address = coordinator
    fake.failures["GetHistory"] = (grpc.StatusCode.INTERNAL, "boom")
    code, out, err = run(capsys, "--coordinator", address, "status")
    assert (code, err) == (0, "")
    assert "ledger" in out and "Last event per service" not in out


def test_format_is_taken_after_the_subcommand_too(capsys, coordinator) -> None:
    _, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "status", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["services"][0]["name"] == "kv"


def test_status_json_is_the_documented_contract(capsys, coordinator) -> None:
    _, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "--format", "json", "status")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert list(document) == ["hosts", "services", "coordinators"]
    assert [list(h) for h in document["hosts"]] == [HOST_KEYS, HOST_KEYS]
    assert [list(s) for s in document["services"]] == [SERVICE_KEYS, SERVICE_KEYS]
    assert all(list(r) == REPLICA_KEYS
               for s in document["services"] for r in s["replicas"])
    assert document["hosts"][0] == {
        "host_id": "host1", "address": "127.0.0.1:7101", "zone": "a", "draining": False,
        "alive": True, "version": "0.1.0", "started_at": 1_700_000_000.5,
        "cpu_percent": 12.5, "memory_percent": 40.25, "disk_free_bytes": 5 * 1024**3,
        "disk_total_bytes": 0, "memory_total_bytes": 0, "cpu_count": 0,
        "heartbeat_age_ms": 42, "dead": False, "incarnation": 3, "exited_incarnation": 2,
    }
    kv = document["services"][0]
    assert {k: kv[k] for k in SERVICE_KEYS[:-1]} == {
        "name": "kv", "kind": "kv", "mode": "sync", "epoch": 7, "desired_replicas": 2,
        "placement": "", "unplaced": ""}
    assert kv["replicas"][1] == {
        "host_id": "host2", "role": "duplica", "durable_index": 110, "commit_index": 110,
        "applied_index": 109, "lag_entries": 10, "in_sync": False,
        "promotable": False}
    assert kv["replicas"][0]["role"] == "primary"


# --- create, delete, switchover ------------------------------------------------------------


def test_create_sends_the_request_and_prints_the_service(capsys, coordinator) -> None:
    fake, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "create", "orders", "--kind",
                         "bank", "--replicas", "3", "--mode", "async")
    assert (code, err) == (0, "")
    [(method, request)] = fake.requests
    assert method == "CreateService"
    assert (request.name, request.kind, request.replicas, request.mode) == (
        "orders", "bank", 3, common_pb2.REPLICATION_MODE_ASYNC)
    assert "created service orders" in out and "async" in out and "host1" in out

    code, out, _ = run(capsys, "--coordinator", address, "--format", "json", "create",
                       "cache", "--kind", "kv")
    assert code == 0
    request = fake.requests[-1][1]
    assert (request.replicas, request.mode) == (2, common_pb2.REPLICATION_MODE_SYNC)
    created = json.loads(out)
    assert list(created) == SERVICE_KEYS
    assert (created["name"], created["mode"], created["desired_replicas"]) == ("cache", "sync", 2)


def test_delete_with_yes(capsys, coordinator) -> None:
    fake, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "delete", "kv", "--yes")
    assert (code, err) == (0, "")
    assert [(m, r.name) for m, r in fake.requests] == [("DeleteService", "kv")]
    assert out.strip() == "deleted service kv"


def test_delete_without_yes_on_a_pipe_is_refused(capsys, coordinator) -> None:
    fake, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "delete", "kv")
    assert code == 2
    assert "--yes" in assert_one_error_line(err)
    assert fake.requests == []


def test_delete_asks_on_a_terminal(capsys, coordinator, monkeypatch) -> None:
    fake, address = coordinator
    monkeypatch.setattr(admin, "_stdin_is_interactive", lambda: True)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code, _, err = run(capsys, "--coordinator", address, "delete", "kv")
    assert code == 1 and "aborted" in err and fake.requests == []
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    code, out, _ = run(capsys, "--coordinator", address, "delete", "kv")
    assert code == 0 and [m for m, _ in fake.requests] == ["DeleteService"]


def test_switchover_prints_epoch_primary_and_stall(capsys, coordinator) -> None:
    fake, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "switchover", "kv", "--to", "host3")
    assert (code, err) == (0, "")
    [(method, request)] = fake.requests
    assert (method, request.service, request.to_host_id) == ("Switchover", "kv", "host3")
    assert "host3" in out and "epoch 8" in out and "14 ms" in out

    code, out, _ = run(capsys, "--coordinator", address, "--format", "json", "switchover", "kv")
    assert fake.requests[-1][1].to_host_id == ""
    assert json.loads(out) == {"service": "kv", "epoch": 8, "primary_host_id": "host2",
                               "stall_ms": 14}


# --- history -------------------------------------------------------------------------------


def test_history_table_shows_failover_details_as_columns(capsys, coordinator) -> None:
    fake, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "history", "kv", "--limit", "5")
    assert (code, err) == (0, "")
    [(method, request)] = fake.requests
    assert (method, request.service, request.limit) == ("GetHistory", "kv", 5)
    for text in ("suspicion", "host1 missed heartbeats", "failover", "promoted host2",
                 "detection_ms", "unavailability_ms", "truncated_entries", "412", "460"):
        assert text in out, text


def test_history_json_decodes_details(capsys, coordinator) -> None:
    fake, address = coordinator
    code, out, _ = run(capsys, "--coordinator", address, "--format", "json", "history")
    assert code == 0
    assert fake.requests[-1][1].service == ""
    events = json.loads(out)
    assert [list(e) for e in events] == [["seq", "at", "service", "kind", "message",
                                          "details"]] * 2
    assert events[0]["details"] == {}
    assert events[1]["details"] == FAILOVER_DETAILS
    assert events[1]["at"] == 1_700_000_100.75


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["create", "kv"],                                  # --kind missing
    ["create", "kv", "--kind", "kv", "--replicas", "0"],
    ["create", "kv", "--kind", "kv", "--mode", "eventual"],
    ["switchover"],                                    # SERVICE missing
    ["history", "--limit", "-1"],
    ["status", "--timeout-ms", "0"],
    ["status", "--bogus"],
])
def test_bad_arguments_exit_2_with_one_line(capsys, coordinator, argv) -> None:
    fake, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, *argv)
    assert code == 2
    assert_one_error_line(err)
    assert fake.requests == []


def test_bad_coordinator_address_exits_2(capsys) -> None:
    code, _, err = run(capsys, "--coordinator", "no-port", "status")
    assert code == 2
    assert "--coordinator" in assert_one_error_line(err)


@pytest.mark.parametrize("status_code", [grpc.StatusCode.INVALID_ARGUMENT,
                                         grpc.StatusCode.NOT_FOUND,
                                         grpc.StatusCode.FAILED_PRECONDITION,
                                         grpc.StatusCode.ALREADY_EXISTS,
                                         grpc.StatusCode.PERMISSION_DENIED])
def test_refusal_by_the_coordinator_exits_2_with_its_message(capsys, coordinator,
                                                             status_code) -> None:
    fake, address = coordinator
    fake.failures["CreateService"] = (status_code, "service 'kv' cannot be created:\nreason")
    code, out, err = run(capsys, "--coordinator", address, "create", "kv", "--kind", "kv")
    assert code == 2 and out == ""
    line = assert_one_error_line(err)
    assert "service 'kv' cannot be created: reason" in line
    assert status_code.name in line


def test_a_call_the_certificate_does_not_allow_raises_permission_denied_in_call(
        capsys, fake_client) -> None:
    from failover.errors import PermissionDenied

    fake_client.outcome = PermissionDenied.from_status(
        "permission denied: agent 'h1' may not execute: it needs role client or operator")
    code, out, err = run(capsys, "call", "kv", '{"op": "get", "key": "k"}')
    assert code == 2 and out == ""
    assert "agent 'h1' may not execute" in assert_one_error_line(err)


def test_bad_tls_files_exit_2_naming_the_file(capsys, tmp_path) -> None:
    missing = tmp_path / "nobody.crt"
    code, out, err = run(capsys, "--tls-ca", str(tmp_path / "ca.crt"), "--tls-cert",
                         str(missing), "--tls-key", str(tmp_path / "nobody.key"), "status")
    assert code == 2 and out == ""
    assert "ca.crt" in assert_one_error_line(err)
    code, _, err = run(capsys, "--tls-ca", str(tmp_path / "ca.crt"), "status")
    assert code == 2 and "--tls-cert, --tls-key missing" in assert_one_error_line(err)


def test_other_server_errors_exit_1_with_one_line(capsys, coordinator) -> None:
    fake, address = coordinator
    fake.failures["GetClusterStatus"] = (grpc.StatusCode.INTERNAL, "store is broken")
    code, _, err = run(capsys, "--coordinator", address, "status")
    assert code == 1
    assert "store is broken" in assert_one_error_line(err, "failoverctl: ")


def test_unreachable_coordinators_exit_1_naming_every_address(capsys, dead_address) -> None:
    other = "127.0.0.1:1"
    code, out, err = run(capsys, "--coordinator", f"{dead_address},{other}", "status")
    assert code == 1 and out == ""
    line = assert_one_error_line(err, "failoverctl: ")
    assert dead_address in line and other in line


def test_the_next_coordinator_answers_when_the_first_is_unavailable(capsys, coordinator,
                                                                    dead_address) -> None:
    fake, address = coordinator
    code, out, err = run(capsys, "--coordinator", f"{dead_address},{address}", "--format",
                         "json", "switchover", "kv")
    assert (code, err) == (0, "")
    assert [m for m, _ in fake.requests] == ["Switchover"]
    assert json.loads(out)["primary_host_id"] == "host2"


def test_unavailable_from_the_server_moves_to_the_next(capsys, coordinator) -> None:
    fake, address = coordinator
    fake.failures["GetHistory"] = (grpc.StatusCode.UNAVAILABLE, "not the leader")
    code, _, err = run(capsys, "--coordinator", f"{address},{address}", "history")
    assert code == 1
    assert len(fake.requests) == 2
    assert address in assert_one_error_line(err, "failoverctl: ")


# --- call ----------------------------------------------------------------------------------


class FakeClient:
    """Stands in for failover.client.Client; records how it was made and called."""

    made: list[dict[str, Any]] = []
    calls: list[tuple[str, dict[str, Any]]] = []
    outcome: Any = None

    def __init__(self, coordinator: Any = None, **kwargs: Any) -> None:
        FakeClient.made.append({"coordinator": coordinator, **kwargs})

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def call(self, service: str, request: dict[str, Any]) -> dict[str, Any]:
        FakeClient.calls.append((service, request))
        if isinstance(FakeClient.outcome, Exception):
            raise FakeClient.outcome
        return FakeClient.outcome


@pytest.fixture
def fake_client(monkeypatch) -> type[FakeClient]:
    FakeClient.made, FakeClient.calls, FakeClient.outcome = [], [], {"value": "v1"}
    monkeypatch.setattr(admin, "Client", FakeClient)
    return FakeClient


def test_call_runs_the_request_through_the_client(capsys, fake_client) -> None:
    fake_client.outcome = {"value": "v1", "raw": b"\x01\x02"}
    code, out, err = run(capsys, "--coordinator", "127.0.0.1:7000,127.0.0.1:7001", "call",
                         "kv", '{"op": "get", "key": "user:1"}', "--timeout-ms", "1500")
    assert (code, err) == (0, "")
    assert fake_client.made == [{"coordinator": ["127.0.0.1:7000", "127.0.0.1:7001"],
                                 "deadline_ms": 1500, "tls": None}]
    assert fake_client.calls == [("kv", {"op": "get", "key": "user:1"})]
    assert json.loads(out) == {"value": "v1", "raw": "0102"}


@pytest.mark.parametrize("request_json", ['{"op": "get"', "not json", "[1, 2]", '"op"'])
def test_call_with_bad_json_exits_2(capsys, fake_client, request_json) -> None:
    code, out, err = run(capsys, "call", "kv", request_json)
    assert code == 2 and out == ""
    assert "JSON" in assert_one_error_line(err)
    assert fake_client.calls == []


def test_call_failures_are_one_line(capsys, fake_client) -> None:
    fake_client.outcome = RequestRejected("insufficient funds:\nalice has 5")
    code, _, err = run(capsys, "call", "bank", '{"op": "transfer"}')
    assert code == 1
    assert "insufficient funds: alice has 5" in assert_one_error_line(err, "failoverctl: ")
    fake_client.outcome = Unavailable("kv: no answer within 5000 ms")
    code, _, err = run(capsys, "call", "kv", "{}")
    assert code == 1
    assert "no answer" in assert_one_error_line(err, "failoverctl: ")


# --- hosts, drain, undrain -------------------------------------------------------------------


def test_hosts_lists_resources_and_the_replicas_each_holds(capsys, coordinator) -> None:
    _, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "--format", "json", "hosts")
    assert (code, err) == (0, "")
    hosts = json.loads(out)
    assert [list(h) for h in hosts] == [HOST_KEYS + ["replicas", "services"]] * 2
    assert hosts[0]["replicas"] == {"primary": 2, "duplica": 0, "building": 0}
    assert hosts[1]["replicas"] == {"primary": 0, "duplica": 2, "building": 0}
    assert hosts[0]["services"] == [{"service": "kv", "role": "primary"},
                                    {"service": "ledger", "role": "primary"}]
    code, out, err = run(capsys, "--coordinator", address, "hosts")
    assert code == 0
    for text in ("host1", "host2", "suspected", "building"):
        assert text in out, text


def test_drain_and_undrain_send_the_flag(capsys, coordinator) -> None:
    fake, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "drain", "host1")
    assert (code, err) == (0, "")
    assert "host1 is draining" in out
    assert fake.requests[-1][1].host_id == "host1" and fake.requests[-1][1].draining
    code, out, _ = run(capsys, "--coordinator", address, "--format", "json", "undrain", "host1")
    assert code == 0 and json.loads(out)["draining"] is False
    assert not fake.requests[-1][1].draining


def test_drain_wait_fails_in_one_line_while_replicas_remain(capsys, coordinator) -> None:
    _, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "drain", "host2", "--wait", "1")
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "host2 still holds kv (duplica), ledger (duplica) after 1 s" in err


def test_drain_refusals_are_one_line_exit_2(capsys, coordinator) -> None:
    fake, address = coordinator
    fake.failures["DrainHost"] = (grpc.StatusCode.INVALID_ARGUMENT, "no host 'nope'")
    code, _, err = run(capsys, "--coordinator", address, "drain", "nope")
    assert code == 2 and "no host 'nope'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "--coordinator", address, "drain", " ")
    assert code == 2 and "HOST is empty" in err


def test_wait_returns_once_ready_and_names_what_is_missing_at_its_deadline(
        capsys, coordinator) -> None:
    _, address = coordinator
    code, out, err = run(capsys, "--coordinator", address, "wait", "--hosts", "1")
    assert (code, out.strip()) == (0, "ready"), err
    code, out, err = run(capsys, "--coordinator", address, "wait", "--service", "kv",
                         "--timeout-ms", "300")
    assert code == 1
    assert "not ready after 300 ms: 1 left: host2 (duplica)" in assert_one_error_line(
        err, "failoverctl: ")
    code, _, err = run(capsys, "--coordinator", address, "wait", "--service", "nope")
    assert code == 2 and "no service 'nope'" in err
    code, _, err = run(capsys, "--coordinator", address, "wait")
    assert code == 2 and "--hosts" in err


def test_a_drain_that_must_finish_and_cannot_exits_2_at_once(capsys, coordinator) -> None:
    fake, address = coordinator
    fake.failures["DrainHost"] = (grpc.StatusCode.FAILED_PRECONDITION,
                                  "draining host1 cannot finish, so it was not started: ...")
    code, _, err = run(capsys, "--coordinator", address, "drain", "host1", "--wait", "60")
    assert code == 2 and "cannot finish" in assert_one_error_line(err)
    assert fake.requests[-1][1].must_finish


def test_progress_without_a_terminal_is_plain_lines_and_none_for_json(capsys) -> None:
    from types import SimpleNamespace

    with output.CountdownView("draining host1", 2, "replicas", enabled=True) as view:
        view.update(2, "kv (primary), bank (duplica)")
        view.update(2, "kv (primary), bank (duplica)")  # unchanged: no line
        view.update(0, "")
    with output.MigrationProgressView(enabled=True) as migration:
        for phase in ("setup", "round", "round", "done"):
            migration.update(SimpleNamespace(phase=phase, message=f"{phase} msg", round=1,
                                             dirty_pages=0, dirty_pages_s=0.0, throttle_ms=0,
                                             raw_bytes=0, state_bytes=0))
    with output.CountdownView("quiet", 1, "hosts", enabled=False) as quiet:
        quiet.update(1, "x")
        quiet.print("y")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["draining host1: 2 replicas left: kv (primary), bank (duplica)",
                     "draining host1: 0 replicas left",
                     "setup: setup msg", "round: round msg", "done: done msg"]
