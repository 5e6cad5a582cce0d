"""Requests whose bytes do not parse cannot flood a daemon's log (issue 13, floods).

grpc.aio logs each at ERROR with a traceback before any role check runs; the daemons install
`DecodeErrorLimit`, which keeps one line per interval, saying how many were dropped."""

from __future__ import annotations

import logging

import grpc
import grpc.aio
import pytest

from failover.net.grpc_logs import DecodeErrorLimit, limit_decode_error_logs
from failover.v1 import agent_pb2


async def _garbage_calls(count: int) -> None:
    server = grpc.aio.server()

    async def handle(request: object, context: object) -> agent_pb2.AssignRoleReply:
        return agent_pb2.AssignRoleReply()

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {
        "M": grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=agent_pb2.AssignRoleRequest.FromString,
            response_serializer=agent_pb2.AssignRoleReply.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.T/M")
            for _ in range(count):
                with pytest.raises(grpc.aio.AioRpcError):
                    await call(b"\xff\xff\xff\x07garbage", timeout=5)
    finally:
        await server.stop(None)


async def test_a_flood_of_unparseable_requests_logs_one_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("grpc._cython.cygrpc")
    before = list(logger.filters)
    limit_decode_error_logs()
    limit_decode_error_logs()  # once per process, however often it is called
    try:
        assert sum(isinstance(f, DecodeErrorLimit) for f in logger.filters) == 1
        with caplog.at_level(logging.ERROR, logger="grpc._cython.cygrpc"):
            await _garbage_calls(20)
        lines = [r for r in caplog.records if r.name == "grpc._cython.cygrpc"]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert "does not parse" in lines[0].getMessage() and lines[0].exc_info is None
    finally:
        logger.filters[:] = before


def test_other_grpc_errors_pass_and_the_count_of_dropped_lines_is_told() -> None:
    limit = DecodeErrorLimit(interval_ms=0)
    other = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "", 0, "stream reset",
                              None, None)
    assert limit.filter(other) and other.getMessage() == "stream reset"
    limit = DecodeErrorLimit(interval_ms=10**9)
    records = [logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "", 0,
                                 "Unexpected [DecodeError] raised", None, None)
               for _ in range(3)]
    assert [limit.filter(r) for r in records] == [True, False, False]
    limit._next_ms = 0  # the interval has passed
    last = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "", 0,
                             "Unexpected [DecodeError] raised", None, None)
    assert limit.filter(last) and "(2 more since the last such line)" in last.getMessage()
