"""Live migration of 256 MiB of kvcache state under a steady write load; prints one JSON line.

One cluster of real processes: a coordinator and three agents (``LocalCluster(hosts=3,
coordinator=True)``) and a ``kvcache`` service with two replicas in sync mode. The state is
inference sessions holding token blocks of 32 KiB (``append_block``), STATE_MIB in all. A
block is a run of int32 token ids drawn from a skewed vocabulary of VOCAB ids (a few ids are
frequent, most rare, as in text) followed by their int32 positions: compressible, about as
much as token data is, not like random bytes.

While a writer appends WRITE_BLOCKS_S blocks per second to its own sessions (the steady
load), and once every replica has applied what it holds (so that a move is not measured
against a replica still applying the fill or the previous move), the primary is moved three
times, each time to the host that holds no replica, with
``Coordinator.Migrate`` (what ``failoverctl migrate`` calls):

* ``precopy``: rounds of dirty pages, then a pause of at most ``max_downtime_ms`` (20);
* ``stopcopy``: the source pauses applying and sends every page;
* ``replay``: the target is built from a snapshot and the log (issue 6's rebuild).

Per method, from the stats the source agent measured:

* ``downtime_ms``: how long the source paused applying (the cut). For ``replay``, which has no
  cut, the longest stall of the steady writer while the copy was built (the primary's loop
  stops while it serialises the snapshot) is given instead, and named so in
  ``downtime_source``;
* ``total_ms``: from the start of the copy to the cut (``replay``: to the end of the move);
* ``wire_ratio``: wire bytes / state bytes (``replay``: the size of the snapshot the target
  installed / state bytes, the log shipped after it is small);
* ``rounds``; and ``max_write_stall_ms``, the writer's longest wait for an append during the
  whole move (switchover included), and ``failed_writes``.

``lz4_compress_bytes_s`` compresses the same pages (the blocks as they lie in the arena, in
1 MiB chunks, at the codec's level) on one core in this process. Targets (issue 7): precopy
``downtime_ms`` <= 20 and <= 1/20 of stopcopy's; precopy ``wire_ratio`` <= 0.5; precopy
state bytes / ``total_ms`` >= 70% of ``lz4_compress_bytes_s`` (``precopy_vs_lz4``).

Run: ``.venv/bin/python benchmarks/migration.py [--state-mib N] [--root DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lz4.frame

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from failover import defaults  # noqa: E402
from failover.client import Client  # noqa: E402
from failover.localcluster import LocalCluster, wait_for  # noqa: E402
from failover.v1 import coordinator_pb2  # noqa: E402

SERVICE = "cache"
BLOCK_BYTES = 32 << 10
STATE_MIB = 256
VOCAB = 4096
SESSIONS = 64
FILL_CONCURRENCY = 16
WRITE_BLOCKS_S = 100
SEED = 7


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def token_block(rng: random.Random) -> bytes:
    """A 32 KiB block: token ids (int32, as inference frameworks keep them) from a skewed
    vocabulary, then their positions (int32)."""
    count = BLOCK_BYTES // 8
    ids = [min(VOCAB - 1, int(rng.paretovariate(1.2))) for _ in range(count)]
    start = rng.randrange(1 << 20)
    return b"".join(i.to_bytes(4, "little") for i in ids) + \
        b"".join((start + i).to_bytes(4, "little") for i in range(count))


def lz4_rate(blocks: list[bytes]) -> float:
    """Bytes per second of lz4 frame compression of the blocks, 1 MiB at a time, one core."""
    data = b"".join(blocks)
    chunk = defaults.MIGRATION_BATCH_BYTES
    best = 0.0
    for _ in range(3):
        started = time.process_time()
        for offset in range(0, len(data), chunk):
            lz4.frame.compress(data[offset:offset + chunk],
                               compression_level=defaults.MIGRATION_LZ4_LEVEL)
        elapsed = time.process_time() - started
        best = max(best, len(data) / elapsed)
    return best


class Writer:
    """Appends blocks at a steady rate; records every append's wait and failures."""

    def __init__(self, client: Client, blocks: list[bytes]) -> None:
        self.client = client
        self.blocks = blocks
        self.stop = asyncio.Event()
        self.latencies: list[tuple[float, float]] = []  # (start, end) monotonic s
        self.failures: list[str] = []

    async def run(self) -> None:
        i = 0
        period = 1 / WRITE_BLOCKS_S
        next_at = time.monotonic()
        while not self.stop.is_set():
            i += 1
            started = time.monotonic()
            try:
                await self.client.call(SERVICE, {"op": "append_block", "session": f"w{i % 8}",
                                                 "block": self.blocks[i % len(self.blocks)]})
            except Exception as exc:  # counted and reported
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.latencies.append((started, time.monotonic()))
            if i % 4096 == 0:
                await self.client.call(SERVICE, {"op": "drop_session", "session": f"w{i % 8}"})
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def max_stall_ms(self, start: float, end: float) -> float:
        inside = [e - s for s, e in self.latencies if s <= end and e >= start]
        return round(max(inside, default=0.0) * 1000, 3)


def holders(cluster: LocalCluster) -> dict[str, int]:
    assert cluster.coordinator is not None
    service = next(s for s in cluster.coordinator.status().services if s.name == SERVICE)
    return {r.host_id: r.role for r in service.replicas}


