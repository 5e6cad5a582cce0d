"""The coordinator's policy as a pure state machine (docs/design.md, Failure detection).

Events go in (a host registers, a heartbeat, a tick with the monotonic time, the duplicas'
answers, an operator's command) and actions come out (persist, assign a role, step down,
ask duplicas, push routes). The daemon carries the actions out in order; a `Persist` must be
durable before any later action of the same list is carried out, which is how a new epoch
reaches the store before any agent hears of it (invariant 1).

What is persisted: hosts (address, zone, draining) and services (kind, mode, desired
replicas, epoch, primary, replica roles, in-sync set). What is not: liveness, indexes and
leases, which heartbeats rebuild within a heartbeat interval after a restart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from failover import defaults
from failover.core import placement
from failover.core.placement import HostView, Resources
from failover.core.roles import BUILDING, DUPLICA, PRIMARY
from failover.errors import InvalidRequest

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


def _set_in_sync(service: ServiceInfo, members: list[str]) -> None:
    """Every change of the in-sync set goes through here: it raises the generation."""
    service.in_sync = members
    service.in_sync_generation += 1


def _pack(record: Any) -> bytes:
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


@dataclass
class HostLive:
    last_heartbeat_ms: int
    alive: bool = True
    dead: bool = False  # silent for host_dead_ms: its replicas no longer count
    metrics: dict[str, float] = field(default_factory=dict)
    replicas: dict[str, ReplicaReport] = field(default_factory=dict)


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


# --- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Persist:
    puts: dict[str, bytes]
    deletes: tuple[str, ...] = ()
    history: tuple[tuple[str, str, str, dict[str, Any]], ...] = ()


@dataclass(frozen=True, slots=True)
class AssignRole:
    host_id: str
    address: str
    service: str
    kind: str
    role: str
    epoch: int
    mode: str
    primary: tuple[str, str] | None  # (host id, address), for a duplica
    duplicas: dict[str, str]  # host id -> address, for a primary
    in_sync: tuple[str, ...]
    in_sync_generation: int = 0


@dataclass(frozen=True, slots=True)
class StepDown:
    host_id: str
    address: str
    service: str
    epoch: int


@dataclass(frozen=True, slots=True)
class DropReplica:
    host_id: str
    address: str
    service: str
    epoch: int


@dataclass(frozen=True, slots=True)
class AskHearsPrimary:
    """Ask these duplicas whether the primary's stream still reaches them."""

    service: str
    epoch: int
    hosts: dict[str, str]  # host id -> address


@dataclass(frozen=True, slots=True)
class Route:
    service: str
    kind: str
    primary_host_id: str
    primary_address: str
    epoch: int


@dataclass(frozen=True, slots=True)
class PushRoutes:
    version: int
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class StartSwitchover:
    """Move a primary off a draining host (the daemon runs the switchover protocol)."""

    service: str
    to_host: str


Action = (Persist | AssignRole | StepDown | DropReplica | AskHearsPrimary | PushRoutes
          | StartSwitchover)


@dataclass(frozen=True, slots=True)
class HearsAnswer:
    """A duplica's answer to AskHearsPrimary; `reachable` False when the call failed."""

    host_id: str
    reachable: bool
    hears: bool = False
    durable_index: int = 0
    epoch: int = 0


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


