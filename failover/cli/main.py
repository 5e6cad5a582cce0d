"""`failoverctl`: the operator's command line."""

from __future__ import annotations

import click

from failover.commandline import run_click


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "auto_envvar_prefix": "FAILOVER"})
@click.option(
    "--coordinator", envvar="FAILOVER_COORDINATOR", default="127.0.0.1:7000", show_default=True,
    help="Coordinator HOST:PORT[,HOST:PORT...] (env FAILOVER_COORDINATOR).",
)
@click.option(
    "--format", "output_format", type=click.Choice(["table", "json"]), default="table",
    show_default=True, help="Tables for people, json for scripts.",
)
@click.option("--tls-ca", envvar="FAILOVER_TLS_CA", type=click.Path(dir_okay=False),
              default=None, help="The cluster CA's certificate (PEM; env FAILOVER_TLS_CA).")
@click.option("--tls-cert", envvar="FAILOVER_TLS_CERT", type=click.Path(dir_okay=False),
              default=None, help="Your certificate (PEM; env FAILOVER_TLS_CERT): its role "
              "(client, operator, admin) says what you may do.")
@click.option("--tls-key", envvar="FAILOVER_TLS_KEY", type=click.Path(dir_okay=False),
              default=None, help="The key of --tls-cert (PEM; env FAILOVER_TLS_KEY).")
@click.pass_context
def cli(ctx: click.Context, coordinator: str, output_format: str, tls_ca: str | None,
        tls_cert: str | None, tls_key: str | None) -> None:
    """Operate a failover cluster: status, switchover, migration, patches, chaos runs.

    With --tls-ca, --tls-cert and --tls-key every call to the coordinator and the agents is
    mutual TLS; a call your certificate's role does not allow exits 2 with one line."""
    ctx.obj = {"coordinator": coordinator, "format": output_format,
               "tls": (tls_ca, tls_cert, tls_key)}


FORMATS = ("table", "json")


def _set_format(ctx: click.Context | None, _param: click.Parameter,
                value: str | None) -> None:
    """`--format` given after a subcommand: it wins over the group's (the group's callback
    has run by the time a subcommand's options are parsed). No context: nothing to set (a
    parse check of the docs' commands)."""
    if value is not None and ctx is not None:
        root = ctx.find_root()
        if root.obj is None:
            root.obj = {}
        root.obj["format"] = value


def _accept_format(command: click.Command) -> None:
    """Lets `command` (and, for a group, each of its subcommands) take `--format` after its
    name too: `failoverctl chaos ... --format json` as well as `failoverctl --format json
    chaos ...`."""
    if not any("--format" in p.opts for p in command.params):
        command.params.append(click.Option(
            ["--format"], type=click.Choice(FORMATS), default=None, expose_value=False,
            is_eager=True, callback=_set_format,
            help="Tables for people, json for scripts (as before the subcommand)."))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _accept_format(sub)


def _register_commands() -> None:
    from failover.cli import admin, certs, chaos, demo, events, top

    cli.add_command(demo.demo_command)
    cli.add_command(top.top_command)
    cli.add_command(chaos.chaos_command)
    cli.add_command(certs.certs_command)
    cli.add_command(events.events_command)
    for command in admin.COMMANDS:
        cli.add_command(command)
    for command in cli.commands.values():
        _accept_format(command)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_click(cli, "failoverctl", argv)