def settled(cluster: LocalCluster) -> bool:
    """Every replica in sync and within a few entries of applying all it holds."""
    assert cluster.coordinator is not None
    service = next(s for s in cluster.coordinator.status().services if s.name == SERVICE)
    if len(service.replicas) != 2 or not all(r.in_sync or r.role == 1
                                             for r in service.replicas):
        return False
    for r in service.replicas:
        status = cluster[r.host_id].replica(SERVICE)
        if status is None or status.indexes.durable_index - status.indexes.applied_index > 8:
            return False
    return True


def migrate(cluster: LocalCluster, method: str) -> tuple[dict[str, Any], str]:
    assert cluster.coordinator is not None
    target = next(h for h in cluster.agents if h not in holders(cluster))
    call = cluster.coordinator.stub().Migrate(coordinator_pb2.MigrateRequest(
        service=SERVICE, to_host_id=target, method=method), timeout=600)
    stats: dict[str, Any] = {}
    for message in call:
        if message.phase == "done":
            stats = json.loads(message.stats_json or b"{}")
    return stats, target


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-mib", type=int, default=STATE_MIB)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="failover-bench-migration-"))
    rng = random.Random(SEED)
    blocks = [token_block(rng) for _ in range(256)]
    lz4_bytes_s = lz4_rate(blocks)
    progress(f"lz4 on one core: {lz4_bytes_s / 1e6:.0f} MB/s, block ratio "
             f"{len(lz4.frame.compress(b''.join(blocks))) / (len(blocks) * BLOCK_BYTES):.2f}")
    with LocalCluster(root, hosts=3, coordinator=True) as cluster:
        cluster.start()
        cluster.create(SERVICE, "kvcache", replicas=2)
        assert cluster.coordinator is not None
        async with Client(coordinator=cluster.coordinator.address, tls=cluster.tls_client,
                          deadline_ms=30_000) as client:
            total = args.state_mib << 20
            count = total // BLOCK_BYTES
            progress(f"filling {args.state_mib} MiB ({count} blocks)")
            started = time.monotonic()
            for first in range(0, count, FILL_CONCURRENCY):
                await asyncio.gather(*(
                    client.call(SERVICE, {"op": "append_block", "session": f"s{i % SESSIONS}",
                                          "block": blocks[i % len(blocks)]})
                    for i in range(first, min(count, first + FILL_CONCURRENCY))))
            progress(f"filled in {time.monotonic() - started:.1f} s")
            stats_call = await client.call(SERVICE, {"op": "stats"})
            writer = Writer(client, blocks)
            writing = asyncio.create_task(writer.run())
            await asyncio.sleep(1.0)
            results: dict[str, Any] = {}
            for method in ("precopy", "stopcopy", "replay"):
                # Measure the move, not a replica still applying the fill or the last move.
                await asyncio.to_thread(wait_for, lambda: settled(cluster), 120,
                                        "every replica to apply what it holds")
                progress(f"{method}: moving the primary")
                started = time.monotonic()
                stats, target = await asyncio.to_thread(migrate, cluster, method)
                ended = time.monotonic()
                stall = writer.max_stall_ms(started, ended)
                state_bytes = stats.get("state_bytes") or (args.state_mib << 20)
                entry: dict[str, Any] = {
                    "rounds": stats.get("rounds", 0),
                    "move_ms": round((ended - started) * 1000, 1),
                    "max_write_stall_ms": stall,
                }
                if method == "replay":
                    snapshots = sorted((cluster[target].data_dir / "replicas" / SERVICE
                                        / "snapshots").glob("*.fsnap"))
                    wire = snapshots[-1].stat().st_size if snapshots else 0
                    entry.update({"downtime_ms": stall, "downtime_source": "max_write_stall",
                                  "total_ms": entry["move_ms"],
                                  "wire_ratio": round(wire / state_bytes, 4)})
                else:
                    entry.update({
                        "downtime_ms": round(stats["downtime_ms"], 3),
                        "downtime_source": "source_pause",
                        "total_ms": round(stats["total_ms"], 1),
                        "wire_ratio": round(stats["wire_bytes"] / state_bytes, 4),
                        "cutover_reason": stats.get("cutover_reason"),
                        "persisted_ms": round(stats.get("persisted_ms", 0.0), 1),
                    })
                entry["state_bytes"] = state_bytes
                results[method] = entry
                progress(f"{method}: {json.dumps(entry)}")
                await asyncio.sleep(1.0)
            writer.stop.set()
            await writing
    pre, stop = results["precopy"], results["stopcopy"]
    state_bytes = pre["state_bytes"]
    precopy_bytes_s = state_bytes / (pre["total_ms"] / 1000)
    print(json.dumps({
        "state_bytes": state_bytes,
        "kvcache_stats": stats_call,
        "precopy": pre,
        "stopcopy": stop,
        "replay": results["replay"],
        "lz4_compress_bytes_s": round(lz4_bytes_s),
        "precopy_bytes_s": round(precopy_bytes_s),
        "precopy_vs_lz4": round(precopy_bytes_s / lz4_bytes_s, 3),
        "precopy_vs_stopcopy_downtime": round(pre["downtime_ms"] / max(stop["downtime_ms"],
                                                                       1e-9), 4),
        "failed_writes": len(writer.failures),
        "settings": {"block_bytes": BLOCK_BYTES, "write_blocks_s": WRITE_BLOCKS_S,
                     "max_downtime_ms": defaults.MAX_DOWNTIME_MS, "hosts": 3,
                     "replicas": 2, "vocab": VOCAB},
    }, default=str))


if __name__ == "__main__":
    asyncio.run(main())
