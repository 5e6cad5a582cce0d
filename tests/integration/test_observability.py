"""Issue 17 with real processes: Prometheus metrics and health over HTTP(S) on
--metrics-listen, the gRPC health service, and the values moving with writes and a kill -9
failover."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from failover.client import Client
from failover.localcluster import LocalCluster, wait_for
from failover.processes import free_port
from failover.v1 import coordinator_pb2, data_pb2, data_pb2_grpc

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Scraper:
    """GETs a daemon's metrics port, over HTTPS trusting the cluster's CA when it has TLS."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.context: ssl.SSLContext | None = None
        if cluster.pki is not None:
            self.context = ssl.create_default_context(cafile=str(cluster.pki.files("x").ca))
        self.scheme = "https" if self.context is not None else "http"

    def get(self, address: str, path: str) -> tuple[int, bytes]:
        url = f"{self.scheme}://{address}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5, context=self.context) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def samples(self, address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = self.get(address, "/metrics")
        assert status == 200, body
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def value(self, address: str, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples(address).items()
                   if n == name and want <= ls)


def _with_metrics(cluster: LocalCluster) -> dict[str, str]:
    """Gives every daemon of `cluster` a metrics port before it starts; name -> HOST:PORT."""
    ports = {}
    for agent in cluster:
        ports[agent.host_id] = f"127.0.0.1:{free_port()}"
        agent.extra["metrics_listen"] = ports[agent.host_id]
    if cluster.coordinator is not None:
        ports["coordinator"] = f"127.0.0.1:{free_port()}"
        cluster.coordinator.args += ["--metrics-listen", ports["coordinator"],
                                     "--log-format", "json"]
    return ports


def _health(cluster: LocalCluster, host: str, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(cluster[host].channel())
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, dict[str, str]]]:
    with LocalCluster(tmp_path, hosts=3, coordinator=True,
                      coordinator_args=["--host-dead-ms", "60000"]) as c:
        ports = _with_metrics(c)
        c.start()
        c.create("kv1", "kv", replicas=2)
        yield c, ports


