"""The documentation says what the code does: every command line shown in README.md, docs/ and
examples/ parses against the real CLI definitions (commands, options, choices, argument
counts), the defaults table of docs/design.md matches failover/defaults.py, and nothing points
at a design file outside the repository."""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from failover import defaults
from failover.agent.main import agent_command
from failover.cli.main import cli
from failover.coordinator.main import coordinator_command

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "examples").glob("*/README.md"))]
PROGRAMS: dict[str, click.Command] = {
    "failoverctl": cli,
    "failover-agent": agent_command,
    "failover-coordinator": coordinator_command,
}
_FENCE = re.compile(r"^```(\w*)\s*$")
_SHELLS = {"sh", "bash", "console", "shell"}


def _shell_lines(text: str) -> Iterator[str]:
    """The lines of the shell code blocks in `text`, continuation lines joined."""
    in_shell = False
    pending = ""
    for line in text.splitlines():
        fence = _FENCE.match(line.strip())
        if fence:
            in_shell = not in_shell and fence.group(1) in _SHELLS
            pending = ""
            continue
        if not in_shell:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line
        pending = ""


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every invocation of one of PROGRAMS in a shell block of PAGES."""
    found = []
    for page in PAGES:
        for line in _shell_lines(page.read_text()):
            tokens = shlex.split(line, comments=True)
            for cut, token in enumerate(tokens):  # one command: up to ; & | or &&
                if token in (";", "&", "|", "&&", "||"):
                    tokens = tokens[:cut]
                    break
            tokens = [t.rstrip("&;") for t in tokens]
            if tokens and Path(tokens[0]).name in PROGRAMS:
                found.append((f"{page.relative_to(ROOT)}: {line.strip()}", tokens))
    return found


def _check(command: click.Command, args: list[str]) -> None:
    """Raises AssertionError unless `args` parse as options and arguments of `command` (and
    of its subcommands, for a group). Values are converted by their click types (paths are
    not looked up) and option callbacks run."""
    options = {opt: p for p in command.params if isinstance(p, click.Option)
               for opt in (*p.opts, *p.secondary_opts)}
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    positional: list[str] = []
    given: set[str | None] = set()
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token.startswith("-") and token != "-":
            name, has_value, value = token.partition("=")
            param = options.get(name)
            assert param is not None, f"{command.name} has no option {name}"
            given.add(param.name)
            if param.is_flag or param.count:
                assert not has_value, f"{name} of {command.name} takes no value"
                continue
            if not has_value:
                assert i < len(args), f"{name} of {command.name} needs a value"
                value = args[i]
                i += 1
            if not isinstance(param.type, click.Path):
                converted = param.type.convert(value, param, None)
                if param.callback is not None:
                    param.callback(None, param, converted)  # type: ignore[arg-type]
            continue
        if isinstance(command, click.Group) and not positional:
            sub = command.get_command(None, token)  # type: ignore[arg-type]
            assert sub is not None, f"{command.name} has no command {token!r}"
            _check(sub, args[i:])
            return
        positional.append(token)
    missing = [p.opts[0] for p in options.values() if p.required and p.name not in given]
    assert not missing, f"{command.name} needs {', '.join(sorted(set(missing)))}"
    required = sum(1 for a in arguments if a.required for _ in range(max(a.nargs, 1)))
    most = None if any(a.nargs == -1 for a in arguments) else sum(a.nargs for a in arguments)
    assert len(positional) >= required, f"{command.name} needs {required} arguments"
    assert most is None or len(positional) <= most, (
        f"{command.name} takes at most {most} arguments, got {positional}")


COMMANDS = _commands()


def test_the_pages_show_commands() -> None:
    shown = {Path(argv[0]).name for _, argv in COMMANDS}
    assert shown == set(PROGRAMS), shown


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w[:90] for w, _ in COMMANDS])
def test_every_command_shown_is_real(where: str, argv: list[str]) -> None:
    try:
        _check(PROGRAMS[Path(argv[0]).name], argv[1:])
    except (click.BadParameter, ValueError) as exc:
        raise AssertionError(f"{where}: {exc}") from None
    except AssertionError as exc:
        raise AssertionError(f"{where}: {exc}") from None


def test_the_defaults_table_matches_the_code() -> None:
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split("## Defaults and limits", 1)[1]
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+?) \|", section, re.MULTILINE)
    assert len(rows) > 20, rows
    for name, value in rows:
        assert hasattr(defaults, name), f"docs/design.md names {name}, not in defaults.py"
        assert ast.literal_eval(value) == getattr(defaults, name), (name, value)


def test_nothing_points_at_a_design_file_outside_the_repository() -> None:
    sources = [ROOT / "README.md", *ROOT.glob("failover/**/*.py"), *ROOT.glob("docs/*.md"),
               *ROOT.glob("demo_services/*.py"), *ROOT.glob("migration/**/*.py")]
    for path in sources:
        assert "shared/design" not in path.read_text(), path
