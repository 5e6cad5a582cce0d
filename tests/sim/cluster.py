"""A deterministic simulation of a whole cluster in one process (docs/design.md, Layers).

The real cores run here, under one seeded scheduler (a heap of (time ms, sequence, event)):
the coordinator's `CoordinatorCore` with its operation plans (`SwitchoverPlan` for an
operator's switchover and a drain's move of a primary), and on every simulated host one
`ReplicaCore` per replica, which drives `PrimaryReplication` / `DuplicaReplication` and a real
`ReplicatedStateMachine` of the `kv` kind. What is here is only what a daemon does around
them: `SimReplica` is a driver of `ReplicaCore` (it queues and writes the log, ships, applies,
answers and waits, and carries out the core's actions in order, as failover/agent/replica.py
does with files), `SimAgent` is the host (links, heartbeats, control calls), `SimCoordinator`
carries out the coordinator core's actions as failover/coordinator/server.py does. Nothing
reads a clock, there are no threads and no asyncio; one `random.Random(seed)` decides every
latency, loss, duplicate, crash, pause and partition, so a seed replays exactly.

What is modelled, and how faithfully:

* Storage (`MemWal`, `Snapshot`): an in-memory log with a durable prefix (group commit: a
  crash loses the non-durable suffix), its epoch history, snapshots every `snapshot_every`
  applied entries and compaction behind them (`snapshot_retain`), snapshot installs on a
  duplica whose position was compacted away, recovery from the newest snapshot that reads
  back whole (a crash may damage a duplica's newest snapshot: the replica then recovers
  broken and the coordinator rebuilds it), async-mode rewinds from a snapshot or from empty.
  A full disk (a nemesis fault) fails log appends, meta writes and shipped entries on that
  host. Not modelled: torn or corrupt records and the checks of shipped record framing.
* Clients (`SimClient`) put and get with request ids, sessions and the client's retries and
  reroutes; now and then a put nested too deep to log. Every call is recorded as a
  `failover.chaos.history.Op`, and the history is judged by failover.chaos's checkers.
* Reads go through the core's read floor, lease and epoch confirmation, against a clock per
  host: each node's clock (CLOCK_BOOTTIME) has its own offset and a rate within
  `clock_drift` (±5%) of the true time, and runs on while its process is paused.
* The coordinator's store is a dict; a commit may fail (atomically), after which the
  coordinator reloads a fresh core from the store and abandons the operations in flight, as
  the server's `_reload` does.
* Ship streams (`ShipLink`) behave like the gRPC stream between two hosts: one per
  (sender, receiver) pair, in order, items queued while the writer is busy go out as one
  message, acks come back in order; a lost message breaks the stream, both ends see it, and
  the sender reconnects with the agent's backoff. Unary calls (heartbeats, client requests,
  route pushes, HearsPrimary, role changes, prepare and release) may be dropped, delayed,
  reordered and (some) duplicated; the coordinator's calls to one agent keep their order.
* Faults: agent and coordinator crashes and restarts, process pauses (a paused process
  handles nothing, then runs what it received in order, with the views it had), partitions
  between any two nodes, isolated hosts, stream breaks, slow messages, full disks, failed
  store commits, damaged snapshots, operators' switchovers (whose callers sometimes go away),
  migrations and drains; in a variant sweep (`late_beat_p`), heartbeats held 300-1500 ms
  in the network, arriving after the in-sync set they name changed.
* Migration: an operator moves a replica (the primary or a duplica) to a host that holds
  none, by the core's `MigratePlan` with method "replay": the target is built as a
  `building` replica from a snapshot and the log, joins the in-sync set, a moving primary is
  switched over to it (its cut-over), and the source is retired. The page copy of a live
  migration (migration/, tested on its own) is not modelled: a copy asked for fails.
* Not modelled: patch (its plan exists in the core; the sim does not start it), the agent's
  I/O threads (a duplica's append is atomic with its ack), memory bounds on writes in
  flight, TLS and identities.

Bugs out of the sim's reach (covered by tests with real processes or real files instead):
the record framing of shipped batches (issue 11.6: the sim ships `Entry` tuples, no bytes,
so there is nothing to corrupt; tests/unit/test_shipped_records.py), memory bounds on writes
in flight (11.10: the sim holds no payload bytes worth bounding;
tests/unit/test_write_admission.py), the client's route watcher dying on an exception
(11.11: the sim's client is not failover.client; tests/integration/test_rejoin_failover.py),
and the lease clock's choice of CLOCK_BOOTTIME (the sim's clocks are CLOCK_BOOTTIME by
construction; tests/unit/test_lease_clock.py).

A run that ships or schedules orders of magnitude more than usual is reported as a
liveness violation (a message storm) instead of running for minutes.

Invariants checked (docs/design.md numbers): epochs persisted before any agent hears of them
(the coordinator's store, and each replica's meta: a core never takes an epoch before its
write) and never going back (1, 2); one writer per (service, epoch); in sync mode no
acknowledged write lost (3, 9); identical apply order on every replica, and a replica's
state and log meet (4, 12); each request id executed at most once by a state and a retry
answered with the recorded reply (5); a read reflects every write acknowledged before it
began (6, 10); nothing nested past REQUEST_DEPTH_MAX is logged (13); the whole history is
linearizable per key and every acknowledged put is in the final state (failover.chaos's
checkers, sync mode); after healing every operation has ended, every replica converges to
the primary's digest at the same applied index, and a write goes through.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from demo_services.kv import KvService
from failover import defaults
from failover.chaos.checkers import check_acked_puts, check_linearizable_kv
from failover.chaos.history import Op
from failover.core import state_machine
from failover.core.coordinator import (
    Action,
    AskHearsPrimary,
    AssignRole,
    CoordinatorCore,
    DropReplica,
    HearsAnswer,
    HostInfo,
    Persist,
    PushRoutes,
    ReplicaReport,
    StartSwitchover,
    Timing,
)
from failover.core.coordinator import StepDown as CoordStepDown
from failover.core.coordinator.actions import (
    Copied,
    Done,
    Failed,
    Prepared,
    PrepareSwitchover,
    Progress,
    ReleaseSwitchover,
    StartMigration,
)
from failover.core.log_position import LogPosition, check_history
from failover.core.replica import (
    APPLY,
    HOLD_RELEASED,
    LINK_UPS,
    Append,
    ArmTimer,
    DropUnlogged,
    EnsureLinks,
    FailWaiters,
    LogBarrier,
    PersistMeta,
    Refuse,
    ReplicaCore,
    ReplicaMeta,
    Truncate,
)
from failover.core.replication import (
    AckView,
    LogInfo,
    PrimaryReplication,
    SendBatch,
    SendProbe,
    SendSnapshot,
    SendTruncate,
    ShipLimits,
)
from failover.core.roles import DUPLICA, PRIMARY
from failover.core.sessions import (
    Reply,
    ReplyStatus,
    decode_request_id,
    encode_request_id,
    opens_session,
)
from failover.core.state_machine import (
    SESSION_OPEN_PAYLOAD,
    ReplicatedStateMachine,
    decode_request,
)
from failover.errors import (
    DiskFullError,
    FailoverError,
    InvalidRequest,
    NotPrimaryError,
    Overloaded,
    ReplicaBrokenError,
    StaleEpochError,
    Unavailable,
)
from failover.storage.records import Entry

HEARTBEAT_MS = 100
FAILURE_TIMEOUT_MS = 400
LEASE_MS = 300
TICK_MS = HEARTBEAT_MS // 4  # agent and coordinator tick loops run 4 times a heartbeat
# Short enough that a crashed agent is now and then declared dead, so that rebuilds on a
# spare host and retirements run under faults too.
HOST_DEAD_MS = 900
# Every simulated host reports roomy, idle metrics: placement then decides by anti-affinity
# and reservations (its policies have their own unit tests).
SIM_METRICS = {"cpu_count": 8.0, "memory_total_bytes": float(16 << 30),
               "disk_free_bytes": float(100 << 30), "disk_total_bytes": float(200 << 30),
               "cpu_percent": 10.0, "memory_percent": 10.0}
LINK_BACKOFF_MIN_MS = defaults.LINK_BACKOFF_MIN_MS
LINK_BACKOFF_MAX_MS = defaults.LINK_BACKOFF_MAX_MS
CLIENT_BACKOFF_MIN_MS = defaults.CLIENT_BACKOFF_MIN_MS
CLIENT_BACKOFF_MAX_MS = defaults.CLIENT_BACKOFF_MAX_MS
SWITCHOVER_TIMEOUT_MS = 5000
COORD = "coord"
# A prepare call: (the coordinator's incarnation, its operation, the call's number).
CallToken = tuple[int, str, int]


class InvariantViolation(AssertionError):
    """A design invariant failed in the simulation."""


# --- scenario -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """Everything a run depends on besides the seed (derived from the seed by the makers)."""

    name: str
    hosts: int = 3
    services: int = 1
    mode: str = "sync"
    clients: int = 2
    fault_ms: int = 1200  # length of the fault phase
    heal_ms: int = 600  # clients keep writing this long after healing
    settle_ms_max: int = 6000  # bound on waiting for convergence after that
    drop_p: float = 0.02  # unary calls and replies lost
    dup_p: float = 0.02  # unary calls delivered twice
    slow_p: float = 0.05  # a message takes 10-150 ms
    ship_break_p: float = 0.003  # a shipped message breaks its stream
    fault_gap_ms: tuple[int, int] = (100, 500)
    agent_down_ms: tuple[int, int] = (50, 1200)
    coord_down_ms: tuple[int, int] = (50, 900)
    partition_ms: tuple[int, int] = (100, 1200)
    max_agents_down: int = 1
    weights: tuple[tuple[str, int], ...] = (
        ("crash_agent", 2), ("crash_primary", 3), ("crash_coordinator", 2), ("partition", 2),
        ("isolate", 2), ("break_link", 2), ("switchover", 1), ("drain", 1), ("pause", 2),
        ("disk_full", 1), ("migrate", 1), ("nothing", 1),
    )
    batch_entries_max: int = 4
    inflight_batches_max: int = 2
    think_ms: tuple[int, int] = (5, 40)
    keys: int = 4
    read_ratio: float = 0.3  # the share of client calls that are gets
    poison_p: float = 0.02  # the share of puts nested too deep to log
    # Snapshots: every this many applied entries (0: never), the log compacted behind one
    # but for `snapshot_retain` entries, so that lagging duplicas need an install.
    snapshot_every: int = 0
    snapshot_retain: int = 2
    damage_p: float = 0.0  # the chance that a crash leaves the newest snapshots unreadable
    pause_ms: tuple[int, int] = (50, 600)
    disk_full_ms: tuple[int, int] = (100, 800)
    store_fail_p: float = 0.0  # the chance that a coordinator commit fails (fault phase)
    # Each node's clock runs at a rate within 1 +- clock_drift of the true time. The lease
    # logic tolerates rates whose ratio stays under (LEASE_MS + margin) / (LEASE_MS -
    # margin), about 1.22 with the defaults: 0.05 is well inside, a test goes beyond.
    clock_drift: float = 0.0
    # The chance (fault phase) that a heartbeat is held in the network for `late_beat_ms`,
    # arriving after the in-sync set it names changed (and maybe changed back). 0 in the
    # default sweeps (their traces stay as they are); a test's variant raises it.
    late_beat_p: float = 0.0
    late_beat_ms: tuple[int, int] = (300, 1500)
    # The crash fast path (issue 16): the chance that an agent crash is its process's alone,
    # the supervisor alive, which reports the exit to the coordinator; the chance that such a
    # report is held `late_report_ms` in the network (arriving after the timeout path
    # started, or after the process was restarted and registered), and that it is
    # delivered once more (also late). 0 in the default sweeps (their traces stay as they
    # are); `test_exit_report_seeds` raises them.
    exit_report_p: float = 0.0
    late_report_p: float = 0.0
    late_report_ms: tuple[int, int] = (300, 1500)
    report_again_p: float = 0.0


def short_scenario(seed: int) -> Scenario:
    """A short run: boot, about a second of faults, heal, converge."""
    r = random.Random(f"short-{seed}")
    return Scenario(
        name="short",
        hosts=4 if r.random() < 0.25 else 3,
        services=2 if r.random() < 0.3 else 1,
        mode="async" if r.random() < 0.15 else "sync",
        clients=r.choice((1, 2, 2, 3)),
        fault_ms=r.choice((800, 1200, 1600)),
        heal_ms=400,
        think_ms=(10, 50),
        batch_entries_max=r.choice((1, 2, 4, 16)),
        inflight_batches_max=r.choice((1, 2, 4)),
        snapshot_every=r.choice((0, 0, 5, 20)),
        damage_p=r.choice((0.0, 0.3)),
        store_fail_p=r.choice((0.0, 0.0, 0.02)),
        clock_drift=0.05,
    )


def long_scenario(seed: int) -> Scenario:
    """A longer run: several seconds of faults, more clients, sometimes two agents down."""
    r = random.Random(f"long-{seed}")
    return Scenario(
        name="long",
        hosts=r.choice((3, 4, 4)),
        services=r.choice((1, 2)),
        mode="async" if r.random() < 0.15 else "sync",
        clients=3,
        fault_ms=r.choice((5000, 8000)),
        heal_ms=1000,
        drop_p=r.choice((0.01, 0.03, 0.06)),
        dup_p=r.choice((0.01, 0.03)),
        max_agents_down=r.choice((1, 1, 2)),
        batch_entries_max=r.choice((1, 3, 8, 64)),
        inflight_batches_max=r.choice((1, 2, 8)),
        snapshot_every=r.choice((0, 10, 50)),
        damage_p=r.choice((0.0, 0.3)),
        store_fail_p=r.choice((0.0, 0.01)),
        clock_drift=0.05,
    )


SCENARIOS: dict[str, Callable[[int], Scenario]] = {"short": short_scenario, "long": long_scenario}


# --- scheduler and network ----------------------------------------------------------------


class Kernel:
    """Simulated time, the event heap, the seeded random source and the trace."""

    # A run takes a few thousand events and ship items; far more means a message storm (a
    # liveness bug), reported as a violation rather than left to run for minutes.
    MAX_EVENTS = 300_000
    MAX_SHIPPED = 300_000

    def __init__(self, seed: int, keep_lines: int = 300, full_trace: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0  # the true time (ms): the checker's, never a process's
        self.events = 0
        self._heap: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._hash = hashlib.blake2b(digest_size=16)
        self.shipped = 0  # probes, truncates and batches put on ship streams
        self.recent: deque[str] = deque(maxlen=keep_lines)
        self.full: list[str] | None = [] if full_trace else None
        # Each node's clock (failover.clock's CLOCK_BOOTTIME on that host): an offset and a
        # rate; it keeps running while the process is paused or down.
        self._clocks: dict[str, tuple[int, float]] = {}
        # node -> true time until which its process handles nothing (a pause: a stopped VM,
        # a long GC); its events wait and then run in their order, against its stale views.
        self.paused: dict[str, int] = {}

    def set_clock(self, node: str, offset_ms: int, rate: float) -> None:
        self._clocks[node] = (offset_ms, rate)

    def set_rate(self, node: str, rate: float) -> None:
        """From now on node's clock runs at `rate` (it reads on from where it is)."""
        reading = self.clock(node)
        self._clocks[node] = (reading - int(self.now * rate), rate)

    def clock(self, node: str) -> int:
        """What `monotonic_ms()` (CLOCK_BOOTTIME) returns on node now: it runs on while the
        process is paused."""
        offset, rate = self._clocks.get(node, (0, 1.0))
        return offset + int(self.now * rate)

    def pause(self, node: str, until: int) -> None:
        """Stops node's process from now until `until` (true time)."""
        if until > self.paused.get(node, 0):
            self.paused[node] = until

    def after(self, delay_ms: int, fn: Callable[..., None], *args: Any) -> None:
        """Runs fn(*args) delay_ms from now (after every event already due then)."""
        self._seq += 1
        heapq.heappush(self._heap, (self.now + max(0, delay_ms), self._seq, fn, args))

    def _node_of(self, fn: Callable[..., None], args: tuple[Any, ...]) -> str | None:
        """The process an event runs in: the `node` of the object whose method it is (a
        message's `_arrive` runs in its destination)."""
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, Network):
            return args[1]
        return getattr(owner, "node", None)

    def note(self, text: str) -> None:
        """Adds a line to the trace (and its hash)."""
        line = f"{self.now:>6} {text}"
        self._hash.update(line.encode())
        self.recent.append(line)
        if self.full is not None:
            self.full.append(line)

    def run_until(self, until_ms: int) -> None:
        heap = self._heap
        h = self._hash
        paused = self.paused
        while heap and heap[0][0] <= until_ms:
            when, seq, fn, args = heapq.heappop(heap)
            if paused:
                node = self._node_of(fn, args)
                resume = paused.get(node) if node is not None else None
                if resume is not None:
                    if resume > when:
                        # Waits for the process to run again; events keep their order.
                        self._seq += 1
                        heapq.heappush(heap, (resume, self._seq, fn, args))
                        continue
                    if resume <= self.now:
                        del paused[node]
            self.now = when
            self.events += 1
            if self.events > self.MAX_EVENTS:
                self.note("VIOLATION runaway")
                raise InvariantViolation(
                    f"liveness: more than {self.MAX_EVENTS} events by {when} ms: a message "
                    "storm (see the trace's last lines)")
            h.update(fn.__qualname__.encode())
            fn(*args)
        self.now = max(self.now, until_ms)

    def trace_hash(self) -> str:
        return self._hash.copy().hexdigest()


