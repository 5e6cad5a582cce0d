"""The coordinator's policy at scale: the pure `CoordinatorCore` driven in-process (no gRPC,
no store), at 10 / 200, 100 / 2,000 and 500 / 10,000 hosts / services; prints one JSON line
(progress on stderr).

Each size runs in a subprocess of its own. The services (2 or 3 replicas, sync) are placed by
the core's own placement (`create_service`, worst-fit over small declared needs); their
records are then packed as the store would hold them, and the measured core is `restore`d
from them, so the baseline (the code before issue 14, `--base`) runs on exactly the same
cluster. Fake agents take every `AssignRole` and heartbeat every replica they hold, with its
role, epoch and indexes (a primary also its in-sync set and generation); indexes grow by one
per round.

* ``heartbeat_round_cpu_ms``: CPU time (process time) of one heartbeat from every host, in
  steady state (every duplica in sync and promotable); the reports are built beforehand.
* ``host_death_decide_ms``: CPU time to decide the death of the host holding the most
  primaries, once it has been silent a failure timeout: the tick that suspects it, the
  duplicas' answers to `AskHearsPrimary` (one call with all of them where the core has
  `hears_primary_many`, else one call per service), and the tick after the next heartbeat
  round, and the tick that places the replacements of the deposed primaries,
  `rebuild_calm_ms` after the promotions (the hosts beat in between, uncounted, as in steady
  state). Of the heartbeat round after the answers, what it costs beyond a steady round
  (`heartbeat_round_cpu_ms`) counts: its
  primaries take the dead host's duplicas out of their in-sync sets. The core has placed a
  replica before (`spare_host`), as one that has been running has: what it keeps of each
  host's load for placement is warm.
* ``store_commits_per_host_death``: the `Persist` actions of those three calls, and of that
  heartbeat round (merged into one, as the server commits a round).
* ``routes_entries_pushed_per_host_death``: the route entries the `PushRoutes` of them send a
  watcher (the changed and deleted services; the whole table only for a first push).
* ``primaries_per_host_max``: the most primaries one host holds after placement.
* ``core_state_mb``: the core's memory in steady state (a deep size of its objects).
* ``create_service_ms``: CPU time per `create_service` while the cluster is filled (not for
  the baseline, whose cluster comes from the same records).

Run: ``.venv/bin/python benchmarks/scale.py`` (``--sizes 10/200,100/2000`` to choose;
``--base COMMIT`` also measures that commit's code from a git worktree, which is what the
ratios under ``baseline`` compare with; ``--no-base`` skips it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = "10/200,100/2000,500/10000"
# The last commit before issue 14's work on the core (items 1, 3 and 6).
DEFAULT_BASE = "810799c"
GIB = 1 << 30
METRICS = {"cpu_count": 64.0, "memory_total_bytes": float(512 * GIB),
           "disk_free_bytes": float(4096 * GIB), "disk_total_bytes": float(4096 * GIB),
           "cpu_percent": 5.0, "memory_percent": 5.0}
KEYS = ("heartbeat_round_cpu_ms", "host_death_decide_ms", "store_commits_per_host_death",
        "routes_entries_pushed_per_host_death", "primaries_per_host_max", "core_state_mb")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the worker: one size, one code root ------------------------------------------------------


class Agents:
    """Fake agents: what each host was last assigned, and the indexes of each service."""

    def __init__(self, c: Any) -> None:
        self.c = c
        # host -> service -> (role, epoch, in_sync, generation)
        self.held: dict[str, dict[str, tuple[str, int, tuple[str, ...], int]]] = {}
        self.index: dict[str, int] = {}
        self.up: set[str] = set()

    def run(self, actions: list[Any]) -> list[Any]:
        for a in actions:
            if isinstance(a, self.c.AssignRole) and a.host_id in self.up:
                self.held.setdefault(a.host_id, {})[a.service] = (
                    a.role, a.epoch, a.in_sync, a.in_sync_generation)
            elif isinstance(a, self.c.DropReplica) and a.host_id in self.up:
                self.held.get(a.host_id, {}).pop(a.service, None)
        return actions

    def reports(self, host: str) -> list[Any]:
        c = self.c
        out = []
        for svc, (role, epoch, in_sync, generation) in sorted(self.held.get(host, {}).items()):
            idx = self.index.get(svc, 0)
            primary = role == c.PRIMARY
            out.append(c.ReplicaReport(svc, role, epoch, idx, idx if primary else 0, idx,
                                       matched_index=idx,
                                       in_sync=in_sync if primary else None,
                                       in_sync_generation=generation if primary else 0,
                                       in_sync_lag_ms={} if primary else None))
        return out


def deep_size(root: Any) -> int:
    """Bytes of every object reachable from `root` (containers, records, scalars), each once;
    classes, functions and modules are not followed."""
    import types

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
            types.MethodType)
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def build_state(c: Any, hosts: int, services: int, seed: int) -> tuple[dict[str, bytes], float]:
    """Fills a core by `create_service` and returns its records as the store holds them, and
    the CPU ms per create_service."""
    from failover.core.coordinator.model import HOST_PREFIX, SERVICE_PREFIX, pack
    from failover.core.placement import Resources

    rng = random.Random(seed)
    core = c.CoordinatorCore()
    for i in range(hosts):
        h = f"h{i:04d}"
        core.register(c.HostInfo(h, f"{h}:1"), 0, dict(METRICS))
    needs = Resources(0.05, 64 << 20, 256 << 20)
    started = time.process_time()
    for i in range(services):
        core.create_service(f"s{i:05d}", "kv", rng.choice((2, 3)), "sync", 0, needs)
    per_ms = (time.process_time() - started) * 1000 / services
    state = {HOST_PREFIX + h: pack(info) for h, info in core.hosts.items()}
    state.update({SERVICE_PREFIX + n: pack(s) for n, s in core.services.items()})
    return state, per_ms


def fit_records(c: Any, state: dict[str, bytes]) -> dict[str, bytes]:
    """The records as the measured code's own records take them: the baseline predates
    fields added since (a host's `incarnation`, issue 16), which it never had, and its
    restore refused them (the benchmark stopped completing). Only unknown fields go."""
    import dataclasses

    import msgpack

    from failover.core.coordinator.model import HOST_PREFIX, SERVICE_PREFIX

    known = {HOST_PREFIX: {f.name for f in dataclasses.fields(c.HostInfo)},
             SERVICE_PREFIX: {f.name for f in dataclasses.fields(c.ServiceInfo)}}
    fitted = {}
    for key, raw in state.items():
        names = next((v for prefix, v in known.items() if key.startswith(prefix)), None)
        if names is not None:
            record = msgpack.unpackb(raw, raw=False)
            raw = msgpack.packb({k: v for k, v in record.items() if k in names},
                                use_bin_type=True)
        fitted[key] = raw
    return fitted


def measure(c: Any, state: dict[str, bytes]) -> dict[str, Any]:
    core = c.CoordinatorCore()
    agents = Agents(c)
    agents.up = {k.split("/", 1)[1] for k in state if k.startswith("host/")}
    now = 1_000
    agents.run(core.restore(fit_records(c, state), now))
    hosts = sorted(agents.up)

    def round_of_heartbeats(timed: bool, decided: list[Any] | None = None) -> float:
        for svc in core.services:
            agents.index[svc] = agents.index.get(svc, 0) + 1
        reports = {h: agents.reports(h) for h in sorted(agents.up)}
        spent = 0.0
        for h in sorted(agents.up):
            started = time.process_time()
            _, actions = core.heartbeat(h, dict(METRICS), reports[h], now)
            spent += time.process_time() - started
            if decided is not None:
                decided.extend(actions)
            agents.run(actions)
        return spent * 1000

    hb = core.timing.heartbeat_ms
    for _ in range(3):  # in sync, then counted, then promotable
        now += hb
        round_of_heartbeats(False)
        agents.run(core.tick(now))
    not_ready = [s.name for s in core.services.values()
                 if len(s.promotable) != len(s.replicas) - 1]
    assert not not_ready, f"{len(not_ready)} services not yet promotable: {not_ready[:3]}"
    # A coordinator that has been running has placed replicas before (what it keeps for
    # placement is warm); this one was just restored.
    core.spare_host(next(iter(core.services)))
    rounds = []
    for _ in range(2 if len(core.services) >= 5000 else 5):
        now += hb
        rounds.append(round_of_heartbeats(True))
        agents.run(core.tick(now))
    heartbeat_ms = sorted(rounds)[len(rounds) // 2]
    gc.collect()
    state_mb = deep_size(core) / 1e6

    primaries: dict[str, int] = {}
    for s in core.services.values():
        primaries[s.primary] = primaries.get(s.primary, 0) + 1
    victim = max(hosts, key=lambda h: (primaries.get(h, 0), h))
    agents.up.discard(victim)
    # The victim is silent from here; the others beat until it is suspected.
    silent_from = now
    while now <= silent_from + core.timing.failure_timeout_ms - hb:
        now += hb
        round_of_heartbeats(False)
        agents.run(core.tick(now))
    now = silent_from + core.timing.failure_timeout_ms + 1
    decided: list[Any] = []
    parts: list[float] = []
    started = time.process_time()
    actions = core.tick(now)
    parts.append(time.process_time() - started)
    decided.extend(agents.run(actions))
    asks = [a for a in actions if isinstance(a, c.AskHearsPrimary)]
    answers = {a.service: [c.HearsAnswer(h, h in agents.up, False,
                                         agents.index.get(a.service, 0), a.epoch)
                           for h in a.hosts] for a in asks}
    started = time.process_time()
    if hasattr(core, "hears_primary_many"):
        actions = core.hears_primary_many(answers, now)
    else:
        actions = [x for svc, ans in answers.items()
                   for x in core.hears_primary(svc, ans, now)]
    parts.append(time.process_time() - started)
    decided.extend(agents.run(actions))
    now += 1
    # The round of beats in between: the primaries that beat take the dead host's duplicas
    # out of their in-sync sets (`_shrink_silent_members`), one commit for the round (the
    # server merges a round's). Its CPU beyond a steady round's is part of the decision.
    beats: list[Any] = []
    round_ms = round_of_heartbeats(False, beats)
    parts.append(max(0.0, round_ms - heartbeat_ms) / 1000)
    try:
        from failover.core.coordinator.actions import merge_persists
        decided.extend(merge_persists(beats))
    except ImportError:  # a baseline whose server committed each beat on its own
        decided.extend(beats)
    started = time.process_time()
    actions = core.tick(now)
    parts.append(time.process_time() - started)
    decided.extend(agents.run(actions))
    calm_ms = getattr(core.timing, "rebuild_calm_ms", 0)
    if calm_ms:
        # The replacements wait `rebuild_calm_ms` after the promotions, the hosts beating
        # meanwhile as they do (not counted: steady rounds); the tick that places them is
        # the decision's last part.
        place_at = now + calm_ms
        while now + hb < place_at:
            now += hb
            round_of_heartbeats(False)
            early = agents.run(core.tick(now))
            assert not any(isinstance(a, c.Persist) and any(
                row[1] == "placement" for row in a.history) for a in early), "placed early"
        now = place_at
        started = time.process_time()
        actions = core.tick(now)
        parts.append(time.process_time() - started)
        decided.extend(agents.run(actions))
    promoted = sum(1 for a in decided if isinstance(a, c.Persist)
                   for row in a.history if row[1] == "failover")
    placed = sum(1 for a in decided if isinstance(a, c.Persist)
                 for row in a.history if row[1] == "placement")
    assert promoted == primaries.get(victim, 0), (promoted, primaries.get(victim))
    return {
        "heartbeat_round_cpu_ms": round(heartbeat_ms, 2),
        "host_death_decide_ms": round(sum(parts) * 1000, 2),
        "store_commits_per_host_death": sum(isinstance(a, c.Persist) for a in decided),
        "routes_entries_pushed_per_host_death": sum(
            a.entries_pushed() if hasattr(a, "entries_pushed") else len(a.routes)  # baseline
            for a in decided if isinstance(a, c.PushRoutes)),
        "primaries_per_host_max": max(primaries.values()),
        "core_state_mb": round(state_mb, 1),
        "heartbeat_rounds_cpu_ms": [round(r, 2) for r in rounds],
        # the tick that suspects, the answers, the round of beats in between, the tick
        # after it, and the tick that places the replacements (after `rebuild_calm_ms`)
        "host_death_decide_parts_ms": [round(p * 1000, 2) for p in parts],
        "primaries_failed_over": promoted,
        "replacements_placed": placed,
        "primaries_per_host_even": round(len(core.services) / len(hosts), 1),
    }


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.root)
    import failover.core.coordinator as c

    assert Path(c.__file__).resolve().is_relative_to(Path(args.root).resolve()), c.__file__
    hosts, services = (int(x) for x in args.size.split("/"))
    out: dict[str, Any] = {}
    if args.build:
        state, per_ms = build_state(c, hosts, services, args.seed)
        Path(args.state).write_bytes(__import__("msgpack").packb(state, use_bin_type=True))
        out["create_service_ms"] = round(per_ms, 3)
    state = __import__("msgpack").unpackb(Path(args.state).read_bytes(), raw=False)
    out.update(measure(c, state))
    print(json.dumps(out))


# --- the driver -------------------------------------------------------------------------------


def run_worker(root: str, size: str, state: str, build: bool, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--root", root, "--size", size,
           "--state", state, "--seed", str(seed)]
    if build:
        cmd.append("--build")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"{root} {size}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def base_worktree(commit: str) -> str:
    path = Path(tempfile.gettempdir()) / f"scale-base-{commit[:12]}"
    if not (path / "failover").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT,
                       check=True, capture_output=True)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--no-base", action="store_true")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    base = None if args.no_base else base_worktree(args.base)
    sizes: dict[str, Any] = {}
    baseline: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            state = os.path.join(tmp, size.replace("/", "-") + ".msgpack")
            log(f"{size}: building and measuring the current code")
            sizes[size] = run_worker(str(ROOT), size, state, True, args.seed)
            log(f"{size}: {json.dumps(sizes[size])}")
            if base is not None:
                log(f"{size}: measuring the baseline {args.base}")
                baseline[size] = run_worker(base, size, state, False, args.seed)
                log(f"{size}: baseline {json.dumps(baseline[size])}")
    largest = list(sizes)[-1]
    out: dict[str, Any] = {key: sizes[largest][key] for key in KEYS}
    out["size"] = largest
    out["sizes"] = sizes
    if baseline:
        out["baseline"] = {"commit": args.base, "sizes": baseline, "ratios": {
            size: {key: (round(baseline[size][key] / sizes[size][key], 1)
                         if sizes[size][key] else None) for key in KEYS[:4]}
            for size in baseline}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
