"""The coordinator daemon's I/O: the store, calls to agents, route watchers, the clock.

`failover.core.coordinator.CoordinatorCore` decides; this carries its actions out. Every call
into the core and the `Persist` actions it returns happen under one lock, so decisions are
serialised and durable before anyone hears of them. Calls to an agent go through a queue per
host, in order: two assignments of one epoch (an in-sync set shrinking, then growing) must
never arrive the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from failover import defaults
from failover.clock import monotonic_ms
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
    StepDown,
    Timing,
)
from failover.core.placement import Resources
from failover.core.roles import DUPLICA, PRIMARY
from failover.errors import InvalidRequest, Unavailable
from failover.net import channels
from failover.net.convert import assign_request, cluster_status
from failover.storage.store import Store
from failover.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2

log = logging.getLogger(__name__)

AGENT_CALL_TIMEOUT_S = defaults.AGENT_CALL_TIMEOUT_MS / 1000
HEARS_PRIMARY_TIMEOUT_S = defaults.HEARS_PRIMARY_TIMEOUT_MS / 1000

MIGRATION_METHODS = ("precopy", "stopcopy", "replay")


def _pages(kind: str) -> bool:
    """Whether `kind` keeps its state in a paged arena (so it migrates page by page)."""
    from failover.kinds import load_kind

    try:
        return load_kind(kind)().paged is not None
    except Exception:  # an unknown kind here: the source agent will say what is wrong
        return True


class _HostCaller:
    """Calls one agent, in order, from a bounded queue; failures are logged (heartbeats
    re-send what a host missed)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = channels.insecure_channel(address, own_connection=True)
        self.stub = agent_pb2_grpc.AgentControlStub(self.channel)
        self.queue: asyncio.Queue[Action] = asyncio.Queue(
            maxsize=defaults.COORDINATOR_HOST_QUEUE_MAX)
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            action = await self.queue.get()
            try:
                await self._call(action)
            except grpc.aio.AioRpcError as exc:
                log.info("%s to %s failed: %s %s", type(action).__name__, self.address,
                         exc.code().name, exc.details())
            except Exception:
                log.exception("%s to %s failed", type(action).__name__, self.address)

    async def _call(self, action: Action) -> None:
        if isinstance(action, AssignRole):
            await self.stub.AssignRole(assign_request(action), timeout=AGENT_CALL_TIMEOUT_S)
        elif isinstance(action, StepDown):
            await self.stub.StepDown(agent_pb2.StepDownRequest(
                service=action.service, epoch=action.epoch), timeout=AGENT_CALL_TIMEOUT_S)
        elif isinstance(action, DropReplica):
            await self.stub.DropReplica(agent_pb2.DropReplicaRequest(
                service=action.service, epoch=action.epoch, delete_data=True),
                timeout=AGENT_CALL_TIMEOUT_S)
        else:
            raise AssertionError(action)

    def reconnect(self) -> None:
        """A fresh channel: the old one may sit in reconnect backoff after the host was down,
        failing calls for up to a second although the host serves again. Its own connection:
        one shared with the old channel would still be in that backoff, and the returning
        host's assignment (its new primary and peers) would fail at once and never be sent
        again, as heartbeats re-send only a role or epoch that differs."""
        old = self.channel
        self.channel = channels.insecure_channel(self.address, own_connection=True)
        self.stub = agent_pb2_grpc.AgentControlStub(self.channel)
        # Calls in flight on the old channel finish (or time out) first: closing it at once
        # would cancel an assignment mid-call.
        loop = asyncio.get_running_loop()
        loop.call_later(AGENT_CALL_TIMEOUT_S + 1, lambda: loop.create_task(old.close()))

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.channel.close()


