"""Hooks (issue 17): allowlisted commands an agent runs after a replica's role changed, after a
failover's assignment reached it, and after a migrated copy landed on it.

What runs is set on the host: `[hooks]` in the agent's TOML names entries of the same
allowlist patch commands come from (`[patch.commands]`, name -> argv), checked at config load
(`failover.agent.config`). A hook runs without a shell, with the service, the role and the
epoch appended to its argv (and `FAILOVER_HOOK_EVENT`, `FAILOVER_HOST_ID` in its
environment), in its own session, under `hook_timeout_ms`, keeping the last
`hook_output_bytes_max` bytes of its output (`failover.agent.restart.run_command`).

A hook never delays what it follows: `fire` only starts a task and returns, after the change
was made and answered. At most `HOOKS_RUNNING_MAX` run at once; one more is not run, and its
result says so. Each result waits in a bounded outbox (`HOOK_RESULTS_QUEUED_MAX`, the oldest
dropped first) until a heartbeat carries it to the coordinator, which records it in history
(`hook` events): the heartbeat already goes to the leader every `heartbeat_ms`, authenticated
as this host, and follows a new leader, so a result needs no RPC, permission or retry loop of
its own. Results leave the outbox once a heartbeat that carried them was answered; one whose
answer was lost is sent again, and the coordinator skips the seqs it recorded.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from failover import defaults
from failover.agent.restart import run_command

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HookResult:
    """One hook's run as the heartbeat reports it (coordinator.proto, HookResult)."""

    seq: int  # in the order results ended, from 1 per agent process
    service: str
    event: str
    command: str
    role: str
    epoch: int
    exit_code: int
    output: str
    duration_ms: int
    timed_out: bool = False
    skipped: bool = False


class HookRunner:
    """Runs one agent's hooks in the background and keeps their results for heartbeats."""

    def __init__(self, host_id: str, hooks: Mapping[str, Sequence[str]],
                 allowlist: Mapping[str, Sequence[str]],
                 spawn: Callable[[Coroutine[Any, Any, Any]], Any],
                 timeout_ms: int = defaults.HOOK_TIMEOUT_MS,
                 output_bytes_max: int = defaults.HOOK_OUTPUT_BYTES_MAX) -> None:
        self.host_id = host_id
        self.hooks = {event: tuple(names) for event, names in hooks.items()}
        self.allowlist = allowlist
        self._spawn = spawn  # the agent's tracked background tasks
        self.timeout_ms = timeout_ms
        self.output_bytes_max = output_bytes_max
        self.running = 0
        self._seq = 0
        self._outbox: collections.deque[HookResult] = collections.deque(
            maxlen=defaults.HOOK_RESULTS_QUEUED_MAX)
        self.dropped = 0  # results pushed out of a full outbox before a heartbeat took them

    def fire(self, event: str, service: str, role: str, epoch: int) -> None:
        """Starts every hook named for `event`, in the background; returns at once."""
        for name in self.hooks.get(event, ()):
            if self.running >= defaults.HOOKS_RUNNING_MAX:
                self._keep(HookResult(
                    0, service, event, name, role, epoch, exit_code=-1, duration_ms=0,
                    output=f"not run: {defaults.HOOKS_RUNNING_MAX} hooks were running "
                    "(hooks_running_max)", skipped=True))
                continue
            self.running += 1
            self._spawn(self._run(event, name, service, role, epoch))

    async def _run(self, event: str, name: str, service: str, role: str, epoch: int) -> None:
        started = time.monotonic()
        try:
            argv = (*self.allowlist[name], service, role, str(epoch))
            code, output = await run_command(
                argv, self.timeout_ms, self.output_bytes_max, f"hook {event} {name}",
                env={"FAILOVER_HOOK_EVENT": event, "FAILOVER_HOST_ID": self.host_id})
        finally:
            self.running -= 1
        duration_ms = int((time.monotonic() - started) * 1000)
        timed_out = code == -1
        # Its last bytes, whole characters only: never over the bound the coordinator checks.
        output = output.encode()[-self.output_bytes_max:].decode(errors="ignore") \
            if self.output_bytes_max else ""
        log.info("hook %s %s for %s (%s, epoch %d) exited %d in %d ms", event, name, service,
                 role, epoch, code, duration_ms)
        self._keep(HookResult(0, service, event, name, role, epoch, code, output,
                              duration_ms, timed_out=timed_out))

    def _keep(self, result: HookResult) -> None:
        """Numbers `result` as it ends (so seqs follow the outbox's order, which is what the
        coordinator's skipping of re-sent ones relies on) and keeps it for a heartbeat."""
        self._seq += 1
        result = replace(result, seq=self._seq)
        if len(self._outbox) == self._outbox.maxlen:
            self.dropped += 1
            log.warning("hook results outbox full (%d): the oldest result is dropped; is the "
                        "coordinator reachable?", self._outbox.maxlen)
        self._outbox.append(result)

    def pending(self) -> list[HookResult]:
        """The oldest results not yet delivered, at most what one heartbeat carries."""
        return list(self._outbox)[:defaults.HOOK_RESULTS_PER_HEARTBEAT_MAX]

    def delivered(self, results: Sequence[HookResult]) -> None:
        """A heartbeat carrying `results` was answered: they are recorded."""
        done = {r.seq for r in results}
        self._outbox = collections.deque((r for r in self._outbox if r.seq not in done),
                                         maxlen=self._outbox.maxlen)
