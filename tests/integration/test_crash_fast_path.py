"""The crash fast path with real processes (issue 16): `failover-agent` is a supervisor and
its child. SIGKILL of the child alone (the supervisor alive) is reported at once and the
primary fails over without waiting out the failure timeout; SIGKILL of both (the whole
agent, as a lost host) still fails over on the timeout path. Under a write load, no
acknowledged write is lost either way. Only the host itself may report its process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from failover import defaults
from failover.localcluster import LocalCluster, wait_for
from failover.processes import sync_channel
from failover.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.integration.test_coordinator import epoch_of, kill_under_load


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=3, coordinator=True) as c:
        c.start()
        c.create("kv", "kv", replicas=3)
        yield c


def failover_details(cluster: LocalCluster) -> dict:
    import msgpack

    assert cluster.coordinator is not None
    event = next(e for e in cluster.coordinator.history("kv") if e.kind == "failover")
    return msgpack.unpackb(event.details, raw=False)


def exit_reports(cluster: LocalCluster, host: str) -> list[str]:
    assert cluster.coordinator is not None
    return [e.message for e in cluster.coordinator.history()
            if e.kind == "host" and f"host {host}'s agent process" in e.message]


async def test_a_killed_agent_child_fails_over_at_once_and_loses_no_acked_write(
        cluster: LocalCluster) -> None:
    old, work = await kill_under_load(cluster, "child")
    assert epoch_of(cluster) == 2
    details = failover_details(cluster)
    # Started by the supervisor's report, not by the failure timeout, and promoted without
    # waiting out the old primary's lease.
    assert details["detection_ms"] < defaults.FAILURE_TIMEOUT_MS, details
    assert details["promotion_ms"] < defaults.LEASE_MS, details
    assert exit_reports(cluster, old), "the supervisor's report is not in history"
    # The supervisor restarted the child: it rejoins as a duplica and catches up.
    cluster.wait_converged("kv", list(cluster.agents), timeout_s=30)
    assert cluster[old].child_pid() is not None
    # `failoverctl status` shows the restart: the second process registered, the first
    # reported exited.
    shown = subprocess.run([sys.executable, "-m", "failover.cli", *cluster.cli_args(), "status",
                            "--format", "json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    host = next(h for h in json.loads(shown.stdout)["hosts"] if h["host_id"] == old)
    assert (host["incarnation"], host["exited_incarnation"]) == (2, 1), host


async def test_a_killed_supervisor_and_child_fail_over_on_the_timeout_path(
        cluster: LocalCluster) -> None:
    old, work = await kill_under_load(cluster, "agent")
    assert epoch_of(cluster) == 2
    details = failover_details(cluster)
    assert details["detection_ms"] >= defaults.FAILURE_TIMEOUT_MS, details
    assert not exit_reports(cluster, old)
    assert not cluster[old].alive and cluster[old].child_pid() is None


def test_a_supervisor_killed_alone_takes_its_child_with_it(cluster: LocalCluster) -> None:
    """SIGKILL of the supervisor only: its child dies too (PR_SET_PDEATHSIG), nobody reports
    it, and the primary fails over on the timeout path; no child is left serving unwatched."""
    old = cluster.primary_of("kv")
    assert old is not None and cluster[old].proc is not None
    child = cluster[old].child_pid()
    assert child is not None
    os.kill(cluster[old].proc.pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{child}").exists()
             or Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z",
             10, "the child to die with its supervisor")
    wait_for(lambda: cluster.primary_of("kv") not in (None, old), 15, "a new primary")
    assert failover_details(cluster)["detection_ms"] >= defaults.FAILURE_TIMEOUT_MS
    assert not exit_reports(cluster, old)


def test_only_the_host_itself_may_report_its_agent_process(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    primary = cluster.primary_of("kv")
    other = next(h for h in cluster.agents if h != primary)
    request = coordinator_pb2.ProcessExitedRequest(host_id=primary, incarnation=1,
                                                   exit_code=-9)
    for identity in (cluster.agent_tls(other), cluster.tls_client):
        channel = sync_channel(cluster.coordinator.address, identity)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                coordinator_pb2_grpc.CoordinatorStub(channel).ProcessExited(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            channel.close()
    # A malformed report from the host itself is INVALID_ARGUMENT with a message.
    channel = sync_channel(cluster.coordinator.address, cluster.agent_tls(primary))
    try:
        with pytest.raises(grpc.RpcError) as caught:
            coordinator_pb2_grpc.CoordinatorStub(channel).ProcessExited(
                coordinator_pb2.ProcessExitedRequest(host_id=primary, incarnation=0),
                timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "incarnation" in caught.value.details()
    finally:
        channel.close()
    assert epoch_of(cluster) == 1 and cluster.primary_of("kv") == primary
