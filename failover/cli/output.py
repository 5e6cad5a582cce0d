"""What `failoverctl` prints: JSON documents for scripts, and rich tables for people.

The JSON is built here, from the coordinator's replies, by pure functions (`*_json`); the
tables are rendered from those same documents (`render_*`), so both show the same facts.

JSON contract (`--format json`)
-------------------------------
This is a documented, stable contract for scripts. Keys may be ADDED in later versions;
no key is renamed or removed, and no value changes type. Read what you need and ignore
keys you do not know.

`failoverctl --format json status` prints one object::

    {
      "hosts": [
        {
          "host_id": str,
          "address": str,             # HOST:PORT of the host's agent
          "zone": str,
          "draining": bool,           # no new replicas; its primaries and replicas move off
          "alive": bool,              # heartbeats arrive within failure_timeout_ms
          "dead": bool,               # silent for host_dead_ms: its replicas are rebuilt
          "version": str,             # the agent's software version
          "started_at": float,        # wall-clock seconds since the Unix epoch; 0 unknown
          "cpu_percent": float,
          "memory_percent": float,
          "disk_free_bytes": int,     # free bytes in the agent's data dir
          "disk_total_bytes": int,
          "memory_total_bytes": int,
          "cpu_count": int,
          "heartbeat_age_ms": int,    # since the coordinator last heard from the host
          "incarnation": int,         # the agent process registered (0: no supervisor)
          "exited_incarnation": int   # the last one its supervisor reported exited (0: none)
        }
      ],
      "services": [
        {
          "name": str,
          "kind": str,                # "kv", "bank", "kvcache" or a plug-in kind
          "mode": "sync" | "async",
          "epoch": int,
          "desired_replicas": int,
          "placement": str,           # first-fit | best-fit | worst-fit
          "unplaced": str,            # why missing replicas found no host; "" when none
          "replicas": [
            {
              "host_id": str,
              "role": "primary" | "duplica" | "building" | "retired",
              "durable_index": int,   # last entry on disk
              "commit_index": int,    # last entry on every in-sync replica
              "applied_index": int,   # last entry in the state machine
              "lag_entries": int,     # behind the primary's durable index
              "in_sync": bool,
              "promotable": bool      # in sync and known to hold every acknowledged write
            }
          ]
        }
      ],
      "coordinators": [               # every coordinator alive, as the store sees them
        {
          "address": str,             # its advertised HOST:PORT
          "leader": bool,             # the one that acts; the others redirect to it
          "term": int                 # the leader's term (it rises at each new leader); 0
        }                             # for the others
      ]
    }

A role the coordinator sends that this version does not know is printed as
`"unknown(N)"`, an unset one as `"unspecified"`; an unset mode is `"sync"` (as on the wire).

Other commands, also stable in the same sense:

- `create`: the created service, one object shaped like an item of `"services"` above.
- `hosts`: a list of the `"hosts"` items above, each with two more keys: `"replicas"`
  (`{"primary": int, "duplica": int, "building": int}`, counts on that host) and
  `"services"` (`[{"service": str, "role": str}]`).
- `drain` / `undrain`: the host, one object shaped like an item of `hosts`.
- `delete`: `{"deleted": str}`.
- `switchover`: `{"service": str, "epoch": int, "primary_host_id": str, "stall_ms": int}`.
- `history`: a list, oldest event first as the coordinator returns them, of
  `{"seq": int, "at": float, "service": str, "kind": str, "message": str, "details": {...}}`;
  `at` is wall-clock seconds; `details` is the event's msgpack dict decoded (`{}` when
  empty). For `"failover"` events it may hold `detection_ms`, `promotion_ms`,
  `unavailability_ms`, `old_primary`, `new_primary`, `epoch`, `truncated_entries`. Byte
  strings in details are given as hex; details that do not decode to a dict are given as
  `{"undecodable_hex": str}`.
- `call`: the service's result object, whatever `--format` says.
- `migrate`: the migration's stats: `{"method": str, "total_ms": float, "setup_ms": float,
  "downtime_ms": float, "rounds": int, "state_bytes": int, "raw_bytes": int,
  "wire_bytes": int, "compression_ratio": float, "per_round": [...], "move_ms": int, ...}`
  (keys may be added).
- `patch`: `{"ok": bool, "steps": [{"host_id": str, "step": str, "message": str,
  "ok": bool}]}`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from failover.core.roles import BUILDING, DUPLICA, PRIMARY
from failover.net.convert import MODE_FROM_PROTO, MODE_TO_PROTO, ROLE_FROM_PROTO
from failover.v1 import common_pb2, coordinator_pb2

_ROLE_WORDS = {common_pb2.ROLE_UNSPECIFIED: "unspecified", **ROLE_FROM_PROTO}

_MODE_WORDS = MODE_FROM_PROTO  # unset is treated as sync

MODE_VALUES = MODE_TO_PROTO
"""The `--mode` words and the wire values they stand for."""

FAILOVER_DETAIL_KEYS = ("detection_ms", "promotion_ms", "unavailability_ms", "old_primary",
                        "new_primary", "epoch", "truncated_entries")
"""Details of a `failover` event that `history` shows as columns, in this order."""


# --- JSON building (pure) ------------------------------------------------------------------


def role_word(role: int) -> str:
    """The word for a replica role, as used in the JSON contract and the tables."""
    return _ROLE_WORDS.get(role, f"unknown({role})")


def mode_word(mode: int) -> str:
    """`sync` or `async` for a replication mode (unset is sync)."""
    return _MODE_WORDS.get(mode, f"unknown({mode})")


def host_json(host: coordinator_pb2.HostStatus) -> dict[str, Any]:
    """One item of `status`'s `"hosts"` list."""
    return {
        "host_id": host.host_id,
        "address": host.address,
        "zone": host.zone,
        "draining": host.draining,
        "alive": host.alive,
        "version": host.version,
        "started_at": host.started_at,
        "cpu_percent": host.metrics.cpu_percent,
        "memory_percent": host.metrics.memory_percent,
        "disk_free_bytes": host.metrics.disk_free_bytes,
        "disk_total_bytes": host.metrics.disk_total_bytes,
        "memory_total_bytes": host.metrics.memory_total_bytes,
        "cpu_count": host.metrics.cpu_count,
        "heartbeat_age_ms": host.heartbeat_age_ms,
        "dead": host.dead,
        "incarnation": host.incarnation,
        "exited_incarnation": host.exited_incarnation,
    }


