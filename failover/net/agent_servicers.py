"""The agent's gRPC servicers: thin adapters between the wire and `failover.agent.host.Agent`.

Who may call what: with TLS, `RoleCheck` (`failover.net.authorization`) has checked the
caller's role before a handler runs (control calls only from a coordinator, Ship,
InstallSnapshot and MigratePages only from an agent); what depends on the request is checked
here and in the agent's core: an agent ships only as the host id in its certificate, and a
duplica takes shipped items and snapshots only from the primary the coordinator named
(`ReplicaCore.sender_refusal`). Every service name, host id and patch command is checked by
the one name rule (`failover.core.names`) before it is used. Concurrent inbound streams are
bounded per peer and in all (`failover.agent.admission`).

Errors map to status codes one way everywhere: a malformed request (or one too large or too
deep to log) is INVALID_ARGUMENT with a message, a non-primary is FAILED_PRECONDITION with a
redirect hint in trailing metadata, an expired session is FAILED_PRECONDITION naming
SessionExpired, an unknown outcome is UNAVAILABLE (retry with the same request id), a full disk
and too many writes in flight (Overloaded) are RESOURCE_EXHAUSTED. SessionExpired and
Overloaded also name themselves in trailing metadata (`ERROR_TYPE_METADATA_KEY`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import grpc
import grpc.aio

from failover import defaults
from failover.agent.restart import patch_argv, run_patch_command
from failover.clock import monotonic_ms
from failover.core.names import check_host_id, check_service_name
from failover.core.permissions import require_host
from failover.core.sessions import Reply, ReplyStatus
from failover.errors import (
    InvalidRequest,
    MigrationError,
    PermissionDenied,
    SessionExpired,
    StorageError,
    Unavailable,
)
from failover.net.channels import ERROR_TYPE_METADATA_KEY, REDIRECT_METADATA_KEY
from failover.net.convert import (
    host_metrics,
    replica_status,
    role_assignment,
)
from failover.net.execute_stream import (
    ExecuteStream,
    check_payload_size,
    check_request_id,
)
from failover.net.refusals import HANDLED, refusal_of
from failover.net.tls import peer_identity
from failover.observe.agent_metrics import measure_calls
from failover.observe.logs import event_fields
from failover.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    data_pb2,
    data_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
)
from migration.source import MigrationSource
from migration.target import MigrationTarget

if TYPE_CHECKING:
    from failover.agent.host import Agent, Precheck

log = logging.getLogger(__name__)

async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """Turns a typed error into the status code the client library understands."""
    refusal = refusal_of(exc)
    if refusal is None:
        raise exc
    metadata: list[tuple[str, str | bytes]] = []
    if refusal.redirect is not None:
        metadata.append((REDIRECT_METADATA_KEY, refusal.redirect.SerializeToString()))
    if refusal.error_type:
        metadata.append((ERROR_TYPE_METADATA_KEY, refusal.error_type))
    if metadata:
        context.set_trailing_metadata(tuple(metadata))
    await context.abort(refusal.code, refusal.message)


_HANDLED = HANDLED


def _ship_sender(context: grpc.aio.ServicerContext,
                 message: replication_pb2.ShipMessage) -> str:
    """The host a Ship stream comes from: with TLS the host id in the caller's certificate
    (a message naming another `source_host_id` is refused: an agent ships only as itself),
    without TLS the `source_host_id` the message names ("" if none, which no duplica takes:
    without TLS nothing proves who sent anything, bind to a trusted network)."""
    identity = peer_identity(context)
    if identity is None:
        return message.source_host_id
    if message.source_host_id and message.source_host_id != identity.name:
        require_host(identity, message.source_host_id)
    return identity.name


def _peer(context: grpc.aio.ServicerContext) -> str:
    """Who a stream is counted against: the certificate's identity, or the connection."""
    identity = peer_identity(context)
    return str(identity) if identity is not None else context.peer()


