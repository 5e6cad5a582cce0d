"""A chaos run: a local cluster of real processes, a recorded workload, a seeded nemesis, and
the checkers' verdict on what the clients saw.

The workload's clients record every operation (invoke, ok, fail, unknown, with monotonic
times). The kv workers contend on a few hot keys: puts, gets, and cas that read the current
value first and swap it for a new unique value, with deadlines short enough that some
operations end unknown. The nemesis injects faults on its seeded schedule, waiting for the
cluster to heal after each; during every kill and switchover, and for a while after, extra
readers hammer the keys written last (a new or restarted primary must not serve stale
reads). At the end the cluster heals, every replica must converge, the final state is read,
and the history is checked (linearizability per kv key, bank totals and exactly-once, no
acknowledged write lost, one writer per epoch). The bank's opens and snapshots, the final
reads and the final epoch histories are recorded in the history too, so that
`failover.chaos.checkers.check_history` re-checks a saved history.jsonl with the same result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from failover import defaults, smalldisk
from failover.chaos.checkers import check_history, snapshots_from_ops
from failover.chaos.faults import FaultInjector, FaultRecord, now_ms
from failover.chaos.history import CHECKER_PROCESS, HistoryRecorder, Op, dump_ops
from failover.chaos.nemesis import schedule
from failover.client import Client
from failover.errors import (
    DiskFullError,
    FailoverError,
    InvalidRequest,
    Overloaded,
    RequestRejected,
    SessionExpired,
    Unavailable,
)
from failover.localcluster import LocalCluster
from failover.netns import unavailable_reason
from failover.percentile import percentile

KV_SERVICE = "chaos-kv"
BANK_SERVICE = "chaos-bank"
BANK_PROCESS_BASE = 100  # bank workers are processes 100, 101, ...
READER_PROCESS_BASE = 200  # the after-fault readers are processes 200, 201, ...
FINAL_READ_TIMEOUT_S = 30.0  # a final read or snapshot retried this long before the run fails
AFTER_FAULT_KINDS = ("kill", "crash", "switchover")  # faults that bring a new or restarted primary


@dataclass(frozen=True)
class ChaosConfig:
    """What a run does; `failoverctl chaos` builds it from its flags."""

    duration_s: float = 60.0
    seed: int = 1
    hosts: int = 3
    faults: tuple[str, ...] = ("kill", "pause")
    workload: str = "both"  # "kv", "bank" or "both"
    mode: str = "sync"
    report_dir: Path | None = None
    keys: int = defaults.CHAOS_KEYS  # kv keyspace shared by the workers: few, hot keys
    kv_workers: int = defaults.CHAOS_KV_WORKERS
    read_ratio: float = defaults.CHAOS_READ_RATIO  # plain gets among kv operations
    bank_workers: int = 3
    accounts: int = 8
    opening_balance: int = 1000
    op_deadline_ms: int = defaults.CHAOS_OP_DEADLINE_MS  # a kv request (then: unknown)
    bank_op_deadline_ms: int = defaults.CHAOS_BANK_OP_DEADLINE_MS
    after_fault_readers: int = defaults.CHAOS_AFTER_FAULT_READERS
    after_fault_read_ms: int = defaults.CHAOS_AFTER_FAULT_READ_MS
    # Several coordinators share an etcd store (issue 15); one runs on SQLite unless `store`
    # says etcd. `etcd_members` (1 or 3) run when the store is etcd.
    coordinators: int = 1
    store: str = "sqlite"
    etcd_members: int = 1
    # The workload's client calls on one ExecuteStream per primary (issue 16), or with
    # False one unary Execute per call.
    stream: bool = True

    def __post_init__(self) -> None:
        """Refuse settings that make no workload or no cluster (the CLI checks the same)."""
        if self.coordinators < 1 or self.store not in ("sqlite", "etcd") or \
                self.etcd_members not in (1, 3):
            raise ValueError("coordinators must be at least 1, store sqlite or etcd, and "
                             "etcd_members 1 or 3")
        if self.coordinators > 1 and self.store != "etcd":
            raise ValueError(f"{self.coordinators} coordinators share one store: use the "
                             "etcd store")
        if self.keys < 1 or self.kv_workers < 0 or self.after_fault_readers < 0:
            raise ValueError("keys must be at least 1, kv_workers and after_fault_readers "
                             "at least 0")
        if not 0.0 <= self.read_ratio <= 1.0:
            raise ValueError(f"read_ratio must be within [0, 1], not {self.read_ratio}")
        if self.op_deadline_ms <= 0 or self.bank_op_deadline_ms <= 0:
            raise ValueError("op deadlines must be positive")

    def settings(self) -> dict[str, Any]:
        """The settings recorded in the history's "run" record."""
        return {"seed": self.seed, "duration_s": self.duration_s, "hosts": self.hosts,
                "faults": list(self.faults), "workload": self.workload, "mode": self.mode,
                "keys": self.keys, "kv_workers": self.kv_workers,
                "read_ratio": self.read_ratio, "op_deadline_ms": self.op_deadline_ms,
                "bank_op_deadline_ms": self.bank_op_deadline_ms,
                "after_fault_readers": self.after_fault_readers,
                "coordinators": self.coordinators, "store": self.store,
                "etcd_members": self.etcd_members if self.store == "etcd" else 0,
                "client_path": "stream" if self.stream else "unary"}

    def services(self) -> list[str]:
        return ([KV_SERVICE] if self.workload in ("kv", "both") else []) + \
               ([BANK_SERVICE] if self.workload in ("bank", "both") else [])