class Coordinator:
    """The running coordinator: core + store + agents + route watchers."""

    def __init__(self, store: Store, timing: Timing | None = None,
                 placement_policy: str = defaults.PLACEMENT_POLICY) -> None:
        self.store = store
        self.timing = timing or Timing()
        self.core = CoordinatorCore(self.timing, placement_policy)
        self._lock = asyncio.Lock()
        # Notified whenever the core's actions were carried out (every heartbeat and tick
        # too): long commands (migrate, patch) wait on it for the state they need.
        self._changed = asyncio.Condition(self._lock)
        self._callers: dict[str, _HostCaller] = {}
        self._watchers: set[asyncio.Queue[coordinator_pb2.RoutesUpdate]] = set()
        self._routes = coordinator_pb2.RoutesUpdate()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick_task: asyncio.Task[None] | None = None
        # Set when the store can no longer be read: the daemon exits (see `_reload`).
        self.fatal = asyncio.Event()

    async def start(self) -> None:
        await self.store.open()
        state = await self.store.load()
        async with self._lock:
            await self._execute(self.core.restore(state, monotonic_ms()))
        log.info("coordinator resumed: %d hosts, %d services, routes version %d",
                 len(self.core.hosts), len(self.core.services), self.core.routes_version)
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop())

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for caller in self._callers.values():
            await caller.close()
        await self.store.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tick_loop(self) -> None:
        period_s = self.timing.heartbeat_ms / 4000
        while True:
            await asyncio.sleep(period_s)
            try:
                async with self._lock:
                    await self._execute(self.core.tick(monotonic_ms()))
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
        carried = asyncio.ensure_future(self._carry_out(actions))
        cancelled = False
        while not carried.done():
            try:
                await asyncio.shield(carried)
            except asyncio.CancelledError:
                cancelled = True  # finish first; the cancellation is passed on below
            except Exception:
                break  # the failure is raised below
        if cancelled:
            if not carried.cancelled() and carried.exception() is not None:
                log.error("carrying out actions failed while cancelled: %s",
                          carried.exception())
            raise asyncio.CancelledError
        carried.result()
        self._changed.notify_all()

    async def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Persist):
                try:
                    await self.store.commit(action.puts, action.deletes, action.history)
                except Exception as exc:
                    await self._reload(exc)
                    raise Unavailable(
                        f"the coordinator's store refused a commit ({exc}); the coordinator "
                        "reloaded its state from the store and did not act on it: retry"
                    ) from exc
            elif isinstance(action, (AssignRole, StepDown, DropReplica)):
                self._caller(action.address).queue.put_nowait(action)
            elif isinstance(action, AskHearsPrimary):
                self._spawn(self._ask_hears_primary(action))
            elif isinstance(action, PushRoutes):
                self._push_routes(action)
            elif isinstance(action, StartSwitchover):
                self._spawn(self._drain_switchover(action))
            else:
                raise AssertionError(f"unknown action {action!r}")

    async def _reload(self, why: Exception) -> None:
        """Replaces the core with one restored from the store: what a failed commit changed
        in memory is gone, as after a restart. A store that cannot even be read ends the
        process (its supervisor restarts it), rather than acting on memory it cannot trust."""
        log.error("store commit failed (%s): reloading the cluster state from the store", why)
        try:
            state = await self.store.load()
        except Exception as exc:
            log.critical("cannot reload the cluster state from the store (%s): exiting", exc)
            self.fatal.set()
            raise
        core = CoordinatorCore(self.timing, self.core.placement_policy)
        actions = core.restore(state, monotonic_ms())
        assert not any(isinstance(a, Persist) for a in actions), actions
        self.core = core
        await self._carry_out(actions)

    def _caller(self, address: str) -> _HostCaller:
        caller = self._callers.get(address)
        if caller is None:
            caller = self._callers[address] = _HostCaller(address)
        return caller

    async def _ask_hears_primary(self, action: AskHearsPrimary) -> None:
        async def ask(host_id: str, address: str) -> HearsAnswer:
            try:
                reply = await self._caller(address).stub.HearsPrimary(
                    agent_pb2.HearsPrimaryRequest(service=action.service),
                    timeout=HEARS_PRIMARY_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return HearsAnswer(host_id, reachable=False)
            status = await self._caller(address).stub.GetStatus(
                agent_pb2.GetStatusRequest(), timeout=HEARS_PRIMARY_TIMEOUT_S)
            # The matched index, not the durable one: the promoted duplica must hold every
            # committed entry, and an unverified durable tail may be a fenced primary's.
            durable = next((r.matched_index for r in status.replicas
                            if r.service == action.service), 0)
            return HearsAnswer(host_id, True, reply.hears, durable, reply.epoch)

        answers = await asyncio.gather(*(ask(h, a) for h, a in action.hosts.items()),
                                       return_exceptions=True)
        clean = [a if isinstance(a, HearsAnswer) else HearsAnswer(h, reachable=False)
                 for a, h in zip(answers, action.hosts, strict=True)]
        async with self._lock:
            await self._execute(self.core.hears_primary(action.service, clean, monotonic_ms()))

    async def _drain_switchover(self, action: StartSwitchover) -> None:
        """Moves a primary off a draining host; a failure is recorded and tried again."""
        try:
            await self.switchover(action.service, action.to_host)
        except (InvalidRequest, Unavailable) as exc:
            async with self._lock:
                await self.store.commit({}, (), ((
                    action.service, "drain", f"moving {action.service} off its draining "
                    f"primary failed, trying again: {exc}", {"to_host": action.to_host}),))

    def _push_routes(self, action: PushRoutes) -> None:
        self._routes = coordinator_pb2.RoutesUpdate(version=action.version, routes=[
            coordinator_pb2.Route(service=r.service, kind=r.kind, epoch=r.epoch,
                                  primary_address=r.primary_address,
                                  primary_host_id=r.primary_host_id)
            for r in action.routes
        ])
        for queue in list(self._watchers):
            # Each update is the whole table: a slow watcher only needs the newest.
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(self._routes)

    # --- the calls the servicer makes ------------------------------------------------------

    async def register(self, info: HostInfo, metrics: dict[str, float] | None = None) -> None:
        async with self._lock:
            caller = self._callers.get(info.address)
            if caller is not None:
                caller.reconnect()  # the host just proved it is reachable
            await self._execute(self.core.register(info, monotonic_ms(), metrics))

    async def heartbeat(self, host_id: str, metrics: dict[str, float],
                        replicas: list[ReplicaReport]) -> list[tuple[str, int, int]]:
        async with self._lock:
            leases, actions = self.core.heartbeat(host_id, metrics, replicas, monotonic_ms())
            await self._execute(actions)
        return leases

    async def watch_routes(self) -> AsyncIterator[coordinator_pb2.RoutesUpdate]:
        if len(self._watchers) >= defaults.ROUTE_WATCHERS_MAX:
            raise Unavailable(f"{defaults.ROUTE_WATCHERS_MAX} route watchers already; try another "
                              "coordinator")
        queue: asyncio.Queue[coordinator_pb2.RoutesUpdate] = asyncio.Queue(maxsize=4)
        self._watchers.add(queue)
        try:
            yield self._routes
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    async def create_service(self, name: str, kind: str, replicas: int, mode: str,
                             needs: Resources | None = None, policy: str = "") -> None:
        async with self._lock:
            await self._execute(self.core.create_service(name, kind, replicas, mode,
                                                         monotonic_ms(), needs, policy))

    async def set_draining(self, host_id: str, draining: bool) -> None:
        async with self._lock:
            await self._execute(self.core.set_draining(host_id, draining))

    async def delete_service(self, name: str) -> None:
        async with self._lock:
            await self._execute(self.core.delete_service(name))

    async def switchover(self, name: str, to_host: str) -> tuple[int, str, int]:
        """Planned hand-over: hold writes on the primary until the target has everything,
        raise the epoch, promote the target. Returns (epoch, new primary, stall ms).

        However this ends short of the hand-over (the agent refused, the caller's deadline
        passed, the CLI was interrupted), the switchover is abandoned in the core and the
        primary is told to release its hold: a switchover left marked in progress would stop
        failure detection and rebuilds for the service."""
        async with self._lock:
            target = self.core.switchover_target(name, to_host)
            service = self.core.services[name]
            primary, epoch = service.primary, service.epoch
            address = self.core.hosts[primary].address
            self.core.switchover_begin(name, target)
        switchover_id = uuid.uuid4().hex
        started = monotonic_ms()
        stub = self._caller(address).stub
        completed = False
        try:
            try:
                await stub.PrepareSwitchover(agent_pb2.PrepareSwitchoverRequest(
                    service=name, epoch=epoch, target_host_id=target,
                    timeout_ms=defaults.SWITCHOVER_TIMEOUT_MS, switchover_id=switchover_id),
                    timeout=defaults.SWITCHOVER_TIMEOUT_MS / 1000 + 1)
            except grpc.aio.AioRpcError as exc:
                raise Unavailable(f"switchover of {name} abandoned, {primary} serves on: "
                                  f"{exc.details() or exc.code().name}") from None
            async with self._lock:
                stall_ms = monotonic_ms() - started
                await self._execute(self.core.switchover_complete(name, target, stall_ms))
                completed = True
                return self.core.services[name].epoch, target, stall_ms
        finally:
            if not completed:
                self._abandon_switchover(name, target, address, epoch, switchover_id)

    def _abandon_switchover(self, name: str, target: str, address: str, epoch: int,
                            switchover_id: str) -> None:
        """Ends a switchover that did not complete: no await here, so a cancelled caller
        cannot stop it halfway; the release is sent by a task of its own."""
        if self.core.switchovers.get(name) == target:
            self.core.switchover_abort(name)

        async def release() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._caller(address).stub.PrepareSwitchover(
                    agent_pb2.PrepareSwitchoverRequest(
                        service=name, epoch=epoch, release=True, switchover_id=switchover_id),
                    timeout=AGENT_CALL_TIMEOUT_S)

        self._spawn(release())

    # --- migration -----------------------------------------------------------------------

    async def migrate(self, name: str, to_host: str, replica: str, max_downtime_ms: int,
                      method: str, from_host: str = "", max_bandwidth_bytes_s: int = 0,
                      ) -> AsyncIterator[agent_pb2.MigrationProgress]:
        """Moves a replica of `name` to `to_host` (docs/design.md, Live migration): the source
        agent copies its live state (pre-copy or stop-and-copy; nothing for "replay", which
        builds the target from a snapshot and the log), then the target catches up as a
        building replica and joins the in-sync set; a moving primary is switched over to it;
        the source is retired. Yields progress; the last message has phase "done"."""
        if method not in MIGRATION_METHODS:
            raise InvalidRequest(f"method {method!r}: choose one of {', '.join(MIGRATION_METHODS)}")
        if max_downtime_ms < 0 or max_downtime_ms > defaults.MIGRATION_DOWNTIME_MS_MAX:
            raise InvalidRequest(f"max_downtime_ms must be 0..{defaults.MIGRATION_DOWNTIME_MS_MAX}")
        known = self.core.services.get(name)
        fallback = ""
        if known is not None and method != "replay" and not _pages(known.kind):
            # A kind without a paged arena cannot be copied page by page: build the copy
            # from a snapshot and the log instead, and say so.
            fallback = f"kind {known.kind} keeps no paged arena: the copy is built by replay"
            method = "replay"
        async with self._lock:
            source = self.core.migration_source(name, to_host, replica or PRIMARY, from_host)
            service = self.core.services[name]
            epoch = service.epoch
            source_address = self.core.hosts[source].address
            target_address = self.core.hosts[to_host].address
            self.core.migration_begin(name, source, to_host)
        migration_id = f"{name}-{uuid.uuid4().hex[:8]}"
        started = monotonic_ms()
        stats: dict[str, Any] = {"method": method}
        if fallback:
            stats["fallback"] = fallback
            yield agent_pb2.MigrationProgress(migration_id=migration_id, phase="setup",
                                              message=fallback)
        done = False
        try:
            if method != "replay":
                stream = self._caller(source_address).stub.MigrateOut(
                    agent_pb2.MigrateOutRequest(
                        service=name, epoch=epoch, migration_id=migration_id,
                        target_host_id=to_host, target_address=target_address,
                        max_downtime_ms=max_downtime_ms, method=method,
                        max_bandwidth_bytes_s=max_bandwidth_bytes_s),
                    timeout=defaults.MIGRATION_TIMEOUT_MS / 1000)
                async for progress in stream:
                    if progress.phase == "done":
                        stats = json.loads(progress.stats_json or b"{}")
                        done = True
                    else:
                        yield progress
                if not done:
                    raise Unavailable("the source ended the copy without a result")
            done = True
        except grpc.aio.AioRpcError as exc:
            why = exc.details() or exc.code().name
            async with self._lock:
                await self._execute(self.core.migration_abort(name, why))
            raise Unavailable(f"migration of {name} to {to_host} aborted, {source} serves on: "
                              f"{why}") from None
        finally:
            if not done:
                async with self._lock:
                    await self._execute(self.core.migration_abort(name, "interrupted"))
        async with self._lock:
            await self._execute(self.core.migration_complete(name, stats, monotonic_ms()))
        yield agent_pb2.MigrationProgress(migration_id=migration_id, phase="catching_up",
                                          message=f"{to_host} catches up from the log")

        def settled() -> str:
            current = self.core.services.get(name)
            if current is None:
                return "deleted"
            settled_there = to_host == current.primary or (
                current.replicas.get(to_host) == DUPLICA and to_host in current.in_sync)
            return "done" if settled_there and source not in current.replicas else ""

        state = await self._wait(settled, defaults.MIGRATION_TIMEOUT_MS)
        if state != "done":
            raise Unavailable(f"{name}: {to_host} holds the copy but did not take over from "
                              f"{source} within {defaults.MIGRATION_TIMEOUT_MS} ms; see "
                              "`failoverctl history`")
        stats["total_ms"] = stats.get("total_ms", 0)
        stats["move_ms"] = monotonic_ms() - started
        yield agent_pb2.MigrationProgress(
            migration_id=migration_id, phase="done", stats_json=json.dumps(stats).encode(),
            message=f"{name}: {source} -> {to_host}")

    async def _wait(self, condition: Callable[[], str], timeout_ms: int) -> str:
        """Waits until a condition on the core's state says something (checked each time the
        core's decisions are carried out), under a deadline; "" when the deadline passed."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._changed.wait_for(condition),
                                              timeout_ms / 1000)
            except TimeoutError:
                return ""

    # --- patch ----------------------------------------------------------------------------

    async def patch(self, hosts: list[str], everything: bool, command: str, failback: bool,
                    method: str, command_timeout_ms: int,
                    ) -> AsyncIterator[coordinator_pb2.PatchProgress]:
        """Restarts hosts on new code, one at a time, without failed requests (docs/design.md,
        Patch). A failed step stops the patch with the cluster serving."""
        if method not in ("precopy", "switchover"):
            raise InvalidRequest(f"method {method!r}: choose precopy or switchover")
        async with self._lock:
            if everything:
                hosts = sorted(self.core.hosts)
            if not hosts:
                raise InvalidRequest("name a host, or ask for --all")
            unknown = [h for h in hosts if h not in self.core.hosts]
            if unknown:
                raise InvalidRequest(f"no host {unknown[0]!r}; `failoverctl hosts` lists them")
        for host in hosts:
            async for step in self._patch_host(host, command, failback, method,
                                               command_timeout_ms):
                yield step
                if step.step == "failed":
                    return

    async def _patch_host(self, host: str, command: str, failback: bool, method: str,
                          command_timeout_ms: int,
                          ) -> AsyncIterator[coordinator_pb2.PatchProgress]:
        def step(name: str, message: str, ok: bool = True) -> coordinator_pb2.PatchProgress:
            return coordinator_pb2.PatchProgress(host_id=host, step=name, message=message,
                                                 ok=ok)

        async def record(kind: str, message: str, **details: Any) -> None:
            async with self._lock:
                await self.store.commit({}, (), (("", kind, message,
                                                  {"host_id": host, **details}),))

        async with self._lock:
            self.core.patching.add(host)
            before = self.core.hosts[host].started_at
        moved: list[str] = []
        try:
            await record("patch", f"patching {host}: moving its primaries off")
            yield step("drain", f"{host}: no new replicas; moving its primaries off")
            async with self._lock:
                primaries = sorted(s.name for s in self.core.services.values()
                                   if s.primary == host)
            for name in primaries:
                try:
                    async for message in self._move_primary_off(name, host, method):
                        yield step("move", message)
                except (InvalidRequest, Unavailable) as exc:
                    await record("patch_failed", f"patch of {host} stopped: {exc}")
                    yield step("failed", f"{host}: moving {name} off failed: {exc}; the "
                               "cluster serves, the host was not restarted", ok=False)
                    return
                moved.append(name)
            async with self._lock:
                await self._execute(self.core.restart_planned(host))
                address = self.core.hosts[host].address
            yield step("restart", f"{host}: running the patch command and re-executing"
                       if command else f"{host}: re-executing")
            try:
                reply = await self._caller(address).stub.Restart(
                    agent_pb2.RestartRequest(command=command,
                                             command_timeout_ms=command_timeout_ms),
                    timeout=(command_timeout_ms or defaults.PATCH_COMMAND_TIMEOUT_MS) / 1000
                    + AGENT_CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                why = exc.details() or exc.code().name
                await record("patch_failed", f"patch of {host} stopped: {why}")
                yield step("failed", f"{host}: restart refused: {why}; the cluster serves",
                           ok=False)
                return
            await record("patch", f"{host} re-executes (was version {reply.version})",
                         exit_code=reply.exit_code)

            def restarted() -> str:
                info = self.core.hosts.get(host)
                live = self.core.live.get(host)
                if info is None or live is None or not live.alive:
                    return ""
                return "yes" if info.started_at != before else ""

            if not await self._wait(restarted, defaults.PATCH_RESTART_TIMEOUT_MS):
                await record("patch_failed", f"{host} did not come back after its restart")
                yield step("failed", f"{host} did not come back within "
                           f"{defaults.PATCH_RESTART_TIMEOUT_MS} ms; the cluster serves "
                           "without it", ok=False)
                return
            async with self._lock:
                self.core.patching.discard(host)
                version = self.core.hosts[host].version
            yield step("recover", f"{host} is back on version {version}; its replicas "
                       "catch up from their logs")

            def recovered() -> str:
                for service in self.core.services.values():
                    if host in service.replicas and host != service.primary and (
                            host not in service.in_sync):
                        return ""
                return "yes"

            if not await self._wait(recovered, defaults.PATCH_RESTART_TIMEOUT_MS):
                yield step("failed", f"{host}'s replicas did not catch up within "
                           f"{defaults.PATCH_RESTART_TIMEOUT_MS} ms", ok=False)
                return
            if failback:
                for name in moved:
                    try:
                        async for message in self._move_primary_back(name, host, method):
                            yield step("failback", message)
                    except (InvalidRequest, Unavailable) as exc:
                        yield step("failed", f"failback of {name} to {host} failed: {exc}; "
                                   "the cluster serves", ok=False)
                        return
            await record("patch", f"{host} patched", moved=moved)
            yield step("done", f"{host} patched", ok=True)
        finally:
            async with self._lock:
                self.core.patching.discard(host)

    async def _move_primary_off(self, name: str, host: str,
                                method: str) -> AsyncIterator[str]:
        """Moves `name`'s primary off `host`: surge-migrate it to a spare host (so that
        redundancy never drops), else switch over to an in-sync duplica."""
        async with self._lock:
            spare = self.core.spare_host(name) if method == "precopy" else ""
        if spare:
            yield f"{name}: pre-copy migration of the primary from {host} to {spare}"
            try:
                async for progress in self.migrate(name, spare, PRIMARY, 0, "precopy"):
                    if progress.phase == "round":
                        yield (f"{name}: round {progress.round}, {progress.pages} pages, "
                               f"{progress.dirty_pages} dirty")
                yield f"{name}: primary now on {spare}"
                return
            except Unavailable as exc:
                # The copy failed before its cut (the source serves on): a switchover to an
                # in-sync duplica still moves the primary off, without the surge.
                yield f"{name}: migration to {spare} failed ({exc}); switching over instead"
        epoch, primary, stall_ms = await self.switchover(name, "")
        yield f"{name}: switched over to {primary} (epoch {epoch}, stall {stall_ms} ms)"

    async def _move_primary_back(self, name: str, host: str,
                                 method: str) -> AsyncIterator[str]:
        async with self._lock:
            service = self.core.services.get(name)
            holds = service is not None and host in service.in_sync
        if holds:
            epoch, primary, stall_ms = await self.switchover(name, host)
            yield f"{name}: switched back to {primary} (stall {stall_ms} ms)"
            return
        async for progress in self.migrate(name, host, PRIMARY, 0,
                                           "precopy" if method == "precopy" else "replay"):
            if progress.phase == "done":
                yield f"{name}: primary back on {host}"

    async def history(self, service: str, limit: int) -> list[Any]:
        return await self.store.history(service or None, max(1, min(limit or 100, 10_000)))

    def status(self) -> coordinator_pb2.ClusterStatus:
        return cluster_status(self.core, monotonic_ms())
