"""Restoring redundancy: log replay, rebuild of a fresh duplica, snapshot install; prints one
JSON line (progress on stderr).

Every log here holds kv puts of distinct keys with 100-byte str values, each with a request
id, written straight into an agent's write-ahead log directory with the agent stopped
(`prefill` of benchmarks/replication.py: the record format, client ids, seqs and payloads the
agent itself writes), after the agent opened epoch 1 of the service as its primary.

* ``replay_entries_s``: the agent's own replay path, in this process: an `Agent` restarted on
  a data dir whose primary's log holds the entries (no snapshot; automatic snapshots off), then
  assigned epoch 2 as a primary without duplicas, so the new epoch's first entry commits the
  whole log. Timed from that AssignRole until `applied_index` reaches the log's end: reading
  the log back, decoding it, the exactly-once sessions and the kv apply, in the batches and
  event-loop chunks the agent uses (`Replica._apply_chunk`). Opening the log (its scan on
  start) is reported beside it (``details.replay.open_s``), not counted; so is the rate per
  CPU second of this process (``details.replay.entries_per_cpu_s``), which other load on the
  machine perturbs less.
* ``rebuild_1m_entries_ms``: real ``failover-agent`` processes (no coordinator; roles by
  AssignRole): a primary whose log holds the entries and that applied them (restarted and
  assigned epoch 2 as above), then a fresh agent is assigned as its duplica and the primary
  is given it as an in-sync duplica. Timed from those AssignRole calls until the duplica's
  ``applied_index`` (GetStatus, polled) reaches the primary's last index: log shipping, the
  duplica's appends and its replay. Automatic snapshots are off on both agents, so this is
  log shipping, not a snapshot install.
* ``rebuild_1m_snapshot_ms``: the same state, but the primary first takes a snapshot and
  compacts its whole log behind it (Compact, retaining no entries), and 1,000 client puts go
  into the log after it, so the fresh duplica is built by a snapshot install plus a short log.
  Timed alike, from the AssignRole calls to the duplica's applied index reaching the
  primary's last index.
* ``snapshot_install_bytes_s``: raw (uncompressed) state bytes of that snapshot (its header's
  raw size) over the time from the install's start to its end as the duplica's agent logs
  them (``snapshot install of ... done in ... ms``: receiving the lz4 frames, writing the file,
  decompressing and restoring as frames arrive, the digest check). ``lz4_decompress_bytes_s``:
  the same snapshot file's frames decompressed by ``lz4.frame`` in this process, one thread,
  raw bytes per second. ``install_vs_decompress`` is their ratio.

Run: ``.venv/bin/python benchmarks/rebuild.py`` (1,000,000 entries; ``--entries N`` to
change it, ``--quick`` for a small smoke run; ``--parts`` to run only some parts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Last, not first: benchmarks/failover.py must not shadow the failover package.
sys.path.append(str(REPO / "benchmarks"))

from replication import prefill, value_for  # noqa: E402

from failover.localcluster import AgentProcess, LocalCluster, wait_for  # noqa: E402

SERVICE = "kv1"
ENTRIES = 1_000_000
QUICK_ENTRIES = 20_000
POLL_S = 0.010  # GetStatus polls; each costs the agent some CPU (psutil metrics)
PARTS = ("replay", "rebuild", "snapshot")
LOG_RETAIN_ENTRIES = 0  # the Compact before the snapshot rebuild drops the whole log
TAIL_PUTS = 1_000  # client puts after the snapshot: the short log shipped after it
INSTALL_RE = re.compile(r"snapshot install of (\d+) raw bytes done in ([\d.]+) ms")


def progress(message: str) -> None:
    """A line of progress on stderr (stdout carries only the JSON result)."""
    print(f"[rebuild] {message}", file=sys.stderr, flush=True)


# --- replay, in this process -----------------------------------------------------------------


async def replay(root: Path, entries: int, timeout_s: float) -> dict[str, Any]:
    """The agent's replay of a primary's own log; see the module doc."""
    from failover.agent.config import AgentConfig
    from failover.agent.host import Agent

    config = AgentConfig.from_mapping({
        "host_id": "replay", "listen": "127.0.0.1:7999", "data_dir": str(root / "replay"),
        "snapshot_every_entries": 0,
    })

    async def make_primary(agent: Agent, epoch: int) -> None:
        await agent.assign_role(SERVICE, "kv", "primary", epoch, "sync", None, {}, set())

    agent = Agent(config)
    await agent.start()
    try:
        await make_primary(agent, 1)
        await until(lambda: agent.replicas[SERVICE].sm.applied_index >= 1, 20, "epoch 1")
    finally:
        await agent.stop()
    wal_dir = config.data_dir / "replicas" / SERVICE / "wal"
    first, last, prefill_s, log_bytes = prefill(wal_dir, entries)
    progress(f"replay: wrote entries {first}..{last} in {prefill_s:.1f} s")
    agent = Agent(config)
    started = time.perf_counter()
    cpu_started = time.process_time()
    await agent.start()
    open_s = time.perf_counter() - started
    try:
        replica = agent.replicas[SERVICE]
        # A primary with no in-sync duplica commits its whole log as it opens (its read
        # floor is the last entry), and replays it from there: the replay is timed from
        # the moment the log is open.
        assert replica.read_floor == last, (replica.read_floor, last)
        assert replica.sm.applied_index < last, replica.sm.applied_index
        started = time.perf_counter()
        await until(lambda: replica.sm.applied_index >= last, timeout_s, "the replay")
        replay_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
        keys = replica.sm.kind.key_count  # type: ignore[attr-defined]
    finally:
        await agent.stop()
    assert keys == entries, (keys, entries)
    progress(f"replay: {entries} entries applied in {replay_s:.2f} s "
             f"({entries / replay_s:,.0f}/s); the log opened in {open_s:.2f} s")
    # CPU seconds of this process over the replay: the rate they give is what the machine's
    # other load (it has os.cpu_count() cores) did not take from the wall-clock rate.
    return {"entries": entries, "replay_s": round(replay_s, 3),
            "entries_s": round(entries / replay_s), "cpu_s": round(cpu_s, 3),
            "entries_per_cpu_s": round(entries / cpu_s), "open_s": round(open_s, 3),
            "log_bytes": log_bytes, "prefill_s": round(prefill_s, 2)}


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Polls `condition` on the event loop until it holds; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(POLL_S)


# --- rebuild with real agents ----------------------------------------------------------------


def assign(agent: AgentProcess, role: int, epoch: int, *, primary: AgentProcess | None = None,
           duplicas: tuple[AgentProcess, ...] = ()) -> None:
    """AssignRole as a coordinator would (sync mode; every duplica in sync)."""
    from failover.v1 import agent_pb2, common_pb2

    agent.control().AssignRole(agent_pb2.AssignRoleRequest(
        service=SERVICE, kind="kv", role=role, epoch=epoch,
        mode=common_pb2.REPLICATION_MODE_SYNC,
        primary=(agent_pb2.ReplicaPeer(host_id=primary.host_id, address=primary.address)
                 if primary is not None else None),
        duplicas=[agent_pb2.ReplicaPeer(host_id=d.host_id, address=d.address)
                  for d in duplicas],
        in_sync=[d.host_id for d in duplicas]), timeout=30)


def applied(agent: AgentProcess) -> int:
    """The agent's replica's applied index (0 while it has none)."""
    status = agent.replica(SERVICE)
    return status.indexes.applied_index if status is not None else 0


def build_primary(cluster: LocalCluster, entries: int, timeout_s: float) -> dict[str, Any]:
    """host1: a primary whose log holds `entries` puts and that applied them."""
    from failover.v1 import common_pb2

    p = cluster["host1"]
    assign(p, common_pb2.ROLE_PRIMARY, 1)
    wait_for(lambda: applied(p) >= 1, 20, "the primary to open epoch 1")
    p.stop()
    first, last, prefill_s, log_bytes = prefill(p.data_dir / "replicas" / SERVICE / "wal",
                                                entries)
    progress(f"rebuild: wrote entries {first}..{last} in {prefill_s:.1f} s; restarting host1")
    started = time.monotonic()
    p.start(wait=False)
    p.wait_ready(timeout_s)
    open_s = time.monotonic() - started
    started = time.monotonic()
    assign(p, common_pb2.ROLE_PRIMARY, 2)  # its first entry commits the whole log
    target = last + 1
    wait_for(lambda: applied(p) >= target, timeout_s, "the primary to apply its log",
             interval_s=POLL_S)
    apply_s = time.monotonic() - started
    progress(f"rebuild: host1 opened its log in {open_s:.1f} s and applied {entries} entries "
             f"in {apply_s:.1f} s")
    return {"last_index": target, "prefill_s": round(prefill_s, 2), "log_bytes": log_bytes,
            "primary_open_s": round(open_s, 2), "primary_apply_s": round(apply_s, 2),
            "primary_apply_entries_s": round(entries / apply_s)}


def rebuild_duplica(cluster: LocalCluster, duplica: AgentProcess,
                    duplicas: tuple[AgentProcess, ...],
                    timeout_s: float) -> dict[str, Any]:
    """Assigns `duplica` (fresh) to host1's replica set, whose duplicas become `duplicas`;
    times it until its applied index reaches host1's last index."""
    from failover.v1 import common_pb2

    p = cluster["host1"]
    status = p.replica(SERVICE)
    assert status is not None
    target = status.indexes.durable_index
    epoch = status.epoch
    started = time.monotonic()
    assign(duplica, common_pb2.ROLE_DUPLICA, epoch, primary=p)
    assign(p, common_pb2.ROLE_PRIMARY, epoch, duplicas=duplicas)
    durable_s = None
    deadline = started + timeout_s
    while True:
        now = time.monotonic()
        r = duplica.replica(SERVICE)
        if r is not None:
            if durable_s is None and r.indexes.durable_index >= target:
                durable_s = now - started
            if r.indexes.applied_index >= target:
                break
        if now > deadline:
            raise TimeoutError(f"{duplica.host_id} did not apply up to {target} in "
                               f"{timeout_s:.0f} s (status: {r})")
        time.sleep(POLL_S)
    elapsed_s = time.monotonic() - started
    digest = cluster.wait_converged(SERVICE, ["host1", duplica.host_id], timeout_s=60)
    return {"to_applied_ms": round(elapsed_s * 1000, 1),
            "to_durable_ms": round(durable_s * 1000, 1) if durable_s is not None else None,
            "target_index": target, "digests_equal": bool(digest)}


