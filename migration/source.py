"""The source side of a live migration: rounds of pages to the target, then a short pause.

Runs in the agent's event loop, beside the replica it copies, which keeps serving: every
write still goes through its log and state machine while the pages move. A round copies its
pages out of the arena on the loop (a memcpy per page, so no page is read while a write
changes it), then encodes them on an I/O thread (lz4 releases the GIL) and writes them to the
target's `MigratePages` stream, whose flow control bounds what is in flight. After each round
the dirty map is swapped (`PagedState.take_dirty`) and the planner decides: another round
(with writes throttled when the writer outruns the copy), or the cut.

The cut is a consistent one (invariant 8): applying stops on the source, the pages dirtied
since the last swap go out with the state outside the arena (client sessions, the applied
position) and the digest of everything sent; the source resumes as soon as the target says the
copy checks out. Any failure before that aborts: the source never stopped owning the replica
and the target drops what it received.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio
import msgpack

from failover import defaults
from failover.clock import monotonic_ns
from failover.errors import MigrationError
from failover.net import channels
from failover.net.tls import TlsMaterial
from failover.v1 import agent_pb2, common_pb2, migration_pb2, migration_pb2_grpc
from migration.codec import PageEncoder, batches
from migration.interface import SourceReplica
from migration.planner import (
    PRECOPY,
    STOPCOPY,
    MigrationPlanner,
    PlannerConfig,
    RoundReport,
)

log = logging.getLogger(__name__)

SETUP_FORMAT = 1


def now_ms() -> float:
    """Fractional milliseconds on the project's clock (rounds last a few ms)."""
    return monotonic_ns() / 1_000_000


def encode_final_state(applied_index: int, applied_epoch: int, sessions: bytes) -> bytes:
    """The state outside the arena, as the cut carries it (and the digest covers it)."""
    return msgpack.packb([SETUP_FORMAT, applied_index, applied_epoch, sessions], use_bin_type=True)


