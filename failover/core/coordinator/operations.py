"""The coordinator's long operations as pure plans: switchover, live migration, patch (with
its move of primaries off, restart, waits and failback) and a drain's move of a primary
(docs/design.md, Switchover, Live migration, Patch and Draining).

A plan takes events (its start, an agent's answer, a tick with the monotonic time, its
caller going away) and returns actions: the calls to make (`PrepareSwitchover`,
`ReleaseSwitchover`, `StartMigration`, `RestartAgent`), the core's own actions of each step
(`Persist` with the history rows, `AssignRole`, `PushRoutes`, ...), `Progress` for the
caller, and at the end one `Done` or `Failed`. Every decision is here: which target, when a
step is settled, every timeout, what is abandoned and released on each way out, and what
history records. Nothing reads a clock or does I/O; the daemon (or the simulation) carries
the actions out in order and feeds the answers back through the core, which owns the plans:

    actions = core.start_switchover(op_id, "s", "", now_ms)   # InvalidRequest: refused
    while op_id is not finished:                               # no Done/Failed seen yet
        carry out `actions` in order; for a call (PrepareSwitchover, StartMigration,
        RestartAgent) make it and, when it answers (or fails: ok=False),
            actions = core.answer(op_id, Prepared(ok, why), now_ms)   # or Copied, ...
        on every tick:
            actions = core.tick(now_ms)          # waits, deadlines, and the rest of the core
        when the caller goes away:
            actions = core.cancel(op_id, "interrupted", now_ms)  # abandons and releases

After a failed commit the daemon reloads its state from the store into a new core, and ends
each operation whose `Done` or `Failed` it had not yet carried out with `plan.abandon(why)`:
the holds to release and the `Failed`, never a `Persist` (the store is not trusted then).

A plan's ids come from the caller's `op_id`: a switchover is `{op_id}-{n}`, a migration
`{service}-{op_id[:8]}-{n}`, so a release or a stale call of one never reaches another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from failover import defaults
from failover.core.coordinator.actions import (
    Action,
    Answer,
    Copied,
    CopyRound,
    Done,
    Failed,
    Persist,
    Prepared,
    PrepareSwitchover,
    Progress,
    ReleaseSwitchover,
    RestartAgent,
    Restarted,
    StartMigration,
)
from failover.core.coordinator.model import HostInfo, HostLive, ServiceInfo
from failover.core.roles import DUPLICA, PRIMARY
from failover.errors import InvalidRequest

MIGRATION_METHODS = ("precopy", "stopcopy", "replay")
PATCH_METHODS = ("precopy", "switchover")
# How much longer than the hold's own timeout a prepare's answer is awaited.
PREPARE_ANSWER_GRACE_MS = 1000

History = tuple[str, str, str, dict[str, Any]]


class CoreSteps(Protocol):
    """What a plan uses of `CoordinatorCore`: the records, and the steps it sequences."""

    hosts: dict[str, HostInfo]
    live: dict[str, HostLive]
    services: dict[str, ServiceInfo]
    switchovers: dict[str, str]
    patching: set[str]
    kind_paged: Callable[[str], bool]

    def switchover_target(self, name: str, to_host: str) -> str: ...
    def switchover_begin(self, name: str, to_host: str) -> None: ...
    def switchover_abort(self, name: str) -> None: ...

    def rebalance_ended(self, completed: bool) -> None: ...
    def switchover_complete(self, name: str, to_host: str, stall_ms: int) -> list[Action]: ...
    def migration_source(self, name: str, to_host: str, replica: str,
                         from_host: str) -> str: ...
    def migration_begin(self, name: str, source: str, target: str) -> None: ...
    def migration_abort(self, name: str, why: str) -> list[Action]: ...
    def migration_complete(self, name: str, stats: dict[str, Any],
                           now_ms: int) -> list[Action]: ...
    def spare_host(self, name: str) -> str: ...
    def restart_planned(self, host_id: str) -> list[Action]: ...


def _record(service: str, kind: str, message: str, **details: Any) -> Persist:
    return Persist({}, history=((service, kind, message, details),))


def _terminal(actions: list[Action]) -> tuple[list[Action], Done | Failed | None]:
    """Splits a child plan's actions into those to pass on and its end, if it ended."""
    rest: list[Action] = []
    end: Done | Failed | None = None
    for action in actions:
        if isinstance(action, Done | Failed):
            end = action
        else:
            rest.append(action)
    return rest, end


