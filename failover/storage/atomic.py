"""Whole-file replacement that survives a crash at any point: temp, fsync, rename, fsync dir."""

from __future__ import annotations

import os
from pathlib import Path

from failover.storage.modes import open_private


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Makes a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replaces `path` with `data`; a crash leaves either the old or the new file whole. The
    new file is 0600 (`failover.storage.modes`)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def read_counter(path: Path, bytes_max: int) -> int | str:
    """The whole number a small file written by `write_atomic` holds: 0 when the file does
    not exist, else the number, or the (stripped, cut) text when it is not one (the caller
    says what the file is for). OSError when it cannot be read."""
    try:
        with path.open("rb") as f:
            raw = f.read(bytes_max + 1)
    except FileNotFoundError:
        return 0
    text = raw.decode("ascii", errors="replace").strip()
    if len(raw) > bytes_max or not text.isdigit():
        return text[:40]
    return int(text)
