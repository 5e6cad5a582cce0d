"""The agent of one host: its replicas, its links to peer hosts, and the control calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from failover import __version__, defaults
from failover.agent.admission import StreamAdmission
from failover.agent.config import AgentConfig
from failover.agent.coordinator_link import CoordinatorLink
from failover.agent.hooks import HookRunner
from failover.agent.links import PeerLink
from failover.agent.replica import Replica, ReplicaMeta
from failover.agent.term import CoordinatorTerm
from failover.clock import monotonic_ms
from failover.core.log_position import LogPosition
from failover.core.names import check_host_id, check_service_name
from failover.core.replication import AckView, Mode, SendBatch
from failover.core.roles import (
    BUILDING,
    DUPLICA,
    ON_FAILOVER,
    ON_MIGRATED,
    ON_ROLE_CHANGE,
    PRIMARY,
    ROLES,
)
from failover.core.state_machine import ReplicatedStateMachine
from failover.errors import (
    InvalidRequest,
    NotPrimaryError,
    StaleEpochError,
    Unavailable,
)
from failover.net.tls import TlsMaterial
from failover.observe.agent_metrics import AgentMetrics
from failover.storage.modes import make_private_dir
from failover.storage.records import CheckedRecords, check_records
from failover.storage.snapshot import SnapshotHeader, iter_compressed_chunks, read_header
from failover.v1 import common_pb2, replication_pb2, replication_pb2_grpc

log = logging.getLogger(__name__)

# A shipped batch's `check_records` running or done, or None for a batch without records.
Precheck = asyncio.Future[CheckedRecords | None] | None

_STATUS = {
    "ok": replication_pb2.ACK_STATUS_OK,
    "stale_epoch": replication_pb2.ACK_STATUS_STALE_EPOCH,
    "mismatch": replication_pb2.ACK_STATUS_MISMATCH,
    "unknown_service": replication_pb2.ACK_STATUS_UNKNOWN_SERVICE,
    "corrupt": replication_pb2.ACK_STATUS_CORRUPT,
    "storage_error": replication_pb2.ACK_STATUS_STORAGE_ERROR,
    # The sender is not the primary this replica was told of: it marks this replica failed
    # and probes again later (a real primary is soon told by the coordinator).
    "not_primary": replication_pb2.ACK_STATUS_NOT_PRIMARY,
}
_STATUS_NAME = {v: k for k, v in _STATUS.items()}


class Agent:
    """Hosts replicas; the gRPC servicers in `failover.agent.servicers` call into this."""

    def __init__(self, config: AgentConfig, tls: TlsMaterial | None = None,
                 incarnation: int = 0) -> None:
        self.config = config
        # This process's number among the host's agent processes, counted by its supervisor
        # (`failover.agent.supervisor`; 0 without one): sent with every registration and
        # heartbeat, and named in the supervisor's report when this process exits.
        self.incarnation = incarnation
        # This host's certificate (`AgentConfig.load_tls`): every channel it opens is mutual
        # TLS with it, checking that the peer's certificate names the host id dialled.
        self.tls = tls
        self.host_id = config.host_id
        self.started_at = time.time()
        self.version = __version__
        # Set once a Restart was answered: the daemon stops serving and re-executes.
        self.restart_requested = asyncio.Event()
        self.io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="agent-io")
        # Checks shipped records as they arrive (`precheck`): one thread of its own, so that
        # the checks never queue ahead of the appends and syncs on `io`.
        self.check_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-check")
        # Writes replicas' meta files (`MetaWriter`): threads of their own, so that a
        # failover's promotions never queue behind snapshots and appends on `io`, and their
        # fsyncs overlap.
        self.meta_io = ThreadPoolExecutor(max_workers=defaults.META_WRITE_THREADS,
                                          thread_name_prefix="agent-meta")
        self.replicas: dict[str, Replica] = {}
        self.links: dict[str, PeerLink] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick_task: asyncio.Task[None] | None = None
        self._replicas_dir = Path(config.data_dir) / "replicas"
        self.coordinator_link: CoordinatorLink | None = None
        # The highest coordinator term seen (issue 15): control calls from older terms, a
        # deposed leader's, are refused (`failover.net.authorization.TermFence`).
        self.coordinator_term = CoordinatorTerm(config.data_dir)
        # Ship messages received and not yet answered; appliers yield while there are any.
        self.receiving = 0
        self.receive_idle = asyncio.Event()
        self.receive_idle.set()
        # Control calls that change one replica's role or data run one at a time.
        self._locks: dict[str, asyncio.Lock] = {}
        # Replicas created at once (`assign_role`): see AGENT_CREATES_IN_FLIGHT_MAX.
        self._creating = asyncio.Semaphore(defaults.AGENT_CREATES_IN_FLIGHT_MAX)
        # Inbound streams open at once, per peer and in all (issue 13, floods).
        self.ship_streams = StreamAdmission(
            "Ship", defaults.AGENT_SHIP_STREAMS_PER_PEER_MAX, defaults.AGENT_SHIP_STREAMS_MAX)
        self.data_streams = StreamAdmission(
            "ExecuteStream", defaults.AGENT_DATA_STREAMS_PER_PEER_MAX,
            defaults.AGENT_DATA_STREAMS_MAX)
        self.snapshot_streams = StreamAdmission(
            "InstallSnapshot", defaults.AGENT_SNAPSHOT_STREAMS_PER_PEER_MAX,
            defaults.AGENT_SNAPSHOT_STREAMS_MAX)
        self.migration_streams = StreamAdmission(
            "MigratePages", defaults.AGENT_MIGRATION_STREAMS_PER_PEER_MAX,
            defaults.AGENT_MIGRATION_STREAMS_MAX)
        # Hooks (issue 17): run in the background after role changes, failovers and
        # migrations; the role each replica had when last looked at (`notice_roles`).
        self.hooks = HookRunner(config.host_id, config.hooks, config.patch_commands,
                                self.spawn, config.hook_timeout_ms,
                                config.hook_output_bytes_max)
        self._roles_seen: dict[str, str] = {}
        # The metrics (issue 17; None without --metrics-listen): set before `start`, so that
        # the logs recovered there report their fsyncs too.
        self.metrics: AgentMetrics | None = None
        # Shipped record bytes read and not yet answered, all Ship streams together.
        self.ship_inflight_bytes = 0
        self._ship_bytes_freed = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Recovers every replica from its data dir before serving."""
        make_private_dir(self._replicas_dir)
        for root in sorted(p for p in self._replicas_dir.iterdir() if p.is_dir()):
            # One replica that cannot be recovered never stops the others (invariant 12).
            try:
                meta = Replica.load_meta(root)
                replica = Replica(self, root, meta)
            except Exception as exc:  # an unreadable meta, a kind whose code is gone
                log.error("cannot recover the replica in %s (%s: %s); it is left as it is for "
                          "an operator, and the coordinator rebuilds the service's replica",
                          root, type(exc).__name__, exc)
                continue
            try:
                replica.open()  # damage on disk marks it broken; this is for anything else
            except Exception as exc:
                log.exception("%s: recovery failed", meta.service)
                replica.mark_broken(f"recovery failed: {type(exc).__name__}: {exc}")
            self.replicas[meta.service] = replica
            if replica.broken:
                log.error("recovered %s (%s) as %s at epoch %d, broken: %s", meta.service,
                          meta.kind, meta.role, meta.epoch, replica.broken)
                continue
            log.info("recovered %s (%s) as %s at epoch %d: log %d..%d, applied %d",
                     meta.service, meta.kind, meta.role, meta.epoch, replica.wal.first_index,
                     replica.wal.last_index, replica.sm.applied_index)
        # Recovered roles are where hooks start from: a restart changes no role.
        self._roles_seen = {name: replica.role for name, replica in self.replicas.items()}
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop())
        if self.config.coordinators:
            self.coordinator_link = CoordinatorLink(self, [str(a) for a in
                                                           self.config.coordinators])
            self.coordinator_link.start()

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
        if self.coordinator_link is not None:
            await self.coordinator_link.stop()
        for link in self.links.values():
            await link.stop()
        for replica in self.replicas.values():
            await replica.close()
        for task in list(self._tasks):
            task.cancel()
        self.io.shutdown(wait=True, cancel_futures=True)
        self.check_io.shutdown(wait=True, cancel_futures=True)
        self.meta_io.shutdown(wait=True, cancel_futures=True)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Runs a background task that is tracked, and whose failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def _tick_loop(self) -> None:
        period_s = self.config.heartbeat_ms / 4000
        while True:
            await asyncio.sleep(period_s)
            now = monotonic_ms()
            for replica in list(self.replicas.values()):
                try:
                    replica.tick(now)
                except Exception:
                    log.exception("%s: tick failed", replica.service)
            self.notice_roles()  # a role changed by a shipped epoch, a step-down, ...

    def notice_roles(self) -> None:
        """Runs the on_role_change hooks of every replica whose role changed since it was
        last looked at (after an assignment, or from the tick loop for a change made by
        anything else). Starts them only: never waits."""
        if not self.hooks.hooks:
            return
        seen = self._roles_seen
        for service, replica in list(self.replicas.items()):
            role = replica.role
            if seen.get(service) != role:
                seen[service] = role
                self.hooks.fire(ON_ROLE_CHANGE, service, role, replica.epoch)
        for service in [s for s in seen if s not in self.replicas]:
            del seen[service]  # dropped: a new copy later is a new role

    # --- links ---------------------------------------------------------------------------

    def ensure_links(self, peers: dict[str, str]) -> None:
        """Starts a link to each peer host that ships are sent to (one per host)."""
        for host_id, address in peers.items():
            link = self.links.get(host_id)
            if link is not None and link.address != address:
                self.spawn(link.stop())
                link = None
            if link is None:
                link = PeerLink(self, host_id, address)
                self.links[host_id] = link
                link.start()
            else:
                link.retry_now()

    def link_is_up(self, host_id: str) -> bool:
        link = self.links.get(host_id)
        return link is not None and link.up

    def on_link_up(self, host_id: str) -> None:
        for replica in list(self.replicas.values()):
            replica.on_link_up(host_id)

    def on_link_down(self, host_id: str) -> None:
        for replica in list(self.replicas.values()):
            replica.on_link_down(host_id)

    def on_acks(self, host_id: str, reply: replication_pb2.ShipReply) -> None:
        for ack in reply.acks:
            replica = self.replicas.get(ack.service)
            if replica is None:
                continue
            view = AckView(
                status=_STATUS_NAME.get(ack.status, "corrupt"),
                epoch=ack.epoch,
                batch_id=ack.batch_id,
                durable_index=ack.durable_index,
                last=LogPosition(ack.last.epoch, ack.last.index),
                history=tuple((h.epoch, h.first_index) for h in ack.epoch_history),
                truncated_entries=ack.truncated_entries - 1,
                message=ack.message,
            )
            replica.on_ack(host_id, view)

    def ship_probe(self, host_id: str, service: str, epoch: int) -> None:
        self._link(host_id).send_probe(replication_pb2.Probe(service=service, epoch=epoch))

    def ship_truncate(self, host_id: str, service: str, epoch: int, after_index: int) -> None:
        self._link(host_id).send_truncate(
            replication_pb2.Truncate(service=service, epoch=epoch, after_index=after_index))

    @property
    def wal_fsync_observer(self) -> Callable[[float], None] | None:
        """What each log fsync's seconds are told to (the metrics), or None."""
        return self.metrics.fsync_done if self.metrics is not None else None

    def ship_batch(self, host_id: str, service: str, epoch: int, action: SendBatch,
                   records: bytes, last_index: int) -> None:
        if self.metrics is not None:
            self.metrics.shipped_entries(service, last_index - action.first_index + 1)
        self._link(host_id).send_batch(replication_pb2.ShipBatch(
            service=service, epoch=epoch, batch_id=action.batch_id,
            prev=common_pb2.LogPosition(epoch=action.prev.epoch, index=action.prev.index),
            first_index=action.first_index, last_index=last_index, records=records,
            commit_index=action.commit_index,
        ), notice=action.notice)

    def _link(self, host_id: str) -> PeerLink:
        link = self.links.get(host_id)
        assert link is not None, f"no link to {host_id}"
        return link

    # --- receiving shipped logs ----------------------------------------------------------

    async def ship_bytes_room(self, own_idle: Callable[[], bool]) -> None:
        """Returns once a Ship stream may read another message: while the streams together
        hold `AGENT_SHIP_INFLIGHT_BYTES_MAX` bytes unanswered, only a stream with none of its
        own unanswered (`own_idle`) reads on, so memory stays bounded and each stream moves."""
        while self.ship_inflight_bytes > defaults.AGENT_SHIP_INFLIGHT_BYTES_MAX and not own_idle():
            await self._ship_bytes_freed.wait()

    def ship_bytes_taken(self, size: int) -> None:
        """Shipped record bytes were read (size > 0) or answered (size < 0)."""
        self.ship_inflight_bytes += size
        assert self.ship_inflight_bytes >= 0, self.ship_inflight_bytes
        if size < 0:
            freed, self._ship_bytes_freed = self._ship_bytes_freed, asyncio.Event()
            freed.set()

    def receive_queued(self, count: int) -> None:
        """Ship messages arrived (count > 0) or were answered (count < 0)."""
        self.receiving += count
        assert self.receiving >= 0, self.receiving
        if self.receiving:
            self.receive_idle.clear()
        else:
            self.receive_idle.set()

    def precheck(self, message: replication_pb2.ShipMessage) -> list[Precheck]:
        """Starts checking the records of each batch of a Ship message as soon as it is read
        (`check_records`, on `check_io`), one future per batch for `receive`.

        Every record is checked before it is written (invariant 12), and checking costs
        about as much as writing: started on arrival, the check of a batch overlaps the
        write and sync of the batches before it instead of lengthening each one. A batch
        under PRECHECK_BYTES_MIN is checked by the job that writes it instead (None here):
        its check takes microseconds, and a thread round trip of its own lengthened the
        path of every small sync write by about a tenth of a millisecond."""
        loop = asyncio.get_running_loop()
        return [loop.run_in_executor(self.check_io, check_records, batch.records,
                                     batch.first_index, batch.last_index)
                if len(batch.records) >= defaults.PRECHECK_BYTES_MIN else None
                for batch in message.batches]

    async def receive(self, message: replication_pb2.ShipMessage,
                      checks: list[Precheck] | None = None,
                      sender: str | None = None) -> replication_pb2.ShipReply:
        """Handles one message of a Ship stream; answers every item in it. `checks` are its
        batches' `precheck` futures (without them, each batch is checked as it is taken).
        `sender` is the host that sent it (the certificate's host id with TLS, else the
        message's `source_host_id`): a duplica takes items only from the primary the
        coordinator named (`ReplicaCore.sender_refusal`); None checks no sender."""
        acks: list[replication_pb2.ReplicaAck] = []
        for probe in message.probes:
            acks.append(await self._receive_one(probe.service, "probe", probe, None, sender))
        for truncate in message.truncates:
            acks.append(await self._receive_one(truncate.service, "truncate", truncate, None,
                                                sender))
        for i, batch in enumerate(message.batches):
            check = checks[i] if checks else None
            acks.append(await self._receive_one(batch.service, "batch", batch, check, sender))
        return replication_pb2.ShipReply(acks=acks)

    async def _receive_one(self, service: str, what: str, item: Any,
                           check: Precheck = None,
                           sender: str | None = None) -> replication_pb2.ReplicaAck:
        try:
            check_service_name(service)  # the one name rule, also where no path is made
        except InvalidRequest as exc:
            return replication_pb2.ReplicaAck(
                service=service[:200], status=replication_pb2.ACK_STATUS_UNKNOWN_SERVICE,
                batch_id=getattr(item, "batch_id", 0), message=str(exc)[:300])
        # Under the replica's lock: a role change (AssignRole, StepDown) must never land
        # while a shipped batch is half appended, or a new primary would start its log at an
        # index the append is about to fill.
        async with self.lock(service):
            try:
                return await self._receive_locked(service, what, item, check, sender)
            except Exception as exc:
                # A bug, or damage no check caught, in one replica must not end the stream:
                # it carries every service this host shares with the sender (invariant 12).
                # This item alone is refused; the primary probes again later.
                log.exception("%s: a shipped %s failed", service, what)
                message = (f"host {self.host_id} could not take a {what} for {service}: "
                           f"{type(exc).__name__}: {exc}")
                replica = self.replicas.get(service)
                if replica is not None:
                    replica.last_error = message
                return _refusal(service, item, replica, message)

    async def _receive_locked(self, service: str, what: str, item: Any,
                              check: Precheck = None,
                              sender: str | None = None) -> replication_pb2.ReplicaAck:
        replica = self.replicas.get(service)
        if replica is None or replica.role not in (DUPLICA, PRIMARY, BUILDING):
            return replication_pb2.ReplicaAck(
                service=service, status=replication_pb2.ACK_STATUS_UNKNOWN_SERVICE,
                batch_id=getattr(item, "batch_id", 0),
                message=f"host {self.host_id} holds no replica of {service!r}")
        if replica.broken:
            return _refusal(service, item, replica, str(replica.broken_error()))
        if what == "probe":
            ack = await replica.receive_probe(item.epoch, sender)
        elif what == "truncate":
            ack = await replica.receive_truncate(item.epoch, item.after_index, sender)
        else:
            ack = await replica.receive_batch(
                item.epoch, item.batch_id, LogPosition(item.prev.epoch, item.prev.index),
                item.first_index, item.last_index, item.records, item.commit_index, check,
                sender)
        return _ack_to_proto(ack)

    # --- snapshots -----------------------------------------------------------------------

    async def install_snapshot(self, host_id: str, service: str, epoch: int,
                               path: Path) -> tuple[SnapshotHeader, int]:
        """Streams a snapshot file's lz4 frames to a peer host's replica (read from the file
        on an I/O thread, one frame ahead of the stream)."""
        loop = asyncio.get_running_loop()
        header = await loop.run_in_executor(self.io, read_header, path)
        link = self._link(host_id)

        async def chunks() -> AsyncIterator[replication_pb2.SnapshotChunk]:
            frames = iter_compressed_chunks(path)
            try:
                first = True
                while (frame := await loop.run_in_executor(self.io, next, frames, None)
                       ) is not None:
                    chunk = replication_pb2.SnapshotChunk(service=service, epoch=epoch,
                                                          data=frame)
                    if first:
                        chunk.header.CopyFrom(_header_to_proto(header))
                        first = False
                    yield chunk
                last = replication_pb2.SnapshotChunk(service=service, epoch=epoch, last=True)
                if first:
                    last.header.CopyFrom(_header_to_proto(header))
                yield last
            finally:
                await loop.run_in_executor(self.io, frames.close)

        stub = replication_pb2_grpc.ReplicationStub(link.channel())
        reply = await stub.InstallSnapshot(chunks(), timeout=600)
        if reply.digest != header.digest:
            raise RuntimeError(f"{host_id} installed a snapshot with a different digest")
        return header, reply.applied_index

    async def receive_snapshot(
        self, chunks: AsyncIterator[replication_pb2.SnapshotChunk], sender: str | None = None,
    ) -> replication_pb2.SnapshotInstalled:
        """Receives a snapshot for one of our replicas and restores it as it arrives: the
        frames go to an I/O thread that writes and decompresses them into a fresh state
        while the rest is still on the way; the replica's state and log are replaced, under
        its lock, only once the whole snapshot checked out (digest included).

        Refused before anything is written: a snapshot for a primary, at another epoch than
        the replica's, or (with `sender`, the host id in the sender's certificate) from any
        host but the primary the coordinator named (`ReplicaCore.check_snapshot`)."""
        stream = chunks.__aiter__()
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise InvalidRequest("empty snapshot stream") from None
        if not first.HasField("header"):
            raise InvalidRequest("the first snapshot chunk must carry the header")
        header_pb, service, epoch = first.header, first.service, first.epoch
        check_service_name(service)
        replica = self.replicas.get(service)
        if replica is None:
            raise InvalidRequest(f"host {self.host_id} holds no replica of {service!r}")
        replica.core.check_snapshot(epoch, sender)
        header = SnapshotHeader(
            kind=header_pb.kind, kind_version=header_pb.kind_version,
            applied_index=header_pb.applied_index, epoch=header_pb.epoch,
            digest=header_pb.digest, raw_bytes=header_pb.raw_bytes,
            extra={"history": [[h.epoch, h.first_index] for h in header_pb.epoch_history]},
        )
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        feed = FrameFeed(loop, defaults.SNAPSHOT_FRAMES_QUEUED_MAX,
                         defaults.SNAPSHOT_FRAME_TIMEOUT_MS / 1000)
        restore = loop.run_in_executor(self.io, replica.receive_snapshot, header, feed.frames())
        received = 0
        try:
            chunk = first
            while True:
                if chunk.data:
                    received += len(chunk.data)
                    if not await feed.put(chunk.data, restore):
                        break  # the restore stopped early (damage): its error says why
                if chunk.last:
                    break
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    raise InvalidRequest(f"{service}: the snapshot stream ended without its "
                                         "last chunk") from None
            await feed.put(None, restore)
            fresh, shipped = await restore
        except BaseException as exc:
            feed.abort(exc)
            with contextlib.suppress(BaseException):
                await restore  # it sees the abort and deletes its file
            raise
        try:
            async with self.lock(service):
                if self.replicas.get(service) is not replica:
                    raise StaleEpochError(f"{service}: the replica changed while a snapshot "
                                          f"from epoch {epoch} was received; not installed")
                replica.core.check_snapshot(epoch, sender)  # its role may have changed
                await replica.install_snapshot(header, fresh, shipped)
        except BaseException:
            shipped.discard()
            raise
        elapsed_ms = (time.monotonic() - started) * 1000
        log.info("%s: installed a snapshot at index %d (%d bytes); snapshot install of %d raw "
                 "bytes done in %.1f ms", service, header.applied_index, received,
                 header.raw_bytes, elapsed_ms)
        # The installed state's digest was computed and checked against the header's while
        # it was restored (and nothing ran since): no need to hash the state a second time.
        return replication_pb2.SnapshotInstalled(
            service=service, applied_index=header.applied_index, digest=header.digest,
            bytes_received=received)

    # --- control -------------------------------------------------------------------------

    def lock(self, service: str) -> asyncio.Lock:
        return self._locks.setdefault(service, asyncio.Lock())

    async def assign_role(self, service: str, kind: str, role: str, epoch: int, mode: str,
                          primary: tuple[str, str] | None, duplicas: dict[str, str],
                          in_sync: set[str], in_sync_generation: int = 0,
                          reason: str = "") -> Replica:
        """Creates the replica if missing, then sets its role, epoch and peers. `reason`
        "failover" (the coordinator's) runs the on_failover hooks once the assignment
        changed the replica's role or epoch."""
        check_service_name(service)
        for host in ([primary[0]] if primary else []) + [*duplicas, *in_sync]:
            check_host_id(host)
        if role not in ROLES:
            raise InvalidRequest(f"role {role!r}: choose one of {', '.join(ROLES)}")
        if epoch < 1:
            raise InvalidRequest("epoch must be >= 1")
        if mode not in (m.value for m in Mode):
            raise InvalidRequest(f"mode {mode!r}: choose sync or async")
        if self.host_id in duplicas:
            raise InvalidRequest(f"{service}: this host ({self.host_id}) cannot be its own duplica")
        unknown = set(in_sync) - set(duplicas)
        if unknown:
            raise InvalidRequest(f"{service}: in-sync hosts {sorted(unknown)} are not duplicas")
        # Creations one at a time (the semaphore before the service's lock, always):
        # assignments of replicas this host holds, a failover's promotions, go side by side.
        creating = self._creating if service not in self.replicas else None
        async with creating or contextlib.nullcontext(), self.lock(service):
            replica = self.replicas.get(service)
            before = (replica.role, replica.epoch) if replica is not None else None
            if replica is None:
                if not kind:
                    raise InvalidRequest(f"{service}: kind is required to create a replica")
                meta = ReplicaMeta(service, kind, role, epoch, mode)
                loop = asyncio.get_running_loop()
                root = self._replicas_dir / service
                replica = await loop.run_in_executor(self.io, Replica.create, self, root, meta)
                replica.opened(await loop.run_in_executor(self.io, replica.open_storage))
                self.replicas[service] = replica
            elif kind and kind != replica.meta.kind:
                raise InvalidRequest(f"{service} is a {replica.meta.kind!r} replica here, "
                                     f"not {kind!r}")
            await replica.assign(role, epoch, mode, primary, duplicas, in_sync,
                                 in_sync_generation=in_sync_generation)
            self.notice_roles()
            if reason == "failover" and before != (replica.role, replica.epoch):
                self.hooks.fire(ON_FAILOVER, service, replica.role, replica.epoch)
            return replica

    async def step_down(self, service: str, epoch: int) -> Replica:
        check_service_name(service)
        replica = self.replica(service)
        async with self.lock(service):
            if epoch < replica.epoch:
                raise StaleEpochError(f"{service}: step-down at epoch {epoch} is older than "
                                      f"{replica.epoch}")
            replica.step_down(epoch, "the coordinator asked")
            await replica.meta_flushed()  # answered once it is on disk
            return replica

    async def drop_replica(self, service: str, epoch: int, delete_data: bool) -> None:
        """Closes a replica and forgets it (and with `delete_data`, deletes its files), if
        `ReplicaCore.check_drop` allows: a serving primary's data goes only at its own epoch."""
        check_service_name(service)
        replica = self.replica(service)
        async with self.lock(service):
            replica.core.check_drop(epoch, delete_data)
            del self.replicas[service]
            if delete_data:
                await replica.destroy()
            else:
                await replica.close()

    async def prepare_switchover(self, service: str, epoch: int, target: str,
                                 timeout_ms: int, release: bool,
                                 switchover_id: str = "") -> tuple[int, int]:
        check_service_name(service)
        replica = self.replica(service)
        if release:
            replica.release_switchover(epoch, switchover_id)
            return replica.wal.last_index, 0
        check_host_id(target, "switchover target")
        return await replica.prepare_switchover(epoch, target, timeout_ms, switchover_id)

    async def compact(self, service: str, retain_entries: int) -> tuple[int, int]:
        replica = self.replica(service)
        replica.check_not_broken()  # its state may not be what it acked: no snapshot of it
        async with self.lock(service):
            path = await replica.take_snapshot()
            first = replica.compact(retain_entries)
            return read_header(path).applied_index, first

    def replica_root(self, service: str) -> Path:
        """Where a replica of `service` keeps its meta, log and snapshots."""
        return self._replicas_dir / service

    def keep_migrated_copy(self, root: Path, service: str, kind: str, epoch: int, mode: str,
                           state: ReplicatedStateMachine) -> None:
        """Holds the copy a migration wrote under `root` (snapshot and log) as a `building`
        replica, opened with `state`, already in memory. migration/target.py calls it on the
        loop, under `lock(service)`."""
        meta = ReplicaMeta(service=service, kind=kind, role=BUILDING, epoch=epoch, mode=mode)
        replica = Replica.create(self, root, meta)
        replica.open(state)
        self.replicas[service] = replica
        if self.hooks.hooks:
            self._roles_seen[service] = BUILDING  # arrived by migration: on_migrated says so
            self.hooks.fire(ON_MIGRATED, service, BUILDING, epoch)

    def replica(self, service: str) -> Replica:
        replica = self.replicas.get(service)
        if replica is None:
            raise KeyError(service)
        return replica

    def data_replica(self, service: str) -> Replica:
        """The replica a client addressed; a missing one is reported like a non-primary."""
        replica = self.replicas.get(service)
        if replica is None:
            raise NotPrimaryError(service)
        return replica


