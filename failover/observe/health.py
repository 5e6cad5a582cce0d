"""Health: who serves what, for load balancers and orchestrators (issue 17).

One answer, two doors. The standard gRPC health service (`grpc.health.v1.Health`, from
grpcio-health-checking) on each daemon's gRPC port, and the HTTP paths on its
``--metrics-listen`` port (`failover.observe.endpoint`):

* agent: the overall service ``""`` is SERVING while the daemon runs; a failover service name
  (``kv1``) is SERVING on the host whose replica serves clients as primary now (not broken,
  not fenced, confirmed by the coordinator after a restart) and NOT_SERVING everywhere else;
  ``/primary/<service>`` answers 200 or 503 the same way, ``/replica/<service>`` 200 on a
  host holding a healthy duplica of it (as Patroni's ``/primary`` and ``/replica``);
* coordinator: ``""`` SERVING while it runs, ``failover.v1.Coordinator`` SERVING on the leader
  and NOT_SERVING on a follower; ``/leader`` 200 or 503 the same way.

Health changes nothing and says only what routes already tell any client, so it is open to
anyone who reaches the port: with TLS, any identity of the cluster's CA (the role check lets
`HEALTH` through for every role); the HTTP port asks for no certificate. A name that breaks
the name rule is INVALID_ARGUMENT (HTTP 400); Watch streams are bounded
(`HEALTH_WATCHERS_MAX`) and look again every `HEALTH_WATCH_POLL_MS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from failover import defaults
from failover.core.names import check_service_name
from failover.core.roles import DUPLICA
from failover.errors import FailoverError, InvalidRequest
from failover.observe.endpoint import Reply, Route, reply_json

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
COORDINATOR_SERVICE = "failover.v1.Coordinator"  # the name a coordinator's leadership answers to


class _Replica(Protocol):
    role: str
    core: Any


class _Agent(Protocol):
    replicas: dict[str, Any]


def serves_as_primary(replica: _Replica) -> bool:
    """Whether `replica` serves clients as the primary now: the core's own test of a write
    (`ReplicaCore.check_primary`): not broken, primary, not fenced, confirmed."""
    try:
        replica.core.check_primary(0)
    except FailoverError:
        return False
    return True


def serves_as_duplica(replica: _Replica) -> bool:
    """Whether `replica` is a duplica that can vouch for its copy (not broken)."""
    return replica.role == DUPLICA and not replica.core.broken


def agent_answer(agent: _Agent, service: str, want: str) -> bool:
    """Whether this agent answers yes to "is `service`'s `want` (primary or replica) here?".
    Raises InvalidRequest for a name the name rule refuses."""
    check_service_name(service)
    replica = agent.replicas.get(service)
    if replica is None:
        return False
    return serves_as_primary(replica) if want == "primary" else serves_as_duplica(replica)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The gRPC health service over a function answering "does this daemon serve `name`?"
    (`answer`, raising InvalidRequest for a bad name); ``""`` is the daemon itself."""

    def __init__(self, answer: Callable[[str], bool], names: Callable[[], list[str]]) -> None:
        self._answer = answer
        self._names = names  # what List reports besides "": bounded by the daemon's replicas
        self._watchers = 0

    def _status(self, service: str) -> int:
        if not service:
            return SERVING
        return SERVING if self._answer(service) else NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        try:
            status = self._status(request.service)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        names = ["", *self._names()]
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=self._status(name)) for name in names})

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext,
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if self._watchers >= defaults.HEALTH_WATCHERS_MAX:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self._watchers} health watches are open (at most "
                                f"{defaults.HEALTH_WATCHERS_MAX}): use Check, or close one")
        self._watchers += 1
        try:
            last: int | None = None
            while True:
                try:
                    status = self._status(request.service)
                except InvalidRequest as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                await asyncio.sleep(defaults.HEALTH_WATCH_POLL_MS / 1000)
        finally:
            self._watchers -= 1


def agent_health(agent: _Agent) -> HealthServicer:
    """The health service of an agent: a service name is SERVING where its primary serves."""
    return HealthServicer(lambda service: agent_answer(agent, service, "primary"),
                          lambda: sorted(agent.replicas))


def coordinator_health(leading: Callable[[], bool]) -> HealthServicer:
    """The health service of a coordinator: `COORDINATOR_SERVICE` is SERVING while it leads;
    any other name is INVALID_ARGUMENT (a coordinator serves no failover service itself)."""

    def answer(service: str) -> bool:
        if service != COORDINATOR_SERVICE:
            raise InvalidRequest(f"a coordinator's health answers for {COORDINATOR_SERVICE!r} "
                                 f"(leading) and '' (running), not {service[:80]!r}")
        return leading()

    return HealthServicer(answer, lambda: [COORDINATOR_SERVICE])


def add_to_server(server: grpc.aio.Server, servicer: HealthServicer) -> None:
    """Serves `servicer` as `grpc.health.v1.Health` on `server`."""
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def agent_routes(agent: _Agent, host_id: str) -> dict[str, Route]:
    """The agent's health paths on its metrics port: ``/healthz`` (200 while it runs, with
    what it holds), ``/primary/<service>`` and ``/replica/<service>`` (200 or 503)."""

    def healthz(_rest: str) -> Reply:
        roles = {name: ("primary" if serves_as_primary(r) else r.role)
                 for name, r in sorted(agent.replicas.items())}
        return reply_json(200, {"host": host_id, "status": "serving", "replicas": roles})

    def answer(want: str) -> Route:
        def route(service: str) -> Reply:
            yes = agent_answer(agent, service, want)
            return reply_json(200 if yes else 503, {"host": host_id, "service": service,
                                                    want: yes})
        return route

    return {"/healthz": healthz, "/primary/": answer("primary"), "/replica/": answer("replica")}


def coordinator_routes(leading: Callable[[], bool]) -> dict[str, Route]:
    """The coordinator's health paths: ``/healthz`` (200 while it runs) and ``/leader`` (200
    on the leader, 503 on a follower)."""

    def healthz(_rest: str) -> Reply:
        return reply_json(200, {"status": "serving", "leader": leading()})

    def leader(_rest: str) -> Reply:
        yes = leading()
        return reply_json(200 if yes else 503, {"leader": yes})

    return {"/healthz": healthz, "/leader": leader}