class Network:
    """Latency, loss, duplication and partitions between named nodes."""

    def __init__(self, kernel: Kernel, scenario: Scenario) -> None:
        self.k = kernel
        self.drop_p = scenario.drop_p
        self.dup_p = scenario.dup_p
        self.slow_p = scenario.slow_p
        self.ship_break_p = scenario.ship_break_p
        self.cuts: dict[frozenset[str], int] = {}  # node pair -> partitioned until (ms)
        self._fifo: dict[tuple[str, str], int] = {}

    def heal(self) -> None:
        self.drop_p = self.dup_p = self.slow_p = self.ship_break_p = 0.0
        self.cuts.clear()

    def latency(self) -> int:
        rng = self.k.rng
        ms = rng.randint(1, 4)
        if self.slow_p and rng.random() < self.slow_p:
            ms += rng.randint(10, 150)
        return ms

    def cut(self, a: str, b: str) -> bool:
        until = self.cuts.get(frozenset((a, b)))
        return until is not None and self.k.now < until

    def send(self, src: str, dst: str, fn: Callable[..., None], *args: Any,
             dup: bool = True, late_ms: int = 0) -> bool:
        """A unary call or reply: may be lost, delayed (by `late_ms` more), reordered or
        (if dup) delivered twice. Returns whether it left (False: lost at once)."""
        k = self.k
        if self.cut(src, dst) or (self.drop_p and k.rng.random() < self.drop_p):
            return False
        k.after(self.latency() + late_ms, self._arrive, src, dst, fn, args)
        if dup and self.dup_p and k.rng.random() < self.dup_p:
            k.after(self.latency(), self._arrive, src, dst, fn, args)
        return True

    def send_fifo(self, src: str, dst: str, fn: Callable[..., None], *args: Any) -> bool:
        """Like send, but in order with the earlier fifo sends from src to dst."""
        k = self.k
        if self.cut(src, dst) or (self.drop_p and k.rng.random() < self.drop_p):
            return False
        key = (src, dst)
        when = max(k.now + self.latency(), self._fifo.get(key, 0))
        self._fifo[key] = when
        k.after(when - k.now, self._arrive, src, dst, fn, args)
        return True

    def _arrive(self, src: str, dst: str, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if self.cut(src, dst):
            return  # a partition started while it travelled
        fn(*args)


# --- the in-memory write-ahead log and snapshots --------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A replica's state as of `index` (what `SnapshotStore` keeps on disk): the state
    machine's chunks, the log's epoch history up to it, and a digest to check on reading."""

    index: int
    epoch: int
    history: tuple[tuple[int, int], ...]
    chunks: tuple[bytes, ...]
    digest: bytes
    damaged: bool = False  # its file no longer reads back whole (a fault)

    def state(self) -> ReplicatedStateMachine:
        sm = new_state_machine()
        sm.restore(iter(self.chunks))
        if sm.digest() != self.digest or sm.applied_index != self.index:
            raise InvariantViolation(f"snapshot at {self.index} restores another state")
        return sm


class MemWal:
    """A replica's log: entries after a compaction base, a durable prefix, the epoch
    history, and the snapshots the log was compacted against."""

    __slots__ = ("entries", "base", "base_epoch", "durable_index", "history", "snapshots")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.base = 0  # entries up to here were compacted away (covered by a snapshot)
        self.base_epoch = 0
        self.durable_index = 0
        self.history: list[tuple[int, int]] = []
        self.snapshots: list[Snapshot] = []  # oldest first

    @property
    def first_index(self) -> int:
        return self.base + 1

    @property
    def last_index(self) -> int:
        return self.base + len(self.entries)

    @property
    def last_epoch(self) -> int:
        return self.entries[-1].epoch if self.entries else self.base_epoch

    @property
    def snapshot(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Writes entries (not yet durable); the WAL's preconditions are asserted."""
        for e in entries:
            if e.index != self.last_index + 1:
                raise InvariantViolation(f"log append at {e.index}, log ends at {self.last_index}")
            if e.epoch < self.last_epoch:
                raise InvariantViolation(f"log append of epoch {e.epoch} after {self.last_epoch}")
            if not self.history or self.history[-1][0] != e.epoch:
                self.history.append((e.epoch, e.index))
            self.entries.append(e)

    def sync(self) -> None:
        self.durable_index = self.last_index

    def truncate_after(self, index: int) -> int:
        if index < self.base:
            raise InvariantViolation(f"truncate after {index}, below the compacted {self.base}")
        dropped = self.last_index - index
        if dropped <= 0:
            return 0
        del self.entries[index - self.base:]
        self.history = [h for h in self.history if h[1] <= index]
        self.durable_index = index  # the truncation's fsync covers what is left
        # Snapshots past the cut hold entries that are being truncated.
        self.snapshots = [s for s in self.snapshots if s.index <= index]
        return dropped

    def crash(self) -> int:
        """Loses the non-durable suffix; returns how many entries went."""
        lost = self.last_index - self.durable_index
        if lost > 0:
            del self.entries[self.durable_index - self.base:]
            self.history = [h for h in self.history if h[1] <= self.durable_index]
        return max(0, lost)

    def read(self, first: int, last: int) -> list[Entry]:
        if first <= self.base:
            raise InvariantViolation(f"log read from {first}, compacted up to {self.base}")
        return self.entries[first - 1 - self.base:last - self.base]

    def info(self) -> LogInfo:
        return LogInfo(self.first_index, self.last_index, self.durable_index,
                       tuple(self.history))

    def epoch_at(self, index: int) -> int:
        epoch = self.base_epoch if index <= self.base else 0
        for e, first in self.history:
            if first <= index:
                epoch = e
        return epoch

    # --- snapshots and compaction ---------------------------------------------------------

    def take_snapshot(self, sm: ReplicatedStateMachine) -> Snapshot:
        index = sm.applied_index
        snap = Snapshot(index, self.epoch_at(index),
                        tuple(h for h in self.history if h[1] <= index),
                        tuple(sm.snapshot()), sm.digest())
        self.snapshots = [*self.snapshots[-1:], snap]  # the two newest are kept
        return snap

    def compact(self, upto: int) -> bool:
        """Drops the entries up to `upto` (durable, and covered by a snapshot)."""
        upto = min(upto, self.durable_index)
        if upto <= self.base:
            return False
        self.base_epoch = self.epoch_at(upto)
        del self.entries[:upto - self.base]
        self.base = upto
        return True

    def install(self, snap: Snapshot) -> None:
        """Replaces the log with an empty one that starts after a received snapshot."""
        self.entries = []
        self.base, self.base_epoch = snap.index, snap.epoch
        self.durable_index = snap.index
        self.history = list(snap.history)
        self.snapshots = [snap]

    def recover(self) -> tuple[ReplicatedStateMachine, str]:
        """After a restart: the newest snapshot that reads back whole and that the log
        continues from (Replica._recover_state), or why there is none ("": fine)."""
        for snap in reversed(self.snapshots):
            if not snap.damaged:
                if snap.index < self.base:
                    break
                return snap.state(), ""
        if self.base == 0:
            return new_state_machine(), ""
        return new_state_machine(), (f"its log starts at {self.first_index} and no snapshot "
                                     "it can read covers what came before")

    def rewound_state(self, index: int) -> ReplicatedStateMachine | None:
        """A state at or below `index` that the log continues from (async rewinds)."""
        for snap in reversed(self.snapshots):
            if snap.index <= index and snap.index >= self.base and not snap.damaged:
                return snap.state()
        return new_state_machine() if self.base == 0 else None


@dataclass
class ReplicaDisk:
    """What survives a crash of one replica: its meta file, its log and snapshots."""

    meta: ReplicaMeta
    wal: MemWal = field(default_factory=MemWal)


# --- the checker --------------------------------------------------------------------------


@dataclass
class Call:
    """A client's request in flight (what `failover.client.Client` keeps across retries);
    when it ends, the client records it in the history as a `failover.chaos.history.Op`."""

    session: str
    seq: int
    service: str
    key: str
    kind: str  # "put" or "get"
    value: str  # a put's value (unique in the run), "" for a get
    invoke_ms: int
    depth: int = 0  # a put whose value nests this deep (a poison request), or 0
    outcome: str = "pending"  # then ok, fail or unknown, as in the history
    index: int = 0
    op: Op | None = None  # its history record, once it ended

    def payload(self) -> bytes:
        request: dict[str, Any] = {"op": self.kind, "key": self.key}
        if self.kind == "put":
            value: Any = self.value
            for _ in range(self.depth):
                value = [value]
            request["value"] = value
        return msgpack.packb(request, use_bin_type=True)


class Checker:
    """Asserts the invariants as the simulation runs, and at the end."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.persisted_epoch: dict[str, int] = {}
        self.writers: dict[tuple[str, int], str] = {}  # (service, epoch) -> host that wrote
        self.ackers: dict[tuple[str, int], str] = {}  # (service, epoch) -> host that acked
        # service -> index -> (epoch, request id, payload) applied there by some replica
        self.applied: dict[str, dict[int, tuple[int, bytes, bytes]]] = {}
        self.replied_index: dict[bytes, int] = {}  # request id -> index of its OK reply
        # The clients' history, judged at the end by failover.chaos's checkers; `requests`
        # names each write's request (session, seq) for the checks on the logs.
        self.ops: list[Op] = []
        self.requests: dict[int, tuple[str, int]] = {}
        # service -> (true times at which a write's OK reply was sent, the highest index
        # acknowledged by then): a read begun later must reflect it
        self.acked: dict[str, tuple[list[int], list[int]]] = {}
        self.reads = 0
        self.rewinds = 0
        self.installs = 0
        self.broken = 0
        self.migrated = 0
        self.truncated = 0
        self.async_lost = 0
        self.failovers = 0
        self.switchovers = 0
        self.rebuilt = 0
        self.retired = 0
        self.exit_reports = 0
        self.exit_reports_acted = 0

    # invariant 6: no promotion while the old primary may still answer reads alone
    def on_failover(self, service: str, old_primary: str) -> None:
        """A failover is decided (persisted): the old primary's process, if it runs, must
        hold no lease any more. The coordinator waits out the lease it granted, or skips
        that wait only because the process that held it is dead (the crash fast path)."""
        agent = self.c.agents.get(old_primary)
        if agent is None or not agent.up:
            return
        replica = agent.replicas.get(service)
        if replica is not None and replica.core.meta.role == PRIMARY and \
                replica.core.lease_valid(agent.now):
            self.fail(f"inv6: {service} failed over from {old_primary} (incarnation "
                      f"{agent.incarnation}) while that primary still holds a lease")

    def fail(self, text: str) -> None:
        self.c.k.note(f"VIOLATION {text}")
        raise InvariantViolation(text)

    # invariant 1: epochs grow and are persisted before anyone hears of them
    def on_persist(self, key: str, value: bytes) -> None:
        if not key.startswith("service/"):
            return
        record = msgpack.unpackb(value, raw=False)
        name, epoch = record["name"], record["epoch"]
        old = self.persisted_epoch.get(name, 0)
        if epoch < old:
            self.fail(f"inv1: {name}'s persisted epoch went back from {old} to {epoch}")
        self.persisted_epoch[name] = epoch

    def on_coordinator_says(self, service: str, epoch: int, what: str) -> None:
        if epoch > self.persisted_epoch.get(service, 0):
            self.fail(f"inv1: {what} names epoch {epoch} of {service} before it was persisted "
                      f"(store has {self.persisted_epoch.get(service, 0)})")

    def on_meta_epoch(self, host: str, service: str, old: int, new: int) -> None:
        if new < old:
            self.fail(f"inv2: {host}/{service} persisted epoch went back from {old} to {new}")

    # one writer per epoch
    def on_entry_created(self, host: str, service: str, entry: Entry) -> None:
        if entry.payload and entry.payload != SESSION_OPEN_PAYLOAD:
            depth = _depth(msgpack.unpackb(entry.payload, raw=False))
            if depth > defaults.REQUEST_DEPTH_MAX + 1:  # the request dict is one level
                self.fail(f"inv13: {host} logged {_entry(entry)}, a request nested {depth} "
                          f"deep (at most {defaults.REQUEST_DEPTH_MAX} may be logged)")
        key = (service, entry.epoch)
        writer = self.writers.setdefault(key, host)
        if writer != host:
            self.fail(f"two writers in one epoch: {writer} and {host} both wrote {service} "
                      f"entries at epoch {entry.epoch} (now index {entry.index})")
        if entry.epoch > self.persisted_epoch.get(service, 0):
            self.fail(f"inv1: {host} wrote {service} at epoch {entry.epoch} the coordinator "
                      "never persisted")

    def on_acknowledge(self, host: str, service: str, epoch: int, index: int,
                       rid: bytes) -> None:
        key = (service, epoch)
        acker = self.ackers.setdefault(key, host)
        if acker != host:
            self.fail(f"two primaries acknowledged {service} writes at epoch {epoch}: "
                      f"{acker} and {host}")
        acks = self.acked.setdefault(service, ([], []))
        acks[0].append(self.c.k.now)
        acks[1].append(max(index, acks[1][-1] if acks[1] else 0))
        rid = _plain(rid)  # attempts with and without the open flag are one request
        known = self.replied_index.setdefault(rid, index)
        if known != index:
            if self.c.scenario.mode == "sync":
                self.fail(f"inv5: request {_rid(rid)} answered with index {index}, earlier "
                          f"with {known}")
            # Async mode: the first answer's entry was lost in a failover (by design), and
            # the retry was applied anew.
            self.async_lost += 1
            self.replied_index[rid] = index

    # invariants 6 and 10: a read reflects every write acknowledged before it began
    def on_read(self, replica: SimReplica, req: ClientRequest, reply: Reply) -> None:
        self.reads += 1
        if self.c.scenario.mode != "sync":
            return  # async mode may lose acknowledged writes: no read promise to check
        times, indexes = self.acked.get(req.service, ([], []))
        n = bisect.bisect_left(times, req.invoke_ms)
        if n and indexes[n - 1] > replica.sm.applied_index:
            self.fail(f"stale read: {replica.agent.host_id}/{req.service} (epoch "
                      f"{replica.epoch}, lease until {replica.lease_expiry_ms} on its clock, "
                      f"now {replica.agent.now}) answered a read begun at {req.invoke_ms} "
                      f"from applied index {replica.sm.applied_index}, but index "
                      f"{indexes[n - 1]} was acknowledged before it began")

    # invariant 4: apply order identical everywhere (checked live in sync mode)
    def on_apply(self, replica: SimReplica, entry: Entry) -> None:
        if self.c.scenario.mode != "sync":
            return
        table = self.applied.setdefault(replica.service, {})
        mine = (entry.epoch, entry.request_id, entry.payload)
        seen = table.setdefault(entry.index, mine)
        if seen != mine:
            acked = seen[1] and self.replied_index.get(_plain(seen[1])) == entry.index
            what = "inv3: acknowledged write lost" if acked else "inv4: apply order differs"
            self.fail(f"{what}: {replica.agent.host_id}/{replica.service} applied "
                      f"{_entry(entry)} at {entry.index}, another replica applied "
                      f"(epoch {seen[0]}, {_rid(seen[1])}) there")

    def on_execute(self, replica: SimReplica, entry: Entry, reply: Reply) -> None:
        """A request is executed where its reply names its own entry (a retry gets the
        recorded reply of the first); never twice by one state."""
        if not entry.payload or reply.status == ReplyStatus.EXPIRED or reply.index != entry.index:
            return
        rid = _plain(entry.request_id)
        first = replica.executed.setdefault(rid, entry.index)
        if first != entry.index:
            self.fail(f"inv5: {replica.agent.host_id}/{replica.service} executed "
                      f"{_rid(rid)} twice: at {first} and at {entry.index}")


def _depth(value: Any) -> int:
    """How deep a decoded request nests (a scalar is 0)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list | tuple):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _plain(rid: bytes) -> bytes:
    """The request id without its open flag (b"" for a barrier)."""
    return encode_request_id(*decode_request_id(rid)) if rid else rid


