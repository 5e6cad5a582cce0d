"""Heartbeats are taken in rounds (`Coordinator._take_beats`): those that arrive while the
coordinator is busy are one core round and one store commit, and a beat whose caller gave up
waiting is taken all the same. With 10 agents of 60 replicas each on 2 cores, one commit per
beat under the lock made beats queue past the agents' 200 ms deadline; 612 beats in 40 s
were cancelled while queued and never taken, and hosts that were alive were suspected."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from failover import defaults
from failover.clock import monotonic_ms
from failover.coordinator.server import Coordinator
from failover.core.coordinator import HookReport, HostInfo, Timing
from failover.errors import InvalidRequest, Overloaded, Unavailable
from failover.storage.sqlite_store import SqliteStore
from tests.unit.inprocess import until
from tests.unit.test_coordinator_rebuild import DEAD, FAIL, HB, LEASE
from tests.unit.test_coordinator_scale import METRICS

HOSTS = ("h1", "h2", "h3")


class CountingStore(SqliteStore):
    """Counts commits, and the history rows each carried."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[int] = []

    async def commit(self, puts: Any, deletes: Any = (), history: Any = (),
                     **kwargs: Any) -> list[int]:
        self.commits.append(len(history))
        return await super().commit(puts, deletes, history, **kwargs)


def hook(seq: int) -> HookReport:
    return HookReport(seq=seq, service="kv", event="on_role_change", command="notify",
                      role="primary", epoch=1, exit_code=0, output="", duration_ms=3)


async def started(tmp_path: Path) -> tuple[Coordinator, CountingStore]:
    store = CountingStore(tmp_path / "cluster.db")
    coordinator = Coordinator(store, Timing(HB, FAIL, LEASE, DEAD), address="127.0.0.1:1")
    await coordinator.start()
    for host in HOSTS:
        await coordinator.register(HostInfo(host, "127.0.0.1:1"), dict(METRICS))
    return coordinator, store


async def test_beats_that_arrive_while_the_coordinator_is_busy_are_one_commit(
        tmp_path: Path) -> None:
    coordinator, store = await started(tmp_path)
    try:
        await coordinator._lock.acquire()  # busy: a commit of something else, say
        beats = [asyncio.ensure_future(coordinator.heartbeat(host, dict(METRICS), [],
                                                             [hook(1)]))
                 for host in HOSTS]
        await asyncio.sleep(0.05)
        before = len(store.commits)
        coordinator._lock.release()
        await asyncio.gather(*beats)
        # One commit holds every host's hook record, not one commit per heartbeat.
        assert store.commits[before:] == [3]
        assert len(await store.history(kind="hook")) == 3
    finally:
        await coordinator.stop()


async def test_a_beat_whose_caller_gave_up_is_taken_all_the_same(tmp_path: Path) -> None:
    coordinator, _store = await started(tmp_path)
    try:
        await coordinator._lock.acquire()
        seen = coordinator.core.live["h1"].last_heartbeat_ms
        await asyncio.sleep(0.02)
        beat = asyncio.ensure_future(coordinator.heartbeat("h1", dict(METRICS), []))
        await asyncio.sleep(0.01)
        beat.cancel()  # the agent's deadline passed while the beat queued
        with pytest.raises(asyncio.CancelledError):
            await beat
        coordinator._lock.release()
        await until(lambda: coordinator.core.live["h1"].last_heartbeat_ms > seen, timeout_s=2)
    finally:
        await coordinator.stop()


async def test_one_refused_beat_leaves_the_others_of_its_round_going(tmp_path: Path) -> None:
    coordinator, _store = await started(tmp_path)
    try:
        await coordinator._lock.acquire()
        good = asyncio.ensure_future(coordinator.heartbeat("h1", dict(METRICS), []))
        bad = asyncio.ensure_future(coordinator.heartbeat("nobody", dict(METRICS), []))
        also = asyncio.ensure_future(coordinator.heartbeat("h2", dict(METRICS), []))
        await asyncio.sleep(0.01)
        coordinator._lock.release()
        assert await good == [] and await also == []
        with pytest.raises(InvalidRequest, match="not registered"):
            await bad
    finally:
        await coordinator.stop()