def _check_execute(request: data_pb2.ExecuteRequest) -> None:
    check_service_name(request.service)
    check_request_id(request.request_id.client_id, request.request_id.seq)
    check_payload_size(request.payload)


def _timeout_s(deadline_ms: int, context: grpc.aio.ServicerContext) -> float | None:
    """None when the call has a gRPC deadline (gRPC cancels the handler at it); otherwise
    the request's own budget, or the default call deadline, so no wait is unbounded."""
    if context.time_remaining() is not None:
        return None
    budget = deadline_ms / 1000 if deadline_ms else defaults.CALL_DEADLINE_MS / 1000
    return max(0.001, budget)


def _rejection(reply: Reply) -> data_pb2.Rejection:
    kind = "RequestRejected" if reply.status == ReplyStatus.REJECTED else "InvalidRequest"
    return data_pb2.Rejection(error_type=kind, message=reply.data.decode(errors="replace"))


class DataServicer(data_pb2_grpc.DataServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def Execute(self, request: data_pb2.ExecuteRequest,
                      context: grpc.aio.ServicerContext) -> data_pb2.ExecuteReply:
        try:
            _check_execute(request)
            replica = self.agent.data_replica(request.service)
            reply, duplicate, epoch = await replica.execute(
                request.epoch_seen, request.request_id.client_id, request.request_id.seq,
                request.payload, _timeout_s(request.deadline_ms, context),
                request.opens_session)
        except _HANDLED as exc:
            await _abort(context, exc)
        if reply.status == ReplyStatus.EXPIRED:  # the entry changed nothing: no reply to give
            await _abort(context, SessionExpired(reply.data.decode(errors="replace")))
        out = data_pb2.ExecuteReply(
            index=reply.index, commit_index=replica.commit_index, epoch=epoch,
            duplicate=duplicate,
            session_known=replica.sm.sessions.knows(request.request_id.client_id))
        if reply.status == ReplyStatus.OK:
            out.result = reply.data
        else:
            out.rejected.CopyFrom(_rejection(reply))
        return out

    async def ExecuteStream(
        self, request_iterator: AsyncIterator[data_pb2.CallBatch],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[data_pb2.AnswerBatch]:
        """The streaming data path (`failover.net.execute_stream`): calls in, answers out,
        each message as many as were ready."""
        try:
            # Counted per connection, not per identity: every process of an application
            # may hold the same client certificate, and each keeps its own streams.
            admitted = self.agent.data_streams.admit(context.peer())
            admitted.__enter__()
        except _HANDLED as exc:
            await _abort(context, exc)
        stream = ExecuteStream(self.agent)
        refused: InvalidRequest | None = None
        failed: Exception | None = None

        async def read() -> None:
            nonlocal refused, failed
            try:
                async for batch in request_iterator:
                    await stream.room.wait()
                    stream.take(batch)
            except InvalidRequest as exc:
                refused = exc
            except Exception as exc:
                # `take` answers its calls whatever fails; should reading itself fail, no
                # call may be left waiting on a stream nobody reads any more: each is
                # refused UNAVAILABLE (retried with its id) and the stream ends so.
                log.error("ExecuteStream: reading the stream failed; its calls not answered "
                          "yet are refused UNAVAILABLE and it ends", exc_info=exc)
                failed = exc
                stream.refuse_all(Unavailable(
                    f"the agent failed to read this stream ({type(exc).__name__}: {exc}); "
                    "the outcome is unknown: retry with the same request id"))
            finally:
                stream.ready.set()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                if stream.has_answers():
                    yield stream.flush()
                    continue
                # Checked after the last flush, not on `ready` alone: `flush` clears `ready`,
                # and the reader's end, once flushed past, would not wake this loop again.
                if reader.done() and (refused is not None or failed is not None
                                      or not stream.pending):
                    break
                await stream.ready.wait()
                stream.ready.clear()
            if refused is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(refused))
            if failed is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "the agent failed to read this stream "
                                    f"({type(failed).__name__}: {failed}); the outcome of "
                                    "its calls is unknown: retry with the same request ids")
            await reader  # the client's errors end the stream
        finally:
            reader.cancel()
            stream.close()
            admitted.__exit__(None, None, None)

    async def Query(self, request: data_pb2.QueryRequest,
                    context: grpc.aio.ServicerContext) -> data_pb2.QueryReply:
        try:
            check_service_name(request.service)
            replica = self.agent.data_replica(request.service)
            reply = await replica.query(request.payload, request.epoch_seen)
        except _HANDLED as exc:
            await _abort(context, exc)
        out = data_pb2.QueryReply(applied_index=reply.index, epoch=replica.epoch)
        if reply.status == ReplyStatus.OK:
            out.result = reply.data
        else:
            out.rejected.CopyFrom(_rejection(reply))
        return out