def _rid(rid: bytes) -> str:
    if not rid:
        return "barrier"
    cid, seq = decode_request_id(rid)
    return f"{cid}:{seq}"


def _entry(e: Entry) -> str:
    return f"(e{e.epoch} i{e.index} {_rid(e.request_id)})"


# --- a replica on a simulated host: a driver of the real ReplicaCore ----------------------


@dataclass
class ClientRequest:
    """An Execute call as it reaches an agent."""

    client: str
    seq: int
    attempt: int
    service: str
    epoch_seen: int
    payload: bytes
    opens: bool = True  # the request may open its session (as Replica.execute's default)
    session: str = ""  # the session id it goes under; "" for the client's name
    invoke_ms: int = 0  # when the client began the call (true time; for the checker only)

    @property
    def session_id(self) -> str:
        return self.session or self.client

    @property
    def request_id(self) -> bytes:
        return encode_request_id(self.session_id, self.seq, self.opens)


def new_state_machine() -> ReplicatedStateMachine:
    return ReplicatedStateMachine(KvService())


def _refusal(error: Exception) -> tuple[Any, ...]:
    """An error of the core as the client hears it (what the servicer's status codes say)."""
    if isinstance(error, NotPrimaryError):
        return ("not_primary", error.primary_address, error.epoch)
    if isinstance(error, InvalidRequest):
        return ("invalid", str(error), 0)
    return ("unavailable", str(error), 0)  # Unavailable, Overloaded, DiskFull, broken


