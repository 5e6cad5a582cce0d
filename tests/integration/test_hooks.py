"""Hooks with real processes (issue 17, item 5): a failover's hooks run on the new primary in
the background; one that sleeps far longer than the failover does not delay it, is killed at
its timeout, and every hook's exit status and output land in the coordinator's history."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from failover.client import Client
from failover.localcluster import LocalCluster

pytestmark = pytest.mark.timeout(120)

HOOK_TIMEOUT_MS = 2000
SLOW_S = 10  # far longer than a failover, and than the hook timeout


def wait_for(condition, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout_s} s")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    scripts = tmp_path / "hooks"
    scripts.mkdir()
    (scripts / "note").write_text('#!/bin/sh\necho "$FAILOVER_HOOK_EVENT $*"\n')
    (scripts / "slow").write_text(f"#!/bin/sh\nsleep {SLOW_S}\n")
    for path in scripts.iterdir():
        path.chmod(0o700)
    config = tmp_path / "agent.toml"
    config.write_text(
        "[patch.commands]\n"
        f'note = ["{scripts / "note"}"]\n'
        f'slow = ["{scripts / "slow"}"]\n'
        "[hooks]\n"
        'on_role_change = ["note"]\n'
        'on_failover = ["slow", "note"]\n'
        f"timeout_ms = {HOOK_TIMEOUT_MS}\n")
    with LocalCluster(tmp_path, hosts=2, coordinator=True, extra={"config": config}) as c:
        c.start()
        c.create("kv", "kv", replicas=2)
        yield c


def put(cluster: LocalCluster, key: str) -> None:
    async def call() -> None:
        assert cluster.coordinator is not None
        async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                          deadline_ms=10_000) as client:
            await client.call("kv", {"op": "put", "key": key, "value": key})

    asyncio.run(call())


def hooks(cluster: LocalCluster) -> list[dict]:
    assert cluster.coordinator is not None
    return [msgpack.unpackb(e.details, raw=False) | {"seq": e.seq}
            for e in cluster.coordinator.history("kv") if e.kind == "hook"]


def test_a_slow_failover_hook_does_not_delay_the_failover_and_results_land_in_history(
        cluster: LocalCluster) -> None:
    assert cluster.coordinator is not None
    old = cluster.primary_of("kv")
    assert old is not None
    new = next(h for h in cluster.agents if h != old)
    # Creating the service changed both replicas' roles: on_role_change ran on each.
    wait_for(lambda: {h["host_id"] for h in hooks(cluster)
                      if h["event"] == "on_role_change"} == {old, new}, 20,
             "on_role_change results of both hosts")
    put(cluster, "before")  # the duplica holds a write: promotable
    cluster[old].kill()
    killed = time.monotonic()
    wait_for(lambda: cluster.primary_of("kv") == new, 15, "failover")
    failover_s = time.monotonic() - killed
    # The new primary serves while its 10 s on_failover hook still runs: the hook did not
    # hold the failover (which took a fraction of the hook's sleep).
    assert failover_s < SLOW_S / 2, failover_s
    assert not [h for h in hooks(cluster) if h["command"] == "slow"]
    put(cluster, "after")
    note = wait_for(lambda: [h for h in hooks(cluster) if h["event"] == "on_failover"
                             and h["command"] == "note"], 20, "the on_failover note hook")[0]
    assert note["host_id"] == new and note["exit_code"] == 0
    assert note["output"].strip() == "on_failover kv primary 2"
    assert (note["role"], note["epoch"]) == ("primary", 2)
    # The slow one is killed at its timeout, and says so.
    slow = wait_for(lambda: [h for h in hooks(cluster) if h["command"] == "slow"], 20,
                    "the slow hook's result")[0]
    assert slow["timed_out"] and slow["exit_code"] == -1
    assert HOOK_TIMEOUT_MS <= slow["duration_ms"] < SLOW_S * 1000
    failover = next(e for e in cluster.coordinator.history("kv") if e.kind == "failover")
    assert failover.seq < slow["seq"]
