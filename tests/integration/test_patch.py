"""Patching with real processes (issue 7): `failoverctl patch --all` restarts every agent
on its code while a bank workload runs, with no failed request and the totals intact.

A patch command is a name (issue 13), never a command line: each name here is an entry of the
agents' allowlist (`[patch.commands]` in their TOML), which runs a script (`PATCH_COMMANDS`)
without a shell."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from failover.client import Client
from failover.errors import FailoverError, RequestRejected
from failover.localcluster import LocalCluster

pytestmark = pytest.mark.timeout(240)

ACCOUNTS = 8
OPENING = 100
# name -> what it runs on a host
PATCH_COMMANDS = {"patch-ok": "echo patched", "patch-broken": "echo broken >&2; exit 3"}


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCluster]:
    commands = tmp_path / "patch-commands"
    commands.mkdir()
    allowlist = ["[patch.commands]"]
    for name, script in PATCH_COMMANDS.items():
        path = commands / name
        path.write_text(f"#!/bin/sh\n{script}\n")
        path.chmod(0o700)
        allowlist.append(f'{name} = ["{path}"]')
    config = tmp_path / "agent.toml"
    config.write_text("\n".join(allowlist) + "\n")
    with LocalCluster(tmp_path, hosts=3, coordinator=True, extra={"config": config}) as c:
        c.start()
        c.create("bank", "bank", replicas=3)
        yield c


def failoverctl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    assert cluster.coordinator is not None
    return subprocess.run(
        [sys.executable, "-m", "failover.cli", *cluster.cli_args(), *args],
        capture_output=True, text=True, timeout=200, start_new_session=True)


async def test_patch_all_under_a_bank_workload_fails_no_request(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    before = {h.host_id: h.started_at for h in cluster.coordinator.status().hosts}
    pids = {h: cluster[h].proc.pid for h in cluster.agents}  # type: ignore[union-attr]
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                      deadline_ms=10_000) as client:
        for i in range(ACCOUNTS):
            await client.call("bank", {"op": "open", "account": f"a{i}", "balance": OPENING})
        stop = asyncio.Event()
        failures: list[str] = []
        done = [0]

        async def worker(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                a, b = (n + i) % ACCOUNTS, (n + i + 3) % ACCOUNTS
                try:
                    await client.call("bank", {"op": "transfer", "from": f"a{a}",
                                               "to": f"a{b}", "amount": 1 + i % 5})
                    done[0] += 1
                except RequestRejected:
                    pass  # an overdraw: the service's answer, not a failure
                except FailoverError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        workers = [asyncio.create_task(worker(n)) for n in range(4)]
        try:
            result = await asyncio.to_thread(
                failoverctl, cluster, "--format", "json", "patch", "--all",
                "--command", "patch-ok")
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["ok"]
        assert [s["host_id"] for s in report["steps"] if s["step"] == "done"] == \
            ["host1", "host2", "host3"]
        assert not failures, failures[:5]
        assert done[0] > 100
        total = await client.call("bank", {"op": "total"})
        assert total["total"] == ACCOUNTS * OPENING
    after = {h.host_id: h.started_at for h in cluster.coordinator.status().hosts}
    assert all(after[h] > before[h] for h in before), (before, after)
    # Re-executed in place: the same process, new code loaded.
    assert {h: cluster[h].proc.pid for h in cluster.agents} == pids  # type: ignore[union-attr]
    cluster.wait_converged("bank", list(cluster.agents))
    kinds = [e.kind for e in cluster.coordinator.history()]
    assert kinds.count("patch") >= 6


def test_a_failing_patch_command_stops_with_the_cluster_serving(cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    before = {h.host_id: h.started_at for h in cluster.coordinator.status().hosts}
    result = failoverctl(cluster, "patch", "host2", "--command", "patch-broken")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "exited with 3" in result.stderr and "broken" in result.stderr
    after = {h.host_id: h.started_at for h in cluster.coordinator.status().hosts}
    assert after == before  # nobody restarted
    assert cluster.primary_of("bank") is not None
    bad = failoverctl(cluster, "patch")
    assert bad.returncode == 2 and "--all" in bad.stderr
    shell = failoverctl(cluster, "patch", "host2", "--command", "echo broken >&2; exit 3")
    assert shell.returncode == 2 and "patch command name" in shell.stderr
    assert {h.host_id: h.started_at for h in cluster.coordinator.status().hosts} == before
