"""`failoverctl top`: a live table of the services (roles, lag, write rate) and the newest
history events, redrawn every `--interval-ms` from the coordinator's status and history.

The write rate is the primary's commit index moving between two reads, divided by the time
between them: entries committed per second, i.e. the writes a service took (reads are not
logged, so they do not show). `top_frame` builds one frame from the two documents
`failoverctl --format json status` and `history` print, so a frame can be drawn (and tested)
without a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from failover import defaults
from failover.cli import output
from failover.cli.admin import CoordinatorCaller, cluster_status, settings, tls_material
from failover.core.roles import PRIMARY
from failover.v1 import coordinator_pb2


class WriteRates:
    """Entries committed per second per service, from successive status documents."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}  # service -> (when, commit index)

    def update(self, services: Sequence[Mapping[str, Any]], now_s: float) -> dict[str, float]:
        """The rates since the last update (a service seen the first time, or whose primary's
        index went back after a failover, has none yet); forgets services that are gone."""
        rates: dict[str, float] = {}
        seen: dict[str, tuple[float, int]] = {}
        for s in services:
            commit = max((r["commit_index"] for r in s["replicas"] if r["role"] == PRIMARY),
                         default=None)
            if commit is None:
                continue
            seen[s["name"]] = (now_s, commit)
            before = self._last.get(s["name"])
            if before is not None and now_s > before[0] and commit >= before[1]:
                rates[s["name"]] = (commit - before[1]) / (now_s - before[0])
        self._last = seen
        return rates


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def top_frame(status: Mapping[str, Any], events: Sequence[Mapping[str, Any]],
              rates: Mapping[str, float], now_s: float) -> RenderableType:
    """One frame: a summary line, the services table and the newest events (newest first).
    `status` as `output.cluster_status_json`, `events` as `output.history_json`."""
    hosts = status["hosts"]
    alive = sum(1 for h in hosts if h["alive"])
    leader = next((c["address"] for c in status["coordinators"] if c["leader"]), "")
    summary = (f"[bold]failover[/bold]  {time.strftime('%H:%M:%S', time.localtime(now_s))}  "
               f"hosts {alive}/{len(hosts)} alive  services {len(status['services'])}"
               + (f"  leader {escape(leader)}" if leader else ""))
    last_event: dict[str, Mapping[str, Any]] = {}
    for e in sorted(events, key=lambda e: e["seq"]):
        if e["service"] and e["kind"] != "audit":  # what happened, not who asked for it
            last_event[e["service"]] = e
    table = Table(expand=True)
    for name, justify in (("service", "left"), ("kind", "left"), ("epoch", "right"),
                          ("primary", "left"), ("duplicas", "left"), ("in sync", "right"),
                          ("lag", "right"), ("writes/s", "right"), ("last event", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in status["services"]:
        replicas = s["replicas"]
        primary = next((r["host_id"] for r in replicas if r["role"] == PRIMARY), "")
        others = [f"{r['host_id']}" + ("" if r["role"] == "duplica" else f" ({r['role']})")
                  for r in replicas if r["role"] != PRIMARY]
        in_sync = sum(1 for r in replicas if r["role"] != PRIMARY and r["in_sync"])
        lag = max((r["lag_entries"] for r in replicas if r["role"] != PRIMARY), default=0)
        rate = rates.get(s["name"])
        event = last_event.get(s["name"])
        table.add_row(
            escape(s["name"]), escape(s["kind"]), f"{s['epoch']:,}",
            f"[bold]{escape(primary)}[/bold]" if primary else "[red]none[/red]",
            escape(", ".join(others)) or "-", f"{in_sync}/{len(others)}",
            f"[red]{lag:,}[/red]" if lag else "0",
            f"{rate:,.0f}" if rate is not None else "-",
            f"{escape(event['kind'])} {_age(max(0.0, now_s - event['at']))} ago"
            if event else "-")
    recent = Table(title="newest events", expand=True, title_justify="left")
    for name in ("time", "service", "kind", "message"):
        recent.add_column(name)
    for e in sorted(events, key=lambda e: e["seq"], reverse=True)[:defaults.TOP_EVENTS_MAX]:
        recent.add_row(output.wall_time(e["at"]), escape(e["service"] or "-"),
                       escape(e["kind"]), escape(e["message"]))
    parts: list[RenderableType] = [summary, table if status["services"] else "no services"]
    if events:
        parts.append(recent)
    return Group(*parts)


@click.command("top")
@click.option("--interval-ms", type=click.IntRange(min=defaults.TOP_INTERVAL_MS_MIN,
                                                   max=60_000),
              default=defaults.TOP_INTERVAL_MS, show_default=True,
              help="How often the picture is redrawn (one status and one history read).")
@click.option("--once", is_flag=True, help="Print one frame and exit (no rates: they need "
              "two reads).")
@click.option("--timeout-ms", type=click.IntRange(min=1), default=defaults.CALL_DEADLINE_MS,
              show_default=True, help="Deadline of each read, per coordinator address.")
@click.pass_context
def top_command(ctx: click.Context, interval_ms: int, once: bool, timeout_ms: int) -> None:
    """Show services, roles, lag, write rates and the newest events, redrawn live (Ctrl-C
    stops)."""
    addresses, _ = settings(ctx)
    caller = CoordinatorCaller(addresses, tls_material(ctx))
    rates = WriteRates()

    def frame() -> RenderableType:
        status = output.cluster_status_json(cluster_status(ctx, timeout_ms))
        reply = caller.call("GetHistory", coordinator_pb2.HistoryRequest(
            limit=defaults.TOP_EVENTS_MAX * 5), timeout_ms=timeout_ms, idempotent=True)
        now = time.time()
        return top_frame(status, output.history_json(reply),
                         rates.update(status["services"], now), now)

    console = output.make_console()
    if once:
        console.print(frame())
        return
    try:
        with Live(frame(), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval_ms / 1000)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return