class MigrationSource:
    """One outgoing migration of `replica` to `target_address`."""

    def __init__(
        self, replica: SourceReplica, request: agent_pb2.MigrateOutRequest, host_id: str,
        tls: TlsMaterial | None = None,
    ) -> None:
        """`tls`: this host's certificate; with it the copy goes over mutual TLS to a target
        whose certificate names `request.target_host_id`, whatever address it is dialled at."""
        if request.method not in (PRECOPY, STOPCOPY):
            raise MigrationError(f"method {request.method!r}: choose precopy or stopcopy")
        paged = replica.sm.kind.paged
        if paged is None:
            raise MigrationError(
                f"{replica.service}: kind {replica.meta.kind} keeps no paged "
                "arena, so it cannot be copied page by page; use --method "
                "replay"
            )
        if request.epoch and request.epoch != replica.epoch:
            raise MigrationError(
                f"{replica.service}: the coordinator names epoch "
                f"{request.epoch}, this replica is at {replica.epoch}"
            )
        self.replica = replica
        self.request = request
        self.host_id = host_id
        self.tls = tls
        # What the replica was when the copy began: the cut checks it still is (a step-down
        # or a newer epoch meanwhile makes the copy the state of a replica that is gone).
        self.role, self.epoch = replica.role, replica.epoch
        self.paged = paged
        self.encoder = PageEncoder(paged.page_bytes)
        self.id = request.migration_id
        self.raw_bytes = 0
        self.wire_bytes = 0
        self._paced_bytes = 0
        self._paced_from_ms = now_ms()
        self._encoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="migrate-encode")

    async def run(self) -> AsyncIterator[agent_pb2.MigrationProgress]:
        """Copies the replica; yields progress, the last message with phase "done"."""
        replica, request, paged = self.replica, self.request, self.paged
        started = now_ms()
        loop = asyncio.get_running_loop()
        state_bytes = paged.size_bytes
        planner = MigrationPlanner(
            PlannerConfig(
                state_bytes=state_bytes,
                method=request.method,
                page_bytes=paged.page_bytes,
                max_downtime_ms=request.max_downtime_ms or defaults.MAX_DOWNTIME_MS,
            )
        )
        channel = channels.channel(request.target_address, self.tls,
                                   server_name=request.target_host_id or None)
        stub = migration_pb2_grpc.MigrationStub(channel)
        call = stub.MigratePages(timeout=defaults.MIGRATION_TIMEOUT_MS / 1000)
        held = False
        try:
            await call.write(
                migration_pb2.PageBatch(
                    migration_id=self.id,
                    service=replica.service,
                    epoch=replica.epoch,
                    page_bytes=paged.page_bytes,
                    arena_pages=paged.page_count,
                    setup=msgpack.packb(
                        {
                            "format": SETUP_FORMAT,
                            "kind": replica.meta.kind,
                            "kind_version": replica.kind_cls.version,
                            "mode": replica.meta.mode,
                            "source_host_id": self.host_id,
                        },
                        use_bin_type=True,
                    ),
                )
            )
            setup_ms = now_ms() - started
            decision = planner.start()
            paged.take_dirty()  # round 0 sends every page: what was dirty before is in it
            pages: list[int] = list(range(paged.page_count))
            while not decision.cutover:
                replica.write_throttle_ms = decision.throttle_ms
                round_started = now_ms()
                sent = await self._send_round(call, decision.round, pages, loop)
                pages = paged.take_dirty()
                elapsed_ms = now_ms() - round_started
                decision = planner.round_done(
                    RoundReport(decision.round, sent[0], sent[1], sent[2], elapsed_ms, len(pages))
                )
                yield self._progress(
                    "round",
                    decision.round - 1,
                    sent[0],
                    len(pages),
                    len(pages) * 1000 / max(elapsed_ms, 0.001),
                    state_bytes,
                    decision.throttle_ms,
                )
            replica.write_throttle_ms = 0.0
            if replica.sm.kind.paged is not paged:
                # A snapshot install replaced the state while it was being copied: the pages
                # sent and the sessions at the cut would come from two different states.
                raise MigrationError(f"{replica.service}: its state was replaced during the "
                                     "copy (a snapshot install); migrate again")
            # The cut: no entry is applied from here until the target confirms the copy.
            paused = now_ms()
            replica.hold_apply()
            held = True
            self._check_unchanged()
            if request.method == STOPCOPY:
                paged.take_dirty()
                pages = list(range(paged.page_count))
            else:
                pages = sorted({*pages, *paged.take_dirty()})
            sm = replica.sm
            applied_index, applied_epoch = sm.applied_index, sm.applied_epoch
            final_state = encode_final_state(applied_index, applied_epoch, sm.sessions.to_bytes())
            history = [
                common_pb2.EpochStart(epoch=e, first_index=i)
                for e, i in replica.wal.epoch_history
                if i <= applied_index
            ]
            sent = await self._send_round(
                call,
                decision.round,
                pages,
                loop,
                final=migration_pb2.PageBatch(
                    final=True,
                    epoch=self.epoch,
                    final_state=final_state,
                    epoch_history=history,
                    applied=common_pb2.LogPosition(epoch=applied_epoch, index=applied_index),
                ),
            )
            result = await asyncio.wait_for(call.read(), defaults.MIGRATION_CUT_TIMEOUT_MS / 1000)
            if result is grpc.aio.EOF or result.stage != "cut":
                why = "the target closed the stream" if result is grpc.aio.EOF else result.message
                raise MigrationError(f"the target refused the cut: {why}")
            replica.release_apply()
            held = False
            downtime_ms = now_ms() - paused
            planner.cutover_done(
                RoundReport(decision.round, sent[0], sent[1], sent[2], downtime_ms)
            )
            cut_ms = now_ms() - started
            yield self._progress(
                "persisting",
                decision.round,
                sent[0],
                0,
                0.0,
                state_bytes,
                0.0,
                message="the target checked the copy; it writes it to disk",
            )
            result = await call.read()
            if result is grpc.aio.EOF or result.stage != "persisted":
                why = "the target closed the stream" if result is grpc.aio.EOF else result.message
                raise MigrationError(f"the target could not keep the copy: {why}")
            await call.done_writing()
            stats = planner.stats(
                total_ms=cut_ms, setup_ms=setup_ms, downtime_ms=downtime_ms
            ).to_dict()
            stats.update(
                {
                    "persisted_ms": now_ms() - started,
                    "state_bytes": state_bytes,
                    "applied_index": applied_index,
                    "reason": decision.reason,
                }
            )
            log.info(
                "%s: migrated to %s: %d rounds, downtime %.1f ms, %d -> %d bytes",
                replica.service,
                request.target_host_id,
                decision.round + 1,
                downtime_ms,
                self.raw_bytes,
                self.wire_bytes,
            )
            yield agent_pb2.MigrationProgress(
                migration_id=self.id,
                phase="done",
                round=decision.round,
                raw_bytes=self.raw_bytes,
                wire_bytes=self.wire_bytes,
                state_bytes=state_bytes,
                applied_index=applied_index,
                stats_json=_json(stats),
            )
        finally:
            replica.write_throttle_ms = 0.0
            if held:
                replica.release_apply()
            call.cancel()
            await channel.close()
            self._encoding.shutdown(wait=False, cancel_futures=True)

    def _check_unchanged(self) -> None:
        """At the cut, with applying held: the replica must still hold the role and epoch
        the copy began with, or the copy is dropped (the abort path: this replica keeps
        serving as it is, the target discards what it received)."""
        replica = self.replica
        current = replica.agent.replicas.get(replica.service)
        if (replica.role, replica.epoch) != (self.role, self.epoch) or current is not replica:
            raise MigrationError(
                f"{replica.service}: the copy began from the {self.role} at epoch "
                f"{self.epoch}, but at the cut this replica is {replica.role} at epoch "
                f"{replica.epoch}{'' if current is replica else ' and was dropped'}; the copy "
                "is discarded: migrate again")

    async def _send_round(
        self,
        call: Any,
        round_: int,
        pages: list[int],
        loop: asyncio.AbstractEventLoop,
        final: migration_pb2.PageBatch | None = None,
    ) -> tuple[int, int, int]:
        """Sends `pages` as one round; returns (pages, raw bytes, wire bytes). With `final`,
        its fields go on the round's last message."""
        paged, encoder = self.paged, self.encoder
        count = raw = wire = 0
        # At least one message: the cut's fields go out even when no page is dirty.
        chunks = list(batches(pages, paged.page_bytes)) or [[]]
        # Encoding (one thread, in order: the encoder remembers what it sent) runs ahead of
        # the stream by up to MIGRATION_ENCODE_AHEAD batches, so lz4 and gRPC overlap.
        pending: deque[tuple[int, list[int], int, asyncio.Future[Any]]] = deque()

        async def write_next() -> None:
            nonlocal count, raw, wire
            i, numbers, arena_pages, future = pending.popleft()
            encoded = await future
            batch = migration_pb2.PageBatch(
                migration_id=self.id,
                round=round_,
                page_numbers=encoded.page_numbers,
                encodings=encoded.encodings,
                pages_lz4=encoded.pages_lz4,
                page_bytes=paged.page_bytes,
                arena_pages=arena_pages,
            )
            if final is not None and i == len(chunks) - 1:
                batch.MergeFrom(final)
                batch.digest = encoder.digest(arena_pages, final.final_state)
            await call.write(batch)
            count += len(numbers)
            raw += encoded.raw_bytes
            wire += encoded.wire_bytes
            await self._pace(encoded.wire_bytes)

        try:
            for i, numbers in enumerate(chunks):
                # Copied on the loop: no write can change a page while it is copied.
                copies = _copy_pages(paged, numbers)
                future = loop.run_in_executor(self._encoding, encoder.encode, copies)
                pending.append((i, numbers, paged.page_count, future))
                if len(pending) > defaults.MIGRATION_ENCODE_AHEAD:
                    await write_next()
            while pending:
                await write_next()
        finally:
            for *_, future in pending:
                future.cancel()
        self.raw_bytes += raw
        self.wire_bytes += wire
        return count, raw, wire

    async def _pace(self, wire_bytes: int) -> None:
        """Keeps the copy under the operator's bandwidth cap (as QEMU's max-bandwidth):
        sleeps until the bytes sent so far fit the cap since the copy began."""
        cap = self.request.max_bandwidth_bytes_s
        if not cap:
            return
        self._paced_bytes += wire_bytes
        ahead_s = self._paced_bytes / cap - (now_ms() - self._paced_from_ms) / 1000
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)

    def _progress(
        self,
        phase: str,
        round_: int,
        pages: int,
        dirty: int,
        dirty_pages_s: float,
        state_bytes: int,
        throttle_ms: float,
        message: str = "",
    ) -> agent_pb2.MigrationProgress:
        return agent_pb2.MigrationProgress(
            migration_id=self.id,
            phase=phase,
            round=round_,
            pages=pages,
            raw_bytes=self.raw_bytes,
            wire_bytes=self.wire_bytes,
            dirty_pages=dirty,
            dirty_pages_s=dirty_pages_s,
            throttle_ms=round(throttle_ms),
            state_bytes=state_bytes,
            message=message,
        )


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def _copy_pages(paged: Any, numbers: list[int]) -> list[tuple[int, memoryview]]:
    """Copies the pages out of the arena (on the loop, so no write changes one midway), a run
    of consecutive pages per memcpy; each page is a view into its run's copy."""
    page_bytes = paged.page_bytes
    out: list[tuple[int, memoryview]] = []
    start = 0
    while start < len(numbers):
        end = start + 1
        while end < len(numbers) and numbers[end] == numbers[end - 1] + 1:
            end += 1
        first = numbers[start]
        block = memoryview(paged.read(first * page_bytes, (end - start) * page_bytes))
        out.extend((first + i, block[i * page_bytes:(i + 1) * page_bytes])
                   for i in range(end - start))
        start = end
    return out