class Plan:
    """One operation. The core calls `start` once (it may raise InvalidRequest: nothing
    was changed), then `answer`, `tick` and `cancel` until `finished`."""

    def __init__(self, core: CoreSteps, op_id: str) -> None:
        self.core = core
        self.op_id = op_id
        self.finished = False

    def start(self, now_ms: int) -> list[Action]:
        raise NotImplementedError

    def answer(self, answer: Answer, now_ms: int) -> list[Action]:
        return []

    def tick(self, now_ms: int) -> list[Action]:
        return []

    def cancel(self, why: str, now_ms: int) -> list[Action]:
        raise NotImplementedError

    def abandon(self, why: str) -> list[Action]:
        """Ends the plan after its daemon reloaded from the store: the holds to release and
        the `Failed`, no `Persist`. Also valid once the plan emitted `Done` whose actions
        were not all carried out (a commit of its own failed)."""
        raise NotImplementedError

    def _done(self, **result: Any) -> Done:
        self.finished = True
        return Done(self.op_id, result)

    def _failed(self, why: str) -> Failed:
        self.finished = True
        return Failed(self.op_id, why)


class SwitchoverPlan(Plan):
    """A planned hand-over of `name`'s primary (docs/design.md, Switchover): the target is a
    live, promotable in-sync duplica on a host that is not draining (or the one named, if it
    is one); the primary is asked to prepare; on its answer the epoch is raised and the roles
    handed over. However it ends short of that (the primary refused or did not answer in
    time, the caller went away), it is abandoned: the core forgets it, the primary is told
    to release its hold, and history records why. `purpose` "drain" is a drain's move of a
    primary off its host: its failures are recorded as such, and the next tick tries again;
    "rebalance" is the background move of a primary to a host with fewer (likewise).
    """

    def __init__(self, core: CoreSteps, op_id: str, name: str, to_host: str,
                 seq: int = 0, purpose: str = "") -> None:
        super().__init__(core, op_id)
        self.name = name
        self.to_host = to_host
        self.switchover_id = f"{op_id}-{seq}"
        self.purpose = purpose
        self.state = "new"  # -> "preparing" -> "done" | "abandoned"
        self.target = ""
        self.primary = ""
        self.address = ""
        self.epoch = 0
        self.started_ms = 0
        self.deadline_ms = 0
        self.resend_ms = 0  # when the prepare is asked again, if still unanswered

    def start(self, now_ms: int) -> list[Action]:
        core = self.core
        try:
            self.target = core.switchover_target(self.name, self.to_host)
        except InvalidRequest as exc:
            if self.purpose not in ("drain", "rebalance"):
                raise
            return [self._refused(str(exc)), self._failed(str(exc))]
        service = core.services[self.name]
        self.primary, self.epoch = service.primary, service.epoch
        self.address = core.hosts[self.primary].address
        core.switchover_begin(self.name, self.target)
        self.state = "preparing"
        self.started_ms = now_ms
        self.deadline_ms = now_ms + defaults.SWITCHOVER_TIMEOUT_MS + PREPARE_ANSWER_GRACE_MS
        return [self._prepare(now_ms)]

    def _prepare(self, now_ms: int) -> PrepareSwitchover:
        """The prepare call, or the same asked again: the hold it starts (or joins) ends by
        the first call's timeout at the latest, and every answer is awaited until the
        operation's deadline."""
        self.resend_ms = now_ms + defaults.PREPARE_RESEND_MS
        answer_within_ms = self.deadline_ms - now_ms
        return PrepareSwitchover(
            self.op_id, self.primary, self.address, self.name, self.epoch, self.target,
            self.switchover_id, answer_within_ms - PREPARE_ANSWER_GRACE_MS, answer_within_ms)

    def answer(self, answer: Answer, now_ms: int) -> list[Action]:
        if self.state != "preparing" or not isinstance(answer, Prepared):
            return []
        if not answer.ok:
            return self._abandon(answer.why)
        if self.name not in self.core.services:
            return self._abandon(f"{self.name} was deleted meanwhile")
        stall_ms = now_ms - self.started_ms
        actions = self.core.switchover_complete(self.name, self.target, stall_ms)
        self.state = "done"
        if self.purpose == "rebalance":
            self.core.rebalance_ended(completed=True)
        return [*actions, self._done(epoch=self.core.services[self.name].epoch,
                                     primary=self.target, stall_ms=stall_ms)]

    def tick(self, now_ms: int) -> list[Action]:
        if self.state != "preparing":
            return []
        if now_ms >= self.deadline_ms:
            return self._abandon(f"{self.primary} did not answer the prepare within "
                                 f"{self.deadline_ms - self.started_ms} ms")
        if (now_ms >= self.resend_ms
                and self.deadline_ms - now_ms > PREPARE_ANSWER_GRACE_MS):
            # Unanswered so far: still waiting for the target, or the answer was lost. The
            # calls already made stay open; whichever answers first decides.
            return [self._prepare(now_ms)]
        return []

    def cancel(self, why: str, now_ms: int) -> list[Action]:
        if self.state != "preparing":
            return []
        return self._abandon(why)

    def abandon(self, why: str) -> list[Action]:
        held = self.state in ("preparing", "done")
        if self.state == "preparing":
            self.core.switchover_abort(self.name)
        self.state = "abandoned"
        return [*([self._release()] if held else []), self._failed(self._why(why))]

    def _abandon(self, why: str) -> list[Action]:
        if self.core.switchovers.get(self.name) == self.target:
            self.core.switchover_abort(self.name)
        self.state = "abandoned"
        if self.purpose == "rebalance":
            self.core.rebalance_ended(completed=False)
        if self.purpose in ("drain", "rebalance"):
            record = self._refused(why)
        else:
            record = _record(self.name, "switchover_aborted", self._why(why),
                             old_primary=self.primary, target=self.target, epoch=self.epoch,
                             why=why)
        return [self._release(), record, self._failed(self._why(why))]

    def _why(self, why: str) -> str:
        return f"switchover of {self.name} abandoned, {self.primary} serves on: {why}"

    def _release(self) -> ReleaseSwitchover:
        return ReleaseSwitchover(self.primary, self.address, self.name, self.epoch,
                                 self.switchover_id)

    def _refused(self, why: str) -> Persist:
        if self.purpose == "rebalance":
            return _record(self.name, "rebalance", f"moving {self.name}'s primary to "
                           f"{self.to_host} to even out primaries failed: {why}",
                           to_host=self.to_host)
        return _record(self.name, "drain", f"moving {self.name} off its draining primary "
                       f"failed, trying again: {why}", to_host=self.to_host)


