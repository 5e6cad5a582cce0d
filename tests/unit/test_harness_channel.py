"""The harness's blocking channels (`failover.processes.sync_channel`) reconnect at once to a
daemon that starts listening after a first try found nothing there: every cluster start
probes daemons that are still starting, and with gRPC's default backoff (1 s, then more) each
probe failed at once for a second or more after the daemon was serving."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from failover.processes import free_port, sync_channel, wait_for
from failover.v1 import agent_pb2, agent_pb2_grpc


class Status(agent_pb2_grpc.AgentControlServicer):
    def GetStatus(self, request: agent_pb2.GetStatusRequest,
                  context: grpc.ServicerContext) -> agent_pb2.AgentStatus:
        return agent_pb2.AgentStatus(host_id="h1")


def test_a_probe_that_found_nothing_sees_the_daemon_soon_after_it_listens() -> None:
    address = f"127.0.0.1:{free_port()}"
    stub = agent_pb2_grpc.AgentControlStub(sync_channel(address))
    with pytest.raises(grpc.RpcError) as refused:  # nothing listens there yet
        stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=0.5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the channel now backs off
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    agent_pb2_grpc.add_AgentControlServicer_to_server(Status(), server)
    server.add_insecure_port(address)
    server.start()
    try:
        listening = time.monotonic()
        wait_for(lambda: stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=0.5).host_id,
                 10, "the probe to reach the server")
        assert time.monotonic() - listening < 0.5
    finally:
        server.stop(None)
