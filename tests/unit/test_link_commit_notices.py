"""A commit notice to an idle duplica rides with the link's next message (issue 16).

With writers in a loop, every round's commit was told to the duplica in a Ship message of its
own, answered in a message of its own: half of the link's messages, and a sixth of both
agents' CPU, while the round's next batch (carrying the commit index anyway) followed about a
millisecond later. A notice now waits for the link's next message, LINK_NOTICE_DELAY_MS at
most, and goes if a later batch of its replica set goes first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import pytest

from failover import defaults
from failover.agent.links import PeerLink
from failover.v1 import replication_pb2, replication_pb2_grpc
from tests.unit.inprocess import until

from .test_peer_link_reconnect import Owner, free_port, serve_with


class Recorder(replication_pb2_grpc.ReplicationServicer):
    """A peer that answers every message and keeps what each carried, with when it came."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, list[tuple[str, int, int]]]] = []

    async def Ship(self, request_iterator: AsyncIterator[Any],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for message in request_iterator:
            if message.batches:
                self.messages.append((time.monotonic(), [
                    (b.service, b.batch_id, b.commit_index) for b in message.batches]))
            yield replication_pb2.ShipReply()


def batch(service: str, batch_id: int, commit_index: int,
          records: bytes = b"") -> replication_pb2.ShipBatch:
    return replication_pb2.ShipBatch(service=service, epoch=1, batch_id=batch_id,
                                     commit_index=commit_index, records=records)


async def linked() -> tuple[PeerLink, Recorder, grpc.aio.Server]:
    port = free_port()
    peer = Recorder()
    server = await serve_with(port, peer)
    link = PeerLink(Owner(), "b", f"127.0.0.1:{port}")  # type: ignore[arg-type]
    link.start()
    await until(lambda: link.up)
    return link, peer, server


async def test_a_notice_alone_goes_within_the_delay() -> None:
    link, peer, server = await linked()
    try:
        sent = time.monotonic()
        link.send_batch(batch("s1", 1, 10), notice=True)
        await until(lambda: bool(peer.messages))
        arrived, carried = peer.messages[0]
        assert carried == [("s1", 1, 10)]
        # Not at once, and not much later than the delay (a loaded machine adds a little).
        assert arrived - sent >= defaults.LINK_NOTICE_DELAY_MS / 1000 * 0.9
        assert arrived - sent < defaults.LINK_NOTICE_DELAY_MS / 1000 + 0.5
    finally:
        await link.stop()
        await server.stop(None)


async def test_a_later_batch_of_the_same_set_replaces_the_notice_another_sets_rides_along(
) -> None:
    link, peer, server = await linked()
    try:
        link.send_batch(batch("s1", 1, 10), notice=True)
        link.send_batch(batch("s2", 7, 30), notice=True)
        link.send_batch(batch("s1", 2, 11, records=b"entries"))
        await until(lambda: bool(peer.messages))
        # One message: s1's batch (its commit index is as new as the notice's) and s2's notice.
        assert peer.messages[0][1] == [("s1", 2, 11), ("s2", 7, 30)]
        await asyncio.sleep(3 * defaults.LINK_NOTICE_DELAY_MS / 1000)
        assert len(peer.messages) == 1  # nothing left to send when the delay is up
    finally:
        await link.stop()
        await server.stop(None)


async def test_writers_in_a_loop_send_one_message_per_round_not_two(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A delay a loaded machine cannot outrun between a round's notice and its next batch.
    monkeypatch.setattr(defaults, "LINK_NOTICE_DELAY_MS", 200)
    link, peer, server = await linked()
    rounds = 20
    try:
        for n in range(rounds):
            link.send_batch(batch("s1", 2 * n + 1, n, records=b"entries"))
            await until(lambda n=n: len(peer.messages) > n)
            # The batch is answered and committed: the core tells the idle duplica so, and
            # the round's next write comes a moment later.
            link.send_batch(batch("s1", 2 * n + 2, n + 1), notice=True)
            await asyncio.sleep(0.0005)  # the round's next write, a moment later
        await until(lambda: len(peer.messages) > rounds)  # the last notice goes alone
        assert len(peer.messages) == rounds + 1
        assert peer.messages[-1][1] == [("s1", 2 * rounds, rounds)]
    finally:
        await link.stop()
        await server.stop(None)
