"""Coordinator HA (issue 15) on real processes; prints one JSON line.

Two clusters at once, each of three agents and a ``kv`` service with three replicas in sync
mode, each with a client writing all along (TASKS asyncio tasks of kv puts of unique keys
through one ``failover.client.Client`` that knows every coordinator), recording per request
its monotonic end, whether it succeeded and which address answered:

* ``etcd``: one etcd member (`failover.etcd_local.EtcdCluster`) and three coordinators on it
  (``LocalCluster(coordinators=3, store="etcd")``, the default leader TTL);
* ``sqlite``: one coordinator on its SQLite store (as before issue 15).

First LEADER_KILLS times on the etcd cluster: SIGKILL the leading coordinator, time until
another one says it leads (``coordinator_takeover_ms``: the kill to the first poll, every
POLL_MS, at which a follower's own status names it leader), run the killed one again, settle
(with a seeded jitter). ``failed_requests`` counts the client requests that failed over that
phase.

Then PRIMARY_KILLS times per cluster, alternating between them (so that whatever else loads
the machine weighs on both alike): SIGKILL the primary's agent, wait until another host
serves the client, restart it; the next kill waits until the replica set is whole. The
unavailability of a kill is what benchmarks/failover.py measures: the first successful
completion after the kill that another host served, minus the last successful completion
before the kill; ``unavailability_ms_p99_etcd`` beside ``unavailability_ms_p99_sqlite``, and
their ratio. ``etcd_writes_per_failover``: the etcd writes (revisions: one per transaction)
to the cluster's state and history from just before the kill until the new primary serves,
replayed by an etcd watch (the coordinators' own membership refreshes left out), median.

Run: ``.venv/bin/python benchmarks/coordinator_ha.py`` (progress on stderr, JSON on stdout).
``--root DIR`` keeps the clusters' data dirs and logs there (otherwise a temporary dir).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from failover import defaults  # noqa: E402
from failover.client import Client  # noqa: E402
from failover.errors import FailoverError  # noqa: E402
from failover.localcluster import LocalCluster, wait_for  # noqa: E402
from failover.percentile import percentile  # noqa: E402
from failover.v1 import common_pb2  # noqa: E402

SERVICE = "kv"
TASKS = 8
VALUE_BYTES = 100
DEADLINE_MS = 5000
LEADER_KILLS = 10
PRIMARY_KILLS = 10
SETTLE_S = 1.0
JITTER_S = 0.5
POLL_MS = 20
WAIT_S = 60.0
TAKEOVER_WAIT_S = 15.0


def progress(message: str) -> None:
    print(f"[coordinator_ha] {message}", file=sys.stderr, flush=True)


@dataclass
class Load:
    """Writers of unique keys; every request's end, outcome and answering address."""

    client: Client
    ends: list[float] = field(default_factory=list)  # ok completions, in order
    rows: list[tuple[float, str]] = field(default_factory=list)  # (ok end, address)
    failures: list[tuple[float, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self, name: str) -> None:
        value = "x" * VALUE_BYTES
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                result = await self.client.call_detailed(
                    SERVICE, {"op": "put", "key": f"{name}-{i}", "value": value})
            except FailoverError as exc:
                self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
                continue
            now = time.monotonic()
            self.ends.append(now)
            self.rows.append((now, result.address))

    def served_by_other_since(self, t: float, address: str) -> float | None:
        i = bisect.bisect_right(self.ends, t)
        return next((end for end, by in self.rows[i:] if by != address), None)

    def unavailability_ms(self, t_kill: float, address: str) -> float | None:
        i = bisect.bisect_right(self.ends, t_kill)
        if i == 0:
            return None
        first = self.served_by_other_since(t_kill, address)
        return round((first - self.ends[i - 1]) * 1000, 1) if first is not None else None

    def failures_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t, _why in self.failures)


async def poll(condition: Any, timeout_s: float, what: str) -> Any:
    return await asyncio.to_thread(wait_for, condition, timeout_s, what, POLL_MS / 1000)