def hosts_json(status: coordinator_pb2.ClusterStatus) -> list[dict[str, Any]]:
    """What `hosts` prints: every host with the replicas it holds."""
    documents = []
    for host in status.hosts:
        document = host_json(host)
        held = [{"service": s.name, "role": role_word(r.role)}
                for s in status.services for r in s.replicas if r.host_id == host.host_id]
        document["replicas"] = {role: sum(1 for h in held if h["role"] == role)
                                for role in (PRIMARY, DUPLICA, BUILDING)}
        document["services"] = held
        documents.append(document)
    return documents


def replica_json(replica: coordinator_pb2.ReplicaView) -> dict[str, Any]:
    """One item of a service's `"replicas"` list."""
    return {
        "host_id": replica.host_id,
        "role": role_word(replica.role),
        "durable_index": replica.indexes.durable_index,
        "commit_index": replica.indexes.commit_index,
        "applied_index": replica.indexes.applied_index,
        "lag_entries": replica.lag_entries,
        "in_sync": replica.in_sync,
        "promotable": replica.promotable,
    }


def service_json(service: coordinator_pb2.ServiceStatus) -> dict[str, Any]:
    """One item of `status`'s `"services"` list; also what `create` prints."""
    return {
        "name": service.name,
        "kind": service.kind,
        "mode": mode_word(service.mode),
        "epoch": service.epoch,
        "desired_replicas": service.desired_replicas,
        "placement": service.placement,
        "unplaced": service.unplaced,
        "replicas": [replica_json(r) for r in service.replicas],
    }


def coordinator_json(coordinator: coordinator_pb2.CoordinatorStatus) -> dict[str, Any]:
    """One item of `status`'s `"coordinators"` list."""
    return {"address": coordinator.address, "leader": coordinator.leader,
            "term": coordinator.term}


def cluster_status_json(status: coordinator_pb2.ClusterStatus) -> dict[str, Any]:
    """The document `failoverctl --format json status` prints (see the module docstring)."""
    return {
        "hosts": [host_json(h) for h in status.hosts],
        "services": [service_json(s) for s in status.services],
        "coordinators": [coordinator_json(c) for c in status.coordinators],
    }


def switchover_json(service: str, reply: coordinator_pb2.SwitchoverReply) -> dict[str, Any]:
    """What `switchover` prints for scripts."""
    return {
        "service": service,
        "epoch": reply.epoch,
        "primary_host_id": reply.primary_host_id,
        "stall_ms": reply.stall_ms,
    }


