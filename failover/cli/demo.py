"""`failoverctl demo`: a local cluster of real agent processes, shown working.

Three agents on 127.0.0.1 in a temp dir; a `kv` and a `bank` replica set; a client workload;
a duplica killed with SIGKILL mid-stream and restarted; every copy converging to the same
digest; a retried transfer applied once; and the write-ahead log recovering a torn tail.
Exits 0 only if every check held, and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from failover.client import Client
from failover.localcluster import LocalCluster, wait_for
from failover.storage.wal import Entry, WriteAheadLog


class DemoFailed(Exception):
    """A check of the demo did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailed(message)


async def _workload(cluster: LocalCluster, console: Console, report: dict[str, Any]) -> None:
    async with Client(agents=cluster.addresses, deadline_ms=15_000) as client:
        started = time.monotonic()
        keys = iter(range(3_000))

        async def writer() -> None:
            for i in keys:
                await client.call("kv", {"op": "put", "key": f"user:{i}", "value": f"v{i}"})

        await asyncio.gather(*(writer() for _ in range(16)))
        elapsed = time.monotonic() - started
        report["kv_puts"] = 3_000
        report["kv_puts_per_s"] = round(3_000 / elapsed)
        console.print(f"  3,000 kv puts, 16 in flight: {report['kv_puts_per_s']:,} puts/s "
                      "(sync mode: every put on disk on host2 before it is acknowledged)")

        console.print("[bold]SIGKILL host3 (a duplica) while writes go on, then restart it")
        more = iter(range(3_000, 5_000))

        async def writer2() -> None:
            for i in more:
                await client.call("kv", {"op": "put", "key": f"user:{i}", "value": f"v{i}"})

        load = asyncio.gather(*(writer2() for _ in range(8)))
        await asyncio.sleep(0.2)
        cluster["host3"].kill()
        await asyncio.sleep(0.5)
        cluster["host3"].start()
        await load
        console.print("  2,000 more puts, none failed; host3 restarted and caught up")

        for account, balance in (("alice", 100), ("bob", 50)):
            await client.call("bank", {"op": "open", "account": account, "balance": balance})
        transfers = 0
        for amount in (10, 20, 30):
            await client.call("bank", {"op": "transfer", "from": "alice", "to": "bob",
                                       "amount": amount})
            transfers += 1
        refused = ""
        try:
            await client.call("bank", {"op": "transfer", "from": "bob", "to": "alice",
                                       "amount": 10_000})
        except Exception as exc:
            refused = f"{type(exc).__name__}: {exc}"
        total = (await client.call("bank", {"op": "total"}))["total"]
        check(total == 150, f"bank total is {total}, expected 150")
        check(refused.startswith("RequestRejected"), f"overdraw was not refused: {refused!r}")
        report["bank_total"] = total
        console.print(f"  bank: {transfers} transfers, total stays {total}; overdraw refused "
                      f"({refused.split(':', 1)[0]})")


def _wal_torn_tail(root: Path, console: Console, report: dict[str, Any]) -> None:
    console.print("[bold]Write-ahead log: cut the last record in half, reopen")
    directory = root / "wal-demo"
    wal = WriteAheadLog.open(directory)
    wal.append([Entry(1, i, b"", b"x" * 100) for i in range(1, 1001)])
    wal.close()
    segment = sorted(directory.glob("*.wal"))[-1]
    size = segment.stat().st_size
    with open(segment, "r+b") as f:
        f.truncate(size - 50)
    wal = WriteAheadLog.open(directory)
    dropped = wal.open_report.torn_bytes_dropped
    check(wal.last_index == 999, f"expected 999 entries after the cut, found {wal.last_index}")
    wal.close()
    report["torn_tail_bytes_dropped"] = dropped
    console.print(f"  torn record dropped ({dropped} bytes), entries 1..999 intact")


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temp dir (logs, data) for a look.")
@click.pass_context
def demo_command(ctx: click.Context, keep: bool) -> None:
    """Run a local cluster of real processes and show replication, a crash and recovery."""
    as_json = ctx.obj and ctx.obj.get("format") == "json"
    console = Console(stderr=as_json)
    root = Path(tempfile.mkdtemp(prefix="failover-demo-"))
    report: dict[str, Any] = {}
    started = time.monotonic()
    console.print(f"[bold]Starting 3 agents on 127.0.0.1[/bold] (data in {root})")
    try:
        with LocalCluster(root, hosts=3) as cluster:
            cluster.start()
            cluster.form("kv", "kv", "host1", ["host2", "host3"], in_sync=["host2"])
            cluster.form("bank", "bank", "host1", ["host2"])
            console.print("  kv: primary host1, duplicas host2 (in-sync) and host3; "
                          "bank: primary host1, duplica host2")
            asyncio.run(_workload(cluster, console, report))
            digests = {
                "kv": cluster.wait_converged("kv", ["host1", "host2", "host3"]),
                "bank": cluster.wait_converged("bank", ["host1", "host2"]),
            }
            table = Table(title="Replicas")
            for column in ("service", "host", "role", "epoch", "applied", "digest"):
                table.add_column(column)
            for agent in cluster:
                for r in agent.status().replicas:
                    d = agent.digest(r.service)
                    table.add_row(r.service, agent.host_id, ("?", "primary", "duplica",
                                  "building", "retired")[r.role], str(r.epoch),
                                  f"{d.applied_index:,}", d.digest.hex()[:16])
            console.print(table)
            console.print("  every replica of a service: same applied index, same digest")
            report["digests"] = {k: v.hex() for k, v in digests.items()}
            wait_for(lambda: not cluster["host3"].log_path.read_text().count("Traceback"),
                     5, "host3's log to be free of tracebacks")
        _wal_torn_tail(root, console, report)
    except DemoFailed as exc:
        console.print(f"[bold red]demo failed:[/bold red] {exc}")
        raise SystemExit(1) from None
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    console.print(f"[bold green]demo passed[/bold green] in {report['seconds']} s")
    if as_json:
        click.echo(json.dumps(report))
