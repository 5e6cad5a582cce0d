"""A replica whose snapshot or log cannot be read, with real processes (issue 11, items 4, 6).

A duplica's host restarts and finds its copy of one service damaged: its newest snapshot,
with a log that no longer covers from anything older, or a record in the middle of its log.
The agent starts anyway and serves its other service; it reports the damaged copy broken
(never in sync, never promoted), and the coordinator drops that copy and builds a fresh one
from the primary, on the same host (the only one left), until the digests agree again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from failover.client import Client
from failover.localcluster import LocalCluster, wait_for
from failover.storage.segments import segment_name
from failover.storage.snapshot import SnapshotStore
from failover.v1 import agent_pb2

from . import test_rebuild
from .test_replication import put_many

pytestmark = pytest.mark.timeout(180)

two = test_rebuild.two  # the fixture: two hosts with service kv, never declared dead


def in_sync_duplica(cluster: LocalCluster, service: str) -> str | None:
    """The host whose replica of `service` the coordinator records as an in-sync duplica."""
    return next(iter(cluster.in_sync_duplicas(service)), None)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["snapshot", "log"])
async def test_a_damaged_copy_is_reported_never_promoted_and_rebuilt_from_the_primary(
    two: LocalCluster, damage: str,
) -> None:
    assert two.coordinator is not None
    # Hosts are never declared dead here: what rebuilds the copy is that it reports itself
    # broken. The host holds a second service, which must keep being served.
    two.create("kv2", "kv", replicas=2)
    primary = two.primary_of("kv")
    duplica = wait_for(lambda: in_sync_duplica(two, "kv"), 15, "kv's duplica in sync")
    assert primary is not None and duplica != primary
    async with Client(coordinator=two.coordinator.address, tls=two.tls_client,
                      deadline_ms=10_000) as client:
        await put_many(client, "kv", range(300))
        await put_many(client, "kv2", range(100))
        root = two[duplica].data_dir / "replicas" / "kv"
        if damage == "snapshot":
            # The duplica snapshots and compacts its log up to the snapshot: the log alone
            # no longer holds entries 1..S, only the snapshot does.
            last = two[primary].replica("kv").indexes.durable_index
            wait_for(lambda: two[duplica].replica("kv").indexes.applied_index >= last, 15,
                     "the duplica to apply everything")
            reply = two[duplica].control().Compact(
                agent_pb2.CompactRequest(service="kv", retain_entries=0), timeout=10)
            assert reply.first_index == reply.snapshot_index + 1 > 1
        two[duplica].kill()
        await put_many(client, "kv", range(300, 400), prefix="while-down")
        if damage == "snapshot":
            newest = SnapshotStore(root / "snapshots").paths()[0]
            flip_byte(newest, newest.stat().st_size // 2)
        else:
            segment = root / "wal" / segment_name(1)
            flip_byte(segment, segment.stat().st_size // 2)
        two[duplica].start()  # before the fix: a crash at start (log), or a silent gap
        # It reports the copy broken with why: the coordinator drops it (within a heartbeat
        # or two, too fast to watch here; the history below says why) and builds a fresh one
        # on the same host, while the host's other service is served all along.
        assert two[duplica].replica("kv2") is not None
        await put_many(client, "kv2", range(100, 200), prefix="after")
        wait_for(lambda: in_sync_duplica(two, "kv") == duplica, 60,
                 "the damaged copy to be rebuilt and in sync again")
        report = two[duplica].replica("kv")
        assert report is not None and not report.broken
        await put_many(client, "kv", range(400, 450), prefix="after")
        assert (await client.call("kv", {"op": "get", "key": "k7"}))["value"] == "v7"
    assert two.primary_of("kv") == primary  # never promoted, nor needed to be
    two.wait_converged("kv", [primary, duplica])
    two.wait_converged("kv2", [primary, duplica])
    events = [(e.kind, e.message) for e in two.coordinator.history("kv")]
    retired = [m for k, m in events if k == "retired"]
    why = "lost here" if damage == "snapshot" else "write-ahead log corrupt"
    assert any("cannot read its own snapshot or log" in m and why in m for m in retired), events
    assert any(k == "rebuilt" for k, _ in events), events