@dataclass
class _Run:
    config: ChaosConfig
    recorder: HistoryRecorder = field(default_factory=HistoryRecorder)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    addresses: dict[str, str] = field(default_factory=dict)  # agent address -> host id
    # The keys of the last kv writes invoked, for the after-fault readers.
    recent_keys: deque[str] = field(
        default_factory=lambda: deque(maxlen=defaults.CHAOS_RECENT_KEYS_MAX))
    reads_until_ms: float = -math.inf  # the after-fault readers read until then
    reads_wake: asyncio.Event = field(default_factory=asyncio.Event)  # a burst began, or stop


async def _record(run: _Run, client: Client, process: int, service: str, kind: str,
                  key: str, request: dict[str, Any], args: dict[str, Any], *,
                  deadline_ms: int | None = None) -> Op:
    """Runs one operation and records its outcome: ok, fail (surely not applied), or
    unknown (may or may not have been applied). Returns the recorded op."""
    if deadline_ms is None:
        deadline_ms = (run.config.op_deadline_ms if service == KV_SERVICE
                       else run.config.bank_op_deadline_ms)
    handle = run.recorder.invoke(process, kind, key, args, now_ms(), service=service)
    try:
        out = await client.call_detailed(service, request, deadline_ms=deadline_ms)
    except SessionExpired:
        # A RequestRejected, but not a definite one: an earlier attempt may have applied.
        return run.recorder.complete(handle, now_ms(), "unknown")
    except (RequestRejected, InvalidRequest, DiskFullError, Overloaded):
        # DiskFullError, Overloaded: the client saw only such refusals, none ambiguous.
        return run.recorder.complete(handle, now_ms(), "fail")
    except (Unavailable, FailoverError):
        return run.recorder.complete(handle, now_ms(), "unknown")
    # A duplicate's entry was written by an earlier attempt's primary, not this one:
    # leave the writer blank so the one-writer-per-epoch check does not pair them.
    writer = "" if out.duplicate else run.addresses.get(out.address, "")
    return run.recorder.complete(handle, now_ms(), "ok", out.result, epoch=out.epoch,
                                 index=out.index, primary=writer)


