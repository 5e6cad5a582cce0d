"""A link to a peer that was down connects as soon as an assignment names the peer, not at
the end of its backoff, and on a channel that really connects (issue 16's crash path).

In the failover benchmark's crashes, a new primary's first write waited up to 200 ms after
its promotion for its link to the in-sync duplica, whose agent child had been restarted a
second before: the link's backoff had grown meanwhile, and the channel it reused was waiting
out gRPC's own reconnect backoff on top of it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import pytest

from failover import defaults
from failover.agent.links import PeerLink
from failover.net import channels
from failover.v1 import replication_pb2, replication_pb2_grpc


class Owner:
    """What a link needs of its agent."""

    host_id = "a"
    tls = None

    def __init__(self) -> None:
        self.ups = 0

    def on_link_up(self, host_id: str) -> None:
        self.ups += 1

    def on_link_down(self, host_id: str) -> None:
        pass

    def on_acks(self, host_id: str, reply: Any) -> None:
        pass


class Peer(replication_pb2_grpc.ReplicationServicer):
    """A peer that answers the hello and then holds the stream open."""

    async def Ship(self, request_iterator: AsyncIterator[Any],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for _message in request_iterator:
            yield replication_pb2.ShipReply()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(port: int) -> grpc.aio.Server:
    return await serve_with(port, Peer())


async def serve_with(port: int,
                     peer: replication_pb2_grpc.ReplicationServicer) -> grpc.aio.Server:
    server = channels.server()
    replication_pb2_grpc.add_ReplicationServicer_to_server(peer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def test_a_down_link_connects_at_once_when_an_assignment_names_its_peer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    owner = Owner()
    link = PeerLink(owner, "b", f"127.0.0.1:{port}")  # type: ignore[arg-type]
    # The peer is down for a while: the link retries often (gRPC's backoff on a channel
    # kept across attempts grows meanwhile), then its own backoff grows long.
    monkeypatch.setattr(defaults, "LINK_BACKOFF_MIN_MS", 10)
    monkeypatch.setattr(defaults, "LINK_BACKOFF_MAX_MS", 10)
    link.start()
    try:
        await asyncio.sleep(0.8)
        monkeypatch.setattr(defaults, "LINK_BACKOFF_MAX_MS", 60_000)
        await asyncio.sleep(0.8)  # the link's backoff is now past a second
        server = await serve(port)  # the peer is back
        try:
            link.retry_now()  # the coordinator assigned a replica set with the peer
            loop = asyncio.get_running_loop()
            started = loop.time()
            while not link.up:
                assert loop.time() - started < 0.5, "the link waited out its backoff"
                await asyncio.sleep(0.005)
            assert owner.ups == 1
        finally:
            await server.stop(None)
    finally:
        await link.stop()
