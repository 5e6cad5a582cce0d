"""`failover-coordinator`: watches the hosts, promotes, fences and routes."""

from __future__ import annotations

import click

from failover import defaults
from failover.commandline import run_click
from failover.core.placement import POLICIES
from failover.net.address import parse_address

_HELP = """Watches every host, detects a dead primary, promotes an in-sync duplica under a new
epoch, fences the old primary and pushes routes to clients. Keeps cluster state in a store:
SQLite in DATA-DIR by default (sqlite:///PATH), or etcd (etcd://HOST:PORT[,HOST:PORT...])."""


@click.command(help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", required=True, help="HOST:PORT to serve gRPC on.")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="Where the default SQLite store lives.")
@click.option("--store", default=None, help="Store URL (default: sqlite:///DATA-DIR/cluster.db).")
@click.option("--host-dead-ms", type=click.IntRange(min=defaults.FAILURE_TIMEOUT_MS),
              default=defaults.HOST_DEAD_MS, show_default=True,
              help="A host silent this long is dead: its replicas are rebuilt elsewhere.")
@click.option("--placement", type=click.Choice(POLICIES), default=defaults.PLACEMENT_POLICY,
              show_default=True, help="Where new replicas go, unless a service says otherwise.")
def coordinator_command(listen: str, data_dir: str, store: str | None, host_dead_ms: int,
                        placement: str) -> None:
    parse_address(listen, what="listen")
    from failover.coordinator.daemon import run  # imported late: --help stays fast

    run(listen=listen, data_dir=data_dir, store=store, host_dead_ms=host_dead_ms,
        placement=placement)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_click(coordinator_command, "failover-coordinator", argv)
