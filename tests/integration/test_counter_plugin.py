"""The plug-in path, proven end to end: the example kind in examples/counter is pip-installed
into this environment (offline; its own package and entry point, nothing of failover
changed), and real `failover-agent` and `failover-coordinator` processes run it through a
SIGKILL of the primary. The counter then equals the increments that were acknowledged.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from failover.client import Client
from failover.errors import FailoverError
from failover.localcluster import LocalCluster, wait_for

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "counter"
DISTRIBUTION = "failover-counter"
PIP_TIMEOUT_S = 120.0  # a local build and install; two cores, shared with other work
INCREMENTS_BEFORE_KILL = 100
INCREMENTS_AFTER_FAILOVER = 100
WAIT_S = 30.0


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    """pip of the interpreter the agents run on (`LocalCluster` starts `sys.executable`),
    offline: no index, no version check, no build isolation (setuptools is installed)."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True,
                          text=True, timeout=PIP_TIMEOUT_S, env=env)


def _installed() -> bool:
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def counter_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Installs examples/counter into this venv (from a copy, so the build leaves nothing in
    the repository) and uninstalls it afterwards, unless it was installed before."""
    was_installed = _installed()
    source = tmp_path_factory.mktemp("counter-src") / "counter"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    done = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # The new kind, seen the way every daemon finds kinds: the entry point, in a new process.
    found = subprocess.run(
        [sys.executable, "-c", "from failover import kinds; print(kinds.load_kind('counter'))"],
        capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and "CounterService" in found.stdout, found.stderr
    try:
        yield
    finally:
        if not was_installed:
            _pip("uninstall", "--yes", DISTRIBUTION)


@pytest.fixture
def cluster(tmp_path: Path, counter_installed: None) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=3, coordinator=True) as c:
        c.start()
        c.create("hits", "counter", replicas=3)
        yield c


@dataclass
class Incrementers:
    """Clients incrementing one shared counter; every acknowledged reply's value is kept."""

    client: Client
    values: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                reply = await self.client.call("hits", {"op": "incr", "counter": "home"})
            except FailoverError as exc:  # its outcome would be unknown: the test fails
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            self.values.append(reply["value"])


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Polls `condition` under a deadline while the incrementers run on this loop."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)  # a poll interval, not a synchronisation


async def test_a_plugin_kind_fails_over_with_every_acknowledged_increment(
    cluster: LocalCluster,
) -> None:
    assert cluster.coordinator is not None
    old = cluster.primary_of("hits")
    assert old is not None
    async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                      deadline_ms=15_000) as client:
        work = Incrementers(client)
        tasks = [asyncio.create_task(work.run()) for _ in range(4)]
        try:
            await _until(lambda: len(work.values) >= INCREMENTS_BEFORE_KILL,
                         f"{INCREMENTS_BEFORE_KILL} increments before the kill")
            cluster[old].kill()  # SIGKILL
            await asyncio.to_thread(wait_for, lambda: cluster.primary_of("hits") not in (
                None, old), WAIT_S, "a new primary of hits")
            after = len(work.values)
            await _until(lambda: len(work.values) >= after + INCREMENTS_AFTER_FAILOVER,
                         f"{INCREMENTS_AFTER_FAILOVER} increments on the new primary")
        finally:
            work.stop.set()
            await asyncio.gather(*tasks)
        assert not work.failures, work.failures[:5]
        acknowledged = len(work.values)
        # Each increment applied exactly once, in one order: the replies are 1..n, each once.
        assert sorted(work.values) == list(range(1, acknowledged + 1))
        got = await client.call("hits", {"op": "get", "counter": "home"})
        assert got["value"] == acknowledged
    status = cluster.coordinator.status()
    assert next(s.epoch for s in status.services if s.name == "hits") == 2
    failover = next(e for e in cluster.coordinator.history("hits") if e.kind == "failover")
    assert old in failover.message
    # The killed host comes back as a duplica and catches up: the plug-in's state and digest
    # are the same on every replica.
    cluster[old].start()
    cluster.wait_converged("hits", list(cluster.agents), timeout_s=WAIT_S)