class SimReplica:
    """One replica of one service on a simulated host: the real `ReplicaCore` and the I/O
    that `failover.agent.replica.Replica` does for it, over an in-memory log: it feeds the
    core its events and carries out the actions it returns, in order. Every decision is the
    core's; what is here is what a driver must do itself (queue and write the log, ship,
    apply, answer, wait)."""

    def __init__(self, agent: SimAgent, disk: ReplicaDisk, sm: ReplicatedStateMachine) -> None:
        self.agent = agent
        self.node = agent.host_id  # the process it runs in (paused with its host)
        self.c = agent.c
        self.k = agent.k
        self.disk = disk
        self.service = disk.meta.service
        self.wal = disk.wal
        self.core = ReplicaCore(disk.meta, sm, limits=agent.limits,
                                heartbeat_ms=HEARTBEAT_MS, coordinated=True)
        self.executed: dict[bytes, int] = {}  # request id -> index this state executed it at
        # The log writer's queue, and the entries logged or queued and not applied, oldest
        # first (as the agent keeps them, so that what a step-down drops is the core's call).
        self._queued: list[Entry] = []
        self._unapplied: deque[Entry] = deque()
        self._undecoded: deque[tuple[int, int, tuple[Entry, ...]]] = deque()
        self._waiters: dict[int, list[ClientRequest]] = {}
        self._writing = False
        self._write_scheduled = False
        self._apply_scheduled = False
        self._snapshot_scheduled = False
        self._unrecorded = False  # the core stepped down without its meta written
        self.refused_sender = False  # the last shipped item was refused for who sent it
        self.closed = False
        self.held: list[ClientRequest] = []  # reads and writes a switchover holds
        self._reads: list[dict[str, Any]] = []
        # The prepare calls waiting here, one per call (server.py keeps earlier calls open
        # when it asks again: two handlers wait side by side on the agent).
        self.switch_waits: dict[CallToken, dict[str, Any]] = {}

    # --- the core's state, as the checks see it --------------------------------------------

    @property
    def role(self) -> str:
        return self.core.role

    @property
    def epoch(self) -> int:
        return self.core.epoch

    @property
    def sm(self) -> ReplicatedStateMachine:
        return self.core.sm

    @property
    def primary(self) -> PrimaryReplication | None:
        return self.core.primary

    @property
    def lease_expiry_ms(self) -> int:
        return self.core.lease_expiry_ms

    @property
    def hold(self) -> bool:
        return self.core.holding

    def _log_info(self) -> LogInfo:
        return self.wal.info()

    # --- lifecycle -----------------------------------------------------------------------

    @classmethod
    def recover(cls, agent: SimAgent, disk: ReplicaDisk) -> SimReplica:
        """Opens a replica from its disk (Replica.open): the newest snapshot that reads back
        whole and the log after it; a replica that cannot is broken (invariant 12)."""
        sm, why = disk.wal.recover()
        replica = cls(agent, disk, sm)
        if why:
            agent.k.note(f"{agent.host_id}/{disk.meta.service} is broken: {why}")
            agent.c.check.broken += 1
            replica._run(replica.core.mark_broken(why))
        if not replica.core.broken:
            replica._run(replica.core.open(replica._log_info(), agent.now))
        return replica


    def close(self) -> None:
        self.closed = True
        self.core.closed()

    # --- carrying out the core's actions -------------------------------------------------

    def _run(self, actions: list[Any]) -> None:
        for action in actions:
            if action is APPLY:
                self._apply_committed()
            elif isinstance(action, SendBatch):
                self._send_batch(action)
            elif isinstance(action, PersistMeta):
                if not self._persist(action):
                    raise DiskFullError(f"{self.agent.host_id}/{self.service}: no space to "
                                        f"record {action.meta.role} e{action.meta.epoch}")
            elif isinstance(action, LogBarrier):
                self._queue(Entry(action.epoch, action.index, b"", b""))
            elif isinstance(action, FailWaiters):
                for index in sorted(i for i in self._waiters if i >= action.from_index):
                    for req in self._waiters.pop(index):
                        self.agent.answer(req, _refusal(action.error))
            elif isinstance(action, DropUnlogged):
                self._queued = [e for e in self._queued if e.index < action.from_index]
                while self._unapplied and self._unapplied[-1].index >= action.from_index:
                    self._unapplied.pop()
            elif action is LINK_UPS:
                for host in self.core.peers:
                    if self.agent.link_is_up(host):
                        self._run(self.core.link_up(host, self.agent.now))
            elif isinstance(action, EnsureLinks):
                self.agent.ensure_links(action.peers)
            elif action is HOLD_RELEASED:
                held, self.held = self.held, []
                for req in held:
                    self.execute(req)
            elif isinstance(action, ArmTimer):
                self.k.after(max(0, action.at_ms - self.agent.now), self._timer, action.token)
            elif isinstance(action, SendProbe):
                self.agent.ship(action.host_id, ("probe", self.service, self.epoch))
            elif isinstance(action, SendTruncate):
                self.agent.ship(action.host_id,
                                ("truncate", self.service, self.epoch, action.after_index))
            elif isinstance(action, SendSnapshot):
                self._send_snapshot(action.host_id)
            else:
                raise AssertionError(f"unknown action {action!r}")
        self._progress()

    def _persist(self, action: PersistMeta) -> bool:
        """Writes the meta (a full disk refuses it), then tells the core; False when a
        required write failed (nothing changed)."""
        if self.core.epoch > self.disk.meta.epoch and not self._unrecorded:
            # Invariant 1 on the agent: only a step-down whose write failed may run ahead.
            self.c.check.fail(f"inv1: {self.agent.host_id}/{self.service} took epoch "
                              f"{self.core.epoch} in memory before it was persisted (disk "
                              f"has {self.disk.meta.epoch}; now {action.reason})")
        if self.agent.disk_full():
            if action.required:
                self.core.note_error("no space left for the meta", True)
                return False
            self._unrecorded = True  # a step-down taken without its write
        else:
            self._unrecorded = False
            self.c.check.on_meta_epoch(self.agent.host_id, self.service, self.disk.meta.epoch,
                                       action.meta.epoch)
            self.disk.meta = action.meta
        if action.meta.role != self.core.role or action.meta.epoch != self.core.epoch:
            self.k.note(f"{self.agent.host_id}/{self.service} becomes {action.meta.role} "
                        f"e{action.meta.epoch} log {self.wal.last_index}/"
                        f"{self.wal.durable_index} applied {self.sm.applied_index} "
                        f"({action.reason})")
        self._run(self.core.meta_persisted(action, self.agent.now))
        return True

    def _timer(self, token: int) -> None:
        if not self.closed:
            self._run(self.core.timer(token, self.agent.now))

    def _progress(self) -> None:
        """After every event: the waits that may be over (reads, a switchover prepare)."""
        self._pump_reads()
        self._check_switchover()

    # --- role ----------------------------------------------------------------------------

    def assign(self, role: str, epoch: int, mode: str, primary: tuple[str, str] | None,
               duplicas: dict[str, str], in_sync: set[str], in_sync_generation: int = 0) -> str:
        """AssignRole; returns "" or the error the call fails with."""
        try:
            self._run([self.core.assign(role, epoch, mode, primary, duplicas, in_sync,
                                        in_sync_generation)])
        except (StaleEpochError, DiskFullError, ReplicaBrokenError) as exc:
            return str(exc)
        return ""

    def step_down(self, epoch: int, why: str) -> None:
        persist = self.core.step_down(epoch, why)
        if persist is not None:
            self._run([persist])

    def grant_lease(self, epoch: int, lease_ms: int, sent_ms: int) -> None:
        self.core.grant_lease(epoch, lease_ms, sent_ms)
        self._progress()

    # --- the write path (primary) --------------------------------------------------------

    def execute(self, req: ClientRequest) -> None:
        core = self.core
        try:
            core.check_primary(req.epoch_seen)
        except (NotPrimaryError, Unavailable, ReplicaBrokenError) as exc:
            self.agent.answer(req, _refusal(exc))
            return
        if req.payload != SESSION_OPEN_PAYLOAD:
            try:
                request = decode_request(req.payload)
                state_machine.check_loggable(req.payload, request)
            except InvalidRequest as exc:
                self.agent.answer(req, _refusal(exc))
                return
            if KvService.is_read_only(request):
                self.query(req)
                return
        if core.holding:
            self.held.append(req)  # answered (or redirected) when the hold is released
            return
        size = len(req.payload)
        try:
            core.admit_bytes(size)
        except Overloaded as exc:
            self.agent.answer(req, _refusal(exc))
            return
        try:
            got = core.write(req.session_id, req.seq, req.opens, size)
        except (InvalidRequest, Overloaded) as exc:
            core.release_bytes(size)
            self.agent.answer(req, _refusal(exc))
            return
        if isinstance(got, Reply):
            core.release_bytes(size)
            self._answer_write(req, got, duplicate=True)
            return
        index, new = got
        if new:
            self._queue(Entry(core.epoch, index, req.request_id, req.payload))
            self._waiters[index] = [req]
        else:
            core.release_bytes(size)
            self._waiters.setdefault(index, []).append(req)

    def _queue(self, entry: Entry) -> None:
        self.c.check.on_entry_created(self.agent.host_id, self.service, entry)
        self.k.note(f"{self.agent.host_id}/{self.service} queues {_entry(entry)}")
        self._queued.append(entry)
        self._unapplied.append(entry)
        if not self._writing and not self._write_scheduled:
            self._write_scheduled = True
            self.k.after(self.k.rng.choice((0, 0, 0, 1)), self._write)

    def _answer_write(self, req: ClientRequest, reply: Reply, duplicate: bool) -> None:
        if reply.status == ReplyStatus.OK:
            self.c.check.on_acknowledge(self.agent.host_id, self.service, self.epoch,
                                        reply.index, req.request_id)
        # The reply names the epoch of the entry that applied the request (replica.py).
        self.agent.answer(req, ("ok", reply.index, int(reply.status), reply.epoch or self.epoch,
                                duplicate or reply.epoch != self.epoch, reply.data))

    def _write(self) -> None:
        """The log writer takes what accumulated: written now, durable after the fsync."""
        self._write_scheduled = False
        batch, self._queued = self._queued, []
        if self.closed or not batch:
            return
        self.core.append_started(batch[-1].index)
        if self.agent.disk_full():
            self._run(self.core.append_failed(
                batch[0].index, DiskFullError(f"{self.service}: no space left for the log"),
                self._log_info()))
            return
        self._writing = True
        self.wal.append(batch)
        self.k.after(self.k.rng.randint(0, 3), self._fsynced)

    def _fsynced(self) -> None:
        if self.closed:
            return
        self._writing = False
        self.wal.sync()
        self._run(self.core.appended(self._log_info()))
        if self._queued and not self._write_scheduled:
            self._write_scheduled = True
            self.k.after(0, self._write)

    # --- reads ---------------------------------------------------------------------------

    def query(self, req: ClientRequest) -> None:
        if self.core.holding:
            self.held.append(req)
            return
        deadline = self.core.read_floor_deadline_ms(self.agent.now)
        self._reads.append({"req": req, "floor_deadline": deadline, "token": None})
        self._pump_reads()

    def _pump_reads(self) -> None:
        """The reads' waits (Replica.query): for the read floor, then, outside the lease, for
        the epoch's confirmation; each wait bounded."""
        if not self._reads or self.closed:
            return
        reads, self._reads = self._reads, []
        core = self.core
        now = self.agent.now
        for read in reads:
            req = read["req"]
            try:
                core.check_primary(req.epoch_seen)
                token = read["token"]
                if token is None:
                    if not core.read_ready():
                        if now >= read["floor_deadline"]:
                            raise core.read_floor_error()
                        self._reads.append(read)
                        continue
                    if core.lease_valid(now):
                        self._answer_read(req)
                        continue
                    actions, token = core.confirm(now)
                    read.update(token=token, deadline=core.confirm_deadline_ms(now))
                    self._reads.append(read)
                    self._run(actions)
                    continue
                if core.confirmed(token):
                    self._answer_read(req)
                elif now >= read["deadline"]:
                    raise core.confirm_error()
                else:
                    self._reads.append(read)
            except (NotPrimaryError, Unavailable, ReplicaBrokenError) as exc:
                self.agent.answer(req, _refusal(exc))

    def _answer_read(self, req: ClientRequest) -> None:
        reply = self.sm.query(req.payload)
        self.c.check.on_read(self, req, reply)
        self.agent.answer(req, ("ok", reply.index, int(reply.status), self.epoch, False,
                                reply.data))

    # --- shipping (primary side) ---------------------------------------------------------

    def _send_batch(self, action: SendBatch) -> None:
        if action.entries_max == 0:
            records: tuple[Entry, ...] = ()
            last = action.first_index - 1
            following: list[Any] = []
        else:
            want = min(action.first_index + action.entries_max - 1, self.wal.last_index)
            records = tuple(self.wal.read(action.first_index, want))
            last = action.first_index - 1 + len(records)
            following = self.core.batch_read(action.host_id, action.batch_id, last)
        self.agent.ship(action.host_id, ("batch", self.service, self.epoch, action.batch_id,
                                         action.prev, action.first_index, last, records,
                                         action.commit_index))
        self._run(following)

    def _send_snapshot(self, host_id: str) -> None:
        """Installs our state on a duplica whose position the log no longer holds (the
        agent's `install_snapshot`: the state as of the newest snapshot, with its history)."""
        snap = self.wal.snapshot
        if snap is None or snap.index < self.wal.first_index - 1:
            snap = self.wal.take_snapshot(self.sm)
        self.agent.ship(host_id, ("snapshot", self.service, self.epoch, snap))

    def on_snapshot_answer(self, host_id: str, index: int, error: str) -> None:
        if error:
            self.core.snapshot_send_failed(host_id, error)
        else:
            self._run(self.core.snapshot_sent(host_id, index))

    def on_ack(self, host_id: str, ack: AckView) -> None:
        self._run(self.core.on_ack(host_id, ack, self.agent.now))

    def on_link_up(self, host_id: str) -> None:
        self._run(self.core.link_up(host_id, self.agent.now))

    def on_link_down(self, host_id: str) -> None:
        self.core.link_down(host_id)

    def tick(self, now_ms: int) -> None:
        self._run(self.core.tick(now_ms))

    # --- applying ------------------------------------------------------------------------

    def _apply_committed(self) -> None:
        core = self.core
        sm = core.sm
        limit = core.apply_limit(self.wal.durable_index)
        if sm.applied_index >= limit:
            return
        first = sm.applied_index + 1
        entries: list[Entry] = []
        while len(entries) < limit - first + 1:
            want = first + len(entries)
            if not self._unapplied or self._unapplied[0].index != want:
                self._reload_unapplied(want, limit)
            entry = self._unapplied.popleft()
            if entry.index != want:
                self.c.check.fail(f"{self.agent.host_id}/{self.service} would apply "
                                  f"{entry.index} after {want - 1}")
            entries.append(entry)
        replies = sm.apply_many(entries)
        check = self.c.check
        for entry, reply in zip(entries, replies, strict=True):
            check.on_apply(self, entry)
            check.on_execute(self, entry, reply)
            for req in self._waiters.pop(entry.index, ()):
                self._answer_write(req, reply, duplicate=False)
        if core.applied(first, limit):
            self._pump_reads()
        every = self.c.scenario.snapshot_every
        last = self.wal.snapshot.index if self.wal.snapshot is not None else 0
        if every and sm.applied_index - last >= every and not self._snapshot_scheduled:
            # A task of its own, as the agent's `_maybe_snapshot`: never in the middle of
            # carrying out a list of actions that read the log.
            self._snapshot_scheduled = True
            self.k.after(self.k.rng.randint(0, 3), self._snapshot)

    def _snapshot(self) -> None:
        """A snapshot, and the log compacted behind it but for `snapshot_retain` entries
        (the agent's take_snapshot and compact)."""
        self._snapshot_scheduled = False
        if self.closed or self.core.broken:
            return
        snap = self.wal.take_snapshot(self.sm)
        if self.wal.compact(snap.index - self.c.scenario.snapshot_retain):
            self.k.note(f"{self.agent.host_id}/{self.service} snapshot at {snap.index}, log "
                        f"from {self.wal.first_index}")
            self._run(self.core.log_compacted(self._log_info()))

    def _schedule_apply(self) -> None:
        """A duplica applies on a background task, after it has answered the stream."""
        if not self._apply_scheduled:
            self._apply_scheduled = True
            self.k.after(self.k.rng.randint(0, 5), self._apply_later)

    def _apply_later(self) -> None:
        self._apply_scheduled = False
        if not self.closed:
            self._apply_committed()
            self._progress()

    def _reload_unapplied(self, first: int, limit: int) -> None:
        """Finds the next entries to apply: in shipped batches kept in memory, else in the
        log (after a restart, or when they were dropped)."""
        while self._undecoded and self._undecoded[0][1] < first:
            self._undecoded.popleft()
        if self._undecoded and self._undecoded[0][0] <= first:
            _, _, records = self._undecoded.popleft()
            entries = [e for e in records if e.index >= first]
        else:
            if first < self.wal.first_index:
                self.c.check.fail(
                    f"inv12: {self.agent.host_id}/{self.service} would apply {first}, but its "
                    f"log starts at {self.wal.first_index}: its state and log do not meet")
            entries = self.wal.read(first, min(limit, first + 63))
        kept = [e for e in self._unapplied if e.index > entries[-1].index]
        self._unapplied = deque(entries)
        self._unapplied.extend(kept)

    # --- the receive path (duplica side) -------------------------------------------------

    def _ack(self, status: str, batch_id: int = 0, truncated: int = -1) -> AckView:
        w = self.wal
        return AckView(status, self.epoch, batch_id, w.durable_index,
                       LogPosition(w.last_epoch, w.last_index),
                       tuple(w.history) if status != "ok" else (), truncated)

    def _receive(self, event: Callable[[], list[Any]]) -> tuple[list[Any], str | None]:
        """Feeds a shipped item; a meta to persist first (a newer epoch adopted, or a
        primary stepping down) is written and the item fed again. Returns the actions and
        the refusal, if any."""
        actions = event()
        if actions and isinstance(actions[0], PersistMeta):
            if not self._persist(actions[0]):
                return [], "storage_error"
            actions = event()
        refused = next((a.status for a in actions if isinstance(a, Refuse)), None)
        self.refused_sender = refused == "not_primary" and self.role != PRIMARY
        return actions, refused

    def receive_probe(self, epoch: int, sender: str) -> AckView:
        _, refused = self._receive(lambda: self.core.on_probe(epoch, self.agent.now, sender))
        self._progress()
        return self._ack(refused or "mismatch")

    def receive_truncate(self, epoch: int, after_index: int, sender: str) -> AckView:
        duplica = self.core.duplica
        if (self.role != PRIMARY and duplica is not None and self.core.meta.mode == "sync"
                and epoch >= self.epoch and after_index < duplica.commit_index):
            self.c.check.fail(f"inv3: {self.agent.host_id}/{self.service} told to truncate "
                              f"after {after_index} below its commit index "
                              f"{duplica.commit_index} in sync mode")
        actions, refused = self._receive(
            lambda: self.core.on_truncate(epoch, after_index, self.agent.now, sender))
        if refused or not actions:
            self._progress()
            return self._ack(refused or "mismatch")
        (cut,) = actions
        assert isinstance(cut, Truncate), cut
        if cut.rewind:
            # Async mode only: back to a state at or below the cut (a snapshot, or empty),
            # replayed from the log as the commit index allows.
            fresh = self.wal.rewound_state(cut.after_index)
            if fresh is None:
                # As the agent's `receive_truncate`: it cannot go back on its own, so it is
                # broken, and the coordinator rebuilds it from a peer (invariant 12).
                why = f"cannot rewind to {cut.after_index}: no state at or below it"
                self.k.note(f"{self.agent.host_id}/{self.service} is broken: {why}")
                self.c.check.broken += 1
                self._run(self.core.mark_broken(why))
                return self._ack("storage_error")
            self.k.note(f"{self.agent.host_id}/{self.service} rewinds from "
                        f"{self.sm.applied_index} to {fresh.applied_index}")
            self.c.check.rewinds += 1
            self.core.state_replaced(fresh)
            self.executed = {}
            self._unapplied.clear()
            self._undecoded.clear()
        dropped = self.wal.truncate_after(cut.after_index)
        while self._unapplied and self._unapplied[-1].index > cut.after_index:
            self._unapplied.pop()
        while self._undecoded and self._undecoded[-1][0] > cut.after_index:
            self._undecoded.pop()
        if self._undecoded and self._undecoded[-1][1] > cut.after_index:
            self._undecoded.pop()
        self.core.truncated(cut.after_index, dropped, self._log_info())
        self.c.check.truncated += dropped
        if dropped:
            self.k.note(f"{self.agent.host_id}/{self.service} truncated {dropped} after "
                        f"{cut.after_index}")
        self._progress()
        return self._ack("ok", truncated=dropped)

    def receive_batch(self, sender: str, epoch: int, batch_id: int, prev: LogPosition,
                      first_index: int, last_index: int, records: tuple[Entry, ...],
                      commit_index: int) -> AckView:
        actions, refused = self._receive(lambda: self.core.on_batch(
            epoch, prev, last_index, commit_index, self._log_info(), self.agent.now, sender))
        if refused:
            self._progress()
            return self._ack(refused, batch_id)
        if actions and isinstance(actions[0], Append):
            if first_index != self.wal.last_index + 1:
                self.c.check.fail(f"{self.agent.host_id}/{self.service}: append at "
                                  f"{first_index} to a log ending at {self.wal.last_index}")
            if self.agent.disk_full():
                self.core.note_error("no space left for shipped entries", True)
                return self._ack("storage_error", batch_id)
            self.wal.append(records)
            self.wal.sync()
            self._undecoded.append((first_index, last_index, records))
            self.core.batch_appended(self._log_info())
        self._schedule_apply()
        self._progress()
        return self._ack("ok", batch_id)

    def receive_snapshot(self, epoch: int, snap: Snapshot, sender: str) -> str:
        """Installs a snapshot from the primary (Agent.receive_snapshot): state and log are
        replaced once it checked out; "" or the error."""
        core = self.core
        try:
            core.check_snapshot(epoch, sender)
        except FailoverError as exc:
            return str(exc)
        if self.agent.disk_full():
            return "no space left for the snapshot"
        fresh = snap.state()
        self.wal.install(snap)
        self._unapplied.clear()
        self._undecoded.clear()
        self.executed = {}
        self.k.note(f"{self.agent.host_id}/{self.service} installs a snapshot at {snap.index}")
        self.c.check.installs += 1
        core.snapshot_installed_here(fresh, snap.index, self._log_info())
        self._progress()
        return ""

    # --- leases, reports, switchover -----------------------------------------------------

    @property
    def matched_index(self) -> int:
        return int(self.core.status(self.wal.durable_index, self.agent.now)["matched_index"])

    def report(self) -> ReplicaReport:
        """This replica in a heartbeat (what net/convert.py's replica_reports decodes)."""
        s = self.core.status(self.wal.durable_index, self.agent.now)
        primary = s["role"] == PRIMARY
        return ReplicaReport(
            service=self.service, role=s["role"], epoch=s["epoch"],
            durable_index=s["durable_index"], commit_index=s["commit_index"],
            applied_index=s["applied_index"], truncated_entries=s["truncated_entries"],
            matched_index=s["matched_index"], disk_full=s["disk_full"],
            broken=(s["last_error"] or "broken") if s["broken"] else "",
            in_sync=tuple(s["in_sync"]) if primary else None,
            in_sync_generation=s["in_sync_generation"],
            in_sync_lag_ms=dict(s["in_sync_lag_ms"]) if primary else None,
            primary_host_id=None if primary else s["primary_host_id"],
            duplicas=tuple(s["duplicas"]) if primary else None)

    def prepare_switchover(self, epoch: int, target: str, timeout_ms: int,
                           token: CallToken, switchover_id: str) -> str | None:
        """Holds reads and writes until target has everything; None while waiting
        (answered later), else the refusal. `token` names the call (the coordinator's
        incarnation and operation), for the answer."""
        now = self.agent.now
        try:
            self.core.prepare_switchover(epoch, target, switchover_id, now)
        except NotPrimaryError:
            return "not_primary"
        except StaleEpochError:
            return "stale_epoch"
        except InvalidRequest:
            return "invalid"
        except (Unavailable, ReplicaBrokenError):
            return "unavailable"
        self.switch_waits[token] = {"target": target, "id": switchover_id}
        deadline = self.core.switchover_deadline_ms(now, timeout_ms)
        self.k.after(max(0, deadline - now), self._switchover_deadline, token)
        self._check_switchover()
        return None

    def release_switchover(self, epoch: int, switchover_id: str) -> None:
        actions = self.core.release_switchover(epoch, switchover_id)
        if actions is not None:
            self._run(actions)

    def _check_switchover(self) -> None:
        for token, wait in list(self.switch_waits.items()):
            if self.closed:
                return
            if self.switch_waits.get(token) is wait:
                self._check_one_switchover(token, wait)

    def _check_one_switchover(self, token: CallToken, wait: dict[str, Any]) -> None:
        """One waiting prepare call, as its handler in replica.py goes on."""
        if token not in self.c.coord.open_calls:
            # The call was cancelled (its operation ended, or the coordinator died): gRPC
            # cancels the handler, which releases its own hold only.
            del self.switch_waits[token]
            self._run(self.core.prepare_failed(wait["id"], self.agent.now))
            return
        try:
            ready = self.core.switchover_ready(wait["target"], wait["id"])
        except NotPrimaryError:
            del self.switch_waits[token]
            self._run(self.core.prepare_failed(wait["id"], self.agent.now))
            self.agent.switchover_answer(token, "not_primary", 0)
            return
        except Unavailable:
            del self.switch_waits[token]  # the hold ended (its deadline): nothing to release
            self.agent.switchover_answer(token, "unavailable", 0)
            return
        if ready is not None:
            del self.switch_waits[token]
            self._run(self.core.switchover_prepared(self.agent.now))
            self.agent.switchover_answer(token, "ok", ready[0])

    def _switchover_deadline(self, token: CallToken) -> None:
        wait = self.switch_waits.get(token)
        if self.closed or wait is None:
            return
        del self.switch_waits[token]
        self._run(self.core.prepare_failed(wait["id"], self.agent.now))
        self.agent.switchover_answer(token, "unavailable", 0)


