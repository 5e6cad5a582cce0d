"""The coordinator's policy as a pure state machine (docs/design.md, Failure detection,
Redundancy, Switchover, Patch).

Events go in (a host registers, a heartbeat, a tick with the monotonic time, the duplicas'
answers, an operator's command, an agent's answer to an operation's call) and actions come
out (persist, assign a role, step down, ask duplicas, push routes, the calls of an
operation). The daemon carries the actions out in order; a `Persist` must be durable before
any later action of the same list is carried out, which is how a new epoch reaches the store
before any agent hears of it (invariant 1). Nothing here reads a clock or does I/O.

`CoordinatorCore` ties its parts together, each a module of this package: `membership`
(hosts, heartbeats, the in-sync set), `detector` (suspicion, failover, leases),
`redundancy` (placement, rebuild, retirement, draining), `handover` (the steps of a
switchover and a migration), `routes` (assignments and the routes table) and `operations`
(the plans of switchover, migration and patch, which it starts and steps).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from failover import defaults
from failover.core import placement
from failover.core.coordinator.actions import (
    Action,
    Answer,
    DropReplica,
    HearsAnswer,
    Persist,
    StartSwitchover,
    merge_persists,
)
from failover.core.coordinator.detector import Detector
from failover.core.coordinator.handover import Handover
from failover.core.coordinator.membership import Membership
from failover.core.coordinator.model import (
    HOST_PREFIX,
    ROUTES_VERSION_KEY,
    SERVICE_PREFIX,
    Failover,
    HookReport,
    HostInfo,
    HostLive,
    ServiceInfo,
    Timing,
    pack,
)
from failover.core.coordinator.operations import MigratePlan, PatchPlan, Plan, SwitchoverPlan
from failover.core.coordinator.redundancy import Redundancy
from failover.core.coordinator.routes import Routes
from failover.core.names import check_command_name, check_host_id, check_service_name
from failover.core.placement import HostView, Resources
from failover.core.roles import BUILDING, DUPLICA, HOOK_EVENTS, PRIMARY, ROLES
from failover.errors import InvalidRequest

DEFAULT_TIMING = Timing()


class CoordinatorCore(Membership, Detector, Redundancy, Handover, Routes):
    """Cluster policy: detection, fenced promotion, in-sync set, routes, switchover,
    redundancy (placement, rebuild, retirement), draining, and the operations' plans."""

    def __init__(self, timing: Timing = DEFAULT_TIMING,
                 placement_policy: str = defaults.PLACEMENT_POLICY,
                 kind_paged: Callable[[str], bool] = lambda kind: True) -> None:
        assert timing.host_dead_ms >= timing.failure_timeout_ms, timing
        # A restarted coordinator knows no leases: a failover right after it is safe only
        # because a primary is suspected no sooner than any lease it held can have ended.
        assert timing.failure_timeout_ms >= timing.lease_ms + timing.lease_drift_margin_ms, timing
        self.timing = timing
        self.placement_policy = placement.check_policy(placement_policy)
        # Whether a kind keeps its state in a paged arena (so it migrates page by page);
        # the daemon knows the kinds installed.
        self.kind_paged = kind_paged
        self.hosts: dict[str, HostInfo] = {}
        self.live: dict[str, HostLive] = {}
        self.services: dict[str, ServiceInfo] = {}
        self.routes_version = 0
        self.failovers: dict[str, Failover] = {}
        # service -> (host, monotonic ms when its lease runs out, as the coordinator sees it)
        self.leases: dict[str, tuple[str, int]] = {}
        # The time this coordinator did not run, as its driver reported it (`stalled`).
        self.stalled_ms = 0
        self.switchovers: dict[str, str] = {}  # service -> target host, while in progress
        # (host, service) -> when a heartbeat last made us re-send its assignment
        self._reassigned_ms: dict[tuple[str, str], int] = {}
        # service -> host -> the primary's durable index when it first reported counting
        # this in-sync duplica: once the duplica's matched index reaches it, it holds every
        # write the primary acknowledged before counting it, and becomes promotable.
        self._promotable_at: dict[str, dict[str, int]] = {}
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
        # (service, host) -> when a building replica was placed (None: it was building
        # when this core was restored); each takes a rebuild slot until built or retired
        self._building_since: dict[tuple[str, str], int | None] = {}
        # service -> when a drain last asked to move its primary
        self._drain_moved_ms: dict[str, int] = {}
        # service -> (source host, target host) while a live migration copies its state
        self.migrations: dict[str, tuple[str, str]] = {}
        # service -> the host a leaving primary should hand over to (a migration's target)
        self._move_to: dict[str, str] = {}
        # hosts being patched: no new replicas go there (their replicas stay)
        self.patching: set[str] = set()
        # op id -> the plan of an operation in progress (switchover, migration, patch)
        self.operations: dict[str, Plan] = {}
        # What the daemon should log (a report refused or ignored): it takes them after each
        # call; the oldest go first if nobody does.
        self.notices: deque[str] = deque(maxlen=defaults.COORDINATOR_NOTICES_MAX)
        # host -> (the agent's start time, the newest hook seq recorded from it): a result
        # re-sent after a lost heartbeat answer is not recorded twice (volatile: after a
        # coordinator restart one may be, which history readers can tell by its seq).
        self._hooks_recorded: dict[str, tuple[float, int]] = {}
        # (duplica, service, epoch) whose unverifiable matched index was noted once
        self._unverified_noted: set[tuple[str, str, int]] = set()
        # service -> (its primary, epoch, when it last reported, its durable index then, how
        # fast that grew, entries per ms): what bounds its duplicas' matched indexes
        self._primary_progress: dict[str, tuple[str, int, int, int, float]] = {}
        # host -> the services with a replica on it (`_track`, `_untrack`, `_holding`), and
        # service -> its place in the order of `services`: a heartbeat, a host's suspicion
        # or its registration visits only that host's services.
        self._held: dict[str, set[str]] = {}
        self._seq: dict[str, int] = {}
        self._next_seq = 0
        # host -> the needs of the replicas placed on it and of those it does not report
        # yet (`Redundancy._host_views`), dropped when either changes
        self._loads: dict[str, tuple[Resources, Resources]] = {}
        # A decision round in progress (`_round`), and whether it changed the routes.
        self._rounds = 0
        self._routes_bumped = False
        # host -> its view for placement and what it was worked out from (`_host_views`):
        # kept until the host's loads, metrics, liveness, draining or zone change.
        self._views: dict[str, tuple[HostView, dict[str, float] | None]] = {}
        self._host_order: list[str] = []  # the hosts by id, for placement
        # service -> the host of its primary, and host -> how many primaries it holds
        # (`_count_primary`): new primaries go where there are fewest.
        self._primary_of: dict[str, str] = {}
        self._primaries: dict[str, int] = {}
        # services whose missing replicas wait for a rebuild slot (recorded once)
        self._rebuild_waiting: set[str] = set()
        # service -> when a failover promoted its primary, until the service is settled or
        # deleted (`Redundancy._rebuild_calming`): its lost replica is not rebuilt before
        # `rebuild_calm_ms` has passed since.
        self._promoted_ms: dict[str, int] = {}
        # Rebalance (`Redundancy._rebalance`): since when no failover has been in progress
        # (None: not yet seen a tick), when a move was last considered or a move of any kind
        # last seen in progress, the services whose `StartSwitchover` it emitted (their
        # switchover plans say "rebalance"), and its moves abandoned since one last succeeded.
        self._calm_since_ms: int | None = None
        self._rebalanced_ms: int | None = None
        self._rebalancing: set[str] = set()
        self._rebalance_failures = 0
        # The services a tick must look at (`_attend`): every one that may not be settled
        # (`Redundancy._settled`). Any change that can unsettle a service adds it (a change
        # of its record, of what its hosts report, of their liveness or draining); a tick
        # drops those it finds settled. A tick visits these, not every service.
        self._attention: set[str] = set()
        # host -> `_holding(host)`, kept until its replicas change
        self._held_order: dict[str, list[ServiceInfo]] = {}
        # service -> the generation of its in-sync set at which its primary's report was
        # found to change nothing of its thresholds (`Membership._counts_all`)
        self._counted_generation: dict[str, int] = {}

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
                self.live[host.host_id] = HostLive(last_heartbeat_ms=now_ms,
                                                   stalled_mark_ms=self.stalled_ms)
                self._host_order = []
            elif key.startswith(SERVICE_PREFIX):
                service = ServiceInfo(**record)
                self.services[service.name] = service
                self._track(service)
                for host, role in service.replicas.items():
                    if role == BUILDING and host != service.primary:
                        # Still building: it takes a rebuild slot as one placed here would
                        # (since when is not known: its build time is not recorded).
                        self._building_since[(service.name, host)] = None
            elif key == ROUTES_VERSION_KEY:
                self.routes_version = int(record)
        actions: list[Action] = []
        for service in self.services.values():
            actions.extend(self._assignments(service))
        actions.append(self._routes())
        return actions

    # --- operator commands ------------------------------------------------------------------

    def create_service(self, name: str, kind: str, replicas: int, mode: str, now_ms: int,
                       needs: Resources | None = None, policy: str = "") -> list[Action]:
        """Places and creates a service: the first host chosen holds the primary, one with
        the fewest primaries among those that fit."""
        check_service_name(name)
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
                                self._host_views(), {}, self._primaries)
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
        self._track(service)
        return [
            Persist({SERVICE_PREFIX + name: pack(service)}, history=((
                name, "service", f"created {name} ({kind}, {mode}) on {', '.join(chosen)}",
                {"kind": kind, "mode": mode, "hosts": chosen}),)),
            *self._assignments(service),
            *self._bump_routes(name),
        ]

    def delete_service(self, name: str) -> list[Action]:
        check_service_name(name)
        service = self.services.pop(name, None)
        if service is None:
            raise InvalidRequest(f"no service {name!r}")
        self.failovers.pop(name, None)
        self.leases.pop(name, None)
        self._promotable_at.pop(name, None)
        self._counted_generation.pop(name, None)  # a new service of that name starts over
        for host in service.replicas:
            self._untrack(name, host)
        self._seq.pop(name, None)
        self._count_primary(name)
        self._rebuild_waiting.discard(name)
        self._promoted_ms.pop(name, None)
        self._attention.discard(name)
        for host in service.replicas:
            # A building replica of a deleted service no longer takes a rebuild slot.
            self._building_since.pop((name, host), None)
        actions: list[Action] = [Persist({}, deletes=(SERVICE_PREFIX + name,), history=((
            name, "service", f"deleted {name}", {}),))]
        for host in service.replicas:
            info = self.hosts.get(host)
            if info is not None:
                actions.append(DropReplica(host, info.address, name, service.epoch))
        actions.extend(self._bump_routes(name))
        return actions

    def audit(self, caller: str, rpc: str, target: str, outcome: str,
              service: str = "") -> list[Action]:
        """Records an admin's or operator's call in history: who (`caller`, the identity in
        its certificate, or "anonymous (no TLS)"), what (`rpc`, `target`) and how it ended
        (`outcome`). Durable like every history row: through `Persist`."""
        details: dict[str, Any] = {"caller": caller, "rpc": rpc, "target": target,
                                   "outcome": outcome}
        return [Persist({}, history=((service, "audit",
                                      f"{caller}: {rpc} {target}: {outcome}", details),))]

    def check_hooks(self, reports: list[HookReport]) -> None:
        """InvalidRequest for hook reports no agent of this code sends (over the bounds, an
        unknown event or role, a bad name); changes nothing, so a heartbeat can be refused
        before anything of it is taken."""
        if len(reports) > defaults.HOOK_RESULTS_PER_HEARTBEAT_MAX:
            raise InvalidRequest(f"a heartbeat carries {len(reports)} hook results, over "
                                 f"hook_results_per_heartbeat_max "
                                 f"({defaults.HOOK_RESULTS_PER_HEARTBEAT_MAX})")
        for r in reports:
            check_service_name(r.service)
            check_command_name(r.command)
            if r.event not in HOOK_EVENTS or r.role not in ROLES:
                raise InvalidRequest(f"hook result: event {r.event[:40]!r} or role "
                                     f"{r.role[:40]!r} is not one an agent reports")
            if len(r.output.encode()) > defaults.HOOK_OUTPUT_BYTES_MAX:
                raise InvalidRequest(f"hook result output is over hook_output_bytes_max "
                                     f"({defaults.HOOK_OUTPUT_BYTES_MAX} bytes)")

    def record_hooks(self, host_id: str, reports: list[HookReport]) -> list[Action]:
        """The hooks a host's heartbeat reports it ran, as `hook` history events (one
        `Persist`), checked (`check_hooks`); reports recorded before are skipped."""
        self.check_hooks(reports)
        info = self.hosts.get(host_id)
        started = info.started_at if info is not None else 0.0
        known_start, newest = self._hooks_recorded.get(host_id, (started, 0))
        if known_start != started:
            newest = 0  # a new agent process counts from 1 again
        events = []
        for r in sorted(reports, key=lambda r: r.seq):
            if r.seq <= newest:
                continue
            newest = r.seq
            outcome = ("not run (too many hooks running)" if r.skipped
                       else f"killed after {r.duration_ms} ms" if r.timed_out
                       else f"exited {r.exit_code} in {r.duration_ms} ms")
            events.append((r.service, "hook", f"{r.service}: {r.event} hook {r.command} on "
                           f"{host_id} ({r.role}, epoch {r.epoch}) {outcome}", {
                               "host_id": host_id, "event": r.event, "command": r.command,
                               "role": r.role, "epoch": r.epoch, "exit_code": r.exit_code,
                               "output": r.output, "duration_ms": r.duration_ms,
                               "timed_out": r.timed_out, "skipped": r.skipped}))
        self._hooks_recorded[host_id] = (started, newest)
        return [Persist({}, history=tuple(events))] if events else []

    def take_notices(self) -> list[str]:
        """What happened that the daemon should log, since it last asked."""
        notices = list(self.notices)
        self.notices.clear()
        return notices

    # --- time ------------------------------------------------------------------------------

    def stalled(self, lost_ms: int) -> None:
        """This coordinator did not run for `lost_ms` (its driver's tick came that much later
        than due: CPU starvation, a long pause, a stop signal). The heartbeats sent meanwhile
        wait unread, so that time is not counted as any host's silence: a stalled
        coordinator that woke up used to suspect every host at once (benchmarks/storm.py,
        creating 300 services on a loaded machine: "host1: not alive; ... host10: not
        alive"). Leases are not touched: a failover still waits out the lease granted."""
        assert lost_ms >= 0, lost_ms
        self.stalled_ms += lost_ms

    def tick(self, now_ms: int) -> list[Action]:
        """Detects silent hosts, moves failovers along, restores redundancy, moves primaries
        off hosts they must leave, evens primaries out (rate limited), and steps the
        operations in progress (their waits and deadlines). One decision round (`_round`):
        one `Persist`, then the actions."""
        return self._round(lambda: self._tick(now_ms))

    def _tick(self, now_ms: int) -> list[Action]:
        actions = self._detect(now_ms)
        self._attend_written(actions)  # what it decided may unsettle services
        # Only the services that may not be settled (`_attention`), in the order of
        # `services`: every other one is settled, and `_restore_redundancy` and
        # `_move_primary` would do nothing for it.
        attention = self._attention
        for service in self._attending():
            if self._settled(service):
                attention.discard(service.name)  # until something unsettles it
                self._promoted_ms.pop(service.name, None)  # whole again: no rebuild to calm
                continue
            actions.extend(self._restore_redundancy(service, now_ms))
            actions.extend(self._move_primary(service, now_ms))
        actions.extend(self._rebalance(now_ms))
        for op_id, plan in list(self.operations.items()):
            actions.extend(plan.tick(now_ms))
            if plan.finished:
                self.operations.pop(op_id, None)
        return actions

    def hears_primary(self, service_name: str, answers: list[HearsAnswer],
                      now_ms: int) -> list[Action]:
        """The duplicas answered whether they still hear the suspected primary."""
        return self._round(lambda: Detector.hears_primary(self, service_name, answers, now_ms))

    def hears_primary_many(self, answers: Mapping[str, list[HearsAnswer]],
                           now_ms: int) -> list[Action]:
        """The answers of the duplicas of several suspected primaries (service -> answers,
        those of one tick's `AskHearsPrimary`s): every failover they decide is one round,
        one `Persist` (the new epochs, in-sync sets, history and the routes version) ahead
        of every assignment, step-down and the routes pushed once."""
        return self._round(lambda: [action for name, answered in answers.items()
                                    for action in Detector.hears_primary(self, name, answered,
                                                                         now_ms)])

    def process_exited(self, host_id: str, incarnation: int, exit_code: int,
                       now_ms: int) -> list[Action]:
        """A host's supervisor reports that its agent process of `incarnation` exited
        (`Detector.process_exited`): one decision round."""
        return self._round(lambda: Detector.process_exited(self, host_id, incarnation,
                                                           exit_code, now_ms))

    def _round(self, decide: Callable[[], list[Action]]) -> list[Action]:
        """Runs one decision round: what it decides is one `Persist` (`merge_persists`: at
        the place of the first, so it still precedes every action that tells an agent or a
        client of what it holds), and a routes table changed in it is pushed once, at its
        end, with the version raised once."""
        if self._rounds:
            return decide()
        self._rounds += 1
        try:
            actions = decide()
            if self._routes_bumped:
                actions.append(self._routes())
        finally:
            self._rounds -= 1
            self._routes_bumped = False
        return self._noted(merge_persists(actions))

    def _noted(self, actions: list[Action]) -> list[Action]:
        """Brings the primaries per host up to date with the services these actions write
        (a primary changes only by a decision, and every decision is persisted), and has the
        next tick look at each of them (`_attend_written`)."""
        for action in actions:
            if isinstance(action, Persist) and action.puts:
                for key in action.puts:
                    if key.startswith(SERVICE_PREFIX):
                        self._count_primary(key[len(SERVICE_PREFIX):])
        return self._attend_written(actions)

    # --- operations (failover.core.coordinator.operations) --------------------------------

    def start_switchover(self, op_id: str, name: str, to_host: str,
                         now_ms: int) -> list[Action]:
        """An operator's switchover of `name` to `to_host` ("" lets the core choose)."""
        check_service_name(name)
        if to_host:
            check_host_id(to_host, "target host")
        return self._start(SwitchoverPlan(self, op_id, name, to_host), now_ms)

    def start_primary_move(self, op_id: str, action: StartSwitchover,
                           now_ms: int) -> list[Action]:
        """Carries out `StartSwitchover`: a switchover whose failures are recorded as a
        drain's and tried again on a later tick; it never raises."""
        purpose = "rebalance" if action.service in self._rebalancing else "drain"
        self._rebalancing.discard(action.service)
        return self._start(SwitchoverPlan(self, op_id, action.service, action.to_host,
                                          purpose=purpose), now_ms)

    def start_migration(self, op_id: str, name: str, to_host: str, now_ms: int,
                        replica: str = PRIMARY, max_downtime_ms: int = defaults.MAX_DOWNTIME_MS,
                        method: str = "precopy", from_host: str = "",
                        max_bandwidth_bytes_s: int = 0) -> list[Action]:
        """An operator's move of a replica of `name` to `to_host`."""
        check_service_name(name)
        check_host_id(to_host, "target host")
        if from_host:
            check_host_id(from_host, "source host")
        return self._start(MigratePlan(self, op_id, name, to_host, replica, max_downtime_ms,
                                       method, from_host, max_bandwidth_bytes_s), now_ms)

    def start_patch(self, op_id: str, hosts: list[str], now_ms: int, everything: bool = False,
                    command: str = "", failback: bool = False, method: str = "precopy",
                    command_timeout_ms: int = 0) -> list[Action]:
        """An operator's patch of `hosts` (or of every host), one at a time. `command` is
        the name of an entry of each host's allowlist ("" for none), never a command line:
        what runs on a host is set on the host."""
        for host in hosts:
            check_host_id(host)
        if command:
            check_command_name(command)
        return self._start(PatchPlan(self, op_id, hosts, everything, command, failback,
                                     method, command_timeout_ms), now_ms)

    def answer(self, op_id: str, answer: Answer, now_ms: int) -> list[Action]:
        """An agent answered a call of operation `op_id` (nothing if it has ended)."""
        plan = self.operations.get(op_id)
        if plan is None:
            return []
        actions = plan.answer(answer, now_ms)
        if plan.finished:
            del self.operations[op_id]
        return self._noted(actions)

    def cancel(self, op_id: str, why: str, now_ms: int) -> list[Action]:
        """The caller of operation `op_id` went away: it is abandoned now (what it holds in
        the core at once, the rest by the actions returned)."""
        plan = self.operations.pop(op_id, None)
        return self._noted(plan.cancel(why, now_ms)) if plan is not None else []

    def _start(self, plan: Plan, now_ms: int) -> list[Action]:
        if plan.op_id in self.operations:
            raise InvalidRequest(f"operation {plan.op_id!r} is already in progress")
        actions = plan.start(now_ms)
        if not plan.finished:
            self.operations[plan.op_id] = plan
        return self._noted(actions)