async def _kv_worker(run: _Run, client: Client, process: int) -> None:
    """Puts, gets and cas on a few hot keys; every value written is unique ("p<process>-<n>"),
    which is what lets the checker decide each key's history exactly."""
    rnd = random.Random(run.config.seed * 1000 + process)
    n = 0
    while not run.stop.is_set():
        n += 1
        key = f"k{rnd.randrange(run.config.keys)}"
        value = f"p{process}-{n}"
        if rnd.random() < run.config.read_ratio:
            await _record(run, client, process, KV_SERVICE, "get", key,
                          {"op": "get", "key": key}, {})
            continue
        run.recent_keys.append(key)
        if rnd.random() < 0.5:
            await _record(run, client, process, KV_SERVICE, "put", key,
                          {"op": "put", "key": key, "value": value}, {"value": value})
            continue
        # A cas that swaps: read the current value, then replace exactly that value. Under
        # contention another write may land in between; the miss is judged too.
        seen = await _record(run, client, process, KV_SERVICE, "get", key,
                             {"op": "get", "key": key}, {})
        if seen.outcome != "ok" or seen.result is None or run.stop.is_set():
            continue
        expected = seen.result.get("value") if seen.result.get("found") else None
        await _record(run, client, process, KV_SERVICE, "cas", key,
                      {"op": "cas", "key": key, "expected": expected, "value": value},
                      {"expected": expected, "value": value})


async def _after_fault_reader(run: _Run, client: Client, process: int) -> None:
    """Gets of the keys written last, back to back, while a burst lasts (`_after_fault`):
    a new or restarted primary is read the moment it serves."""
    rnd = random.Random(run.config.seed * 1000 + process)
    while True:
        while now_ms() >= run.reads_until_ms and not run.stop.is_set():
            run.reads_wake.clear()
            await run.reads_wake.wait()
        if run.stop.is_set():
            return
        recent = list(run.recent_keys)
        key = rnd.choice(recent) if recent else f"k{rnd.randrange(run.config.keys)}"
        await _record(run, client, process, KV_SERVICE, "get", key,
                      {"op": "get", "key": key}, {})