class CoordinatorCore:
    """Cluster policy: detection, fenced promotion, in-sync set, routes, switchover,
    redundancy (placement, rebuild, retirement) and draining."""

    def __init__(self, timing: Timing = Timing(),
                 placement_policy: str = defaults.PLACEMENT_POLICY) -> None:
        assert timing.host_dead_ms >= timing.failure_timeout_ms, timing
        # A restarted coordinator knows no leases: a failover right after it is safe only
        # because a primary is suspected no sooner than any lease it held can have ended.
        assert timing.failure_timeout_ms >= timing.lease_ms + timing.lease_drift_margin_ms, timing
        self.timing = timing
        self.placement_policy = placement.check_policy(placement_policy)
        self.hosts: dict[str, HostInfo] = {}
        self.live: dict[str, HostLive] = {}
        self.services: dict[str, ServiceInfo] = {}
        self.routes_version = 0
        self.failovers: dict[str, Failover] = {}
        # service -> (host, monotonic ms when its lease runs out, as the coordinator sees it)
        self.leases: dict[str, tuple[str, int]] = {}
        self.switchovers: dict[str, str] = {}  # service -> target host, while in progress
        # (host, service) -> when a heartbeat last made us re-send its assignment
        self._reassigned_ms: dict[tuple[str, str], int] = {}
        # (service, host) -> the primary's durable index when it first reported counting
        # this in-sync duplica: once the duplica's matched index reaches it, it holds every
        # write the primary acknowledged before counting it, and becomes promotable.
        self._promotable_at: dict[tuple[str, str], int] = {}
        # service -> when its silent primary's duplicas were last asked
        self._asked_ms: dict[str, int] = {}
        # (host, service) -> truncated count last reported, to record each repair once
        self._truncated_seen: dict[tuple[str, str], int] = {}
        # (service, host): a primary deposed by a failover, silent since; it does not count
        # toward the desired replicas until it heartbeats again.
        self._deposed: set[tuple[str, str]] = set()
        # service -> why its missing replicas found no host (shown in status, retried)
        self.unplaced: dict[str, str] = {}
        self._unplaced_logged_ms: dict[str, int] = {}
        # (service, host) -> when a building replica was placed
        self._building_since: dict[tuple[str, str], int] = {}
        # service -> when a drain last asked to move its primary
        self._drain_moved_ms: dict[str, int] = {}
        # service -> (source host, target host) while a live migration copies its state
        self.migrations: dict[str, tuple[str, str]] = {}
        # service -> the host a leaving primary should hand over to (a migration's target)
        self._move_to: dict[str, str] = {}
        # hosts being patched: no new replicas go there (their replicas stay)
        self.patching: set[str] = set()

    # --- restore ---------------------------------------------------------------------------

    def restore(self, state: dict[str, bytes], now_ms: int) -> list[Action]:
        """Loads persisted state after a (re)start. Every host counts as alive for one
        failure timeout (their heartbeats arrive meanwhile), and every replica is told its
        role again: assignments are idempotent, and one may have been persisted but not
        delivered when the last coordinator stopped."""
        for key, value in state.items():
            record = msgpack.unpackb(value, raw=False)
            if key.startswith(HOST_PREFIX):
                host = HostInfo(**record)
                self.hosts[host.host_id] = host
                self.live[host.host_id] = HostLive(last_heartbeat_ms=now_ms)
            elif key.startswith(SERVICE_PREFIX):
                service = ServiceInfo(**record)
                self.services[service.name] = service
            elif key == ROUTES_VERSION_KEY:
                self.routes_version = int(record)
        actions: list[Action] = []
        for service in self.services.values():
            actions.extend(self._assignments(service))
        actions.append(self._routes())
        return actions

    # --- hosts -----------------------------------------------------------------------------

    def register(self, info: HostInfo, now_ms: int,
                 metrics: dict[str, float] | None = None) -> list[Action]:
        """A host's agent started (or re-registers)."""
        if not info.host_id or not info.address:
            raise InvalidRequest("register needs a host_id and an address")
        known = self.hosts.get(info.host_id)
        actions: list[Action] = []
        if known is not None:
            info.draining = known.draining
        if known != info:
            self.hosts[info.host_id] = info
            actions.append(Persist({HOST_PREFIX + info.host_id: _pack(info)},
                                   history=(("", "host", f"host {info.host_id} registered at "
                                             f"{info.address}", {"host_id": info.host_id}),)))
        self.live[info.host_id] = HostLive(last_heartbeat_ms=now_ms, metrics=dict(metrics or {}))
        self._deposed = {k for k in self._deposed if k[1] != info.host_id}
        # Tell the host what it holds (it recovers from disk, but may have missed a change).
        for service in self.services.values():
            if info.host_id in service.replicas:
                actions.extend(self._assignments(service, only=info.host_id))
        if known is not None and known.address != info.address:
            actions.extend(self._bump_routes())
        return actions

    def heartbeat(self, host_id: str, metrics: dict[str, float],
                  replicas: list[ReplicaReport], now_ms: int) -> tuple[list[tuple[str, int, int]],
                                                                        list[Action]]:
        """A host is alive; returns the leases granted [(service, epoch, lease_ms)] and
        actions (re-assignments of replicas that disagree with the record, in-sync changes)."""
        if host_id not in self.hosts:
            raise InvalidRequest(f"host {host_id!r} is not registered: register first")
        live = self.live.setdefault(host_id, HostLive(last_heartbeat_ms=now_ms))
        actions: list[Action] = []
        if live.dead:
            actions.append(Persist({}, history=(("", "host", f"host {host_id} is back after "
                                                 "being declared dead", {"host_id": host_id}),)))
        live.last_heartbeat_ms = now_ms
        live.alive = True
        live.dead = False
        live.metrics = metrics
        live.replicas = {r.service: r for r in replicas}
        self._deposed = {k for k in self._deposed if k[1] != host_id}
        leases: list[tuple[str, int, int]] = []
        actions.extend(self._drop_unknown(host_id, replicas, now_ms))
        for service in self.services.values():
            role = service.replicas.get(host_id)
            if role is None:
                continue
            report = live.replicas.get(service.name)
            wanted = PRIMARY if service.primary == host_id else role
            key = (host_id, service.name)
            stale_members = (
                wanted == PRIMARY and report is not None and report.in_sync is not None
                and (set(report.in_sync) != set(service.in_sync)
                     or report.in_sync_generation != service.in_sync_generation)
            )
            if (report is None or report.epoch != service.epoch or report.role != wanted
                    or stale_members):
                # It missed (or has not yet carried out) its assignment: send it again, at
                # most once per failure timeout.
                last = self._reassigned_ms.get(key)
                if service.name not in self.switchovers and (
                    last is None or now_ms - last >= self.timing.failure_timeout_ms
                ):
                    self._reassigned_ms[key] = now_ms
                    actions.extend(self._assignments(service, only=host_id))
                continue
            self._reassigned_ms.pop(key, None)
            if report.broken:
                # No lease, no threshold, no promotion: a broken primary is failed over by
                # `tick`, a broken duplica leaves the in-sync set now and is rebuilt.
                if (wanted != PRIMARY and host_id in service.in_sync
                        and service.name not in self.switchovers):
                    actions.extend(self._shrink_in_sync(service, host_id, (
                        f"it cannot read its own snapshot or log: {report.broken}")))
                continue
            if wanted == PRIMARY and report.in_sync is not None:
                counted = set(service.in_sync) & set(report.in_sync)
                for member in counted:
                    # The primary's durable index bounds every write it acknowledged, also
                    # before a restart (its reported commit index starts again from zero).
                    self._promotable_at.setdefault((service.name, member),
                                                   report.durable_index)
                for key in [k for k in self._promotable_at
                            if k[0] == service.name and k[1] not in counted]:
                    del self._promotable_at[key]
                lagging = sorted(h for h, lag in (report.in_sync_lag_ms or {}).items()
                                 if lag > self.timing.insync_lag_ms and h in service.in_sync)
                if lagging and service.name not in self.switchovers:
                    for member in lagging:
                        lag = (report.in_sync_lag_ms or {})[member]
                        actions.extend(self._shrink_in_sync(service, member, (
                            f"its primary has waited {lag} ms for it to take entries "
                            f"(insync_lag_ms={self.timing.insync_lag_ms})")))
                    counted -= set(lagging)
                uncounted = [h for h in service.promotable if h not in counted]
                if uncounted:
                    # The primary (at the current generation) does not count them: it may
                    # acknowledge writes they lack, so they must not be promoted.
                    service.promotable = [h for h in service.promotable if h in counted]
                    actions.append(Persist({SERVICE_PREFIX + service.name: _pack(service)},
                                           history=((
                        service.name, "in_sync", f"{', '.join(uncounted)} no longer "
                        f"promotable for {service.name}: its primary does not count them",
                        {"hosts": uncounted, "promotable": list(service.promotable)}),)))
            if (wanted != PRIMARY and report.disk_full and host_id in service.in_sync
                    and service.name not in self.switchovers):
                # It cannot take the primary's entries: sync writes would wait on it.
                actions.extend(self._shrink_in_sync(service, host_id, "its disk is full"))
            actions.extend(self._update_promotable(service))
            if wanted == PRIMARY and service.name not in self.failovers:
                self.leases[service.name] = (host_id, now_ms + self.timing.lease_ms)
                leases.append((service.name, service.epoch, self.timing.lease_ms))
            if report.truncated_entries != self._truncated_seen.get(key, 0):
                self._truncated_seen[key] = report.truncated_entries
                if report.truncated_entries:
                    actions.append(Persist({}, history=((
                        service.name, "rejoin",
                        f"{host_id} rejoined {service.name} as duplica, dropping "
                        f"{report.truncated_entries} divergent entries",
                        {"host_id": host_id, "truncated_entries": report.truncated_entries}),)))
        actions.extend(self._grow_in_sync(now_ms))
        return leases, actions

    def _drop_unknown(self, host_id: str, replicas: list[ReplicaReport],
                      now_ms: int) -> list[Action]:
        """A host reports a replica the records do not give it (retired while the host was
        away, or of a deleted service): tell it to drop it, at most once per failure
        timeout. It serves nothing meanwhile: it holds no role the coordinator confirms."""
        actions: list[Action] = []
        for report in replicas:
            service = self.services.get(report.service)
            if service is not None and host_id in service.replicas:
                continue
            moving = self.migrations.get(report.service)
            if moving is not None and moving[1] == host_id:
                continue  # a migration's copy, not yet a member: it is added when done
            key = (host_id, report.service)
            last = self._reassigned_ms.get(key)
            if last is not None and now_ms - last < self.timing.failure_timeout_ms:
                continue
            self._reassigned_ms[key] = now_ms
            epoch = max(report.epoch, service.epoch if service is not None else 0)
            actions.append(DropReplica(host_id, self.hosts[host_id].address, report.service,
                                       epoch))
        return actions

    def _update_promotable(self, service: ServiceInfo) -> list[Action]:
        """Promotable: in sync, counted by the primary, and holding everything the primary
        had acknowledged when it started counting (persisted when it changes)."""
        promotable = []
        for member in service.in_sync:
            threshold = self._promotable_at.get((service.name, member))
            live = self.live.get(member)
            report = live.replicas.get(service.name) if live else None
            if (member in service.promotable
                    or (threshold is not None and report is not None
                        and report.epoch == service.epoch
                        and report.matched_index >= threshold)):
                promotable.append(member)
        promotable.sort()
        if promotable == service.promotable:
            return []
        service.promotable = promotable
        return [Persist({SERVICE_PREFIX + service.name: _pack(service)})]

    def _forget_thresholds(self, service: str) -> None:
        """Thresholds were the old primary's durable index: a new primary sets its own."""
        for key in [k for k in self._promotable_at if k[0] == service]:
            del self._promotable_at[key]

    # --- time ------------------------------------------------------------------------------

    def tick(self, now_ms: int) -> list[Action]:
        """Detects silent hosts, shrinks in-sync sets, and moves failovers along."""
        actions: list[Action] = []
        timeout = self.timing.failure_timeout_ms
        for host_id, live in self.live.items():
            if live.alive and now_ms - live.last_heartbeat_ms > timeout:
                live.alive = False
                actions.extend(self._host_suspected(host_id))
            if (not live.alive and not live.dead
                    and now_ms - live.last_heartbeat_ms > self.timing.host_dead_ms):
                live.dead = True
                held = sorted(s.name for s in self.services.values() if host_id in s.replicas)
                actions.append(Persist({}, history=(("", "host", (
                    f"host {host_id} declared dead after {self.timing.host_dead_ms} ms of "
                    f"silence; rebuilding its replicas elsewhere: {', '.join(held) or 'none'}"),
                    {"host_id": host_id, "services": held}),)))
        for service in self.services.values():
            # A primary whose host is silent: ask its duplicas, again every failure timeout
            # for as long as it stays silent (an answer "we still hear it" may go stale).
            if service.name in self.failovers or service.name in self.switchovers:
                continue
            live = self.live.get(service.primary)
            # A live primary that cannot read its own data serves nothing: fail it over too.
            if live is None or (live.alive and not self._broken(service, service.primary)):
                continue
            asked = self._asked_ms.get(service.name)
            if asked is not None and now_ms - asked < timeout:
                continue
            self._asked_ms[service.name] = now_ms
            self.failovers[service.name] = Failover(
                service.name, service.primary, live.last_heartbeat_ms, now_ms)
            hosts = {h: self.hosts[h].address for h in service.duplicas() if h in self.hosts}
            actions.append(AskHearsPrimary(service.name, service.epoch, hosts))
        for failover in list(self.failovers.values()):
            if failover.state == "waiting_lease" and now_ms >= failover.lease_expiry_ms:
                actions.extend(self._promote(failover, now_ms))
        for service in list(self.services.values()):
            actions.extend(self._restore_redundancy(service, now_ms))
            actions.extend(self._move_primary(service, now_ms))
        return actions

    def _host_suspected(self, host_id: str) -> list[Action]:
        """A silent host leaves the in-sync sets it is in (its primaries are handled by the
        failover check in `tick`)."""
        actions: list[Action] = []
        for service in self.services.values():
            if host_id in service.in_sync and service.primary != host_id:
                actions.extend(self._shrink_in_sync(service, host_id, "stopped heartbeating"))
        return actions

    # --- in-sync set ------------------------------------------------------------------------

    def _shrink_in_sync(self, service: ServiceInfo, host_id: str, why: str) -> list[Action]:
        """Removes a duplica from the in-sync set: persisted first, then the primary is told,
        so the primary never acknowledges without a member before that is durable."""
        _set_in_sync(service, [h for h in service.in_sync if h != host_id])
        service.promotable = [h for h in service.promotable if h != host_id]
        self._promotable_at.pop((service.name, host_id), None)
        persist = Persist({SERVICE_PREFIX + service.name: _pack(service)}, history=((
            service.name, "in_sync", f"{host_id} left the in-sync set of {service.name}: {why}",
            {"host_id": host_id, "in_sync": list(service.in_sync)}),))
        return [persist, *self._assignments(service, only=service.primary)]

    def _grow_in_sync(self, now_ms: int) -> list[Action]:
        """Adds back a live duplica that has caught up with its primary's commit index."""
        actions: list[Action] = []
        for service in self.services.values():
            if service.name in self.failovers or service.name in self.switchovers:
                continue
            primary_live = self.live.get(service.primary)
            if primary_live is None or not primary_live.alive:
                continue
            primary_report = primary_live.replicas.get(service.name)
            if (primary_report is None or primary_report.epoch != service.epoch
                    or primary_report.in_sync_generation != service.in_sync_generation):
                # Its commit index must be that of the current set: one from before a
                # member left for lagging is still held back by it, and would let it back.
                continue
            for host in service.duplicas():
                if host in service.in_sync or host in self.patching:
                    continue  # a host being patched rejoins once it has restarted
                live = self.live.get(host)
                report = live.replicas.get(service.name) if live else None
                role = service.replicas[host]
                if (
                    live is not None and live.alive and report is not None
                    and report.epoch == service.epoch and report.role == role
                    and role in (DUPLICA, BUILDING) and not report.disk_full
                    and not report.broken
                    # Not the durable index: a tail the primary has not checked may diverge.
                    and report.matched_index >= primary_report.commit_index
                ):
                    _set_in_sync(service, sorted({*service.in_sync, host}))
                    if role == BUILDING:
                        # Built: it holds the whole committed log, and joins as a duplica.
                        service.replicas[host] = DUPLICA
                        since = self._building_since.pop((service.name, host), None)
                        event: tuple[str, str, str, dict[str, Any]] = (
                            service.name, "rebuilt",
                            f"{host} was built for {service.name} up to index "
                            f"{report.matched_index} and joined the in-sync set",
                            {"host_id": host, "in_sync": list(service.in_sync),
                             "matched_index": report.matched_index,
                             "build_ms": now_ms - since if since is not None else None})
                    else:
                        event = (service.name, "in_sync",
                                 f"{host} joined the in-sync set of {service.name}",
                                 {"host_id": host, "in_sync": list(service.in_sync)})
                    actions.append(Persist({SERVICE_PREFIX + service.name: _pack(service)},
                                           history=(event,)))
                    if role == BUILDING:
                        actions.extend(self._assignments(service, only=host))
                    actions.extend(self._assignments(service, only=service.primary))
        return actions

    # --- redundancy: rebuild, retire, drain ---------------------------------------------------

    def _counts(self, service: ServiceInfo, host_id: str) -> bool:
        """Whether this replica counts toward the desired number: not on a dead or draining
        host, not a primary deposed by a failover that has stayed silent since, and not
        broken."""
        live = self.live.get(host_id)
        info = self.hosts.get(host_id)
        return (live is not None and not live.dead and info is not None and not info.draining
                and (service.name, host_id) not in self._deposed
                and host_id not in service.leaving
                and not self._broken(service, host_id))

    def _broken(self, service: ServiceInfo, host_id: str) -> str:
        """Why this host's replica of `service` cannot read its own snapshot or log, as its
        host last reported; "" when it can (or its host has not said)."""
        live = self.live.get(host_id)
        report = live.replicas.get(service.name) if live is not None else None
        return report.broken if report is not None else ""

    def _restore_redundancy(self, service: ServiceInfo, now_ms: int) -> list[Action]:
        """Brings the service back to its desired replica count: places building replicas
        for the missing ones; once enough replicas are in sync, retires the rest (a copy on a
        dead or draining host, a building replica that lost the race to a returning one)."""
        if (service.name in self.failovers or service.name in self.switchovers
                or service.name in self.migrations):
            return []
        primary_live = self.live.get(service.primary)
        primary_report = primary_live.replicas.get(service.name) if primary_live else None
        if (primary_live is None or not primary_live.alive or primary_report is None
                or primary_report.epoch != service.epoch
                or primary_report.role != PRIMARY or primary_report.broken):
            return []  # a replica is built from a serving primary only
        broken = [h for h in sorted(service.replicas)
                  if h != service.primary and self._broken(service, h)]
        if broken:
            # A broken copy holds nothing anyone can use, and the serving primary holds every
            # write: it is dropped now, so that its own host can take a fresh copy when no
            # other host can (invariant 12); the next tick places the missing replica.
            return [a for h in broken for a in self._retire(service, h)]
        counted = [h for h in service.replicas if self._counts(service, h)]
        missing = service.desired_replicas - len(counted)
        if missing > 0:
            return self._place(service, missing, now_ms)
        actions: list[Action] = []
        if self.unplaced.pop(service.name, None) is not None:
            actions.append(Persist({}, history=((
                service.name, "placement", f"{service.name} has its "
                f"{service.desired_replicas} replicas again", {}),)))
        # Good: serving or in sync, alive, and counted. Retire only once enough are good,
        # so a copy is never dropped before its replacement holds everything.
        good = [h for h in sorted(counted) if h == service.primary or (
            h in service.in_sync and self.live[h].alive)]
        if len(good) < service.desired_replicas:
            return actions
        extra = [h for h in service.replicas if h not in good and h != service.primary]
        spare = [h for h in good if h != service.primary]
        surplus = len(good) - service.desired_replicas
        if surplus > 0:
            # Keep zones spread: first retire where the zone holds another good replica.
            zones = [self.hosts[h].zone for h in good]
            spare.sort(key=lambda h: (zones.count(self.hosts[h].zone) > 1, h), reverse=True)
            extra.extend(spare[:surplus])
        for host in sorted(extra):
            actions.extend(self._retire(service, host))
        return actions

    def _place(self, service: ServiceInfo, missing: int, now_ms: int) -> list[Action]:
        policy = service.placement or self.placement_policy
        holding = {h: self.hosts[h].zone if h in self.hosts else "" for h in service.replicas}
        found = placement.place(policy, Resources.from_dict(service.needs), missing,
                                self._host_views(), holding)
        actions: list[Action] = []
        for host in found.hosts:
            service.replicas[host] = BUILDING
            self._building_since[(service.name, host)] = now_ms
        if found.hosts:
            actions.append(Persist({SERVICE_PREFIX + service.name: _pack(service)}, history=((
                service.name, "placement",
                f"{service.name}: building a new replica on {', '.join(found.hosts)} "
                f"({policy}) to restore {service.desired_replicas} replicas",
                {"hosts": list(found.hosts), "policy": policy}),)))
            actions.extend(self._assignments(service, only=None))
        if not found.reason:
            self.unplaced.pop(service.name, None)
            return actions
        first = service.name not in self.unplaced
        self.unplaced[service.name] = found.reason
        # Free room changes with every heartbeat: one event when it starts, then at most one
        # per host_dead_ms while it lasts (status always shows the newest reason).
        last = self._unplaced_logged_ms.get(service.name)
        if first or last is None or now_ms - last >= self.timing.host_dead_ms:
            self._unplaced_logged_ms[service.name] = now_ms
            actions.append(Persist({}, history=((
                service.name, "placement_failed", f"{service.name}: {found.reason}; "
                "retried as hosts change", {"reason": found.reason, "policy": policy}),)))
        return actions

    def _host_views(self) -> list[HostView]:
        """Every host as placement sees it, with the needs of the replicas placed on it."""
        placed: dict[str, Resources] = {}
        pending: dict[str, Resources] = {}
        for service in self.services.values():
            needs = Resources.from_dict(service.needs)
            for host in service.replicas:
                placed[host] = placed.get(host, Resources()).plus(needs)
                live = self.live.get(host)
                if live is None or service.name not in live.replicas:
                    pending[host] = pending.get(host, Resources()).plus(needs)
        views = []
        for host_id, info in sorted(self.hosts.items()):
            live = self.live.get(host_id)
            measured = placement.capacity_and_free(live.metrics) if live else None
            views.append(HostView(
                host_id=host_id, zone=info.zone, alive=bool(live and live.alive),
                draining=info.draining or host_id in self.patching,
                capacity=measured[0] if measured else None, free=measured[1] if measured else None,
                placed=placed.get(host_id, Resources()), pending=pending.get(host_id, Resources()),
            ))
        return views

    def _retire(self, service: ServiceInfo, host: str) -> list[Action]:
        """Removes a replica from the service (persisted first) and tells its host to drop
        it; the primary stops shipping to it. A host that does not hear it now is told again
        when it next reports the replica."""
        assert host != service.primary, (service.name, host)
        role = service.replicas.pop(host)
        _set_in_sync(service, [h for h in service.in_sync if h != host])
        service.promotable = [h for h in service.promotable if h != host]
        self._promotable_at.pop((service.name, host), None)
        self._building_since.pop((service.name, host), None)
        self._deposed.discard((service.name, host))
        leaving = host in service.leaving
        service.leaving = [h for h in service.leaving if h != host]
        if not service.leaving:
            self._move_to.pop(service.name, None)
        live = self.live.get(host)
        broken = self._broken(service, host)
        why = ("its host is dead" if live is None or live.dead
               else f"it cannot read its own snapshot or log ({broken}); it is rebuilt from "
                    "the primary" if broken
               else "it moved to another host" if leaving
               else "its host is draining" if self.hosts[host].draining
               else f"{service.desired_replicas} other replicas are in sync")
        actions: list[Action] = [Persist({SERVICE_PREFIX + service.name: _pack(service)},
                                         history=((
            service.name, "retired", f"{host} ({role}) retired from {service.name}: {why}",
            {"host_id": host, "role": role}),))]
        info = self.hosts.get(host)
        if info is not None:
            actions.append(DropReplica(host, info.address, service.name, service.epoch))
        actions.extend(self._assignments(service, only=service.primary))
        return actions

    def _move_primary(self, service: ServiceInfo, now_ms: int) -> list[Action]:
        """A primary on a draining host, or whose disk is full (it refuses every write),
        moves by switchover to a live, promotable in-sync duplica on a host that is not
        draining (asked again every failure timeout)."""
        info = self.hosts.get(service.primary)
        live = self.live.get(service.primary)
        report = live.replicas.get(service.name) if live else None
        full = (report is not None and report.disk_full and report.role == PRIMARY
                and report.epoch == service.epoch)
        leaving = service.primary in service.leaving
        if (info is None or not (info.draining or full or leaving)
                or service.name in self.failovers or service.name in self.switchovers):
            return []
        last = self._drain_moved_ms.get(service.name)
        if last is not None and now_ms - last < self.timing.failure_timeout_ms:
            return []
        targets = [h for h in service.in_sync if h in service.promotable
                   and self.live.get(h, HostLive(0, False)).alive
                   and not self.hosts[h].draining and h not in service.leaving]
        if not targets:
            return []
        self._drain_moved_ms[service.name] = now_ms
        preferred = self._move_to.get(service.name)
        if preferred in targets:
            return [StartSwitchover(service.name, preferred)]
        if preferred in service.replicas:
            return []  # a migration's copy: hand over to it once it is in sync
        return [StartSwitchover(service.name, max(targets, key=lambda h: (
            self.live[h].replicas[service.name].matched_index
            if service.name in self.live[h].replicas else 0, h)))]

    # --- migration ----------------------------------------------------------------------------

    def migration_source(self, name: str, to_host: str, replica: str, from_host: str) -> str:
        """Validates a migration of one of `name`'s replicas to `to_host`; returns the host
        whose replica is the source (the primary, or a duplica)."""
        service = self.services.get(name)
        if service is None:
            raise InvalidRequest(f"no service {name!r}")
        if replica not in (PRIMARY, DUPLICA):
            raise InvalidRequest(f"replica {replica!r}: choose primary or duplica")
        busy = (name in self.failovers or name in self.switchovers or name in self.migrations
                or service.leaving)
        if busy:
            raise InvalidRequest(f"{name} is already changing replicas; try again shortly")
        info = self.hosts.get(to_host)
        if info is None:
            raise InvalidRequest(f"no host {to_host!r}; `failoverctl hosts` lists them")
        if to_host in service.replicas:
            raise InvalidRequest(f"{to_host} already holds a replica of {name}")
        if info.draining or not self.live.get(to_host, HostLive(0, False)).alive:
            raise InvalidRequest(f"{to_host} is draining or not alive")
        if replica == PRIMARY:
            source = service.primary
        else:
            duplicas = [h for h in service.duplicas() if service.replicas[h] == DUPLICA]
            if from_host and from_host not in duplicas:
                raise InvalidRequest(f"{from_host} holds no duplica of {name}; choose one of "
                                     f"{duplicas or 'none'}")
            if not duplicas:
                raise InvalidRequest(f"{name} has no duplica to move")
            source = from_host or duplicas[0]
        if not self.live.get(source, HostLive(0, False)).alive:
            raise InvalidRequest(f"the source {source} is not alive")
        return source

    def spare_host(self, name: str) -> str:
        """A host placement would choose for one more replica of `name`, or "" if none."""
        service = self.services[name]
        holding = {h: self.hosts[h].zone if h in self.hosts else "" for h in service.replicas}
        found = placement.place(service.placement or self.placement_policy,
                                Resources.from_dict(service.needs), 1, self._host_views(),
                                holding)
        return found.hosts[0] if found.hosts else ""

    def migration_begin(self, name: str, source: str, target: str) -> None:
        self.migrations[name] = (source, target)

    def migration_abort(self, name: str, why: str) -> list[Action]:
        moving = self.migrations.pop(name, None)
        if moving is None:
            return []
        return [Persist({}, history=((name, "migration_aborted", (
            f"migration of {name} from {moving[0]} to {moving[1]} aborted, {moving[0]} "
            f"still serves: {why}"), {"source": moving[0], "target": moving[1],
                                     "why": why}),))]

    def migration_complete(self, name: str, stats: dict[str, Any],
                           now_ms: int) -> list[Action]:
        """The target holds a checked, durable copy (or, for a rebuild by replay, is to be
        built): it becomes a building replica, and the source is leaving. The rest is the
        usual machinery: the target catches up and joins the in-sync set, a leaving primary
        is switched over, and the source is retired."""
        source, target = self.migrations.pop(name)
        service = self.services[name]
        assert target not in service.replicas, (name, target)
        service.replicas[target] = BUILDING
        self._building_since[(name, target)] = now_ms
        if source in service.replicas and source not in service.leaving:
            service.leaving = sorted({*service.leaving, source})
        if source == service.primary:
            self._move_to[name] = target
        method = stats.get("method", "")
        return [
            Persist({SERVICE_PREFIX + name: _pack(service)}, history=((
                name, "migration",
                f"{name}: {method} copy from {source} to {target} done; {target} catches up, "
                f"then {source} is retired",
                {"source": source, "target": target, **stats}),)),
            *self._assignments(service),
        ]

    def restart_planned(self, host_id: str) -> list[Action]:
        """A host is about to restart (a patch): its duplicas leave the in-sync sets first,
        so that no sync write waits on them; they rejoin once caught up."""
        actions: list[Action] = []
        for service in self.services.values():
            if host_id in service.in_sync and service.primary != host_id:
                actions.extend(self._shrink_in_sync(service, host_id, "its host restarts for "
                                                    "a patch"))
        return actions

    def set_draining(self, host_id: str, draining: bool) -> list[Action]:
        """Marks a host draining (no new replicas; its primaries move off by switchover and
        its replicas are rebuilt elsewhere, then retired) or not."""
        info = self.hosts.get(host_id)
        if info is None:
            raise InvalidRequest(f"no host {host_id!r}; `failoverctl hosts` lists them")
        if info.draining == draining:
            return []
        info.draining = draining
        verb = "draining" if draining else "no longer draining"
        return [Persist({HOST_PREFIX + host_id: _pack(info)}, history=((
            "", "host", f"host {host_id} is {verb}", {"host_id": host_id,
                                                      "draining": draining}),))]

    # --- failover --------------------------------------------------------------------------

    def hears_primary(self, service_name: str, answers: list[HearsAnswer],
                      now_ms: int) -> list[Action]:
        """The duplicas answered whether they still hear the suspected primary."""
        failover = self.failovers.get(service_name)
        service = self.services.get(service_name)
        if failover is None or service is None or failover.state != "asking":
            return []
        if (self.live.get(failover.old_primary, HostLive(0, alive=False)).alive
                and not self._broken(service, failover.old_primary)):
            del self.failovers[service_name]  # it heartbeated again meanwhile
            return []
        hearing = [a.host_id for a in answers if a.reachable and a.hears]
        if hearing:
            del self.failovers[service_name]
            return [Persist({}, history=((
                service_name, "suspicion",
                f"{failover.old_primary} missed heartbeats but {', '.join(hearing)} still "
                "hear it: the coordinator's link is at fault, no failover",
                {"old_primary": failover.old_primary, "hearing": hearing}),))]
        candidates = [a for a in answers if a.reachable and a.host_id in service.in_sync
                      and a.host_id in service.promotable and a.epoch <= service.epoch
                      and not self._broken(service, a.host_id)]
        if not candidates:
            del self.failovers[service_name]
            return [Persist({}, history=((
                service_name, "failover_blocked",
                f"{failover.old_primary} is unreachable and no in-sync duplica of "
                f"{service_name} answered; asking again after a failure timeout",
                {"old_primary": failover.old_primary, "in_sync": list(service.in_sync)}),))]
        # The in-sync duplica with the most of the log: it holds every committed entry.
        chosen = max(candidates, key=lambda a: (a.durable_index, a.host_id))
        failover.chosen = chosen.host_id
        holder, expiry = self.leases.get(service_name, ("", 0))
        failover.lease_expiry_ms = (expiry + self.timing.lease_drift_margin_ms
                                    if holder == failover.old_primary else 0)
        failover.state = "waiting_lease"
        if now_ms >= failover.lease_expiry_ms:
            return self._promote(failover, now_ms)
        return []

    def _promote(self, failover: Failover, now_ms: int) -> list[Action]:
        service = self.services[failover.service]
        del self.failovers[failover.service]
        self.leases.pop(service.name, None)
        old, new = failover.old_primary, failover.chosen
        service.epoch += 1
        service.primary = new
        service.replicas[new] = PRIMARY
        if old in service.replicas:
            service.replicas[old] = DUPLICA  # rejoins as duplica when it comes back
        _set_in_sync(service, sorted(h for h in service.in_sync if h not in (old, new)))
        service.promotable = [h for h in service.promotable if h in service.in_sync]
        self._forget_thresholds(service.name)
        self._deposed.add((service.name, old))
        details = {
            "old_primary": old, "new_primary": new, "epoch": service.epoch,
            "detection_ms": failover.suspected_ms - failover.last_heartbeat_ms,
            "promotion_ms": now_ms - failover.suspected_ms,
        }
        actions: list[Action] = [
            Persist({SERVICE_PREFIX + service.name: _pack(service)}, history=((
                service.name, "failover",
                f"{service.name}: {old} failed; {new} promoted at epoch {service.epoch}",
                details),)),
            *self._assignments(service),
        ]
        old_host = self.hosts.get(old)
        if old_host is not None:
            actions.append(StepDown(old, old_host.address, service.name, service.epoch))
        actions.extend(self._bump_routes())
        return actions

    # --- operator commands ------------------------------------------------------------------

    def create_service(self, name: str, kind: str, replicas: int, mode: str, now_ms: int,
                       needs: Resources | None = None, policy: str = "") -> list[Action]:
        """Places and creates a service: the first host chosen holds the primary."""
        if name in self.services:
            raise InvalidRequest(f"service {name!r} exists already")
        if mode not in ("sync", "async"):
            raise InvalidRequest(f"mode {mode!r}: choose sync or async")
        if not 1 <= replicas <= 16:
            raise InvalidRequest(f"replicas must be 1..16, not {replicas}")
        if policy:
            placement.check_policy(policy)
        needs = needs or Resources()
        found = placement.place(policy or self.placement_policy, needs, replicas,
                                self._host_views(), {})
        if found.reason:
            raise InvalidRequest(f"cannot place {name}: {found.reason}; start more agents, "
                                 "undrain a host or ask for fewer replicas")
        chosen = list(found.hosts)
        service = ServiceInfo(
            name=name, kind=kind, mode=mode, desired_replicas=replicas, epoch=1,
            primary=chosen[0], replicas={h: (PRIMARY if i == 0 else DUPLICA)
                                         for i, h in enumerate(chosen)},
            in_sync=sorted(chosen[1:]), promotable=sorted(chosen[1:]), in_sync_generation=1,
            needs=needs.to_dict(), placement=policy,
        )
        self.services[name] = service
        return [
            Persist({SERVICE_PREFIX + name: _pack(service)}, history=((
                name, "service", f"created {name} ({kind}, {mode}) on {', '.join(chosen)}",
                {"kind": kind, "mode": mode, "hosts": chosen}),)),
            *self._assignments(service),
            *self._bump_routes(),
        ]

    def delete_service(self, name: str) -> list[Action]:
        service = self.services.pop(name, None)
        if service is None:
            raise InvalidRequest(f"no service {name!r}")
        self.failovers.pop(name, None)
        self.leases.pop(name, None)
        actions: list[Action] = [Persist({}, deletes=(SERVICE_PREFIX + name,), history=((
            name, "service", f"deleted {name}", {}),))]
        for host in service.replicas:
            info = self.hosts.get(host)
            if info is not None:
                actions.append(DropReplica(host, info.address, name, service.epoch))
        actions.extend(self._bump_routes())
        return actions

    def switchover_target(self, name: str, to_host: str) -> str:
        """Validates a switchover and returns its target (an in-sync, live duplica)."""
        service = self.services.get(name)
        if service is None:
            raise InvalidRequest(f"no service {name!r}")
        if name in self.failovers or name in self.switchovers:
            raise InvalidRequest(f"{name} is already changing primary; try again shortly")
        # Promotable, not only in sync: a member the primary counts but that may not hold
        # every write acknowledged before it was counted must not become the primary.
        candidates = [h for h in service.in_sync
                      if h in service.promotable
                      and self.live.get(h, HostLive(0, False)).alive
                      and not self.hosts[h].draining]
        if to_host:
            if to_host == service.primary:
                raise InvalidRequest(f"{to_host} is already the primary of {name}")
            if to_host not in candidates:
                raise InvalidRequest(f"{to_host} is not a live in-sync duplica of {name} "
                                     "known to hold every acknowledged write (promotable); "
                                     f"choose one of {candidates or 'none'}")
            return to_host
        if not candidates:
            raise InvalidRequest(f"{name} has no live, promotable in-sync duplica to switch "
                                 "over to")
        reports = {h: self.live[h].replicas.get(name) for h in candidates}
        return max(candidates, key=lambda h: (reports[h].durable_index if reports[h] else 0, h))

    def switchover_begin(self, name: str, to_host: str) -> None:
        self.switchovers[name] = to_host

    def switchover_abort(self, name: str) -> None:
        self.switchovers.pop(name, None)

    def switchover_complete(self, name: str, to_host: str, stall_ms: int) -> list[Action]:
        """The old primary holds writes and the target has its whole log: raise the epoch
        and hand over (the old primary becomes a duplica of the target)."""
        self.switchovers.pop(name, None)
        service = self.services[name]
        old = service.primary
        service.epoch += 1
        service.primary = to_host
        service.replicas[to_host] = PRIMARY
        service.replicas[old] = DUPLICA
        _set_in_sync(service, sorted({*service.in_sync, old} - {to_host}))
        # The old primary holds every write (it held them until the target had them all).
        service.promotable = sorted({*service.promotable, old} & set(service.in_sync))
        self._forget_thresholds(name)
        self.leases.pop(name, None)
        return [
            Persist({SERVICE_PREFIX + name: _pack(service)}, history=((
                name, "switchover",
                f"{name}: primary moved from {old} to {to_host} at epoch {service.epoch}",
                {"old_primary": old, "new_primary": to_host, "epoch": service.epoch,
                 "stall_ms": stall_ms}),)),
            *self._assignments(service),
            *self._bump_routes(),
        ]

    # --- helpers ---------------------------------------------------------------------------

    def _assignments(self, service: ServiceInfo, only: str | None = None) -> list[Action]:
        """What each replica of the service should hold; the duplicas first, so they accept
        the new primary's stream when it starts."""
        addresses = {h: self.hosts[h].address for h in service.replicas if h in self.hosts}
        primary_address = addresses.get(service.primary, "")
        duplicas = {h: addresses[h] for h in service.duplicas() if h in addresses}
        actions: list[Action] = []
        for host in [*sorted(duplicas), service.primary]:
            if (only is not None and host != only) or host not in addresses:
                continue
            is_primary = host == service.primary
            actions.append(AssignRole(
                host_id=host, address=addresses[host], service=service.name, kind=service.kind,
                role=PRIMARY if is_primary else service.replicas.get(host, DUPLICA),
                epoch=service.epoch, mode=service.mode,
                primary=None if is_primary else (service.primary, primary_address),
                duplicas=duplicas if is_primary else {},
                in_sync=tuple(h for h in service.in_sync if h in duplicas) if is_primary else (),
                in_sync_generation=service.in_sync_generation if is_primary else 0,
            ))
        return actions

    def routes(self) -> tuple[Route, ...]:
        out = []
        for service in sorted(self.services.values(), key=lambda s: s.name):
            host = self.hosts.get(service.primary)
            out.append(Route(service.name, service.kind, service.primary,
                             host.address if host else "", service.epoch))
        return tuple(out)

    def _routes(self) -> PushRoutes:
        return PushRoutes(self.routes_version, self.routes())

    def _bump_routes(self) -> list[Action]:
        self.routes_version += 1
        return [Persist({ROUTES_VERSION_KEY: msgpack.packb(self.routes_version)}),
                PushRoutes(self.routes_version, self.routes())]
