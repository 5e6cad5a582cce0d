"""File modes of what the daemons keep on disk: directories 0700, files 0600, whatever the
umask. Logs, metas, snapshots and the coordinator's database hold values and client ids, and
keys are keys: nobody but the daemon's own user reads them.

Modes are set when a directory or file is created (the umask can only take bits away, so a
created one is then chmod-ed to the exact mode). One that exists already is left as it is: a
directory the operator chose (a data dir under /srv, say) keeps the modes the operator gave it;
tighten an older data dir once by hand (``chmod -R go-rwx DIR``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private_dir(path: str | os.PathLike[str]) -> None:
    """Creates `path` and any missing parents, each 0700; an existing one is left as it is."""
    target = Path(path)
    missing: list[Path] = []
    probe = target
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs to set
        os.chmod(directory, DIR_MODE)
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """`os.open(path, flags | O_CREAT, 0o600)`; a file it created is made exactly 0600. A file
    that existed keeps its mode. Returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE and _created(flags, fd):
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _created(flags: int, fd: int) -> bool:
    # With O_EXCL the file is new; otherwise it is new if it is empty and owned by us, which
    # also covers an empty leftover: making that 0600 is only tighter.
    if flags & os.O_EXCL:
        return True
    info = os.fstat(fd)
    return info.st_size == 0 and info.st_uid == os.geteuid()


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes `data` to a new file at `path`, 0600; refuses (FileExistsError) to overwrite
    one. Not durable: for keys and certificates, written once by a command."""
    fd = open_private(path, os.O_WRONLY | os.O_EXCL)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
