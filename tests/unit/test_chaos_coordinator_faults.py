"""The chaos faults of issue 15 without processes: the nemesis schedules `etcd` faults (one
member or all), the injector kills the leading coordinator and measures the takeover (or says
none came), skips etcd faults on a cluster without etcd, and `failoverctl chaos` refuses
settings that cannot run."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from failover.chaos import faults as faults_module
from failover.chaos.faults import FaultInjector
from failover.chaos.nemesis import Fault, parse_kinds, schedule
from failover.cli.main import main


def test_etcd_faults_kill_one_member_or_all() -> None:
    plan = schedule(3, 120, ("etcd",))
    assert plan == schedule(3, 120, ("etcd",))  # seeded
    assert {f.kind for f in plan} == {"etcd"}
    assert {f.target for f in plan} == {"member", "all"}
    assert all(0.5 <= f.duration_s <= 5.0 for f in plan)
    assert parse_kinds("coordinator,etcd") == ("coordinator", "etcd")


class FakeCoordinator:
    def __init__(self, name: str) -> None:
        self.what = f"coordinator {name}"
        self.address = f"127.0.0.1:70{name}"
        self.alive = True
        self.paused = False
        self.kills = 0

    def kill(self) -> None:
        self.alive = False
        self.kills += 1

    def start(self) -> None:
        self.alive = True


class FakeCluster:
    """Three coordinators; after the leader dies, `successor` leads `takeover_s` later."""

    def __init__(self, takeover_s: float | None) -> None:
        self.coordinators = [FakeCoordinator(n) for n in ("01", "02", "03")]
        self.coordinator = self.coordinators[0]
        self.etcd: Any = None
        self.current: FakeCoordinator | None = self.coordinators[1]
        self.successor = self.coordinators[2]
        self.takeover_s = takeover_s
        self._lock = threading.Lock()

    def leader(self, timeout_s: float) -> FakeCoordinator:
        assert self.current is not None
        return self.current

    def find_leader(self, timeout_s: float = 1.0) -> FakeCoordinator | None:
        with self._lock:
            if self.current is not None and not self.current.alive:
                dead_since = getattr(self, "dead_since", None) or time.monotonic()
                self.dead_since = dead_since
                if self.takeover_s is not None and \
                        time.monotonic() - dead_since >= self.takeover_s:
                    self.current = self.successor
                else:
                    return None
            return self.current


async def test_a_coordinator_fault_kills_the_leader_and_measures_the_takeover() -> None:
    cluster = FakeCluster(takeover_s=0.1)
    injector = FaultInjector(cluster, ["kv"])  # type: ignore[arg-type]
    injector.wait_healed = lambda timeout_s=0: None  # type: ignore[method-assign]
    leader = cluster.coordinators[1]
    record = await injector.run(Fault(0, "coordinator", "coordinator", 0.3, 5))
    assert leader.kills == 1 and leader.alive  # killed, then started again
    assert [c.kills for c in cluster.coordinators] == [0, 1, 0]
    assert record.host == leader.what
    assert record.detail["new_leader"] == cluster.successor.address
    assert 80 <= record.detail["takeover_ms"] <= 1000
    assert "error" not in record.detail


async def test_a_coordinator_fault_with_no_takeover_says_so(monkeypatch) -> None:
    monkeypatch.setattr(faults_module, "HEAL_TIMEOUT_S", 0.3)
    cluster = FakeCluster(takeover_s=None)
    injector = FaultInjector(cluster, ["kv"])  # type: ignore[arg-type]
    injector.wait_healed = lambda timeout_s=0: None  # type: ignore[method-assign]
    record = await injector.run(Fault(0, "coordinator", "coordinator", 0.05, 5))
    assert record.detail["error"] == "no other coordinator led within 0 s of the leader's kill"
    assert "takeover_ms" not in record.detail


async def test_etcd_faults_are_skipped_with_a_reason_without_etcd() -> None:
    cluster = FakeCluster(takeover_s=0.1)
    injector = FaultInjector(cluster, ["kv"])  # type: ignore[arg-type]
    record = await injector.run(Fault(0, "etcd", "all", 1.0, 1))
    assert record.skipped.startswith("the coordinators run on SQLite")
    assert injector.skipped_kinds == {"etcd": record.skipped}


@pytest.mark.parametrize("argv, message", [
    (["--coordinators", "3", "--store", "sqlite"], "several coordinators share an etcd store"),
    (["--faults", "kill,etcd", "--store", "sqlite"], "etcd faults need the etcd store"),
    (["--faults", "kill,zookeeper"], "unknown fault kind(s) zookeeper"),
])
def test_failoverctl_chaos_refuses_what_cannot_run(capsys, argv: list[str],
                                                   message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["chaos", "--duration", "10", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