def snapshot_install_log(agent: AgentProcess) -> tuple[int, float] | None:
    """(raw bytes, ms) of the last snapshot install the agent's log reports."""
    found = None
    for line in agent.log_path.read_text(errors="replace").splitlines():
        match = INSTALL_RE.search(line)
        if match:
            found = int(match.group(1)), float(match.group(2))
    return found


def decompress_rate(path: Path, rounds: int = 3) -> tuple[int, float]:
    """(raw bytes, best seconds) to decompress the snapshot file's frames on one thread."""
    import lz4.frame

    from failover.storage.snapshot import iter_compressed_chunks

    frames = list(iter_compressed_chunks(path))
    best = float("inf")
    raw = 0
    for _ in range(rounds):
        started = time.perf_counter()
        raw = sum(len(lz4.frame.decompress(f)) for f in frames)
        best = min(best, time.perf_counter() - started)
    return raw, best


def rebuild(root: Path, entries: int, parts: list[str], timeout_s: float) -> dict[str, Any]:
    """Both rebuilds on one cluster: host2 from the log, then host3 from a snapshot."""
    from failover.client import Client
    from failover.v1 import agent_pb2

    config = root / "agent.toml"
    config.write_text("snapshot_every_entries = 0\n")
    out: dict[str, Any] = {}
    with LocalCluster(root / "cluster", hosts=3, fsync_policy="batch",
                      extra={"config": str(config)}) as cluster:
        cluster.start()
        p, d2, d3 = cluster["host1"], cluster["host2"], cluster["host3"]
        out["primary"] = build_primary(cluster, entries, timeout_s)
        if "rebuild" in parts:
            progress("rebuild: a fresh duplica (host2) catches up by log shipping")
            out["from_log"] = rebuild_duplica(cluster, d2, (d2,), timeout_s)
            progress(f"rebuild: host2 applied the log in {out['from_log']['to_applied_ms']} ms")
        if "snapshot" in parts:
            reply = p.control().Compact(agent_pb2.CompactRequest(
                service=SERVICE, retain_entries=LOG_RETAIN_ENTRIES), timeout=timeout_s)
            snapshot_path = max((p.data_dir / "replicas" / SERVICE / "snapshots").glob(
                "snap-*.fsnap"))

            async def more_puts() -> None:
                async with Client(agents=p.address, tls=cluster.tls_client) as client:
                    for i in range(TAIL_PUTS):
                        key = f"tail-{i:06d}"
                        await client.call(SERVICE, {"op": "put", "key": key,
                                                    "value": value_for(key)})

            asyncio.run(more_puts())
            progress(f"snapshot: host1 took a snapshot at {reply.snapshot_index}, its log now "
                     f"starts at {reply.first_index}, {TAIL_PUTS} puts after it; a fresh "
                     "duplica (host3) is built from the snapshot")
            members = (d2, d3) if "rebuild" in parts else (d3,)
            result = rebuild_duplica(cluster, d3, members, timeout_s)
            installed = snapshot_install_log(d3)
            if installed is None:
                raise RuntimeError("host3 was not built by a snapshot install:\n"
                                   + d3.log_tail())
            raw_bytes, install_ms = installed
            decompressed, decompress_s = decompress_rate(snapshot_path)
            result.update({
                "snapshot_index": reply.snapshot_index, "log_first_index": reply.first_index,
                "tail_puts": TAIL_PUTS, "snapshot_file_bytes": snapshot_path.stat().st_size,
                "snapshot_raw_bytes": raw_bytes, "install_ms": install_ms,
                "install_bytes_s": round(raw_bytes / (install_ms / 1000)),
                "decompress_bytes_s": round(decompressed / decompress_s),
            })
            out["from_snapshot"] = result
            progress(f"snapshot: host3 applied up to {result['target_index']} in "
                     f"{result['to_applied_ms']} ms (install {install_ms:.0f} ms)")
    return out


