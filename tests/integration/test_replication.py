"""Log shipping between real agent processes on 127.0.0.1 (issue: agent daemon)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgpack
import pytest

from failover.client import Client
from failover.errors import InvalidRequest, RequestRejected
from failover.localcluster import LocalCluster, wait_for
from failover.net.channels import REDIRECT_METADATA_KEY
from failover.v1 import (
    agent_pb2,
    common_pb2,
    data_pb2,
    data_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, hosts=3) as c:
        c.start()
        yield c


async def put_many(client: Client, service: str, keys: range, concurrency: int = 32,
                   prefix: str = "k") -> None:
    """Puts key i -> value i for every i, `concurrency` requests in flight."""
    it = iter(keys)

    async def worker() -> None:
        for i in it:
            result = await client.call(service, {"op": "put", "key": f"{prefix}{i}",
                                                 "value": f"v{i}"})
            assert result.get("ok", True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def test_ten_thousand_writes_replicate_with_equal_digests(cluster: LocalCluster) -> None:
    cluster.form("kv1", "kv", "host1", ["host2", "host3"])
    async with Client(agents=cluster.addresses, tls=cluster.tls_client) as client:
        await put_many(client, "kv1", range(10_000))
        for i in (0, 4_999, 9_999):
            assert (await client.call("kv1", {"op": "get", "key": f"k{i}"}))["value"] == f"v{i}"
    digest = cluster.wait_converged("kv1", ["host1", "host2", "host3"])
    assert digest
    status = cluster["host2"].replica("kv1")
    assert status is not None and status.role == common_pb2.ROLE_DUPLICA
    # 10,000 puts, the empty entry that opens epoch 1 and the one that opens the client's
    # session.
    assert status.indexes.applied_index == 10_002


async def test_killed_duplica_catches_up_with_no_gap(cluster: LocalCluster) -> None:
    # host3 is outside the in-sync set, so writes go on while it is down.
    cluster.form("kv1", "kv", "host1", ["host2", "host3"], in_sync=["host2"])
    async with Client(agents=cluster.addresses, tls=cluster.tls_client) as client:
        writer = asyncio.create_task(put_many(client, "kv1", range(6_000), concurrency=16))
        await asyncio.to_thread(
            wait_for, lambda: (r := cluster["host3"].replica("kv1")) and
            r.indexes.durable_index > 500, 20, "host3 to receive entries")
        cluster["host3"].kill()
        await asyncio.sleep(0.3)  # writes continue while host3 is down
        cluster["host3"].start()
        await writer
    cluster.wait_converged("kv1", ["host1", "host2", "host3"])


async def test_killed_in_sync_duplica_stalls_writes_then_they_complete(
    cluster: LocalCluster,
) -> None:
    cluster.form("kv1", "kv", "host1", ["host2"])
    async with Client(agents=cluster.addresses, tls=cluster.tls_client,
                      deadline_ms=20_000) as client:
        await put_many(client, "kv1", range(200))
        cluster["host2"].kill()
        writer = asyncio.create_task(put_many(client, "kv1", range(200, 400), concurrency=8))
        await asyncio.sleep(0.3)
        assert not writer.done(), "sync writes must wait for the in-sync duplica"
        cluster["host2"].start()
        await writer
    cluster.wait_converged("kv1", ["host1", "host2"])


async def test_rejoining_duplica_is_rebuilt_from_a_snapshot_after_compaction(
    cluster: LocalCluster,
) -> None:
    cluster.form("kv1", "kv", "host1", ["host2", "host3"], in_sync=["host2"])
    async with Client(agents=cluster.addresses, tls=cluster.tls_client) as client:
        await put_many(client, "kv1", range(500))
        cluster["host3"].kill()
        await put_many(client, "kv1", range(500, 3_000))
        reply = cluster["host1"].control().Compact(
            agent_pb2.CompactRequest(service="kv1", retain_entries=0), timeout=10)
        assert reply.first_index > 600, "the log must no longer hold what host3 lacks"
        cluster["host3"].start()
        await put_many(client, "kv1", range(3_000, 3_200))
    cluster.wait_converged("kv1", ["host1", "host2", "host3"])
    assert "installed a snapshot" in cluster["host3"].log_path.read_text()


async def test_diverged_duplica_truncates_and_reports_the_count(cluster: LocalCluster) -> None:
    # Async mode: host1 acknowledges alone, so it can write ahead of a dead host2.
    cluster.form("kv1", "kv", "host1", ["host2"], mode="async", in_sync=[])
    async with Client(agents=cluster["host1"].address, tls=cluster.tls_client) as client:
        await put_many(client, "kv1", range(100))
        await asyncio.to_thread(cluster.wait_converged, "kv1", ["host1", "host2"])
        cluster["host2"].kill()
        await put_many(client, "kv1", range(100, 150))  # only host1 has these
    cluster["host1"].kill()
    cluster["host2"].start()
    # host2 becomes primary at epoch 2 without host1's last 50 entries...
    h1, h2 = cluster["host1"], cluster["host2"]
    h2.control().AssignRole(agent_pb2.AssignRoleRequest(
        service="kv1", kind="kv", role=common_pb2.ROLE_PRIMARY, epoch=2,
        mode=common_pb2.REPLICATION_MODE_SYNC,
        duplicas=[agent_pb2.ReplicaPeer(host_id="host1", address=h1.address)],
        in_sync=["host1"]), timeout=10)
    # ...and host1 comes back as its duplica: its 50-entry tail must go, and be counted.
    h1.start()
    h1.control().AssignRole(agent_pb2.AssignRoleRequest(
        service="kv1", kind="kv", role=common_pb2.ROLE_DUPLICA, epoch=2,
        mode=common_pb2.REPLICATION_MODE_SYNC,
        primary=agent_pb2.ReplicaPeer(host_id="host2", address=h2.address)), timeout=10)
    async with Client(agents=h2.address, tls=cluster.tls_client) as client:
        await put_many(client, "kv1", range(1_000, 1_010), prefix="new")
        assert (await client.call("kv1", {"op": "get", "key": "k120"}))["found"] is False
    status = wait_for(lambda: (r := h1.replica("kv1")) and r.truncated_entries and r, 20,
                      "host1 to report its truncated tail")
    assert status.truncated_entries == 50
    cluster.wait_converged("kv1", ["host1", "host2"])


async def test_stale_epoch_batch_is_rejected(cluster: LocalCluster) -> None:
    cluster.form("kv1", "kv", "host1", ["host2"], epoch=3)
    # As the primary itself (its certificate), at an epoch the duplica is past.
    channel = cluster.aio_channel(cluster["host2"].address, cluster.agent_tls("host1"))
    try:
        call = replication_pb2_grpc.ReplicationStub(channel).Ship()
        await call.write(replication_pb2.ShipMessage(source_host_id="host1", batches=[
            replication_pb2.ShipBatch(service="kv1", epoch=2, batch_id=1,
                                      prev=common_pb2.LogPosition(epoch=0, index=0),
                                      first_index=1, last_index=0)]))
        reply = await call.read()
        assert reply.acks[0].status == replication_pb2.ACK_STATUS_STALE_EPOCH
        assert reply.acks[0].epoch == 3
        call.cancel()
    finally:
        await channel.close()


async def test_same_request_id_twice_applies_once(cluster: LocalCluster) -> None:
    cluster.form("bank1", "bank", "host1", ["host2"])
    async with Client(agents=cluster.addresses, tls=cluster.tls_client) as client:
        await client.call("bank1", {"op": "open", "account": "a", "balance": 100})
        await client.call("bank1", {"op": "open", "account": "b", "balance": 0})
    channel = cluster.aio_channel(cluster["host1"].address)
    try:
        stub = data_pb2_grpc.DataStub(channel)
        transfer = msgpack.packb({"op": "transfer", "from": "a", "to": "b", "amount": 30})
        request = data_pb2.ExecuteRequest(
            service="bank1", request_id=common_pb2.RequestId(client_id="retrier", seq=7),
            payload=transfer, opens_session=True)
        first = await stub.Execute(request, timeout=5)
        second = await stub.Execute(request, timeout=5)
        assert not first.duplicate and second.duplicate
        assert second.result == first.result and second.index == first.index
    finally:
        await channel.close()
    async with Client(agents=cluster.addresses, tls=cluster.tls_client) as client:
        assert (await client.call("bank1", {"op": "balance", "account": "a"}))["balance"] == 70
        assert (await client.call("bank1", {"op": "balance", "account": "b"}))["balance"] == 30
        assert (await client.call("bank1", {"op": "total"}))["total"] == 100
        with pytest.raises(RequestRejected, match="overdraw|insufficient|funds"):
            await client.call("bank1", {"op": "transfer", "from": "b", "to": "a",
                                        "amount": 31})
        with pytest.raises(InvalidRequest):
            await client.call("bank1", {"op": "launder"})
    cluster.wait_converged("bank1", ["host1", "host2"])


async def test_non_primary_redirects_and_bad_requests_are_invalid_argument(
    cluster: LocalCluster,
) -> None:
    cluster.form("kv1", "kv", "host1", ["host2"])
    channel = cluster.aio_channel(cluster["host2"].address)
    try:
        stub = data_pb2_grpc.DataStub(channel)
        request = data_pb2.ExecuteRequest(
            service="kv1", request_id=common_pb2.RequestId(client_id="c", seq=1),
            payload=msgpack.packb({"op": "put", "key": "x", "value": "y"}))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Execute(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        hints = dict(info.value.trailing_metadata() or ())
        redirect = common_pb2.Redirect.FromString(hints[REDIRECT_METADATA_KEY])
        assert redirect.primary_address == cluster["host1"].address
        bad = data_pb2.ExecuteRequest(service="kv1", payload=b"\x81")  # no request id
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Execute(bad, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in (info.value.details() or "")
    finally:
        await channel.close()
    # The client starts at a duplica and follows the hint by itself.
    async with Client(agents=cluster["host2"].address, tls=cluster.tls_client) as client:
        assert (await client.call("kv1", {"op": "put", "key": "x", "value": "y"}))


async def test_restarted_agent_recovers_its_replicas_before_serving(
    cluster: LocalCluster,
) -> None:
    cluster.form("kv1", "kv", "host1", ["host2"])
    async with Client(agents=cluster.addresses, tls=cluster.tls_client) as client:
        await put_many(client, "kv1", range(300))
    before = cluster.wait_converged("kv1", ["host1", "host2"])
    cluster["host2"].signal(signal.SIGTERM)
    cluster["host2"].proc.wait(timeout=10)
    started = time.monotonic()
    cluster["host2"].start()
    assert time.monotonic() - started < 15
    status = cluster["host2"].replica("kv1")
    assert status is not None and status.role == common_pb2.ROLE_DUPLICA
    assert cluster.wait_converged("kv1", ["host1", "host2"]) == before
