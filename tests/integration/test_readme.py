"""The README runs as written (issue 17, item 8): every ```sh block of README.md is run by
bash, in order, against real processes, and must exit 0.

A block not meant to run (`make test` itself, minutes of chaos or benchmarks, an example of
flags) is marked by the line just before it:

    <!-- readme-test: skip (why) -->

and every other block runs. Each runs as written in its own `bash -e` session, with three
substitutions so that it can run beside other tests on one machine: `.venv/bin/` is the
bin directory of this Python, `/tmp/fo` a temporary directory, and the ports 7000 and
710N free ports. Whatever a block leaves running is killed with its process group."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

README = Path(__file__).resolve().parents[2] / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->")
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCK_TIMEOUT_S = 150


def blocks() -> list[tuple[int, str, str]]:
    """Every sh block: (line, text, why it is skipped or "")."""
    text = README.read_text()
    out = []
    for match in BLOCK.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.fullmatch(before.strip())
        out.append((text.count("\n", 0, match.start()) + 1, match.group(1),
                    skip.group(1) if skip else ""))
    return out


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports() -> tuple[int, int]:
    """A free coordinator port and a prefix P whose ports P1, P2, P3 are free."""
    for _ in range(200):
        prefix = random.randrange(2000, 6500)
        coordinator = prefix * 10 + 9
        if all(_free(prefix * 10 + i) for i in (1, 2, 3, 9)):
            return coordinator, prefix
    raise AssertionError("no free ports for the README's cluster")


def test_every_block_is_run_or_marked_with_why() -> None:
    found = blocks()
    assert found, "README.md has no sh block"
    assert any(not why for _, _, why in found), "the README test would run nothing"
    # A marker must sit right before a block: one anywhere else is a typo.
    assert README.read_text().count("<!-- readme-test: skip") == sum(
        1 for _, _, why in found if why)


@pytest.mark.parametrize("line", [line for line, _, why in blocks() if not why])
def test_a_readme_block_runs_as_written(line: int, tmp_path: Path) -> None:
    text = next(t for number, t, _ in blocks() if number == line)
    coordinator, prefix = _ports()
    script = (text.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
              .replace("/tmp/fo", str(tmp_path / "fo"))
              .replace("127.0.0.1:7000", f"127.0.0.1:{coordinator}")
              .replace("127.0.0.1:710", f"127.0.0.1:{prefix}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVER_")}
    # Output to a file, not a pipe: daemons a failed block left running would hold a pipe
    # open, and reading it to its end would wait for them.
    log = tmp_path / "block.log"
    with log.open("w") as out:
        process = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, env=env,
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # what the block left running
            process.wait()
    text = log.read_text(errors="replace")
    assert process.returncode == 0, (
        f"README line {line} exited {process.returncode} (-9: not done in "
        f"{BLOCK_TIMEOUT_S} s):\n{text[-6000:]}")
