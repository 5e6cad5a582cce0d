"""How the three commands (failoverctl and both daemons) report bad input: exit code 2 and one
line saying what is wrong. Outside failover/cli so the daemons need not import the CLI."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

import click

from failover.errors import ConfigError, FailoverError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def fail_usage(prog: str, message: str) -> NoReturn:
    """Prints one line naming what is wrong and exits with status 2."""
    first = " ".join(message.split())
    sys.stderr.write(f"{prog}: error: {first}\n")
    raise SystemExit(EXIT_USAGE)


def run_click(command: click.Command, prog: str, argv: list[str] | None = None,
              on_error: Callable[[FailoverError], int] | None = None) -> NoReturn:
    """Runs a click command so that usage and config errors are one line and exit 2.

    Click's own handling prints the usage block too; scripts and people want one line.
    """
    try:
        rv = command.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except click.UsageError as exc:
        fail_usage(prog, exc.format_message())
    except click.exceptions.Abort:
        sys.stderr.write(f"{prog}: aborted\n")
        raise SystemExit(EXIT_FAILURE) from None
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except ConfigError as exc:
        fail_usage(prog, str(exc))
    except FailoverError as exc:
        if on_error is not None:
            raise SystemExit(on_error(exc)) from None
        sys.stderr.write(f"{prog}: {exc}\n")
        raise SystemExit(EXIT_FAILURE) from None
    raise SystemExit(rv if isinstance(rv, int) else EXIT_OK)
