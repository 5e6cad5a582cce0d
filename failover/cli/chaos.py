"""`failoverctl chaos`: a chaos run against a local cluster of real processes, and a verdict."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from failover.chaos.nemesis import parse_kinds
from failover.chaos.runner import ChaosConfig, run_chaos


def _kinds(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    try:
        return parse_kinds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("chaos")
@click.option("--duration", type=click.FloatRange(10, 24 * 3600), default=60.0,
              show_default=True, help="Seconds of workload under faults.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Same seed, same fault schedule.")
@click.option("--hosts", type=click.IntRange(2, 9), default=3, show_default=True)
@click.option("--faults", default="kill,pause", show_default=True, callback=_kinds,
              help="Comma list of kill,pause,partition,coordinator,disk,switchover,migrate,"
                   "patch.")
@click.option("--workload", type=click.Choice(["kv", "bank", "both"]), default="both",
              show_default=True)
@click.option("--mode", type=click.Choice(["sync", "async"]), default="sync",
              show_default=True)
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.json, history.jsonl, faults.json and timeline.png here.")
@click.pass_context
def chaos_command(ctx: click.Context, duration: float, seed: int, hosts: int,
                  faults: tuple[str, ...], workload: str, mode: str,
                  report_dir: str | None) -> None:
    """Run real processes under a seeded nemesis, record every operation, check the history.

    Exit status 1 when any check is violated. In async mode lost acknowledged writes are
    counted and shown (that is the trade async makes), not a violation.
    """
    as_json = bool(ctx.obj) and ctx.obj.get("format") == "json"
    console = Console(stderr=True)
    config = ChaosConfig(duration_s=duration, seed=seed, hosts=hosts, faults=faults,
                         workload=workload, mode=mode,
                         report_dir=Path(report_dir) if report_dir else None)
    report = asyncio.run(run_chaos(config, progress=lambda m: console.print(m)))
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        _print(report)
    sys.exit(0 if report["passed"] else 1)


def _print(report: dict) -> None:
    console = Console()
    table = Table(title=f"chaos run, seed {report['seed']} ({report['mode']} mode)")
    table.add_column("check")
    table.add_column("result")
    rows = [
        ("operations ok / failed / unknown",
         f"{report['ops_ok']:,} / {report['ops_failed']:,} / {report['ops_unknown']:,}"),
        ("faults", ", ".join(f"{k} x{v}" for k, v in report["faults"].items()) or "none"),
        ("failovers", str(report["failovers"])),
        ("unavailability p50 / p99 / max ms",
         f"{report['unavailability_ms_p50']:.0f} / {report['unavailability_ms_p99']:.0f} / "
         f"{report['unavailability_ms_max']:.0f}"),
        ("lost acknowledged writes", str(report["lost_acked_writes"])),
        ("linearizable (kv)", str(report["linearizable"])),
        ("bank total invariant", str(report["bank_invariant"])),
        ("transfers applied exactly once", str(report["exactly_once"])),
        ("violations", str(len(report["violations"]))),
    ]
    for kind, reason in report.get("faults_skipped", {}).items():
        rows.append((f"skipped: {kind}", reason))
    for check, result in rows:
        table.add_row(check, result)
    console.print(table)
    for violation in report["violations"][:10]:
        console.print(f"[red]violation[/red] {violation['kind']}: {violation['detail']}")
    console.print("[bold green]PASSED[/bold green]" if report["passed"]
                  else "[bold red]FAILED[/bold red]")
