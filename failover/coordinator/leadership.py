"""A coordinator among several: the redirect a follower answers with, the term in replies,
and the loop that campaigns, leads and steps down (issue 15, docs/etcd.md).

A follower answers every Coordinator call except GetClusterStatus and GetHistory with
UNAVAILABLE, the message "coordinator ADDR is not the leader; the leader is LEADER (term T)"
and the trailing metadata ``failover-leader: HOST:PORT`` (absent when no leader is known), so
agents, clients and failoverctl go to the leader. The leader stamps its term on heartbeat and
register replies; agents keep the highest they saw and refuse control calls of an older one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from failover import defaults
from failover.core.permissions import HEALTH_METHODS
from failover.net import channels
from failover.net.authorization import Check, CheckFirst
from failover.net.coordinator_servicer import CoordinatorServicer
from failover.storage.store import CoordinatorInfo
from failover.v1 import coordinator_pb2, coordinator_pb2_grpc

if TYPE_CHECKING:
    from failover.coordinator.server import Coordinator

log = logging.getLogger(__name__)

LEADER_METADATA = channels.LEADER_METADATA_KEY
_SERVICE = "/failover.v1.Coordinator/"
# Served by any coordinator, from the store.
ANY_COORDINATOR = frozenset({_SERVICE + "GetClusterStatus", _SERVICE + "GetHistory",
                             *HEALTH_METHODS})  # a follower says itself that it does not lead


class LeaderHint:
    """Who leads, as the store said at most `COORDINATOR_LEADER_HINT_TTL_MS` ago: redirects
    read it without a store round trip each; one refresh at a time, bounded in time."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.leader: CoordinatorInfo | None = None
        self._at = float("-inf")
        self._refresh: asyncio.Task[None] | None = None

    async def get(self) -> CoordinatorInfo | None:
        stale = (time.monotonic() - self._at) * 1000 > defaults.COORDINATOR_LEADER_HINT_TTL_MS
        if stale:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.get_running_loop().create_task(self._fetch())
            # shield: one caller's deadline does not cancel the refresh the others wait on
            with contextlib.suppress(Exception, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._refresh),
                                       defaults.COORDINATOR_STORE_READ_TIMEOUT_MS / 1000)
        return self.leader

    async def _fetch(self) -> None:
        try:
            self.leader = await self.coordinator.store.leader()
        except Exception as exc:  # the store is unreachable: say nobody is known
            log.info("cannot ask the store who leads: %s", exc)
            self.leader = None
        self._at = time.monotonic()


def redirect_message(address: str, leader: CoordinatorInfo | None) -> str:
    """The contract's message of a follower's UNAVAILABLE."""
    if leader is None or not leader.address:
        return (f"coordinator {address} is not the leader; no leader is known now (an "
                "election is under way or the store is unreachable): retry shortly")
    return (f"coordinator {address} is not the leader; the leader is {leader.address} "
            f"(term {leader.term})")


class LeaderGate(CheckFirst):
    """Redirects every call but the reads in `ANY_COORDINATOR` while this coordinator does
    not lead (install after the role check: a caller without the right is refused first)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.hint = LeaderHint(coordinator)

    async def _redirect(self, context: grpc.aio.ServicerContext) -> None:
        leader = await self.hint.get()
        if leader is not None and leader.address == self.coordinator.address:
            leader = None  # the store still names this one: it just stopped (or starts)
        metadata = ((LEADER_METADATA, leader.address),) if leader and leader.address else ()
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            redirect_message(self.coordinator.address, leader),
                            trailing_metadata=metadata)

    def check_for(self, details: grpc.HandlerCallDetails) -> Check | None:
        if details.method in ANY_COORDINATOR:
            return None

        async def check(_request: Any, context: grpc.aio.ServicerContext) -> None:
            if not self.coordinator.leading:
                await self._redirect(context)

        return check


class LeadingServicer(CoordinatorServicer):
    """The servicer of a coordinator among several: heartbeat and register replies carry the
    term they were answered under, and status lists the coordinators."""

    async def Register(self, request: coordinator_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> coordinator_pb2.RegisterReply:
        term = self.c.term  # the term that accepts it; a deposal meanwhile fails the call
        reply = await super().Register(request, context)
        reply.coordinator_term = term
        return reply

    async def Heartbeat(self, request: coordinator_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> coordinator_pb2.HeartbeatReply:
        term = self.c.term
        reply = await super().Heartbeat(request, context)
        reply.coordinator_term = term
        return reply

    async def ProcessExited(self, request: coordinator_pb2.ProcessExitedRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> coordinator_pb2.ProcessExitedReply:
        term = self.c.term
        reply = await super().ProcessExited(request, context)
        reply.coordinator_term = term
        return reply

    async def GetClusterStatus(self, request: coordinator_pb2.ClusterStatusRequest,
                               context: grpc.aio.ServicerContext) -> coordinator_pb2.ClusterStatus:
        from failover.errors import Unavailable

        try:
            return await self.c.cluster_status()
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # not reached: abort raises


def add_to_server(server: grpc.aio.Server, coordinator: Coordinator) -> None:
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(LeadingServicer(coordinator), server)


async def campaign_loop(coordinator: Coordinator, stopping: asyncio.Event) -> None:
    """Campaigns, leads, and on losing leadership steps down at once and campaigns again,
    until `stopping`. A store that fails (unreachable) is tried again with a bounded
    backoff; meanwhile this coordinator answers as a follower."""
    store = coordinator.store
    backoff_ms = defaults.COORDINATOR_CAMPAIGN_BACKOFF_MIN_MS
    while not stopping.is_set():
        try:
            term = await store.campaign(coordinator.address)
            if not (coordinator.leading and coordinator.term == term):
                await coordinator.lead(term)  # (SQLite: the daemon led before serving)
        except Exception as exc:
            log.warning("campaign or load failed (%s): trying again in %d ms", exc, backoff_ms)
            coordinator.deposed(f"could not take the lead: {exc}")
            with contextlib.suppress(Exception):
                await store.resign()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), backoff_ms / 1000)
            backoff_ms = min(backoff_ms * 2, defaults.COORDINATOR_CAMPAIGN_BACKOFF_MAX_MS)
            continue
        backoff_ms = defaults.COORDINATOR_CAMPAIGN_BACKOFF_MIN_MS
        waits = [asyncio.ensure_future(store.wait_lost()),
                 asyncio.ensure_future(coordinator.lost.wait()),
                 asyncio.ensure_future(stopping.wait())]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if waits[0] in done and waits[0].exception() is not None:
            why = f"waiting on the leadership failed: {waits[0].exception()}"
        elif waits[2] in done:
            why = "stopping"
        else:
            why = "leadership lost (the store could not renew it, or another took it)"
        # No await between knowing and stopping: nothing of this term goes out after it.
        coordinator.deposed(why)
        with contextlib.suppress(Exception):
            await store.resign()