class FrameFeed:
    """Hands snapshot frames from the event loop that receives them to the I/O thread that
    installs them, at most `frames_max` waiting (the stream is read no faster than that).

    The loop side calls `put` (None ends the stream) or `abort`; the thread iterates
    `frames()`, which raises the abort's error, or Unavailable when no frame came within
    `timeout_s`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, frames_max: int,
                 timeout_s: float) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(frames_max)
        self._timeout_s = timeout_s
        self._aborted: BaseException | None = None

    async def put(self, frame: bytes | None, consumer: asyncio.Future[Any]) -> bool:
        """Queues a frame (None: the end); False if `consumer` finished first, without it."""
        put = asyncio.ensure_future(self._queue.put(frame))
        done, _ = await asyncio.wait({put, consumer}, timeout=self._timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if put in done:
            return True
        put.cancel()
        if consumer in done:
            return False
        raise Unavailable(f"the snapshot install took no frame for {self._timeout_s:.0f} s")

    def abort(self, error: BaseException) -> None:
        """Makes the consumer stop with `error` at its next frame (loop side)."""
        self._aborted = error
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(error)  # wakes a consumer waiting on an empty queue

    def frames(self) -> Iterator[bytes]:
        """The frames, in order, until the end (consumer side: an I/O thread)."""
        while True:
            if self._aborted is not None:
                raise Unavailable(f"the snapshot stream broke: {self._aborted!r}")
            future = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop)
            try:
                item = future.result(self._timeout_s)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise Unavailable(f"no snapshot frame arrived for {self._timeout_s:.0f} s; the "
                                  "stream stalled") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise Unavailable(f"the snapshot stream broke: {item!r}")
            yield item


def _refusal(service: str, item: Any, replica: Replica | None,
             message: str) -> replication_pb2.ReplicaAck:
    """A shipped item this replica cannot take: a storage error, at the replica's epoch so
    that its primary acts on it (marks the duplica failed and probes again later)."""
    return replication_pb2.ReplicaAck(
        service=service, epoch=replica.epoch if replica is not None else 0,
        status=replication_pb2.ACK_STATUS_STORAGE_ERROR,
        batch_id=getattr(item, "batch_id", 0), message=message)


def _ack_to_proto(ack: dict[str, Any]) -> replication_pb2.ReplicaAck:
    last: LogPosition = ack["last"]
    return replication_pb2.ReplicaAck(
        service=ack["service"], epoch=ack["epoch"], status=_STATUS[ack["status"]],
        batch_id=ack["batch_id"], durable_index=ack["durable_index"],
        applied_index=ack["applied_index"],
        last=common_pb2.LogPosition(epoch=last.epoch, index=last.index),
        epoch_history=[common_pb2.EpochStart(epoch=e, first_index=i) for e, i in ack["history"]],
        # 0 on the wire means "not a truncate answer"; the count travels as count + 1.
        truncated_entries=ack["truncated"] + 1,
        first_index=ack["first_index"], message=ack["message"],
    )


def _header_to_proto(header: SnapshotHeader) -> replication_pb2.SnapshotHeader:
    history = header.extra.get("history", []) if header.extra else []
    return replication_pb2.SnapshotHeader(
        kind=header.kind, kind_version=header.kind_version, applied_index=header.applied_index,
        epoch=header.epoch, digest=header.digest, raw_bytes=header.raw_bytes,
        epoch_history=[common_pb2.EpochStart(epoch=e, first_index=i) for e, i in history],
    )