class ReplicationServicer(replication_pb2_grpc.ReplicationServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def Ship(self, request_iterator: AsyncIterator[replication_pb2.ShipMessage],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[replication_pb2.ShipReply]:
        # Messages are read ahead into a bounded queue; whatever arrived while one was being
        # handled is answered in the same reply, so a busy stream sends few large replies.
        # Each message comes with its batches' record checks, started as it is read.
        queue: asyncio.Queue[tuple[replication_pb2.ShipMessage, list[Precheck]] | None] = (
            asyncio.Queue(maxsize=defaults.SHIP_READ_AHEAD_MAX))

        agent = self.agent
        stream = request_iterator.__aiter__()
        first = await anext(stream, None)
        if first is None:
            return
        try:
            sender = _ship_sender(context, first)
            # Counted per sending host (without TLS, as it names itself, else its connection).
            admitted = agent.ship_streams.admit(sender or context.peer())
            admitted.__enter__()
        except _HANDLED as exc:
            await _abort(context, exc)
        pending = 0  # read ahead and not yet answered, counted in agent.receiving too
        mine = 0  # record bytes of those, counted in agent.ship_inflight_bytes too

        async def take(message: replication_pb2.ShipMessage) -> None:
            nonlocal pending, mine
            if message is not first and message.source_host_id != first.source_host_id:
                _ship_sender(context, message)  # with TLS, still only as itself
            size = sum(len(b.records) for b in message.batches)
            # Past the bound for all streams, wait for this stream's own to be answered.
            await agent.ship_bytes_room(lambda: mine == 0)
            pending += 1
            mine += size
            agent.receive_queued(1)
            agent.ship_bytes_taken(size)
            await queue.put((message, agent.precheck(message)))

        async def read_ahead() -> None:
            try:
                await take(first)
                async for message in stream:
                    await take(message)
            finally:
                await queue.put(None)

        def answered(items: list[tuple[replication_pb2.ShipMessage, list[Precheck]]]) -> None:
            nonlocal pending, mine
            size = sum(len(b.records) for m, _ in items for b in m.batches)
            pending -= len(items)
            mine -= size
            agent.receive_queued(-len(items))
            agent.ship_bytes_taken(-size)

        reader = asyncio.ensure_future(read_ahead())
        try:
            while (item := await queue.get()) is not None:
                acks = list((await agent.receive(*item, sender=sender)).acks)
                handled = [item]
                ended = False
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is None:
                        ended = True
                        break
                    acks.extend((await agent.receive(*more, sender=sender)).acks)
                    handled.append(more)
                answered(handled)
                yield replication_pb2.ShipReply(acks=acks)
                if ended:
                    break
            try:
                await reader
            except PermissionDenied as exc:  # a later message named another sender
                await _abort(context, exc)
            except Exception:  # the stream broke: it just ends
                log.debug("a Ship stream from %s ended", sender, exc_info=True)
        finally:
            reader.cancel()
            agent.receive_queued(-pending)
            agent.ship_bytes_taken(-mine)
            admitted.__exit__(None, None, None)

    async def InstallSnapshot(
        self, request_iterator: AsyncIterator[replication_pb2.SnapshotChunk],
        context: grpc.aio.ServicerContext,
    ) -> replication_pb2.SnapshotInstalled:
        try:
            identity = peer_identity(context)
            with self.agent.snapshot_streams.admit(_peer(context)):
                return await self.agent.receive_snapshot(
                    request_iterator, identity.name if identity is not None else None)
        except _HANDLED as exc:
            await _abort(context, exc)
        except StorageError as exc:  # a damaged snapshot (or one the disk could not take)
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))


