"""Restarting an agent on new code (docs/design.md, Patch): run a patch command of this host's
allowlist, then re-execute the agent's own command line so that new code loads.

A patch command is only ever the name of an entry of `[patch.commands]` in the agent's TOML
(name -> argv): what runs on a host is set on the host, never sent over the wire. It runs
without a shell (`asyncio.create_subprocess_exec`), in its own session, under a deadline, and
only the end of its output is kept (`defaults.PATCH_OUTPUT_CHARS_MAX`), however much it prints.

The agent answers the Restart call first, then stops serving cleanly (logs closed, the
port released) and replaces itself with `os.execv`: the same process id, the same flags, the
code now on disk. Its replicas recover from their own logs and catch up, as after any
restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from failover import defaults
from failover.core.names import check_command_name
from failover.errors import InvalidRequest

OUTPUT_CHARS_MAX = defaults.PATCH_OUTPUT_CHARS_MAX  # of the output kept for the reply (its end)
_READ_BYTES = 64 << 10
_SIGNALS = {int(sig) for sig in signal.Signals}


def patch_argv(name: str, commands: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """The argv of allowlist entry `name`; InvalidRequest (naming the known entries) for a
    name that is not one, or not a name at all (a shell string, say)."""
    check_command_name(name)
    argv = commands.get(name)
    if argv is None:
        known = ", ".join(sorted(commands)) or "none: this host's TOML has no [patch.commands]"
        raise InvalidRequest(f"patch command {name!r} is not in this host's allowlist "
                             f"([patch.commands]); known: {known}")
    return tuple(argv)


async def _tail(stream: asyncio.StreamReader, bytes_max: int) -> bytes:
    """Reads `stream` to its end, keeping only its last `bytes_max` bytes."""
    kept = b""
    while chunk := await stream.read(_READ_BYTES):
        kept = (kept + chunk)[-bytes_max:] if bytes_max else b""
    return kept


async def run_command(argv: Sequence[str], timeout_ms: int, output_bytes_max: int,
                      what: str, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Runs `argv` (no shell), in its own session, stdin closed, under a deadline; returns
    its exit code (127: it could not start; -1: killed at the deadline; 128 + N: killed by
    signal N, as a shell reports it) and the end of its output (stdout and stderr together,
    its last `output_bytes_max` bytes, or why it did not run, or which signal killed it).
    `what` names it in those messages; `env` is added to the agent's own."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env} if env else None)
    except OSError as exc:
        return 127, f"{what} {argv[0]} could not start: {exc.strerror or exc}"
    assert process.stdout is not None
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            out = await _tail(process.stdout, output_bytes_max)
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        await process.wait()
        return -1, f"{what} did not finish within {timeout_ms} ms and was killed"
    except asyncio.CancelledError:
        # The agent stops (or re-executes): what it started does not outlive it unbounded.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        raise
    code = process.returncode or 0
    text = out.decode(errors="replace")
    if code < 0:
        # Killed by a signal (asyncio says -N): reported as a shell does, so that -1 means
        # only the deadline (a hook killed by SIGHUP was reported as timed out).
        name = signal.Signals(-code).name if -code in _SIGNALS else f"signal {-code}"
        return 128 - code, f"{text}\n{what} was killed by {name}"
    return code, text


async def run_patch_command(argv: Sequence[str], timeout_ms: int) -> tuple[int, str]:
    """Runs a patch command (`run_command`); returns its exit code and the end of its output
    (at most `OUTPUT_CHARS_MAX` characters)."""
    code, text = await run_command(argv, timeout_ms, OUTPUT_CHARS_MAX * 4, "the patch command")
    return code, text[-OUTPUT_CHARS_MAX:]


def reexec_command() -> list[str]:
    """The command line that starts this agent again with the same flags."""
    return [sys.executable, "-m", "failover.agent", *sys.argv[1:]]


def reexec() -> NoReturn:
    """Replaces this process by a fresh agent (never returns)."""
    command = reexec_command()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
