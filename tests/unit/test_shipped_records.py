"""Shipped records a duplica cannot take (issue 11, item 6; invariant 12), on the real agent
behind its real gRPC server.

A batch with a record that passes its CRC32C but whose body is not a record is refused
whole (nothing of it is written), and the Ship stream, which carries every service the two
hosts share, keeps serving the others and the next batch.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path

import crc32c
import grpc
import msgpack
import pytest

from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.host import Agent
from failover.net import channels
from failover.net.agent_servicers import add_to_server
from failover.storage.records import Entry, encode_records
from failover.v1 import common_pb2, replication_pb2, replication_pb2_grpc
from tests.unit.inprocess import UNREACHABLE, until


def agent_config(data_dir: Path) -> AgentConfig:
    return AgentConfig.from_mapping({"host_id": "a", "listen": "127.0.0.1:7999",
                                     "data_dir": str(data_dir)})


def put(key: str, value: str = "v") -> bytes:
    return msgpack.packb({"op": "put", "key": key, "value": value})


def _frame(body: bytes) -> bytes:
    return struct.pack("<II", len(body), crc32c.crc32c(body)) + body


def _batch(service: str, entries: list[Entry], prev: tuple[int, int], records: bytes = b"",
           batch_id: int = 1) -> replication_pb2.ShipBatch:
    return replication_pb2.ShipBatch(
        service=service, epoch=1, batch_id=batch_id,
        prev=common_pb2.LogPosition(epoch=prev[0], index=prev[1]),
        first_index=entries[0].index, last_index=entries[-1].index,
        records=records or encode_records(entries), commit_index=entries[-1].index)


def _entries(first: int, count: int, tag: str) -> list[Entry]:
    return [Entry(1, i, b"", put(f"{tag}{i}")) for i in range(first, first + count)]


@pytest.fixture
async def served_duplicas(tmp_path: Path) -> AsyncIterator[tuple[Agent, str]]:
    """An agent behind a real gRPC server, holding duplicas kv1 and kv2 of one primary."""
    agent = Agent(agent_config(tmp_path))
    await agent.start()
    server = channels.server()
    add_to_server(server, agent)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for service in ("kv1", "kv2"):
        await agent.assign_role(service, "kv", "duplica", 1, "sync", ("p", UNREACHABLE), {},
                                set())
    try:
        yield agent, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await agent.stop()


@pytest.mark.parametrize("garbage", [
    b"\x94\x01\xc1\xc1\xc1",  # not msgpack (0xc1 is never used)
    msgpack.packb([1, 3, b"", 7]),  # the right index, but the payload is no bytes
    msgpack.packb([1, 3, b""]),  # three fields
])
# Checked as it arrives (`Agent.precheck`, every batch here), or by the job that writes it
# (a batch under PRECHECK_BYTES_MIN, as these are by default).
@pytest.mark.parametrize("precheck_bytes_min", [0, defaults.PRECHECK_BYTES_MIN])
async def test_a_shipped_batch_with_a_bad_middle_record_is_refused_and_the_stream_serves_on(
    served_duplicas: tuple[Agent, str], garbage: bytes, precheck_bytes_min: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(defaults, "PRECHECK_BYTES_MIN", precheck_bytes_min)
    agent, address = served_duplicas
    kv1, kv2 = agent.replicas["kv1"], agent.replicas["kv2"]
    good = _entries(1, 5, "a")
    # Record 3 of 5 passes its CRC32C but its body is not a record.
    bad = b"".join(encode_records([e]) if e.index != 3 else _frame(garbage) for e in good)
    async with channels.insecure_channel(address) as channel:
        stream = replication_pb2_grpc.ReplicationStub(channel).Ship()
        await stream.write(replication_pb2.ShipMessage(source_host_id="p", batches=[
            _batch("kv1", good, (0, 0), bad), _batch("kv2", _entries(1, 5, "b"), (0, 0))]))
        acks = {a.service: a for a in (await stream.read()).acks}
        # Before the fix only the first and last records were decoded: this was acked.
        assert acks["kv1"].status == replication_pb2.ACK_STATUS_CORRUPT, acks["kv1"]
        assert "refused" in acks["kv1"].message and "nothing of the batch" in acks["kv1"].message
        assert kv1.wal.last_index == 0 and acks["kv1"].durable_index == 0  # nothing written
        assert "refused" in kv1.last_error and not kv1.broken
        assert acks["kv2"].status == replication_pb2.ACK_STATUS_OK
        # The same stream takes the good batch for kv1, and more for kv2.
        await stream.write(replication_pb2.ShipMessage(source_host_id="p", batches=[
            _batch("kv1", good, (0, 0), batch_id=2),
            _batch("kv2", _entries(6, 5, "b"), (1, 5), batch_id=2)]))
        acks = {a.service: a for a in (await stream.read()).acks}
        assert [acks[s].status for s in ("kv1", "kv2")] == [replication_pb2.ACK_STATUS_OK] * 2
        assert (acks["kv1"].durable_index, acks["kv2"].durable_index) == (5, 10)
        await stream.done_writing()
    await until(lambda: kv1.sm.applied_index == 5 and kv2.sm.applied_index == 10,
                timeout_s=10.0)
    assert kv1.wal.read(1, 5) == good  # exactly the good batch, nothing of the bad one


async def test_one_replica_failing_on_a_shipped_item_never_ends_the_shared_stream(
    served_duplicas: tuple[Agent, str],
) -> None:
    # The failure the issue saw: a primary asked a sync-mode duplica to truncate entries it
    # had committed; the duplica's assertion ended the Ship stream of every service.
    agent, address = served_duplicas
    async with channels.insecure_channel(address) as channel:
        stream = replication_pb2_grpc.ReplicationStub(channel).Ship()
        await stream.write(replication_pb2.ShipMessage(source_host_id="p", batches=[
            _batch("kv1", _entries(1, 5, "a"), (0, 0)),
            _batch("kv2", _entries(1, 5, "b"), (0, 0))]))
        assert {a.status for a in (await stream.read()).acks} == {replication_pb2.ACK_STATUS_OK}
        await stream.write(replication_pb2.ShipMessage(source_host_id="p",
            truncates=[replication_pb2.Truncate(service="kv1", epoch=1, after_index=2)],
            batches=[_batch("kv2", _entries(6, 5, "b"), (1, 5), batch_id=2)]))
        acks = {a.service: a for a in (await stream.read()).acks}
        assert acks["kv1"].status == replication_pb2.ACK_STATUS_STORAGE_ERROR
        assert "truncate committed entries" in acks["kv1"].message
        assert acks["kv2"].status == replication_pb2.ACK_STATUS_OK
        # Still open, for both.
        await stream.write(replication_pb2.ShipMessage(source_host_id="p", batches=[
            _batch("kv1", _entries(6, 1, "a"), (1, 5), batch_id=3),
            _batch("kv2", _entries(11, 1, "b"), (1, 10), batch_id=3)]))
        acks = {a.service: a for a in (await stream.read()).acks}
        assert [acks[s].durable_index for s in ("kv1", "kv2")] == [6, 11]
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
    assert agent.replicas["kv1"].wal.last_index == 6  # nothing was truncated
