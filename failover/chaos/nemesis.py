"""The nemesis's schedule: which fault, when, against what role, for how long.

Pure and seeded: the same seed, duration and fault kinds give the same schedule. Targets are
roles ("primary", "duplica", "coordinator"), resolved against the cluster when the fault
fires; `pick` is the seeded choice among the hosts that hold the role then. With several
coordinators, "coordinator" is the one leading when the fault fires. An `etcd` fault kills
one etcd member ("member") or every member ("all") for its duration.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

FAULT_KINDS = ("kill", "pause", "partition", "coordinator", "disk", "switchover", "migrate",
               "patch", "etcd", "crash")
# Faults of the shared store (issue 15): they need a cluster whose coordinators run on etcd.
STORE_FAULT_KINDS = ("etcd",)

WARMUP_S = 2.0  # the workload runs alone first, so every failover has a "before"
COOLDOWN_S = 4.0  # no fault starts this close to the end: the cluster heals before checking
GAP_S = (1.0, 2.5)  # quiet time between one fault's end and the next one's start


@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault."""

    at_s: float  # seconds after the workload started
    kind: str
    target: str  # "primary", "duplica", "coordinator", "service"; etcd: "member" or "all"
    duration_s: float  # how long the host stays down/paused/partitioned; 0 for instant faults
    pick: int  # seeded choice among the candidate hosts when it fires

    def describe(self) -> str:
        length = f" for {self.duration_s:.2f} s" if self.duration_s else ""
        return f"{self.kind} {self.target}{length}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_kinds(text: str) -> tuple[str, ...]:
    """Parses `--faults kill,pause,...`; raises ValueError naming an unknown kind."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown fault kind(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(FAULT_KINDS)}")
    return kinds


def schedule(seed: int, duration_s: float, kinds: tuple[str, ...]) -> list[Fault]:
    """The faults of a run, in time order; each one is expected to end (and the cluster to
    heal) before the next starts, which the runner waits for."""
    assert kinds and duration_s > 0
    rnd = random.Random(seed)
    faults: list[Fault] = []
    t = WARMUP_S
    while True:
        kind = rnd.choice(kinds)
        fault = _fault(rnd, kind, t)
        if fault.at_s + fault.duration_s > duration_s - COOLDOWN_S:
            break
        faults.append(fault)
        t = fault.at_s + fault.duration_s + rnd.uniform(*GAP_S)
    return faults


def _fault(rnd: random.Random, kind: str, at_s: float) -> Fault:
    pick = rnd.randrange(1 << 30)
    if kind == "kill":
        # Mostly primaries: they are what failover is about.
        target = "primary" if rnd.random() < 0.7 else "duplica"
        return Fault(at_s, kind, target, round(rnd.uniform(0.3, 2.0), 3), pick)
    if kind == "crash":
        # The agent's child alone (issue 16): its supervisor reports it and restarts it.
        target = "primary" if rnd.random() < 0.7 else "duplica"
        return Fault(at_s, kind, target, 0.0, pick)
    if kind == "pause":
        # From well under the failure timeout (no failover) to well over it (a failover,
        # then the paused primary wakes up fenced).
        target = "primary" if rnd.random() < 0.7 else "duplica"
        return Fault(at_s, kind, target, round(rnd.uniform(0.05, 1.0), 3), pick)
    if kind == "partition":
        target = "primary" if rnd.random() < 0.6 else "duplica"
        return Fault(at_s, kind, target, round(rnd.uniform(0.5, 2.0), 3), pick)
    if kind == "coordinator":
        return Fault(at_s, kind, "coordinator", round(rnd.uniform(0.5, 3.0), 3), pick)
    if kind == "disk":
        target = "primary" if rnd.random() < 0.5 else "duplica"
        return Fault(at_s, kind, target, round(rnd.uniform(0.5, 2.0), 3), pick)
    if kind == "etcd":
        # One member: a quorum remains, nothing should be noticed. All of them: nobody can
        # lead or renew; primaries keep serving, and coordination resumes once etcd is back.
        if rnd.random() < 0.6:
            return Fault(at_s, kind, "member", round(rnd.uniform(0.5, 3.0), 3), pick)
        return Fault(at_s, kind, "all", round(rnd.uniform(1.0, 5.0), 3), pick)
    return Fault(at_s, kind, "service", 0.0, pick)  # switchover, migrate, patch
