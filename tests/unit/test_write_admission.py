"""What a primary takes into its log, on the real agent, gRPC servicer and `Client` in process:
sessions that expired are refused, never re-applied (issue 11, item 3); requests too deep to
apply are refused before they are logged (item 5); writes in flight are bounded in bytes too
(item 10). The client's tests run on both data paths, one unary Execute per call and the
ExecuteStream of issue 16 (`path`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import msgpack
import pytest

from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.host import Agent
from failover.agent.replica import Replica
from failover.client import Client
from failover.core.sessions import ReplyStatus
from failover.core.state_machine import SESSION_OPEN_PAYLOAD
from failover.errors import InvalidRequest, Overloaded, SessionExpired
from failover.net import agent_servicers, channels
from failover.v1 import common_pb2, coordinator_pb2, data_pb2, data_pb2_grpc
from tests.unit.inprocess import UNREACHABLE, until


def _pack(request: dict[str, Any]) -> bytes:
    return msgpack.packb(request, use_bin_type=True)


class _LossyData(agent_servicers.DataServicer):
    """The real Execute servicer, except that the reply of a call `lose_next` picks is lost
    after the write was applied (the client sees UNAVAILABLE), once `meanwhile` has run."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.lose_next: Callable[[data_pb2.ExecuteRequest], bool] = lambda request: False
        # A call `drop_next` picks never reaches the primary (the client sees UNAVAILABLE).
        self.drop_next: Callable[[data_pb2.ExecuteRequest], bool] = lambda request: False
        self.meanwhile: Callable[[], Awaitable[None]] | None = None
        self.requests: list[data_pb2.ExecuteRequest] = []

    async def Execute(self, request: data_pb2.ExecuteRequest,  # noqa: N802 (gRPC name)
                      context: grpc.aio.ServicerContext) -> data_pb2.ExecuteReply:
        self.requests.append(request)
        if self.drop_next(request):
            self.drop_next = lambda request: False
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")
        reply = await super().Execute(request, context)
        if self.lose_next(request):
            self.lose_next = lambda request: False
            if self.meanwhile is not None:
                await self.meanwhile()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")
        return reply

    async def ExecuteStream(  # noqa: N802 (gRPC name)
        self, request_iterator: AsyncIterator[data_pb2.CallBatch],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[data_pb2.AnswerBatch]:
        """The real ExecuteStream, with the same losses: a message holding a call that
        `drop_next` picks never reaches the primary, and the stream then breaks (the client
        sees UNAVAILABLE for its calls); the answers holding the one that `lose_next` picks
        are lost after the write was applied and `meanwhile` ran (the stream breaks too)."""
        dropped = False
        lost: set[int] = set()

        async def calls() -> AsyncIterator[data_pb2.CallBatch]:
            nonlocal dropped
            async for batch in request_iterator:
                for i in range(len(batch.seq)):
                    request = data_pb2.ExecuteRequest(
                        service=batch.service[i], epoch_seen=batch.epoch_seen[i],
                        request_id=common_pb2.RequestId(client_id=batch.client_id[i],
                                                        seq=batch.seq[i]),
                        payload=batch.payload[i], deadline_ms=batch.deadline_ms[i],
                        opens_session=batch.opens_session[i])
                    self.requests.append(request)
                    if self.drop_next(request):
                        self.drop_next = lambda request: False
                        dropped = True
                    if self.lose_next(request):
                        self.lose_next = lambda request: False
                        lost.add(batch.seq[i])
                if dropped:
                    return
                yield batch

        async for answers in super().ExecuteStream(calls(), context):
            if lost & set(answers.seq):
                if self.meanwhile is not None:
                    await self.meanwhile()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")
            yield answers
        if dropped:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")


@pytest.fixture(params=["unary", "stream"])
def path(request: pytest.FixtureRequest) -> str:
    """Which data path the client takes: one Execute per call, or ExecuteStream."""
    return str(request.param)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Agent, _LossyData, str]]:
    """An agent serving Data on a free port: (agent, its servicer, address)."""
    agent = Agent(AgentConfig.from_mapping({
        "host_id": "a", "listen": "127.0.0.1:7999", "data_dir": str(tmp_path),
        "fsync_policy": "never", "snapshot_every_entries": 0}))
    await agent.start()
    server = channels.server()
    servicer = _LossyData(agent)
    data_pb2_grpc.add_DataServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield agent, servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
        await agent.stop()


