"""The streaming data path (issue 16), on the real agent, servicer and `Client` in process:
calls queued together travel in one message and become one log append, answers are matched
to their calls by seq whatever their order, each call is checked and refused on its own, a
request id sent twice is applied once, and the bounds on a message hold on both sides."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import msgpack
import pytest

from failover import defaults
from failover.agent.admission import StreamAdmission
from failover.agent.host import Agent
from failover.client import Client, SyncClient
from failover.client_stream import CallRefusal, CallStream
from failover.core.sessions import ReplyStatus
from failover.errors import InvalidRequest, RequestRejected
from failover.net import agent_servicers, channels
from failover.net.execute_stream import ExecuteStream
from failover.v1 import coordinator_pb2, data_pb2, data_pb2_grpc
from tests.unit.inprocess import UNREACHABLE, agent_config, until


class _Counting(agent_servicers.DataServicer):
    """The real servicer, counting the calls of each ExecuteStream message it reads."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.messages: list[int] = []

    async def ExecuteStream(  # noqa: N802 (gRPC name)
        self, request_iterator: AsyncIterator[data_pb2.CallBatch],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[data_pb2.AnswerBatch]:
        async def counted() -> AsyncIterator[data_pb2.CallBatch]:
            async for batch in request_iterator:
                self.messages.append(len(batch.seq))
                yield batch

        async for answers in super().ExecuteStream(counted(), context):
            yield answers


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Agent, _Counting, str]]:
    """Agent "a" serving Data on a free port, holding kv1 and bank1 as primaries alone."""
    agent = Agent(agent_config(tmp_path, fsync_policy="never", snapshot_every_entries=0))
    await agent.start()
    server = channels.server()
    servicer = _Counting(agent)
    data_pb2_grpc.add_DataServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for service, kind in (("kv1", "kv"), ("bank1", "bank")):
        replica = await agent.assign_role(service, kind, "primary", 1, "sync", None, {}, set())
        await until(lambda r=replica: r.sm.applied_index >= 1)  # type: ignore[misc]
    try:
        yield agent, servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
        await agent.stop()


def _pack(request: dict[str, Any]) -> bytes:
    return msgpack.packb(request, use_bin_type=True)


def _calls(*calls: tuple[str, str, int, dict[str, Any]], deadline_ms: int = 5000,
           opens: bool = True) -> data_pb2.CallBatch:
    """A CallBatch of (service, client_id, seq, request) calls."""
    return data_pb2.CallBatch(
        service=[c[0] for c in calls], epoch_seen=[0] * len(calls),
        client_id=[c[1] for c in calls], seq=[c[2] for c in calls],
        payload=[_pack(c[3]) for c in calls], deadline_ms=[deadline_ms] * len(calls),
        opens_session=[opens] * len(calls))


async def _answers(call: grpc.aio.StreamStreamCall, count: int) -> data_pb2.AnswerBatch:
    """Reads answer messages until `count` calls are answered; all of them, merged."""
    out = data_pb2.AnswerBatch()
    while len(out.seq) + len(out.refused) < count:
        out.MergeFrom(await asyncio.wait_for(call.read(), 10))
    return out


async def test_calls_queued_together_go_in_one_message_and_one_append(
    served: tuple[Agent, _Counting, str],
) -> None:
    agent, servicer, address = served
    replica = agent.replicas["kv1"]
    appends: list[int] = []
    append = replica.wal.append

    def counted_append(entries: Any) -> int:
        appends.append(len(entries))
        return append(entries)

    replica.wal.append = counted_append  # type: ignore[method-assign]
    async with Client(agents=address, stream=True) as client:
        await client.call("kv1", {"op": "put", "key": "first", "value": "v"})
        servicer.messages.clear()
        appends.clear()
        results = await client.call_many(
            "kv1", [{"op": "put", "key": f"k{i}", "value": f"v{i}"} for i in range(200)])
    assert len(results) == 200 and all(r["ok"] for r in results)
    # Whatever was queued when the stream was free went together: not one message per call.
    assert sum(servicer.messages) == 200
    assert len(servicer.messages) <= 3, servicer.messages
    # One message's writes are one append (the writer took them together).
    assert len(appends) <= len(servicer.messages), (appends, servicer.messages)
    assert replica.sm.kind.apply({"op": "get", "key": "k199"})["value"] == "v199"