class MigratePlan(Plan):
    """Moves a replica of `name` to `to_host` (docs/design.md, Live migration): the source
    agent copies its live state (pre-copy or stop-and-copy; nothing for "replay", which
    builds the target from a snapshot and the log); the target then catches up as a
    building replica and joins the in-sync set, a moving primary is switched over to it and
    the source retired (by the rest of the core). Done once the target serves (or is an
    in-sync duplica) and the source is gone, within `MIGRATION_TIMEOUT_MS`. A copy that
    fails or is interrupted before it is complete is aborted: the source serves on."""

    def __init__(self, core: CoreSteps, op_id: str, name: str, to_host: str,
                 replica: str = PRIMARY, max_downtime_ms: int = defaults.MAX_DOWNTIME_MS,
                 method: str = "precopy", from_host: str = "", max_bandwidth_bytes_s: int = 0,
                 seq: int = 0) -> None:
        super().__init__(core, op_id)
        self.name = name
        self.to_host = to_host
        self.replica = replica or PRIMARY
        self.max_downtime_ms = max_downtime_ms
        self.method = method
        self.from_host = from_host
        self.max_bandwidth_bytes_s = max_bandwidth_bytes_s
        self.migration_id = f"{name}-{op_id[:8]}-{seq}"
        self.state = "new"  # -> "copying" -> "catching_up" -> "done" | "aborted"
        self.source = ""
        self.started_ms = 0
        self.deadline_ms = 0
        self.stats: dict[str, Any] = {}

    def start(self, now_ms: int) -> list[Action]:
        core = self.core
        if self.method not in MIGRATION_METHODS:
            raise InvalidRequest(f"method {self.method!r}: choose one of "
                                 f"{', '.join(MIGRATION_METHODS)}")
        if not 0 <= self.max_downtime_ms <= defaults.MIGRATION_DOWNTIME_MS_MAX:
            raise InvalidRequest(
                f"max_downtime_ms must be 0..{defaults.MIGRATION_DOWNTIME_MS_MAX}")
        known = core.services.get(self.name)
        fallback = ""
        if known is not None and self.method != "replay" and not core.kind_paged(known.kind):
            # A kind without a paged arena cannot be copied page by page: build the copy
            # from a snapshot and the log instead, and say so.
            fallback = f"kind {known.kind} keeps no paged arena: the copy is built by replay"
            self.method = "replay"
        self.source = core.migration_source(self.name, self.to_host, self.replica,
                                            self.from_host)
        service = core.services[self.name]
        core.migration_begin(self.name, self.source, self.to_host)
        self.started_ms = now_ms
        self.stats = {"method": self.method}
        actions: list[Action] = []
        if fallback:
            self.stats["fallback"] = fallback
            actions.append(Progress(self.op_id, "setup", fallback))
        if self.method == "replay":
            return [*actions, *self._copied(self.stats, now_ms)]
        self.state = "copying"
        self.deadline_ms = now_ms + defaults.MIGRATION_TIMEOUT_MS
        actions.append(StartMigration(
            self.op_id, self.source, core.hosts[self.source].address, self.name,
            service.epoch, self.migration_id, self.to_host, core.hosts[self.to_host].address,
            self.max_downtime_ms, self.method, self.max_bandwidth_bytes_s,
            defaults.MIGRATION_TIMEOUT_MS))
        return actions

    def answer(self, answer: Answer, now_ms: int) -> list[Action]:
        if self.state != "copying":
            return []
        if isinstance(answer, CopyRound):
            message = (f"round {answer.round}, {answer.pages} pages, {answer.dirty_pages} dirty"
                       if answer.phase == "round" else answer.phase)
            return [Progress(self.op_id, answer.phase, message, detail=answer.detail)]
        if not isinstance(answer, Copied):
            return []
        if not answer.ok:
            return self._abort(answer.why)
        if self.name not in self.core.services:
            return self._abort(f"{self.name} was deleted meanwhile")
        return self._copied(answer.stats, now_ms)

    def tick(self, now_ms: int) -> list[Action]:
        if self.state == "copying" and now_ms >= self.deadline_ms:
            return self._abort(f"no result within {defaults.MIGRATION_TIMEOUT_MS} ms")
        if self.state != "catching_up":
            return []
        service = self.core.services.get(self.name)
        if service is None:
            self.state = "aborted"
            return [self._failed(f"{self.name} was deleted while it moved")]
        there = self.to_host == service.primary or (
            service.replicas.get(self.to_host) == DUPLICA and self.to_host in service.in_sync)
        if there and self.source not in service.replicas:
            self.state = "done"
            self.stats["total_ms"] = self.stats.get("total_ms", 0)
            self.stats["move_ms"] = now_ms - self.started_ms
            return [self._done(stats=self.stats, source=self.source, target=self.to_host,
                               migration_id=self.migration_id)]
        if now_ms >= self.deadline_ms:
            self.state = "aborted"
            return [self._failed(
                f"{self.name}: {self.to_host} holds the copy but did not take over from "
                f"{self.source} within {defaults.MIGRATION_TIMEOUT_MS} ms; see "
                "`failoverctl history`")]
        return []

    def cancel(self, why: str, now_ms: int) -> list[Action]:
        if self.state == "copying":
            return self._abort(why)
        if self.state == "catching_up":
            # The copy is a member already: the rest of the core finishes the move.
            self.state = "aborted"
            return [self._failed(f"{self.name}: {why}; {self.to_host} holds the copy and "
                                 "takes over by itself")]
        return []

    def abandon(self, why: str) -> list[Action]:
        if self.state == "copying":
            self.core.migration_abort(self.name, why)
        self.state = "aborted"
        return [self._failed(f"migration of {self.name} to {self.to_host} abandoned: {why}")]

    def _copied(self, stats: dict[str, Any], now_ms: int) -> list[Action]:
        self.stats = {**self.stats, **stats}
        self.state = "catching_up"
        self.deadline_ms = now_ms + defaults.MIGRATION_TIMEOUT_MS
        actions = self.core.migration_complete(self.name, self.stats, now_ms)
        service = self.core.services[self.name]
        if self.source in service.replicas and self.source not in service.leaving:
            # The service lost a replica meanwhile: the copy replaces it, the source stays.
            self.state = "aborted"
            return [*actions, self._failed(
                f"migration of {self.name} to {self.to_host}: {self.name} lost a replica "
                f"meanwhile; the copy on {self.to_host} replaces it and {self.source} stays")]
        return [*actions,
                Progress(self.op_id, "catching_up", f"{self.to_host} catches up from the log")]

    def _abort(self, why: str) -> list[Action]:
        self.state = "aborted"
        return [*self.core.migration_abort(self.name, why), self._failed(
            f"migration of {self.name} to {self.to_host} aborted, {self.source} serves on: "
            f"{why}")]