async def _other_clients(replica: Replica, count: int) -> None:
    """`count` other clients each open their session with a write."""
    for start in range(0, count, 500):
        replies = await asyncio.gather(*(
            replica.execute(0, f"other-{k}", 1, _pack({"op": "open", "account": f"o{k}",
                                                        "balance": 1}), 10.0,
                            opens_session=True)
            for k in range(start, min(count, start + 500))))
        assert all(reply.status == ReplyStatus.OK for reply, _, _ in replies)


async def _balance(client: Client, account: str) -> int:
    result = await client.call("bank1", {"op": "balance", "account": account})
    return int(result["balance"])


async def test_a_transfer_retried_after_ten_thousand_other_clients_is_expired_not_reapplied(
    served: tuple[Agent, _LossyData, str], path: str,
) -> None:
    """The issue's scenario: the transfer is applied, its reply is lost, 10,000 other client
    ids are applied meanwhile (the payer's session is evicted), and the client's retry must
    be refused as SessionExpired, the balance debited once."""
    agent, servicer, address = served
    replica = await agent.assign_role("bank1", "bank", "primary", 1, "sync", None, {}, set())
    async with Client(agents=address, client_id="payer", deadline_ms=30_000,
                      stream=path == "stream") as client:
        await client.call("bank1", {"op": "open", "account": "alice", "balance": 90})
        await client.call("bank1", {"op": "open", "account": "bob", "balance": 0})
        # The session is opened by a request that does nothing else; no real request opens.
        assert servicer.requests[0].opens_session
        assert servicer.requests[0].payload == SESSION_OPEN_PAYLOAD
        assert not any(r.opens_session for r in servicer.requests[1:])
        servicer.lose_next = lambda request: b"transfer" in request.payload
        servicer.meanwhile = lambda: _other_clients(replica, defaults.SESSION_CLIENTS_MAX)
        transfer = {"op": "transfer", "from": "alice", "to": "bob", "amount": 10}
        with pytest.raises(SessionExpired, match="SessionExpired"):
            await client.call("bank1", transfer)
        retry = servicer.requests[-1]
        assert b"transfer" in retry.payload and not retry.opens_session
        assert not replica.sm.sessions.knows("payer")
        assert await _balance(client, "alice") == 80  # applied once, by the lost attempt
        assert await _balance(client, "bob") == 10
        # Later calls go under a new session, opened first.
        await client.call("bank1", transfer)
        assert servicer.requests[-1].request_id.client_id == "payer/1"
        opens = [r for r in servicer.requests if r.opens_session]
        assert [r.request_id.client_id for r in opens] == ["payer", "payer/1"]
        assert all(r.payload == SESSION_OPEN_PAYLOAD for r in opens)
        assert await _balance(client, "alice") == 70


