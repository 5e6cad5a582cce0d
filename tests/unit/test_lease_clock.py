"""Leases on one clock that counts suspend, with a drift margin on both sides (issue 11,
item 9): the real Replica's lease and the real coordinator core's view and failover."""

from __future__ import annotations

import dataclasses
import time

import pytest

from failover import clock, defaults
from failover.agent import coordinator_link, host, replica
from failover.coordinator import server
from failover.net import agent_servicers

from . import test_replica_agent
from .test_coordinator_rebuild import HB, Driver

MARGIN = defaults.LEASE_DRIFT_MARGIN_MS


def test_leases_and_silences_are_measured_on_one_clock_that_counts_suspend() -> None:
    # Each module had its own monotonic_ms on CLOCK_MONOTONIC, which stops while the host
    # is suspended: a primary woken after its lease ran out still thought it held it.
    for module in (replica, host, coordinator_link, server, agent_servicers):
        assert module.monotonic_ms is clock.monotonic_ms, module.__name__
    if not hasattr(time, "CLOCK_BOOTTIME"):
        pytest.skip("no CLOCK_BOOTTIME on this platform: CLOCK_MONOTONIC is the fallback")
    before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    now = clock.monotonic_ns()
    assert before <= now <= time.clock_gettime_ns(time.CLOCK_BOOTTIME)


async def test_a_primary_lease_ends_the_margin_before_the_coordinators_view(
    agent: host.Agent,
) -> None:
    d = Driver(["h1", "h2"])
    d.create()
    granted: list[tuple[str, int, int]] = []
    heartbeat = d.core.heartbeat

    def recorded(*args: object) -> object:
        leases, actions = heartbeat(*args)  # type: ignore[arg-type]
        granted.extend(leases)
        return leases, actions

    d.core.heartbeat = recorded  # type: ignore[method-assign]
    d.beat("h1")
    (service, epoch, lease_ms), = granted
    holder, view_ms = d.core.leases[service]
    assert holder == "h1" and view_ms == d.now + lease_ms
    primary = await test_replica_agent.primary_waiting_on_b(agent)
    assert primary.epoch == epoch
    # The heartbeat left the agent at the instant the coordinator took it (the best case
    # for the primary): its lease still ends the margin before the coordinator's view.
    primary.grant_lease(epoch, lease_ms, d.now)
    assert primary.lease_expiry_ms == view_ms - MARGIN


def test_a_failover_waits_out_the_old_primarys_lease_and_the_margin() -> None:
    d = Driver(["h1", "h2"])
    # A lease longer than the failure timeout, so the wait for it is what holds the promotion.
    d.core.timing = dataclasses.replace(d.core.timing, lease_ms=1000)
    d.create()
    d.write("s", 10)
    d.step(2 * HB)
    s = d.core.services["s"]
    assert s.primary == "h1" and "h2" in s.promotable
    d.up.discard("h1")
    holder, view_ms = d.core.leases["s"]
    assert holder == "h1"
    d.step(view_ms + MARGIN - 1 - d.now)
    # h2 was chosen, and waits: the lease as the coordinator saw it ended, not the margin.
    assert (s.primary, s.epoch) == ("h1", 1)
    assert d.core.failovers["s"].state == "waiting_lease"
    d.step(1)
    assert (s.primary, s.epoch) == ("h2", 2)