def jsonable(value: Any) -> Any:
    """`value` with byte strings as hex and every dict key a string, so json.dumps takes it."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(jsonable(k)): jsonable(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def decode_details(details: bytes) -> dict[str, Any]:
    """An event's msgpack `details` as a JSON-ready dict (`{}` when empty)."""
    if not details:
        return {}
    try:
        decoded = msgpack.unpackb(details, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException):
        decoded = None
    if not isinstance(decoded, dict):
        return {"undecodable_hex": details.hex()}
    result = jsonable(decoded)
    assert isinstance(result, dict)
    return result


def history_event_json(event: coordinator_pb2.HistoryEvent) -> dict[str, Any]:
    """One item of what `history` prints for scripts."""
    return {
        "seq": event.seq,
        "at": event.at,
        "service": event.service,
        "kind": event.kind,
        "message": event.message,
        "details": decode_details(event.details),
    }


def history_json(reply: coordinator_pb2.HistoryReply) -> list[dict[str, Any]]:
    """The list `failoverctl --format json history` prints."""
    return [history_event_json(e) for e in reply.events]


# --- rendering for people ------------------------------------------------------------------


def make_console() -> Console:
    """A console on stdout; piped output is not squeezed to 80 columns."""
    probe = Console()
    if probe.is_terminal:
        return probe
    return Console(width=max(probe.width, 200))


def human_bytes(count: int) -> str:
    """`count` bytes for people: `512 B`, `1.5 KiB`, `20.0 GiB`."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def wall_time(seconds: float, *, millis: bool = False) -> str:
    """Wall-clock seconds as local `YYYY-MM-DD HH:MM:SS[.mmm]`; `-` when unknown (0)."""
    if seconds <= 0:
        return "-"
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    if millis:
        text += f".{int(seconds * 1000) % 1000:03d}"
    return text


def _yes_no(value: bool, *, bad_when: bool) -> str:
    word = "yes" if value else "no"
    return f"[red]{word}[/red]" if value == bad_when else word


def _cell(value: Any) -> str:
    return escape(str(value))


def hosts_table(hosts: Sequence[Mapping[str, Any]]) -> Table:
    """The hosts part of `status`, from `host_json` documents."""
    table = Table()
    for name, justify in (("host", "left"), ("address", "left"), ("zone", "left"),
                          ("alive", "left"), ("draining", "left"), ("version", "left"),
                          ("started", "left"), ("cpu %", "right"), ("mem %", "right"),
                          ("disk free", "right"), ("heartbeat age ms", "right"),
                          ("process", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for h in hosts:
        table.add_row(
            _cell(h["host_id"]), _cell(h["address"]), _cell(h["zone"] or "-"),
            _yes_no(h["alive"], bad_when=False), _yes_no(h["draining"], bad_when=True),
            _cell(h["version"] or "-"), wall_time(h["started_at"]),
            f"{h['cpu_percent']:.1f}", f"{h['memory_percent']:.1f}",
            human_bytes(h["disk_free_bytes"]), f"{h['heartbeat_age_ms']:,}",
            _process(h),
        )
    return table


def _process(host: Mapping[str, Any]) -> str:
    """The agent process's incarnation, and the last one that crashed if any ("-" without a
    supervisor): "3 (2 exited)" says the process was restarted after a crash."""
    if not host["incarnation"]:
        return "-"
    exited = host["exited_incarnation"]
    return f"{host['incarnation']}" + (f" ({exited} exited)" if exited else "")


def services_table(services: Sequence[Mapping[str, Any]]) -> Table:
    """Services and their replicas, from `service_json` documents: a section per service."""
    table = Table()
    for name, justify in (("service", "left"), ("kind", "left"), ("mode", "left"),
                          ("epoch", "right"), ("desired", "right"), ("host", "left"),
                          ("role", "left"), ("durable", "right"), ("commit", "right"),
                          ("applied", "right"), ("lag", "right"), ("in sync", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in services:
        head = [_cell(s["name"]), _cell(s["kind"]), s["mode"], f"{s['epoch']:,}",
                str(s["desired_replicas"])]
        replicas = s["replicas"]
        if not replicas:
            table.add_row(*head, "-", "-", "", "", "", "", "", end_section=True)
            continue
        for i, r in enumerate(replicas):
            role = r["role"]
            table.add_row(
                *(head if i == 0 else [""] * len(head)),
                _cell(r["host_id"]), f"[bold]{role}[/bold]" if role == "primary" else role,
                f"{r['durable_index']:,}", f"{r['commit_index']:,}", f"{r['applied_index']:,}",
                f"{r['lag_entries']:,}",
                "yes" if r["in_sync"] else "no",
                end_section=i == len(replicas) - 1,
            )
    return table


def coordinators_table(coordinators: Sequence[Mapping[str, Any]]) -> Table:
    """The coordinators part of `status`, from `coordinator_json` documents."""
    table = Table()
    for name, justify in (("coordinator", "left"), ("leader", "left"), ("term", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for c in coordinators:
        table.add_row(_cell(c["address"]), "[bold]yes[/bold]" if c["leader"] else "no",
                      f"{c['term']:,}" if c["leader"] else "-")
    return table


def last_events(events: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The newest of `events` (`history_event_json` documents, oldest first) per service."""
    newest: dict[str, Mapping[str, Any]] = {}
    for event in events:
        if event["service"]:
            newest[event["service"]] = event
    return newest


