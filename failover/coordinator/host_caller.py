"""The control calls the coordinator sends one agent: queued per service, several in flight.

The core decides; the server queues each AssignRole, StepDown and DropReplica here, for the
host it goes to, and never waits for it. The rules:

- Calls for one service go out one at a time, in the order they were queued: the second
  assignment of a service never overtakes the first (an agent refuses an older epoch, but
  two calls at the same epoch, say a promotion and then its wider in-sync set, must land in
  order).
- Calls for different services go out side by side, up to `in_flight_max` at once. A host
  death promotes a few services on each survivor at the same moment; one at a time, each
  waiting for the agent's answer (its meta written and synced, 50-350 ms on a loaded
  machine), the last of six promotions on a host landed a second after the first
  (benchmarks/storm.py: p99 writable again 1.9 s).
- Services are served in the order their oldest queued call arrived.
- At most `queue_max` calls wait (`asyncio.QueueFull` past it): the caller drops the call
  and says so; heartbeats re-send what a host lacks.
- Failures are logged, never raised: the heartbeats that follow show what did not land.
- Nothing is sent once `acting()` says this coordinator no longer leads.

With TLS the agent must present a certificate naming its host id (`server_name`), whatever
address it registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable

import grpc
import grpc.aio

from failover import defaults
from failover.core.coordinator import AssignRole, DropReplica, StepDown
from failover.net import channels
from failover.net.convert import assign_request
from failover.net.tls import TlsMaterial
from failover.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

AGENT_CALL_TIMEOUT_S = defaults.AGENT_CALL_TIMEOUT_MS / 1000

HostCall = AssignRole | StepDown | DropReplica


class HostCaller:
    """Sends one agent its control calls (see the module docstring for the order)."""

    def __init__(self, address: str, host_id: str, tls: TlsMaterial | None = None,
                 term: int = 0, acting: Callable[[], bool] = lambda: True,
                 in_flight_max: int | None = None, queue_max: int | None = None) -> None:
        # Read at construction, not import: a test or a config may have changed them.
        if in_flight_max is None:
            in_flight_max = defaults.COORDINATOR_HOST_CALLS_IN_FLIGHT_MAX
        if queue_max is None:
            queue_max = defaults.COORDINATOR_HOST_QUEUE_MAX
        assert in_flight_max >= 1 and queue_max >= 1, (in_flight_max, queue_max)
        self.address = address
        self.host_id = host_id
        self.tls = tls
        # Every call says which term sends it; the callers of a term are closed when it ends.
        self.metadata = ((channels.COORDINATOR_TERM_METADATA_KEY, str(term)),)
        self.acting = acting  # False once the store says the term ended: nothing more goes out
        self.in_flight_max = in_flight_max
        self.queue_max = queue_max
        self.channel = self._connect()
        self.stub = agent_pb2_grpc.AgentControlStub(self.channel)
        # Per service, its calls not yet sent, oldest first; services in the order their
        # oldest call arrived (a service whose calls all went out leaves, and re-enters at
        # the end).
        self._pending: OrderedDict[str, deque[HostCall]] = OrderedDict()
        self._pending_count = 0
        self._busy: set[str] = set()  # services with a call in flight
        self._calls: set[asyncio.Task[None]] = set()
        # Per service, the last call queued for it and not yet taken (see `queued`).
        self._last_queued: dict[str, HostCall] = {}
        self._wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def qsize(self) -> int:
        """Calls queued, not yet sent."""
        return self._pending_count

    def full(self) -> bool:
        return self._pending_count >= self.queue_max

    def in_flight(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._busy)

    def queued(self, action: HostCall) -> bool:
        """Whether the last call queued for `action`'s service, not yet sent, is equal to it:
        then queuing it again changes nothing (sent twice in a row, the second is a no-op).
        A registering agent is re-sent every assignment it holds (agents before the fix in
        `CoordinatorLink._run` registered again after any failed heartbeat); on a loaded
        machine those re-sends piled up by the thousand (90,000 queued in all) ahead of a
        failover's promotions."""
        return self._last_queued.get(action.service) == action

    def put(self, action: HostCall) -> None:
        """Queues `action` behind the calls of its service (QueueFull when the queue is)."""
        if self.full():
            raise asyncio.QueueFull
        self._pending.setdefault(action.service, deque()).append(action)
        self._pending_count += 1
        self._last_queued[action.service] = action
        self._wake.set()

    def _take(self) -> HostCall | None:
        """The oldest queued call of the first service with none in flight (None: none)."""
        # Skips at most `in_flight_max` services: only those with a call in flight.
        for service, calls in self._pending.items():
            if service in self._busy:
                continue
            action = calls.popleft()
            if not calls:
                del self._pending[service]
            self._pending_count -= 1
            if self._last_queued.get(service) is action:
                del self._last_queued[service]  # taken: an equal one is sent again
            return action
        return None

    async def _run(self) -> None:
        while True:
            while len(self._busy) < self.in_flight_max and (action := self._take()) is not None:
                self._busy.add(action.service)
                call = asyncio.get_running_loop().create_task(self._send(action))
                self._calls.add(call)
                call.add_done_callback(lambda task, s=action.service: self._sent(task, s))
            self._wake.clear()
            await self._wake.wait()

    def _sent(self, call: asyncio.Task[None], service: str) -> None:
        self._calls.discard(call)
        self._busy.discard(service)
        self._wake.set()

    async def _send(self, action: HostCall) -> None:
        if not self.acting():
            log.info("%s to %s not sent: this coordinator no longer leads",
                     type(action).__name__, self.address)
            return
        try:
            await self._call(action)
        except grpc.aio.AioRpcError as exc:
            log.info("%s of %s to %s failed: %s %s", type(action).__name__, action.service,
                     self.address, exc.code().name, exc.details())
        except Exception:
            log.exception("%s of %s to %s failed", type(action).__name__, action.service,
                          self.address)

    def _connect(self) -> grpc.aio.Channel:
        return channels.channel(self.address, self.tls, server_name=self.host_id or None,
                                own_connection=True)

    async def _call(self, action: HostCall) -> None:
        if isinstance(action, AssignRole):
            await self.stub.AssignRole(assign_request(action), timeout=AGENT_CALL_TIMEOUT_S,
                                       metadata=self.metadata)
        elif isinstance(action, StepDown):
            await self.stub.StepDown(agent_pb2.StepDownRequest(
                service=action.service, epoch=action.epoch), timeout=AGENT_CALL_TIMEOUT_S,
                metadata=self.metadata)
        elif isinstance(action, DropReplica):
            await self.stub.DropReplica(agent_pb2.DropReplicaRequest(
                service=action.service, epoch=action.epoch, delete_data=True),
                timeout=AGENT_CALL_TIMEOUT_S, metadata=self.metadata)
        else:
            raise AssertionError(action)

    def reconnect(self) -> None:
        """A fresh channel: the old one may sit in reconnect backoff after the host was down,
        failing calls for up to a second although the host serves again. Its own connection:
        one shared with the old channel would still be in that backoff, and the returning
        host's assignment (its new primary and peers) would fail at once and never be sent
        again, as heartbeats re-send only a role or epoch that differs."""
        old = self.channel
        self.channel = self._connect()
        self.stub = agent_pb2_grpc.AgentControlStub(self.channel)
        # Calls in flight on the old channel finish (or time out) first: closing it at once
        # would cancel an assignment mid-call.
        loop = asyncio.get_running_loop()
        loop.call_later(AGENT_CALL_TIMEOUT_S + 1, lambda: loop.create_task(old.close()))

    def stop(self) -> None:
        """No call starts after this (those in flight go on until `close`)."""
        self.task.cancel()

    async def close(self) -> None:
        self.task.cancel()
        for call in list(self._calls):
            call.cancel()
        for task in [self.task, *self._calls]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.channel.close()
