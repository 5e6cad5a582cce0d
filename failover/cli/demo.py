"""`failoverctl demo`: a local cluster of real processes, a crash, a switchover, a report.

A coordinator and three agents on 127.0.0.1 in a temp dir; a `kv` service (3 replicas) and a
`bank` service (2 replicas); clients writing to both; SIGKILL of the kv primary; what the
cluster did about it (detection, promotion, the gap the clients saw); a switchover under load;
then the proof: every acknowledged write still readable, the bank total unchanged, every
replica with the same digest. Exits 0 only if every check held; leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import msgpack
from rich.console import Console
from rich.table import Table

from failover.client import Client
from failover.errors import FailoverError, RequestRejected
from failover.localcluster import LocalCluster, wait_for
from failover.net.convert import ROLE_FROM_PROTO
from failover.v1 import coordinator_pb2

ACCOUNTS = 10
OPENING_BALANCE = 1_000
READ_BATCH = 512  # acknowledged puts read back per call_many


class DemoFailed(Exception):
    """A check of the demo did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailed(message)


@dataclass
class Clients:
    """The demo's workload: kv writers and bank transfers, with what they saw."""

    client: Client
    acked: dict[str, str] = field(default_factory=dict)
    completions: list[float] = field(default_factory=list)  # monotonic time of each kv ok
    failures: list[str] = field(default_factory=list)
    transfers: int = 0
    refused: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def kv_writer(self, name: str) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            key, value = f"{name}:{i}", f"value-{i}"
            try:
                await self.client.call("kv", {"op": "put", "key": key, "value": value})
            except FailoverError as exc:
                self.failures.append(f"kv put {key}: {exc}")
                continue
            self.acked[key] = value
            self.completions.append(time.monotonic())

    async def bank_teller(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.is_set():
            a, b = rnd.sample(range(ACCOUNTS), 2)
            try:
                await self.client.call("bank", {"op": "transfer", "from": f"acct{a}",
                                                "to": f"acct{b}", "amount": rnd.randint(1, 400)})
                self.transfers += 1
            except RequestRejected:
                self.refused += 1  # an overdraw, refused as it must be
            except FailoverError as exc:
                self.failures.append(f"bank transfer: {exc}")

    async def served_after(self, moment: float, timeout_s: float = 15.0) -> None:
        """Waits (bounded) until some kv put completed after `moment`."""
        deadline = time.monotonic() + timeout_s
        while not (self.completions and self.completions[-1] > moment):
            if time.monotonic() > deadline:
                raise DemoFailed(f"no kv put completed within {timeout_s:.0f} s")
            await asyncio.sleep(0.01)

    def gap_around(self, moment: float) -> float:
        """Client-visible unavailability: last kv success before `moment` to first after."""
        before = max((t for t in self.completions if t <= moment), default=moment)
        after = min((t for t in self.completions if t > moment), default=moment)
        return after - before


async def _scenario(cluster: LocalCluster, console: Console, report: dict[str, Any]) -> None:
    coordinator = cluster.coordinator
    assert coordinator is not None
    async with Client(coordinator=coordinator.address, deadline_ms=10_000,
                      tls=cluster.tls_client) as client:
        for n in range(ACCOUNTS):
            await client.call("bank", {"op": "open", "account": f"acct{n}",
                                       "balance": OPENING_BALANCE})
        clients = Clients(client)
        tasks = [asyncio.create_task(clients.kv_writer(f"writer{n}")) for n in range(8)]
        tasks += [asyncio.create_task(clients.bank_teller(n)) for n in range(2)]
        await asyncio.sleep(2.0)

        victim = cluster.primary_of("kv")
        assert victim is not None
        console.print(f"[bold]SIGKILL {victim}[/bold], the kv primary, under load "
                      f"({len(clients.acked):,} puts acknowledged so far)")
        killed_at = time.monotonic()
        cluster[victim].kill()
        new = await asyncio.to_thread(
            wait_for, lambda: (p := cluster.primary_of("kv")) not in (None, victim) and p,
            15, "a new kv primary")
        await clients.served_after(killed_at)
        gap_ms = clients.gap_around(killed_at) * 1000
        failover = next(e for e in reversed(coordinator.history("kv")) if e.kind == "failover")
        details = msgpack.unpackb(failover.details, raw=False)
        report["failover"] = {"killed": victim, "promoted": new, **details,
                              "client_gap_ms": round(gap_ms)}
        console.print(f"  detected after {details['detection_ms']} ms of silence, {new} "
                      f"promoted {details['promotion_ms']} ms later at epoch "
                      f"{details['epoch']}; clients saw a {gap_ms:.0f} ms gap, no error")

        console.print(f"[bold]Restart {victim}[/bold]: it rejoins as a duplica and catches up")
        restarted_at = time.monotonic()
        cluster[victim].start()
        # In sync at the coordinator: it holds every acknowledged write. Its digest is
        # compared once the load stops (the replicas are seldom at one index under load).
        await asyncio.to_thread(cluster.wait_in_sync, "kv", victim, 30)
        report["rejoin_in_sync_ms"] = round((time.monotonic() - restarted_at) * 1000)
        console.print(f"  {victim} in sync again {report['rejoin_in_sync_ms']:,} ms after "
                      "its restart")

        console.print("[bold]Switchover[/bold] of kv, under the same load")
        failures_before = len(clients.failures)
        reply = await asyncio.to_thread(
            coordinator.stub().Switchover, coordinator_pb2.SwitchoverRequest(service="kv"),
            timeout=15)
        await clients.served_after(time.monotonic())
        report["switchover"] = {"to": reply.primary_host_id, "epoch": reply.epoch,
                                "stall_ms": reply.stall_ms,
                                "failed_requests": len(clients.failures) - failures_before}
        console.print(f"  primary moved to {reply.primary_host_id} at epoch {reply.epoch}; "
                      f"writes held for {reply.stall_ms} ms, "
                      f"{report['switchover']['failed_requests']} failed requests")

        clients.stop.set()
        await asyncio.gather(*tasks)
        console.print("[bold]Checking[/bold] every acknowledged write and the bank total")
        acked = list(clients.acked.items())
        for start in range(0, len(acked), READ_BATCH):
            batch = acked[start:start + READ_BATCH]
            replies = await client.call_many(
                "kv", [{"op": "get", "key": key} for key, _ in batch])
            for (key, value), got in zip(batch, replies, strict=True):
                check(got.get("value") == value, f"acknowledged put {key} lost: {got}")
        total = (await client.call("bank", {"op": "total"}))["total"]
        check(total == ACCOUNTS * OPENING_BALANCE, f"bank total is {total}")
        check(not clients.failures, f"failed requests: {clients.failures[:3]}")
        report.update(kv_puts_acknowledged=len(clients.acked), lost_acked_writes=0,
                      bank_transfers=clients.transfers, bank_overdraws_refused=clients.refused,
                      bank_total=total, failed_requests=0)
        console.print(f"  {len(clients.acked):,} acknowledged puts all readable, 0 lost; "
                      f"{clients.transfers:,} transfers ({clients.refused} overdraws refused), "
                      f"total still {total:,}")


def _replica_table(cluster: LocalCluster) -> Table:
    table = Table(title="Replicas at the end")
    for column in ("service", "host", "role", "epoch", "applied", "digest"):
        table.add_column(column)
    for agent in cluster:
        for r in agent.status().replicas:
            d = agent.digest(r.service)
            table.add_row(r.service, agent.host_id, ROLE_FROM_PROTO.get(r.role, "?"), str(r.epoch),
                          f"{d.applied_index:,}", d.digest.hex()[:16])
    return table


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temp dir (logs, data) for a look.")
@click.pass_context
def demo_command(ctx: click.Context, keep: bool) -> None:
    """Run a local cluster of real processes through a crash and a switchover."""
    as_json = bool(ctx.obj) and ctx.obj.get("format") == "json"
    console = Console(stderr=as_json)
    root = Path(tempfile.mkdtemp(prefix="failover-demo-"))
    report: dict[str, Any] = {}
    started = time.monotonic()
    console.print(f"[bold]Starting a coordinator and 3 agents on 127.0.0.1[/bold] ({root}), "
                  "mutual TLS on every channel (certificates in its pki/)")
    try:
        with LocalCluster(root, hosts=3, coordinator=True) as cluster:
            cluster.start()
            cluster.create("kv", "kv", replicas=3)
            cluster.create("bank", "bank", replicas=2)
            console.print("  kv: 3 replicas, bank: 2 replicas, sync mode (a write is "
                          "acknowledged once every in-sync duplica has it on disk)")
            asyncio.run(_scenario(cluster, console, report))
            digests = {s: cluster.wait_converged(s, hosts, 30).hex() for s, hosts in (
                ("kv", list(cluster.agents)),
                ("bank", [h for h in cluster.agents
                          if cluster[h].replica("bank") is not None]))}
            report["digests"] = digests
            console.print(_replica_table(cluster))
            console.print("  every replica of a service: same applied index, same digest")
    except (DemoFailed, TimeoutError, FailoverError) as exc:
        console.print(f"[bold red]demo failed:[/bold red] {exc}")
        console.print(f"logs kept in {root}")
        raise SystemExit(1) from None
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    console.print(f"[bold green]demo passed[/bold green] in {report['seconds']} s")
    if as_json:
        click.echo(json.dumps(report))