# --- ship streams -------------------------------------------------------------------------

_ITEM_ORDER = {"probe": 0, "truncate": 1, "snapshot": 1, "batch": 2}


class ShipLink:
    """The sending side of the Ship stream from one host to a peer (agent/links.py)."""

    def __init__(self, owner: SimAgent, peer: str) -> None:
        self.owner = owner
        self.node = owner.host_id
        self.c = owner.c
        self.k = owner.k
        self.peer = peer
        self.up = False
        self.dead = False
        self.session = 0
        self.peer_incarnation = 0
        self.outbox: list[tuple[Any, ...]] = []
        self.flush_scheduled = False
        self.send_at = 0  # the stream is in order: deliveries never overtake each other
        self.reply_at = 0
        self.backoff_ms = LINK_BACKOFF_MIN_MS

    def start(self) -> None:
        self.k.after(0, self._connect, self.session)

    def _connect(self, session: int) -> None:
        if self.dead or self.up or session != self.session:
            return
        peer = self.c.agents[self.peer]
        net = self.c.net
        rtt = net.latency() + net.latency()
        if peer.up and not net.cut(self.owner.host_id, self.peer):
            self.k.after(rtt, self._established, session, peer.incarnation)
        else:
            self.k.after(rtt, self._retry, session)

    def _established(self, session: int, peer_incarnation: int) -> None:
        if self.dead or self.up or session != self.session:
            return
        peer = self.c.agents[self.peer]
        if (not peer.up or peer.incarnation != peer_incarnation
                or self.c.net.cut(self.owner.host_id, self.peer)):
            self._retry(session)
            return
        self.session += 1
        self.up = True
        self.peer_incarnation = peer_incarnation
        self.outbox = []
        self.send_at = self.reply_at = self.k.now
        self.k.note(f"link {self.owner.host_id}->{self.peer} up")
        self.owner.on_link_up(self.peer)

    def _retry(self, session: int) -> None:
        if self.dead or session != self.session:
            return
        # The agent's link doubles its backoff on every broken session and never resets it.
        delay = int(self.backoff_ms * self.k.rng.uniform(0.5, 1.0))
        self.backoff_ms = min(self.backoff_ms * 2, LINK_BACKOFF_MAX_MS)
        self.k.after(delay, self._connect, session)

    def brk(self, why: str) -> None:
        """The stream broke: nothing in flight arrives, the owner hears of it, reconnects."""
        if self.dead or not self.up:
            return
        self.up = False
        self.session += 1
        self.outbox = []
        self.k.note(f"link {self.owner.host_id}->{self.peer} broke: {why}")
        self.owner.on_link_down(self.peer)
        self._retry(self.session)

    def destroy(self) -> None:
        self.dead = True
        self.up = False
        self.session += 1

    def send(self, item: tuple[Any, ...]) -> None:
        if not self.up:
            return  # link_up re-probes everything anyway
        self.outbox.append(item)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.k.after(self.k.rng.choice((0, 0, 0, 1, 2)), self._flush, self.session)

    def _flush(self, session: int) -> None:
        self.flush_scheduled = False
        if session != self.session or not self.up or not self.outbox:
            return
        items = sorted(self.outbox, key=lambda item: _ITEM_ORDER[item[0]])  # stable
        self.outbox = []
        self.k.shipped += len(items)
        if self.k.shipped > self.k.MAX_SHIPPED:
            self.k.note("VIOLATION runaway")
            raise InvariantViolation(
                f"liveness: more than {self.k.MAX_SHIPPED} items shipped by {self.k.now} ms: "
                "a message storm (see the trace's last lines)")
        net = self.c.net
        if net.ship_break_p and self.k.rng.random() < net.ship_break_p:
            self.brk("message lost")
            return
        when = max(self.k.now + net.latency(), self.send_at)
        self.send_at = when
        # Read by the peer's process: it waits while that process is paused.
        self.k.after(when - self.k.now, self.c.agents[self.peer].on_ship_message, self,
                     session, items)

    def _deliver(self, session: int, items: list[tuple[Any, ...]]) -> None:
        if session != self.session or not self.up:
            return
        peer = self.c.agents[self.peer]
        if (not peer.up or peer.incarnation != self.peer_incarnation
                or self.c.net.cut(self.owner.host_id, self.peer)):
            self.brk("peer unreachable")
            return
        acks = peer.receive(self.owner.host_id, items)
        when = max(self.k.now + self.c.net.latency(), self.reply_at)
        self.reply_at = when
        self.k.after(when - self.k.now, self._acks, session, acks)

    def _acks(self, session: int, acks: list[tuple[str, AckView]]) -> None:
        if session != self.session or not self.up:
            return
        if self.c.net.cut(self.owner.host_id, self.peer):
            self.brk("reply lost")
            return
        self.owner.on_acks(self.peer, acks)


# --- a simulated host (mirrors failover/agent/host.py) -------------------------------------


class SimAgent:
    """One host's agent: its replicas (durable parts survive a crash), links, heartbeats."""

    def __init__(self, cluster: Cluster, host_id: str) -> None:
        self.c = cluster
        self.k = cluster.k
        self.host_id = host_id
        self.node = host_id
        self.address = host_id
        self.up = False
        self.incarnation = 0
        self.started_at = 0
        self.disks: dict[str, ReplicaDisk] = {}
        self.replicas: dict[str, SimReplica] = {}
        self.links: dict[str, ShipLink] = {}
        self.registered = False
        self.beat_id = 0
        self.beat_pending: int | None = None
        self.full_until = 0  # true time until which its data dir has no space left
        s = cluster.scenario
        self.limits = ShipLimits(batch_entries_max=s.batch_entries_max,
                                 inflight_batches_max=s.inflight_batches_max,
                                 keepalive_ms=HEARTBEAT_MS)

    @property
    def now(self) -> int:
        """This host's clock (what `failover.clock.monotonic_ms` returns there)."""
        return self.k.clock(self.node)

    def disk_full(self) -> bool:
        """Whether a write to this host's data dir fails for want of space now."""
        return self.k.now < self.full_until

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.up = True
        self.incarnation += 1
        self.started_at = self.now
        self.registered = False
        self.beat_pending = None
        self.k.note(f"{self.host_id} starts (incarnation {self.incarnation})")
        for name in sorted(self.disks):
            self.replicas[name] = SimReplica.recover(self, self.disks[name])
        inc = self.incarnation
        self.k.after(self.k.rng.randint(0, HEARTBEAT_MS), self._beat, inc)
        self.k.after(self.k.rng.randint(1, TICK_MS), self._tick, inc)

    def crash(self, damage_snapshots: bool = False, report: bool = False) -> None:
        """The agent's process dies (with `report`, its supervisor lives on and tells the
        coordinator, `failover.agent.supervisor`; without, the whole host is gone)."""
        lost = {name: disk.wal.crash() for name, disk in sorted(self.disks.items())}
        self.k.note(f"{self.host_id} crashes, losing unsynced entries {lost}"
                    + (" (its supervisor reports it)" if report else ""))
        if report:
            self.report_exit(self.incarnation)
        if damage_snapshots:
            # Only a duplica's: a damaged primary that acknowledged writes alone would be the
            # loss of the one copy (two faults), which no failover can undo.
            for name, disk in sorted(self.disks.items()):
                snap = disk.wal.snapshot
                if snap is not None and disk.meta.role != PRIMARY:
                    disk.wal.snapshots[-1] = replace(snap, damaged=True)
                    self.k.note(f"{self.host_id}/{name}: snapshot at {snap.index} damaged")
        self.up = False
        self.incarnation += 1
        for replica in self.replicas.values():
            replica.close()
            for token in replica.switch_waits:  # the coordinator's calls fail at once
                self.switchover_answer(token, "unavailable", 0, force=True)
            replica.switch_waits.clear()
        self.replicas = {}
        for link in self.links.values():
            link.destroy()
        self.links = {}
        for other in self.c.agents.values():
            link = other.links.get(self.host_id)
            if link is not None and link.up:
                self.k.after(self.k.rng.randint(1, 10), link.brk, "peer crashed")

    def report_exit(self, incarnation: int, late_ms: int | None = None) -> None:
        """The supervisor's `ProcessExited`: a unary call (lost, duplicated, delayed like
        any), sometimes held `late_report_ms` in the network, sometimes sent once more."""
        s = self.c.scenario
        for attempt in range(2):
            late = late_ms or 0
            if late_ms is None and s.late_report_p and self.k.rng.random() < s.late_report_p:
                late = self.k.rng.randint(*s.late_report_ms)
            if late:
                self.k.note(f"{self.host_id}'s exit report of incarnation {incarnation} is "
                            f"held {late} ms in the network")
            self.c.net.send(self.host_id, COORD, self.c.coord.on_exit_report, self.host_id,
                            incarnation, late_ms=late)
            if attempt or not (s.report_again_p and self.k.rng.random() < s.report_again_p):
                break

    def _tick(self, inc: int) -> None:
        if inc != self.incarnation or not self.up:
            return
        now = self.now
        for replica in list(self.replicas.values()):
            replica.tick(now)
        self.k.after(TICK_MS, self._tick, inc)

    # --- heartbeats ----------------------------------------------------------------------

    def _beat(self, inc: int) -> None:
        if inc != self.incarnation or not self.up:
            return
        self.beat_id += 1
        bid = self.beat_id
        info = None if self.registered else HostInfo(
            self.host_id, self.address, version="sim", started_at=float(self.started_at),
            incarnation=inc)
        reports = [r.report() for r in self.replicas.values()]
        self.beat_pending = bid
        s = self.c.scenario
        late = 0
        if s.late_beat_p and self.c.nemesis.active and self.k.rng.random() < s.late_beat_p:
            late = self.k.rng.randint(*s.late_beat_ms)
            self.k.note(f"{self.host_id}'s heartbeat {bid} is held {late} ms in the network")
        self.c.net.send(self.host_id, COORD, self.c.coord.on_beat, self.host_id, inc, bid, info,
                        reports, self.now, late_ms=late)
        self.k.after(2 * HEARTBEAT_MS, self._beat_timeout, inc, bid)

    def on_beat_reply(self, inc: int, bid: int, ok: bool, leases: list[tuple[str, int, int]],
                      sent_ms: int) -> None:
        if inc != self.incarnation or not self.up or self.beat_pending != bid:
            return
        self.beat_pending = None
        self.registered = ok
        for service, epoch, lease_ms in leases:
            replica = self.replicas.get(service)
            if replica is not None:
                replica.grant_lease(epoch, lease_ms, sent_ms)
        self.k.after(max(0, sent_ms + HEARTBEAT_MS - self.now), self._beat, inc)

    def _beat_timeout(self, inc: int, bid: int) -> None:
        if inc != self.incarnation or not self.up or self.beat_pending != bid:
            return
        self.beat_pending = None
        self.registered = False
        self._beat(inc)

    # --- links ---------------------------------------------------------------------------

    def ensure_links(self, peers: dict[str, str]) -> None:
        for host_id in peers:
            if host_id not in self.links:
                link = ShipLink(self, host_id)
                self.links[host_id] = link
                link.start()

    def link_is_up(self, host_id: str) -> bool:
        link = self.links.get(host_id)
        return link is not None and link.up

    def on_link_up(self, host_id: str) -> None:
        for replica in list(self.replicas.values()):
            replica.on_link_up(host_id)

    def on_link_down(self, host_id: str) -> None:
        for replica in list(self.replicas.values()):
            replica.on_link_down(host_id)

    def ship(self, host_id: str, item: tuple[Any, ...]) -> None:
        link = self.links.get(host_id)
        assert link is not None, f"{self.host_id} has no link to {host_id}"
        link.send(item)

    def on_acks(self, host_id: str, acks: list[tuple[str, Any]]) -> None:
        for service, ack in acks:
            replica = self.replicas.get(service)
            if replica is None:
                continue
            if isinstance(ack, AckView):
                replica.on_ack(host_id, ack)
            else:  # the answer to a snapshot install
                replica.on_snapshot_answer(host_id, *ack)

    def on_ship_message(self, link: ShipLink, session: int, items: list[tuple[Any, ...]]) -> None:
        link._deliver(session, items)

    def receive(self, src: str, items: list[tuple[Any, ...]]) -> list[tuple[str, Any]]:
        """Handles one message of a Ship stream; answers every item."""
        acks: list[tuple[str, Any]] = []
        for item in items:
            what, service, epoch = item[0], item[1], item[2]
            replica = self.replicas.get(service)
            if what == "snapshot":
                error = "unknown service" if replica is None else replica.receive_snapshot(
                    epoch, item[3], src)
                acks.append((service, (item[3].index, error)))
            elif replica is None or replica.role not in (DUPLICA, PRIMARY, "building"):
                batch_id = item[3] if what == "batch" else 0
                acks.append((service, AckView("unknown_service", 0, batch_id)))
            elif replica.core.broken:  # host.py `_refusal`: a storage error at its epoch
                batch_id = item[3] if what == "batch" else 0
                acks.append((service, AckView("storage_error", replica.epoch, batch_id)))
            elif what == "probe":
                acks.append((service, replica.receive_probe(epoch, src)))
            elif what == "truncate":
                acks.append((service, replica.receive_truncate(epoch, item[3], src)))
            else:
                acks.append((service, replica.receive_batch(src, epoch, *item[3:])))
        return acks

    # --- control calls -------------------------------------------------------------------

    def on_assign(self, action: AssignRole) -> None:
        if not self.up:
            return
        error = self._assign(action)
        self.k.note(f"{self.host_id} AssignRole {action.service} {action.role} e{action.epoch} "
                    f"in_sync={list(action.in_sync)}{' FAILED ' + error if error else ''}")

    def _assign(self, a: AssignRole) -> str:
        if self.host_id in a.duplicas:
            return "own duplica"
        if set(a.in_sync) - set(a.duplicas):
            return "in-sync hosts are not duplicas"
        replica = self.replicas.get(a.service)
        if replica is None:
            if self.disk_full():
                return "no space left to create the replica"
            disk = ReplicaDisk(ReplicaMeta(a.service, a.kind, a.role, a.epoch, a.mode))
            self.disks[a.service] = disk
            replica = SimReplica.recover(self, disk)
            self.replicas[a.service] = replica
        return replica.assign(a.role, a.epoch, a.mode, a.primary, dict(a.duplicas),
                              set(a.in_sync), a.in_sync_generation)

    def on_drop(self, action: DropReplica) -> None:
        """Mirrors `Agent.drop_replica`: refused at an older epoch, else the replica and its
        data are gone."""
        if not self.up:
            return
        replica = self.replicas.get(action.service)
        if replica is None or action.epoch < replica.epoch:
            return
        self.k.note(f"{self.host_id} DropReplica {action.service} e{action.epoch}")
        replica.close()
        del self.replicas[action.service]
        del self.disks[action.service]

    def on_step_down(self, action: CoordStepDown) -> None:
        if not self.up:
            return
        replica = self.replicas.get(action.service)
        if replica is None or action.epoch < replica.epoch:
            return
        self.k.note(f"{self.host_id} StepDown {action.service} e{action.epoch}")
        replica.step_down(action.epoch, "told by the coordinator")

    def on_hears(self, token: tuple[int, int], service: str) -> None:
        if not self.up:
            return
        replica = self.replicas.get(service)
        if replica is None:
            answer = HearsAnswer(self.host_id, reachable=False)
        else:
            hears, _ = replica.core.hears_primary(self.now)
            # server.py asks GetStatus for the matched index, not the durable one.
            answer = HearsAnswer(self.host_id, True, hears, replica.matched_index,
                                 replica.epoch)
        self.c.net.send(self.host_id, COORD, self.c.coord.on_hears_answer, token, answer)

    def on_prepare_switchover(self, token: CallToken, action: PrepareSwitchover) -> None:
        if not self.up:
            self.switchover_answer(token, "unavailable", 0, force=True)
            return
        replica = self.replicas.get(action.service)
        if replica is None:
            self.switchover_answer(token, "not_found", 0)
            return
        answer = replica.prepare_switchover(action.epoch, action.target, action.timeout_ms,
                                            token, action.switchover_id)
        if answer is not None:
            self.switchover_answer(token, answer, 0)

    def on_release_switchover(self, action: ReleaseSwitchover) -> None:
        replica = self.replicas.get(action.service) if self.up else None
        if replica is not None:
            replica.release_switchover(action.epoch, action.switchover_id)

    def switchover_answer(self, token: CallToken, status: str, last: int,
                          force: bool = False) -> None:
        if self.up or force:
            self.c.net.send(self.host_id, COORD, self.c.coord.on_prepared, token, status,
                            dup=False)

    # --- the data path -------------------------------------------------------------------

    def on_execute(self, req: ClientRequest) -> None:
        if not self.up:
            # The connection is refused: the client hears so at once.
            self.c.net.send(self.host_id, req.client, self.c.clients[req.client].on_reply,
                            req.seq, req.attempt, self.host_id, ("unavailable", "down", 0),
                            dup=False)
            return
        replica = self.replicas.get(req.service)
        if replica is None:
            self.answer(req, ("not_primary", "", 0))
            return
        replica.execute(req)

    def answer(self, req: ClientRequest, reply: tuple[Any, ...]) -> None:
        client = self.c.clients[req.client]
        self.c.net.send(self.host_id, req.client, client.on_reply, req.seq, req.attempt,
                        self.host_id, reply, dup=False)