def whole(cluster: LocalCluster) -> str | None:
    """The serving primary once every agent is up and both duplicas are in sync."""
    view = next(s for s in cluster.lead().status().services if s.name == SERVICE)
    duplicas = [r for r in view.replicas if r.role == common_pb2.ROLE_DUPLICA]
    if len(duplicas) != 2 or not all(r.in_sync for r in duplicas):
        return None
    if not all(a.alive for a in cluster):
        return None
    return cluster.primary_of(SERVICE)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def etcd_revision(cluster: LocalCluster) -> int:
    """etcd's current revision, through its JSON gateway (one range read of no key)."""
    member = next(m for m in cluster.etcd.members if m.alive)
    body = json.dumps({"key": _b64(b"\0")}).encode()
    request = urllib.request.Request(f"{member.client_url}/v3/kv/range", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return int(json.loads(reply.read())["header"]["revision"])


def etcd_state_writes(cluster: LocalCluster, after: int, upto: int) -> int:
    """The etcd writes (revisions) in (after, upto] that touched the cluster's state or
    history, replayed by a watch from `after + 1`: a coordinator's membership refresh (its
    ``members/`` key) is not a write of the failover."""
    member = next(m for m in cluster.etcd.members if m.alive)
    body = json.dumps({"create_request": {
        "key": _b64(b"/failover/"), "range_end": _b64(b"/failover0"),
        "start_revision": after + 1}}).encode()
    request = urllib.request.Request(f"{member.client_url}/v3/watch", data=body,
                                     headers={"Content-Type": "application/json"})
    revisions: set[int] = set()
    seen = after
    with urllib.request.urlopen(request, timeout=10) as stream:
        while seen < upto:
            line = stream.readline()
            if not line:
                break
            for event in json.loads(line).get("result", {}).get("events", []):
                revision = int(event["kv"]["mod_revision"])
                seen = max(seen, revision)
                key = base64.b64decode(event["kv"]["key"]).decode(errors="replace")
                if revision <= upto and "/members/" not in key:
                    revisions.add(revision)
    return len(revisions)


async def settle(rng: random.Random) -> None:
    await asyncio.sleep(SETTLE_S + rng.uniform(0, JITTER_S))


async def leader_kills(cluster: LocalCluster, load: Load, rng: random.Random,
                       kills: int) -> dict[str, Any]:
    takeovers: list[float] = []
    start = time.monotonic()
    for n in range(kills):
        old = await asyncio.to_thread(cluster.leader, WAIT_S)
        t_kill = time.monotonic()
        old.kill()

        def led(old: Any = old) -> bool:
            process = cluster.find_leader(timeout_s=0.5)
            return process is not None and process is not old and process.leads(0.5)

        await poll(led, TAKEOVER_WAIT_S, "a follower to lead")
        takeovers.append(round((time.monotonic() - t_kill) * 1000, 1))
        progress(f"leader kill {n + 1}/{kills}: {old.name} killed, a follower led after "
                 f"{takeovers[-1]} ms")
        await asyncio.to_thread(old.start)
        await settle(rng)
    return {"takeover_ms": takeovers,
            "failed_requests": load.failures_between(start, time.monotonic())}


async def primary_kill(cluster: LocalCluster, load: Load, label: str,
                       out: dict[str, list[Any]]) -> None:
    """Kills the primary's agent, waits until another host serves the client and the new
    primary serves, records the unavailability (and the etcd writes), restarts the agent."""
    primary = await poll(lambda: whole(cluster), WAIT_S, "the replica set to be whole")
    address = cluster[primary].address
    revision = etcd_revision(cluster) if cluster.etcd is not None else 0
    t_kill = time.monotonic()
    cluster[primary].kill()
    await poll(lambda: load.served_by_other_since(t_kill, address), WAIT_S,
               f"the client to be served after killing {primary}")
    await poll(lambda: (p := cluster.primary_of(SERVICE)) and p != primary, WAIT_S,
               "the new primary to serve")
    writes = ""
    if cluster.etcd is not None:
        out["etcd_writes"].append(etcd_state_writes(cluster, revision, etcd_revision(cluster)))
        writes = f", {out['etcd_writes'][-1]} etcd writes"
    value = load.unavailability_ms(t_kill, address)
    if value is not None:
        out["unavailability_ms"].append(value)
    progress(f"{label} primary kill {len(out['unavailability_ms'])}: {primary}, unavailable "
             f"{value} ms{writes}")
    await asyncio.to_thread(cluster[primary].start)


@contextlib.asynccontextmanager
async def loaded_cluster(root: Path, store: str) -> AsyncIterator[tuple[LocalCluster, Load]]:
    """A cluster (three coordinators on etcd, or one on SQLite) with the kv service and a
    client writing to it until the block ends."""
    etcd = store == "etcd"
    with LocalCluster(root, hosts=3, coordinators=3 if etcd else 1, store=store,
                      coordinator=True) as cluster:
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(cluster.create, SERVICE, "kv", 3)
        async with Client(coordinator=cluster.coordinator_addresses, tls=cluster.tls_client,
                          deadline_ms=DEADLINE_MS) as client:
            load = Load(client)
            tasks = [asyncio.create_task(load.writer(f"{store}-w{t}")) for t in range(TASKS)]
            try:
                await poll(lambda: len(load.ends) > 100, WAIT_S, "writes to flow")
                yield cluster, load
            finally:
                load.stop.set()
                await asyncio.gather(*tasks)


async def main(args: argparse.Namespace) -> None:
    from failover.etcd_local import ensure_etcd

    found = ensure_etcd()
    if isinstance(found, str):
        raise SystemExit(f"coordinator_ha: no etcd to run: {found}")
    began = time.monotonic()
    rng = random.Random(args.seed)
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="coordinator-ha-"))
    progress(f"clusters under {root}")
    # Both clusters run (and are written to) at once, and their primary kills alternate: the
    # machine's load, whatever else runs on it, weighs on both stores' failovers alike.
    async with loaded_cluster(root / "etcd", "etcd") as (etcd, etcd_load), \
            loaded_cluster(root / "sqlite", "sqlite") as (sqlite, sqlite_load):
        leader = await leader_kills(etcd, etcd_load, rng, args.leader_kills)
        kills: dict[str, dict[str, list[Any]]] = {
            store: {"unavailability_ms": [], "etcd_writes": []} for store in ("etcd", "sqlite")}
        primary_start = time.monotonic()
        for _n in range(args.primary_kills):
            for store, cluster, load in (("etcd", etcd, etcd_load),
                                         ("sqlite", sqlite, sqlite_load)):
                await primary_kill(cluster, load, store, kills[store])
                await settle(rng)
        primary_end = time.monotonic()
    takeovers = sorted(leader["takeover_ms"])
    unavail_etcd = sorted(kills["etcd"]["unavailability_ms"])
    unavail_sqlite = sorted(kills["sqlite"]["unavailability_ms"])
    p99_etcd = percentile(unavail_etcd, 99)
    p99_sqlite = percentile(unavail_sqlite, 99)
    writes = sorted(kills["etcd"]["etcd_writes"])
    result = {
        "coordinator_takeover_ms_p50": percentile(takeovers, 50),
        "coordinator_takeover_ms_p99": percentile(takeovers, 99),
        "failed_requests": leader["failed_requests"],
        "etcd_writes_per_failover": percentile(writes, 50),
        "unavailability_ms_p99_etcd": p99_etcd,
        "unavailability_ms_p99_sqlite": p99_sqlite,
        "unavailability_p99_ratio_etcd_to_sqlite": round(p99_etcd / p99_sqlite, 3)
        if p99_etcd and p99_sqlite else None,
        "targets": {"coordinator_takeover_ms_p99": "<= 3000", "failed_requests": 0,
                    "unavailability_p99_ratio_etcd_to_sqlite": "<= 1.2"},
        "settings": {
            "leader_kills": args.leader_kills, "primary_kills_per_store": args.primary_kills,
            "coordinators": 3, "etcd_members": 1, "leader_ttl_ms": defaults.LEADER_TTL_MS,
            "takeover_grace_ms": defaults.COORDINATOR_TAKEOVER_GRACE_MS,
            "hosts": 3, "replicas": 3, "mode": "sync", "kind": SERVICE,
            "client_tasks": TASKS, "request": f"kv put, unique keys, {VALUE_BYTES}-byte values",
            "call_deadline_ms": DEADLINE_MS, "kill_signal": "SIGKILL", "poll_ms": POLL_MS,
            "takeover": "leader SIGKILL -> first poll at which a follower's own status says "
                        "it leads",
            "failed_requests": "client requests failed during the leader kills",
            "etcd_writes_per_failover": "etcd transactions on state and history keys from "
                                        "just before a primary kill to the new primary "
                                        "serving (median)",
            "unavailability": "last ok completion before the kill -> first ok completion "
                              "after it answered by another host (client clock); both "
                              "clusters run at once, their kills alternate",
            "settle_s": SETTLE_S, "jitter_s": JITTER_S, "seed": args.seed,
            "tls": "mutual TLS on every channel (LocalCluster's default)",
            "cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 1),
            "run_s": round(time.monotonic() - began, 1),
        },
        "details": {
            "takeover_ms": takeovers, "unavailability_ms_etcd": unavail_etcd,
            "unavailability_ms_sqlite": unavail_sqlite, "etcd_writes": writes,
            "failed_requests_primary_kills_etcd":
                etcd_load.failures_between(primary_start, primary_end),
            "failed_requests_primary_kills_sqlite":
                sqlite_load.failures_between(primary_start, primary_end),
            "requests_ok_etcd": len(etcd_load.ends), "requests_ok_sqlite": len(sqlite_load.ends),
            "failures_sample": [why for _t, why in (etcd_load.failures
                                                     + sqlite_load.failures)[:5]],
        },
    }
    print(json.dumps(result, separators=(",", ":")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leader-kills", type=int, default=LEADER_KILLS)
    parser.add_argument("--primary-kills", type=int, default=PRIMARY_KILLS)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--root", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
