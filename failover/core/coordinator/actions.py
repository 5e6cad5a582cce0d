"""What the coordinator's core asks the daemon to do (actions), and what comes back (answers).

The daemon carries a list of actions out in order; a `Persist` must be durable before any
later action of the same list is carried out, which is how a new epoch reaches the store
before any agent hears of it (invariant 1). History rows are written only by `Persist`.

Actions of an operation (docs/design.md, Switchover, Live migration, Patch) carry its
`op_id`: a call whose answer the daemon feeds back with `CoordinatorCore.answer(op_id,
answer, now_ms)` (`PrepareSwitchover` -> `Prepared`, `StartMigration` -> `CopyRound`s then
`Copied`, `RestartAgent` -> `Restarted`), a `Progress` for the operation's caller, and one
`Done` or `Failed` that ends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # "failover" when a failover made this assignment (the agent runs its on_failover hooks
    # once it changed the replica); "" otherwise, re-sends included.
    reason: str = ""


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
    """The routes table at `version` (`routes`: always the whole table), and what changed
    since the core's previous push: `changed` (the routes new or different) and `deleted`
    (services no longer routed). `changed` is None when the core has pushed nothing before
    (a restore): then only the whole table means anything. The daemon sends watchers the
    delta, and the whole table when one connects or falls behind."""

    version: int
    routes: tuple[Route, ...]
    changed: tuple[Route, ...] | None = None
    deleted: tuple[str, ...] = ()

    def entries_pushed(self) -> int:
        """The route entries a watcher that follows every push receives for this one."""
        if self.changed is None:
            return len(self.routes)
        return len(self.changed) + len(self.deleted)


@dataclass(frozen=True, slots=True)
class StartSwitchover:
    """Move a primary off a draining host: the daemon starts a switchover for it with
    `CoordinatorCore.start_primary_move(op_id, action, now_ms)`."""

    service: str
    to_host: str


# --- the actions of operations ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrepareSwitchover:
    """Ask the primary on `host_id` to hold reads and writes and answer once `target` holds
    its whole log (`Prepared`); it releases the hold by itself after `timeout_ms`. The
    answer is awaited `answer_within_ms` at most."""

    op_id: str
    host_id: str
    address: str
    service: str
    epoch: int
    target: str
    switchover_id: str
    timeout_ms: int
    answer_within_ms: int


@dataclass(frozen=True, slots=True)
class ReleaseSwitchover:
    """Tell the primary to release the hold of switchover `switchover_id` (no answer: the
    primary ends an unreleased hold by itself after its timeout)."""

    host_id: str
    address: str
    service: str
    epoch: int
    switchover_id: str


@dataclass(frozen=True, slots=True)
class StartMigration:
    """Ask the source agent to copy its replica of `service` to the target (answered by
    `CopyRound`s while it copies, then one `Copied`)."""

    op_id: str
    host_id: str
    address: str
    service: str
    epoch: int
    migration_id: str
    target_host_id: str
    target_address: str
    max_downtime_ms: int
    method: str
    max_bandwidth_bytes_s: int
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class RestartAgent:
    """Ask an agent to run `command` (if any) and re-execute itself (answered by
    `Restarted`, within `timeout_ms`)."""

    op_id: str
    host_id: str
    address: str
    command: str
    command_timeout_ms: int
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class Progress:
    """A step of an operation, for its caller. `detail` carries what an agent reported of a
    migration round as it came (the daemon shows it), or None."""

    op_id: str
    step: str
    message: str
    host_id: str = ""
    ok: bool = True
    detail: Any = None


@dataclass(frozen=True, slots=True)
class Done:
    """The operation ended as asked; `result` is what its caller is told."""

    op_id: str
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failed:
    """The operation stopped with the cluster serving; `why` is for its caller."""

    op_id: str
    why: str


def merge_persists(actions: list[Action]) -> list[Action]:
    """One decision round's `Persist`s as one, at the place of the first: its puts (the
    last of each key wins, as when committed one after another), deletes and history rows in
    order. Every action that followed a `Persist` still follows it, so nothing is told
    before what it depends on is durable; those before the first depended on none."""
    first = -1
    puts: dict[str, bytes] = {}
    deletes: dict[str, None] = {}
    history: list[tuple[str, str, str, dict[str, Any]]] = []
    out: list[Action] = []
    for action in actions:
        if not isinstance(action, Persist):
            out.append(action)
            continue
        for key in action.deletes:
            puts.pop(key, None)
            deletes[key] = None
        for key, value in action.puts.items():
            deletes.pop(key, None)
            puts[key] = value
        history.extend(action.history)
        if first < 0:
            first = len(out)
            out.append(action)
    if first >= 0:
        out[first] = Persist(puts, tuple(deletes), tuple(history))
    return out


Action = (Persist | AssignRole | StepDown | DropReplica | AskHearsPrimary | PushRoutes
          | StartSwitchover | PrepareSwitchover | ReleaseSwitchover | StartMigration
          | RestartAgent | Progress | Done | Failed)


# --- answers ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HearsAnswer:
    """A duplica's answer to AskHearsPrimary; `reachable` False when the call failed."""

    host_id: str
    reachable: bool
    hears: bool = False
    durable_index: int = 0
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Prepared:
    """The primary's answer to `PrepareSwitchover`: `ok` once the target holds everything;
    otherwise why not (a refusal, a failed call, the answer's deadline)."""

    ok: bool
    why: str = ""


@dataclass(frozen=True, slots=True)
class CopyRound:
    """A progress report of the source while it copies (`phase` "round", "cutover", ...);
    `detail` is the report as it came, passed on to the caller."""

    phase: str
    round: int = 0
    pages: int = 0
    dirty_pages: int = 0
    detail: Any = None


@dataclass(frozen=True, slots=True)
class Copied:
    """The source's result: `ok` with the migration's stats once the target holds a checked
    copy; otherwise why the copy failed (the source serves on)."""

    ok: bool
    stats: dict[str, Any] = field(default_factory=dict)
    why: str = ""


@dataclass(frozen=True, slots=True)
class Restarted:
    """The agent's answer to `RestartAgent`: `ok` when it ran the command and re-executes;
    otherwise why it refused."""

    ok: bool
    version: str = ""
    exit_code: int = 0
    why: str = ""


Answer = Prepared | CopyRound | Copied | Restarted