class PatchPlan(Plan):
    """Restarts hosts on new code, one at a time (docs/design.md, Patch). For each host:
    mark it patched (no new replicas), move each of its primaries off (a surge migration to
    a spare host, or a switchover when there is none, `method` is "switchover", or the copy
    failed), take its duplicas out of the in-sync sets, ask its agent to restart, wait for
    it to register with a new start time, wait for its replicas to rejoin the in-sync sets,
    and with `failback` move the primaries back. A failed step stops the patch with the
    cluster serving; history records it, and the host is no longer marked on any way out.
    """

    def __init__(self, core: CoreSteps, op_id: str, hosts: list[str],
                 everything: bool = False, command: str = "", failback: bool = False,
                 method: str = "precopy", command_timeout_ms: int = 0) -> None:
        super().__init__(core, op_id)
        self.hosts = list(hosts)
        self.everything = everything
        self.command = command
        self.failback = failback
        self.method = method
        self.command_timeout_ms = command_timeout_ms
        self.left: list[str] = []
        self.host = ""
        self.phase = "new"
        self.before = 0.0  # the host's start time before its restart
        self.to_move: list[str] = []
        self.moved: list[str] = []
        self.child: Plan | None = None
        self.child_role = ""  # "migrate", "switchover", "failback"
        self.spare = ""
        self.deadline_ms = 0
        self.restart_timeout_ms = 0
        self._seq = 0

    # --- events ------------------------------------------------------------------------

    def start(self, now_ms: int) -> list[Action]:
        core = self.core
        if self.method not in PATCH_METHODS:
            raise InvalidRequest(f"method {self.method!r}: choose precopy or switchover")
        hosts = sorted(core.hosts) if self.everything else self.hosts
        if not hosts:
            raise InvalidRequest("name a host, or ask for --all")
        unknown = [h for h in hosts if h not in core.hosts]
        if unknown:
            raise InvalidRequest(f"no host {unknown[0]!r}; `failoverctl hosts` lists them")
        self.hosts = list(hosts)
        self.left = list(hosts)
        return self._next_host(now_ms)

    def answer(self, answer: Answer, now_ms: int) -> list[Action]:
        if self.finished:
            return []
        if self.child is not None:
            return self._from_child(self.child.answer(answer, now_ms), now_ms)
        if self.phase == "restarting" and isinstance(answer, Restarted):
            return self._restarted(answer, now_ms)
        return []

    def tick(self, now_ms: int) -> list[Action]:
        if self.finished:
            return []
        if self.child is not None:
            return self._from_child(self.child.tick(now_ms), now_ms)
        if self.phase == "restarting" and now_ms >= self.deadline_ms:
            return self._restarted(Restarted(False, why="no answer within "
                                             f"{self.restart_timeout_ms} ms"), now_ms)
        if self.phase == "waiting_restart":
            return self._wait_restart(now_ms)
        if self.phase == "waiting_recovery":
            return self._wait_recovery(now_ms)
        return []

    def cancel(self, why: str, now_ms: int) -> list[Action]:
        if self.finished:
            return []
        actions: list[Action] = []
        if self.child is not None:
            actions, _end = _terminal(self.child.cancel(why, now_ms))
            self.child = None
        return [*actions, *self._fail(f"patch of {self.host} stopped: {why}",
                                      f"{self.host}: {why}; the cluster serves")]

    def abandon(self, why: str) -> list[Action]:
        actions: list[Action] = []
        if self.child is not None:
            actions, _end = _terminal(self.child.abandon(why))
            self.child = None
        self.core.patching.discard(self.host)
        return [*actions, Progress(self.op_id, "failed", f"{self.host}: {why}", self.host,
                                   ok=False), self._failed(why)]

    # --- the steps ---------------------------------------------------------------------

    def _next_host(self, now_ms: int) -> list[Action]:
        if not self.left:
            return [self._done(hosts=self.hosts)]
        core = self.core
        self.host = host = self.left.pop(0)
        core.patching.add(host)
        self.before = core.hosts[host].started_at
        self.moved = []
        self.to_move = sorted(s.name for s in core.services.values() if s.primary == host)
        self.phase = "moving"
        return [_record("", "patch", f"patching {host}: moving its primaries off",
                        host_id=host),
                self._step("drain", f"{host}: no new replicas; moving its primaries off"),
                *self._move_next(now_ms)]

    def _move_next(self, now_ms: int) -> list[Action]:
        """Moves the next primary off: a surge migration to a spare host, so that
        redundancy never drops, else a switchover to an in-sync duplica."""
        if not self.to_move:
            return self._restart(now_ms)
        name = self.to_move[0]
        spare = self.core.spare_host(name) if self.method == "precopy" else ""
        if not spare:
            return self._switch_off(name, now_ms)
        self.spare = spare
        note = self._step("move", f"{name}: pre-copy migration of the primary from "
                          f"{self.host} to {spare}")
        return [note, *self._start_child(
            "migrate", MigratePlan(self.core, self.op_id, name, spare, PRIMARY, 0, "precopy",
                                   seq=self._next_seq()), now_ms)]

    def _switch_off(self, name: str, now_ms: int) -> list[Action]:
        return self._start_child("switchover", SwitchoverPlan(
            self.core, self.op_id, name, "", seq=self._next_seq()), now_ms)

    def _restart(self, now_ms: int) -> list[Action]:
        core = self.core
        host = self.host
        actions = core.restart_planned(host)
        self.phase = "restarting"
        timeout_ms = ((self.command_timeout_ms or defaults.PATCH_COMMAND_TIMEOUT_MS)
                      + defaults.AGENT_CALL_TIMEOUT_MS)
        self.restart_timeout_ms = timeout_ms
        self.deadline_ms = now_ms + timeout_ms
        return [*actions,
                self._step("restart", f"{host}: running the patch command and re-executing"
                           if self.command else f"{host}: re-executing"),
                RestartAgent(self.op_id, host, core.hosts[host].address, self.command,
                             self.command_timeout_ms, timeout_ms)]

    def _restarted(self, answer: Restarted, now_ms: int) -> list[Action]:
        host = self.host
        if not answer.ok:
            return self._fail(f"patch of {host} stopped: {answer.why}",
                              f"{host}: restart refused: {answer.why}; the cluster serves")
        self.phase = "waiting_restart"
        self.deadline_ms = now_ms + defaults.PATCH_RESTART_TIMEOUT_MS
        return [_record("", "patch", f"{host} re-executes (was version {answer.version})",
                        host_id=host, exit_code=answer.exit_code)]

    def _wait_restart(self, now_ms: int) -> list[Action]:
        core = self.core
        host = self.host
        info = core.hosts.get(host)
        live = core.live.get(host)
        if info is not None and live is not None and live.alive and (
                info.started_at != self.before):
            core.patching.discard(host)
            self.phase = "waiting_recovery"
            self.deadline_ms = now_ms + defaults.PATCH_RESTART_TIMEOUT_MS
            return [self._step("recover", f"{host} is back on version {info.version}; its "
                               "replicas catch up from their logs"),
                    *self._wait_recovery(now_ms)]
        if now_ms >= self.deadline_ms:
            return self._fail(f"{host} did not come back after its restart",
                              f"{host} did not come back within "
                              f"{defaults.PATCH_RESTART_TIMEOUT_MS} ms; the cluster serves "
                              "without it")
        return []

    def _wait_recovery(self, now_ms: int) -> list[Action]:
        host = self.host
        recovered = all(host in s.in_sync for s in self.core.services.values()
                        if host in s.replicas and host != s.primary)
        if recovered:
            self.to_move = list(self.moved) if self.failback else []
            self.phase = "failing_back"
            return self._fail_back_next(now_ms)
        if now_ms >= self.deadline_ms:
            why = (f"{host}'s replicas did not catch up within "
                   f"{defaults.PATCH_RESTART_TIMEOUT_MS} ms")
            return self._fail(f"patch of {host} stopped: {why}", why)
        return []

    def _fail_back_next(self, now_ms: int) -> list[Action]:
        """Moves the next primary back: a switchover if the host holds an in-sync copy,
        else a migration."""
        if not self.to_move:
            return self._host_done(now_ms)
        name = self.to_move[0]
        service = self.core.services.get(name)
        if service is not None and self.host in service.in_sync:
            child: Plan = SwitchoverPlan(self.core, self.op_id, name, self.host,
                                         seq=self._next_seq())
        else:
            child = MigratePlan(self.core, self.op_id, name, self.host, PRIMARY, 0,
                                "precopy" if self.method == "precopy" else "replay",
                                seq=self._next_seq())
        return self._start_child("failback", child, now_ms)

    def _host_done(self, now_ms: int) -> list[Action]:
        host = self.host
        self.core.patching.discard(host)
        self.phase = "done"
        return [_record("", "patch", f"{host} patched", host_id=host, moved=self.moved),
                self._step("done", f"{host} patched"), *self._next_host(now_ms)]

    # --- the plans it runs -----------------------------------------------------------------

    def _start_child(self, role: str, child: Plan, now_ms: int) -> list[Action]:
        self.child = child
        self.child_role = role
        try:
            actions = child.start(now_ms)
        except InvalidRequest as exc:
            actions = [Failed(self.op_id, str(exc))]
        return self._from_child(actions, now_ms)

    def _from_child(self, actions: list[Action], now_ms: int) -> list[Action]:
        """Passes a child's actions on (its progress as the patch's) and takes the next
        step once it ended."""
        assert self.child is not None
        out: list[Action] = []
        end: Done | Failed | None = None
        name = self.to_move[0]
        for action in actions:
            if isinstance(action, Done | Failed):
                end = action
            elif isinstance(action, Progress):
                if self.child_role == "migrate" and action.step == "round":
                    out.append(self._step("move", f"{name}: {action.message}"))
            else:
                out.append(action)
        if end is None:
            return out
        role, child = self.child_role, self.child
        self.child = None
        if isinstance(end, Done):
            self.to_move.pop(0)
            if role == "failback":
                message = (f"{name}: switched back to {end.result['primary']} (stall "
                           f"{end.result['stall_ms']} ms)" if isinstance(child, SwitchoverPlan)
                           else f"{name}: primary back on {self.host}")
                return [*out, self._step("failback", message), *self._fail_back_next(now_ms)]
            self.moved.append(name)
            message = (f"{name}: primary now on {self.spare}" if role == "migrate"
                       else f"{name}: switched over to {end.result['primary']} (epoch "
                            f"{end.result['epoch']}, stall {end.result['stall_ms']} ms)")
            return [*out, self._step("move", message), *self._move_next(now_ms)]
        if role == "migrate" and isinstance(child, MigratePlan) and child.state != "new":
            # The copy failed after it began (the source serves on): a switchover to an
            # in-sync duplica still moves the primary off, without the surge.
            return [*out, self._step("move", f"{name}: migration to {self.spare} failed "
                                     f"({end.why}); switching over instead"),
                    *self._switch_off(name, now_ms)]
        if role == "failback":
            return [*out, *self._fail(f"failback of {name} to {self.host} failed: {end.why}",
                                      f"failback of {name} to {self.host} failed: {end.why}; "
                                      "the cluster serves")]
        return [*out, *self._fail(f"patch of {self.host} stopped: {end.why}",
                                  f"{self.host}: moving {name} off failed: {end.why}; the "
                                  "cluster serves, the host was not restarted")]

    # --- helpers ---------------------------------------------------------------------------

    def _fail(self, history: str, message: str) -> list[Action]:
        self.core.patching.discard(self.host)
        self.phase = "failed"
        return [_record("", "patch_failed", history, host_id=self.host),
                self._step("failed", message, ok=False), self._failed(message)]

    def _step(self, step: str, message: str, ok: bool = True) -> Progress:
        return Progress(self.op_id, step, message, self.host, ok)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq
