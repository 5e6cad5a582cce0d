"""Small disks for local agents: a tmpfs per data dir that a chaos run fills up (root only).

A full disk is a fault real hosts meet (a runaway log, a full volume). To make one without
touching the machine's disks, each agent's data dir is its own small tmpfs; `fill` writes a
ballast file until the kernel answers ENOSPC, and `free` deletes it. The agent sees exactly
what it would see on a full disk: writes fail with ENOSPC, nothing else changes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

BALLAST = ".chaos-ballast"
_CHUNK_BYTES = 1 << 20
_TAIL_CHUNK_BYTES = 4096


def unavailable_reason() -> str | None:
    """Why small disks cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "a small disk per agent needs root (to mount a tmpfs)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount and umount are not installed"
    return None


class SmallDisk:
    """A tmpfs of `size_bytes` mounted at `path` (made empty first)."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        assert size_bytes >= 1 << 20, size_bytes
        self.path = path
        self.size_bytes = size_bytes
        self.mounted = False

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes},mode=0755",
                        "tmpfs", str(self.path)], check=True, capture_output=True, timeout=10)
        self.mounted = True

    def fill(self) -> int:
        """Writes ballast until the disk is full; returns the bytes written."""
        written = 0
        with open(self.path / BALLAST, "ab", buffering=0) as ballast:
            for chunk in (bytes(_CHUNK_BYTES), bytes(_TAIL_CHUNK_BYTES)):
                while True:
                    try:
                        written += ballast.write(chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def free(self) -> None:
        """Deletes the ballast: the disk has room again."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / BALLAST).unlink()

    def unmount(self) -> None:
        if self.mounted:
            # Lazy: a process killed a moment ago may still hold a file open.
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True,
                           timeout=10)
            self.mounted = False