# --- the coordinator (mirrors failover/coordinator/server.py) -------------------------------


def _timing() -> Timing:
    """The coordinator's timing (the margin read now, as the daemon reads its config)."""
    return Timing(HEARTBEAT_MS, FAILURE_TIMEOUT_MS, LEASE_MS, HOST_DEAD_MS,
                  lease_drift_margin_ms=defaults.LEASE_DRIFT_MARGIN_MS)


class SimCoordinator:
    """CoordinatorCore plus a dict standing in for its store; restarts restore from it, and
    so does a failed commit (server.py `_reload`): the memory the core changed before the
    `Persist` is dropped, never acted on (invariant 15)."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.k = cluster.k
        self.node = COORD
        self.store: dict[str, bytes] = {}
        self.up = False
        self.incarnation = 0
        self.core: CoordinatorCore | None = None
        self._asks: dict[tuple[int, int], dict[str, Any]] = {}
        self._next_token = 0
        # Prepare calls awaiting their answer; a call that leaves this (its operation ended,
        # the coordinator died) is cancelled, and the agent's handler sees that (gRPC).
        self.open_calls: dict[CallToken, bool] = {}
        self._calls_made = 0
        self._plans: list[Any] = []  # the core's plans this daemon has started
        self.created: set[str] = set()
        self.store_fail_p = 0.0  # the chance that a commit fails (atomically: nothing written)
        self.migrations: set[str] = set()  # migrate operations begun
        self.reloads = 0

    @property
    def now(self) -> int:
        """The coordinator host's clock."""
        return self.k.clock(self.node)

    def boot(self) -> None:
        self.up = True
        self.incarnation += 1
        self.k.note(f"coordinator starts (incarnation {self.incarnation})")
        self.core = CoordinatorCore(_timing())
        self.execute(self.core.restore(dict(self.store), self.now))
        self.k.after(self.k.rng.randint(1, TICK_MS), self._tick, self.incarnation)

    def crash(self) -> None:
        self.k.note("coordinator crashes")
        self.up = False
        self.incarnation += 1
        self.core = None
        self._asks = {}
        self.open_calls = {}
        self._plans = []

    def _tick(self, inc: int) -> None:
        if inc != self.incarnation or not self.up:
            return
        assert self.core is not None
        self.execute(self.core.tick(self.now))
        self.k.after(TICK_MS, self._tick, inc)

    def _token(self) -> tuple[int, int]:
        self._next_token += 1
        return (self.incarnation, self._next_token)

    def _reload(self) -> None:
        """After a failed commit: a new core from the store, as after a restart (what the
        server's `_reload` does); the operations in flight end, releasing their holds."""
        self.reloads += 1
        self.k.note("coordinator: store commit failed: reloading from the store")
        self.core = CoordinatorCore(_timing())
        actions = self.core.restore(dict(self.store), self.now)
        actions.extend(self._abandon_operations("the coordinator reloaded after a failed commit"))
        assert not any(isinstance(a, Persist) for a in actions), actions
        self.execute(actions)

    def execute(self, actions: list[Action]) -> bool:
        """Carries out actions in order; a Persist is durable before the next one. False when
        a commit failed: the core was reloaded and the rest was not carried out."""
        check = self.c.check
        for action in actions:
            if isinstance(action, Persist):
                if self.store_fail_p and self.k.rng.random() < self.store_fail_p:
                    self._reload()
                    return False
                for key, value in action.puts.items():
                    check.on_persist(key, value)
                    self.store[key] = value
                for key in action.deletes:
                    self.store.pop(key, None)
                for service, kind, text, details in action.history:
                    if kind in ("failover", "switchover", "in_sync", "rejoin",
                                "failover_blocked", "suspicion", "placement", "rebuilt",
                                "retired"):
                        self.k.note(f"coordinator: {text}")
                    if kind == "failover":
                        check.failovers += 1
                        check.on_failover(service, details["old_primary"])
                    elif kind == "switchover":
                        check.switchovers += 1
                    elif kind == "rebuilt":
                        check.rebuilt += 1
                    elif kind == "retired":
                        check.retired += 1
            elif isinstance(action, AssignRole):
                check.on_coordinator_says(action.service, action.epoch, "AssignRole")
                agent = self.c.agents[action.host_id]
                self.c.net.send_fifo(COORD, action.host_id, agent.on_assign, action)
            elif isinstance(action, CoordStepDown):
                check.on_coordinator_says(action.service, action.epoch, "StepDown")
                agent = self.c.agents[action.host_id]
                self.c.net.send_fifo(COORD, action.host_id, agent.on_step_down, action)
            elif isinstance(action, DropReplica):
                check.on_coordinator_says(action.service, action.epoch, "DropReplica")
                agent = self.c.agents[action.host_id]
                self.c.net.send_fifo(COORD, action.host_id, agent.on_drop, action)
            elif isinstance(action, AskHearsPrimary):
                self._ask(action)
            elif isinstance(action, StartSwitchover):
                # A drain moves a primary off (server.py `_move_primary`).
                self._next_token += 1
                op_id = f"op{self.incarnation}.{self._next_token}"
                assert self.core is not None
                moved = self.core.start_primary_move(op_id, action, self.now)
                self._track(op_id)
                if not self.execute(moved):
                    return False
            elif isinstance(action, PrepareSwitchover):
                self._prepare(action)
            elif isinstance(action, ReleaseSwitchover):
                agent = self.c.agents[action.host_id]
                self.c.net.send(COORD, action.host_id, agent.on_release_switchover, action,
                                dup=False)
            elif isinstance(action, StartMigration):
                # The sim has no page copy (the migration engine is tested on its own): the
                # source answers that it cannot, and the source serves on.
                assert self.core is not None
                if not self.execute(self.core.answer(
                        action.op_id, Copied(False, why="no page copy in the simulation"),
                        self.now)):
                    return False
            elif isinstance(action, Progress):
                pass
            elif isinstance(action, Done | Failed):
                # The operation's calls still open are cancelled (server.py `_ended`).
                for token in [t for t in self.open_calls
                              if t[:2] == (self.incarnation, action.op_id)]:
                    del self.open_calls[token]
                if isinstance(action, Done) and action.op_id in self.migrations:
                    check.migrated += 1
                self.k.note(f"coordinator: operation {action.op_id} "
                            f"{'done' if isinstance(action, Done) else 'failed: ' + action.why}")
            elif isinstance(action, PushRoutes):
                for route in action.routes:
                    check.on_coordinator_says(route.service, route.epoch, "PushRoutes")
                for client in self.c.clients.values():
                    self.c.net.send(COORD, client.name, client.on_routes, action)
            else:
                raise AssertionError(f"unknown action {action!r}")
        return True

    # --- calls from agents and operators -------------------------------------------------

    def on_beat(self, host: str, inc: int, bid: int, info: HostInfo | None,
                reports: list[ReplicaReport], sent_ms: int) -> None:
        if not self.up:
            return
        assert self.core is not None
        ok = True
        leases: list[tuple[str, int, int]] = []
        try:
            if info is not None and not self.execute(self.core.register(info, self.now,
                                                                         SIM_METRICS)):
                return  # the call fails: the agent tries again
            leases, actions = self.core.heartbeat(host, SIM_METRICS, reports, self.now,
                                                  incarnation=inc)
            if not self.execute(actions):
                return  # no lease comes of a heartbeat whose changes were not persisted
        except InvalidRequest:
            ok = False
        agent = self.c.agents[host]
        self.c.net.send(COORD, host, agent.on_beat_reply, inc, bid, ok, leases, sent_ms,
                        dup=False)

    def on_exit_report(self, host: str, incarnation: int) -> None:
        """A host's supervisor says its agent process of `incarnation` exited (server.py's
        `process_exited`)."""
        if not self.up:
            return
        assert self.core is not None
        self.c.check.exit_reports += 1
        try:
            actions = self.core.process_exited(host, incarnation, -9, self.now)
        except InvalidRequest as exc:
            self.k.note(f"coordinator: exit report refused: {exc}")
            return
        for notice in self.core.take_notices():
            self.k.note(f"coordinator: {notice}")
        if actions:
            self.c.check.exit_reports_acted += 1
            self.k.note(f"coordinator: {host}'s agent process {incarnation} exited: acting")
        self.execute(actions)

    def _ask(self, action: AskHearsPrimary) -> None:
        token = self._token()
        assert self.core is not None
        # Each host's answer is awaited as the real coordinator awaits it (the core's
        # `hears_timeout_ms`: longer for a host it still hears); the round ends with the last.
        deadlines = {h: self.now + self.core.hears_timeout_ms(h, self.now) for h in action.hosts}
        self._asks[token] = {"action": action, "answers": {}, "deadlines": deadlines}
        for host in action.hosts:
            self.c.net.send(COORD, host, self.c.agents[host].on_hears, token, action.service)
        self.k.after(max(deadlines.values(), default=self.now) - self.now, self._ask_done,
                     token)

    def on_hears_answer(self, token: tuple[int, int], answer: HearsAnswer) -> None:
        ask = self._asks.get(token)
        if ask is None or not self.up:
            return
        if self.now > ask["deadlines"].get(answer.host_id, self.now):
            return  # past its call's deadline: the real call failed with DEADLINE_EXCEEDED
        ask["answers"][answer.host_id] = answer
        if len(ask["answers"]) == len(ask["action"].hosts):
            self._ask_done(token)

    def _ask_done(self, token: tuple[int, int]) -> None:
        ask = self._asks.pop(token, None)
        if ask is None or not self.up:
            return
        assert self.core is not None
        action: AskHearsPrimary = ask["action"]
        answers = [ask["answers"].get(h, HearsAnswer(h, reachable=False)) for h in action.hosts]
        self.execute(self.core.hears_primary(action.service, answers, self.now))

    def create_services(self) -> bool:
        """The operator creates the services once every host is registered."""
        if not self.up:
            return False
        assert self.core is not None
        s = self.c.scenario
        for i in range(1, s.services + 1):
            name = f"s{i}"
            if name in self.created:
                continue
            if len(self.core.hosts) < s.hosts:
                return False
            try:
                actions = self.core.create_service(name, "kv", min(3, s.hosts), s.mode,
                                                   self.now)
            except InvalidRequest:
                return False
            if not self.execute(actions):
                return False
            self.created.add(name)
        return True

    # --- operations: the core's plans, carried out here (server.py) ---------------------

    def start_switchover(self, name: str = "", to_host: str = "",
                         cancel_after_ms: int | None = None) -> str:
        """An operator's switchover (server.py `switchover`, a `SwitchoverPlan` of the core);
        its caller may go away after `cancel_after_ms` (a CLI deadline, Ctrl-C). Returns the
        operation's id ("" if it was refused)."""
        if not self.up:
            return ""
        assert self.core is not None
        name = name or self.k.rng.choice(sorted(self.core.services))
        self._next_token += 1
        op_id = f"op{self.incarnation}.{self._next_token}"
        try:
            actions = self.core.start_switchover(op_id, name, to_host, self.now)
        except InvalidRequest:
            return ""
        self.k.note(f"coordinator: operation {op_id}: switchover of {name} begins")
        self._track(op_id)
        if cancel_after_ms is not None:
            self.k.after(cancel_after_ms, self.cancel, op_id, self.incarnation)
        self.execute(actions)
        return op_id

    def start_migration(self) -> str:
        """An operator moves a replica (the primary or a duplica) of a service to a host
        that holds none (a `MigratePlan`), by replay: the target is built from a snapshot
        and the log as a building replica, a moving primary is switched over to it, the
        source is retired. Returns the operation's id ("" if refused)."""
        if not self.up:
            return ""
        assert self.core is not None
        rng = self.k.rng
        name = rng.choice(sorted(self.core.services))
        free = [h for h in sorted(self.core.hosts) if h not in self.core.services[name].replicas]
        if not free:
            return ""
        to_host, replica = rng.choice(free), rng.choice((PRIMARY, DUPLICA))
        self._next_token += 1
        op_id = f"op{self.incarnation}.{self._next_token}"
        try:
            actions = self.core.start_migration(op_id, name, to_host, self.now, replica,
                                                method="replay")
        except InvalidRequest:
            return ""
        self.k.note(f"coordinator: operation {op_id}: {replica} of {name} moves to {to_host}")
        self.migrations.add(op_id)
        self._track(op_id)
        self.execute(actions)
        return op_id

    def cancel(self, op_id: str, inc: int) -> None:
        """The operation's caller went away (server.py `_drop`)."""
        if self.up and inc == self.incarnation and self.core is not None:
            self.k.note(f"coordinator: the caller of {op_id} went away")
            self.execute(self.core.cancel(op_id, "its caller went away", self.now))

    def _prepare(self, action: PrepareSwitchover) -> None:
        """The call to the primary, bounded by `answer_within_ms` (an unanswered call fails)."""
        self._calls_made += 1  # a prepare asked again is a call of its own
        token = (self.incarnation, action.op_id, self._calls_made)
        self.open_calls[token] = True
        agent = self.c.agents[action.host_id]
        self.c.net.send(COORD, action.host_id, agent.on_prepare_switchover, token, action,
                        dup=False)
        self.k.after(action.answer_within_ms, self.on_prepared, token, "deadline exceeded")

    def on_prepared(self, token: CallToken, status: str) -> None:
        if not self.up or token[0] != self.incarnation or not self.open_calls.pop(token, False):
            return
        assert self.core is not None
        self.execute(self.core.answer(token[1], Prepared(status == "ok", status), self.now))

    def _track(self, op_id: str) -> None:
        assert self.core is not None
        plan = self.core.operations.get(op_id)
        if plan is not None:
            self._plans = [p for p in self._plans if not p.finished]
            self._plans.append(plan)

    def _abandon_operations(self, why: str) -> list[Action]:
        """After a reload: every operation of the old core ends, releasing what it holds
        (server.py `_reload`)."""
        assert self.core is not None
        actions: list[Action] = []
        for plan in self._plans:
            if not plan.finished:
                actions.extend(plan.abandon(why))
        self._plans = []
        self.open_calls = {}
        return actions