def test_https_metrics_move_and_health_follows_a_crash_failover(
        tls_cluster: tuple[LocalCluster, dict[str, str]]) -> None:
    cluster, ports = tls_cluster
    scrape = Scraper(cluster)
    primary = wait_for(lambda: cluster.primary_of("kv1"), 20, "kv1 to have a primary")
    duplica = next(h for h in cluster.agents if h != primary
                   and cluster[h].replica("kv1") is not None)
    coord = ports["coordinator"]
    assert scrape.value(coord, "failover_is_leader") == 1
    assert scrape.value(coord, "failover_services") == 1
    assert scrape.value(coord, "failover_hosts", state="alive") == 3
    assert scrape.value(coord, "failover_failovers_total", kind="crash") == 0
    assert scrape.get(coord, "/leader")[0] == 200
    leader_health = health_pb2_grpc.HealthStub(cluster.coordinator.channel()).Check(
        health_pb2.HealthCheckRequest(service="failover.v1.Coordinator"), timeout=5)
    assert leader_health.status == SERVING

    # A write moves the primary's durable index and counts one ok execute.
    before = scrape.value(ports[primary], "failover_durable_index", service="kv1")

    async def write() -> None:
        async with Client(cluster.coordinator_addresses, tls=cluster.tls_client) as client:
            await client.call("kv1", {"op": "put", "key": "k", "value": "v"})

    asyncio.run(write())
    assert scrape.value(ports[primary], "failover_durable_index", service="kv1") > before
    assert scrape.value(ports[primary], "failover_requests_total", service="kv1",
                        op_kind="execute", outcome="ok") >= 1
    assert scrape.value(ports[primary], "failover_request_duration_seconds_count",
                        service="kv1") >= 1
    assert scrape.value(ports[primary], "failover_replica_role", service="kv1",
                        role="primary") == 1
    assert scrape.value(ports[primary], "failover_in_sync_members", service="kv1") == 1
    assert scrape.value(ports[primary], "failover_shipped_entries_total", service="kv1") >= 1
    assert scrape.value(ports[primary], "failover_build_info") == 1

    # A write sent to the duplica is refused by its handler, and counted with its status.
    async def misdirected() -> grpc.StatusCode:
        async with cluster.aio_channel(cluster[duplica].address) as channel:
            try:
                await data_pb2_grpc.DataStub(channel).Execute(
                    data_pb2.ExecuteRequest(service="kv1"), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        raise AssertionError("a duplica took a write")

    code = asyncio.run(misdirected())
    assert scrape.value(ports[duplica], "failover_requests_total", service="kv1",
                        op_kind="execute", outcome=code.name.lower()) == 1

    # Health: the primary serves kv1, the duplica does not; both serve overall.
    assert scrape.get(ports[primary], "/primary/kv1")[0] == 200
    assert scrape.get(ports[duplica], "/primary/kv1")[0] == 503
    assert scrape.get(ports[duplica], "/replica/kv1")[0] == 200
    assert scrape.get(ports[primary], "/primary/no/such")[0] in (400, 404)
    status, body = scrape.get(ports[duplica], "/healthz")
    assert status == 200 and json.loads(body)["replicas"] == {"kv1": "duplica"}
    assert _health(cluster, primary, "kv1") == SERVING
    assert _health(cluster, duplica, "kv1") == NOT_SERVING
    assert _health(cluster, duplica, "") == SERVING
    with pytest.raises(grpc.RpcError) as refused:
        _health(cluster, duplica, "../etc")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # kill -9 the primary: the duplica is promoted, the coordinator counts a crash failover
    # and observes its unavailability, and health flips.
    cluster[primary].kill()
    wait_for(lambda: cluster.primary_of("kv1") == duplica, 30, "the duplica promoted")
    wait_for(lambda: scrape.value(coord, "failover_failovers_total", kind="crash") == 1, 10,
             "the crash failover counted")
    assert scrape.value(coord, "failover_unavailability_seconds_count") == 1
    assert 0 < scrape.value(coord, "failover_unavailability_seconds_sum") < 30
    wait_for(lambda: scrape.get(ports[duplica], "/primary/kv1")[0] == 200, 10,
             "/primary/kv1 on the new primary")
    wait_for(lambda: _health(cluster, duplica, "kv1") == SERVING, 10, "SERVING on it")
    assert scrape.value(ports[duplica], "failover_epoch", service="kv1") >= 2
    assert scrape.value(coord, "failover_hosts", state="suspected") + scrape.value(
        coord, "failover_hosts", state="dead") == 1

    # The coordinator logged the failover as one JSON record with its fields.
    records = [json.loads(line) for line in cluster.coordinator.log_path.read_text()
               .splitlines() if line.startswith("{")]
    failovers = [r for r in records if r.get("event") == "failover"]
    assert failovers and failovers[0]["service"] == "kv1"
    assert failovers[0]["new_primary"] == duplica and failovers[0]["old_primary"] == primary


def test_plain_http_metrics_and_health_watch(tmp_path: Path) -> None:
    """Without TLS the port is plain HTTP; a switchover flips /primary and a health Watch; a
    live migration counts its bytes on both sides."""
    with LocalCluster(tmp_path, hosts=3, coordinator=True, tls=False) as cluster:
        ports = _with_metrics(cluster)
        cluster.start()
        cluster.create("kv1", "kv", replicas=2)
        scrape = Scraper(cluster)
        assert scrape.scheme == "http"
        primary = wait_for(lambda: cluster.primary_of("kv1"), 20, "kv1 to have a primary")
        other = wait_for(lambda: next((h for h in cluster.agents if h != primary and
                                       cluster[h].replica("kv1") is not None), None),
                         20, "kv1 to have a duplica")
        spare = next(h for h in cluster.agents if h not in (primary, other))
        wait_for(lambda: scrape.get(ports[other], "/replica/kv1")[0] == 200, 20,
                 "the duplica built")
        assert scrape.get(ports[primary], "/primary/kv1")[0] == 200

        async def switch_and_watch() -> list[int]:
            channel = cluster.aio_channel(cluster[other].address)
            seen: list[int] = []
            async with channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service="kv1"), timeout=30)
                seen.append((await watch.read()).status)
                await asyncio.to_thread(
                    cluster.coordinator.stub().Switchover,
                    coordinator_pb2.SwitchoverRequest(service="kv1", to_host_id=other), timeout=20)
                seen.append((await watch.read()).status)
                watch.cancel()
            return seen

        assert asyncio.run(switch_and_watch()) == [NOT_SERVING, SERVING]
        coord = ports["coordinator"]
        wait_for(lambda: scrape.value(coord, "failover_failovers_total", kind="switchover")
                 == 1, 10, "the switchover counted")
        assert scrape.value(coord, "failover_failovers_total", kind="crash") == 0
        wait_for(lambda: scrape.get(ports[primary], "/primary/kv1")[0] == 503, 10,
                 "the old primary answering 503")
        assert scrape.get(ports[other], "/primary/kv1")[0] == 200
        assert _health(cluster, primary, "kv1") == NOT_SERVING  # it stepped down

        # failoverctl top draws a frame of the same cluster (item 6).
        shown = subprocess.run(
            [sys.executable, "-m", "failover.cli", "--coordinator",
             cluster.coordinator.address, "top", "--once"],
            capture_output=True, text=True, timeout=60, check=True).stdout
        assert "kv1" in shown and other in shown and "switchover" in shown

        # A live migration of the duplica (the old primary) to the spare host.
        subprocess.run(
            [sys.executable, "-m", "failover.cli", "--coordinator",
             cluster.coordinator.address, "migrate", "kv1", "--to", spare,
             "--replica", "duplica"], capture_output=True, timeout=60, check=True)
        assert scrape.value(ports[primary], "failover_migration_bytes_total", service="kv1",
                            direction="out") > 0
        assert scrape.value(ports[spare], "failover_migration_bytes_total", service="kv1",
                            direction="in") > 0
        assert scrape.value(ports[primary], "failover_migration_downtime_seconds",
                            service="kv1") > 0


