"""The coordinator daemon's I/O: the store, calls to agents, route watchers, the clock.

`failover.core.coordinator.CoordinatorCore` decides; this carries its actions out. Every call
into the core and the `Persist` actions it returns happen under one lock, so decisions are
serialised and durable before anyone hears of them. Calls to an agent go through a queue per
host, in order: two assignments of one epoch (an in-sync set shrinking, then growing) must
never arrive the other way round.

Leadership (issue 15): several coordinators may share one store; only the one leading acts.
`lead(term)` loads the state and restores a fresh core; `deposed(why)` stops everything at once
(no commit, no agent call, no route push after it), drops the core and the operations in
flight and ends the route watchers, so the process answers as a follower until it leads again.
Every call to an agent carries the term (`TERM_METADATA`): agents refuse an older one. A
`Coordinator` used on its own (tests) leads from the start, as before.

The operations (switchover, migrate, patch, a drain's move of a primary) are plans of the
core (`failover.core.coordinator.operations`): this starts one, makes the calls its actions
ask for, feeds each answer back (`CoordinatorCore.answer`), passes its progress and end to
its caller, and cancels it in the core when the caller goes away. It decides nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from failover import defaults
from failover.clock import monotonic_ms
from failover.coordinator.history_feed import HistoryFeed
from failover.coordinator.host_caller import AGENT_CALL_TIMEOUT_S, HostCaller
from failover.core.coordinator import (
    Action,
    Answer,
    AskHearsPrimary,
    AssignRole,
    CoordinatorCore,
    Copied,
    CopyRound,
    Done,
    DropReplica,
    Failed,
    HearsAnswer,
    HookReport,
    HostInfo,
    MigratePlan,
    Persist,
    Plan,
    Prepared,
    PrepareSwitchover,
    Progress,
    PushRoutes,
    ReleaseSwitchover,
    ReplicaReport,
    RestartAgent,
    Restarted,
    Route,
    StartMigration,
    StartSwitchover,
    StepDown,
    Timing,
)
from failover.core.coordinator.actions import merge_persists
from failover.core.names import check_service_name
from failover.core.placement import Resources
from failover.core.roles import PRIMARY
from failover.errors import InvalidRequest, LeadershipLostError, Overloaded, Unavailable
from failover.net import channels
from failover.net.convert import cluster_status
from failover.net.tls import TlsMaterial
from failover.observe.coordinator_metrics import CoordinatorMetrics, log_history
from failover.observe.logs import event_fields
from failover.storage.store import CoordinatorInfo, Store
from failover.v1 import agent_pb2, coordinator_pb2

log = logging.getLogger(__name__)

# Progress messages of one operation waiting for its caller to read them.
OPERATION_PROGRESS_MAX = 1024
# Route deltas queued per watcher; one that falls further behind gets the whole table next.
ROUTE_WATCHER_QUEUE = 64
# The invocation metadata every call to an agent carries: the term of the coordinator making it.
TERM_METADATA = channels.COORDINATOR_TERM_METADATA_KEY
# Put in a route watcher's queue when this coordinator stops leading: its stream ends.
_WATCH_END = coordinator_pb2.RoutesUpdate()


class _Watch:
    """One WatchRoutes stream: the services it follows (None: all) and the version of the last
    update queued or sent to it, which a delta of its services follows (`base_version`)."""

    __slots__ = ("last_version", "services")

    def __init__(self, services: frozenset[str] | None, version: int) -> None:
        self.services = services
        self.last_version = version

    def delta(self, update: coordinator_pb2.RoutesUpdate) -> coordinator_pb2.RoutesUpdate | None:
        """`update` as this watch sees it: the whole delta, or only its services' part (None
        when the push changed none of them: nothing is sent)."""
        if self.services is None:
            return update
        routes = [r for r in update.routes if r.service in self.services]
        deleted = [name for name in update.deleted if name in self.services]
        if not routes and not deleted:
            return None
        return coordinator_pb2.RoutesUpdate(version=update.version, routes=routes,
                                            deleted=deleted, base_version=self.last_version)


def _route_message(route: Route) -> coordinator_pb2.Route:
    return coordinator_pb2.Route(service=route.service, kind=route.kind, epoch=route.epoch,
                                 primary_address=route.primary_address,
                                 primary_host_id=route.primary_host_id)


def _pages(kind: str) -> bool:
    """Whether `kind` keeps its state in a paged arena (so it migrates page by page)."""
    from failover.kinds import load_kind

    try:
        return load_kind(kind)().paged is not None
    except Exception:  # an unknown kind here: the source agent will say what is wrong
        return True


@dataclass(slots=True)
class _Beat:
    """A heartbeat waiting for its round (`Coordinator._take_beats`); `leases` ends in the
    leases granted, or the error that refused it."""

    host_id: str
    metrics: dict[str, float]
    replicas: list[ReplicaReport]
    hooks: tuple[HookReport, ...]
    incarnation: int
    leases: asyncio.Future[list[tuple[str, int, int]]]


def _settle(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # a caller that gave up does not read it: not "never retrieved"


class _Operation:
    """An operation as its caller sees it: what the core reports of it, in order, and the
    calls in flight for it."""

    def __init__(self, op_id: str) -> None:
        self.op_id = op_id
        self.plan: Plan | None = None  # to end it after a reload
        # Progress is a few messages a step; a caller that stops reading loses progress, never
        # the end.
        self.queue: asyncio.Queue[Progress | Done | Failed] = asyncio.Queue(
            maxsize=OPERATION_PROGRESS_MAX)
        self.calls: set[asyncio.Task[Any]] = set()
        self.ended = False
        self.show_output = False  # pass what a patch command printed to the caller


class Coordinator:
    """The running coordinator: core + store + agents + route watchers."""

    def __init__(self, store: Store, timing: Timing | None = None,
                 placement_policy: str = defaults.PLACEMENT_POLICY,
                 tls: TlsMaterial | None = None, address: str = "",
                 takeover_grace_ms: int = 0, shared_store: bool = False) -> None:
        self.store = store
        self.address = address  # advertised to the other coordinators and callers
        # Whether this coordinator acts (decides, commits, calls agents). True on its own, as
        # before issue 15; the daemon makes it a follower first (`follow`) and leads by `lead`.
        self.leading = True
        self.term = 0  # the store's leadership term while leading
        # Raised at every lead and every deposal: work begun under an older one stops.
        self._generation = 0
        # Set when a commit found leadership lost: the daemon campaigns again.
        self.lost = asyncio.Event()
        # After a takeover, no failure detection for this long: agents first find the new
        # leader (they were heartbeating to the old one), as the grace of a restart.
        self.takeover_grace_ms = takeover_grace_ms
        # A store other coordinators share (etcd): one this process cannot read makes it step
        # down and campaign again; the SQLite store's makes it exit (nobody else can lead).
        self.shared_store = shared_store
        # With TLS, every call to an agent presents this coordinator's certificate and
        # checks the agent's against its host id.
        self.tls = tls
        self.timing = timing or Timing()
        self.core = CoordinatorCore(self.timing, placement_policy, _pages)
        self._lock = asyncio.Lock()
        # Heartbeats waiting for their round, the newest of each host (at most
        # COORDINATOR_HOSTS_MAX), and the task taking them (`_take_beats`).
        self._beats: dict[str, _Beat] = {}
        self._beat_round: asyncio.Future[None] | None = None
        # op id -> an operation whose end has not been carried out yet
        self._operations: dict[str, _Operation] = {}
        self._callers: dict[tuple[str, str], HostCaller] = {}  # (host id, address) ->
        # Each watcher's queue of deltas (None in it: send the whole table, it fell behind),
        # and what it watches.
        self._watchers: dict[asyncio.Queue[coordinator_pb2.RoutesUpdate | None], _Watch] = {}
        # The table last pushed, and its message, built only when a watcher needs it whole.
        self._routes_version = 0
        self._routes_table: tuple[Route, ...] = ()
        self._routes_full: coordinator_pb2.RoutesUpdate | None = coordinator_pb2.RoutesUpdate(
            full=True)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dropped_calls = 0
        self._tick_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[Any]] = set()
        # Set when the store can no longer be read: the daemon exits (see `_reload`).
        self.fatal = asyncio.Event()
        # WatchHistory's watchers: each commit's events go to them as it returns.
        self.history_feed = HistoryFeed(store, self._not_leading)
        # Prometheus metrics (issue 17; None without --metrics-listen): the daemon sets it.
        self.metrics: CoordinatorMetrics | None = None

    async def start(self) -> None:
        """Opens the store and leads (the SQLite store leads at once): one coordinator."""
        await self.store.open()
        # A coordinator embedded without an address (tests) names itself by a placeholder.
        await self.lead(await self.store.campaign(self.address or "localhost:0"))

    def follow(self) -> None:
        """Answers as a follower until `lead` (the daemon's state before its first term)."""
        self.leading = False
        self.term = 0

    async def lead(self, term: int) -> None:
        """Starts acting under `term`: loads the state from the store and restores a fresh
        core from it, every host alive for a failure timeout from now (as at a restart),
        and failure detection held for `takeover_grace_ms` more. Raises what the load
        raises, leading nothing."""
        state = await self.store.load()
        async with self._lock:
            self._generation += 1
            self.lost.clear()
            self.term = term
            self.leading = True
            self.core = CoordinatorCore(self.timing, self.core.placement_policy, _pages)
            await self._execute(self.core.restore(state, monotonic_ms()))
        log.info("coordinator leads in term %d: %d hosts, %d services, routes version %d",
                 term, len(self.core.hosts), len(self.core.services), self.core.routes_version)
        if self._tick_task is not None:
            self._tick_task.cancel()  # one tick loop, of the core now leading
        self._tick_task = asyncio.get_running_loop().create_task(
            self._tick_loop(self.takeover_grace_ms / 1000))

    def deposed(self, why: str) -> None:
        """Stops acting at once (no await: nothing runs between learning it and stopping):
        the tick loop, every task and every call to an agent are cancelled, the operations
        in flight end for their callers, route watchers' streams end, and the core is
        dropped. Idempotent."""
        if not self.leading:
            return
        log.warning("coordinator stops leading (term %d): %s", self.term, why)
        self.leading = False
        self.term = 0
        self._generation += 1
        if self._tick_task is not None:
            self._tick_task.cancel()
            self._tick_task = None
        for task in list(self._tasks):
            task.cancel()
        callers, self._callers = list(self._callers.values()), {}
        for caller in callers:
            caller.stop()  # no call starts after this; the channel closes below
            self._spawn_detached(caller.close())
        for op in list(self._operations.values()):
            op.ended = True
            for call in op.calls:
                call.cancel()
            while op.queue.full():
                op.queue.get_nowait()
            op.queue.put_nowait(Failed(op.op_id, f"coordinator {self.address or 'here'} "
                                       f"stopped leading ({why}); retry with the leader"))
        self._operations.clear()
        for queue in list(self._watchers):
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(_WATCH_END)
        self.history_feed.end_all()
        self.core = CoordinatorCore(self.timing, self.core.placement_policy, _pages)

    def _spawn_detached(self, coro: Any) -> None:
        """A task that outlives a deposal (closing channels), kept referenced until done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
        if self._beat_round is not None:
            self._beat_round.cancel()
        for task in list(self._tasks):
            task.cancel()
        for caller in list(self._callers.values()):
            await caller.close()
        for task in list(self._closing):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        await self.store.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tick_loop(self, grace_s: float = 0.0) -> None:
        period_s = self.timing.heartbeat_ms / 4000
        # Held after a takeover: a host silent through the whole grace is suspected at the
        # first tick; one that found the new leader meanwhile is not.
        await asyncio.sleep(grace_s)
        last_ms = monotonic_ms()
        while True:
            await asyncio.sleep(period_s)
            try:
                async with self._lock:
                    now_ms = monotonic_ms()
                    # A tick far later than due: this process did not run (or held the lock)
                    # meanwhile, and the heartbeats sent then wait unread behind it.
                    lost_ms = now_ms - last_ms - self.timing.heartbeat_ms
                    last_ms = now_ms
                    if lost_ms > 0:
                        self.core.stalled(lost_ms)
                        if lost_ms >= self.timing.failure_timeout_ms // 2:
                            log.warning("coordinator stalled for %d ms: hosts are not charged "
                                        "for that silence", lost_ms)
                    if not self._acting():
                        continue  # the store ended the term; the deposal follows: decide nothing
                    # Beats that arrived while the lock was held are taken first: a tick
                    # that judged silence with them still queued suspected hosts whose beat
                    # was waiting here (storm runs: 8 beats queued, up to 130 ms, and three
                    # services of a live host failed over). Only those queued now: beats
                    # keep coming while a round commits, and the tick must still run.
                    for _ in range(-(-len(self._beats) // defaults.HEARTBEATS_PER_ROUND_MAX)):
                        if not (self._beats and self._acting()):
                            break
                        await self._take_round()
                    now_ms = max(now_ms, monotonic_ms())
                    await self._execute(self.core.tick(now_ms))
            except Exception:
                log.exception("tick failed")

    # --- carrying out actions --------------------------------------------------------------

    async def _execute(self, actions: list[Action]) -> None:
        """Runs under the lock: persists in order, queues agent calls, pushes routes.

        The core has already changed its memory when it returns a `Persist`: the store and
        the memory must agree before anything else acts (invariant 15). So the actions are
        carried out to the end even when the caller is cancelled (a CLI deadline, a dropped
        stream), and a commit that fails makes the coordinator reload its state from the
        store, dropping the actions that depended on it."""
        assert self._lock.locked()
        if not self._acting():
            # A follower's core is empty: it decided nothing. A leader whose store is no
            # longer sure of its term (the deposal follows) acts no more either.
            raise self._not_leading()
        carried = asyncio.ensure_future(self._carry_out(actions))
        cancelled = False
        while not carried.done():
            try:
                await asyncio.shield(carried)
            except asyncio.CancelledError:
                cancelled = True  # finish first; the cancellation is passed on below
            except Exception:
                break  # the failure is raised below
        for notice in self.core.take_notices():
            log.warning("%s", notice)
        if cancelled:
            if not carried.cancelled() and carried.exception() is not None:
                log.error("carrying out actions failed while cancelled: %s",
                          carried.exception())
            raise asyncio.CancelledError
        carried.result()

    def acting(self) -> bool:
        """Whether this coordinator leads and may act now (its health and `is_leader`)."""
        return self._acting()

    def _acting(self) -> bool:
        """Whether this coordinator may act now: it leads, and its store has not yet said
        the term ended (the daemon's deposal follows that at the next turn of the loop)."""
        return self.leading and (self.store is None or self.store.leading)

    def _not_leading(self) -> Unavailable:
        return Unavailable(f"coordinator {self.address or 'here'} is not the leader (it "
                           "stopped leading while carrying this out): retry with the leader")

    async def _carry_out(self, actions: list[Action]) -> None:
        asks: list[AskHearsPrimary] = []
        generation = self._generation
        decided_ms = monotonic_ms()  # about when the core decided these (for the metrics)
        for action in actions:
            if generation != self._generation or not self._acting():
                # Deposed meanwhile (or led again under a new core): nothing more of these
                # actions may go out, they were decided by a leader that no longer is.
                raise self._not_leading()
            if isinstance(action, Persist):
                try:
                    started = time.perf_counter()
                    seqs = await self.store.commit(action.puts, action.deletes,
                                                   action.history)
                    if self.metrics is not None:
                        self.metrics.committed(action.history, time.perf_counter() - started,
                                               decided_ms)
                    else:
                        for row in action.history:
                            log_history(*row)
                except LeadershipLostError as exc:
                    # The store refused: another coordinator leads. Stop now, not at the
                    # next keep-alive; the daemon campaigns again.
                    self.deposed(f"the store refused a commit: {exc}")
                    self.lost.set()
                    raise self._not_leading() from exc
                except Exception as exc:
                    if generation != self._generation:
                        raise self._not_leading() from exc
                    await self._reload(exc)
                    raise Unavailable(
                        f"the coordinator's store refused a commit ({exc}); the coordinator "
                        "reloaded its state from the store and did not act on it: retry"
                    ) from exc
                self.history_feed.publish(seqs, action.history)
            elif isinstance(action, (AssignRole, StepDown, DropReplica)):
                self._enqueue(action)
            elif isinstance(action, AskHearsPrimary):
                asks.append(action)  # asked together below: their answers are one round
                log.info("%s: its primary is suspected; asking %s whether they still hear it",
                         action.service, ", ".join(sorted(action.hosts)) or "no duplica",
                         extra=event_fields("suspected", service=action.service,
                                            epoch=action.epoch, asking=sorted(action.hosts)))
            elif isinstance(action, PushRoutes):
                self._push_routes(action)
                if self.metrics is not None:
                    self.metrics.routes_pushed(monotonic_ms())
            elif isinstance(action, StartSwitchover):
                self._spawn(self._move_primary(action))
            elif isinstance(action, PrepareSwitchover):
                self._call(action.op_id, lambda a=action: self._prepare(a))
            elif isinstance(action, ReleaseSwitchover):
                self._spawn(self._release(action))
            elif isinstance(action, StartMigration):
                self._call(action.op_id, lambda a=action: self._migrate_out(a))
            elif isinstance(action, RestartAgent):
                self._call(action.op_id, lambda a=action: self._restart(a))
            elif isinstance(action, Progress | Done | Failed):
                self._ended(action)
            else:
                raise AssertionError(f"unknown action {action!r}")
        if asks:
            self._spawn(self._ask_hears_primary(asks))

    async def _reload(self, why: Exception) -> None:
        """Replaces the core with one restored from the store: what a failed commit changed
        in memory is gone, as after a restart. A store that cannot even be read ends the
        process (its supervisor restarts it), rather than acting on memory it cannot trust."""
        log.error("store commit failed (%s): reloading the cluster state from the store", why)
        try:
            state = await self.store.load()
        except Exception as exc:
            if self.shared_store:
                # Another coordinator may lead from the same store once it is back: this one
                # stops acting and campaigns again, rather than exiting.
                log.error("cannot reload the cluster state from the store (%s): stepping "
                          "down", exc)
                self.deposed(f"the store cannot be read: {exc}")
                self.lost.set()
                raise
            log.critical("cannot reload the cluster state from the store (%s): exiting", exc)
            self.fatal.set()
            raise
        core = CoordinatorCore(self.timing, self.core.placement_policy, _pages)
        actions = core.restore(state, monotonic_ms())
        # The operations in progress were plans of the old core: each ends, releasing what
        # it holds (its caller is told the coordinator reloaded).
        for op in list(self._operations.values()):
            if op.plan is not None:
                actions.extend(op.plan.abandon(f"the coordinator reloaded its state from the "
                                               f"store after a failed commit ({why})"))
        assert not any(isinstance(a, Persist) for a in actions), actions
        self.core = core
        await self._carry_out(actions)

    def _caller(self, host_id: str, address: str) -> HostCaller:
        if not self._acting():
            raise self._not_leading()  # a task of a deposed term, not yet cancelled
        caller = self._callers.get((host_id, address))
        if caller is None:
            caller = self._callers[(host_id, address)] = HostCaller(
                address, host_id, self.tls, self.term, self._acting)
        return caller

    def _enqueue(self, action: AssignRole | StepDown | DropReplica) -> None:
        """Queues a call to an agent; never blocks, never fails the actions after it. A full
        queue (`COORDINATOR_HOST_QUEUE_MAX` for the host, `COORDINATOR_QUEUED_CALLS_MAX` for
        all) drops the call and says so: heartbeats re-send an assignment a host lacks, and
        the drop of a replica it should not hold."""
        caller = self._caller(action.host_id, action.address)
        if caller.queued(action):
            return  # the same call is queued already, behind nothing else of its service
        queued = sum(c.qsize() for c in self._callers.values())
        if caller.full() or queued >= defaults.COORDINATOR_QUEUED_CALLS_MAX:
            self._dropped_calls += 1
            if self._dropped_calls == 1 or self._dropped_calls % 1000 == 0:
                log.warning("call queue full (%d for %s, %d in all): %s of %s to %s dropped "
                            "(%d dropped so far); a later heartbeat sends it again",
                            caller.qsize(), action.host_id, queued,
                            type(action).__name__, action.service, action.host_id,
                            self._dropped_calls)
            return
        caller.put(action)

    async def _ask_hears_primary(self, asks: list[AskHearsPrimary]) -> None:
        """Asks the duplicas of every suspected primary of one round at once, and hands all
        their answers to the core together (`hears_primary_many`): the failovers of a host's
        death are one decision round, one store commit.

        Each host is asked once per round, one HearsPrimary call naming every service asked
        of it, answered with each one's matched index: one call per service (and a status
        call after them) made a host death of 30 primaries 31 calls at every surviving host,
        and a suspicion under load repeated them all."""
        by_host: dict[tuple[str, str], list[str]] = {}
        for action in asks:
            for host_id, address in action.hosts.items():
                by_host.setdefault((host_id, address), []).append(action.service)

        asked_ms = monotonic_ms()

        async def ask_host(host_id: str, address: str,
                           services: list[str]) -> dict[str, HearsAnswer]:
            caller = self._caller(host_id, address)
            wanted = set(services)
            try:
                reply = await caller.stub.HearsPrimary(
                    agent_pb2.HearsPrimaryRequest(services=services),
                    timeout=self.core.hears_timeout_ms(host_id, asked_ms) / 1000,
                    metadata=caller.metadata)
            except grpc.aio.AioRpcError:
                return {}
            # The matched index, not the durable one: the promoted duplica must hold every
            # committed entry, and an unverified durable tail may be a fenced primary's.
            return {a.service: HearsAnswer(host_id, True, a.hears, a.matched_index, a.epoch)
                    for a in reply.answers if a.held and a.service in wanted}

        hosts = list(by_host)
        results = await asyncio.gather(*(ask_host(h, a, by_host[(h, a)]) for h, a in hosts),
                                       return_exceptions=True)
        heard = {host: result for host, result in zip(hosts, results, strict=True)
                 if isinstance(result, dict)}

        def ask_all(action: AskHearsPrimary) -> list[HearsAnswer]:
            return [heard.get((h, a), {}).get(action.service, HearsAnswer(h, reachable=False))
                    for h, a in action.hosts.items()]

        answered = [ask_all(action) for action in asks]
        async with self._lock:
            await self._execute(self.core.hears_primary_many(
                {action.service: clean for action, clean in zip(asks, answered, strict=True)},
                monotonic_ms()))

    def _push_routes(self, action: PushRoutes) -> None:
        """Keeps the whole table (for watchers that connect or fall behind) and sends the
        others what changed. A delta goes out only when it follows the version they hold
        (the core's previous push was carried out): else every watcher gets the table."""
        follows = action.changed is not None and action.version == self._routes_version + 1
        self._routes_version = action.version
        self._routes_table = action.routes
        self._routes_full = None
        if not self._watchers:
            return
        update = (coordinator_pb2.RoutesUpdate(
            version=action.version, routes=[_route_message(r) for r in action.changed or ()],
            deleted=action.deleted) if follows else None)
        for queue, watch in list(self._watchers.items()):
            if update is not None and not queue.full():
                mine = watch.delta(update)
                if mine is not None:
                    queue.put_nowait(mine)
                    watch.last_version = action.version
                continue
            # Behind (or no delta to send): the whole table replaces whatever it has queued;
            # the push never waits for a watcher.
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)

    def _full_routes(self, watch: _Watch) -> coordinator_pb2.RoutesUpdate:
        """The whole table as `watch` sees it (every route, or only those of its services)."""
        watch.last_version = self._routes_version
        if watch.services is not None:
            return coordinator_pb2.RoutesUpdate(
                version=self._routes_version, full=True,
                routes=[_route_message(r) for r in self._routes_table
                        if r.service in watch.services])
        if self._routes_full is None:
            self._routes_full = coordinator_pb2.RoutesUpdate(
                version=self._routes_version, full=True,
                routes=[_route_message(r) for r in self._routes_table])
        return self._routes_full

    # --- the calls the servicer makes ------------------------------------------------------

    async def register(self, info: HostInfo, metrics: dict[str, float] | None = None) -> None:
        async with self._lock:
            if not self._acting():
                raise self._not_leading()
            known = self.core.hosts.get(info.host_id)
            live = self.core.live.get(info.host_id)
            # A new process, or a host the coordinator had stopped hearing: the channel to
            # it may sit in reconnect backoff. Not a live host's agent registering again
            # (after a coordinator forgot it, or an older agent after one slow heartbeat):
            # on a loaded machine every such channel's new TLS connection made the next
            # heartbeats slower still.
            stale = (known is None or known.started_at != info.started_at
                     or live is None or not live.alive)
            actions = self.core.register(info, monotonic_ms(), metrics)  # may refuse it
            caller = self._callers.get((info.host_id, info.address))
            if caller is not None and stale:
                caller.reconnect()  # the host just proved it is reachable
            await self._execute(actions)

    async def heartbeat(self, host_id: str, metrics: dict[str, float],
                        replicas: list[ReplicaReport],
                        hooks: Sequence[HookReport] = (),
                        incarnation: int = 0) -> list[tuple[str, int, int]]:
        """A host's heartbeat: its reports to the core, and the hooks it ran (issue 17) to
        history; returns the leases granted. `incarnation` is the agent process's (issue
        16): another than the one registered is refused as not registered.

        Heartbeats are taken in rounds (`_take_beats`): every beat that arrived while the
        lock was held is handed to the core in one go and what they change is one store
        commit. A beat is taken even when its caller gave up waiting (the agent's deadline
        is two heartbeats): that the host was alive is known either way. A host's newer beat
        replaces one still waiting: an agent sends its next beat only once the last one was
        answered or given up on, so nobody waits for the older one, and the newer carries
        the same and fresher reports (hook results included: they stay pending on the agent
        until a beat is answered)."""
        beats = self._beats
        if host_id not in beats and len(beats) >= defaults.COORDINATOR_HOSTS_MAX:
            raise Overloaded(f"{len(beats)} heartbeats wait already (coordinator_hosts_max "
                             f"{defaults.COORDINATOR_HOSTS_MAX}): retry after a backoff")
        beat = _Beat(host_id, metrics, replicas, tuple(hooks), incarnation,
                     asyncio.get_running_loop().create_future())
        older = beats.pop(host_id, None)
        if older is not None:
            _settle(older.leases, Unavailable(f"host {host_id}: a newer heartbeat replaced "
                                              "this one before it was taken"))
        beats[host_id] = beat
        if self._beat_round is None or self._beat_round.done():
            self._beat_round = asyncio.ensure_future(self._take_beats())
        return await asyncio.shield(beat.leases)

    async def _take_beats(self) -> None:
        """Takes the heartbeats queued, round after round, until none is left. One round
        holds the lock once and commits once: under load, one commit per beat under the
        lock made beats queue behind each other's commits past the agents' deadline, and a
        beat cancelled while it queued was never taken, so hosts that were alive were
        suspected, which made more commits (measured: 612 beats dropped in 40 s of 10
        agents at rest, each suspicion asking HearsPrimary of 30 services)."""
        while self._beats:
            async with self._lock:
                await self._take_round()

    async def _take_round(self) -> None:
        """One round of `_take_beats` (the caller holds the lock): up to
        HEARTBEATS_PER_ROUND_MAX queued beats to the core, one commit, then their leases."""
        assert self._lock.locked()
        queued = self._beats
        beats = [queued.pop(h) for h in list(itertools.islice(
            queued, defaults.HEARTBEATS_PER_ROUND_MAX))]
        if not self._acting():
            # A follower must not take a heartbeat as if it led: it grants no lease. Nor
            # may a leader whose store is no longer sure of its term: another may lead
            # soon, and would not wait out a lease it does not know of.
            for beat in beats:
                _settle(beat.leases, self._not_leading())
            return
        taken: list[tuple[_Beat, list[tuple[str, int, int]]]] = []
        actions: list[Action] = []
        for beat in beats:
            try:
                leases, decided = self.core.heartbeat(
                    beat.host_id, beat.metrics, beat.replicas, monotonic_ms(),
                    beat.incarnation)
            except Exception as exc:  # this beat's refusal; the others go on
                _settle(beat.leases, exc)
                continue
            if beat.hooks:
                # Recorded once the beat was taken (an unregistered host's record nothing).
                # Results this coordinator refuses (another version's event or role, over a
                # bound) are left out, the beat is taken: the agent re-sends its results
                # until a beat is answered, so refusing the beat refused every later one,
                # and the host lost its leases.
                try:
                    decided = decided + self.core.record_hooks(beat.host_id,
                                                               list(beat.hooks))
                except InvalidRequest as exc:
                    log.warning("host %s: hook results of its heartbeat left out: %s",
                                beat.host_id, exc)
            actions.extend(decided)
            taken.append((beat, leases))
        try:
            await self._execute(merge_persists(actions))
            if not self._acting():  # its commits took the rest of the term
                raise self._not_leading()
        except Exception as exc:
            for beat, _leases in taken:
                _settle(beat.leases, exc)
            return
        for beat, leases in taken:
            if not beat.leases.done():
                beat.leases.set_result(leases)

    async def process_exited(self, host_id: str, incarnation: int, exit_code: int,
                             exited_at: float = 0.0) -> None:
        """A host's supervisor saw its agent process exit (the crash fast path): the core
        decides (`CoordinatorCore.process_exited`), and a failover it starts asks the
        duplicas at once rather than at the next tick."""
        async with self._lock:
            if not self._acting():
                raise self._not_leading()
            log.info("host %s: agent process incarnation %d exited with code %d at %.3f",
                     host_id, incarnation, exit_code, exited_at)
            await self._execute(self.core.process_exited(host_id, incarnation, exit_code,
                                                         monotonic_ms()))
            if not self._acting():
                raise self._not_leading()

    async def watch_routes(self, services: Sequence[str] = (),
                           ) -> AsyncIterator[coordinator_pb2.RoutesUpdate]:
        """The routes of `services` (all when empty): the whole table first, then deltas."""
        if len(services) > defaults.ROUTE_WATCH_SERVICES_MAX:
            raise InvalidRequest(f"a routes watch names {len(services)} services, over "
                                 f"route_watch_services_max ({defaults.ROUTE_WATCH_SERVICES_MAX}):"
                                 " watch them all (name none) or split the watch")
        for name in services:
            check_service_name(name)
        if len(self._watchers) >= defaults.ROUTE_WATCHERS_MAX:
            raise Overloaded(f"{defaults.ROUTE_WATCHERS_MAX} route watchers already "
                             "(route_watchers_max); try again later or another coordinator")
        queue: asyncio.Queue[coordinator_pb2.RoutesUpdate | None] = asyncio.Queue(
            maxsize=ROUTE_WATCHER_QUEUE)
        watch = self._watchers[queue] = _Watch(frozenset(services) if services else None,
                                               self._routes_version)
        try:
            # The whole table first, then deltas in version order; a delta queued meanwhile
            # that the table already holds, the client skips (its version is not newer).
            if not self.leading:
                raise self._not_leading()
            yield self._full_routes(watch)
            while True:
                update = await queue.get()
                if update is _WATCH_END:
                    raise self._not_leading()
                yield self._full_routes(watch) if update is None else update
        finally:
            self._watchers.pop(queue, None)

    async def create_service(self, name: str, kind: str, replicas: int, mode: str,
                             needs: Resources | None = None, policy: str = "") -> None:
        async with self._lock:
            await self._execute(self.core.create_service(name, kind, replicas, mode,
                                                         monotonic_ms(), needs, policy))

    async def set_draining(self, host_id: str, draining: bool, must_finish: bool = False,
                           ) -> str:
        """Drains `host_id` (or takes it back); returns why the drain cannot finish as
        things stand ("" if it can). With `must_finish` such a drain is refused instead
        (`DrainCannotFinish`), nothing changed."""
        async with self._lock:
            await self._execute(self.core.set_draining(host_id, draining, must_finish))
            return "; ".join(self.core.drain_blockers(host_id)) if draining else ""

    async def delete_service(self, name: str) -> None:
        async with self._lock:
            await self._execute(self.core.delete_service(name))

    # --- operations: plans of the core, carried out here ---------------------------------

    async def switchover(self, name: str, to_host: str) -> tuple[int, str, int]:
        """Planned hand-over (`SwitchoverPlan`). Returns (epoch, new primary, stall ms).

        However the caller goes away before it ends (its deadline, an interrupted CLI), the
        core abandons the switchover at once and the primary is told to release its hold:
        a switchover left marked in progress would stop failure detection and rebuilds for
        the service."""
        op = await self._start(
            lambda op_id, now: self.core.start_switchover(op_id, name, to_host, now))
        async with contextlib.aclosing(self._results(op)) as results:
            async for item in results:
                if isinstance(item, Done):
                    return item.result["epoch"], item.result["primary"], item.result["stall_ms"]
                if isinstance(item, Failed):
                    raise Unavailable(item.why)
        raise AssertionError("an operation ends with Done or Failed")

    async def migrate(self, name: str, to_host: str, replica: str, max_downtime_ms: int,
                      method: str, from_host: str = "", max_bandwidth_bytes_s: int = 0,
                      ) -> AsyncIterator[agent_pb2.MigrationProgress]:
        """Moves a replica of `name` to `to_host` (`MigratePlan`). Yields progress; the last
        message has phase "done"."""
        op = await self._start(lambda op_id, now: self.core.start_migration(
            op_id, name, to_host, now, replica or PRIMARY, max_downtime_ms, method, from_host,
            max_bandwidth_bytes_s))
        migration_id = op.plan.migration_id if isinstance(op.plan, MigratePlan) else ""
        async with contextlib.aclosing(self._results(op)) as results:
            async for item in results:
                if isinstance(item, Progress):
                    yield (item.detail if item.detail is not None
                           else agent_pb2.MigrationProgress(
                               migration_id=migration_id, phase=item.step, message=item.message))
                elif isinstance(item, Done):
                    yield agent_pb2.MigrationProgress(
                        migration_id=migration_id, phase="done",
                        stats_json=json.dumps(item.result["stats"]).encode(),
                        message=f"{name}: {item.result['source']} -> {item.result['target']}")
                else:
                    raise Unavailable(item.why)

    async def patch(self, hosts: list[str], everything: bool, command: str, failback: bool,
                    method: str, command_timeout_ms: int, show_output: bool = False,
                    ) -> AsyncIterator[coordinator_pb2.PatchProgress]:
        """Restarts hosts on new code, one at a time (`PatchPlan`). A failed step stops the
        patch with the cluster serving; its last step says so. `command` names an entry of
        each host's allowlist. With `show_output` (an admin's call) what each host's command
        printed (its last `PATCH_OUTPUT_CHARS_MAX` characters) comes back as a step
        "output"; it never goes into history."""
        op = await self._start(lambda op_id, now: self.core.start_patch(
            op_id, hosts, now, everything, command, failback, method, command_timeout_ms),
            show_output=show_output)
        async with contextlib.aclosing(self._results(op)) as results:
            async for item in results:
                if isinstance(item, Progress):
                    yield coordinator_pb2.PatchProgress(host_id=item.host_id, step=item.step,
                                                        message=item.message, ok=item.ok)

    async def _move_primary(self, action: StartSwitchover) -> None:
        """A drain's move of a primary: nobody waits for it, the plan records its end."""
        try:
            await self._start(lambda op_id, now: self.core.start_primary_move(op_id, action, now))
        except Unavailable as exc:  # a failed commit: the next tick asks again
            log.error("moving %s off its host: %s", action.service, exc)

    async def _start(self, start: Callable[[str, int], list[Action]],
                     show_output: bool = False) -> _Operation:
        """Starts an operation in the core (which may refuse it: InvalidRequest) and
        carries out its first actions."""
        op = _Operation(uuid.uuid4().hex)
        op.show_output = show_output
        self._operations[op.op_id] = op
        try:
            async with self._lock:
                actions = start(op.op_id, monotonic_ms())
                op.plan = self.core.operations.get(op.op_id)
                await self._execute(actions)
        except BaseException:
            if op.plan is None and not op.ended:  # refused: nothing was started
                del self._operations[op.op_id]
            self._drop(op, "interrupted")
            raise
        return op

    async def _results(self, op: _Operation) -> AsyncIterator[Progress | Done | Failed]:
        """What the operation reports, to its end; if its caller stops listening first, the
        operation is cancelled in the core."""
        try:
            while True:
                item = await op.queue.get()
                yield item
                if isinstance(item, Done | Failed):
                    return
        finally:
            self._drop(op, "its caller went away (a deadline passed, or it was interrupted)")

    def _drop(self, op: _Operation, why: str) -> None:
        """The caller of an unfinished operation went away: the core abandons it now (no
        await here, so a cancelled caller cannot stop it halfway), and what that takes
        (releasing a hold, recording it) is carried out by a task of its own."""
        if op.ended:
            return
        for call in op.calls:
            call.cancel()
        actions = self.core.cancel(op.op_id, why, monotonic_ms())
        if actions:
            self._spawn(self._execute_later(actions))

    async def _execute_later(self, actions: list[Action]) -> None:
        async with self._lock:
            await self._execute(actions)

    def _ended(self, action: Progress | Done | Failed) -> None:
        if isinstance(action, Progress):  # each step of a patch, drain or move: one record
            log.log(logging.INFO if action.ok else logging.WARNING, "operation %s: %s: %s",
                    action.op_id, action.step, action.message,
                    extra=event_fields("operation_step", op_id=action.op_id, step=action.step,
                                       host_id=action.host_id, ok=action.ok))
        op = self._operations.get(action.op_id)
        if op is None:
            return
        if isinstance(action, Progress):
            if op.queue.full():
                log.info("operation %s: its caller is not reading; progress dropped", op.op_id)
                return
            op.queue.put_nowait(action)
            return
        op.ended = True
        del self._operations[op.op_id]
        for call in op.calls:
            if call is not asyncio.current_task():
                call.cancel()
        while op.queue.full():
            op.queue.get_nowait()
        op.queue.put_nowait(action)

    def _call(self, op_id: str, make: Callable[[], Any]) -> None:
        """Makes an operation's call in a task of its own, tracked so that the operation's
        end cancels it."""
        op = self._operations.get(op_id)
        task = asyncio.get_running_loop().create_task(make())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if op is not None:
            op.calls.add(task)
            task.add_done_callback(op.calls.discard)

    async def _answer(self, op_id: str, answer: Answer) -> None:
        """Feeds an agent's answer to the operation's plan, and carries out what it says."""
        op = self._operations.get(op_id)
        if op is not None:
            task = asyncio.current_task()
            if task is not None and not isinstance(answer, CopyRound):
                op.calls.discard(task)  # its own end must not cancel the task carrying it
        try:
            async with self._lock:
                await self._execute(self.core.answer(op_id, answer, monotonic_ms()))
        except Unavailable as exc:  # a failed commit: the reload ended the operation
            log.error("operation %s: %s", op_id, exc)

    async def _prepare(self, action: PrepareSwitchover) -> None:
        try:
            caller = self._caller(action.host_id, action.address)
            await caller.stub.PrepareSwitchover(
                agent_pb2.PrepareSwitchoverRequest(
                    service=action.service, epoch=action.epoch, target_host_id=action.target,
                    timeout_ms=action.timeout_ms, switchover_id=action.switchover_id),
                timeout=action.answer_within_ms / 1000, metadata=caller.metadata)
            answer = Prepared(True)
        except grpc.aio.AioRpcError as exc:
            answer = Prepared(False, exc.details() or exc.code().name)
        await self._answer(action.op_id, answer)

    async def _release(self, action: ReleaseSwitchover) -> None:
        """Ends a switchover's hold on its primary. A release lost on the way (the agent
        busy or unreachable for a moment) is sent again, doubling the wait from
        `RELEASE_RETRY_BACKOFF_MIN_MS`, for as long as the hold could last: lost once, it
        left writes held for the whole `SWITCHOVER_TIMEOUT_MS` (5 s). A definite answer
        (released, or refused: another epoch, another switchover's hold) ends it."""
        deadline_ms = monotonic_ms() + defaults.SWITCHOVER_TIMEOUT_MS
        backoff_ms = defaults.RELEASE_RETRY_BACKOFF_MIN_MS
        while True:
            caller = self._caller(action.host_id, action.address)
            remaining_ms = deadline_ms - monotonic_ms()
            try:
                await caller.stub.PrepareSwitchover(
                    agent_pb2.PrepareSwitchoverRequest(
                        service=action.service, epoch=action.epoch, release=True,
                        switchover_id=action.switchover_id),
                    timeout=max(0.001, min(AGENT_CALL_TIMEOUT_S, remaining_ms / 1000)),
                    metadata=caller.metadata)
                return
            except grpc.aio.AioRpcError as exc:
                transient = exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                           grpc.StatusCode.DEADLINE_EXCEEDED)
                if not transient or monotonic_ms() + backoff_ms >= deadline_ms:
                    log.info("release of the switchover hold of %s on %s: %s %s",
                             action.service, action.host_id, exc.code().name, exc.details())
                    return
            await asyncio.sleep(backoff_ms / 1000)
            backoff_ms = min(2 * backoff_ms, defaults.RELEASE_RETRY_BACKOFF_MAX_MS)

    async def _migrate_out(self, action: StartMigration) -> None:
        stats: dict[str, Any] | None = None
        try:
            caller = self._caller(action.host_id, action.address)
            stream = caller.stub.MigrateOut(
                agent_pb2.MigrateOutRequest(
                    service=action.service, epoch=action.epoch,
                    migration_id=action.migration_id, target_host_id=action.target_host_id,
                    target_address=action.target_address,
                    max_downtime_ms=action.max_downtime_ms, method=action.method,
                    max_bandwidth_bytes_s=action.max_bandwidth_bytes_s),
                timeout=action.timeout_ms / 1000, metadata=caller.metadata)
            async for progress in stream:
                if progress.phase == "done":
                    stats = json.loads(progress.stats_json or b"{}")
                else:
                    await self._answer(action.op_id, CopyRound(
                        progress.phase, progress.round, progress.pages, progress.dirty_pages,
                        detail=progress))
            answer = (Copied(True, stats) if stats is not None
                      else Copied(False, why="the source ended the copy without a result"))
        except grpc.aio.AioRpcError as exc:
            answer = Copied(False, why=exc.details() or exc.code().name)
        await self._answer(action.op_id, answer)

    async def _restart(self, action: RestartAgent) -> None:
        """Asks the agent to run the allowlisted command `action.command` (a name) and
        re-execute. What the command printed goes to an admin caller only, bounded; history
        keeps the exit code and at most `PATCH_REFUSAL_CHARS_MAX` of a refusal."""
        output = ""
        try:
            caller = self._caller(action.host_id, action.address)
            reply = await caller.stub.Restart(
                agent_pb2.RestartRequest(command=action.command,
                                         command_timeout_ms=action.command_timeout_ms),
                timeout=action.timeout_ms / 1000, metadata=caller.metadata)
            output = reply.output
            if reply.exit_code != 0:
                answer = Restarted(False, reply.version, reply.exit_code,
                                   why=f"the patch command {action.command!r} exited with "
                                   f"{reply.exit_code}")
            else:
                answer = Restarted(True, reply.version, reply.exit_code)
        except grpc.aio.AioRpcError as exc:
            output = exc.details() or ""
            why = " ".join((exc.details() or exc.code().name).split())
            limit = defaults.PATCH_REFUSAL_CHARS_MAX
            answer = Restarted(False, why=why if len(why) <= limit else why[:limit] + "...")
        op = self._operations.get(action.op_id)
        if output and op is not None and op.show_output:
            self._ended(Progress(action.op_id, "output", output[-defaults.PATCH_OUTPUT_CHARS_MAX:],
                                 action.host_id))
        await self._answer(action.op_id, answer)

    def audit_later(self, caller: str, rpc: str, target: str, outcome: str,
                    service: str = "") -> None:
        """`audit` in a task of its own: for a call that was cancelled."""
        self._spawn(self.audit(caller, rpc, target, outcome, service))

    async def audit(self, caller: str, rpc: str, target: str, outcome: str,
                    service: str = "") -> None:
        """Records an admin's or operator's call in history (`CoordinatorCore.audit`); a
        commit that fails is logged, and the call's own answer stands."""
        try:
            async with self._lock:
                await self._execute(self.core.audit(caller, rpc, target, outcome, service))
        except Unavailable as exc:
            log.error("audit of %s %s by %s not recorded: %s", rpc, target, caller, exc)

    async def history(self, service: str, limit: int) -> list[Any]:
        return await self.store.history(service or None, max(1, min(limit or 100, 10_000)))

    async def watch_history(self, service: str, after_seq: int | None, last: int,
                            follow: bool) -> AsyncIterator[Any]:
        """WatchHistory: the kept events of `service` ("": all) after `after_seq` (None: the
        newest `last`), then with `follow` each one as it is committed (`HistoryFeed`).
        Only the leader: a follower commits nothing, so it would never see one."""
        if service:
            check_service_name(service)
        if last > defaults.HISTORY_WATCH_LAST_MAX:
            raise InvalidRequest(f"last is {last}, over history_watch_last_max "
                                 f"({defaults.HISTORY_WATCH_LAST_MAX}): ask for fewer, or "
                                 "page with after_seq")
        if not self.leading:
            raise self._not_leading()
        async for record in self.history_feed.watch(service or None, after_seq, last,
                                                    follow):
            yield record

    def status(self) -> coordinator_pb2.ClusterStatus:
        return cluster_status(self.core, monotonic_ms())

    async def cluster_status(self) -> coordinator_pb2.ClusterStatus:
        """GetClusterStatus, from any coordinator: the leader answers from its core; a
        follower from the store (a core restored from it: hosts show as a restart would, alive
        with no heartbeat age, as a follower hears no heartbeats). Either way with the
        coordinators the store knows, the leader marked; bounded by
        `COORDINATOR_STORE_READ_TIMEOUT_MS` (a store that does not answer: only this one)."""
        timeout_s = defaults.COORDINATOR_STORE_READ_TIMEOUT_MS / 1000
        if self.leading:
            out = self.status()
        else:
            try:
                state = await asyncio.wait_for(self.store.load(), timeout_s)
            except (Exception, TimeoutError) as exc:
                raise Unavailable(f"coordinator {self.address} does not lead and cannot read "
                                  f"the store ({exc or 'timed out'}): ask the leader") from exc
            core = CoordinatorCore(self.timing, self.core.placement_policy, _pages)
            core.restore(state, monotonic_ms())
            out = cluster_status(core, monotonic_ms())
        try:
            known = await asyncio.wait_for(self.store.coordinators(), timeout_s)
        except (Exception, TimeoutError) as exc:
            log.info("status: the store does not say which coordinators are alive: %s", exc)
            known = []
        if not any(c.address == self.address for c in known):
            known.append(CoordinatorInfo(self.address, self.leading, self.term))
        out.coordinators.extend(
            coordinator_pb2.CoordinatorStatus(address=c.address, leader=c.leader, term=c.term)
            for c in sorted(known, key=lambda c: c.address))
        return out
