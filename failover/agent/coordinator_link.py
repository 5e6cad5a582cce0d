"""The agent's side of the coordinator: register, heartbeat, receive leases.

Heartbeats go every `heartbeat_ms` with the host's metrics and every replica's role, epoch
and indexes; the answer grants leases to this host's primaries. When no coordinator answers,
nothing else changes: primaries keep serving (reads then confirm the epoch with duplicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Protocol

import grpc
import grpc.aio

from failover.agent.config import AgentConfig
from failover.clock import monotonic_ms
from failover.net import channels
from failover.net.convert import ReportsStatus, host_metrics, replica_status
from failover.net.tls import TlsMaterial
from failover.v1 import coordinator_pb2, coordinator_pb2_grpc


class LeasedReplica(ReportsStatus, Protocol):
    """What the link needs of a replica (failover.agent.replica.Replica)."""

    def grant_lease(self, epoch: int, lease_ms: int, sent_ms: int) -> None: ...


class HeartbeatingAgent(Protocol):
    """What the link needs of its agent (failover.agent.host.Agent)."""

    host_id: str
    version: str
    started_at: float
    tls: TlsMaterial | None

    @property
    def config(self) -> AgentConfig: ...
    @property
    def replicas(self) -> Mapping[str, LeasedReplica]: ...


log = logging.getLogger(__name__)


class CoordinatorLink:
    """Keeps this agent registered with, and heartbeating to, one of the coordinators."""

    def __init__(self, agent: HeartbeatingAgent, addresses: list[str]) -> None:
        assert addresses
        self.agent = agent
        self.addresses = addresses
        self._current = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._registered_with: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_ok_ms = 0

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
            address = self.addresses[self._current]
            try:
                await self._beat(address)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.INVALID_ARGUMENT):
                    self._registered_with = None  # the coordinator forgot us: register again
                else:
                    self._registered_with = None
                    self._current = (self._current + 1) % len(self.addresses)
                log.debug("heartbeat to %s failed: %s", address, exc.code().name)
            except Exception:
                log.exception("heartbeat to %s failed", address)
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, period_s - elapsed))

    async def _beat(self, address: str) -> None:
        agent = self.agent
        timeout_s = max(0.05, agent.config.heartbeat_ms * 2 / 1000)
        stub = self._stub(address)
        if self._registered_with != address:
            await stub.Register(coordinator_pb2.RegisterRequest(
                host_id=agent.host_id, address=agent.config.address, zone=agent.config.zone,
                version=agent.version, started_at=agent.started_at,
                metrics=host_metrics(str(agent.config.data_dir)),
            ), timeout=timeout_s)
            self._registered_with = address
            log.info("registered with coordinator %s", address)
        sent_ms = monotonic_ms()
        reply = await stub.Heartbeat(coordinator_pb2.HeartbeatRequest(
            host_id=agent.host_id, metrics=host_metrics(str(agent.config.data_dir)),
            replicas=[replica_status(r) for r in agent.replicas.values()],
        ), timeout=timeout_s)
        self.last_ok_ms = monotonic_ms()
        for grant in reply.leases:
            replica = agent.replicas.get(grant.service)
            if replica is not None:
                replica.grant_lease(grant.epoch, grant.lease_ms, sent_ms)