def test_several_coordinators_one_says_it_leads(tmp_path: Path) -> None:
    """On etcd: exactly one coordinator reports failover_is_leader 1 and passes /leader and
    the gRPC health of failover.v1.Coordinator; a follower answers health itself (its gate
    lets it through) and reports nothing of the cluster."""
    from failover.etcd_local import ensure_etcd

    found = ensure_etcd()
    if isinstance(found, str):
        pytest.skip(f"no etcd: {found}")
    with LocalCluster(tmp_path, hosts=1, coordinators=2, store="etcd", tls=False) as cluster:
        ports = {}
        for process in cluster.coordinators:
            ports[process.name] = f"127.0.0.1:{free_port()}"
            process.args += ["--metrics-listen", ports[process.name]]
        cluster.start()
        scrape = Scraper(cluster)
        leader = cluster.leader()
        follower = next(p for p in cluster.coordinators if p is not leader)
        wait_for(lambda: scrape.value(ports[leader.name], "failover_is_leader") == 1, 10,
                 "the leader to say so")
        assert scrape.value(ports[follower.name], "failover_is_leader") == 0
        assert scrape.value(ports[follower.name], "failover_hosts") == 0  # nothing reported
        assert scrape.value(ports[leader.name], "failover_hosts", state="alive") == 1
        assert scrape.get(ports[leader.name], "/leader")[0] == 200
        assert scrape.get(ports[follower.name], "/leader")[0] == 503
        assert scrape.get(ports[follower.name], "/healthz")[0] == 200

        def coordinator_health(process: Any) -> int:
            return health_pb2_grpc.HealthStub(process.channel()).Check(
                health_pb2.HealthCheckRequest(service="failover.v1.Coordinator"),
                timeout=5).status

        assert coordinator_health(leader) == SERVING
        assert coordinator_health(follower) == NOT_SERVING


def test_an_agents_supervisor_logs_in_the_format_its_child_does(tmp_path: Path) -> None:
    """Supervisor and child write to the same stderr: with --log-format json every line of
    it is a JSON record (the supervisor used to log plain text whatever the flag)."""
    with LocalCluster(tmp_path, hosts=1, tls=False) as cluster:
        agent = cluster["host1"]
        agent.extra["log_format"] = "json"
        cluster.start()
        wait_for(lambda: "started child" in agent.log_path.read_text()
                 and "serving on" in agent.log_path.read_text(), 20,
                 "the supervisor and its child to log")
        lines = agent.log_path.read_text().splitlines()
        records = [json.loads(line) for line in lines]  # each one JSON, or this raises
        assert {r["logger"] for r in records} >= {"failover.agent.supervisor",
                                                  "failover.agent"}
