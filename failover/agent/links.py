"""One long-lived Ship stream from this host to a peer host, shared by every replica set the
two hosts share (docs/design.md, Replication).

Whatever the replicas queued while the last message was being written goes out as one
message, so a busy host sends few large messages rather than many small ones. The per
replica-set bounds (batch entries, bytes, in-flight batches) are kept by the protocol core;
the link adds a bound on the bytes queued in total.

A commit notice (an empty batch that only tells an idle duplica the commit moved,
`SendBatch.notice`) waits for the link's next message, LINK_NOTICE_DELAY_MS at most, and goes
if a later batch of its replica set (which carries a commit index as new) goes first: with
writers in a loop, a notice of its own was a message and an answer per write round, half of
the link's traffic, while the round's next batch came a millisecond later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Protocol

import grpc
import grpc.aio

from failover import defaults
from failover.net import channels
from failover.net.tls import TlsMaterial
from failover.v1 import replication_pb2, replication_pb2_grpc


class LinkOwner(Protocol):
    """What a link needs of the agent that owns it (failover.agent.host.Agent)."""

    host_id: str
    tls: TlsMaterial | None

    def on_link_up(self, host_id: str) -> None: ...
    def on_link_down(self, host_id: str) -> None: ...
    def on_acks(self, host_id: str, reply: replication_pb2.ShipReply) -> None: ...


log = logging.getLogger(__name__)



class PeerLink:
    """The sending side of the Ship stream to one peer host."""

    def __init__(self, agent: LinkOwner, host_id: str, address: str) -> None:
        self.agent = agent
        self.host_id = host_id
        self.address = address
        self.up = False
        self._channel: grpc.aio.Channel | None = None
        self._batches: list[replication_pb2.ShipBatch] = []
        self._notices: dict[str, replication_pb2.ShipBatch] = {}  # by service, the newest
        self._notice_timer: asyncio.TimerHandle | None = None
        self._probes: list[replication_pb2.Probe] = []
        self._truncates: list[replication_pb2.Truncate] = []
        self._outbox_bytes = 0
        self._wakeup = asyncio.Event()
        self._retry = asyncio.Event()  # `retry_now`: the backoff ends at once
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"link-{self.host_id}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._channel is not None:
            await self._channel.close()

    def channel(self) -> grpc.aio.Channel:
        """The channel to the peer (also used for snapshot installs): with TLS it accepts
        only a server whose certificate names the peer's host id, whatever its address."""
        if self._channel is None:
            # A connection of its own: after a failed attempt the link drops its channel
            # (`_run`), and a new one must really connect, not share one that is waiting out
            # gRPC's reconnect backoff.
            self._channel = channels.channel(self.address, self.agent.tls,
                                             server_name=self.host_id, own_connection=True)
        return self._channel

    def retry_now(self) -> None:
        """An assignment names this peer (the coordinator hears from it): a link that is
        down tries again now, not at the end of its backoff. A crashed agent's child is back
        within about a second, and a backoff grown meanwhile held a new primary's first
        write up to 200 ms after its promotion, waiting for the link to its in-sync
        duplica."""
        if not self.up:
            self._retry.set()

    # --- queueing ------------------------------------------------------------------------

    def send_probe(self, probe: replication_pb2.Probe) -> None:
        if self.up:
            self._probes.append(probe)
            self._wakeup.set()

    def send_truncate(self, truncate: replication_pb2.Truncate) -> None:
        if self.up:
            self._truncates.append(truncate)
            self._wakeup.set()

    def send_batch(self, batch: replication_pb2.ShipBatch, notice: bool = False) -> None:
        """Queues a batch; a commit `notice` goes with the next message (see the module)."""
        # While down, nothing is queued: link_up re-probes every replica set anyway.
        if not self.up:
            return
        if notice:
            self._notices[batch.service] = batch
            if self._notice_timer is None:
                self._notice_timer = asyncio.get_running_loop().call_later(
                    defaults.LINK_NOTICE_DELAY_MS / 1000, self._wakeup.set)
            return
        self._notices.pop(batch.service, None)  # this batch carries a commit as new
        self._batches.append(batch)
        self._outbox_bytes += len(batch.records)
        self._wakeup.set()

    # --- the stream ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff_ms = defaults.LINK_BACKOFF_MIN_MS
        failed = 0  # attempts failed since the link was last up: the first one is logged
        while not self._stopping:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                # Once per outage at INFO: a down peer is retried up to four times a second
                # (and at every assignment naming it), and a line per attempt from every
                # survivor cost their event loops measurably in a host death.
                log.log(logging.INFO if self.up or not failed else logging.DEBUG,
                        "link to %s (%s) broke: %s", self.host_id, self.address,
                        exc.details() or exc.code().name)
                failed = 0 if self.up else failed + 1
            except Exception:
                log.exception("link to %s failed", self.host_id)
            finally:
                if self.up:
                    # The stream was up, so the peer is reachable again: a session only ends
                    # by an error, and the next attempt starts from the shortest backoff.
                    backoff_ms = defaults.LINK_BACKOFF_MIN_MS
                    self.up = False
                    self._clear()
                    self.agent.on_link_down(self.host_id)
            # The next attempt connects anew (gRPC's own backoff, stacked on this one, kept
            # a channel failing for up to a second after the peer was back).
            channel, self._channel = self._channel, None
            if channel is not None:
                await channel.close()
            # Jitter keeps many links from reconnecting in lockstep after a peer restarts.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff_ms * random.uniform(0.5, 1.0) / 1000):
                    await self._retry.wait()
            self._retry.clear()
            backoff_ms = min(backoff_ms * 2, defaults.LINK_BACKOFF_MAX_MS)

    async def _session(self) -> None:
        stub = replication_pb2_grpc.ReplicationStub(self.channel())
        call = stub.Ship()
        # A hello that the peer answers proves the stream is open both ways.
        await call.write(replication_pb2.ShipMessage(source_host_id=self.agent.host_id))
        hello = await asyncio.wait_for(call.read(), timeout=5)
        if hello is grpc.aio.EOF:
            raise ConnectionError(f"{self.host_id} closed the stream")
        self._clear()
        self.up = True
        log.info("link to %s (%s) up", self.host_id, self.address)
        self.agent.on_link_up(self.host_id)
        reader = asyncio.ensure_future(self._read(call))
        writer = asyncio.ensure_future(self._write(call))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            reader.cancel()
            writer.cancel()
            call.cancel()

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise ConnectionError(f"{self.host_id} ended the stream")
            self.agent.on_acks(self.host_id, reply)

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._outbox_bytes > defaults.LINK_OUTBOX_BYTES_MAX:
                raise ConnectionError(
                    f"{self._outbox_bytes} bytes queued for {self.host_id}: restarting the link")
            if not (self._batches or self._probes or self._truncates or self._notices):
                continue
            batches, probes, truncates = self._batches, self._probes, self._truncates
            batches.extend(self._notices.values())
            self._clear()
            # Queued items go out together, but one message stays under the gRPC message
            # bound: batches of several replica sets (or of large entries) can add up past it.
            start = 0
            while True:
                end, size = start, 0
                while end < len(batches) and (
                        end == start or size + len(batches[end].records)
                        <= defaults.SHIP_MESSAGE_BYTES_MAX):
                    size += len(batches[end].records)
                    end += 1
                await call.write(replication_pb2.ShipMessage(
                    source_host_id=self.agent.host_id, batches=batches[start:end],
                    probes=probes if start == 0 else (),
                    truncates=truncates if start == 0 else ()))
                start = end
                if start >= len(batches):
                    break

    def _clear(self) -> None:
        self._batches, self._probes, self._truncates = [], [], []
        self._notices = {}
        if self._notice_timer is not None:
            self._notice_timer.cancel()
            self._notice_timer = None
        self._outbox_bytes = 0