async def test_answers_are_matched_by_seq_and_come_back_in_order(
    served: tuple[Agent, _Counting, str],
) -> None:
    """Writes, reads (answered on their own path), an application refusal and a malformed
    request in one call_many: each result or error in its own place."""
    _agent, servicer, address = served
    async with Client(agents=address, stream=True) as client:
        await client.call("bank1", {"op": "open", "account": "a", "balance": 10})
        await client.call("bank1", {"op": "open", "account": "b", "balance": 5})
        await client.call("bank1", {"op": "open", "account": "d", "balance": 0})
        requests: list[dict[str, Any]] = [
            {"op": "balance", "account": "a"},
            {"op": "transfer", "from": "b", "to": "d", "amount": 1},
            {"op": "transfer", "from": "a", "to": "b", "amount": 1000},  # refused: overdraw
            {"op": "nope"},
            {"op": "open", "account": "c", "balance": 1},
        ]
        out = await client.call_many("bank1", requests, return_exceptions=True)
        with pytest.raises(RequestRejected):
            await client.call_many("bank1", requests[2:3])
    assert out[0]["balance"] == 10
    assert out[1]["ok"] and out[1]["to_balance"] == 1
    assert isinstance(out[2], RequestRejected)
    assert isinstance(out[3], InvalidRequest)
    assert out[4]["balance"] == 1
    assert servicer.messages  # it went on the stream



async def test_stream_false_calls_one_unary_execute_per_request_with_the_same_results(
    served: tuple[Agent, _Counting, str],
) -> None:
    """The stream is the default; `stream=False` keeps the unary path (one Execute per
    request), with the same results and errors in their places, and no stream opened."""
    _agent, servicer, address = served
    async with Client(agents=address, stream=False) as client:
        assert not client.stream
        await client.call("bank1", {"op": "open", "account": "a", "balance": 10})
        await client.call("bank1", {"op": "open", "account": "b", "balance": 5})
        out = await client.call_many("bank1", [
            {"op": "balance", "account": "a"},
            {"op": "transfer", "from": "b", "to": "a", "amount": 1},
            {"op": "transfer", "from": "a", "to": "b", "amount": 1000},  # refused: overdraw
            {"op": "nope"},
        ], return_exceptions=True)
        assert not client._streams
    assert out[0]["balance"] == 10
    assert out[1]["ok"] and out[1]["to_balance"] == 11
    assert isinstance(out[2], RequestRejected)
    assert isinstance(out[3], InvalidRequest)
    assert servicer.messages == []  # not a stream message: unary Execute all along


async def test_the_client_calls_on_the_stream_by_default(
    served: tuple[Agent, _Counting, str],
) -> None:
    _agent, servicer, address = served
    async with Client(agents=address) as client:
        assert client.stream
        assert (await client.call("kv1", {"op": "put", "key": "k", "value": "v"}))["ok"]
    assert sum(servicer.messages) == 2  # the session's open and the put

