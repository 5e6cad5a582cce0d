"""The coordinator's gRPC servicer: a thin adapter over `failover.coordinator.server`.

Trust (issue 13): with TLS the role check (`failover.net.authorization.RoleCheck`) has run
before a handler; what depends on the request is checked here: an agent registers and
heartbeats only as the host id in its certificate (`require_host`), a registered address
must parse. The names in a request are checked by the core (`failover.core.names`). Every
admin's and operator's call (create, delete, switchover, migrate, patch, drain, undrain) is
recorded in history with the caller's identity, its target and its outcome (`_audited`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import grpc
import grpc.aio
import msgpack

from failover import defaults
from failover.core.names import check_host_id
from failover.core.permissions import ADMIN, Identity, require_host
from failover.core.placement import Resources
from failover.core.roles import PRIMARY, SYNC
from failover.errors import (
    ConfigError,
    DrainCannotFinish,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    Unavailable,
)
from failover.net.address import parse_address
from failover.net.convert import (
    MODE_FROM_PROTO,
    ReportCache,
    heartbeat_reply,
    hook_reports,
    host_info,
    metrics_dict,
)
from failover.net.tls import peer_identity
from failover.storage.store import HistoryRecord
from failover.v1 import agent_pb2, coordinator_pb2, coordinator_pb2_grpc

ANONYMOUS = "anonymous (no TLS)"

if TYPE_CHECKING:
    from failover.coordinator.server import Coordinator


def check_name(name: str, what: str) -> None:
    if not name:
        raise InvalidRequest(f"{what} is required")


_REFUSED = (InvalidRequest, Unavailable, PermissionDenied, Overloaded)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, PermissionDenied):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if isinstance(exc, Overloaded):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, InvalidRequest):
        code = grpc.StatusCode.FAILED_PRECONDITION if (
            "not registered" in str(exc) or isinstance(exc, DrainCannotFinish)) \
            else grpc.StatusCode.INVALID_ARGUMENT
        await context.abort(code, str(exc))
    if isinstance(exc, Unavailable):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    raise exc


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    text = " ".join(str(exc).split())[:500]
    if isinstance(exc, Unavailable):
        return f"failed: {text}"
    if isinstance(exc, _REFUSED):
        return f"refused: {text}"
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return "ended: the caller went away"
    return f"failed: {type(exc).__name__}"


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._reports = ReportCache(defaults.COORDINATOR_HOSTS_MAX)

    def _identity(self, context: grpc.aio.ServicerContext) -> Identity | None:
        return peer_identity(context) if self.c.tls is not None else None

    def _as_host(self, context: grpc.aio.ServicerContext, host_id: str) -> None:
        """With TLS, an agent speaks only as the host id in its certificate."""
        check_name(host_id, "host_id")
        check_host_id(host_id)
        if self.c.tls is not None:
            require_host(peer_identity(context), host_id)

    @contextlib.asynccontextmanager
    async def _audited(self, context: grpc.aio.ServicerContext, rpc: str, target: str,
                       service: str = "") -> AsyncIterator[None]:
        """Records the call in history once it ends, however it ends."""
        identity = self._identity(context)
        caller = str(identity) if identity is not None else ANONYMOUS
        try:
            yield
        except Exception as exc:
            await self.c.audit(caller, rpc, target, _outcome(exc), service)
            raise
        except BaseException as exc:  # cancelled, or the stream closed: record it later
            self.c.audit_later(caller, rpc, target, _outcome(exc), service)
            raise
        await self.c.audit(caller, rpc, target, _outcome(None), service)

    async def Register(self, request: coordinator_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> coordinator_pb2.RegisterReply:
        try:
            self._as_host(context, request.host_id)
            check_name(request.address, "address")
            try:
                parse_address(request.address, what="registered address")
            except ConfigError as exc:
                raise InvalidRequest(str(exc)) from None
            await self.c.register(host_info(request), metrics_dict(request.metrics))
        except _REFUSED as exc:
            await _abort(context, exc)
        return coordinator_pb2.RegisterReply(heartbeat_ms=self.c.timing.heartbeat_ms,
                                             lease_ms=self.c.timing.lease_ms)

    async def Heartbeat(self, request: coordinator_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> coordinator_pb2.HeartbeatReply:
        try:
            self._as_host(context, request.host_id)
            leases = await self.c.heartbeat(request.host_id, metrics_dict(request.metrics),
                                            self._reports.reports(
                                                request, request.host_id in self.c.core.hosts),
                                            hook_reports(request),
                                            request.incarnation)
        except _REFUSED as exc:
            await _abort(context, exc)
        return heartbeat_reply(leases)

    async def ProcessExited(self, request: coordinator_pb2.ProcessExitedRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> coordinator_pb2.ProcessExitedReply:
        """A host's supervisor reports that its agent process exited: only as the host id
        in its certificate (`require_host`), like the agent's own reports."""
        try:
            self._as_host(context, request.host_id)
            if not math.isfinite(request.exited_at):
                raise InvalidRequest("exited_at must be a finite wall-clock time")
            await self.c.process_exited(request.host_id, request.incarnation,
                                        request.exit_code, request.exited_at)
        except _REFUSED as exc:
            await _abort(context, exc)
        return coordinator_pb2.ProcessExitedReply()

    async def WatchRoutes(self, request: coordinator_pb2.WatchRoutesRequest,
                          context: grpc.aio.ServicerContext,
                          ) -> AsyncIterator[coordinator_pb2.RoutesUpdate]:
        try:
            async for update in self.c.watch_routes(list(request.services)):
                yield update
        except _REFUSED as exc:
            await _abort(context, exc)

    async def GetClusterStatus(self, request: coordinator_pb2.ClusterStatusRequest,
                               context: grpc.aio.ServicerContext) -> coordinator_pb2.ClusterStatus:
        return self.c.status()

    async def CreateService(self, request: coordinator_pb2.CreateServiceRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> coordinator_pb2.CreateServiceReply:
        try:
            async with self._audited(context, "create", f"{request.name} ({request.kind})",
                                     request.name):
                check_name(request.name, "name")
                check_name(request.kind, "kind")
                from failover.kinds import load_kind

                try:
                    kind = load_kind(request.kind)
                except Exception as exc:
                    raise InvalidRequest(str(exc)) from None
                needs = Resources(kind.needs_cpu, kind.needs_memory_bytes,
                                  kind.needs_disk_bytes)
                await self.c.create_service(request.name, request.kind, request.replicas or 2,
                                            MODE_FROM_PROTO.get(request.mode, SYNC), needs,
                                            request.placement)
        except _REFUSED as exc:
            await _abort(context, exc)
        status = self.c.status()
        view = next(s for s in status.services if s.name == request.name)
        return coordinator_pb2.CreateServiceReply(service=view)

    async def DeleteService(self, request: coordinator_pb2.DeleteServiceRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> coordinator_pb2.DeleteServiceReply:
        try:
            async with self._audited(context, "delete", request.name, request.name):
                await self.c.delete_service(request.name)
        except _REFUSED as exc:
            await _abort(context, exc)
        return coordinator_pb2.DeleteServiceReply()

    async def Switchover(self, request: coordinator_pb2.SwitchoverRequest,
                         context: grpc.aio.ServicerContext) -> coordinator_pb2.SwitchoverReply:
        try:
            async with self._audited(context, "switchover",
                                     f"{request.service} to {request.to_host_id or 'any'}",
                                     request.service):
                epoch, primary, stall_ms = await self.c.switchover(request.service,
                                                                   request.to_host_id)
        except _REFUSED as exc:
            await _abort(context, exc)
        return coordinator_pb2.SwitchoverReply(epoch=epoch, primary_host_id=primary,
                                               stall_ms=stall_ms)

    async def DrainHost(self, request: coordinator_pb2.DrainHostRequest,
                        context: grpc.aio.ServicerContext) -> coordinator_pb2.DrainHostReply:
        try:
            async with self._audited(context, "drain" if request.draining else "undrain",
                                     request.host_id):
                check_name(request.host_id, "host_id")
                cannot_finish = await self.c.set_draining(request.host_id, request.draining,
                                                          request.must_finish)
        except _REFUSED as exc:
            await _abort(context, exc)
        host = next(h for h in self.c.status().hosts if h.host_id == request.host_id)
        return coordinator_pb2.DrainHostReply(host=host, cannot_finish=cannot_finish)

    async def Migrate(self, request: coordinator_pb2.MigrateRequest,
                      context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[agent_pb2.MigrationProgress]:
        try:
            async with self._audited(context, "migrate",
                                     f"{request.service} ({request.replica or PRIMARY}) to "
                                     f"{request.to_host_id}", request.service):
                check_name(request.service, "service")
                check_name(request.to_host_id, "to_host_id")
                async for progress in self.c.migrate(
                        request.service, request.to_host_id, request.replica or PRIMARY,
                        request.max_downtime_ms, request.method or "precopy",
                        request.from_host_id, request.max_bandwidth_bytes_s):
                    yield progress
        except _REFUSED as exc:
            await _abort(context, exc)

    async def Patch(self, request: coordinator_pb2.PatchRequest,
                    context: grpc.aio.ServicerContext,
                    ) -> AsyncIterator[coordinator_pb2.PatchProgress]:
        identity = self._identity(context)
        hosts = "all hosts" if request.all else ", ".join(request.host_ids[:16]) + (
            f" and {len(request.host_ids) - 16} more" if len(request.host_ids) > 16 else "")
        command = f" running {request.command[:64]!r}" if request.command else ""
        try:
            async with self._audited(context, "patch", hosts + command):
                async for progress in self.c.patch(
                        list(request.host_ids), request.all, request.command, request.failback,
                        request.method or "precopy", request.command_timeout_ms,
                        show_output=identity is not None and identity.role == ADMIN):
                    yield progress
        except _REFUSED as exc:
            await _abort(context, exc)

    async def GetHistory(self, request: coordinator_pb2.HistoryRequest,
                         context: grpc.aio.ServicerContext) -> coordinator_pb2.HistoryReply:
        records = await self.c.history(request.service, request.limit)
        return coordinator_pb2.HistoryReply(events=[history_event(r) for r in records])

    async def WatchHistory(self, request: coordinator_pb2.WatchHistoryRequest,
                           context: grpc.aio.ServicerContext,
                           ) -> AsyncIterator[coordinator_pb2.HistoryEvent]:
        try:
            after_seq = request.after_seq if request.HasField("after_seq") else None
            async for record in self.c.watch_history(request.service, after_seq,
                                                     request.last, request.follow):
                yield history_event(record)
        except _REFUSED as exc:
            await _abort(context, exc)


def history_event(record: HistoryRecord) -> coordinator_pb2.HistoryEvent:
    """A stored history record as the wire's event (details as msgpack)."""
    return coordinator_pb2.HistoryEvent(
        seq=record.seq, at=record.at, service=record.service, kind=record.kind,
        message=record.message, details=msgpack.packb(record.details, use_bin_type=True))


def add_to_server(server: grpc.aio.Server, coordinator: Coordinator) -> None:
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coordinator),
                                                           server)