async def _bank_worker(run: _Run, client: Client, process: int) -> None:
    rnd = random.Random(run.config.seed * 1000 + process)
    accounts = run.config.accounts
    while not run.stop.is_set():
        a, b = rnd.sample(range(accounts), 2)
        amount = rnd.randint(1, run.config.opening_balance // 2)
        args = {"from": f"a{a}", "to": f"a{b}", "amount": amount}
        await _record(run, client, process, BANK_SERVICE, "transfer", "",
                      {"op": "transfer", **args}, args)


async def _checker_call(run: _Run, client: Client, service: str, kind: str, key: str,
                        request: dict[str, Any], args: dict[str, Any]) -> Op:
    """One of the runner's own recorded requests (an open, a snapshot, a final read),
    retried until acknowledged; each attempt is in the history. Raises Unavailable when
    none was acknowledged within FINAL_READ_TIMEOUT_S, and whatever a refusal raises."""
    deadline = time.monotonic() + FINAL_READ_TIMEOUT_S
    while True:
        op = await _record(run, client, CHECKER_PROCESS, service, kind, key, request, args,
                           deadline_ms=defaults.CALL_DEADLINE_MS)
        if op.outcome == "ok":
            return op
        if op.outcome == "fail":
            raise RequestRejected(f"{service}: the runner's {kind} {key} was refused")
        if time.monotonic() > deadline:
            raise Unavailable(f"{service}: the runner's {kind} {key} was not acknowledged "
                              f"within {FINAL_READ_TIMEOUT_S:.0f} s")


async def _bank_snapshot(run: _Run, client: Client, label: str) -> None:
    """A consistent cut of every balance (one read), for the total/negative checks."""
    await _checker_call(run, client, BANK_SERVICE, "read_all", "", {"op": "read_all"},
                        {"snapshot": label})


def _meta(run: _Run, kind: str, service: str = "", args: dict[str, Any] | None = None,
          result: dict[str, Any] | None = None) -> None:
    """A record that is not a request (see history.META_KINDS)."""
    handle = run.recorder.invoke(CHECKER_PROCESS, kind, "", args or {}, now_ms(),
                                 service=service)
    run.recorder.complete(handle, now_ms(), "ok", result or {})


def _unavailability(ops: list[Op], records: list[FaultRecord],
                    primaries: dict[float, set[str]]) -> list[dict[str, Any]]:
    """For each fault that hit a primary: last ok before it to first ok after, per service
    (the client-visible gap)."""
    out = []
    for record in records:
        if record.skipped or record.fault.kind not in ("kill", "pause", "partition", "disk"):
            continue
        if record.host not in primaries.get(record.start_ms, set()):
            continue
        for service in {op.service for op in ops if op.process != CHECKER_PROCESS}:
            done = sorted(op.complete_ms for op in ops if op.service == service
                          and op.process != CHECKER_PROCESS
                          and op.outcome == "ok" and op.complete_ms is not None)
            before = [t for t in done if t <= record.start_ms]
            after = [t for t in done if t > record.start_ms]
            if before and after:
                out.append({"fault": record.fault.describe(), "host": record.host,
                            "service": service, "unavailability_ms": round(after[0] - before[-1])})
    return out


async def run_chaos(config: ChaosConfig, progress: Callable[[str], None] = print,
                    ) -> dict[str, Any]:
    """Runs one chaos run and returns its report (see `failoverctl chaos --help`)."""
    root = Path(tempfile.mkdtemp(prefix="failover-chaos-"))
    started = time.monotonic()
    run = _Run(config)
    services = config.services()
    replicas = min(3, config.hosts)
    if "migrate" in config.faults and replicas == config.hosts and replicas > 2:
        replicas -= 1  # a migration needs a host without a replica to move to
    progress(f"chaos: seed {config.seed}, {config.duration_s:.0f} s, {config.hosts} hosts, "
             f"faults {','.join(config.faults)}, workload {config.workload}, {config.mode} mode")
    partition_unavailable = ""
    if "partition" in config.faults:
        partition_unavailable = unavailable_reason() or ""
        if partition_unavailable:
            progress(f"chaos: partitions skipped: {partition_unavailable}")
    disk_unavailable = ""
    if "disk" in config.faults:
        disk_unavailable = smalldisk.unavailable_reason() or ""
        if disk_unavailable:
            progress(f"chaos: full disks skipped: {disk_unavailable}")
    try:
        with LocalCluster(root, hosts=config.hosts, coordinator=True,
                          netns="partition" in config.faults and not partition_unavailable,
                          disk_bytes=defaults.CHAOS_DISK_BYTES if "disk" in config.faults
                          and not disk_unavailable else 0,
                          coordinators=config.coordinators, store=config.store,
                          etcd_members=config.etcd_members) as cluster:
            await asyncio.to_thread(cluster.start)
            tls = cluster.tls
            progress(f"chaos: cluster up, {'mutual TLS on every channel' if tls else 'no TLS'}")
            for service in services:
                kind = "kv" if service == KV_SERVICE else "bank"
                await asyncio.to_thread(cluster.create, service, kind, replicas, config.mode)
            run.addresses = {a.address: a.host_id for a in cluster}
            injector = FaultInjector(cluster, services)
            injector.partition_unavailable = partition_unavailable
            injector.disk_unavailable = disk_unavailable
            assert cluster.coordinator is not None
            async with Client(coordinator=cluster.coordinator_addresses,
                              tls=cluster.tls_client, stream=config.stream) as client:
                _meta(run, "run", args=config.settings())
                if BANK_SERVICE in services:
                    for n in range(config.accounts):
                        args = {"account": f"a{n}", "balance": config.opening_balance}
                        await _checker_call(run, client, BANK_SERVICE, "open", "",
                                            {"op": "open", **args}, args)
                    await _bank_snapshot(run, client, "start")
                workers = [asyncio.create_task(_kv_worker(run, client, p))
                           for p in range(config.kv_workers) if KV_SERVICE in services]
                workers += [asyncio.create_task(_bank_worker(run, client, BANK_PROCESS_BASE + p))
                            for p in range(config.bank_workers) if BANK_SERVICE in services]
                workers += [asyncio.create_task(
                                _after_fault_reader(run, client, READER_PROCESS_BASE + p))
                            for p in range(config.after_fault_readers)
                            if KV_SERVICE in services]
                records, primaries = await _nemesis(run, injector, client, cluster, progress)
                run.stop.set()
                run.reads_wake.set()
                await asyncio.gather(*workers)
                progress("chaos: workload stopped; healing and checking")
                await asyncio.to_thread(injector.wait_healed)
                for service in services:
                    hosts = [h for h in cluster.agents
                             if cluster[h].replica(service) is not None]
                    await asyncio.to_thread(cluster.wait_converged, service, hosts, 60)
                final_histories: dict[str, list[tuple[int, int]]] = {}
                for service in services:
                    primary = cluster.primary_of(service)
                    assert primary is not None
                    reply = cluster[primary].digest(service)
                    final_histories[service] = [(h.epoch, h.first_index)
                                                for h in reply.epoch_history]
                    _meta(run, "epoch_history", service,
                          result={"epoch_history": [list(h) for h in final_histories[service]]})
                if KV_SERVICE in services:
                    for n in range(config.keys):
                        key = f"k{n}"
                        await _checker_call(run, client, KV_SERVICE, "get", key,
                                            {"op": "get", "key": key}, {"final": True})
                if BANK_SERVICE in services:
                    await _bank_snapshot(run, client, "end")
            history = cluster.coordinator.history()
    except BaseException:
        progress(f"chaos: the run itself failed; logs kept in {root}")
        raise
    ops = run.recorder.ops()
    # Judged from the history alone, exactly as `failoverctl chaos check` re-judges it.
    result = check_history(ops)
    gaps = _unavailability(ops, records, primaries)
    gap_ms = sorted(g["unavailability_ms"] for g in gaps)
    failovers = [e for e in history if e.kind == "failover"]
    faults_by_kind: dict[str, int] = {}
    for record in records:
        if not record.skipped:
            faults_by_kind[record.fault.kind] = faults_by_kind.get(record.fault.kind, 0) + 1
    report: dict[str, Any] = {
        "seed": config.seed, "duration_s": config.duration_s, "hosts": config.hosts,
        "mode": config.mode, "workload": config.workload, "tls": tls,
        "ops_ok": sum(op.outcome == "ok" for op in ops),
        "ops_failed": sum(op.outcome == "fail" for op in ops),
        "ops_unknown": sum(op.outcome == "unknown" for op in ops),
        "faults": faults_by_kind,
        "faults_skipped": dict(injector.skipped_kinds),
        "failovers": len(failovers),
        "failover_details": [msgpack.unpackb(e.details, raw=False) for e in failovers],
        "unavailability_ms": [g["unavailability_ms"] for g in gaps],
        "unavailability_ms_p50": percentile(gap_ms, 50) or 0,
        "unavailability_ms_p99": percentile(gap_ms, 99) or 0,
        "unavailability_ms_max": max((g["unavailability_ms"] for g in gaps), default=0),
        "lost_acked_writes": result["lost_acked_writes"],
        "linearizable": result["linearizable"],
        "bank_invariant": result["bank_invariant"],
        "exactly_once": result["exactly_once"],
        "violations": result["violations"],
        "passed": result["passed"] is True,
        "keys_unknown": result.get("keys_unknown", []),
        "keys_unknown_why": result.get("keys_unknown_why", {}),
        "keys_checked": result.get("keys_checked", 0),
        "keys_decided": result.get("keys_decided", 0),
        "keys": config.keys, "kv_workers": config.kv_workers, "read_ratio": config.read_ratio,
        "op_deadline_ms": config.op_deadline_ms,
        "after_fault_reads": sum(op.process >= READER_PROCESS_BASE for op in ops),
        "final_histories": final_histories,
        "coordinators": config.coordinators, "store": config.store,
        # Per kill of the leading coordinator: ms until another led (None: none did).
        "coordinator_takeover_ms": [r.detail.get("takeover_ms") for r in records
                                    if r.fault.kind == "coordinator" and not r.skipped
                                    and config.coordinators > 1],
        "seconds": round(time.monotonic() - started, 1),
    }
    if config.report_dir is not None:
        _write_report_dir(config.report_dir, report, ops, records, run)
        report["report_dir"] = str(config.report_dir)
    shutil.rmtree(root, ignore_errors=True)
    return report


async def _nemesis(run: _Run, injector: FaultInjector, client: Client, cluster: LocalCluster,
                   progress: Callable[[str], None],
                   ) -> tuple[list[FaultRecord], dict[float, set[str]]]:
    config = run.config
    start = time.monotonic()
    records: list[FaultRecord] = []
    primaries: dict[float, set[str]] = {}  # fault start -> primaries at that moment
    for fault in schedule(config.seed, config.duration_s, config.faults):
        wait = start + fault.at_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if time.monotonic() - start > config.duration_s - 1:
            break  # healing took the time this fault was scheduled in
        before = set(await asyncio.to_thread(injector.hosts_with, "primary"))
        with _after_fault(run, fault.kind):
            record = await injector.run(fault)
        primaries[record.start_ms] = before
        records.append(record)
        if record.skipped:
            progress(f"chaos: {fault.describe()}: skipped ({record.skipped})")
            continue
        takeover = record.detail.get("takeover_ms")
        progress(f"chaos: {fault.describe()} on {record.host} "
                 + (f"(another led {takeover:.0f} ms after, " if takeover is not None else "(")
                 + f"healed {record.healed_ms - record.start_ms:.0f} ms after)")
        if BANK_SERVICE in config.services():
            await _bank_snapshot(run, client, f"after {fault.describe()} on {record.host}")
    remaining = start + config.duration_s - time.monotonic()
    if remaining > 0:
        await asyncio.sleep(remaining)
    return records, primaries


@contextlib.contextmanager
def _after_fault(run: _Run, kind: str) -> Iterator[None]:
    """For a kill or switchover: the after-fault readers hammer the keys written last from
    the moment the fault starts until `after_fault_read_ms` after the body (the fault and
    its healing) ended. The nemesis goes on meanwhile."""
    if kind not in AFTER_FAULT_KINDS:
        yield
        return
    run.reads_until_ms = math.inf
    run.reads_wake.set()
    try:
        yield
    finally:
        run.reads_until_ms = now_ms() + run.config.after_fault_read_ms


def _write_report_dir(directory: Path, report: dict[str, Any], ops: list[Op],
                      records: list[FaultRecord], run: _Run) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (directory / "history.jsonl").write_text(dump_ops(ops))
    (directory / "faults.json").write_text(
        json.dumps([r.to_dict() for r in records], indent=2, default=str))
    (directory / "bank_snapshots.json").write_text(
        json.dumps(snapshots_from_ops(ops), indent=2))
    try:
        _timeline_png(directory / "timeline.png", ops, records)
    except ImportError:
        report["timeline"] = "not drawn: pip install 'failover[chaos]' for matplotlib"


def _timeline_png(path: Path, ops: list[Op], records: list[FaultRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [op for op in ops if op.outcome == "ok" and op.complete_ms is not None]
    if not done:
        return
    t0 = min(op.invoke_ms for op in ops)
    seconds = [((op.complete_ms or 0) - t0) / 1000 for op in done]
    latency = [((op.complete_ms or 0) - op.invoke_ms) for op in done]
    width = max(1, int(max(seconds)) + 1)
    per_second = [0] * (width * 10)
    for s in seconds:
        per_second[min(len(per_second) - 1, int(s * 10))] += 10
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    ax1.plot([i / 10 for i in range(len(per_second))], per_second, lw=0.8)
    ax1.set_ylabel("ok ops/s")
    ax2.scatter(seconds, latency, s=1, alpha=0.4)
    ax2.set_ylabel("latency ms")
    ax2.set_yscale("log")
    ax2.set_xlabel("seconds")
    unknown = [(op.invoke_ms - t0) / 1000 for op in ops if op.outcome == "unknown"]
    ax2.scatter(unknown, [max(latency)] * len(unknown), s=8, marker="x", color="red",
                label="unknown outcome")
    for record in records:
        if record.skipped:
            continue
        x0 = (record.start_ms - t0) / 1000
        x1 = ((record.end_ms or record.start_ms) - t0) / 1000
        for ax in (ax1, ax2):
            ax.axvspan(x0, max(x1, x0 + 0.05), color="orange", alpha=0.3)
        ax1.text(x0, max(per_second) * 0.95, f"{record.fault.kind}\n{record.host}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

