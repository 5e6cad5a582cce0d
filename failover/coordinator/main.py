"""`failover-coordinator`: watches the hosts, promotes, fences and routes."""

from __future__ import annotations

import os
import re
from typing import Any

import click

from failover import defaults
from failover.commandline import run_click
from failover.core.placement import POLICIES
from failover.errors import ConfigError
from failover.net.address import parse_address, parse_address_list
from failover.storage.store import check_address

_CLUSTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_HELP = """Watches every host, detects a dead primary, promotes an in-sync duplica under a new
epoch, fences the old primary and pushes routes to clients. Keeps cluster state in a SQLite
store in DATA-DIR (sqlite:///PATH; one coordinator), or in etcd (--store
etcd://HOST:PORT[,HOST:PORT...]) shared by several coordinators: one leads, the others answer
with a redirect to it and take over within about --leader-ttl-ms of its loss. With --tls-ca,
--tls-cert and --tls-key every call in and out is mutual TLS and each caller may do only
what the role in its certificate allows; without them it serves in the clear on a loopback
address only, unless --insecure."""


@click.command(help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", required=True, help="HOST:PORT to serve gRPC on.")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="Where the default SQLite store lives.")
@click.option("--store", default=None,
              help="Store URL: sqlite:///PATH (default: sqlite:///DATA-DIR/cluster.db), or "
              "etcd://HOST:PORT[,HOST:PORT...] for several coordinators.")
@click.option("--cluster", default="default", show_default=True,
              help="With etcd: the cluster's name; its keys live under /failover/NAME/.")
@click.option("--etcd-tls-ca", type=click.Path(dir_okay=False), default=None,
              help="With etcd: the CA that signed etcd's certificate (PEM).")
@click.option("--etcd-tls-cert", type=click.Path(dir_okay=False), default=None,
              help="With etcd: this coordinator's client certificate for etcd (PEM).")
@click.option("--etcd-tls-key", type=click.Path(dir_okay=False), default=None,
              help="With etcd: the key of --etcd-tls-cert (PEM).")
@click.option("--leader-ttl-ms", type=click.IntRange(min=defaults.LEADER_TTL_MS_MIN,
                                                     max=defaults.LEADER_TTL_MS_MAX),
              default=defaults.LEADER_TTL_MS, show_default=True,
              help="With etcd: the leader's lease; a leader that cannot renew it stops acting, "
              "and a follower takes over about this long after the leader's loss.")
@click.option("--advertise", default=None,
              help="HOST:PORT other coordinators, agents and callers reach this one at "
              "(default: --listen).")
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
@click.option("--metrics-listen", default=None,
              help="HOST:PORT to serve Prometheus metrics (/metrics) and health (/healthz, "
              "/leader) on; HTTPS with the TLS flags. Beyond loopback only with TLS or "
              "--insecure.")
@click.option("--log-format", type=click.Choice(defaults.LOG_FORMATS),
              default=defaults.LOG_FORMAT, show_default=True,
              help="Log records as lines for people (text) or one JSON object per line with "
              "each record's fields (json).")
@click.option("--log-level", type=click.Choice(defaults.LOG_LEVELS, case_sensitive=False),
              default=None, help="The least severe records logged (default INFO, or "
              "FAILOVER_LOG_LEVEL).")
def coordinator_command(listen: str, data_dir: str, store: str | None, cluster: str,
                        etcd_tls_ca: str | None, etcd_tls_cert: str | None,
                        etcd_tls_key: str | None, leader_ttl_ms: int, advertise: str | None,
                        host_dead_ms: int, placement: str, tls_ca: str | None,
                        tls_cert: str | None, tls_key: str | None, insecure: bool,
                        metrics_listen: str | None, log_format: str,
                        log_level: str | None) -> None:
    parse_address(listen, what="listen")
    from failover.observe.logs import check_log_level

    level = check_log_level(log_level or os.environ.get("FAILOVER_LOG_LEVEL")
                            or defaults.LOG_LEVEL)
    etcd_tls = _check_store(store, cluster, etcd_tls_ca, etcd_tls_cert, etcd_tls_key,
                            leader_ttl_ms)
    if advertise is not None:
        parse_address(advertise, what="--advertise")
        check_address(advertise)
    from failover.net.channels import check_listen, check_listen_free
    from failover.net.tls import TlsFiles

    files = TlsFiles.from_options(tls_ca, tls_cert, tls_key)
    tls = files.load() if files is not None else None
    check_listen(listen, tls=tls is not None, insecure=insecure)
    check_listen_free(listen)
    from failover.observe.endpoint import check_metrics_listen

    if metrics_listen is not None:
        metrics_listen = check_metrics_listen(metrics_listen, tls=tls is not None,
                                              insecure=insecure)
    from failover.coordinator.daemon import run  # imported late: --help stays fast

    run(listen=listen, data_dir=data_dir, store=store, host_dead_ms=host_dead_ms,
        placement=placement, tls=tls, cluster=cluster, etcd_tls=etcd_tls,
        leader_ttl_ms=leader_ttl_ms, advertise=advertise, metrics_listen=metrics_listen,
        log_format=log_format, log_level=level)


def _check_store(store: str | None, cluster: str, ca: str | None, cert: str | None,
                 key: str | None, leader_ttl_ms: int) -> Any:
    """Checks the store flags together; returns the etcd TLS files (None: in the clear).
    Raises ConfigError (one line, exit 2) naming what is wrong."""
    etcd = store is not None and store.strip().lower().startswith("etcd")
    given = [name for name, value in (("--etcd-tls-ca", ca), ("--etcd-tls-cert", cert),
                                      ("--etcd-tls-key", key)) if value is not None]
    if not etcd:
        if given:
            raise ConfigError(f"{', '.join(given)}: only for an etcd store: give "
                              "--store etcd://HOST:PORT[,HOST:PORT...] or drop them")
        if cluster != "default":
            raise ConfigError("--cluster names a cluster in etcd: give --store "
                              "etcd://HOST:PORT[,HOST:PORT...] or drop it")
        if leader_ttl_ms != defaults.LEADER_TTL_MS:
            raise ConfigError("--leader-ttl-ms applies to an etcd store only (one coordinator "
                              "on SQLite leads for as long as it runs)")
        return None
    assert store is not None
    endpoints = store.strip().partition("://")[2]
    parse_address_list(endpoints, what="etcd endpoints of --store")
    if not _CLUSTER_NAME.fullmatch(cluster):
        raise ConfigError(f"--cluster {cluster!r}: use 1-64 letters, digits, '-', '_' or '.'")
    from failover.storage.etcd_store import EtcdTls  # imported late: aetcd only for etcd

    return EtcdTls.from_options(ca, cert, key)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_click(coordinator_command, "failover-coordinator", argv)
