"""`failover-coordinator`: watches the hosts, promotes, fences and routes."""

from __future__ import annotations

import click

from failover import defaults
from failover.commandline import run_click
from failover.core.placement import POLICIES
from failover.net.address import parse_address

_HELP = """Watches every host, detects a dead primary, promotes an in-sync duplica under a new
epoch, fences the old primary and pushes routes to clients. Keeps cluster state in a SQLite
store in DATA-DIR (sqlite:///PATH); an etcd store for several coordinators is planned (issue
15). With --tls-ca, --tls-cert and --tls-key every call in and out is mutual TLS and each
caller may do only what the role in its certificate allows; without them it serves in the
clear on a loopback address only, unless --insecure."""


@click.command(help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", required=True, help="HOST:PORT to serve gRPC on.")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="Where the default SQLite store lives.")
@click.option("--store", default=None,
              help="Store URL (default: sqlite:///DATA-DIR/cluster.db); etcd:// is planned "
              "(issue 15) and refused.")
@click.option("--host-dead-ms", type=click.IntRange(min=defaults.FAILURE_TIMEOUT_MS),
              default=defaults.HOST_DEAD_MS, show_default=True,
              help="A host silent this long is dead: its replicas are rebuilt elsewhere.")
@click.option("--placement", type=click.Choice(POLICIES), default=defaults.PLACEMENT_POLICY,
              show_default=True, help="Where new replicas go, unless a service says otherwise.")
@click.option("--tls-ca", type=click.Path(dir_okay=False), default=None,
              help="The cluster CA's certificate (PEM): callers and agents must present a "
              "certificate it signed.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
              help="This coordinator's certificate (PEM; failoverctl certs issue --role "
              "coordinator).")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
              help="The key of --tls-cert (PEM).")
@click.option("--insecure", is_flag=True,
              help="Serve in the clear on a non-loopback address: anyone who reaches it "
              "drives the cluster.")
def coordinator_command(listen: str, data_dir: str, store: str | None, host_dead_ms: int,
                        placement: str, tls_ca: str | None, tls_cert: str | None,
                        tls_key: str | None, insecure: bool) -> None:
    parse_address(listen, what="listen")
    from failover.net.channels import check_listen
    from failover.net.tls import TlsFiles

    files = TlsFiles.from_options(tls_ca, tls_cert, tls_key)
    tls = files.load() if files is not None else None
    check_listen(listen, tls=tls is not None, insecure=insecure)
    from failover.coordinator.daemon import run  # imported late: --help stays fast

    run(listen=listen, data_dir=data_dir, store=store, host_dead_ms=host_dead_ms,
        placement=placement, tls=tls)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_click(coordinator_command, "failover-coordinator", argv)
