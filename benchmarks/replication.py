"""Replication throughput and latency on real agent processes; prints one JSON line.

Three client-driven runs, each on a fresh two-agent LocalCluster (fsync policy ``batch``) at
the same concurrency: CLIENT_PROCS client processes x TASKS_PER_PROC asyncio tasks, each
process with its own ``failover.client.Client``, doing kv puts of distinct keys with
100-byte values:

* ``unreplicated``: a primary with no duplicas;
* ``sync``: a primary and one in-sync duplica (the write is acknowledged once on both disks);
* ``async``: a primary and one duplica outside the in-sync set (``mode="async"``);
* ``sync_tls``: ``sync`` again with mutual TLS on every channel (issue 13): the agents serve
  and dial TLS, the client processes present a client certificate. The three runs above are
  in the clear (their keys stay comparable with earlier runs). Then TLS_ROUNDS - 1 more
  pairs of sync runs, plaintext and TLS, in alternating order; ``tls_sync_ops_ratio`` is the
  TLS runs' total ops/s over the plaintext runs' (every pair's own ratio is in
  ``tls_sync_ops_ratio_per_pair``). The shipping run below is in the clear.
* ``sync_metrics``: ``sync`` again with ``--metrics-listen`` on both agents (issue 17: every
  request counted and timed, every fsync timed) and a scraper reading both agents'
  ``/metrics`` every SCRAPE_INTERVAL_S during the run. Then METRICS_ROUNDS - 1 more pairs,
  alternating order as for TLS; ``metrics_sync_ops_ratio`` is the metrics runs' total ops/s
  over their plain sync partners' (``metrics_sync_ops_ratio_per_pair``), and
  ``metrics_cpu_per_op_ratio`` the primary agent's CPU seconds per write, likewise.

Those runs call one unary Execute per request (``Client(stream=False)``: today's keys, kept
comparable with earlier runs). The ``stream_*`` runs take the streaming data path (issue 16:
``Client()``, one ExecuteStream per client process, the calls ready together in one message):
``stream_unreplicated`` and ``stream_sync`` at the same 64 in flight, ``_256`` at 4x the tasks
per process, and ``stream_sync_8``: one client process of 8 writers, each waiting for its reply
before its next write.

The client processes are this script re-invoked with ``--worker``; they start together on a
wall-clock barrier, warm up, then count completions for a fixed duration and report their
counts and per-request latencies (monotonic clock) as JSON on stdout.

Then pure log shipping: a primary's log is pre-filled with SHIP_ENTRIES valid kv puts written
straight into its WAL directory (with the agent stopped), the agent is restarted and applies
them, and a fresh duplica is added in sync; ``shipping_entries_s`` is the number of entries
over the time from that AssignRole until the duplica's durable index reaches the primary's
last index. Automatic snapshots are off on both agents for this run (otherwise the primary
would compact its log while applying, and the duplica would get a snapshot install rather
than log shipping); the duplica applies concurrently as the commit index advances.

Run: ``.venv/bin/python benchmarks/replication.py`` (progress on stderr, JSON on stdout).
``--profile DIR`` also records py-spy profiles (raw collapsed stacks) of the agents during
each measured window and the shipping run; the numbers of a profiled run are perturbed by py-spy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import msgpack  # noqa: E402

from failover.percentile import percentile  # noqa: E402

SERVICE = "kv1"
VALUE_BYTES = 100
CLIENT_PROCS = 4
TASKS_PER_PROC = 16
DURATION_S = 5.0
WARMUP_S = 1.0
LEAD_S = 4.0  # time the client processes get to start (import grpc, connect) before warm-up
FSYNC_POLICY = "batch"
SHIP_ENTRIES = 500_000
PREFILL_CHUNK = 4096
POLL_S = 0.010
TLS_ROUNDS = 2
METRICS_ROUNDS = 2
SCRAPE_INTERVAL_S = 1.0  # Prometheus scrapes every 15 s by default: this is 15x harsher
# sync and sync_tls back to back; the stream_* runs take the streaming data path (issue 16);
# sync_metrics is paired with another plain sync run (issue 17).
MODES = ("unreplicated", "sync", "sync_tls", "async", "stream_unreplicated", "stream_sync",
         "stream_unreplicated_256", "stream_sync_256", "stream_sync_8", "sync_metrics")
STREAM_WRITERS_FEW = 8  # stream_sync_8: one client process, 8 writers each awaiting its reply


def mode_shape(mode: str, args: argparse.Namespace) -> tuple[bool, int, int]:
    """(streaming data path, client processes, tasks per process) of a mode: the unary
    modes (today's keys) call Execute once per request, the stream_* ones share an
    ExecuteStream per client process; _256 is 4x the tasks, _8 one process of 8 writers."""
    if not mode.startswith("stream_"):
        return False, args.client_procs, args.tasks
    if mode.endswith("_256"):
        return True, args.client_procs, args.tasks * 4
    if mode.endswith("_8"):
        return True, 1, STREAM_WRITERS_FEW
    return True, args.client_procs, args.tasks


def progress(message: str) -> None:
    print(f"[replication] {message}", file=sys.stderr, flush=True)


def value_for(tag: str) -> str:
    """A VALUE_BYTES-long ASCII value that starts with `tag` (so values differ)."""
    return (tag + "-" + "v" * VALUE_BYTES)[:VALUE_BYTES]


# --- the client processes --------------------------------------------------------------------


async def worker_main(args: argparse.Namespace) -> dict[str, Any]:
    from failover.client import Client

    counts = {"ops": 0, "errors": 0}
    latencies_ms: list[float] = []
    first_error = ""
    prefix = f"{args.mode}-w{args.worker_id}"
    from failover.net.tls import TlsFiles

    tls = TlsFiles.from_options(args.tls_ca, args.tls_cert, args.tls_key)
    async with Client(agents=args.address, client_id=f"bench-{prefix}-{uuid.uuid4().hex[:8]}",
                      deadline_ms=args.deadline_ms, tls=tls, stream=args.stream) as client:
        # Connect and find the primary before the barrier.
        await client.call(SERVICE, {"op": "put", "key": f"{prefix}-hello",
                                    "value": value_for("hello")})
        warm_at_wall = args.start_at - args.warmup
        late_s = max(0.0, time.time() - warm_at_wall)
        await asyncio.sleep(max(0.0, warm_at_wall - time.time()))
        # The window in this process's monotonic clock.
        measure_start = time.monotonic() + (args.start_at - time.time())
        measure_end = measure_start + args.duration

        async def task(t: int) -> None:
            nonlocal first_error
            i = 0
            call = client.call
            monotonic = time.monotonic
            while True:
                t0 = monotonic()
                if t0 >= measure_end:
                    return
                key = f"{prefix}-t{t}-{i}"
                i += 1
                try:
                    await call(SERVICE, {"op": "put", "key": key, "value": value_for(key)})
                except Exception as exc:  # counted and reported, never hidden
                    t1 = monotonic()
                    if measure_start <= t1 <= measure_end:
                        counts["errors"] += 1
                    if not first_error:
                        first_error = f"{type(exc).__name__}: {exc}"
                    continue
                t1 = monotonic()
                if measure_start <= t1 <= measure_end:
                    counts["ops"] += 1
                    latencies_ms.append(round((t1 - t0) * 1000, 3))

        cpu: list[float] = []

        async def cpu_meter() -> None:
            # CPU seconds of this whole process (grpc threads included) over the window.
            await asyncio.sleep(max(0.0, measure_start - time.monotonic()))
            cpu.append(time.process_time())
            await asyncio.sleep(max(0.0, measure_end - time.monotonic()))
            cpu.append(time.process_time())

        await asyncio.gather(cpu_meter(), *(task(t) for t in range(args.tasks)))
        retries = client.retries
    return {"worker": args.worker_id, "ops": counts["ops"], "errors": counts["errors"],
            "retries": retries, "late_s": round(late_s, 3), "first_error": first_error,
            "cpu_s": round(cpu[1] - cpu[0], 3),
            "latencies_ms": latencies_ms}


# --- the parent ------------------------------------------------------------------------------


def py_spy_path() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy record (raw collapsed stacks) of some agent processes until `finish`."""

    def __init__(self, directory: Path | None, rate_hz: int = 100) -> None:
        self.directory = directory
        self.rate_hz = rate_hz
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, pids: dict[str, int]) -> None:
        if self.directory is None:
            return
        spy = py_spy_path()
        if spy is None:
            progress("py-spy not found: no profile")
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for host, pid in pids.items():
            self.procs.append(subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", str(self.rate_hz), "--format", "raw",
                 "--nonblocking", "--output", str(self.directory / f"{name}-{host}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL, start_new_session=True))
        progress(f"profiling {name}: {', '.join(f'{h}={p}' for h, p in pids.items())}")

    def finish(self) -> None:
        """Stops the samplers (SIGINT makes py-spy write its output)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def fsync_probe_ms(directory: Path, count: int = 50) -> dict[str, float]:
    """The machine's fsync latency now (a 4 KiB append then fsync, `count` times, in the
    benchmark's temp dir): a sync write waits for at least one, so it says how loaded the
    disk was during the run."""
    path = directory / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return {f"p{q}": round(percentile(times, q) or 0.0, 3) for q in (50, 90, 99)}


def agent_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process used so far (all its threads)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def spawn_workers(mode: str, address: str, start_at: float, args: argparse.Namespace,
                  tls: Any = None) -> list[subprocess.Popen[bytes]]:
    """The client processes; with `tls` (TlsFiles) each presents that certificate."""
    tls_flags = ([] if tls is None else ["--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert),
                                         "--tls-key", str(tls.key)])
    stream, client_procs, tasks = mode_shape(mode, args)
    procs = []
    for k in range(client_procs):
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode,
             "--worker-id", str(k), "--address", address, "--tasks", str(tasks),
             "--stream" if stream else "--no-stream",
             "--start-at", repr(start_at), "--warmup", str(args.warmup),
             "--duration", str(args.duration), *tls_flags],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=str(REPO)))
    return procs


def collect_workers(procs: list[subprocess.Popen[bytes]], timeout_s: float
                    ) -> list[dict[str, Any]]:
    results = []
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        if proc.returncode != 0:
            raise RuntimeError(f"client process {proc.pid} exited with {proc.returncode}")
        lines = [line for line in out.decode().splitlines() if line.strip()]
        results.append(json.loads(lines[-1]))
    return results


def kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)


class Scraper:
    """Reads each URL every SCRAPE_INTERVAL_S in a thread of its own until stopped, as
    Prometheus would (the cost measured is the agents' side of it)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if self.urls:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        import urllib.request

        while not self._stop.wait(SCRAPE_INTERVAL_S):
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=5) as reply:
                        reply.read()
                    self.scrapes += 1
                except OSError:
                    self.failures += 1


def run_clients(mode: str, root: Path, args: argparse.Namespace,
                profiler: Profiler) -> dict[str, Any]:
    from failover.localcluster import LocalCluster, wait_for
    from failover.processes import free_port

    tls = "_tls" in mode
    metrics = "_metrics" in mode
    progress(f"{mode}: starting a fresh cluster{' with mutual TLS' if tls else ''}"
             f"{' with metrics scraped' if metrics else ''}")
    with LocalCluster(root / mode, hosts=2, fsync_policy=FSYNC_POLICY, tls=tls) as cluster:
        scrape_urls = []
        if metrics:
            for agent in cluster:
                agent.extra["metrics_listen"] = f"127.0.0.1:{free_port()}"
                scrape_urls.append(f"http://{agent.extra['metrics_listen']}/metrics")
        cluster.start()
        primary, duplica = cluster["host1"], cluster["host2"]
        if "unreplicated" in mode:
            cluster.form(SERVICE, "kv", "host1", [])
        elif "sync" in mode and "async" not in mode:
            cluster.form(SERVICE, "kv", "host1", ["host2"])
        else:
            cluster.form(SERVICE, "kv", "host1", ["host2"], mode="async", in_sync=[])
        # Ready when the primary applied its epoch's first entry (and, replicated, the duplica
        # holds it: the link is up and streaming).
        wait_for(lambda: (r := primary.replica(SERVICE)) and r.indexes.applied_index >= 1, 20,
                 "the primary to open its epoch")
        if "unreplicated" not in mode:
            wait_for(lambda: (r := duplica.replica(SERVICE)) and r.indexes.durable_index >= 1,
                     20, "the duplica to receive the log")
        before = primary.replica(SERVICE).indexes.applied_index  # type: ignore[union-attr]
        start_at = time.time() + args.lead
        workers = spawn_workers(mode, primary.address, start_at, args, cluster.tls_client)
        agents = {"primary": primary, "duplica": duplica}
        scraper = Scraper(scrape_urls)
        try:
            scraper.start()
            time.sleep(max(0.0, start_at - time.time()))
            cpu0 = {role: agent_cpu_s(a.work_pid()) for role, a in agents.items()}
            profiler.start(mode, {"host1": primary.work_pid(), "host2": duplica.work_pid()})
            time.sleep(max(0.0, start_at + args.duration - time.time()))
            agents_cpu = {role: round(agent_cpu_s(a.work_pid()) - cpu0[role], 2)
                          for role, a in agents.items()}
            results = collect_workers(workers, args.warmup + args.duration + 60)
        finally:
            scraper.stop()
            kill_all(workers)
            profiler.finish()
        after = primary.replica(SERVICE).indexes.applied_index  # type: ignore[union-attr]
        converged = None
        if "unreplicated" not in mode:
            try:
                cluster.wait_converged(SERVICE, ["host1", "host2"], timeout_s=30)
                converged = True
            except TimeoutError as exc:
                progress(f"{mode}: replicas did not converge: {exc}")
                converged = False
    ops = sum(r["ops"] for r in results)
    errors = sum(r["errors"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    late = max(r["late_s"] for r in results)
    if late > 0:
        progress(f"{mode}: a client process reached the warm-up barrier {late:.2f} s late")
    first_errors = sorted({r["first_error"] for r in results if r["first_error"]})
    stream, client_procs, tasks = mode_shape(mode, args)
    summary = {
        "ops_s": round(ops / args.duration, 1),
        "stream": stream,
        "in_flight": client_procs * tasks,
        "ops": ops,
        "errors": errors,
        "retries": sum(r["retries"] for r in results),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else None,
        "per_process_ops": [r["ops"] for r in results],
        # CPU seconds used during the measured window (the machine has os.cpu_count() cores
        # for duration_s each); the duplica is idle in the unreplicated run.
        "cpu_s_primary": agents_cpu["primary"],
        "cpu_s_duplica": agents_cpu["duplica"],
        "cpu_s_clients": round(sum(r["cpu_s"] for r in results), 2),
        "barrier_late_s_max": late,
        "primary_applied_during_run": after - before,
        "replicas_converged": converged,
    }
    if metrics:
        summary["scrapes"] = scraper.scrapes
        summary["scrape_failures"] = scraper.failures
    if first_errors:
        summary["first_errors"] = first_errors[:3]
    progress(f"{mode}: {summary['ops_s']} ops/s, p50 {summary['p50_ms']} ms, "
             f"p99 {summary['p99_ms']} ms, errors {errors}")
    return summary


def prefill(wal_dir: Path, entries: int) -> tuple[int, int, float, int]:
    """Appends `entries` valid kv puts after the log's last entry; returns (first, last,
    seconds, bytes of the log's segment files)."""
    from failover.core.sessions import encode_request_id
    from failover.storage.records import Entry
    from failover.storage.wal import WriteAheadLog

    started = time.perf_counter()
    pack = msgpack.Packer(use_bin_type=True).pack
    with WriteAheadLog.open(wal_dir, fsync_policy="never") as wal:
        epoch = wal.last_epoch
        first = wal.last_index + 1
        assert epoch >= 1, "the log should hold the epoch's first entry"
        index = first
        for start in range(0, entries, PREFILL_CHUNK):
            batch = []
            for i in range(start, min(entries, start + PREFILL_CHUNK)):
                key = f"ship-{i:08d}"
                payload = pack({"op": "put", "key": key, "value": value_for(key)})
                rid = encode_request_id("prefill", i + 1, opens=i == 0)
                batch.append(Entry(epoch, index, rid, payload))
                index += 1
            wal.append(batch)
        wal.sync()
        last = wal.last_index
    record_bytes = sum(f.stat().st_size for f in Path(wal_dir).glob("*.wal"))
    return first, last, time.perf_counter() - started, record_bytes


def run_shipping(root: Path, args: argparse.Namespace, profiler: Profiler) -> dict[str, Any]:
    from failover.localcluster import LocalCluster, wait_for
    from failover.v1 import agent_pb2, common_pb2

    config = root / "ship-agent.toml"
    config.write_text("snapshot_every_entries = 0\n")
    progress(f"shipping: pre-filling a primary's log with {args.ship_entries} entries")
    with LocalCluster(root / "ship", hosts=2, fsync_policy=FSYNC_POLICY,
                      extra={"config": str(config)}, tls=False) as cluster:
        cluster.start()
        p, d = cluster["host1"], cluster["host2"]
        sync_pb = common_pb2.REPLICATION_MODE_SYNC

        def assign_primary(epoch: int, duplicas: list[str]) -> None:
            p.control().AssignRole(agent_pb2.AssignRoleRequest(
                service=SERVICE, kind="kv", role=common_pb2.ROLE_PRIMARY, epoch=epoch,
                mode=sync_pb,
                duplicas=[agent_pb2.ReplicaPeer(host_id=h, address=cluster[h].address)
                          for h in duplicas],
                in_sync=duplicas), timeout=30)

        assign_primary(1, [])
        wait_for(lambda: (r := p.replica(SERVICE)) and r.indexes.applied_index >= 1, 20,
                 "the primary to open epoch 1")
        p.stop()
        wal_dir = p.data_dir / "replicas" / SERVICE / "wal"
        first, last, prefill_s, log_bytes = prefill(wal_dir, args.ship_entries)
        progress(f"shipping: wrote entries {first}..{last} in {prefill_s:.1f} s; restarting")
        t = time.monotonic()
        p.start()
        restart_s = time.monotonic() - t
        # A new epoch with no duplicas: the primary logs the epoch's first entry, which
        # commits (and so applies) everything before it. Then its state is what a primary
        # that served those writes would hold.
        t = time.monotonic()
        assign_primary(2, [])
        target = last + 1
        wait_for(lambda: (r := p.replica(SERVICE)) and r.indexes.applied_index >= target, 300,
                 "the primary to apply the pre-filled log", interval_s=0.05)
        primary_apply_s = time.monotonic() - t
        progress(f"shipping: primary restarted in {restart_s:.1f} s, applied {target} entries "
                 f"in {primary_apply_s:.1f} s; adding a fresh duplica")
        status = p.replica(SERVICE)
        assert status is not None and status.indexes.durable_index == target, status
        d.control().AssignRole(agent_pb2.AssignRoleRequest(
            service=SERVICE, kind="kv", role=common_pb2.ROLE_DUPLICA, epoch=2, mode=sync_pb,
            primary=agent_pb2.ReplicaPeer(host_id="host1", address=p.address)), timeout=30)
        profiler.start("shipping", {"host1": p.work_pid(), "host2": d.work_pid()})
        try:
            t0 = time.monotonic()
            assign_primary(2, ["host2"])
            durable_s = applied_s = None
            deadline = t0 + 300
            samples = []
            while time.monotonic() < deadline:
                r = d.replica(SERVICE)
                now = time.monotonic()
                if r is not None:
                    samples.append((now - t0, r.indexes.durable_index, r.indexes.applied_index))
                    if durable_s is None and r.indexes.durable_index >= target:
                        durable_s = now - t0
                    if applied_s is None and r.indexes.applied_index >= target:
                        applied_s = now - t0
                    if durable_s is not None and applied_s is not None:
                        break
                time.sleep(POLL_S)
            if durable_s is None:
                raise TimeoutError(f"the duplica did not reach durable index {target} in 300 s "
                                   f"(last: {samples[-1] if samples else None})")
        finally:
            profiler.finish()
        cluster.wait_converged(SERVICE, ["host1", "host2"], timeout_s=120)
    # Durable index at each whole second, to show whether the rate is steady.
    timeline = []
    for elapsed, durable, applied in samples:
        if not timeline or elapsed >= len(timeline):
            timeline.append([round(elapsed, 2), durable, applied])
    result = {
        "entries": args.ship_entries,
        "entries_shipped_incl_epoch_markers": target,
        "to_durable_s": round(durable_s, 3),
        "to_applied_s": round(applied_s, 3) if applied_s is not None else None,
        "entries_s_applied": round(args.ship_entries / applied_s) if applied_s else None,
        "log_bytes": log_bytes,
        "record_bytes_avg": round(log_bytes / target, 1),
        "prefill_s": round(prefill_s, 2),
        "primary_restart_s": round(restart_s, 2),
        "primary_apply_s": round(primary_apply_s, 2),
        "replicas_converged": True,
        "timeline_s_durable_applied": timeline,
    }
    progress(f"shipping: durable in {durable_s:.2f} s "
             f"({args.ship_entries / durable_s:,.0f} entries/s), applied in "
             f"{applied_s if applied_s is None else round(applied_s, 2)} s")
    return result


def main(args: argparse.Namespace) -> None:
    began = time.monotonic()
    profiler = Profiler(Path(args.profile).resolve() if args.profile else None,
                        args.profile_rate_hz)
    modes = [m for m in MODES if m in args.modes.split(",")]
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="failover-repl-bench-") as tmp:
        root = Path(tmp)
        fsync_ms = {"before": fsync_probe_ms(root)}
        for mode in modes:
            if mode == "sync_metrics":
                continue  # paired with a plain sync run of its own, below
            details[mode] = run_clients(mode, root, args, profiler)
        pairs = [("sync", "sync_tls")] if {"sync", "sync_tls"} <= set(modes) else []
        metrics_pairs = []
        for n in range(1, args.metrics_rounds + 1 if "sync_metrics" in modes else 0):
            pair = ("sync_plain" if n == 1 else f"sync_plain_r{n}",
                    "sync_metrics" if n == 1 else f"sync_metrics_r{n}")
            for mode in (pair if n % 2 else pair[::-1]):
                details[mode] = run_clients(mode, root, args, profiler)
            metrics_pairs.append(pair)
        for n in range(2, args.tls_rounds + 1 if pairs else 0):
            # Another pair, the other way round every second time: a machine whose load
            # drifts over the run favours neither side.
            pair = (f"sync_r{n}", f"sync_tls_r{n}")
            for mode in (pair if n % 2 else pair[::-1]):
                details[mode] = run_clients(mode, root, args, profiler)
            pairs.append(pair)
        fsync_ms["after_client_runs"] = fsync_probe_ms(root)
        if args.ship_entries > 0:
            details["shipping"] = run_shipping(root, args, profiler)

    def ops(mode: str) -> float | None:
        return details[mode]["ops_s"] if mode in details else None

    def detail(mode: str, key: str) -> Any:
        return details[mode][key] if mode in details else None

    unrep, sync, asyn, sync_tls = (ops("unreplicated"), ops("sync"), ops("async"),
                                   ops("sync_tls"))
    ship = details.get("shipping")
    result = {
        "unreplicated_ops_s": unrep,
        "sync_ops_s": sync,
        "async_ops_s": asyn,
        "sync_ratio": round(sync / unrep, 3) if sync is not None and unrep else None,
        "write_p50_ms": details["sync"]["p50_ms"] if "sync" in details else None,
        "write_p99_ms": details["sync"]["p99_ms"] if "sync" in details else None,
        "shipping_entries_s": round(ship["entries"] / ship["to_durable_s"]) if ship else None,
        "tls_sync_ops_s": sync_tls,
        # Over every pair of runs: the TLS runs' ops over the plaintext runs' ops.
        "tls_sync_ops_ratio": round(sum(details[t]["ops_s"] for _, t in pairs)
                                    / sum(details[p]["ops_s"] for p, _ in pairs), 3)
        if pairs else None,
        "tls_sync_ops_ratio_per_pair": [round(details[t]["ops_s"] / details[p]["ops_s"], 3)
                                        for p, t in pairs],
        "tls_write_p99_ms": details["sync_tls"]["p99_ms"] if "sync_tls" in details else None,
        # The streaming data path (issue 16), measured in the same run as the keys above.
        "stream_unreplicated_ops_s": ops("stream_unreplicated"),
        "stream_sync_ops_s": ops("stream_sync"),
        "stream_write_p50_ms": detail("stream_sync", "p50_ms"),
        "stream_write_p99_ms": detail("stream_sync", "p99_ms"),
        "stream_unreplicated_ops_s_256": ops("stream_unreplicated_256"),
        "stream_sync_ops_s_256": ops("stream_sync_256"),
        "stream_write_p50_ms_256": detail("stream_sync_256", "p50_ms"),
        "stream_write_p99_ms_256": detail("stream_sync_256", "p99_ms"),
        "stream_sync_ops_s_8": ops("stream_sync_8"),
        "stream_write_p50_ms_8": detail("stream_sync_8", "p50_ms"),
        "stream_write_p99_ms_8": detail("stream_sync_8", "p99_ms"),
        "stream_sync_speedup": round(ops("stream_sync") / sync, 2)
        if sync and ops("stream_sync") is not None else None,
        "metrics_sync_ops_s": ops("sync_metrics"),
        # Over every pair: the runs with metrics on and scraped over those without.
        "metrics_sync_ops_ratio": round(sum(details[m]["ops_s"] for _, m in metrics_pairs)
                                        / sum(details[p]["ops_s"] for p, _ in metrics_pairs), 3)
        if metrics_pairs else None,
        # The primary agent's CPU seconds per write, metrics runs over plain ones: what the
        # metrics cost the agent, far less swayed than ops/s by what else the machine runs.
        "metrics_cpu_per_op_ratio": round(
            (sum(details[m]["cpu_s_primary"] for _, m in metrics_pairs)
             / sum(details[m]["ops"] for _, m in metrics_pairs))
            / (sum(details[p]["cpu_s_primary"] for p, _ in metrics_pairs)
               / sum(details[p]["ops"] for p, _ in metrics_pairs)), 3)
        if metrics_pairs else None,
        "metrics_sync_ops_ratio_per_pair": [
            round(details[m]["ops_s"] / details[p]["ops_s"], 3) for p, m in metrics_pairs],
        "metrics_write_p99_ms": details["sync_metrics"]["p99_ms"]
        if "sync_metrics" in details else None,
        "settings": {
            "tls": "every key but tls_* is from a run in the clear; tls_* from sync_tls, the "
                   "sync run again on a fresh cluster with mutual TLS on every channel; "
                   "tls_sync_ops_ratio is total TLS over total plaintext ops/s of "
                   f"{len(pairs)} pair(s) of sync runs (sync, sync_tls; then alternating "
                   "order), each on a fresh cluster",
            "tls_rounds": len(pairs),
            "metrics": "metrics_* pairs a sync run with --metrics-listen on both agents, "
                       f"scraped every {SCRAPE_INTERVAL_S} s, with a plain sync run "
                       "(sync_plain*), in alternating order, each on a fresh cluster",
            "metrics_rounds": len(metrics_pairs),
            "client_processes": args.client_procs,
            "tasks_per_process": args.tasks,
            "concurrency": args.client_procs * args.tasks,
            "stream": "stream_* keys: Client(stream=True), one ExecuteStream per client "
                      "process; _256: 4x the tasks per process; _8: one process of "
                      f"{STREAM_WRITERS_FEW} writers; every other key: one unary Execute "
                      "per request (stream=False)",
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "fsync_policy": FSYNC_POLICY,
            "value_bytes": VALUE_BYTES,
            "request": "kv put, distinct keys",
            "agents_per_cluster": 2,
            "fresh_cluster_per_mode": True,
            "ship_entries": args.ship_entries,
            "ship_payload": "msgpack kv put, 100-byte value, with request id",
            "ship_batch_entries_max": 4096,
            "ship_snapshots": "off (snapshot_every_entries=0) on both agents",
            "ship_timed": "AssignRole(primary, duplica in sync) -> duplica durable_index "
                          f">= primary last index, polled every {POLL_S * 1000:.0f} ms",
            "ship_applied_concurrently": True,
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "fsync_ms": fsync_ms,
            "profiled": bool(args.profile),
            "run_s": round(time.monotonic() - began, 1),
        },
        "details": details,
    }
    print(json.dumps(result, separators=(",", ":")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=DURATION_S)
    parser.add_argument("--warmup", type=float, default=WARMUP_S)
    parser.add_argument("--lead", type=float, default=LEAD_S)
    parser.add_argument("--client-procs", type=int, default=CLIENT_PROCS)
    parser.add_argument("--tasks", type=int, default=TASKS_PER_PROC,
                        help="in-flight requests per client process")
    parser.add_argument("--ship-entries", type=int, default=SHIP_ENTRIES)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--tls-rounds", type=int, default=TLS_ROUNDS,
                        help="pairs of sync runs, plaintext and TLS, for tls_sync_ops_ratio")
    parser.add_argument("--metrics-rounds", type=int, default=METRICS_ROUNDS,
                        help="pairs of sync runs with and without metrics")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the agents into DIR")
    parser.add_argument("--profile-rate-hz", type=int, default=100,
                        help="py-spy samples per second")
    # Worker (client process) arguments.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--deadline-ms", type=int, default=5000, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False,
                        help=argparse.SUPPRESS)
    parser.add_argument("--tls-ca", help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", help=argparse.SUPPRESS)
    parser.add_argument("--tls-key", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.worker:
        print(json.dumps(asyncio.run(worker_main(ARGS)), separators=(",", ":")))
    else:
        main(ARGS)