class AgentControlServicer(agent_pb2_grpc.AgentControlServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def AssignRole(self, request: agent_pb2.AssignRoleRequest,
                         context: grpc.aio.ServicerContext) -> agent_pb2.AssignRoleReply:
        try:
            replica = await self.agent.assign_role(*role_assignment(request))
        except _HANDLED as exc:
            await _abort(context, exc)
        status = replica_status(replica)
        return agent_pb2.AssignRoleReply(
            service=replica.service, role=status.role, epoch=replica.epoch,
            indexes=status.indexes,
            last=common_pb2.LogPosition(epoch=replica.wal.last_epoch,
                                        index=replica.wal.last_index))

    async def StepDown(self, request: agent_pb2.StepDownRequest,
                       context: grpc.aio.ServicerContext) -> agent_pb2.StepDownReply:
        try:
            replica = await self.agent.step_down(request.service, request.epoch)
        except _HANDLED as exc:
            await _abort(context, exc)
        return agent_pb2.StepDownReply(service=replica.service, epoch=replica.epoch,
                                       indexes=replica_status(replica).indexes)

    async def DropReplica(self, request: agent_pb2.DropReplicaRequest,
                          context: grpc.aio.ServicerContext) -> agent_pb2.DropReplicaReply:
        try:
            await self.agent.drop_replica(request.service, request.epoch, request.delete_data)
        except _HANDLED as exc:
            await _abort(context, exc)
        return agent_pb2.DropReplicaReply()

    async def GetStatus(self, request: agent_pb2.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> agent_pb2.AgentStatus:
        a = self.agent
        return agent_pb2.AgentStatus(
            host_id=a.host_id, address=a.config.address, zone=a.config.zone, version=a.version,
            started_at=a.started_at, metrics=host_metrics(str(a.config.data_dir)),
            replicas=[replica_status(r) for r in a.replicas.values()],
        )

    async def HearsPrimary(self, request: agent_pb2.HearsPrimaryRequest,
                           context: grpc.aio.ServicerContext) -> agent_pb2.HearsPrimaryReply:
        if request.services:
            try:
                return self._hears_many(request)
            except _HANDLED as exc:
                await _abort(context, exc)
        try:
            replica = self.agent.replica(request.service)
            # A broken replica is no candidate for promotion: it answers nothing here.
            replica.check_not_broken()
        except _HANDLED as exc:
            await _abort(context, exc)
        hears, silent_ms = replica.hears_primary(monotonic_ms())
        return agent_pb2.HearsPrimaryReply(hears=hears, silent_ms=silent_ms, epoch=replica.epoch)

    def _hears_many(self, request: agent_pb2.HearsPrimaryRequest) -> agent_pb2.HearsPrimaryReply:
        """HearsPrimary of several services, each answered with its matched index: one call
        per host and round, where a host death of 30 primaries made 30 calls and a GetStatus
        at every surviving host (and suspicions under load repeat them)."""
        if request.service or len(request.services) > defaults.HEARTBEAT_REPLICAS_MAX:
            raise InvalidRequest(
                f"HearsPrimary takes `service` or up to {defaults.HEARTBEAT_REPLICAS_MAX} "
                f"`services`, not both; got {len(request.services)} services")
        for name in request.services:
            check_service_name(name)
        now = monotonic_ms()
        reply = agent_pb2.HearsPrimaryReply()
        for name in request.services:
            replica = self.agent.replicas.get(name)
            if replica is None or replica.core.broken:
                reply.answers.add(service=name)  # not held: no candidate
                continue
            hears, silent_ms = replica.hears_primary(now)
            reply.answers.add(service=name, held=True, hears=hears, silent_ms=silent_ms,
                              epoch=replica.epoch,
                              matched_index=replica.status()["matched_index"])
        return reply

    async def PrepareSwitchover(
        self, request: agent_pb2.PrepareSwitchoverRequest, context: grpc.aio.ServicerContext,
    ) -> agent_pb2.PrepareSwitchoverReply:
        try:
            last, target_durable = await self.agent.prepare_switchover(
                request.service, request.epoch, request.target_host_id,
                request.timeout_ms or defaults.CALL_DEADLINE_MS, request.release,
                request.switchover_id)
        except _HANDLED as exc:
            await _abort(context, exc)
        return agent_pb2.PrepareSwitchoverReply(last_index=last,
                                                target_durable_index=target_durable)

    async def Restart(self, request: agent_pb2.RestartRequest,
                      context: grpc.aio.ServicerContext) -> agent_pb2.RestartReply:
        """Runs the patch command named (an entry of this host's `[patch.commands]`, never a
        shell string: any other name is INVALID_ARGUMENT naming the known ones; a non-zero
        exit refuses the restart), answers, then the daemon stops serving and re-executes the
        agent."""
        agent = self.agent
        code, output = 0, ""
        try:
            if request.command:
                argv = patch_argv(request.command, agent.config.patch_commands)
                log.info("running patch command %s: %s", request.command, argv,
                         extra=event_fields("patch_command", command=request.command,
                                            argv=argv))
                code, output = await run_patch_command(
                    argv, request.command_timeout_ms or defaults.PATCH_COMMAND_TIMEOUT_MS)
        except _HANDLED as exc:
            await _abort(context, exc)
        log.log(logging.INFO if code == 0 else logging.WARNING,
                "patch step: %s", "restarting on new code" if code == 0 else
                f"the patch command exited with {code}: not restarting",
                extra=event_fields("patch_restart" if code == 0 else "patch_refused",
                                   command=request.command, exit_code=code,
                                   version=agent.version))
        if code != 0:
            tail = " ".join(output.split())[-300:]
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the patch command exited with {code}; the agent keeps "
                                f"running its old code: {tail}")
        loop = asyncio.get_running_loop()
        loop.call_later(defaults.AGENT_RESTART_DELAY_MS / 1000, agent.restart_requested.set)
        return agent_pb2.RestartReply(exit_code=code, output=output, version=agent.version)

    async def MigrateOut(self, request: agent_pb2.MigrateOutRequest,
                         context: grpc.aio.ServicerContext,
                         ) -> AsyncIterator[agent_pb2.MigrationProgress]:
        """Copies a replica to another host, streaming progress (migration/)."""
        try:
            if not request.target_address or not request.migration_id:
                raise InvalidRequest("target_address and migration_id are required")
            check_service_name(request.service)
            check_host_id(request.target_host_id, "migration target")
            replica = self.agent.replica(request.service)
            replica.check_not_broken()
            source = MigrationSource(replica, request, self.agent.host_id, self.agent.tls)
            sent = 0  # wire bytes counted so far (progress carries the running total)
            async for progress in source.run():
                sent = _observe_migration(self.agent, request, progress, sent)
                yield progress
        except MigrationError as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except grpc.aio.AioRpcError as exc:  # the stream to the target broke
            await context.abort(grpc.StatusCode.ABORTED, f"the copy to "
                                f"{request.target_host_id} broke off: "
                                f"{exc.details() or exc.code().name}")
        except _HANDLED as exc:
            await _abort(context, exc)

    async def Compact(self, request: agent_pb2.CompactRequest,
                      context: grpc.aio.ServicerContext) -> agent_pb2.CompactReply:
        try:
            index, first = await self.agent.compact(request.service, request.retain_entries)
        except _HANDLED as exc:
            await _abort(context, exc)
        return agent_pb2.CompactReply(snapshot_index=index, first_index=first)

    async def GetDigest(self, request: agent_pb2.GetDigestRequest,
                        context: grpc.aio.ServicerContext) -> agent_pb2.GetDigestReply:
        try:
            replica = self.agent.replica(request.service)
            replica.check_not_broken()  # its state is not one it can vouch for
        except _HANDLED as exc:
            await _abort(context, exc)
        return agent_pb2.GetDigestReply(
            digest=replica.sm.digest(), applied_index=replica.sm.applied_index,
            epoch=replica.epoch,
            epoch_history=[common_pb2.EpochStart(epoch=e, first_index=i)
                           for e, i in replica.wal.epoch_history])


class MigrationServicer(migration_pb2_grpc.MigrationServicer):
    """The target side of live migrations into this host."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def MigratePages(self, request_iterator: AsyncIterator[migration_pb2.PageBatch],
                           context: grpc.aio.ServicerContext,
                           ) -> AsyncIterator[migration_pb2.MigrationResult]:
        stream = request_iterator.__aiter__()
        first = await anext(stream, None)
        if first is None:
            return
        try:
            check_service_name(first.service)  # it becomes a directory here: nothing made
            admitted = self.agent.migration_streams.admit(_peer(context))
            admitted.__enter__()
        except _HANDLED as exc:
            await _abort(context, exc)

        metrics = self.agent.metrics

        async def batches() -> AsyncIterator[migration_pb2.PageBatch]:
            yield first
            async for batch in stream:
                if metrics is not None:
                    metrics.migrated_bytes(first.service, "in", batch.ByteSize())
                yield batch

        try:
            async for result in MigrationTarget(self.agent).run(batches()):
                yield result
        finally:
            admitted.__exit__(None, None, None)


def _observe_migration(agent: Agent, request: agent_pb2.MigrateOutRequest,
                       progress: agent_pb2.MigrationProgress, sent: int) -> int:
    """Logs a migration's step as one record with its fields and counts its bytes and pause
    in the metrics; returns the wire bytes counted so far."""
    if progress.phase == "done":
        try:
            downtime_ms = float(json.loads(progress.stats_json or b"{}")["downtime_ms"])
        except (ValueError, KeyError, TypeError):  # the copy is done: never fail it for this
            downtime_ms = 0.0
        if agent.metrics is not None:
            agent.metrics.migration_paused(request.service, downtime_ms / 1000)
    else:
        downtime_ms = None
    log.info("%s: migration %s to %s: %s, round %d, %d pages, %d bytes on the wire",
             request.service, progress.migration_id, request.target_host_id, progress.phase,
             progress.round, progress.pages, progress.wire_bytes,
             extra=event_fields("migration_" + (progress.phase or "step"),
                                service=request.service, migration_id=progress.migration_id,
                                target=request.target_host_id, round=progress.round,
                                pages=progress.pages, wire_bytes=progress.wire_bytes,
                                raw_bytes=progress.raw_bytes, dirty_pages=progress.dirty_pages,
                                throttle_ms=progress.throttle_ms, downtime_ms=downtime_ms))
    if agent.metrics is not None and progress.wire_bytes > sent:
        agent.metrics.migrated_bytes(request.service, "out", progress.wire_bytes - sent)
        return progress.wire_bytes
    return sent


def add_to_server(server: grpc.aio.Server, agent: Agent) -> None:
    data = DataServicer(agent)
    if agent.metrics is not None:  # --metrics-listen: client calls counted and timed
        measure_calls(data, agent.metrics)
    data_pb2_grpc.add_DataServicer_to_server(data, server)
    migration_pb2_grpc.add_MigrationServicer_to_server(MigrationServicer(agent), server)
    replication_pb2_grpc.add_ReplicationServicer_to_server(ReplicationServicer(agent), server)
    agent_pb2_grpc.add_AgentControlServicer_to_server(AgentControlServicer(agent), server)

