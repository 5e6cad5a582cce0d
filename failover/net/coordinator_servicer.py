"""The coordinator's gRPC servicer: a thin adapter over `failover.coordinator.server`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import grpc
import grpc.aio
import msgpack

from failover.core.names import check_service_name
from failover.core.placement import Resources
from failover.core.roles import PRIMARY, SYNC
from failover.errors import InvalidRequest, Unavailable
from failover.net.convert import (
    MODE_FROM_PROTO,
    heartbeat_reply,
    host_info,
    metrics_dict,
    replica_reports,
)
from failover.v1 import agent_pb2, coordinator_pb2, coordinator_pb2_grpc

if TYPE_CHECKING:
    from failover.coordinator.server import Coordinator


def check_name(name: str, what: str) -> None:
    if not name:
        raise InvalidRequest(f"{what} is required")


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, InvalidRequest):
        code = grpc.StatusCode.FAILED_PRECONDITION if "not registered" in str(exc) \
            else grpc.StatusCode.INVALID_ARGUMENT
        await context.abort(code, str(exc))
    if isinstance(exc, Unavailable):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    raise exc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    async def Register(self, request: coordinator_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> coordinator_pb2.RegisterReply:
        try:
            check_name(request.host_id, "host_id")
            check_name(request.address, "address")
            await self.c.register(host_info(request), metrics_dict(request.metrics))
        except (InvalidRequest, Unavailable) as exc:
            await _abort(context, exc)
        return coordinator_pb2.RegisterReply(heartbeat_ms=self.c.timing.heartbeat_ms,
                                             lease_ms=self.c.timing.lease_ms)

    async def Heartbeat(self, request: coordinator_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> coordinator_pb2.HeartbeatReply:
        try:
            leases = await self.c.heartbeat(request.host_id, metrics_dict(request.metrics),
                                            replica_reports(request))
        except (InvalidRequest, Unavailable) as exc:
            await _abort(context, exc)
        return heartbeat_reply(leases)

    async def WatchRoutes(self, request: coordinator_pb2.WatchRoutesRequest,
                          context: grpc.aio.ServicerContext,
                          ) -> AsyncIterator[coordinator_pb2.RoutesUpdate]:
        try:
            async for update in self.c.watch_routes():
                yield update
        except Unavailable as exc:
            await _abort(context, exc)

    async def GetClusterStatus(self, request: coordinator_pb2.ClusterStatusRequest,
                               context: grpc.aio.ServicerContext) -> coordinator_pb2.ClusterStatus:
        return self.c.status()

    async def CreateService(self, request: coordinator_pb2.CreateServiceRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> coordinator_pb2.CreateServiceReply:
        try:
            check_name(request.name, "name")
            check_name(request.kind, "kind")
            from failover.kinds import load_kind

            check_service_name(request.name)
            try:
                kind = load_kind(request.kind)
            except Exception as exc:
                raise InvalidRequest(str(exc)) from None
            needs = Resources(kind.needs_cpu, kind.needs_memory_bytes, kind.needs_disk_bytes)
            await self.c.create_service(request.name, request.kind, request.replicas or 2,
                                        MODE_FROM_PROTO.get(request.mode, SYNC), needs,
                                        request.placement)
        except (InvalidRequest, Unavailable) as exc:
            await _abort(context, exc)
        status = self.c.status()
        view = next(s for s in status.services if s.name == request.name)
        return coordinator_pb2.CreateServiceReply(service=view)

    async def DeleteService(self, request: coordinator_pb2.DeleteServiceRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> coordinator_pb2.DeleteServiceReply:
        try:
            await self.c.delete_service(request.name)
        except (InvalidRequest, Unavailable) as exc:
            await _abort(context, exc)
        return coordinator_pb2.DeleteServiceReply()

    async def Switchover(self, request: coordinator_pb2.SwitchoverRequest,
                         context: grpc.aio.ServicerContext) -> coordinator_pb2.SwitchoverReply:
        try:
            epoch, primary, stall_ms = await self.c.switchover(request.service,
                                                               request.to_host_id)
        except (InvalidRequest, Unavailable) as exc:
            await _abort(context, exc)
        return coordinator_pb2.SwitchoverReply(epoch=epoch, primary_host_id=primary,
                                               stall_ms=stall_ms)

    async def DrainHost(self, request: coordinator_pb2.DrainHostRequest,
                        context: grpc.aio.ServicerContext) -> coordinator_pb2.DrainHostReply:
        try:
            check_name(request.host_id, "host_id")
            await self.c.set_draining(request.host_id, request.draining)
        except (InvalidRequest, Unavailable) as exc:
            await _abort(context, exc)
        host = next(h for h in self.c.status().hosts if h.host_id == request.host_id)
        return coordinator_pb2.DrainHostReply(host=host)

    async def Migrate(self, request: coordinator_pb2.MigrateRequest,
                      context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[agent_pb2.MigrationProgress]:
        try:
            check_name(request.service, "service")
            check_name(request.to_host_id, "to_host_id")
            async for progress in self.c.migrate(
                    request.service, request.to_host_id, request.replica or PRIMARY,
                    request.max_downtime_ms, request.method or "precopy",
                    request.from_host_id, request.max_bandwidth_bytes_s):
                yield progress
        except (InvalidRequest, Unavailable) as exc:
            await _abort(context, exc)

    async def Patch(self, request: coordinator_pb2.PatchRequest,
                    context: grpc.aio.ServicerContext,
                    ) -> AsyncIterator[coordinator_pb2.PatchProgress]:
        try:
            async for progress in self.c.patch(
                    list(request.host_ids), request.all, request.command, request.failback,
                    request.method or "precopy", request.command_timeout_ms):
                yield progress
        except (InvalidRequest, Unavailable) as exc:
            await _abort(context, exc)

    async def GetHistory(self, request: coordinator_pb2.HistoryRequest,
                         context: grpc.aio.ServicerContext) -> coordinator_pb2.HistoryReply:
        records = await self.c.history(request.service, request.limit)
        return coordinator_pb2.HistoryReply(events=[
            coordinator_pb2.HistoryEvent(
                seq=r.seq, at=r.at, service=r.service, kind=r.kind, message=r.message,
                details=msgpack.packb(r.details, use_bin_type=True))
            for r in records
        ])


def add_to_server(server: grpc.aio.Server, coordinator: Coordinator) -> None:
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coordinator),
                                                           server)