async def test_a_hosts_newer_beat_replaces_the_one_waiting_and_the_wait_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent sends its next beat only once it gave up on the last: the older one is
    answered Unavailable (nobody reads it), and one beat per host waits at most."""
    coordinator, store = await started(tmp_path)
    try:
        await coordinator._lock.acquire()
        older = asyncio.ensure_future(coordinator.heartbeat("h1", dict(METRICS), [], [hook(1)]))
        await asyncio.sleep(0.01)
        newer = asyncio.ensure_future(coordinator.heartbeat("h1", dict(METRICS), [],
                                                            [hook(1), hook(2)]))
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match="newer heartbeat"):
            await older
        assert list(coordinator._beats) == ["h1"]
        monkeypatch.setattr(defaults, "COORDINATOR_HOSTS_MAX", 2)
        also = asyncio.ensure_future(coordinator.heartbeat("h2", dict(METRICS), []))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await coordinator.heartbeat("h3", dict(METRICS), [])
        coordinator._lock.release()
        assert await newer == [] and await also == []
        # The newer beat carried the older one's hook too: both are recorded, once each.
        assert len(await store.history(kind="hook")) == 2
    finally:
        await coordinator.stop()


async def test_hook_results_the_coordinator_refuses_are_left_out_and_the_beat_is_taken(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An agent re-sends its hook results until a beat is answered: refusing the whole beat
    for one result this coordinator does not know (another version's event) refused every
    later beat, and the host lost its leases."""
    coordinator, store = await started(tmp_path)
    try:
        seen = coordinator.core.live["h1"].last_heartbeat_ms
        await asyncio.sleep(0.02)
        unknown = dataclasses.replace(hook(1), event="on_some_later_event")
        assert await coordinator.heartbeat("h1", dict(METRICS), [], [unknown]) == []
        assert coordinator.core.live["h1"].last_heartbeat_ms > seen
        assert await store.history(kind="hook") == []
        assert "hook results of its heartbeat left out" in caplog.text
    finally:
        await coordinator.stop()


async def test_a_tick_takes_the_beats_queued_before_it_judges_silence(tmp_path: Path) -> None:
    # Storm runs: a tick waited for the lock behind a round, with 8 beats queued behind it;
    # it ran first and suspected a host whose beat was among them, and three services of
    # that live host were failed over. The beats that arrived first are taken first.
    coordinator, _store = await started(tmp_path)
    after_tick: list[bool] = []
    tick = coordinator.core.tick

    def recording(now_ms: int) -> Any:
        actions = tick(now_ms)
        after_tick.append(coordinator.core.live["h1"].alive)
        return actions

    coordinator.core.tick = recording  # type: ignore[method-assign]
    try:
        await coordinator.heartbeat("h1", dict(METRICS), [])
        beat_ms = coordinator.core.live["h1"].last_heartbeat_ms
        # Silent for a little less than the failure timeout (a slow host), then the lock is
        # busy while its next beat arrives, and stays busy past the timeout: less than a
        # heartbeat, so the tick waiting for it is no stall.
        await until(lambda: monotonic_ms() - beat_ms >= FAIL - 60, timeout_s=2)
        await coordinator._lock.acquire()
        ticks = len(after_tick)
        # The next tick waits for the lock (nothing else asks for it now).
        await until(lambda: bool(coordinator._lock._waiters), timeout_s=1)
        beat = asyncio.ensure_future(coordinator.heartbeat("h1", dict(METRICS), []))
        await until(lambda: monotonic_ms() - beat_ms >= FAIL + 20, timeout_s=2)
        coordinator._lock.release()
        await beat
        await until(lambda: len(after_tick) >= ticks + 2, timeout_s=2)
        assert all(after_tick[ticks:]), "h1 was suspected while its beat waited to be taken"
    finally:
        await coordinator.stop()