async def test_an_expired_session_is_failed_precondition_naming_session_expired(
    served: tuple[Agent, _LossyData, str],
) -> None:
    agent, _servicer, address = served
    replica = await agent.assign_role("bank1", "bank", "primary", 1, "sync", None, {}, set())
    before = (replica.sm.kind.digest(), replica.sm.sessions.digest())
    channel = channels.insecure_channel(address)
    try:
        stub = data_pb2_grpc.DataStub(channel)
        request = data_pb2.ExecuteRequest(
            service="bank1", request_id=common_pb2.RequestId(client_id="never-opened", seq=3),
            payload=_pack({"op": "open", "account": "carol", "balance": 5}))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Execute(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (refused.value.details() or "").startswith("SessionExpired")
        assert (channels.ERROR_TYPE_METADATA_KEY, "SessionExpired") in list(
            refused.value.trailing_metadata() or ())
        # The refused entry was logged and applied, and changed nothing.
        assert replica.sm.applied_index == 2
        assert (replica.sm.kind.digest(), replica.sm.sessions.digest()) == before
        result = await stub.Execute(data_pb2.ExecuteRequest(
            service="bank1", request_id=common_pb2.RequestId(client_id="opened", seq=3),
            payload=_pack({"op": "open", "account": "carol", "balance": 5}), opens_session=True),
            timeout=5)
        assert result.session_known and msgpack.unpackb(result.result)["balance"] == 5
    finally:
        await channel.close()


def _nested(depth: int) -> bytes:
    """A kv put whose value nests `depth` lists deep (msgpack cannot pack it that deep)."""
    return (b"\x83\xa2op\xa3put\xa3key\xa1k\xa5value" + b"\x91" * depth + b"\xa1x")


async def test_a_request_nested_too_deep_is_refused_before_it_is_logged(
    served: tuple[Agent, _LossyData, str],
) -> None:
    agent, _servicer, address = served
    replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {}, set())
    await until(lambda: replica.sm.applied_index >= 1, timeout_s=10.0)
    last = replica.wal.last_index
    with pytest.raises(InvalidRequest, match="request_depth_max"):
        await replica.execute(0, "c", 1, _nested(1000), 5.0, opens_session=True)
    channel = channels.insecure_channel(address)
    try:
        stub = data_pb2_grpc.DataStub(channel)
        for depth in (defaults.REQUEST_DEPTH_MAX, 1000):  # the value is one level below the map
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Execute(data_pb2.ExecuteRequest(
                    service="kv1", request_id=common_pb2.RequestId(client_id="c", seq=2),
                    payload=_nested(depth), opens_session=True), timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "request_depth_max" in (refused.value.details() or "")
        assert replica.wal.last_index == last  # nothing was logged
        # One level less is logged (and refused by kv, which wants a str or bytes value).
        reply, _, _ = await replica.execute(0, "c", 3, _nested(defaults.REQUEST_DEPTH_MAX - 1),
                                            5.0, opens_session=True)
        assert reply.status == ReplyStatus.INVALID and replica.wal.last_index == last + 1
        replica.sm.digest()
        list(replica.sm.snapshot())
    finally:
        await channel.close()


async def test_writes_in_flight_are_bounded_in_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A primary whose in-sync duplica never acks: its writes stay in flight. Past the bound
    on their bytes, writes are refused (Overloaded) before they are logged; once the held
    writes are answered, writes are taken again."""
    monkeypatch.setattr(defaults, "PENDING_REQUEST_BYTES_MAX", 1 << 20)
    agent = Agent(AgentConfig.from_mapping({
        "host_id": "a", "listen": "127.0.0.1:7999", "data_dir": str(tmp_path),
        "fsync_policy": "never"}))
    await agent.start()
    try:
        replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None,
                                          {"b": UNREACHABLE}, {"b"})
        value = "v" * (200 << 10)
        held = [asyncio.create_task(replica.execute(
            0, "c", seq, _pack({"op": "put", "key": f"k{seq}", "value": value}), 30.0))
            for seq in range(1, 6)]  # five writes of ~200 KiB: just under 1 MiB
        # the barrier, then the five
        await until(lambda: replica.wal.last_index >= 6, timeout_s=10.0)
        last = replica.wal.last_index
        with pytest.raises(Overloaded, match="pending_request_bytes_max"):
            await replica.execute(0, "c", 6, _pack({"op": "put", "key": "k6",
                                                    "value": value}), 30.0)
        assert replica.wal.last_index == last and not any(t.done() for t in held)
        # The coordinator drops b from the in-sync set: the held writes commit and are
        # answered, and their bytes are free again.
        await agent.assign_role("kv1", "kv", "primary", 1, "sync", None,
                                {"b": UNREACHABLE}, set())
        await asyncio.wait_for(asyncio.gather(*held), 10.0)
        await until(lambda: replica.core.pending_bytes == 0, timeout_s=10.0)
        reply, _, _ = await replica.execute(0, "c", 6, _pack({"op": "put", "key": "k6",
                                                             "value": value}), 10.0)
        assert reply.status == ReplyStatus.OK
    finally:
        await agent.stop()


async def test_the_client_retries_an_overloaded_primary_and_says_so_at_its_deadline(
    served: tuple[Agent, _LossyData, str], monkeypatch: pytest.MonkeyPatch, path: str,
) -> None:
    agent, servicer, address = served
    replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {}, set())
    monkeypatch.setattr(defaults, "PENDING_REQUEST_BYTES_MAX", 1000)
    async with Client(agents=address, deadline_ms=300, stream=path == "stream") as client:
        with pytest.raises(Overloaded, match="nothing was applied"):
            await client.call("kv1", {"op": "put", "key": "k", "value": "v" * 2000})
        puts = [r for r in servicer.requests if r.payload != SESSION_OPEN_PAYLOAD]
        assert len(puts) > 1  # retried with backoff, not refused at once
        assert replica.wal.last_index == 2  # the barrier and the session open: no put logged
        monkeypatch.setattr(defaults, "PENDING_REQUEST_BYTES_MAX", 1 << 20)
        assert (await client.call("kv1", {"op": "put", "key": "k", "value": "v"}))["ok"]
    assert replica.sm.sessions.knows(servicer.requests[-1].request_id.client_id)


async def test_a_call_whose_session_open_went_unanswered_still_succeeds(
    served: tuple[Agent, _LossyData, str], path: str,
) -> None:
    """A lost open used to surface as SessionExpired on the client's first call (its first
    attempt opened the session, its unflagged retry found it unknown), though nothing had
    been applied. The open is now a request of its own: lost, it is retried under a fresh
    session id, and the call goes through."""
    agent, servicer, address = served
    replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {}, set())
    servicer.drop_next = lambda request: request.opens_session
    async with Client(agents=address, client_id="first", deadline_ms=10_000,
                      stream=path == "stream") as client:
        assert (await client.call("kv1", {"op": "put", "key": "k", "value": "v"}))["ok"]
        # Reads and writes of a known session run at once, none of them opening anything.
        await asyncio.gather(*(client.call("kv1", {"op": "get", "key": "k"}) for _ in range(20)))
    opened = [r.request_id.client_id for r in servicer.requests if r.opens_session]
    assert opened == ["first", "first/1"]
    assert not any(r.opens_session for r in servicer.requests
                   if r.payload != SESSION_OPEN_PAYLOAD)
    assert replica.sm.sessions.knows("first/1") and not replica.sm.sessions.knows("first")


async def test_a_write_lands_soon_after_its_new_primary_is_promoted(
    served: tuple[Agent, _LossyData, str],
) -> None:
    """A storm: the client first spends its backoff on the dead primary (250 ms by then),
    then the route names a duplica whose promotion has not landed yet. The backoff earned at
    the dead primary must not carry over: once the promotion lands the write goes through
    within a short backoff, not two long ones (p99 writable again 1.9 s in
    benchmarks/storm.py)."""
    agent, _servicer, address = served
    await agent.assign_role("kv1", "kv", "duplica", 1, "sync", ("dead", UNREACHABLE), {}, set())
    async with Client(coordinator=UNREACHABLE, deadline_ms=5_000) as client:
        client._watcher = asyncio.get_running_loop().create_task(asyncio.Event().wait())
        client._routes["kv1"] = (UNREACHABLE, 1)
        call = asyncio.get_running_loop().create_task(
            client.call("kv1", {"op": "put", "key": "k", "value": "v"}))
        # Long enough at the dead primary for the backoff to reach its maximum.
        await asyncio.sleep(defaults.CLIENT_BACKOFF_MAX_MS * 3 / 1000)
        assert not call.done()
        client._apply_routes(coordinator_pb2.RoutesUpdate(version=1, full=True, routes=[
            coordinator_pb2.Route(service="kv1", kind="kv", primary_address=address,
                                  primary_host_id="a", epoch=2)]))
        await asyncio.sleep(0.1)  # the promotion lags the route
        assert not call.done()
        await agent.assign_role("kv1", "kv", "primary", 2, "sync", None, {}, set())
        promoted = time.monotonic()
        assert (await call)["ok"]
        waited_ms = (time.monotonic() - promoted) * 1000
    # Each retry at the new primary began at the shortest backoff, doubling: the one after
    # 100 ms of refusals waits at most 80 ms (5+10+20+40 spent), never 250 ms or more.
    assert waited_ms < 200, waited_ms


async def test_a_retry_older_than_the_window_is_an_unknown_outcome_not_an_invalid_request(
    served: tuple[Agent, _LossyData, str],
) -> None:
    """A retry whose seq fell out of its session's window (more than
    `SESSION_REPLIES_PER_CLIENT_MAX` later calls answered) may have been applied: it was
    refused as InvalidRequest ("state untouched"), and a caller that trusted that would
    send it again and apply it twice. It is SessionExpired now, as for an evicted session:
    read the state to check."""
    agent, _servicer, address = served
    replica = await agent.assign_role("kv1", "kv", "primary", 1, "sync", None, {}, set())
    window = defaults.SESSION_REPLIES_PER_CLIENT_MAX
    assert (await replica.execute(0, "c", 1, _pack({"op": "put", "key": "k", "value": "v"}),
                                  10.0, opens_session=True))[0].status == ReplyStatus.OK
    for start in range(2, window + 3, 64):
        await asyncio.gather(*(
            replica.execute(0, "c", seq, _pack({"op": "put", "key": f"k{seq}", "value": "v"}),
                            10.0) for seq in range(start, min(window + 3, start + 64))))
    with pytest.raises(SessionExpired, match="older than the retry window"):
        await replica.execute(0, "c", 1, _pack({"op": "put", "key": "k", "value": "v"}), 10.0)
    channel = channels.channel(address, None)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await data_pb2_grpc.DataStub(channel).Execute(data_pb2.ExecuteRequest(
                service="kv1", request_id=common_pb2.RequestId(client_id="c", seq=1),
                payload=_pack({"op": "put", "key": "k", "value": "v"}), deadline_ms=5000),
                timeout=5)
    finally:
        await channel.close()
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(raised.value.trailing_metadata() or ()).get(
        channels.ERROR_TYPE_METADATA_KEY) == SessionExpired.__name__


async def test_a_retry_after_a_lost_reply_gets_the_recorded_reply_and_applies_once(
    served: tuple[Agent, _LossyData, str], path: str,
) -> None:
    """The reply of an applied transfer is lost (on the stream, the stream breaks with it):
    the client retries with the same request id, gets the recorded reply, and the
    transfer is applied once."""
    agent, servicer, address = served
    await agent.assign_role("bank1", "bank", "primary", 1, "sync", None, {}, set())
    async with Client(agents=address, client_id="payer", deadline_ms=10_000,
                      stream=path == "stream") as client:
        await client.call("bank1", {"op": "open", "account": "alice", "balance": 90})
        await client.call("bank1", {"op": "open", "account": "bob", "balance": 0})
        servicer.lose_next = lambda request: b"transfer" in request.payload
        out = await client.call_detailed(
            "bank1", {"op": "transfer", "from": "alice", "to": "bob", "amount": 10})
        assert out.duplicate and out.attempts == 2
        assert out.result["from_balance"] == 80
        sent = [r for r in servicer.requests if b"transfer" in r.payload]
        assert len(sent) == 2 and sent[0].request_id == sent[1].request_id
        assert await _balance(client, "alice") == 80
        assert await _balance(client, "bob") == 10
