"""Write-ahead log throughput against a raw write+fsync baseline, measured in the same run.

Prints one JSON line. For 100-byte payloads (16-byte request ids) in batches of 1, 64 and
1024 entries it reports entries/s and bytes/s (record bytes, framing included) for:

* ``always_N``, ``never_N``: one appending thread;
* ``batch_single_thread_N``: batch policy, one appending thread (an fsync per append);
* ``batch_concurrent_N``: batch policy, ``concurrent_threads`` threads appending at once
  (indexes handed out in order, appends unlocked): what group commit is for;
* ``raw_write_fsync_N``: ``os.write`` + ``os.fsync`` of the same bytes per batch, one
  thread, on a plain file in the same filesystem.

``batch_1024_vs_raw_ratio`` uses the concurrent batch figure; the single-thread ratio is
reported beside it under its own key. Each variant runs ``rounds`` times, taking turns with
the others, and reports its best round. Also reports how long opening a 1,000,000-entry log
takes.

Run: ``.venv/bin/python benchmarks/wal.py``
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from failover.storage.records import Entry, encode_records  # noqa: E402
from failover.storage.wal import WriteAheadLog  # noqa: E402

PAYLOAD_BYTES = 100
REQUEST_ID_BYTES = 16
BATCH_SIZES = (1, 64, 1024)
POLICIES = ("always", "batch", "never")
RUN_S = 0.3  # time box per measurement round
ROUNDS = 3
POOL_ENTRIES = {1: 30_000, 64: 200_000, 1024: 600_000}  # upper bound per measurement
CONCURRENT_THREADS = 3
OPEN_ENTRIES = 1_000_000


def cleanup(directory: str) -> None:
    """Deletes a run's files and waits until the filesystem has settled.

    Deleting synced data makes the next journal commit (and so the next run's fsyncs) pay
    for it, on a filesystem mounted with ``discard`` much more: settle it outside the timing.
    """
    shutil.rmtree(directory, ignore_errors=True)
    os.sync()


def scratch_parent() -> str:
    """/tmp when it is on the repo's filesystem (the real disk), else the repo itself."""
    tmp = tempfile.gettempdir()
    if os.stat(tmp).st_dev == os.stat(REPO).st_dev:
        return tmp
    return str(REPO)


def make_pool(batch: int) -> list[list[Entry]]:
    payload = os.urandom(PAYLOAD_BYTES)
    request_id = os.urandom(REQUEST_ID_BYTES)
    batches = POOL_ENTRIES[batch] // batch
    return [
        [Entry(1, b * batch + i + 1, request_id, payload) for i in range(batch)]
        for b in range(batches)
    ]


class FsyncCounter:
    """Counts os.fsync calls (the WAL looks os.fsync up at call time)."""

    def __init__(self) -> None:
        self.count = 0
        self._real = os.fsync

    def __enter__(self) -> FsyncCounter:
        def counting(fd: int) -> None:
            self.count += 1  # approximate under threads; only used as a ratio
            self._real(fd)

        os.fsync = counting
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._real


def run_wal(parent: str, policy: str, pool: list[list[Entry]], threads: int) -> dict:
    directory = tempfile.mkdtemp(prefix="wal-bench-", dir=parent)
    try:
        log = WriteAheadLog.open(directory, fsync_policy=policy)
        taken = 0
        take_lock = threading.Lock()
        deadline = 0.0

        def worker() -> None:
            nonlocal taken
            while True:
                with take_lock:  # batches are handed out in index order, appended unlocked
                    if taken >= len(pool) or time.perf_counter() >= deadline:
                        return
                    batch = pool[taken]
                    taken += 1
                log.append(batch)

        with FsyncCounter() as fsyncs:
            start = time.perf_counter()
            deadline = start + RUN_S
            if threads == 1:
                worker()
            else:
                workers = [threading.Thread(target=worker) for _ in range(threads)]
                for t in workers:
                    t.start()
                for t in workers:
                    t.join()
            elapsed = time.perf_counter() - start
        entries = log.last_index
        assert entries == taken * len(pool[0]) and log.durable_index == entries
        log.close()
        written = sum(p.stat().st_size for p in Path(directory).glob("*.wal"))
        record_bytes = len(encode_records(pool[0])) * taken
        return {
            "entries_per_s": round(entries / elapsed),
            "bytes_per_s": round(record_bytes / elapsed),
            "appends": taken,
            "fsyncs_per_append": round(fsyncs.count / taken, 3),
            "file_bytes": written,
        }
    finally:
        cleanup(directory)


def run_raw(parent: str, batch_bytes: bytes, batch: int, appends_max: int) -> dict:
    directory = tempfile.mkdtemp(prefix="raw-bench-", dir=parent)
    try:
        fd = os.open(os.path.join(directory, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        done = 0
        start = time.perf_counter()
        deadline = start + RUN_S
        while done < appends_max and time.perf_counter() < deadline:
            os.write(fd, batch_bytes)
            os.fsync(fd)
            done += 1
        elapsed = time.perf_counter() - start
        os.close(fd)
        return {
            "entries_per_s": round(done * batch / elapsed),
            "bytes_per_s": round(done * len(batch_bytes) / elapsed),
            "appends": done,
        }
    finally:
        cleanup(directory)


def time_open(parent: str) -> dict:
    directory = tempfile.mkdtemp(prefix="wal-open-", dir=parent)
    try:
        payload = os.urandom(PAYLOAD_BYTES)
        request_id = os.urandom(REQUEST_ID_BYTES)
        with WriteAheadLog.open(directory, fsync_policy="never") as log:
            for first in range(1, OPEN_ENTRIES + 1, 1024):
                count = min(1024, OPEN_ENTRIES + 1 - first)
                log.append([Entry(1, first + i, request_id, payload) for i in range(count)])
            log.sync()
        start = time.perf_counter()
        with WriteAheadLog.open(directory) as log:
            elapsed = time.perf_counter() - start
            assert log.open_report.entries == OPEN_ENTRIES
            start = time.perf_counter()
            records, first, last = log.read_records(
                OPEN_ENTRIES // 2, entries_max=4096, bytes_max=1 << 20
            )
            read_s = time.perf_counter() - start
        return {
            "open_1m_entries_s": round(elapsed, 3),
            "read_records_1mib_ms": round(read_s * 1e3, 3),
        }
    finally:
        cleanup(directory)


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["bytes_per_s"])


def main() -> None:
    parent = scratch_parent()
    began = time.perf_counter()
    pools = {b: make_pool(b) for b in BATCH_SIZES}
    result: dict = {
        "benchmark": "wal",
        "payload_bytes": PAYLOAD_BYTES,
        "request_id_bytes": REQUEST_ID_BYTES,
        "record_bytes": len(encode_records(pools[1][0])),
        "scratch_dir": parent,
        "cpus": os.cpu_count(),
        "concurrent_threads": CONCURRENT_THREADS,
        "rounds": ROUNDS,
        "run_s_per_round": RUN_S,
    }
    configs = [(policy, 1) for policy in POLICIES] + [("batch", CONCURRENT_THREADS)]
    for batch in BATCH_SIZES:
        # The machine may be shared: raw and every WAL variant take turns, round after
        # round, on the same bytes, and each reports its best round.
        batch_bytes = encode_records(pools[batch][0])
        runs: dict[str, list[dict]] = {}
        for _ in range(ROUNDS):
            runs.setdefault("raw", []).append(
                run_raw(parent, batch_bytes, batch, len(pools[batch]))
            )
            for policy, threads in configs:
                if policy != "batch":
                    name = policy
                elif threads == 1:
                    name = "batch_single_thread"
                else:
                    name = "batch_concurrent"
                runs.setdefault(name, []).append(run_wal(parent, policy, pools[batch], threads))
        result[f"raw_write_fsync_{batch}"] = best(runs.pop("raw"))
        for name, variant_runs in runs.items():
            result[f"{name}_{batch}"] = best(variant_runs)
    raw_bytes = result["raw_write_fsync_1024"]["bytes_per_s"]
    result["batch_1024_vs_raw_ratio"] = round(
        result["batch_concurrent_1024"]["bytes_per_s"] / raw_bytes, 3
    )
    result["batch_1024_single_thread_vs_raw_ratio"] = round(
        result["batch_single_thread_1024"]["bytes_per_s"] / raw_bytes, 3
    )
    # The ceiling for any policy: the same appends with no fsync at all.
    result["never_1024_vs_raw_ratio"] = round(result["never_1024"]["bytes_per_s"] / raw_bytes, 3)
    result["always_1024_vs_raw_ratio"] = round(result["always_1024"]["bytes_per_s"] / raw_bytes, 3)
    result.update(time_open(parent))
    result["run_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
