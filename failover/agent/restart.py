"""Restarting an agent on new code (docs/design.md, Patch): run the patch command, then
re-execute the agent's own command line so that new code loads.

The agent answers the Restart call first, then stops serving cleanly (logs closed, the
port released) and replaces itself with `os.execv`: the same process id, the same flags, the
code now on disk. Its replicas recover from their own logs and catch up, as after any
restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import NoReturn

from failover import defaults
from failover.errors import InvalidRequest

OUTPUT_CHARS_MAX = 4000  # of the command's output kept for the reply (its last part)


async def run_patch_command(command: str, timeout_ms: int) -> tuple[int, str]:
    """Runs `command` in a shell, in its own session, under a deadline; returns its exit
    code and the end of its output (stdout and stderr together)."""
    if len(command) > defaults.PATCH_COMMAND_CHARS_MAX:
        raise InvalidRequest(f"the patch command is over {defaults.PATCH_COMMAND_CHARS_MAX} "
                             "characters; put it in a script")
    process = await asyncio.create_subprocess_shell(
        command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout_ms / 1000)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        await process.wait()
        return -1, f"the patch command did not finish within {timeout_ms} ms and was killed"
    text = out.decode(errors="replace")
    return process.returncode or 0, text[-OUTPUT_CHARS_MAX:]


def reexec_command() -> list[str]:
    """The command line that starts this agent again with the same flags."""
    return [sys.executable, "-m", "failover.agent", *sys.argv[1:]]


def reexec() -> NoReturn:
    """Replaces this process by a fresh agent (never returns)."""
    command = reexec_command()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