# --- clients ------------------------------------------------------------------------------


class SimClient:
    """A client issuing kv puts and gets with request ids, retrying like
    `failover.client.Client`: routes pushed by the coordinator, redirects from
    non-primaries, the agents as seeds. It records every call in the history."""

    ATTEMPT_TIMEOUT_MS = 500
    BUDGET_MS = 3000

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.c = cluster
        self.k = cluster.k
        self.name = name
        self.process = int(name[1:]) if name[1:].isdigit() else 0
        self.routes: dict[str, tuple[str, int]] = {}
        self.seq = 0
        self.op: Call | None = None
        self.attempt = 0
        self.target = ""
        self.epoch_seen = 0
        self.backoff_ms = CLIENT_BACKOFF_MIN_MS
        self.active = False
        self.seed_cursor = 0
        self.done_ops: list[Call] = []
        # Sessions, as failover.client.Client keeps them: per service the session id and
        # whether the service is known to hold it; an op that opens one marks its attempts
        # only until one of them may have reached the log.
        self.sessions: dict[str, tuple[str, bool]] = {}
        self.session_numbers = 0
        self.opener = False
        self.may_have_logged = False

    @property
    def idle(self) -> bool:
        return self.op is None

    def start(self) -> None:
        self.active = True
        self.k.after(self.k.rng.randint(*self.c.scenario.think_ms), self._next_op)

    def _next_op(self) -> None:
        if not self.active or self.op is not None:
            return
        s = self.c.scenario
        rng = self.k.rng
        service = f"s{rng.randint(1, s.services)}"
        kind = "get" if s.read_ratio and rng.random() < s.read_ratio else "put"
        # Now and then a put nested too deep to log (it must be refused before the log).
        depth = defaults.REQUEST_DEPTH_MAX + 8 if s.poison_p and rng.random() < s.poison_p else 0
        self.begin(service, f"k{rng.randint(1, s.keys)}", kind, depth)

    def begin(self, service: str, key: str, kind: str = "put", depth: int = 0) -> Call:
        self.seq += 1
        session, known = self.sessions.setdefault(service, (self.name, False))
        self.opener, self.may_have_logged = kind == "put" and not known, False
        value = f"{self.name}.{self.seq}" if kind == "put" else ""
        op = Call(session, self.seq, service, key, kind, value, self.k.now, depth=depth)
        self.op = op
        self.attempt = 0
        self.backoff_ms = CLIENT_BACKOFF_MIN_MS
        self._try()
        return op

    def _try(self) -> None:
        op = self.op
        if op is None:
            return
        if self.k.now - op.invoke_ms >= self.BUDGET_MS:
            self._finish("unknown", 0)
            return
        route = self.routes.get(op.service)
        if route is None:
            hosts = sorted(self.c.agents)
            self.seed_cursor = (self.seed_cursor + 1) % len(hosts)
            route = (hosts[self.seed_cursor], 0)
        self.target, self.epoch_seen = route
        self.attempt += 1
        req = ClientRequest(self.name, op.seq, self.attempt, op.service, self.epoch_seen,
                            op.payload(), self.opener and not self.may_have_logged,
                            op.session, invoke_ms=op.invoke_ms)
        self.c.net.send(self.name, self.target, self.c.agents[self.target].on_execute, req)
        self.k.after(self.ATTEMPT_TIMEOUT_MS, self._attempt_timeout, op.seq, self.attempt)

    def _attempt_timeout(self, seq: int, attempt: int) -> None:
        if self.op is not None and self.op.seq == seq and self.attempt == attempt:
            self._retry(self.target)

    def _retry(self, address: str, may_have_logged: bool = True) -> None:
        assert self.op is not None
        # A timeout or an unknown outcome: the attempt may be in the log (not so for a
        # non-primary's refusal).
        self.may_have_logged = self.may_have_logged or may_have_logged
        self.routes.pop(self.op.service, None)  # with seeds: ask around
        self.attempt += 1  # answers to the abandoned attempt are ignored
        delay = self.backoff_ms
        self.backoff_ms = min(self.backoff_ms * 2, CLIENT_BACKOFF_MAX_MS)
        self.k.after(delay, self._try_if, self.op.seq, self.attempt)

    def _try_if(self, seq: int, attempt: int) -> None:
        if self.op is not None and self.op.seq == seq and self.attempt == attempt:
            self._try()

    def on_reply(self, seq: int, attempt: int, host: str, reply: tuple[Any, ...]) -> None:
        op = self.op
        if op is None or op.seq != seq or attempt != self.attempt:
            return
        kind = reply[0]
        if kind == "ok":
            _, index, status, epoch, _duplicate, data = reply
            self.routes[op.service] = (host, max(self.epoch_seen, epoch))
            if status == int(ReplyStatus.EXPIRED):  # an earlier attempt may have applied
                self._finish("unknown", 0, retire=True)
                return
            if self.opener:  # every write is a put: answered from the log, it opened the session
                self.sessions[op.service] = (op.session, True)
            ok = status == int(ReplyStatus.OK)
            result = msgpack.unpackb(data, raw=False) if ok else None
            self._finish("ok" if ok else "fail", index, epoch=epoch, host=host, result=result)
        elif kind == "invalid":
            self._finish("fail", 0)
        elif kind == "not_primary" and reply[1] and reply[1] != host:
            self.routes[op.service] = (reply[1], reply[2])
            self._try()
        else:
            self._retry(host, kind != "not_primary")

    def _finish(self, outcome: str, index: int, retire: bool = False, epoch: int = 0,
                host: str = "", result: dict[str, Any] | None = None) -> None:
        op = self.op
        assert op is not None
        if retire or (self.opener and not self.sessions[op.service][1]):
            # Expired, or an opening op without an answer from the log: a new session id.
            self.session_numbers += 1
            self.sessions[op.service] = (f"{self.name}/{self.session_numbers}", False)
        op.outcome, op.index = outcome, index
        args = {"value": op.value} if op.kind == "put" else {}
        op.op = Op(self.process, op.kind, op.key, args, op.invoke_ms,
                   None if outcome == "unknown" else self.k.now, outcome, result,
                   epoch=epoch, index=index, primary=host, service=op.service)
        check = self.c.check
        if op.kind == "put":
            check.requests[len(check.ops)] = (op.session, op.seq)
        check.ops.append(op.op)
        shown = f"={result.get('value')!r}" if op.kind == "get" and result else ""
        self.k.note(f"{self.name} {op.service} {op.kind} {op.key}"
                    f"{'=' + op.value if op.value else ''}: {outcome}{shown} "
                    f"{'@' + str(index) if index else ''}")
        self.op = None
        self.done_ops.append(op)
        if self.active:
            self.k.after(self.k.rng.randint(*self.c.scenario.think_ms), self._next_op)

    def on_routes(self, update: PushRoutes) -> None:
        for route in update.routes:
            known = self.routes.get(route.service)
            if route.primary_address and (known is None or route.epoch >= known[1]):
                self.routes[route.service] = (route.primary_address, route.epoch)


# --- faults -------------------------------------------------------------------------------


