"""Issue 17 without processes: the collectors, the history counting, the JSON log format,
the metrics endpoint's HTTP handling and the flags' validation."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from failover.agent.config import AgentConfig
from failover.agent.main import main as agent_main
from failover.coordinator.main import main as coordinator_main
from failover.core.coordinator.model import HostInfo, HostLive, ServiceInfo
from failover.errors import ConfigError, NotPrimaryError
from failover.observe import health, logs
from failover.observe.agent_metrics import OTHER_SERVICE, AgentMetrics
from failover.observe.coordinator_metrics import CoordinatorMetrics
from failover.observe.endpoint import MetricsEndpoint, check_metrics_listen


def _samples(registry: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


# --- agent ---------------------------------------------------------------------------------


class FakeCore:
    def __init__(self, serving: bool, broken: str = "") -> None:
        self.serving = serving
        self.broken = broken
        self.primary = SimpleNamespace(peers={"h2": SimpleNamespace(match_index=7)})

    def check_primary(self, epoch_seen: int) -> None:
        if not self.serving:
            raise NotPrimaryError("kv1")


class FakeReplica:
    def __init__(self, service: str, role: str, tmp: Path, **status: Any) -> None:
        self.service, self.role = service, role
        self.core = FakeCore(role == "primary")
        snaps = tmp / service
        snaps.mkdir()
        (snaps / "00000000000000000005.snap").write_bytes(b"x" * 123)
        self.snapshots = SimpleNamespace(paths=lambda: sorted(snaps.iterdir()))
        self._status = {"role": role, "epoch": 3, "durable_index": 10, "commit_index": 9,
                        "applied_index": 8, "lag_entries": 1, "broken": False,
                        "in_sync": ["h2"], "in_sync_lag_ms": {"h2": 250}, **status}

    def status(self) -> dict[str, Any]:
        return self._status


def _agent(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(host_id="h1", replicas={
        "kv1": FakeReplica("kv1", "primary", tmp_path),
        "kv2": FakeReplica("kv2", "duplica", tmp_path)})


def test_agent_collector_reads_the_replicas_at_scrape(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    metrics = AgentMetrics(agent)
    s = _samples(metrics.registry)
    assert _value(s, "failover_replica_role", service="kv1", role="primary") == 1
    assert _value(s, "failover_replica_role", service="kv1", role="duplica") == 0
    assert _value(s, "failover_epoch", service="kv2", host="h1", role="duplica") == 3
    assert _value(s, "failover_durable_index", service="kv1") == 10
    assert _value(s, "failover_commit_index", service="kv1") == 9
    assert _value(s, "failover_applied_index", service="kv1") == 8
    assert _value(s, "failover_replication_lag_entries", service="kv2") == 1
    assert _value(s, "failover_replication_lag_entries", service="kv1") == 3  # 10 - 7
    assert _value(s, "failover_replication_lag_seconds", service="kv1", duplica="h2") == 0.25
    assert _value(s, "failover_in_sync_members", service="kv1") == 1
    assert _value(s, "failover_snapshot_bytes", service="kv1") == 123
    assert _value(s, "failover_build_info", host="h1") == 1
    # The state is read at every scrape, not kept.
    agent.replicas["kv1"]._status["durable_index"] = 11
    assert _value(_samples(metrics.registry), "failover_durable_index", service="kv1") == 11


def test_agent_counters_and_bounded_series(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    metrics = AgentMetrics(agent)
    metrics.request_done("kv1", "execute", "ok", 0.002)
    metrics.request_done("kv1", "execute", "ok", 0.004)
    metrics.request_done("kv1", "query", "unavailable", 0.001)
    for n in range(50):  # names from the wire that name no replica here: one series
        metrics.request_done(f"nope{n}", "execute", "failed_precondition", 0.001)
    metrics.fsync_done(0.003)
    metrics.shipped_entries("kv1", 5)
    metrics.migrated_bytes("kv1", "out", 4096)
    metrics.migration_paused("kv1", 0.012)
    s = _samples(metrics.registry)
    assert _value(s, "failover_requests_total", service="kv1", op_kind="execute",
                  outcome="ok") == 2
    assert _value(s, "failover_requests_total", service="kv1", outcome="unavailable") == 1
    assert _value(s, "failover_requests_total", service=OTHER_SERVICE) == 50
    assert _value(s, "failover_request_duration_seconds_count", service="kv1",
                  op_kind="execute") == 2
    assert _value(s, "failover_request_duration_seconds_bucket", service="kv1",
                  op_kind="execute", le="0.0025") == 1
    assert _value(s, "failover_request_duration_seconds_bucket", service="kv1",
                  op_kind="execute", le="0.005") == 2
    assert _value(s, "failover_request_duration_seconds_bucket", service="kv1",
                  op_kind="execute", le="+Inf") == 2
    assert _value(s, "failover_request_duration_seconds_sum", service="kv1",
                  op_kind="execute") == pytest.approx(0.006)
    assert _value(s, "failover_request_duration_seconds_count", service="kv1",
                  op_kind="query") == 1
    assert _value(s, "failover_wal_fsync_duration_seconds_count") == 1
    assert _value(s, "failover_shipped_entries_total", service="kv1") == 5
    assert _value(s, "failover_migration_bytes_total", direction="out") == 4096
    assert _value(s, "failover_migration_downtime_seconds", service="kv1") == 0.012
    # A service gone from the host takes its request series with it at the next scrape.
    del agent.replicas["kv1"]
    generate_latest(metrics.registry)
    s = _samples(metrics.registry)
    assert _value(s, "failover_requests_total", service="kv1") == 0
    assert _value(s, "failover_shipped_entries_total", service="kv1") == 0
    assert _value(s, "failover_requests_total", service=OTHER_SERVICE) == 50


def test_agent_health_answers(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    assert health.agent_answer(agent, "kv1", "primary")
    assert not health.agent_answer(agent, "kv2", "primary")
    assert health.agent_answer(agent, "kv2", "replica")
    assert not health.agent_answer(agent, "kv9", "replica")
    with pytest.raises(Exception, match="name"):
        health.agent_answer(agent, "../x", "primary")
    agent.replicas["kv2"].core.broken = "unreadable log"
    assert not health.agent_answer(agent, "kv2", "replica")


# --- coordinator ---------------------------------------------------------------------------


def _coordinator(leading: bool = True) -> SimpleNamespace:
    core = SimpleNamespace(
        hosts={h: HostInfo(h, f"127.0.0.1:{n}", draining=h == "h2")
               for n, h in enumerate(("h1", "h2", "h3", "h4"), 1)},
        live={"h1": HostLive(0), "h2": HostLive(0), "h3": HostLive(0, alive=False),
              "h4": HostLive(0, alive=False, dead=True)},
        services={"kv1": ServiceInfo("kv1", "kv", "sync", 2, 2, "h1",
                                     {"h1": "primary", "h2": "building"})},
        patching={"h9"})
    return SimpleNamespace(core=core, leading=leading, acting=lambda: leading)


def test_coordinator_collector_and_history_counting(caplog: pytest.LogCaptureFixture) -> None:
    coordinator = _coordinator()
    metrics = CoordinatorMetrics(coordinator)
    s = _samples(metrics.registry)
    assert _value(s, "failover_is_leader") == 1
    assert [_value(s, "failover_hosts", state=x) for x in
            ("alive", "draining", "suspected", "dead")] == [1, 1, 1, 1]
    assert _value(s, "failover_services") == 1
    assert _value(s, "failover_rebuilds_in_progress") == 1
    assert _value(s, "failover_failovers_total", kind="crash") == 0
    caplog.set_level(logging.INFO, "failover.coordinator.history")
    metrics.committed([
        ("kv1", "failover", "kv1: h1 failed; h2 promoted at epoch 3",
         {"old_primary": "h1", "new_primary": "h2", "epoch": 3, "promotion_ms": 300}),
        ("kv2", "switchover", "moved", {"old_primary": "h1", "new_primary": "h2"}),
        ("kv3", "switchover", "moved", {"old_primary": "h9", "new_primary": "h2"}),
        ("kv4", "suspicion", "still heard", {"old_primary": "h1", "hearing": ["h2"]}),
    ], 0.004, now_ms=10_000)
    metrics.routes_pushed(now_ms=10_050)
    metrics.routes_pushed(now_ms=20_000)  # nothing left to observe
    s = _samples(metrics.registry)
    assert _value(s, "failover_failovers_total", kind="crash") == 1
    assert _value(s, "failover_failovers_total", kind="switchover") == 1
    assert _value(s, "failover_failovers_total", kind="patch") == 1
    assert _value(s, "failover_false_suspicions_total") == 1
    assert _value(s, "failover_unavailability_seconds_count") == 1
    assert _value(s, "failover_unavailability_seconds_sum") == pytest.approx(0.35)
    assert _value(s, "failover_store_commit_duration_seconds_count") == 1
    records = [r for r in caplog.records if r.name == "failover.coordinator.history"]
    assert [r.event for r in records] == ["failover", "switchover", "switchover", "suspicion"]
    assert records[0].levelno == logging.WARNING and records[0].new_primary == "h2"


def test_a_follower_reports_only_that_it_does_not_lead() -> None:
    s = _samples(CoordinatorMetrics(_coordinator(leading=False)).registry)
    assert _value(s, "failover_is_leader") == 0
    assert not [k for k in s if k[0] == "failover_hosts"]


# --- logs ----------------------------------------------------------------------------------


def test_json_records_carry_their_fields() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # pytest's own: given back below
    logs.configure("h1", "json", "debug", stream)
    try:
        log = logging.getLogger("failover.test")
        log.info("kv1: role %s -> %s", "duplica", "primary",
                 extra=logs.event_fields("role_change", service="kv1", role="primary",
                                         epoch=4, hosts={"b", "a"}, big="x" * 10_000))
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "kv1: role duplica -> primary" and first["level"] == "INFO"
    assert first["event"] == "role_change" and first["epoch"] == 4
    assert first["host"] == "h1" and first["logger"] == "failover.test"
    assert first["hosts"] == ["a", "b"] and first["ts"].endswith("Z")
    assert len(first["big"]) < 5000 and first["big"].endswith("(cut)")
    assert "ValueError: boom" in second["exc"]


def test_fields_never_shadow_a_record() -> None:
    with pytest.raises(ValueError, match="shadow"):
        logs.event_fields("x", name="n")
    assert logs.safe_fields({"name": 1, "host": 2, "epoch": 3}) == {
        "detail_name": 1, "detail_host": 2, "epoch": 3}


@pytest.mark.parametrize(("check", "value"), [
    (logs.check_log_format, "xml"), (logs.check_log_level, "loud")])
def test_bad_log_settings_are_refused(check: Any, value: str) -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        check(value)


# --- flags ---------------------------------------------------------------------------------


def test_metrics_listen_is_checked_like_listen() -> None:
    assert check_metrics_listen("127.0.0.1:9464", tls=False, insecure=False) == "127.0.0.1:9464"
    assert check_metrics_listen("0.0.0.0:9464", tls=True, insecure=False)
    with pytest.raises(ConfigError, match="in the clear"):
        check_metrics_listen("0.0.0.0:9464", tls=False, insecure=False)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_metrics_listen("nonsense", tls=True, insecure=False)
    config = AgentConfig.from_mapping({"host_id": "h", "listen": "127.0.0.1:1", "data_dir": "d",
                                       "metrics_listen": "127.0.0.1:2", "log_format": "json",
                                       "log_level": "debug"})
    assert (config.metrics_listen, config.log_format, config.log_level) == (
        "127.0.0.1:2", "json", "DEBUG")


@pytest.mark.parametrize("argv", [
    ["--metrics-listen", "127.0.0.1"], ["--log-format", "xml"], ["--log-level", "loud"]])
@pytest.mark.parametrize("daemon", ["agent", "coordinator"])
def test_bad_flags_exit_2_with_one_line(daemon: str, argv: list[str], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    if daemon == "agent":
        run, base = agent_main, ["--host-id", "h", "--listen", "127.0.0.1:1"]
    else:
        run, base = coordinator_main, ["--listen", "127.0.0.1:1"]
    with pytest.raises(SystemExit) as exc:
        run([*base, "--data-dir", str(tmp_path / "d"), *argv])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --- the endpoint --------------------------------------------------------------------------


async def _http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_endpoint_serves_metrics_and_health_paths(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    metrics = AgentMetrics(agent)
    endpoint = MetricsEndpoint(metrics.registry, health.agent_routes(agent, "h1"))
    port = await endpoint.start("127.0.0.1:0")
    try:
        reply = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK") and b"failover_durable_index{" in reply
        assert (await _http(port, b"GET /primary/kv1 HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 200")
        assert (await _http(port, b"GET /primary/kv2 HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 503")
        assert (await _http(port, b"GET /replica/kv2?x=1 HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 200")
        head = await _http(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert (await _http(port, b"GET /primary/a%2F..%2Fb HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 400")
        assert (await _http(port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 405")
        assert (await _http(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n"
        assert (await _http(port, huge)).startswith(b"HTTP/1.1 431")
    finally:
        await endpoint.stop()


async def test_endpoint_refuses_an_address_in_use() -> None:
    first = MetricsEndpoint(AgentMetrics(SimpleNamespace(host_id="h", replicas={})).registry,
                            {})
    port = await first.start("127.0.0.1:0")
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            await MetricsEndpoint(first.registry, {}).start(f"127.0.0.1:{port}")
    finally:
        await first.stop()


def test_health_is_every_roles_and_a_follower_answers_it_itself() -> None:
    from failover.coordinator.leadership import ANY_COORDINATOR
    from failover.core.permissions import HEALTH_METHODS, ROLES, Identity, require_method

    assert set(HEALTH_METHODS) <= ANY_COORDINATOR
    for role in ROLES:
        for method in HEALTH_METHODS:
            require_method(Identity(role, "x1"), method)


async def test_coordinator_health_service() -> None:
    leading = [True]
    servicer = health.coordinator_health(lambda: leading[0])
    context = SimpleNamespace()
    check = health.health_pb2.HealthCheckRequest
    reply = await servicer.Check(check(service=health.COORDINATOR_SERVICE), context)
    assert reply.status == health.SERVING
    leading[0] = False
    reply = await servicer.Check(check(service=health.COORDINATOR_SERVICE), context)
    assert reply.status == health.NOT_SERVING
    assert (await servicer.Check(check(service=""), context)).status == health.SERVING
    listed = await servicer.List(health.health_pb2.HealthListRequest(), context)
    assert set(listed.statuses) == {"", health.COORDINATOR_SERVICE}


async def test_measured_calls_count_their_outcome(tmp_path: Path) -> None:
    import grpc

    from failover.observe.agent_metrics import measure_calls
    from failover.v1 import data_pb2

    class Servicer:
        async def Execute(self, request: Any, context: Any) -> Any:
            return data_pb2.ExecuteReply(result=b"x")

        async def Query(self, request: Any, context: Any) -> Any:
            raise RuntimeError("aborted")  # as context.abort raises, the code set

    agent = _agent(tmp_path)
    metrics = AgentMetrics(agent)
    servicer = Servicer()
    measure_calls(servicer, metrics)
    context = SimpleNamespace(code=lambda: grpc.StatusCode.FAILED_PRECONDITION,
                              cancelled=lambda: False)
    await servicer.Execute(data_pb2.ExecuteRequest(service="kv1"), context)
    with pytest.raises(RuntimeError):
        await servicer.Query(data_pb2.QueryRequest(service="kv2"), context)
    s = _samples(metrics.registry)
    assert _value(s, "failover_requests_total", service="kv1", op_kind="execute",
                  outcome="ok") == 1
    assert _value(s, "failover_requests_total", service="kv2", op_kind="query",
                  outcome="failed_precondition") == 1
