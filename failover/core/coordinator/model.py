"""What the coordinator knows: the persisted records of hosts and services, and the volatile
views heartbeats rebuild (docs/design.md, Processes).

What is persisted: hosts (address, zone, draining) and services (kind, mode, desired
replicas, epoch, primary, replica roles, in-sync set), under `HOST_PREFIX` and
`SERVICE_PREFIX`, packed with `pack`. What is not: liveness, indexes and leases, which
heartbeats rebuild within a heartbeat interval after a restart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from failover import defaults
from failover.core.roles import DUPLICA, PRIMARY

HOST_PREFIX = "host/"
SERVICE_PREFIX = "service/"
ROUTES_VERSION_KEY = "meta/routes_version"


# --- persisted records ------------------------------------------------------------------------


@dataclass
class HostInfo:
    host_id: str
    address: str
    zone: str = ""
    draining: bool = False
    version: str = ""
    started_at: float = 0.0
    # The agent process's incarnation, counted by its supervisor on the host (issue 16):
    # every number up to it belongs to a process that has exited once a newer one runs, so
    # a report that incarnation X exited tells of every process up to X. 0: an agent without
    # a supervisor (no reports of its exit come; its failovers take the timeout path).
    incarnation: int = 0


@dataclass
class ServiceInfo:
    name: str
    kind: str
    mode: str  # "sync" or "async"
    desired_replicas: int
    epoch: int
    primary: str  # host id
    replicas: dict[str, str] = field(default_factory=dict)  # host id -> role
    in_sync: list[str] = field(default_factory=list)
    # In-sync members the primary has confirmed it counts (from its heartbeats). A duplica
    # just added to `in_sync` is not counted until the primary hears of it, so it may lack
    # writes the primary acknowledged meanwhile: only these may be promoted.
    promotable: list[str] = field(default_factory=list)
    # Raised at every change of `in_sync`, sent with it to the primary and echoed in its
    # heartbeats: what a primary reports counts only at the current generation (a heartbeat
    # built before a change must not set a promotion threshold after it).
    in_sync_generation: int = 0
    # What one replica reserves on its host (placement.RESOURCES), and the placement policy
    # ("" follows the cluster's).
    needs: dict[str, float] = field(default_factory=dict)
    placement: str = ""
    # Replicas being moved away (a migration or a patch): they do not count toward the
    # desired replicas, a primary among them is switched over, and each is retired once the
    # replicas that replace it are in sync.
    leaving: list[str] = field(default_factory=list)

    def duplicas(self) -> list[str]:
        return sorted(h for h, r in self.replicas.items() if r != PRIMARY and h != self.primary)


def set_in_sync(service: ServiceInfo, members: list[str]) -> None:
    """Every change of the in-sync set goes through here: it raises the generation. The
    members are always duplicas of the service (replicas other than its primary), each
    once: so every duplica is in sync exactly when the set has one member fewer than the
    service has replicas (`Membership._grow_in_sync` relies on it)."""
    service.in_sync = members
    service.in_sync_generation += 1


def hand_over(service: ServiceInfo, old: str, new: str) -> None:
    """Makes `new` the primary under a new epoch, and `old` (if still a replica) a duplica.
    The one place an epoch is raised (invariant 1): the caller returns the `Persist` of
    `service` ahead of every action that tells an agent of the new epoch."""
    assert new != old and new in service.replicas, (old, new, service)
    service.epoch += 1
    service.primary = new
    service.replicas[new] = PRIMARY
    if old in service.replicas:
        service.replicas[old] = DUPLICA  # rejoins as a duplica when it comes back


def pack(record: Any) -> bytes:
    return msgpack.packb(asdict(record), use_bin_type=True)


# --- volatile views ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """What a heartbeat says of one replica."""

    service: str
    role: str
    epoch: int
    durable_index: int
    commit_index: int
    applied_index: int
    truncated_entries: int = 0
    matched_index: int = 0  # durable and known to equal the current primary's log
    in_sync: tuple[str, ...] | None = None  # a primary's in-sync set as it applies it
    disk_full: bool = False  # its last log append failed for want of space
    # Why it cannot read its own snapshot or log ("" when it can): it serves nothing, never
    # counts as in sync, is never promoted, and is rebuilt from a peer (invariant 12).
    broken: str = ""
    in_sync_generation: int = 0  # a primary: the generation of the in-sync set it applies
    # a primary: per in-sync member, how long a sync write may have waited on it
    in_sync_lag_ms: dict[str, int] | None = None
    # The assignment as the replica holds it (None: not reported): a non-primary's primary
    # ("" when it knows none), a primary's duplicas. A mismatch is an assignment it missed.
    primary_host_id: str | None = None
    duplicas: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class HookReport:
    """A hook an agent ran (issue 17), as its heartbeat reports it; recorded as a `hook`
    event (`CoordinatorCore.record_hooks`)."""

    seq: int  # per agent process, from 1: one recorded already is skipped
    service: str
    event: str  # one of `failover.core.roles.HOOK_EVENTS`
    command: str  # the name of its allowlist entry
    role: str
    epoch: int
    exit_code: int  # -1: killed at its timeout (or skipped); 127: it could not start
    output: str  # the end of its output, at most HOOK_OUTPUT_BYTES_MAX bytes
    duration_ms: int
    timed_out: bool = False
    skipped: bool = False  # not run: too many hooks were running on the host


@dataclass
class HostLive:
    last_heartbeat_ms: int
    alive: bool = True
    dead: bool = False  # silent for host_dead_ms: its replicas no longer count
    # `CoreState.stalled_ms` at its last heartbeat: the coordinator's own stalls since then
    # are not the host's silence (`Detector.silent_ms`).
    stalled_mark_ms: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    replicas: dict[str, ReplicaReport] = field(default_factory=dict)
    # The incarnation its supervisor reported exited (0: none since it registered): a
    # register or heartbeat of that incarnation or an older one is a dead process's, late.
    exited: int = 0


@dataclass
class Failover:
    """A failover in progress (volatile: after a coordinator restart detection starts over,
    which never contradicts a decision, since decisions are persisted before acted on)."""

    service: str
    old_primary: str
    last_heartbeat_ms: int
    suspected_ms: int
    state: str = "asking"  # "asking" -> "waiting_lease" -> done
    chosen: str = ""
    lease_expiry_ms: int = 0  # promote from here: the old lease's end and the drift margin
    # The old primary's process was reported exited (its incarnation): it serves nothing,
    # so the promotion need not wait out the lease it was granted (`Detector.process_exited`).
    exited: int = 0
    # Started by that report, not by a timeout: "I hear it" is not asked of the duplicas.
    asked_after_exit: bool = False


@dataclass(frozen=True, slots=True)
class Timing:
    heartbeat_ms: int = defaults.HEARTBEAT_MS
    failure_timeout_ms: int = defaults.FAILURE_TIMEOUT_MS
    lease_ms: int = defaults.LEASE_MS
    host_dead_ms: int = defaults.HOST_DEAD_MS
    insync_lag_ms: int = defaults.INSYNC_LAG_MS
    # A failover waits this much past the old primary's lease as seen here (the primary
    # takes its lease to end as much earlier): the two hosts' clocks may drift apart.
    lease_drift_margin_ms: int = defaults.LEASE_DRIFT_MARGIN_MS
    # At most this many building replicas at once, cluster-wide; the rest wait.
    rebuild_concurrency_max: int = defaults.REBUILD_CONCURRENCY_MAX
    # ... and at most this many on any one host.
    rebuild_per_host_max: int = defaults.REBUILD_PER_HOST_MAX
    # A failed-over service's lost replica is rebuilt no sooner than this after promotion.
    rebuild_calm_ms: int = defaults.REBUILD_CALM_MS
    # Rebalance of primaries: at most one switchover started per gap (0: off), none until
    # this long after the last failover in progress.
    rebalance_gap_ms: int = defaults.REBALANCE_GAP_MS
    rebalance_calm_ms: int = defaults.REBALANCE_CALM_MS


class CoreState:
    """The state of `CoordinatorCore` (set in its `__init__`, described there), as each of
    its parts sees it."""

    timing: Timing
    placement_policy: str
    hosts: dict[str, HostInfo]
    live: dict[str, HostLive]
    services: dict[str, ServiceInfo]
    routes_version: int
    failovers: dict[str, Failover]
    leases: dict[str, tuple[str, int]]
    stalled_ms: int
    switchovers: dict[str, str]
    migrations: dict[str, tuple[str, str]]
    patching: set[str]
    unplaced: dict[str, str]
    _reassigned_ms: dict[tuple[str, str], int]
    _promotable_at: dict[str, dict[str, int]]
    _asked_ms: dict[str, int]
    _truncated_seen: dict[tuple[str, str], int]
    _deposed: set[tuple[str, str]]
    _unplaced_logged_ms: dict[str, int]
    _building_since: dict[tuple[str, str], int | None]
    _drain_moved_ms: dict[str, int]
    _move_to: dict[str, str]
    notices: deque[str]
    _unverified_noted: set[tuple[str, str, int]]
    _primary_progress: dict[str, tuple[str, int, int, int, float]]
    _held: dict[str, set[str]]
    _seq: dict[str, int]
    _next_seq: int
    _loads: dict[str, tuple[Any, Any]]
    _rounds: int
    _views: dict[str, tuple[Any, dict[str, float] | None]]
    _host_order: list[str]
    _routes_bumped: bool
    _primary_of: dict[str, str]
    _primaries: dict[str, int]
    _rebuild_waiting: set[str]
    _promoted_ms: dict[str, int]
    _calm_since_ms: int | None
    _rebalanced_ms: int | None
    _rebalancing: set[str]
    _rebalance_failures: int
    _attention: set[str]
    _held_order: dict[str, list[ServiceInfo]]
    _counted_generation: dict[str, int]

    # --- the index of replicas by host (issue 14: work proportional to what changed) -------

    def silent_ms(self, live: HostLive, now_ms: int) -> int:
        """How long `live`'s host has been silent, as this coordinator could hear: since its
        last heartbeat, less the time the coordinator itself stalled (`stalled`)."""
        return now_ms - live.last_heartbeat_ms - (self.stalled_ms - live.stalled_mark_ms)

    def _track(self, service: ServiceInfo) -> None:
        """Indexes a service's replicas by host: a service just created or restored, or
        replicas just added to it. Every replica added to `service.replicas` comes through
        here (and every one removed through `_untrack`), so a host's services are known
        without a walk over every service. The service needs the next tick's attention."""
        if service.name not in self._seq:
            self._seq[service.name] = self._next_seq
            self._next_seq += 1
        self._count_primary(service.name)
        self._attention.add(service.name)
        for host in service.replicas:
            # Its host's list of services (`_holding`) is worked out again: the record may
            # be a new object (a service created again under its old name, or restored).
            self._held_order.pop(host, None)
            held = self._held.setdefault(host, set())
            if service.name not in held:
                held.add(service.name)
                self._loads.pop(host, None)

    def _untrack(self, name: str, host: str) -> None:
        """A replica of `name` left `host` (retired, or its service deleted)."""
        held = self._held.get(host)
        if held is not None and name in held:
            held.discard(name)
            self._loads.pop(host, None)
            self._held_order.pop(host, None)
            if not held:
                del self._held[host]

    def _attend(self, name: str) -> None:
        """`name` may no longer be settled: the next tick looks at it (`_attention`)."""
        self._attention.add(name)

    def _attend_written(self, actions: list[Any]) -> list[Any]:
        """Has the next tick look at every service these actions persist: a change of its
        record (replicas, roles, in-sync set, primary) may unsettle it. Every change of a
        record is persisted in the same call's actions."""
        for action in actions:
            puts = getattr(action, "puts", None)
            if puts:
                for key in puts:
                    if key.startswith(SERVICE_PREFIX):
                        self._attention.add(key[len(SERVICE_PREFIX):])
        return actions

    def _attend_host(self, host_id: str) -> None:
        """Something every replica on `host_id` depends on changed (its liveness, draining,
        or what it reports as a whole): the next tick looks at each of their services."""
        held = self._held.get(host_id)
        if held:
            self._attention.update(held)

    def _count_primary(self, name: str) -> None:
        """Keeps the count of primaries per host (`_primaries`, for placement) in step with
        `name`'s primary: called for each service created, restored, deleted or written in a
        decision (every change of a primary is persisted), so no walk over every service."""
        service = self.services.get(name)
        now = service.primary if service is not None else ""
        was = self._primary_of.get(name, "")
        if now == was:
            return
        if was:
            left = self._primaries.get(was, 0) - 1
            if left > 0:
                self._primaries[was] = left
            else:
                self._primaries.pop(was, None)
            del self._primary_of[name]
        if now:
            self._primary_of[name] = now
            self._primaries[now] = self._primaries.get(now, 0) + 1

    def _holding(self, host_id: str) -> list[ServiceInfo]:
        """The services with a replica on `host_id`, in the order they were created (that of
        `services`): O(replicas on the host), the order kept until its replicas change."""
        order = self._held_order.get(host_id)
        if order is None:
            names = self._held.get(host_id)
            if not names:
                return []
            services = self.services
            order = self._held_order[host_id] = [
                services[n] for n in sorted(names, key=self._seq.__getitem__)]
        return order

    def _attending(self) -> list[ServiceInfo]:
        """The services in `_attention`, in the order of `services` (a deleted one leaves)."""
        attention = self._attention
        services = self.services
        gone = [name for name in attention if name not in services]
        attention.difference_update(gone)
        return [services[name] for name in sorted(attention, key=self._seq.__getitem__)]

    def _matched(self, service: ServiceInfo, host_id: str, report: ReplicaReport) -> int:
        """A duplica's matched index as far as its primary bears it out (`Membership`)."""
        raise NotImplementedError