class Nemesis:
    """Seeded faults during the fault phase: crashes, partitions, broken streams,
    switchovers; spaced so that the cluster can make progress between them."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.k = cluster.k
        self.active = False
        self.crashes = 0
        names, weights = zip(*cluster.scenario.weights, strict=True)
        self._names = list(names)
        self._weights = list(weights)

    def start(self) -> None:
        self.active = True
        self.c.coord.store_fail_p = self.c.scenario.store_fail_p
        self._next()

    def _next(self) -> None:
        if self.active:
            self.k.after(self.k.rng.randint(*self.c.scenario.fault_gap_ms), self._strike)

    def _strike(self) -> None:
        if not self.active:
            return
        what = self.k.rng.choices(self._names, self._weights)[0]
        getattr(self, "_" + what)()
        self._next()

    def _crash_agent(self, only_primaries: bool = False) -> None:
        s = self.c.scenario
        up = [a for a in self.c.agents.values() if a.up]
        if len(self.c.agents) - len(up) >= s.max_agents_down:
            return
        if only_primaries:
            up = [a for a in up if any(r.role == PRIMARY for r in a.replicas.values())]
            if not up:
                return
        agent = self.k.rng.choice(up)
        damage = self.k.rng.random() < s.damage_p
        # (No draw when reports are off: the default sweeps' traces stay as they were.)
        report = bool(s.exit_report_p) and self.k.rng.random() < s.exit_report_p
        agent.crash(damage_snapshots=damage, report=report)
        self.crashes += 1
        self.k.after(self.k.rng.randint(*s.agent_down_ms), self._restart_agent, agent,
                     agent.incarnation)

    def _restart_agent(self, agent: SimAgent, inc: int) -> None:
        if not agent.up and agent.incarnation == inc:
            agent.start()

    def _crash_primary(self) -> None:
        self._crash_agent(only_primaries=True)

    def _crash_coordinator(self) -> None:
        coord = self.c.coord
        if not coord.up:
            return
        coord.crash()
        self.crashes += 1
        self.k.after(self.k.rng.randint(*self.c.scenario.coord_down_ms), self._restart_coord,
                     coord.incarnation)

    def _restart_coord(self, inc: int) -> None:
        coord = self.c.coord
        if not coord.up and coord.incarnation == inc:
            coord.boot()

    def _partition(self) -> None:
        nodes = [COORD, *sorted(self.c.agents)]
        a, b = self.k.rng.sample(nodes, 2)
        until = self.k.now + self.k.rng.randint(*self.c.scenario.partition_ms)
        self.c.net.cuts[frozenset((a, b))] = until
        self.k.note(f"partition {a} | {b} until {until}")

    def _isolate(self) -> None:
        """Cuts a host (a primary's, more often than not) off from the coordinator and the
        other hosts; clients still reach it."""
        agents = sorted(self.c.agents)
        primaries = [h for h in agents
                     if any(r.role == PRIMARY for r in self.c.agents[h].replicas.values())]
        host = self.k.rng.choice(primaries if primaries and self.k.rng.random() < 0.7
                                 else agents)
        until = self.k.now + self.k.rng.randint(*self.c.scenario.partition_ms)
        for other in [COORD, *agents]:
            if other != host:
                self.c.net.cuts[frozenset((host, other))] = until
        # Half the time a client is on the host's side of the partition: it hears no route
        # push and keeps reading there, which only the lease and its margin make safe.
        clients = sorted(c for c in self.c.clients if c != "probe")
        side = ""
        if clients and self.k.rng.random() < 0.5:
            side = self.k.rng.choice(clients)
            for other in [COORD, *agents]:
                if other != host:
                    self.c.net.cuts[frozenset((side, other))] = until
        self.k.note(f"isolate {host}{' with ' + side if side else ''} until {until}")

    def _break_link(self) -> None:
        links = [link for agent in self.c.agents.values() for link in agent.links.values()
                 if link.up]
        if links:
            self.k.rng.choice(links).brk("nemesis")

    def _migrate(self) -> None:
        self.c.coord.start_migration()

    def _switchover(self) -> None:
        """An operator's switchover; now and then its caller goes away before it ends."""
        rng = self.k.rng
        self.c.coord.start_switchover(
            cancel_after_ms=rng.randint(0, 50) if rng.random() < 0.3 else None)

    def _drain(self) -> None:
        """An operator drains a host for a while (its primaries move off, its replicas are
        rebuilt on a spare host if there is one), then takes it back."""
        coord = self.c.coord
        if not coord.up:
            return
        assert coord.core is not None
        host = self.k.rng.choice(sorted(self.c.agents))
        self.k.note(f"drain {host}")
        coord.execute(coord.core.set_draining(host, True))
        self.k.after(self.k.rng.randint(300, 1500), self._undrain, host)

    def _undrain(self, host: str) -> None:
        coord = self.c.coord
        if not coord.up:
            self.k.after(100, self._undrain, host)  # the operator tries again
            return
        assert coord.core is not None
        self.k.note(f"undrain {host}")
        coord.execute(coord.core.set_draining(host, False))

    def _pause(self) -> None:
        """A process stops for a while (a stopped VM, a long collection): its clock runs on,
        its events wait; it resumes with the views it had."""
        node = self.k.rng.choice([COORD, *sorted(self.c.agents)])
        until = self.k.now + self.k.rng.randint(*self.c.scenario.pause_ms)
        self.k.pause(node, until)
        self.k.note(f"pause {node} until {until}")

    def _disk_full(self) -> None:
        """A host's data dir fills up for a while: appends and meta writes fail there."""
        agent = self.c.agents[self.k.rng.choice(sorted(self.c.agents))]
        agent.full_until = self.k.now + self.k.rng.randint(*self.c.scenario.disk_full_ms)
        self.k.note(f"disk of {agent.host_id} full until {agent.full_until}")

    def _nothing(self) -> None:
        pass

    def heal(self) -> None:
        """Stops faults: the network becomes reliable, everything down starts again."""
        self.active = False
        self.k.note("heal")
        self.c.net.heal()
        self.c.coord.store_fail_p = 0.0
        for agent in self.c.agents.values():
            agent.full_until = 0
        # A paused process runs again when its pause ends (cutting it short here would run
        # what it received meanwhile after what it receives next).
        if not self.c.coord.up:
            self.c.coord.boot()
        core = self.c.coord.core
        assert core is not None
        for host in sorted(core.hosts):
            self.c.coord.execute(core.set_draining(host, False))
        for agent in self.c.agents.values():
            if not agent.up:
                agent.start()


# --- the cluster and a run ----------------------------------------------------------------


@dataclass
class Result:
    """What one seeded run found."""

    seed: int
    scenario: Scenario
    ok: bool
    message: str
    trace_hash: str
    trace_tail: list[str]
    stats: dict[str, int]
    full_trace: list[str] | None = None

    def replay_hint(self) -> str:
        """The command that replays this run exactly."""
        if self.scenario.name not in SCENARIOS:
            return "rerun the test: its scenario is scripted, not made from the seed"
        return (f"SIM_SEED={self.seed} SIM_SCENARIO={self.scenario.name} "
                ".venv/bin/pytest tests/sim -k replay")


class Cluster:
    """A coordinator, N agents and some clients under one seeded scheduler."""

    BOOT_MS = 200
    CLIENTS_MS = 300
    FAULTS_MS = 400

    def __init__(self, seed: int, scenario: Scenario, full_trace: bool = False) -> None:
        self.seed = seed
        self.scenario = scenario
        self.k = Kernel(seed, full_trace=full_trace)
        self.net = Network(self.k, scenario)
        self.check = Checker(self)
        self.coord = SimCoordinator(self)
        self.agents = {f"h{i}": SimAgent(self, f"h{i}") for i in range(1, scenario.hosts + 1)}
        self.clients = {f"c{i}": SimClient(self, f"c{i}")
                        for i in range(1, scenario.clients + 1)}
        self.nemesis = Nemesis(self)
        clocks = random.Random(f"clocks-{seed}")
        for node in [COORD, *self.agents]:
            drift = scenario.clock_drift
            self.k.set_clock(node, clocks.randint(0, 1 << 20),
                             clocks.uniform(1 - drift, 1 + drift))

    # --- phases --------------------------------------------------------------------------

    def boot(self) -> None:
        self.coord.boot()
        for agent in self.agents.values():
            self.k.after(self.k.rng.randint(0, 20), agent.start)
        self.k.run_until(self.BOOT_MS)
        while not self.coord.create_services():
            self.k.run_until(self.k.now + 50)
        self.k.run_until(self.CLIENTS_MS)
        for client in self.clients.values():
            client.start()

    def run(self, script: Callable[[Cluster], None] | None = None) -> Result:
        """Boot, faults (the nemesis, or `script` for a directed test), heal, settle and
        the final checks; a violation ends the run early."""
        s = self.scenario
        try:
            self.boot()
            self.k.run_until(self.FAULTS_MS)
            if script is not None:
                script(self)
            else:
                self.nemesis.start()
                self.k.run_until(self.FAULTS_MS + s.fault_ms)
            self.nemesis.heal()
            self.k.run_until(self.k.now + s.heal_ms)
            for client in self.clients.values():
                client.active = False
            self.settle()
            self.final_checks()
        except InvariantViolation as exc:
            return self._result(False, str(exc))
        except Exception as exc:  # a core's own assertion, or a harness error
            import traceback

            tb = traceback.format_exc(limit=-6)
            return self._result(False, f"{type(exc).__name__}: {exc}\n{tb}")
        return self._result(True, "")

    def _result(self, ok: bool, message: str) -> Result:
        ops = self.check.ops
        stats = {
            "events": self.k.events, "shipped": self.k.shipped, "end_ms": self.k.now,
            "ops_ok": sum(op.outcome == "ok" for op in ops),
            "ops_unknown": sum(op.outcome == "unknown" for op in ops),
            "reads_ok": sum(op.outcome == "ok" and op.kind == "get" for op in ops),
            "crashes": self.nemesis.crashes, "failovers": self.check.failovers,
            "switchovers": self.check.switchovers, "rewinds": self.check.rewinds,
            "rebuilt": self.check.rebuilt, "retired": self.check.retired,
            "truncated": self.check.truncated, "async_lost": self.check.async_lost,
            "installs": self.check.installs, "reloads": self.coord.reloads,
            "broken": self.check.broken, "migrated": self.check.migrated,
            "exit_reports": self.check.exit_reports,
            "exit_reports_acted": self.check.exit_reports_acted,
        }
        self.k.note(f"end {stats}")
        return Result(self.seed, self.scenario, ok, message, self.k.trace_hash(),
                      list(self.k.recent), stats, self.k.full)

    def settle(self) -> None:
        """Runs until every replica agrees and a probe write per service goes through."""
        deadline = self.k.now + self.scenario.settle_ms_max
        probe: SimClient | None = None
        probe_ops: list[Op] = []
        while True:
            self.k.run_until(self.k.now + 50)
            clients_idle = all(c.idle for c in self.clients.values())
            if probe is None and clients_idle and self.converged() is None:
                probe = SimClient(self, "probe")
                self.clients["probe"] = probe
                probe.routes = {}
                for i in range(1, self.scenario.services + 1):
                    probe_ops.append(probe.begin(f"s{i}", "probe"))
                    while probe.op is not None and self.k.now < deadline:
                        self.k.run_until(self.k.now + 20)
            if probe is not None and probe.idle:
                failed = [op for op in probe_ops if op.outcome != "ok"]
                if failed:
                    self.check.fail(f"liveness: after healing, a write to {failed[0].service} "
                                    f"ended {failed[0].outcome}")
                why = self.converged()
                if why is None:
                    return
            if self.k.now >= deadline:
                why = self.converged() or "clients still busy"
                self.check.fail(f"liveness: no convergence {self.scenario.settle_ms_max} ms "
                                f"after healing: {why}")

    def converged(self) -> str | None:
        """None when every service's replicas agree with its primary; else why not."""
        coord = self.coord
        if not coord.up or coord.core is None or coord.core.operations:
            return "coordinator busy"
        if coord.core.switchovers:  # every switchover ends, done or abandoned
            return f"switchovers still in progress: {coord.core.switchovers}"
        for name in sorted(coord.core.services):
            record = coord.core.services[name]
            primary_agent = self.agents[record.primary]
            p = primary_agent.replicas.get(name)
            if p is None or p.role != PRIMARY or p.epoch != record.epoch or p.primary is None:
                return f"{name}: {record.primary} is not yet primary at epoch {record.epoch}"
            if p.core.holding:  # a switchover's hold whose release was lost ends at its timeout
                return f"{name}: primary {record.primary} holds writes for a switchover"
            last = p.wal.last_index
            if p.sm.applied_index != last or p.wal.durable_index != last or p._queued:
                return f"{name}: primary {record.primary} has not applied its log"
            for host in sorted(record.replicas):
                r = self.agents[host].replicas.get(name)
                if r is None:
                    return f"{name}: {host} holds no replica"
                if r.epoch != record.epoch or r.role != record.replicas[host]:
                    return f"{name}: {host} is {r.role} at {r.epoch}"
                if r.wal.last_index != last or r.sm.applied_index != last:
                    error = f" (its last error: {r.core.last_error})" if r.core.last_error else ""
                    if r.refused_sender:
                        error += (f" (it refuses the primary's items: its named primary is "
                                  f"{r.core.meta.primary_host_id!r})")
                    return (f"{name}: {host} at {r.wal.last_index}/{r.sm.applied_index}, "
                            f"primary at {last}{error}")
        return None

    def final_checks(self) -> None:
        check = self.check
        core = self.coord.core
        assert core is not None
        acked: dict[str, list[tuple[int, Op]]] = {}
        for n, op in enumerate(check.ops):
            if op.outcome == "ok" and op.kind == "put":
                acked.setdefault(op.service, []).append((n, op))
        final_read: dict[tuple[str, str], Any] = {}
        for name in sorted(core.services):
            record = core.services[name]
            p = self.agents[record.primary].replicas[name]
            digest = p.sm.digest()
            # The kv state the primary's log implies, each request id applied once, and only
            # once its session was opened (no session is evicted here: few clients); when
            # the whole log is still there (not compacted behind a snapshot).
            expected: dict[str, str] = {}
            seen: set[bytes] = set()
            opened: set[str] = set()
            for e in p.wal.entries if p.wal.base == 0 else ():
                if not e.payload:
                    continue
                cid, _seq = decode_request_id(e.request_id)
                if cid not in opened and not opens_session(e.request_id):
                    continue  # expired: refused, not applied
                opened.add(cid)
                if _plain(e.request_id) not in seen:
                    seen.add(_plain(e.request_id))
                    command = msgpack.unpackb(e.payload, raw=False)
                    expected[command["key"]] = command["value"]
            for host in sorted(record.replicas):
                r = self.agents[host].replicas[name]
                check_history(r.wal.history, r.wal.last_index)
                both, last = max(r.wal.first_index, p.wal.first_index), p.wal.last_index
                if r.wal.last_index != last or r.wal.read(both, last) != p.wal.read(both, last):
                    check.fail(f"{name}: {host}'s log differs from the primary's")
                if r.sm.digest() != digest:
                    check.fail(f"{name}: {host}'s digest differs from the primary's at "
                               f"index {r.sm.applied_index}")
                for key, value in expected.items():
                    got = r.sm.query(msgpack.packb({"op": "get", "key": key}))
                    if msgpack.unpackb(got.data, raw=False)["value"] != value:
                        check.fail(f"{name}: {host} holds a wrong value for {key}")
            for key in sorted({op.key for op in check.ops if op.service == name}):
                got = p.sm.query(msgpack.packb({"op": "get", "key": key}))
                final_read[(name, key)] = msgpack.unpackb(got.data, raw=False)["value"]
            if self.scenario.mode != "sync":
                continue
            for n, op in acked.get(name, []):
                session, seq = check.requests[n]
                rid = encode_request_id(session, seq)
                if op.index <= p.wal.base:
                    continue  # compacted: the recorded reply below vouches for it
                entry = p.wal.read(op.index, op.index)[0] if op.index <= p.wal.last_index else None
                if (entry is None or _plain(entry.request_id) != rid
                        or msgpack.unpackb(entry.payload, raw=False).get("value")
                        != op.args["value"]):
                    check.fail(f"inv3: acknowledged write {session}:{seq} ({op.key}="
                               f"{op.args['value']} at index {op.index}) is not in the "
                               f"final log of {name}")
                recorded = p.sm.sessions.lookup(session, seq)
                if isinstance(recorded, Reply) and recorded.index != op.index:
                    check.fail(f"inv5: {session}:{seq} recorded at {recorded.index}, "
                               f"acknowledged at {op.index}")
        if self.scenario.mode != "sync":
            return  # async mode promises neither linearizability nor every acknowledged write
        # The whole history, judged by the chaos checkers (failover.chaos): every key
        # linearizable, every acknowledged put present at the end.
        verdict = check_linearizable_kv(check.ops)
        if verdict.linearizable is not True:
            first = verdict.violations[0] if verdict.violations else None
            check.fail(f"history not linearizable: {verdict.unknown_reasons or ''} "
                       f"{first.to_dict() if first else ''}")
        lost = check_acked_puts(check.ops, final_read)
        if lost:
            check.fail(f"inv3: acknowledged write lost: {lost[0].to_dict()}")


def run_seed(seed: int, scenario: Scenario | str = "short", full_trace: bool = False) -> Result:
    """Runs one seed of a scenario (a Scenario, or the name of a scenario maker)."""
    if isinstance(scenario, str):
        scenario = SCENARIOS[scenario](seed)
    return Cluster(seed, scenario, full_trace=full_trace).run()