# --- main ------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    """Runs the parts asked for in a temporary dir and prints the JSON line."""
    began = time.monotonic()
    entries = args.entries if args.entries is not None else (
        QUICK_ENTRIES if args.quick else ENTRIES)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="failover-rebuild-bench-") as tmp:
        root = Path(tmp)
        if "replay" in parts:
            details["replay"] = asyncio.run(replay(root, entries, args.timeout))
        if "rebuild" in parts or "snapshot" in parts:
            details.update(rebuild(root, entries, parts, args.timeout))
    from_log, from_snapshot = details.get("from_log"), details.get("from_snapshot")
    install = from_snapshot["install_bytes_s"] if from_snapshot else None
    decompress = from_snapshot["decompress_bytes_s"] if from_snapshot else None
    result = {
        "replay_entries_s": details["replay"]["entries_s"] if "replay" in details else None,
        "rebuild_1m_entries_ms": from_log["to_applied_ms"] if from_log else None,
        "rebuild_1m_snapshot_ms": from_snapshot["to_applied_ms"] if from_snapshot else None,
        "snapshot_install_bytes_s": install,
        "lz4_decompress_bytes_s": decompress,
        "install_vs_decompress": round(install / decompress, 4) if install and decompress
        else None,
        "settings": {
            "entries": entries,
            "request": "kv put, distinct keys, 100-byte str values, with request ids",
            "state_produced_by": "prefill: records written into the primary's WAL directory "
                                 "with the agent stopped (benchmarks/replication.py)",
            "replay": "in-process Agent, primary without duplicas restarted on its log (it "
                      "commits the log as it opens); automatic snapshots off",
            "rebuild_timed": "AssignRole(duplica) + AssignRole(primary, duplica in sync) -> "
                             f"duplica applied_index >= primary's last index, polled every "
                             f"{POLL_S * 1000:.0f} ms",
            "agents": "failover-agent processes, fsync_policy batch, automatic snapshots off",
            "snapshot_log_retain_entries": LOG_RETAIN_ENTRIES,
            "snapshot_tail_puts": TAIL_PUTS,
            "install_timed": "the duplica agent's own log line: first snapshot chunk received "
                             "to state and log replaced",
            "decompress": "lz4.frame.decompress of the snapshot file's frames, one thread, "
                          "best of 3",
            "cpus": os.cpu_count(),
            "run_s": round(time.monotonic() - began, 1),
        },
        "details": details,
    }
    print(json.dumps(result, separators=(",", ":")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, help=f"log entries (default {ENTRIES:,})")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small smoke run ({QUICK_ENTRIES:,} entries)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="which parts to run (comma-separated: replay,rebuild,snapshot)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds any one wait may take")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