async def test_each_call_is_checked_and_refused_on_its_own(
    served: tuple[Agent, _Counting, str],
) -> None:
    _agent, _servicer, address = served
    async with channels.insecure_channel(address) as channel:
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        await call.write(_calls(
            ("kv1", "c", 1, {"op": "put", "key": "x", "value": "1"}),
            ("nosuch", "c", 2, {"op": "put", "key": "x", "value": "2"}),
            ("kv1", "", 3, {"op": "put", "key": "x", "value": "3"}),
            ("bad/name", "c", 4, {"op": "get", "key": "x"}),
            ("kv1", "c", 5, {"op": "put", "key": "y", "value": "5"})))
        answers = await _answers(call, 5)
        await call.done_writing()
    assert sorted(answers.seq) == [1, 5]
    refused = {r.seq: r for r in answers.refused}
    assert sorted(refused) == [2, 3, 4]
    assert refused[2].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]  # not held here
    assert refused[2].HasField("redirect")
    assert refused[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "client_id" in refused[3].message
    assert refused[4].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_a_request_id_sent_twice_in_one_message_is_applied_once(
    served: tuple[Agent, _Counting, str],
) -> None:
    agent, _servicer, address = served
    replica = agent.replicas["bank1"]
    async with channels.insecure_channel(address) as channel:
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        await call.write(_calls(("bank1", "c", 1, {"op": "open", "account": "a",
                                                   "balance": 10})))
        await _answers(call, 1)
        await call.write(_calls(("bank1", "c", 2, {"op": "open", "account": "b",
                                                   "balance": 0}), opens=False))
        await _answers(call, 1)
        deposit = {"op": "transfer", "from": "a", "to": "b", "amount": 5}
        await call.write(_calls(("bank1", "c", 3, deposit), ("bank1", "c", 3, deposit),
                                opens=False))
        first = await _answers(call, 2)
        # And again later, on its own: the recorded reply.
        await call.write(_calls(("bank1", "c", 3, deposit), opens=False))
        again = await _answers(call, 1)
        await call.done_writing()
    assert list(first.seq) == [3, 3] and not first.refused
    assert {msgpack.unpackb(d)["from_balance"] for d in first.data} == {5}
    assert len(set(first.index)) == 1  # one entry for both
    assert list(again.duplicate) == [True]
    assert msgpack.unpackb(again.data[0])["from_balance"] == 5
    balance = replica.sm.query(_pack({"op": "balance", "account": "a"}))
    assert balance.status == ReplyStatus.OK and msgpack.unpackb(balance.data)["balance"] == 5


async def test_a_message_past_its_bounds_ends_the_stream_invalid_argument(
    served: tuple[Agent, _Counting, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, _servicer, address = served
    monkeypatch.setattr(defaults, "STREAM_CALLS_PER_MESSAGE_MAX", 4)
    monkeypatch.setattr(defaults, "STREAM_MESSAGE_BYTES_MAX", 1000)
    last = agent.replicas["kv1"].wal.last_index
    put = {"op": "put", "key": "k", "value": "v"}
    uneven = _calls(("kv1", "c", 1, put))
    uneven.seq.append(2)
    too_many = _calls(*(("kv1", "c", n, put) for n in range(1, 6)))
    too_big = _calls(("kv1", "c", 1, {**put, "value": "v" * 600}),
                     ("kv1", "c", 2, {**put, "value": "v" * 600}))
    async with channels.insecure_channel(address) as channel:
        for batch, words in ((uneven, "one entry per call"),
                             (too_many, "stream_calls_per_message_max"),
                             (too_big, "stream_message_bytes_max")):
            call = data_pb2_grpc.DataStub(channel).ExecuteStream()
            await call.write(batch)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(call.read(), 10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in (refused.value.details() or "")
    assert agent.replicas["kv1"].wal.last_index == last  # nothing was logged


async def test_the_client_packs_no_more_than_a_message_may_carry(
    served: tuple[Agent, _Counting, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    _agent, servicer, address = served
    monkeypatch.setattr(defaults, "STREAM_CALLS_PER_MESSAGE_MAX", 7)
    monkeypatch.setattr(defaults, "STREAM_MESSAGE_BYTES_MAX", 3000)
    async with Client(agents=address, stream=True) as client:
        await client.call("kv1", {"op": "put", "key": "first", "value": "v"})
        servicer.messages.clear()
        small = await client.call_many(
            "kv1", [{"op": "put", "key": f"k{i}", "value": "v"} for i in range(30)])
        counts = list(servicer.messages)
        servicer.messages.clear()
        # Values of ~1000 bytes: at most two fit the message's bytes.
        big = await client.call_many(
            "kv1", [{"op": "put", "key": f"b{i}", "value": "v" * 1000} for i in range(6)])
    assert len(small) == 30 and sum(counts) == 30 and max(counts) <= 7
    assert len(big) == 6 and sum(servicer.messages) == 6 and max(servicer.messages) <= 2


async def test_a_write_that_cannot_commit_is_answered_unavailable_at_its_deadline(
    served: tuple[Agent, _Counting, str],
) -> None:
    """The stream does not hold a call past its deadline: a write waiting on an in-sync
    duplica that never answers is told UNAVAILABLE (outcome unknown), and the stream goes
    on serving."""
    agent, _servicer, address = served
    await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {"b": UNREACHABLE}, {"b"})
    async with channels.insecure_channel(address) as channel:
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        started = time.monotonic()
        await call.write(_calls(("kv1", "c", 1, {"op": "put", "key": "k", "value": "v"}),
                                deadline_ms=300))
        answers = await _answers(call, 1)
        waited_s = time.monotonic() - started
        await call.write(_calls(("bank1", "c", 2, {"op": "open", "account": "a",
                                                   "balance": 1})))
        later = await _answers(call, 1)
        await call.done_writing()
    assert [r.code for r in answers.refused] == [grpc.StatusCode.UNAVAILABLE.value[0]]
    assert "retry with the same request id" in answers.refused[0].message
    assert 0.25 <= waited_s < 5
    assert list(later.seq) == [2]


async def test_the_client_gives_up_on_a_call_at_its_deadline(
    served: tuple[Agent, _Counting, str],
) -> None:
    agent, _servicer, address = served
    async with Client(agents=address, deadline_ms=5000, stream=True) as client:
        await client.call("kv1", {"op": "put", "key": "a", "value": "v"})
        await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {"b": UNREACHABLE},
                                {"b"})
        started = time.monotonic()
        with pytest.raises(Exception, match="no answer within 400 ms"):
            await client.call("kv1", {"op": "put", "key": "b", "value": "v"}, deadline_ms=400)
        assert time.monotonic() - started < 3


async def test_sync_client_call_many(served: tuple[Agent, _Counting, str]) -> None:
    """Blocking, on its own loop: the same stream path."""
    _agent, servicer, address = served

    def run() -> list[Any]:
        with SyncClient(agents=address, stream=True) as client:
            return client.call_many("kv1", [{"op": "put", "key": f"s{i}", "value": "v"}
                                            for i in range(20)])

    results = await asyncio.to_thread(run)
    assert len(results) == 20 and all(r["ok"] for r in results)
    assert sum(servicer.messages) >= 21  # the session's open and the 20 puts, streamed


async def test_a_routes_push_moves_a_call_in_flight_to_the_new_primary_with_its_id(
    served: tuple[Agent, _Counting, str], tmp_path: Path,
) -> None:
    """A call waiting on a primary that cannot commit (its in-sync duplica never answers)
    is cancelled when the routes name another primary, and goes there at once with the same
    request id, on that primary's stream."""
    agent, servicer, address = served
    await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {"b": UNREACHABLE}, {"b"})
    other = Agent(agent_config(tmp_path / "other", fsync_policy="never"))
    await other.start()
    server = channels.server()
    data_pb2_grpc.add_DataServicer_to_server(agent_servicers.DataServicer(other), server)
    other_address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        replica = await other.assign_role("kv1", "kv", "primary", 2, "sync", None, {}, set())
        async with Client(coordinator=UNREACHABLE, deadline_ms=10_000, stream=True) as client:
            client._watcher = asyncio.get_running_loop().create_task(asyncio.Event().wait())
            client._routes["kv1"] = (address, 1)
            call = asyncio.get_running_loop().create_task(
                client.call("kv1", {"op": "put", "key": "moved", "value": "v"}))
            # The session's open waits at the first primary too: move it on first.
            await until(lambda: sum(servicer.messages) >= 1)
            assert not call.done()
            started = time.monotonic()
            client._apply_routes(coordinator_pb2.RoutesUpdate(version=1, full=True, routes=[
                coordinator_pb2.Route(service="kv1", kind="kv", primary_address=other_address,
                                      primary_host_id="o", epoch=2)]))
            assert (await asyncio.wait_for(call, 5))["ok"]
            assert time.monotonic() - started < 2  # not at the old primary's deadline
            assert client.retries >= 1 and not client._streams[other_address].broken
        assert replica.sm.kind.apply({"op": "get", "key": "moved"})["value"] == "v"
    finally:
        await server.stop(None)
        await other.stop()


async def test_a_stream_retry_older_than_the_window_is_session_expired_alone(
    served: tuple[Agent, _Counting, str],
) -> None:
    """A call whose seq fell out of its session's window may have been applied: it is
    refused SessionExpired (an unknown outcome) on its own, and the calls beside it in the
    message go on."""
    _agent, _servicer, address = served
    window = defaults.SESSION_REPLIES_PER_CLIENT_MAX
    put = {"op": "put", "key": "k", "value": "v"}
    async with channels.insecure_channel(address) as channel:
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        await call.write(_calls(("kv1", "c", 1, put)))
        await _answers(call, 1)
        later = [("kv1", "c", seq, put) for seq in range(2, window + 3)]
        await call.write(_calls(*later, opens=False))
        await _answers(call, len(later))
        await call.write(_calls(("kv1", "c", 1, put), ("kv1", "c", window + 3, put),
                                opens=False))
        answers = await _answers(call, 2)
        await call.done_writing()
    assert list(answers.seq) == [window + 3]
    [refused] = answers.refused
    assert refused.seq == 1 and refused.error_type == "SessionExpired"
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


async def test_streams_past_the_bound_per_connection_are_refused_overloaded(
    served: tuple[Agent, _Counting, str],
) -> None:
    agent, _servicer, address = served
    agent.data_streams = StreamAdmission("ExecuteStream", 1, 10)
    put = {"op": "put", "key": "k", "value": "v"}
    async with channels.insecure_channel(address) as channel:
        first = data_pb2_grpc.DataStub(channel).ExecuteStream()
        await first.write(_calls(("kv1", "c", 1, put)))
        await _answers(first, 1)
        second = data_pb2_grpc.DataStub(channel).ExecuteStream()  # the same connection
        # Refused as it opens, before any message (`DataServicer.ExecuteStream`). A write
        # first raced the refusal: sent after it, it failed with gRPC's own INTERNAL, which
        # then stood for the call's status.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(second.read(), 10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ExecuteStream streams" in (refused.value.details() or "")
        await first.write(_calls(("kv1", "c", 3, put), opens=False))  # the first goes on
        assert list((await _answers(first, 1)).seq) == [3]
        async with channels.insecure_channel(address, own_connection=True) as other:
            third = data_pb2_grpc.DataStub(other).ExecuteStream()  # another connection
            await third.write(_calls(("kv1", "c", 4, put), opens=False))
            assert list((await _answers(third, 1)).seq) == [4]
            await third.done_writing()
        await first.done_writing()


class _AnswersLater(data_pb2_grpc.DataServicer):
    """A blocking (thread-pool) server, so that it answers while the test's event loop is
    stalled: each message's calls are answered `delay_s` after it came, or never."""

    def __init__(self, delay_s: float | None) -> None:
        self.delay_s = delay_s
        self.received = threading.Event()

    def ExecuteStream(  # noqa: N802 (gRPC name)
        self, request_iterator: Iterator[data_pb2.CallBatch], context: grpc.ServicerContext,
    ) -> Iterator[data_pb2.AnswerBatch]:
        for batch in request_iterator:
            self.received.set()
            if self.delay_s is None:
                continue
            time.sleep(self.delay_s)
            n = len(batch.seq)
            yield data_pb2.AnswerBatch(
                seq=batch.seq, data=[_pack({"ok": True})] * n, outcome=[0] * n,
                index=[1] * n, commit_index=[1] * n, epoch=[1] * n, duplicate=[False] * n,
                session_known=[True] * n)


@contextlib.contextmanager
def _blocking_server(servicer: _AnswersLater) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    data_pb2_grpc.add_DataServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


async def test_an_answer_that_came_while_the_clients_loop_was_stalled_is_kept() -> None:
    """The application blocks the client's event loop past a call's deadline (a blocking
    call in async code, as test_coordinator_ha's etcd outage and the demo's agent restart
    do), and the answer comes during the stall: unary Execute keeps it (gRPC keeps its
    deadline, off the loop), and so must the stream. Its deadline timer, made due by the
    stall, ran before the reader could take the answer, and the call was refused
    DEADLINE_EXCEEDED with its answer unread: it waited its whole deadline for nothing."""
    servicer = _AnswersLater(0.1)
    with _blocking_server(servicer) as address:
        async with channels.insecure_channel(address) as channel:
            stream = CallStream(data_pb2_grpc.DataStub(channel), address)
            loop = asyncio.get_running_loop()
            future = stream.submit("kv1", 0, "c", 1, _pack({"op": "put"}), loop.time() + 0.5,
                                   True)
            await until(servicer.received.is_set)
            time.sleep(1.0)  # noqa: ASYNC251 (the stall under test)
            answer = await asyncio.wait_for(future, 5)
            await stream.close()
    assert answer.outcome == 0 and msgpack.unpackb(answer.data) == {"ok": True}


async def test_a_call_unanswered_after_a_stall_is_still_refused_at_its_deadline() -> None:
    """The grace after a stall only lets the reader take what came: a call with no answer
    is refused DEADLINE_EXCEEDED soon after the loop runs again, not later."""
    servicer = _AnswersLater(None)
    with _blocking_server(servicer) as address:
        async with channels.insecure_channel(address) as channel:
            stream = CallStream(data_pb2_grpc.DataStub(channel), address)
            loop = asyncio.get_running_loop()
            future = stream.submit("kv1", 0, "c", 1, _pack({"op": "put"}), loop.time() + 0.3,
                                   True)
            await until(servicer.received.is_set)
            time.sleep(0.6)  # noqa: ASYNC251 (the stall under test)
            resumed = loop.time()
            with pytest.raises(CallRefusal) as refused:
                await asyncio.wait_for(future, 5)
            waited_s = loop.time() - resumed
            await stream.close()
    assert refused.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    grace_s = defaults.CLIENT_STREAM_STALL_GRACE_MS / 1000
    assert waited_s < grace_s * defaults.CLIENT_STREAM_STALL_GRACES_MAX + 0.5


async def test_a_service_that_fails_to_take_its_calls_refuses_them_and_the_stream_goes_on(
    served: tuple[Agent, _Counting, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug while a replica takes a message's calls (here a kind's is_read_only raising)
    must not kill the stream's reader: those calls were then never answered, no later
    message was read, and every call on the stream waited out its whole deadline. Now the
    failed service's calls are refused UNAVAILABLE (retried with their ids), the other
    services' calls of the message are answered, and later messages are read."""
    agent, _servicer, address = served
    kind_cls = agent.replicas["kv1"].kind_cls
    is_read_only = kind_cls.is_read_only

    def failing(request: dict[str, Any]) -> bool:
        if request.get("op") == "boom":
            raise KeyError("a bug in the kind")
        return is_read_only(request)

    monkeypatch.setattr(kind_cls, "is_read_only", failing)
    async with channels.insecure_channel(address) as channel:
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        await call.write(_calls(("kv1", "c", 1, {"op": "boom"}),
                                ("bank1", "c", 2, {"op": "open", "account": "a",
                                                   "balance": 1}),
                                deadline_ms=60_000))
        answers = await _answers(call, 2)
        await call.write(_calls(("kv1", "c", 3, {"op": "put", "key": "k", "value": "v"}),
                                deadline_ms=60_000))
        later = await _answers(call, 1)
        await call.done_writing()
        assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.OK
    assert list(answers.seq) == [2]
    [refused] = answers.refused
    assert refused.seq == 1 and refused.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "KeyError" in refused.message and "same request id" in refused.message
    assert list(later.seq) == [3] and not later.refused


async def test_a_stream_whose_reading_fails_refuses_its_calls_and_ends_unavailable(
    served: tuple[Agent, _Counting, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should taking a message fail past `take`'s own guard, every call still waiting on the
    stream is refused UNAVAILABLE and the stream ends UNAVAILABLE, so that the client
    retries them at once on a new stream instead of waiting out their deadlines."""
    agent, _servicer, address = served
    await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {"b": UNREACHABLE}, {"b"})
    take = ExecuteStream.take
    taken: list[int] = []

    def failing_take(self: ExecuteStream, batch: data_pb2.CallBatch) -> None:
        taken.append(len(batch.seq))
        if len(taken) == 2:
            raise RuntimeError("a bug")
        take(self, batch)

    monkeypatch.setattr(ExecuteStream, "take", failing_take)
    async with channels.insecure_channel(address) as channel:
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        # It waits on a duplica that never answers, well within its deadline.
        await call.write(_calls(("kv1", "c", 1, {"op": "put", "key": "k", "value": "v"}),
                                deadline_ms=60_000))
        await until(lambda: len(taken) == 1)
        await call.write(_calls(("kv1", "c", 2, {"op": "put", "key": "k", "value": "v"}),
                                deadline_ms=60_000))
        answers = await _answers(call, 1)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 10)
    assert [r.seq for r in answers.refused] == [1]
    assert answers.refused[0].code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "RuntimeError" in (ended.value.details() or "")


async def test_the_stream_ends_once_the_client_is_done_and_its_calls_are_answered(
    served: tuple[Agent, _Counting, str],
) -> None:
    """The client half-closes with a call still running: the call is answered, then the
    stream ends OK. The servicer's loop used to wait for another wakeup after flushing the
    last answer, and the stream never ended (an INVALID_ARGUMENT end was lost the same way
    when answers were flushed after the reader stopped)."""
    _agent, _servicer, address = served
    async with channels.insecure_channel(address) as channel:
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        await call.write(_calls(("kv1", "c", 1, {"op": "put", "key": "k", "value": "v"})))
        await call.done_writing()
        answers = await _answers(call, 1)
        assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.OK
    assert list(answers.seq) == [1]


async def test_a_stream_whose_call_is_cancelled_under_it_breaks_and_refuses_its_calls() -> None:
    """gRPC raises CancelledError in the stream's reader when its call is cancelled under it
    (its channel closed): the reader used to end quietly with the stream not broken, and
    the waiting call, like every later one, waited out its deadline on a stream nobody
    read. Now the stream breaks: its calls are refused UNAVAILABLE at once (retried with
    their ids on a new stream)."""
    servicer = _AnswersLater(None)
    with _blocking_server(servicer) as address:
        channel = channels.insecure_channel(address)
        stream = CallStream(data_pb2_grpc.DataStub(channel), address)
        loop = asyncio.get_running_loop()
        waiting = stream.submit("kv1", 0, "c", 1, _pack({"op": "put"}), loop.time() + 30, True)
        await until(servicer.received.is_set)
        await channel.close()
        with pytest.raises(CallRefusal) as refused:
            await asyncio.wait_for(waiting, 5)
        later = stream.submit("kv1", 0, "c", 2, _pack({"op": "put"}), loop.time() + 30, True)
        with pytest.raises(CallRefusal) as refused_later:
            await asyncio.wait_for(later, 5)
        await stream.close()
    assert stream.broken
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused_later.value.code == grpc.StatusCode.UNAVAILABLE


async def test_answers_too_large_for_one_message_go_in_several(
    served: tuple[Agent, _Counting, str],
) -> None:
    """Reads answer with values up to REQUEST_BYTES_MAX: answers ready together are cut at
    STREAM_MESSAGE_BYTES_MAX (gRPC's bound was passed, and the stream ended with every call
    on it unanswered)."""
    agent, _servicer, address = served
    value = "v" * (3 << 20)
    replica = agent.replicas["kv1"]
    for n in range(4):
        await replica.execute(0, "w", n + 1, _pack({"op": "put", "key": f"k{n}", "value": value}),
                              5.0, n == 0)
    stream = ExecuteStream(agent)  # the same answers, ready together, as flush sees them
    for n in range(4):
        stream._seq.append(n + 1)
        stream._data.append(_pack({"found": True, "value": value}))
        for column in (stream._outcome, stream._index, stream._commit, stream._epoch):
            column.append(0)
        stream._duplicate.append(False)
        stream._known.append(True)
    stream.ready.set()
    sizes = []
    while stream.has_answers():
        out = stream.flush()
        assert out.ByteSize() < channels.MESSAGE_BYTES_MAX
        sizes.append(len(out.seq))
    assert sum(sizes) == 4 and len(sizes) > 1 and not stream.ready.is_set()
    async with channels.insecure_channel(address) as channel:  # end to end
        call = data_pb2_grpc.DataStub(channel).ExecuteStream()
        await call.write(_calls(*(("kv1", "r", n + 1, {"op": "get", "key": f"k{n}"})
                                  for n in range(4))))
        got = await _answers(call, 4)
        assert sorted(got.seq) == [1, 2, 3, 4] and not got.refused
        assert all(msgpack.unpackb(d)["value"] == value for d in got.data)
        await call.done_writing()


class _SilentCall:
    """An ExecuteStream call that never answers (its end is told by `_break_with`)."""

    def __init__(self) -> None:
        self._never = asyncio.Event()

    async def write(self, batch: Any) -> None:
        await self._never.wait()

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> Any:
        await self._never.wait()

    def cancel(self) -> None:
        pass


class _SilentStub:
    def ExecuteStream(self) -> _SilentCall:  # noqa: N802 (the gRPC method's name)
        return _SilentCall()


@pytest.mark.parametrize(("metadata", "code"), [
    ((), grpc.StatusCode.UNAVAILABLE),  # a message past gRPC's bound: calls may be logged
    (((channels.ERROR_TYPE_METADATA_KEY, "Overloaded"),), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
async def test_a_stream_ended_resource_exhausted_is_overloaded_only_when_the_agent_says_so(
        metadata: Any, code: grpc.StatusCode) -> None:
    """Only the agent's refusal of the stream (too many streams) names Overloaded, and
    nothing on such a stream was logged. Any other RESOURCE_EXHAUSTED end left the calls'
    outcome unknown, and the client must not say "nothing was applied"."""
    from failover.client_stream import CallRefusal, CallStream

    stream = CallStream(_SilentStub(), "127.0.0.1:1")  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    future = stream.submit("kv1", 0, "c", 1, b"x", loop.time() + 10, False)
    stream._break_with(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big", metadata)
    with pytest.raises(CallRefusal) as refused:
        await future
    assert refused.value.code == code
    assert (refused.value.error_type == "Overloaded") == (code != grpc.StatusCode.UNAVAILABLE)
    await stream.close()


async def test_a_message_answered_in_full_leaves_no_timer_behind(
    served: tuple[Agent, _Counting, str],
) -> None:
    """One expiry timer per message, cancelled once its calls are answered: on a long-lived
    stream they stayed armed for the message's whole deadline (up to 600 s) otherwise."""
    agent, _servicer, _address = served
    stream = ExecuteStream(agent)
    put = {"op": "put", "key": "k", "value": "v"}
    stream.take(_calls(("kv1", "t", 1, put), ("kv1", "t", 2, put), deadline_ms=600_000))
    assert len(stream._timers) == 1  # the writes wait for their commit
    await until(lambda: not stream.pending)
    assert not stream._timers and not stream._left
    assert len(stream.flush().seq) == 2
    stream.close()
