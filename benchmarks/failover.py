"""Failover, false alarms and switchover on real processes; prints one JSON line.

One cluster: a coordinator and three agents (``LocalCluster(hosts=3, coordinator=True)``),
a ``kv`` service with three replicas in sync mode. A steady workload runs in separate client
processes (this script re-invoked with ``--worker``): each has its own
``failover.client.Client(coordinator=...)`` and TASKS asyncio tasks doing kv puts of unique
keys back to back, recording per request its monotonic start and end, whether it succeeded,
and which address (and epoch) answered it. Each worker also keeps, in a small shared file
(mmap), the monotonic time of its last success, so the orchestrator can wait for the client
to be served again without talking to it. CLOCK_MONOTONIC is one clock for every process of
the machine, so the orchestrator's marks and the workers' records compare directly.

Three phases under that one workload, in this order:

* ``kills``: KILLS times, find the primary (``primary_of``), SIGKILL its whole agent (the
  supervisor and its child: the process group, as a lost host; ``AgentProcess.kill``), wait
  for a new serving primary and for the client to be served again, restart the killed agent, wait
  until both duplicas are in the in-sync set again, settle a moment (with a seeded jitter, so
  kills land at every phase of the heartbeat period), next. The unavailability of a kill is
  client-visible: the first successful completion after the kill that another host served,
  minus the last successful completion before the kill (``unavailability_naive_ms`` in the
  details counts any completion, including replies already in flight from the dying host).
* ``crashes`` (issue 16, the crash fast path): CRASHES times, SIGKILL the primary agent's
  child process alone, its supervisor alive (``AgentProcess.kill_child``): the supervisor
  reports the exit and restarts the child; wait for a new serving primary and for the client
  to be served again, then for the restarted child to rejoin in sync. Measured like a kill:
  ``crash_unavailability_ms_p50/p99/max``.
* ``pauses``: PAUSES times, SIGSTOP the primary's agent for PAUSE_MS, then SIGCONT, with
  PAUSE_GAP_S (+ jitter) between pauses. ``false_failovers`` counts the epoch increments of
  the service over the phase (and, in the details, the ``failover`` events in the history).
* ``switchovers``: SWITCHOVERS calls of the coordinator's ``Switchover`` RPC, all replicas in
  sync before each. ``switchover_failed_requests`` counts client requests that failed and
  ended inside a switchover (from the RPC's start to SWITCHOVER_GRACE_S after its reply);
  ``switchover_stall_ms_max`` is the largest ``stall_ms`` the coordinator reported; the
  details add the client-observed max latency and max gap between successes in those windows.

Then the workers stop, every replica must converge on one digest at one applied index
(``GetDigest``), and every acknowledged key is read back through a client (READBACK_PROCS
processes x READBACK_TASKS tasks): ``acked_writes_lost`` counts keys missing or holding
another value. Coordinator history (``failover`` events' ``detection_ms``/``promotion_ms``)
and the clients' routes pushes break each kill's unavailability down in the details.

Mutual TLS (issue 13): the run above is in the clear, so its keys stay comparable with
earlier runs. Then, unless ``--tls-kills 0``, a second pass of the same script on a fresh
cluster with mutual TLS on every channel (``--tls``: the agents, the coordinator and the
client processes all present certificates) does only the kills phase, TLS_KILLS kills (fewer
than the plaintext pass, to bound the run time) and no pauses or switchovers:
``tls_unavailability_ms_p99`` is its unavailability p99, measured the same way, and
``details.tls`` its summary (its acknowledged writes are read back too).

Run: ``.venv/bin/python benchmarks/failover.py`` (progress on stderr, JSON on stdout).
``--root DIR`` keeps the cluster's data dirs and logs there (otherwise a temporary dir).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import msgpack  # noqa: E402

from failover.percentile import percentile  # noqa: E402

SERVICE = "kv"
REPLICAS = 3
VALUE_BYTES = 100
CLIENT_PROCS = 1
TASKS = 8
CALL_DEADLINE_MS = 5000  # the client's default
KILLS = 20
CRASHES = 20
PAUSES = 20
PAUSE_MS = 150
PAUSE_GAP_S = 0.5
SWITCHOVERS = 10
TLS_KILLS = 10  # the TLS pass: kills only
SWITCHOVER_GAP_S = 0.3
SWITCHOVER_GRACE_S = 0.5
SETTLE_S = 0.3  # steady running between the cluster being whole again and the next fault
JITTER_S = 0.2  # uniform extra settle, seeded
READBACK_PROCS = 2
READBACK_TASKS = 32
POLL_S = 0.005
WAIT_S = 30.0
SEED = 1

# The workers' shared status: last success (monotonic s), successes, errors.
STATUS = struct.Struct("<dqq")


def progress(message: str) -> None:
    print(f"[failover] {message}", file=sys.stderr, flush=True)


def value_for(key: str) -> str:
    """A VALUE_BYTES-long ASCII value that starts with `key` (so values differ)."""
    return (key + "=" + "v" * VALUE_BYTES)[:VALUE_BYTES]


def key_for(worker: int, task: int, i: int) -> str:
    return f"w{worker}-t{task}-{i}"


def client_tls(args: argparse.Namespace) -> Any:
    """The certificate a client process presents (None in a plaintext pass)."""
    from failover.net.tls import TlsFiles

    return TlsFiles.from_options(args.tls_ca, args.tls_cert, args.tls_key)


def tls_args(args: argparse.Namespace) -> list[str]:
    """The client processes' TLS flags: the cluster's client certificate in a TLS pass."""
    if not args.tls_cert:
        return []
    return ["--tls-ca", args.tls_ca, "--tls-cert", args.tls_cert, "--tls-key", args.tls_key]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# --- the client processes --------------------------------------------------------------------

def instrumented_client_class() -> type:
    """A `Client` that notes when routes arrive (diagnostics only; it wraps one private
    method, and calls it first, so the client's own handling is unchanged). Who answered
    each call comes from `call_detailed`, not from wrapping the stub: the client cancels
    its attempts (it needs the gRPC call objects) when a routes push moves the service."""
    from failover.client import Client

    class InstrumentedClient(Client):  # type: ignore[misc, valid-type]
        route_log: list[tuple[float, int, str, int]]

        def _apply_routes(self, update: Any) -> None:
            super()._apply_routes(update)
            route = self._routes.get(SERVICE)
            if route is not None:
                self.route_log.append((time.monotonic(), int(update.version), route[0],
                                       int(route[1])))

    return InstrumentedClient


async def worker_main(args: argparse.Namespace) -> dict[str, Any]:
    cls = instrumented_client_class()
    status_file = open(args.status_file, "r+b")  # noqa: SIM115 (closed below)
    status = mmap.mmap(status_file.fileno(), STATUS.size)
    stop_path = Path(args.stop_file)
    counters = {"ok": 0, "errors": 0, "last_ok": 0.0}
    # Per request: start, end, ok, task, i, index of the answering address (-1 unknown).
    t0s: list[float] = []
    t1s: list[float] = []
    oks: list[int] = []
    tasks_: list[int] = []
    seqs: list[int] = []
    served: list[int] = []
    epochs: list[int] = []
    addresses: dict[str, int] = {}
    error_kinds: dict[str, int] = {}
    error_examples: list[str] = []
    client = cls(coordinator=args.coordinator, client_id=f"bench-w{args.worker_id}-"
                 f"{os.getpid()}", deadline_ms=args.deadline_ms, tls=client_tls(args),
                 stream=not args.unary)
    client.route_log = []
    stop = asyncio.Event()

    def publish() -> None:
        STATUS.pack_into(status, 0, counters["last_ok"], counters["ok"], counters["errors"])

    async def task(t: int) -> None:
        i = 0
        call = client.call_detailed
        monotonic = time.monotonic
        while not stop.is_set():
            i += 1
            key = key_for(args.worker_id, t, i)
            start = monotonic()
            address, epoch = "", 0
            try:
                result = await call(SERVICE, {"op": "put", "key": key, "value": value_for(key)})
                ok = 1
                address, epoch = result.address, result.epoch
            except Exception as exc:  # counted and reported, never hidden
                ok = 0
                kind = type(exc).__name__
                error_kinds[kind] = error_kinds.get(kind, 0) + 1
                if len(error_examples) < 5:
                    error_examples.append(f"{key}: {kind}: {exc}")
            end = monotonic()
            t0s.append(start)
            t1s.append(end)
            oks.append(ok)
            tasks_.append(t)
            seqs.append(i)
            served.append(addresses.setdefault(address, len(addresses)) if ok and address
                          else -1)
            epochs.append(epoch if ok else 0)
            if ok:
                counters["ok"] += 1
                counters["last_ok"] = end
            else:
                counters["errors"] += 1
            publish()

    async def watch_stop() -> None:
        while not stop_path.exists():
            await asyncio.sleep(0.02)
        stop.set()

    try:
        await asyncio.gather(watch_stop(), *(task(t) for t in range(args.tasks)))
        retries = client.retries
    finally:
        await client.close()
        status.close()
        status_file.close()
    return {"worker": args.worker_id, "t0": t0s, "t1": t1s, "ok": oks, "task": tasks_,
            "i": seqs, "served": served, "epoch": epochs,
            "addresses": sorted(addresses, key=addresses.__getitem__),
            "retries": retries, "error_kinds": error_kinds, "error_examples": error_examples,
            "route_log": client.route_log}


async def readback_main(args: argparse.Namespace) -> dict[str, Any]:
    """Reads back this shard of the acknowledged keys; counts missing and wrong values."""
    from failover.client import Client

    keys = json.loads(Path(args.keys_file).read_text())
    mine = keys[args.worker_id::args.readback_procs]
    missing: list[str] = []
    wrong: list[str] = []
    errors: list[str] = []
    queue = iter(mine)
    async with Client(coordinator=args.coordinator, deadline_ms=args.deadline_ms,
                      tls=client_tls(args)) as client:

        async def reader() -> None:
            for key in queue:
                try:
                    got = await client.call(SERVICE, {"op": "get", "key": key})
                except Exception as exc:
                    errors.append(f"{key}: {type(exc).__name__}: {exc}")
                    continue
                if not got.get("found"):
                    missing.append(key)
                elif got.get("value") != value_for(key):
                    wrong.append(key)

        await asyncio.gather(*(reader() for _ in range(args.tasks)))
    return {"checked": len(mine), "missing": len(missing), "wrong": len(wrong),
            "errors": len(errors), "examples": (missing + wrong)[:10],
            "error_examples": errors[:5]}


# --- the orchestrator ------------------------------------------------------------------------


class Workers:
    """The client processes, their shared status files and their stop file."""

    def __init__(self, root: Path, coordinator: str, args: argparse.Namespace) -> None:
        self.stop_file = root / "workers.stop"
        self.status_files = [root / f"worker{k}.status" for k in range(args.client_procs)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for k, path in enumerate(self.status_files):
            path.write_bytes(b"\0" * STATUS.size)
            self.procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker",
                 "--worker-id", str(k), "--coordinator", coordinator, "--tasks",
                 str(args.tasks), "--status-file", str(path), "--stop-file",
                 str(self.stop_file), "--deadline-ms", str(args.deadline_ms),
                 *(["--unary"] if args.unary else []), *tls_args(args)],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=str(REPO)))
        self._maps = []
        for path in self.status_files:
            with open(path, "rb") as f:
                self._maps.append(mmap.mmap(f.fileno(), STATUS.size, access=mmap.ACCESS_READ))

    def status(self) -> list[tuple[float, int, int]]:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"client process {proc.pid} exited with {proc.returncode}")
        return [STATUS.unpack_from(m, 0) for m in self._maps]

    def last_ok(self) -> float:
        return max(s[0] for s in self.status())

    def served_since(self, t: float) -> bool:
        """Every client process has had a success that completed after `t`."""
        return all(s[0] > t for s in self.status())

    def finish(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        self.stop_file.touch()
        results = []
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise RuntimeError(f"client process {proc.pid} exited with {proc.returncode}")
            lines = [line for line in out.decode().splitlines() if line.strip()]
            results.append(json.loads(lines[-1]))
        return results

    def close(self) -> None:
        for m in self._maps:
            m.close()
        self._maps.clear()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)


def service_view(cluster: Any) -> Any:
    return next((s for s in cluster.coordinator.status().services if s.name == SERVICE), None)


def epoch_of(cluster: Any) -> int:
    view = service_view(cluster)
    return int(view.epoch) if view is not None else 0


def whole(cluster: Any) -> str | None:
    """The serving primary when every replica is up and both duplicas are in sync."""
    from failover.v1 import common_pb2

    view = service_view(cluster)
    if view is None:
        return None
    duplicas = [r for r in view.replicas if r.role == common_pb2.ROLE_DUPLICA]
    if len(duplicas) != REPLICAS - 1 or not all(r.in_sync for r in duplicas):
        return None
    if not all(a.alive for a in cluster):
        return None
    return cluster.primary_of(SERVICE)


def wait_whole(cluster: Any, what: str, timeout_s: float = WAIT_S) -> str:
    from failover.localcluster import wait_for

    return wait_for(lambda: whole(cluster), timeout_s, what, interval_s=POLL_S * 2)


def settle(workers: Workers, rng: random.Random, args: argparse.Namespace) -> None:
    """Steady running before the next fault: the client is being served right now."""
    from failover.localcluster import wait_for

    time.sleep(args.settle + rng.uniform(0, args.jitter))
    wait_for(lambda: time.monotonic() - workers.last_ok() < 0.05, WAIT_S,
             "the client to be served steadily", interval_s=POLL_S)


def run_kills(cluster: Any, workers: Workers, rng: random.Random,
              args: argparse.Namespace, crash: bool = False) -> list[dict[str, Any]]:
    """The kills phase, or with `crash` the crashes phase: SIGKILL of the agent's child
    alone, which its supervisor reports and restarts (no restart here)."""
    from failover.localcluster import wait_for

    kills = []
    what = "crash" if crash else "kill"
    for n in range(args.crashes if crash else args.kills):
        settle(workers, rng, args)
        old = wait_whole(cluster, f"the replica set to be whole before a {what}")
        epoch = epoch_of(cluster)
        agent = cluster[old]
        child = agent.child_pid() if crash else None
        t_kill = time.monotonic()
        if crash:
            agent.kill_child()
        else:
            agent.kill()
        new = wait_for(lambda old=old: (p := cluster.primary_of(SERVICE)) not in (None, old)
                       and p, WAIT_S, f"a new primary after killing {old}", interval_s=POLL_S)
        t_primary = time.monotonic()
        wait_for(lambda t_kill=t_kill: workers.served_since(t_kill), WAIT_S,
                 "the client to be served after the kill", interval_s=POLL_S)
        t_client = time.monotonic()
        if crash:
            wait_for(lambda agent=agent, child=child: agent.child_pid() not in (None, child),
                     WAIT_S, f"{old}'s supervisor to restart its child", interval_s=POLL_S)
        else:
            agent.start()
        t_started = time.monotonic()
        wait_whole(cluster, f"{old} to rejoin as an in-sync duplica")
        t_whole = time.monotonic()
        kills.append({
            "n": n, "old_primary": old, "old_address": agent.address, "new_primary": new,
            "epoch_before": epoch, "epoch_after": epoch_of(cluster), "t_kill": t_kill,
            "orch_new_primary_ms": ms(t_primary - t_kill),
            "orch_client_served_ms": ms(t_client - t_kill),
            "restart_s": round(t_started - t_client, 2),
            "rejoin_in_sync_s": round(t_whole - t_started, 2),
        })
        progress(f"{what} {n + 1}/{args.crashes if crash else args.kills}: {old} -> {new}, "
                 f"client served again after {ms(t_client - t_kill)} ms (orchestrator poll), "
                 f"rejoined in {t_whole - t_started:.2f} s")
    return kills


def run_pauses(cluster: Any, workers: Workers, rng: random.Random,
               args: argparse.Namespace) -> list[dict[str, Any]]:
    pauses = []
    for n in range(args.pauses):
        time.sleep(rng.uniform(0, args.jitter))
        primary = wait_whole(cluster, "the replica set to be whole before a pause")
        epoch = epoch_of(cluster)
        agent = cluster[primary]
        t_stop = time.monotonic()
        agent.signal(signal.SIGSTOP)
        time.sleep(args.pause_ms / 1000)
        agent.signal(signal.SIGCONT)
        t_cont = time.monotonic()
        time.sleep(args.pause_gap)
        epoch_after = epoch_of(cluster)
        pauses.append({"n": n, "primary": primary, "t_stop": t_stop, "t_cont": t_cont,
                       "paused_ms": ms(t_cont - t_stop), "epoch_before": epoch,
                       "epoch_after": epoch_after})
        if epoch_after != epoch:
            progress(f"pause {n + 1}: epoch {epoch} -> {epoch_after}: a false failover")
    progress(f"pauses: {args.pauses} x {args.pause_ms} ms done")
    return pauses


def run_switchovers(cluster: Any, workers: Workers, rng: random.Random,
                    args: argparse.Namespace) -> list[dict[str, Any]]:
    import grpc

    from failover.v1 import coordinator_pb2

    stub = cluster.coordinator.stub()
    out = []
    for n in range(args.switchovers):
        settle(workers, rng, args)
        old = wait_whole(cluster, "the replica set to be whole before a switchover")
        t0 = time.monotonic()
        record: dict[str, Any] = {"n": n, "old_primary": old, "t0": t0}
        try:
            reply = stub.Switchover(coordinator_pb2.SwitchoverRequest(service=SERVICE),
                                    timeout=15)
            record.update(ok=True, new_primary=reply.primary_host_id, epoch=reply.epoch,
                          stall_ms=reply.stall_ms)
        except grpc.RpcError as exc:
            record.update(ok=False, error=f"{exc.code().name}: {exc.details()}")
        record["t1"] = time.monotonic()
        record["rpc_ms"] = ms(record["t1"] - t0)
        out.append(record)
        progress(f"switchover {n + 1}/{args.switchovers}: "
                 + (f"{old} -> {record['new_primary']}, stall {record['stall_ms']} ms, "
                    f"rpc {record['rpc_ms']} ms" if record["ok"] else record["error"]))
        time.sleep(args.switchover_gap)
    return out


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """All requests of all workers, sorted by end time, with the answering address."""
    rows = []
    for r in results:
        addresses = r["addresses"]
        for t0, t1, ok, task, i, served, epoch in zip(
                r["t0"], r["t1"], r["ok"], r["task"], r["i"], r["served"], r["epoch"],
                strict=True):
            rows.append((t1, t0, ok, key_for(r["worker"], task, i),
                         addresses[served] if served >= 0 else "", epoch))
    rows.sort()
    ok_ends = [row[0] for row in rows if row[2]]
    return {"rows": rows, "ok_ends": ok_ends}


def unavailability(merged: dict[str, Any], t_kill: float, old_address: str) -> dict[str, Any]:
    rows, ok_ends = merged["rows"], merged["ok_ends"]
    i = bisect.bisect_right(ok_ends, t_kill)
    last_before = ok_ends[i - 1] if i else None
    first_after_any = ok_ends[i] if i < len(ok_ends) else None
    j = bisect.bisect_right(rows, (t_kill, float("inf")))
    first_after = None
    first_row = None
    late_old = 0
    for row in rows[j:]:
        if not row[2]:
            continue
        if row[4] == old_address:
            late_old += 1  # a reply already on its way when the host died
            continue
        first_after, first_row = row[0], row
        break
    out = {
        "last_ok_before_kill_ms": ms(t_kill - last_before) if last_before else None,
        "unavailability_ms": ms(first_after - last_before)
        if first_after and last_before else None,
        "unavailability_naive_ms": ms(first_after_any - last_before)
        if first_after_any and last_before else None,
        "late_replies_from_old_primary": late_old,
        "first_ok_after_kill_ms": ms(first_after - t_kill) if first_after else None,
        "first_ok_latency_ms": ms(first_row[0] - first_row[1]) if first_row else None,
        "first_ok_epoch": first_row[5] if first_row else None,
    }
    return out


def window_stats(merged: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """Requests that overlap [start, end]: failures ending inside, max latency, max gap."""
    rows = merged["rows"]
    failed = []
    latency_max = 0.0
    for t1, t0, ok, key, _, _ in rows[bisect.bisect_left(rows, (start,)):]:
        if t0 > end:
            if t1 > end + 5:
                break
            continue
        latency_max = max(latency_max, t1 - t0)
        if not ok and start <= t1 <= end:
            failed.append(key)
    ok_ends = merged["ok_ends"]
    i = max(0, bisect.bisect_left(ok_ends, start) - 1)
    j = min(len(ok_ends), bisect.bisect_right(ok_ends, end) + 1)
    inside = ok_ends[i:j]
    gap = max((b - a for a, b in zip(inside, inside[1:], strict=False)), default=0.0)
    return {"failed": failed, "latency_max_ms": ms(latency_max), "gap_max_ms": ms(gap)}


def errors_between(merged: dict[str, Any], start: float, end: float) -> int:
    return sum(1 for t1, _, ok, *_ in merged["rows"] if not ok and start <= t1 <= end)


def history_events(cluster: Any, offset: float) -> list[dict[str, Any]]:
    """Coordinator history with each event's time on the monotonic clock."""
    out = []
    for e in cluster.coordinator.history(SERVICE):
        details = msgpack.unpackb(e.details, raw=False) if e.details else {}
        out.append({"seq": e.seq, "t": e.at - offset, "kind": e.kind, "message": e.message,
                    "details": details})
    return out


def readback(root: Path, coordinator: str, keys: list[str],
             args: argparse.Namespace) -> dict[str, Any]:
    keys_file = root / "acked_keys.json"
    keys_file.write_text(json.dumps(keys))
    procs = [subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--readback", "--worker-id", str(k),
         "--readback-procs", str(args.readback_procs), "--coordinator", coordinator,
         "--keys-file", str(keys_file), "--tasks", str(args.readback_tasks),
         "--deadline-ms", str(args.deadline_ms), *tls_args(args)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
        cwd=str(REPO)) for k in range(args.readback_procs)]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"readback process {proc.pid} exited with "
                                   f"{proc.returncode}")
            results.append(json.loads(out.decode().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {
        "checked": sum(r["checked"] for r in results),
        "missing": sum(r["missing"] for r in results),
        "wrong": sum(r["wrong"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "examples": [x for r in results for x in r["examples"]][:10],
        "error_examples": [x for r in results for x in r["error_examples"]][:5],
    }


def summarize_kills(kills: list[dict[str, Any]], merged: dict[str, Any],
                    events: list[dict[str, Any]],
                    route_logs: list[list[Any]]) -> list[dict[str, Any]]:
    failovers = [e for e in events if e["kind"] == "failover"]
    routes = sorted((tuple(x) for log in route_logs for x in log), key=lambda x: x[0])
    for k in kills:
        k.update(unavailability(merged, k["t_kill"], k["old_address"]))
        event = next((e for e in failovers if e["t"] > k["t_kill"]
                      and e["details"].get("old_primary") == k["old_primary"]), None)
        if event is not None:
            d = event["details"]
            k["detection_ms"] = d.get("detection_ms")
            k["promotion_ms"] = d.get("promotion_ms")
            k["failover_event_after_kill_ms"] = ms(event["t"] - k["t_kill"])
            # The first routes push any client received naming the new epoch.
            pushed = next((r for r in routes if r[0] >= k["t_kill"]
                           and r[3] >= d.get("epoch", 0)), None)
            k["route_pushed_after_kill_ms"] = ms(pushed[0] - k["t_kill"]) if pushed else None
        else:
            k["detection_ms"] = k["promotion_ms"] = None
    return kills


def run_tls_pass(args: argparse.Namespace) -> dict[str, Any]:
    """This script again with --tls on a fresh cluster: kills only. Its JSON line."""
    progress(f"TLS pass: a fresh cluster with mutual TLS, {args.tls_kills} kills")
    command = [sys.executable, str(Path(__file__).resolve()), "--tls",
               "--kills", str(args.tls_kills), "--crashes", "0", "--pauses", "0",
               "--switchovers", "0",
               "--seed", str(args.seed), "--client-procs", str(args.client_procs),
               "--tasks", str(args.tasks), "--deadline-ms", str(args.deadline_ms),
               "--settle", str(args.settle), "--jitter", str(args.jitter)]
    done = subprocess.run(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          cwd=str(REPO), timeout=600, check=True)
    return json.loads(done.stdout.decode().splitlines()[-1])  # type: ignore[no-any-return]


def main(args: argparse.Namespace) -> None:
    from failover import defaults
    from failover.localcluster import LocalCluster

    began = time.monotonic()
    load_at_start = round(os.getloadavg()[0], 1)  # the machine is shared: say how busy
    rng = random.Random(args.seed)
    tmp = None
    if args.root:
        root = Path(args.root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise SystemExit(f"--root {root} is not empty")
    else:
        tmp = tempfile.TemporaryDirectory(prefix="failover-bench-")
        root = Path(tmp.name)
    offset = time.time() - time.monotonic()  # wall clock -> monotonic, for history times
    details: dict[str, Any] = {}
    try:
        with LocalCluster(root, hosts=REPLICAS, coordinator=True, tls=args.tls) as cluster:
            if cluster.tls_client is not None:
                files = cluster.tls_client
                args.tls_ca, args.tls_cert, args.tls_key = (
                    str(files.ca), str(files.cert), str(files.key))
            cluster.start()
            cluster.create(SERVICE, "kv", replicas=REPLICAS, mode="sync")
            wait_whole(cluster, "the service to have every replica in sync")
            coordinator = cluster.coordinator.address
            progress(f"cluster up in {time.monotonic() - began:.1f} s; starting "
                     f"{args.client_procs} client process(es) x {args.tasks} in flight")
            workers = Workers(root, coordinator, args)
            try:
                from failover.localcluster import wait_for

                wait_for(lambda: all(s[1] > 0 for s in workers.status()), WAIT_S,
                         "the clients' first success", interval_s=0.02)
                time.sleep(1.0)  # warm
                phases: dict[str, tuple[float, float]] = {}
                t = time.monotonic()
                kills = run_kills(cluster, workers, rng, args)
                phases["kills"] = (t, time.monotonic())
                t = time.monotonic()
                crashes = run_kills(cluster, workers, rng, args, crash=True)
                phases["crashes"] = (t, time.monotonic())
                settle(workers, rng, args)
                t = time.monotonic()
                epoch_before_pauses = epoch_of(cluster)
                pauses = run_pauses(cluster, workers, rng, args)
                epoch_after_pauses = epoch_of(cluster)
                phases["pauses"] = (t, time.monotonic())
                t = time.monotonic()
                switchovers = run_switchovers(cluster, workers, rng, args)
                phases["switchovers"] = (t, time.monotonic())
                settle(workers, rng, args)
                results = workers.finish()
            finally:
                workers.close()
            t_stop = time.monotonic()
            progress("workload stopped; waiting for the replicas to converge")
            converged_digest = None
            try:
                converged_digest = cluster.wait_converged(SERVICE, list(cluster.agents),
                                                          timeout_s=WAIT_S)
            except TimeoutError as exc:
                progress(f"replicas did not converge: {exc}")
            digests = {h: cluster[h].digest(SERVICE) for h in cluster.agents}
            events = history_events(cluster, offset)
            merged = merge(results)
            acked = [row[3] for row in merged["rows"] if row[2]]
            progress(f"{len(merged['rows'])} requests, {len(acked)} acknowledged; reading "
                     "them back")
            t = time.monotonic()
            back = readback(root, coordinator, acked, args)
            readback_s = time.monotonic() - t
    finally:
        if tmp is not None:
            tmp.cleanup()

    # --- kills ---
    kills = summarize_kills(kills, merged, events, [r["route_log"] for r in results])
    unavail = sorted(k["unavailability_ms"] for k in kills if k["unavailability_ms"] is not None)
    kill_errors = errors_between(merged, *phases["kills"])
    crashes = summarize_kills(crashes, merged, events, [r["route_log"] for r in results])
    crash_unavail = sorted(k["unavailability_ms"] for k in crashes
                           if k["unavailability_ms"] is not None)
    # --- pauses ---
    p0, p1 = phases["pauses"]
    pause_events = [e for e in events if p0 <= e["t"] <= p1 + 1.0]
    pause_failovers = [e for e in pause_events if e["kind"] == "failover"]
    pause_suspicions = [e for e in pause_events if e["kind"] == "suspicion"]
    pause_gaps = [window_stats(merged, p["t_stop"], p["t_cont"] + 0.2)["gap_max_ms"]
                  for p in pauses]
    # --- switchovers ---
    sw_windows = [window_stats(merged, s["t0"], s["t1"] + args.switchover_grace)
                  for s in switchovers]
    sw_failed = sum(len(w["failed"]) for w in sw_windows)
    stalls = [s["stall_ms"] for s in switchovers if s.get("ok")]
    total_ok = sum(1 for row in merged["rows"] if row[2])
    total = len(merged["rows"])
    run_s = t_stop - phases["kills"][0]
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    truncated = sum(e["details"].get("truncated_entries", 0) for e in events
                    if e["kind"] == "rejoin")
    error_kinds: dict[str, int] = {}
    for r in results:
        for kind, count in r["error_kinds"].items():
            error_kinds[kind] = error_kinds.get(kind, 0) + count
    digest_values = {d.digest for d in digests.values()}
    applied = {h: d.applied_index for h, d in digests.items()}

    def spread(values: list[float | None]) -> dict[str, float | None]:
        v = sorted(x for x in values if x is not None)
        return {"p50": percentile(v, 50), "max": v[-1] if v else None}

    details.update({
        "kills": {
            "unavailability_ms": [k["unavailability_ms"] for k in kills],
            "unavailability_naive_ms": [k["unavailability_naive_ms"] for k in kills],
            "detection_ms": [k["detection_ms"] for k in kills],
            "promotion_ms": [k["promotion_ms"] for k in kills],
            "failover_event_after_kill_ms": [k.get("failover_event_after_kill_ms")
                                             for k in kills],
            "route_pushed_after_kill_ms": [k.get("route_pushed_after_kill_ms")
                                           for k in kills],
            "first_ok_after_kill_ms": [k["first_ok_after_kill_ms"] for k in kills],
            "first_ok_latency_ms": [k["first_ok_latency_ms"] for k in kills],
            "last_ok_before_kill_ms": [k["last_ok_before_kill_ms"] for k in kills],
            "late_replies_from_old_primary": sum(k["late_replies_from_old_primary"]
                                                 for k in kills),
            "orch_new_primary_ms": spread([k["orch_new_primary_ms"] for k in kills]),
            "restart_s": spread([k["restart_s"] for k in kills]),
            "rejoin_in_sync_s": spread([k["rejoin_in_sync_s"] for k in kills]),
            "primaries": [f"{k['old_primary']}->{k['new_primary']}" for k in kills],
            "epochs_raised": kills[-1]["epoch_after"] - kills[0]["epoch_before"]
            if kills else 0,
            "failed_requests": kill_errors,
        },
        "crashes": {
            "unavailability_ms": [k["unavailability_ms"] for k in crashes],
            "detection_ms": [k["detection_ms"] for k in crashes],
            "promotion_ms": [k["promotion_ms"] for k in crashes],
            "route_pushed_after_kill_ms": [k.get("route_pushed_after_kill_ms")
                                           for k in crashes],
            "first_ok_latency_ms": [k["first_ok_latency_ms"] for k in crashes],
            "late_replies_from_old_primary": sum(k["late_replies_from_old_primary"]
                                                 for k in crashes),
            "orch_new_primary_ms": spread([k["orch_new_primary_ms"] for k in crashes]),
            "child_restart_s": spread([k["restart_s"] for k in crashes]),
            "rejoin_in_sync_s": spread([k["rejoin_in_sync_s"] for k in crashes]),
            "failed_requests": errors_between(merged, *phases["crashes"]),
        },
        "pauses": {
            "epoch_before": epoch_before_pauses, "epoch_after": epoch_after_pauses,
            "failover_events": len(pause_failovers),
            "suspicion_events": len(pause_suspicions),
            "paused_ms_max": max((p["paused_ms"] for p in pauses), default=None),
            "client_gap_ms": spread(pause_gaps),
            "failed_requests": errors_between(merged, p0, p1),
        },
        "switchovers": {
            "ok": sum(1 for s in switchovers if s.get("ok")),
            "rpc_errors": [s["error"] for s in switchovers if not s.get("ok")],
            "stall_ms": stalls,
            "rpc_ms": [s["rpc_ms"] for s in switchovers],
            "client_latency_max_ms": [w["latency_max_ms"] for w in sw_windows],
            "client_gap_max_ms": [w["gap_max_ms"] for w in sw_windows],
            "failed_examples": [k for w in sw_windows for k in w["failed"]][:5],
            "failed_requests_whole_phase": errors_between(merged, *phases["switchovers"]),
        },
        "workload": {
            "requests": total, "acked": total_ok, "failed": total - total_ok,
            "ops_s": round(total_ok / run_s, 1) if run_s > 0 else None,
            "retries": sum(r["retries"] for r in results),
            "error_kinds": error_kinds,
            "error_examples": [x for r in results for x in r["error_examples"]][:5],
            "phase_s": {name: round(b - a, 1) for name, (a, b) in phases.items()},
        },
        "readback": {**back, "s": round(readback_s, 1)},
        "replicas": {
            "converged": converged_digest is not None,
            "digests_equal": len(digest_values) == 1,
            "applied_index": applied,
            "truncated_on_rejoin": truncated,
        },
        "history_kinds": kinds,
    })
    tls_pass = run_tls_pass(args) if not args.tls and args.tls_kills > 0 else None
    tls_unavail = tls_pass["unavailability_ms_p99"] if tls_pass is not None else None
    if tls_pass is not None:
        details["tls"] = {key: tls_pass.get(key) for key in (
            "kills", "unavailability_ms_p50", "unavailability_ms_p99",
            "unavailability_ms_max", "acked_writes_lost")}
        details["tls"]["unavailability_ms"] = tls_pass["details"]["kills"]["unavailability_ms"]
        details["tls"]["detection_ms"] = tls_pass["details"]["kills"]["detection_ms"]
        details["tls"]["failed_requests"] = tls_pass["details"]["kills"]["failed_requests"]
        details["tls"]["run_s"] = tls_pass["settings"]["run_s"]
    result = {
        "kills": len(kills),
        "unavailability_ms_p50": percentile(unavail, 50),
        "unavailability_ms_p99": percentile(unavail, 99),
        "unavailability_ms_max": unavail[-1] if unavail else None,
        "crashes": len(crashes),
        "crash_unavailability_ms_p50": percentile(crash_unavail, 50),
        "crash_unavailability_ms_p99": percentile(crash_unavail, 99),
        "crash_unavailability_ms_max": crash_unavail[-1] if crash_unavail else None,
        "acked_writes_lost": back["missing"] + back["wrong"],
        "false_failovers": max(epoch_after_pauses - epoch_before_pauses, len(pause_failovers)),
        "switchover_failed_requests": sw_failed,
        "switchover_stall_ms_max": max(stalls) if stalls else None,
        "tls_unavailability_ms_p99": tls_unavail,
        "settings": {
            "tls": "mutual TLS on every channel" if args.tls else
                   "off: every key above but tls_* is the plaintext pass",
            "tls_pass": (f"tls_unavailability_ms_p99: a second run with mutual TLS on a fresh "
                         f"cluster, {args.tls_kills} kills only (no pauses, switchovers)")
            if tls_pass is not None else None,
            "hosts": REPLICAS, "replicas": REPLICAS, "mode": "sync", "kind": "kv",
            "client_processes": args.client_procs, "tasks_per_process": args.tasks,
            "client_data_path": "unary Execute" if args.unary else "stream (ExecuteStream)",
            "request": f"kv put, unique keys, {VALUE_BYTES}-byte values",
            "call_deadline_ms": args.deadline_ms,
            "kills": args.kills, "kill_signal": "SIGKILL",
            "kill": "kills: SIGKILL of the agent's process group (supervisor and child); "
                    "crashes: SIGKILL of the agent's child alone, its supervisor alive",
            "crashes": args.crashes,
            "pauses": args.pauses, "pause_ms": args.pause_ms, "pause_gap_s": args.pause_gap,
            "switchovers": args.switchovers,
            "switchover_window": f"RPC start .. reply + {args.switchover_grace} s",
            "settle_s": args.settle, "jitter_s": args.jitter, "seed": args.seed,
            "heartbeat_ms": defaults.HEARTBEAT_MS,
            "failure_timeout_ms": defaults.FAILURE_TIMEOUT_MS,
            "lease_ms": defaults.LEASE_MS,
            "fsync_policy": "batch",
            "unavailability": "last ok completion before the kill -> first ok completion "
                              "after it answered by another host (client clock)",
            "cpus": os.cpu_count(),
            "load_avg_1m_at_start": load_at_start,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
            "run_s": round(time.monotonic() - began, 1),
        },
        "details": details,
    }
    print(json.dumps(result, separators=(",", ":")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=KILLS)
    parser.add_argument("--crashes", type=int, default=CRASHES,
                        help="SIGKILLs of the primary agent's child, its supervisor alive")
    parser.add_argument("--pauses", type=int, default=PAUSES)
    parser.add_argument("--pause-ms", type=int, default=PAUSE_MS)
    parser.add_argument("--pause-gap", type=float, default=PAUSE_GAP_S)
    parser.add_argument("--switchovers", type=int, default=SWITCHOVERS)
    parser.add_argument("--switchover-gap", type=float, default=SWITCHOVER_GAP_S)
    parser.add_argument("--switchover-grace", type=float, default=SWITCHOVER_GRACE_S)
    parser.add_argument("--settle", type=float, default=SETTLE_S)
    parser.add_argument("--jitter", type=float, default=JITTER_S)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--client-procs", type=int, default=CLIENT_PROCS)
    parser.add_argument("--tasks", type=int, default=TASKS,
                        help="in-flight requests per client process")
    parser.add_argument("--deadline-ms", type=int, default=CALL_DEADLINE_MS)
    parser.add_argument("--readback-procs", type=int, default=READBACK_PROCS)
    parser.add_argument("--readback-tasks", type=int, default=READBACK_TASKS)
    parser.add_argument("--unary", action="store_true",
                        help="the workload's clients call Execute per request (Client(stream="
                             "False)), not the stream data path")
    parser.add_argument("--root", help="keep the cluster's dirs and logs here (an empty dir)")
    parser.add_argument("--tls", action="store_true",
                        help="this run with mutual TLS on every channel (no second pass)")
    parser.add_argument("--tls-kills", type=int, default=TLS_KILLS,
                        help="kills of the second, TLS pass (0: no TLS pass)")
    parser.add_argument("--tls-ca", help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", help=argparse.SUPPRESS)
    parser.add_argument("--tls-key", help=argparse.SUPPRESS)
    # Client process arguments.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--readback", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--status-file", help=argparse.SUPPRESS)
    parser.add_argument("--stop-file", help=argparse.SUPPRESS)
    parser.add_argument("--keys-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.worker:
        print(json.dumps(asyncio.run(worker_main(ARGS)), separators=(",", ":")))
    elif ARGS.readback:
        print(json.dumps(asyncio.run(readback_main(ARGS)), separators=(",", ":")))
    else:
        main(ARGS)
