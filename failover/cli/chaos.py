"""`failoverctl chaos`: a chaos run against a local cluster of real processes, and a verdict;
`failoverctl chaos check`: the same verdict on a saved history, offline."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from failover import defaults
from failover.chaos.checkers import check_history
from failover.chaos.history import load_ops
from failover.chaos.nemesis import parse_kinds
from failover.chaos.runner import ChaosConfig, run_chaos


def _kinds(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    try:
        return parse_kinds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group("chaos", invoke_without_command=True)
@click.option("--duration", type=click.FloatRange(10, 24 * 3600), default=60.0,
              show_default=True, help="Seconds of workload under faults.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Same seed, same fault schedule.")
@click.option("--hosts", type=click.IntRange(2, 9), default=3, show_default=True)
@click.option("--faults", default="kill,pause", show_default=True, callback=_kinds,
              help="Comma list of kill,crash,pause,partition,coordinator,disk,switchover,"
                   "migrate,patch,etcd. kill SIGKILLs an agent (its supervisor and child), "
                   "crash only its child (the supervisor reports it and restarts it). With "
                   "several coordinators, coordinator kills (-9) the one leading; etcd kills "
                   "one etcd member or all of them for a while.")
@click.option("--coordinators", type=click.IntRange(1, 5), default=1, show_default=True,
              help="Coordinators; more than one share an etcd store and one leads.")
@click.option("--store", type=click.Choice(["sqlite", "etcd"]), default=None,
              help="The coordinators' store (default: etcd with several coordinators or "
                   "etcd faults, else sqlite). etcd runs locally (Debian's etcd-server).")
@click.option("--etcd-members", type=click.Choice(["1", "3"]), default=None,
              help="etcd members with --store etcd (default: 3 with etcd faults, else 1).")
@click.option("--workload", type=click.Choice(["kv", "bank", "both"]), default="both",
              show_default=True)
@click.option("--mode", type=click.Choice(["sync", "async"]), default="sync",
              show_default=True)
@click.option("--keys", type=click.IntRange(1, 100_000), default=defaults.CHAOS_KEYS,
              show_default=True,
              help="kv keys the workers share; few keys make operations on a key overlap.")
@click.option("--workers", type=click.IntRange(0, 1000), default=defaults.CHAOS_KV_WORKERS,
              show_default=True, help="Concurrent kv clients.")
@click.option("--read-ratio", type=click.FloatRange(0, 1), default=defaults.CHAOS_READ_RATIO,
              show_default=True,
              help="Share of kv operations that are plain gets; the rest are puts and cas "
                   "(each cas reads the current value first and swaps it).")
@click.option("--op-deadline-ms", type=click.IntRange(1, 600_000),
              default=defaults.CHAOS_OP_DEADLINE_MS, show_default=True,
              help="A kv request's deadline, retries included; past it the outcome is "
                   "unknown. Shorter than a failover, so that some are.")
@click.option("--after-fault-readers", type=click.IntRange(0, 1000),
              default=defaults.CHAOS_AFTER_FAULT_READERS, show_default=True,
              help="Readers that hammer the keys written last during each kill and "
                   "switchover and right after it.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.json, history.jsonl, faults.json and timeline.png here.")
@click.pass_context
def chaos_command(ctx: click.Context, duration: float, seed: int, hosts: int,
                  faults: tuple[str, ...], coordinators: int, store: str | None,
                  etcd_members: str | None, workload: str, mode: str, keys: int,
                  workers: int, read_ratio: float, op_deadline_ms: int,
                  after_fault_readers: int, report_dir: str | None) -> None:
    """Run real processes under a seeded nemesis, record every operation, check the history.

    Exit status 1 when any check is violated. In async mode lost acknowledged writes are
    counted and shown (that is the trade async makes), not a violation. `failoverctl chaos
    check DIR` re-checks a report's history offline.
    """
    if ctx.invoked_subcommand is not None:
        return
    as_json = bool(ctx.obj) and ctx.obj.get("format") == "json"
    console = Console(stderr=True)
    store = store or ("etcd" if coordinators > 1 or "etcd" in faults else "sqlite")
    if coordinators > 1 and store != "etcd":
        raise click.BadParameter("several coordinators share an etcd store: drop --store "
                                 "sqlite", param_hint="--store")
    if "etcd" in faults and store != "etcd":
        raise click.BadParameter("etcd faults need the etcd store: drop --store sqlite",
                                 param_hint="--faults")
    members = int(etcd_members or (3 if "etcd" in faults else 1))
    config = ChaosConfig(duration_s=duration, seed=seed, hosts=hosts, faults=faults,
                         coordinators=coordinators, store=store, etcd_members=members,
                         workload=workload, mode=mode, keys=keys, kv_workers=workers,
                         read_ratio=read_ratio, op_deadline_ms=op_deadline_ms,
                         after_fault_readers=after_fault_readers,
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
        ("coordinators / store", f"{report.get('coordinators', 1)} / "
                                 f"{report.get('store', 'sqlite')}"),
        ("failovers", str(report["failovers"])),
        ("unavailability p50 / p99 / max ms",
         f"{report['unavailability_ms_p50']:.0f} / {report['unavailability_ms_p99']:.0f} / "
         f"{report['unavailability_ms_max']:.0f}"),
        ("hot keys / kv workers / read ratio / op deadline",
         f"{report.get('keys')} / {report.get('kv_workers')} / {report.get('read_ratio')} / "
         f"{report.get('op_deadline_ms')} ms"),
        ("lost acknowledged writes", str(report["lost_acked_writes"])),
        ("linearizable (kv)", _linearizable(report)),
        ("bank total invariant", str(report["bank_invariant"])),
        ("transfers applied exactly once", str(report["exactly_once"])),
        ("violations", str(len(report["violations"]))),
    ]
    takeovers = report.get("coordinator_takeover_ms") or []
    if takeovers:
        rows.append(("coordinator takeovers ms", ", ".join(
            "none" if t is None else f"{t:.0f}" for t in takeovers)))
    for kind, reason in report.get("faults_skipped", {}).items():
        rows.append((f"skipped: {kind}", reason))
    for check, result in rows:
        table.add_row(check, result)
    console.print(table)
    _print_findings(console, report)


def _linearizable(result: dict) -> str:
    text = str(result["linearizable"])
    decided = result.get("keys_decided")
    if decided is not None:
        text += f" ({decided} of {result.get('keys_checked', '?')} keys decided exactly)"
    return text


def _print_findings(console: Console, result: dict) -> None:
    for key, why in result.get("keys_unknown_why", {}).items():
        console.print(f"[yellow]undecided[/yellow] {key}: {why}")
    for violation in result["violations"][:10]:
        console.print(f"[red]violation[/red] {violation['kind']}: {violation['detail']}")
    if len(result["violations"]) > 10:
        console.print(f"... and {len(result['violations']) - 10} more violations")
    console.print("[bold green]PASSED[/bold green]" if result["passed"] is True
                  else "[bold red]FAILED[/bold red]")


@chaos_command.command("check")
@click.argument("path", type=click.Path(exists=True))
@click.option("--mode", type=click.Choice(["sync", "async"]), default=None,
              help="Judge as this replication mode (default: the one the history records).")
@click.pass_context
def check_command(ctx: click.Context, path: str, mode: str | None) -> None:
    """Re-check a saved history offline: PATH is a report dir or its history.jsonl.

    The verdict is the one the run reported (the same checkers on the same records). Exit
    status 0 when every check holds, 1 otherwise (a violation, or undecided).
    """
    source = Path(path)
    if source.is_dir():
        source = source / "history.jsonl"
    try:
        ops = load_ops(source.read_text())
        result = check_history(ops, replication_mode=mode)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:  # bad input: one line, exit status 2
        raise click.BadParameter(f"cannot check {source}: {exc}", param_hint="PATH") from None
    if bool(ctx.obj) and ctx.obj.get("format") == "json":
        click.echo(json.dumps(result, default=str))
    else:
        console = Console()
        table = Table(title=f"chaos history {source} ({len(ops):,} records, "
                            f"{result['replication_mode']} mode)")
        table.add_column("check")
        table.add_column("result")
        for check, value in (
            ("linearizable (kv)", _linearizable(result)),
            ("lost acknowledged writes", str(result["lost_acked_writes"])),
            ("bank total invariant", str(result["bank_invariant"])),
            ("transfers applied exactly once", str(result["exactly_once"])),
            ("violations", str(len(result["violations"]))),
        ):
            table.add_row(check, value)
        console.print(table)
        _print_findings(console, result)
    sys.exit(0 if result["passed"] is True else 1)
