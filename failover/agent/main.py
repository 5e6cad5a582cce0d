"""`failover-agent`: the daemon that hosts replicas on one host."""

from __future__ import annotations

import os
from typing import Any

import click

from failover.agent.config import AgentConfig, load_toml
from failover.commandline import run_click

_HELP = """Hosts replicas on this host: keeps each one's write-ahead log and snapshots in
DATA-DIR, ships logs to duplicas, applies shipped logs, and reports to the coordinator.

The work runs in a child process under a small supervisor (this process), which restarts it
when it dies and tells the coordinator at once, so that its primaries fail over without
waiting for the failure timeout.

Give the settings as flags, or as the same keys in a TOML file with --config (flags win).
With --tls-ca, --tls-cert and --tls-key (an agent certificate whose name is --host-id) every
call in and out is mutual TLS and each caller may do only what its role allows; without them
the agent serves in the clear on a loopback address only, unless --insecure. The patch
commands this host may run are the TOML's [patch.commands] (name = [argv...])."""


@click.command(help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host-id", help="This host's id, unique in the cluster.")
@click.option("--listen", help="HOST:PORT to serve gRPC on.")
@click.option("--advertise", help="HOST:PORT others dial (default: --listen).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Logs and snapshots go here.")
@click.option("--coordinator", help="Coordinator HOST:PORT[,HOST:PORT...].")
@click.option("--zone", help="Failure zone of this host, for placement.")
@click.option("--fsync-policy", type=click.Choice(["always", "batch", "never"]),
              help="When appends reach the disk (default: batch, group commit).")
@click.option("--snapshot-every-entries", type=int,
              help="Snapshot after this many applied entries (0: never on its own).")
@click.option("--log-retain-entries", type=int,
              help="Log entries kept behind a snapshot for lagging duplicas.")
@click.option("--tls-ca", type=click.Path(dir_okay=False),
              help="The cluster CA's certificate (PEM): peers must present one it signed.")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="This agent's certificate (PEM; role agent, name = --host-id).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The key of --tls-cert (PEM).")
@click.option("--insecure", is_flag=True, default=None,
              help="Serve in the clear on a non-loopback address (anyone reaching it can drive "
                   "this host).")
@click.option("--metrics-listen", help="HOST:PORT to serve Prometheus metrics (/metrics) and "
              "health (/healthz, /primary/SERVICE, /replica/SERVICE) on; HTTPS with the TLS "
              "flags. Beyond loopback only with TLS or --insecure.")
@click.option("--log-format", type=click.Choice(["text", "json"]),
              help="Log records as lines for people (text, the default) or one JSON object "
              "per line with each record's fields (json).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR",
                                                "CRITICAL"], case_sensitive=False),
              help="The least severe records logged (default INFO, or FAILOVER_LOG_LEVEL).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML file with the same keys (host_id, listen, data_dir, ...).")
@click.option("--no-supervisor", is_flag=True, default=False,
              help="Run the agent in this process, with no supervisor: a crash is then "
                   "noticed only when its heartbeats stop (the failure timeout).")
def agent_command(config_path: str | None, no_supervisor: bool, **flags: Any) -> None:
    raw: dict[str, Any] = load_toml(config_path) if config_path else {}
    raw.update({k: v for k, v in flags.items() if v is not None})
    if "log_level" not in raw and os.environ.get("FAILOVER_LOG_LEVEL"):
        raw["log_level"] = os.environ["FAILOVER_LOG_LEVEL"]  # as before issue 17
    config = AgentConfig.from_mapping(raw)
    tls = config.load_tls()
    from failover.net.channels import check_listen, check_listen_free  # late: fast --help

    check_listen(str(config.listen), tls=tls is not None, insecure=config.insecure)
    from failover.agent.supervisor import child_incarnation, run_supervised

    incarnation = child_incarnation()
    if not incarnation:
        # Before the supervisor starts a child that cannot bind (and starts it again).
        check_listen_free(str(config.listen))
    if incarnation or no_supervisor:
        # Only the process that does the work imports it: the supervisor, which every start
        # of an agent runs first, imports no replicas, servers or metrics (0.50 -> 0.38 s to
        # its loop on a 2-core machine).
        from failover.agent.daemon import run

        run(config, tls, incarnation)  # the supervisor's child (or no supervisor)
    else:
        run_supervised(config, tls)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_click(agent_command, "failover-agent", argv)
