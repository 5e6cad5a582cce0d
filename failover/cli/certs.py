"""`failoverctl certs`: the cluster's CA and the certificates of its agents, coordinators and
callers (layout and contents: `failover.net.certs`).

    failoverctl certs init DIR                    DIR/ca.crt and DIR/ca.key
    failoverctl certs issue DIR --role agent --name h1 --san 10.0.0.5
                                                  DIR/h1.crt and DIR/h1.key

Keys are written 0600 whatever the umask; nothing is ever overwritten. Exit status: 0 done,
2 bad arguments or a file that is in the way (one line on stderr).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from failover.core.permissions import ROLES
from failover.net import certs


def _report(ctx: click.Context, written: dict[str, str]) -> None:
    if (ctx.obj or {}).get("format") == "json":
        click.echo(json.dumps(written))
    else:
        click.echo(f"wrote {written['cert']} and {written['key']} (key mode 0600)")


@click.group("certs")
def certs_command() -> None:
    """Make the cluster's CA and issue certificates (mutual TLS; see docs/operations.md)."""


@certs_command.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--days", type=click.IntRange(min=1), default=certs.CA_DAYS, show_default=True,
              help="How long the CA is valid.")
@click.pass_context
def init_command(ctx: click.Context, directory: Path, days: int) -> None:
    """Make a CA in DIRECTORY (ca.crt, ca.key); refuses if one is there."""
    cert, key = certs.init_ca(directory, days=days)
    _report(ctx, {"cert": str(cert), "key": str(key)})


@certs_command.command("issue")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--role", type=click.Choice(ROLES), required=True,
              help="What the holder may do: agent and coordinator are the daemons; client, "
                   "operator and admin the callers, each allowed more than the one before.")
@click.option("--name", required=True,
              help="Who the holder is (an agent's host id); also the files' name.")
@click.option("--san", "sans", multiple=True, metavar="HOST_OR_IP",
              help="A host name or IP address a daemon is dialled at (repeat for more).")
@click.option("--days", type=click.IntRange(min=1), default=certs.LEAF_DAYS, show_default=True,
              help="How long the certificate is valid.")
@click.pass_context
def issue_command(ctx: click.Context, directory: Path, role: str, name: str,
                  sans: tuple[str, ...], days: int) -> None:
    """Issue DIRECTORY/NAME.crt and NAME.key, signed by the CA in DIRECTORY."""
    cert, key = certs.issue_to_dir(directory, role, name, sans=sans, days=days)
    _report(ctx, {"cert": str(cert), "key": str(key), "role": role, "name": name})
