"""The agent's side of the coordinator: register, heartbeat, receive leases.

Heartbeats go every `heartbeat_ms` with the host's metrics and every replica's role, epoch
and indexes; the answer grants leases to this host's primaries. When no coordinator answers,
nothing else changes: primaries keep serving (reads then confirm the epoch with duplicas).
With several coordinators (issue 15) the link follows the leader (`failover.net.leader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import grpc
import grpc.aio

from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.hooks import HookResult, HookRunner
from failover.agent.term import CoordinatorTerm
from failover.clock import monotonic_ms
from failover.errors import StorageError
from failover.net import channels
from failover.net.convert import ReportsStatus, host_metrics, status_message
from failover.net.leader import LeaderFollower
from failover.net.tls import TlsMaterial
from failover.v1 import agent_pb2, coordinator_pb2, coordinator_pb2_grpc


class LeasedReplica(ReportsStatus, Protocol):
    """What the link needs of a replica (failover.agent.replica.Replica)."""

    def grant_lease(self, epoch: int, lease_ms: int, sent_ms: int) -> None: ...


class HeartbeatingAgent(Protocol):
    """What the link needs of its agent (failover.agent.host.Agent)."""

    host_id: str
    version: str
    started_at: float
    incarnation: int
    tls: TlsMaterial | None
    coordinator_term: CoordinatorTerm

    @property
    def hooks(self) -> HookRunner: ...

    @property
    def config(self) -> AgentConfig: ...
    @property
    def replicas(self) -> Mapping[str, LeasedReplica]: ...


log = logging.getLogger(__name__)


class DeposedCoordinator(Exception):
    """A coordinator answered with a term older than one this agent has seen."""


class CoordinatorLink:
    """Keeps this agent registered with, and heartbeating to, the leader among the
    coordinators: a follower's UNAVAILABLE that names the leader (one of `addresses`) sends
    the next beat there at once; any other failure moves to the next address after a backoff
    of one to `AGENT_COORDINATOR_BACKOFF_BEATS_MAX` heartbeat periods. The term in the
    leader's replies raises the agent's (`failover.agent.term`); a reply from an older term
    (a deposed leader) grants no lease and moves on."""

    def __init__(self, agent: HeartbeatingAgent, addresses: list[str]) -> None:
        assert addresses
        self.agent = agent
        self.addresses = addresses
        # Each replica's last reported status and its message (`_statuses`).
        self._sent: dict[str, tuple[dict[str, Any], agent_pb2.ReplicaStatus]] = {}
        period_ms = agent.config.heartbeat_ms
        self.coordinators = LeaderFollower(
            addresses, backoff_min_ms=period_ms,
            backoff_max_ms=period_ms * defaults.AGENT_COORDINATOR_BACKOFF_BEATS_MAX,
            shuffle=True)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._registered_with: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_ok_ms = 0

    @property
    def leader(self) -> str | None:
        """The coordinator that answered the last heartbeat, if it did."""
        return self.coordinators.leader

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeats")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for channel in self._channels.values():
            await channel.close()

    def _stub(self, address: str) -> coordinator_pb2_grpc.CoordinatorStub:
        channel = self._channels.get(address)
        if channel is None:
            # With TLS the coordinator's certificate must name the host it is dialled at.
            channel = self._channels[address] = channels.channel(address, self.agent.tls)
        return coordinator_pb2_grpc.CoordinatorStub(channel)

    async def _run(self) -> None:
        period_s = self.agent.config.heartbeat_ms / 1000
        while True:
            started = asyncio.get_running_loop().time()
            address = self.coordinators.current
            wait_s = period_s
            try:
                await self._beat(address)
                self.coordinators.answered()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.INVALID_ARGUMENT):
                    # The coordinator forgot us: register again, with the same one.
                    self._registered_with = None
                else:
                    # A slow or lost beat is not a new agent: registering again would make
                    # the coordinator re-send every assignment of this host, and under a
                    # storm's load those calls piled up ahead of promotions. Another address
                    # is registered with anyway (`_beat` compares it), and a coordinator
                    # that lost us answers the next beat with INVALID_ARGUMENT.
                    wait_s = self.coordinators.failed(exc)
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        # The beat waited out its deadline (two periods), longer than the
                        # period: the next goes at once, with no backoff on top. A slow
                        # but live coordinator still takes late beats, and a saturated
                        # host that backed off after each (up to 4 periods) beat only once
                        # per failure timeout: its primaries were failed over while it
                        # served (storm benchmark, in runs with every agent's beats late).
                        wait_s = period_s
                log.debug("heartbeat to %s failed: %s %s", address, exc.code().name,
                          exc.details())
            except DeposedCoordinator as exc:
                self._registered_with = None
                wait_s = self.coordinators.failed()
                log.warning("%s", exc)
            except Exception:
                log.exception("heartbeat to %s failed", address)
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, wait_s - elapsed))

    def _learn_term(self, address: str, term: int) -> None:
        """Raises the agent's term to a reply's; DeposedCoordinator if the reply's is older."""
        keeper = self.agent.coordinator_term
        try:
            keeper.observe(term)
        except StorageError:
            log.exception("coordinator term %d from %s", term, address)
        if term < keeper.seen:
            raise DeposedCoordinator(
                f"coordinator {address} answered at term {term}, older than term "
                f"{keeper.seen} this agent has seen: it was deposed; its leases are ignored "
                "and the next coordinator is tried")

    async def _beat(self, address: str) -> None:
        agent = self.agent
        timeout_s = max(0.05, agent.config.heartbeat_ms * 2 / 1000)
        stub = self._stub(address)
        if self._registered_with != address:
            registered = await stub.Register(coordinator_pb2.RegisterRequest(
                host_id=agent.host_id, address=agent.config.address, zone=agent.config.zone,
                version=agent.version, started_at=agent.started_at,
                incarnation=agent.incarnation,
                metrics=host_metrics(str(agent.config.data_dir)),
            ), timeout=timeout_s)
            self._learn_term(address, registered.coordinator_term)
            self._registered_with = address
            log.info("registered with coordinator %s (term %d)", address,
                     registered.coordinator_term)
        sent_ms = monotonic_ms()
        hooks = agent.hooks.pending()  # the hooks run since, for history (issue 17)
        reply = await stub.Heartbeat(coordinator_pb2.HeartbeatRequest(
            host_id=agent.host_id, metrics=host_metrics(str(agent.config.data_dir)),
            replicas=self._statuses(),
            hook_results=[_hook_message(h) for h in hooks],
            incarnation=agent.incarnation,
        ), timeout=timeout_s)
        # Before any grant: a deposed leader's leases are not taken.
        self._learn_term(address, reply.coordinator_term)
        agent.hooks.delivered(hooks)
        self.last_ok_ms = monotonic_ms()
        for grant in reply.leases:
            replica = agent.replicas.get(grant.service)
            if replica is not None:
                replica.grant_lease(grant.epoch, grant.lease_ms, sent_ms)

    def _statuses(self) -> list[agent_pb2.ReplicaStatus]:
        """Every replica's status for a heartbeat. A status equal to the one last sent
        reuses its message: at rest none changes, and building every message anew (60
        replicas, ten times a second) was a few percent of an idle agent's CPU."""
        before = self._sent
        now: dict[str, tuple[dict[str, Any], agent_pb2.ReplicaStatus]] = {}
        for service, replica in self.agent.replicas.items():
            status = replica.status()
            hit = before.get(service)
            if hit is None or hit[0] != status:
                hit = (status, status_message(status))
            now[service] = hit
        self._sent = now
        return [message for _status, message in now.values()]


def _hook_message(result: HookResult) -> coordinator_pb2.HookResult:
    """A hook's result as the heartbeat carries it."""
    return coordinator_pb2.HookResult(
        seq=result.seq, service=result.service, event=result.event, command=result.command,
        role=result.role, epoch=result.epoch, exit_code=result.exit_code,
        output=result.output, duration_ms=result.duration_ms, timed_out=result.timed_out,
        skipped=result.skipped)