def render_status(console: Console, document: Mapping[str, Any],
                  last: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Prints `status` for people from a `cluster_status_json` document; with `last`
    (service -> its newest history event, `last_events`), the last event of each service."""
    coordinators = document.get("coordinators") or []
    if coordinators:
        console.print("[bold]Coordinators[/bold]")
        console.print(coordinators_table(coordinators))
        if not any(c["leader"] for c in coordinators):
            console.print("[red]no coordinator leads: nothing fails over until one does "
                          "(is the store reachable?)[/red]")
    console.print("[bold]Hosts[/bold]" if document["hosts"] else "no hosts registered")
    if document["hosts"]:
        console.print(hosts_table(document["hosts"]))
    console.print("[bold]Services[/bold]" if document["services"] else "no services")
    if document["services"]:
        console.print(services_table(document["services"]))
    for s in document["services"]:
        if s.get("unplaced"):
            console.print(f"[red]{escape(s['name'])}: {escape(s['unplaced'])}[/red]")
    if last is not None and document["services"]:
        console.print("[bold]Last event per service[/bold]")
        for s in document["services"]:
            event = last.get(s["name"])
            text = (f"{wall_time(event['at'], millis=True)}  {event['kind']}: "
                    f"{' '.join(str(event['message']).split())}" if event else
                    "- (none among the newest events)")
            console.print(f"  {s['name']}  {text}", markup=False, highlight=False)


def hosts_detail_table(hosts: Sequence[Mapping[str, Any]]) -> Table:
    """`hosts`: resources, state and replicas per host, from `hosts_json` documents."""
    table = Table()
    for name, justify in (("host", "left"), ("zone", "left"), ("state", "left"),
                          ("draining", "left"), ("cpus", "right"), ("cpu %", "right"),
                          ("memory", "right"), ("mem %", "right"), ("disk free", "right"),
                          ("disk total", "right"), ("primary", "right"), ("duplica", "right"),
                          ("building", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for h in hosts:
        state = ("[red]dead[/red]" if h["dead"] else "alive" if h["alive"]
                 else "[red]suspected[/red]")
        counts = h["replicas"]
        table.add_row(
            _cell(h["host_id"]), _cell(h["zone"] or "-"), state,
            _yes_no(h["draining"], bad_when=True), str(h["cpu_count"]),
            f"{h['cpu_percent']:.1f}", human_bytes(h["memory_total_bytes"]),
            f"{h['memory_percent']:.1f}", human_bytes(h["disk_free_bytes"]),
            human_bytes(h["disk_total_bytes"]), str(counts["primary"]),
            str(counts["duplica"]), str(counts["building"]),
        )
    return table


def detail_columns(events: Iterable[Mapping[str, Any]]) -> list[str]:
    """The failover detail keys present in any `failover` event, in the documented order."""
    present: set[str] = set()
    for e in events:
        if e["kind"] == "failover":
            present.update(k for k in FAILOVER_DETAIL_KEYS if k in e["details"])
    return [k for k in FAILOVER_DETAIL_KEYS if k in present]


def history_table(events: Sequence[Mapping[str, Any]]) -> Table:
    """`history` for people, from `history_event_json` documents."""
    extra = detail_columns(events)
    table = Table()
    for name in ("time", "service", "kind", "message"):
        table.add_column(name)
    for key in extra:
        table.add_column(key, justify="left" if key.endswith("primary") else "right")
    for e in events:
        details = e["details"] if e["kind"] == "failover" else {}
        table.add_row(wall_time(e["at"], millis=True), _cell(e["service"] or "-"),
                      _cell(e["kind"]), _cell(e["message"]),
                      *(_cell(details.get(k, "")) for k in extra))
    return table


def event_line(event: Mapping[str, Any]) -> str:
    """One event as `failoverctl events` prints it for people: seq, time, service, kind and
    message on one line (events stream, so no table)."""
    message = " ".join(str(event["message"]).split())
    return (f"{event['seq']:>8}  {wall_time(event['at'], millis=True)}  "
            f"{event['service'] or '-'}  {event['kind']}: {message}")


class CountdownView:
    """Progress of a wait measured by what is left (a drain's replicas, a patch's hosts): a
    rich bar on a terminal; elsewhere (a pipe, a log) one plain line each time what is left
    changes; nothing when disabled (JSON)."""

    def __init__(self, description: str, total: int, unit: str, enabled: bool,
                 plain_updates: bool = True) -> None:
        self.plain_updates = plain_updates  # off: only `print`'s lines without a terminal
        self.description = description
        self.total = total
        self.unit = unit
        self.console = make_console()
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last: tuple[int, str] | None = None

    def __enter__(self) -> CountdownView:
        if self.enabled and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.completed}/{task.total} " + escape(self.unit)),
                TextColumn("{task.fields[detail]}"), console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(escape(self.description), total=self.total,
                                                 detail="")
        return self

    def print(self, text: str, markup: bool = False) -> None:
        """A line above the bar (or a plain line); with `markup`, rich markup in `text`
        (escape what came from elsewhere)."""
        if not self.enabled:
            return
        (self._progress.console if self._progress is not None else self.console).print(
            text, markup=markup, highlight=False)

    def update(self, left: int, detail: str, description: str | None = None) -> None:
        """`left` of `total` remain; `detail` says which."""
        if not self.enabled or self._last == (left, detail):
            return
        self._last = (left, detail)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=max(0, self.total - left),
                                  detail=escape(detail),
                                  description=escape(description or self.description))
            return
        if not self.plain_updates:
            return
        what = f"{left} {self.unit} left" + (f": {detail}" if detail else "")
        self.console.print(f"{description or self.description}: {what}", markup=False,
                           highlight=False)

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()


# --- migrate ---------------------------------------------------------------------------------


class MigrationProgressView:
    """A live progress bar for `migrate`: bytes copied against the state size, with the
    round, the dirty pages and the throttle; without a terminal one plain line per phase;
    nothing when disabled (JSON)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._console = make_console()
        self._phase = ""

    def __enter__(self) -> MigrationProgressView:
        if self.enabled and self._console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TextColumn("{task.fields[detail]}"),
                console=self._console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("setup", total=None, detail="")
        return self

    def update(self, progress: Any) -> None:
        if self.enabled and self._progress is None and progress.phase != self._phase:
            self._phase = progress.phase  # no terminal: a line when the phase changes
            self._console.print(f"{progress.phase}: {progress.message}".rstrip(": "),
                                markup=False, highlight=False)
        if self._progress is None or self._task is None:
            return
        if progress.phase == "done":
            task = self._progress.tasks[0]
            self._progress.update(self._task, description="done",
                                  completed=task.total or task.completed,
                                  detail=escape(progress.message))
            return
        detail = (f"round {progress.round}, {progress.dirty_pages:,} dirty pages "
                  f"({progress.dirty_pages_s:,.0f}/s)"
                  + (f", throttle {progress.throttle_ms} ms" if progress.throttle_ms else ""))
        self._progress.update(
            self._task, description=escape(progress.phase),
            completed=progress.raw_bytes, total=progress.state_bytes or None,
            detail=escape(progress.message or detail))

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def migration_stats_table(service: str, stats: Mapping[str, Any]) -> Table:
    """`migrate`'s summary for people, from the stats the coordinator returns."""
    table = Table(title=f"migration of {escape(service)} ({escape(str(stats.get('method')))})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in ("total_ms", "setup_ms", "downtime_ms", "rounds", "state_bytes", "raw_bytes",
                "wire_bytes", "compression_ratio", "move_ms"):
        if key in stats:
            value = stats[key]
            text = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" \
                if isinstance(value, int) else escape(str(value))
            table.add_row(key, text)
    return table
