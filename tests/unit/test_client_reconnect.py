"""When routes move a service to a host whose channel is waiting out gRPC's reconnect backoff
(the host was down a moment ago, as a crashed agent's child is while its supervisor restarts
it), the client connects to it anew at once (issue 16's crash path): the old channel failed
every call until its backoff ended, up to a second after the host was back."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import grpc.aio
import msgpack

from failover.client import Client
from failover.net import channels
from failover.v1 import coordinator_pb2, data_pb2, data_pb2_grpc


class Agent(data_pb2_grpc.DataServicer):
    """A primary that answers every write."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    async def Execute(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return data_pb2.ExecuteReply(result=msgpack.packb({}), index=1, commit_index=1,
                                     epoch=self.epoch, session_known=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(port: int, epoch: int) -> grpc.aio.Server:
    server = channels.server()
    data_pb2_grpc.add_DataServicer_to_server(Agent(epoch), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def routes(version: int, address: str, epoch: int) -> coordinator_pb2.RoutesUpdate:
    return coordinator_pb2.RoutesUpdate(version=version, full=True, routes=[
        coordinator_pb2.Route(service="kv", primary_address=address, epoch=epoch)])


async def test_routes_to_a_host_in_reconnect_backoff_connect_at_once() -> None:
    port, elsewhere = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    server = await serve(port, 1)
    async with Client(agents=address, stream=False, deadline_ms=2000) as client:
        client._apply_routes(routes(1, address, 1))
        await client.call("kv", {"op": "put", "key": "k", "value": "v"})
        await server.stop(None)  # the host goes down; its service fails over elsewhere
        client._apply_routes(routes(2, f"127.0.0.1:{elsewhere}", 2))
        channel = client._channel(address)
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.5
        while loop.time() < until:  # something keeps trying it (a late call, a read)
            channel.get_state(try_to_connect=True)
            await asyncio.sleep(0.02)
        server = await serve(port, 3)  # back, and promoted again
        try:
            channel.get_state(try_to_connect=True)
            await asyncio.sleep(0)
            assert channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE
            client._apply_routes(routes(3, address, 3))
            assert client._channel(address).get_state() != (
                grpc.ChannelConnectivity.TRANSIENT_FAILURE)
            started = loop.time()
            await client.call("kv", {"op": "put", "key": "k2", "value": "v"})
            assert loop.time() - started < 0.3
        finally:
            await server.stop(None)
