"""Segment files of the write-ahead log, and the file helpers it writes and reads them with.

A log directory holds its records in segments::

    00000000000000000001.wal
    00000000000000001025.wal

A segment is named by the index of its first record, zero-padded to 20 digits so names sort
as indexes do (``segment_name``; a file whose name does not match ``_SEGMENT_NAME_RE`` is
not a segment). Its file starts with the 8-byte ``SEGMENT_MAGIC`` (format version 1), then
whole records (``failover.storage.records``) back to back: the first record is at offset 8
and no record spans two segments. In memory a ``_Segment`` keeps the file offset of each
of its records (``offsets``, so a read seeks straight to an index) and ``size``, the bytes
of valid data including the header; record ``k`` ends where ``k + 1`` starts, the last one
at ``size``. The log rolls to a new segment at its ``segment_bytes_max``, which may not be
set below ``_SEGMENT_BYTES_MIN`` (a header plus one small record).

Files are written whole (``_write_all``); a created, renamed or deleted file is durable only
once its directory is synced (``_fsync_dir``); a read that finds a segment shorter than its
offsets say (truncated or deleted meanwhile) raises ``_ShortRead`` for the log to retry.
"""

from __future__ import annotations

import os
import re
from array import array

__all__ = ["SEGMENT_MAGIC", "segment_name"]

SEGMENT_MAGIC = b"FOWAL\x00\x00\x01"  # "failover WAL", format version 1
_SEGMENT_NAME_RE = re.compile(r"^(\d{20})\.wal$")
# A segment must hold its header plus at least one small record; anything smaller is a typo.
_SEGMENT_BYTES_MIN = 256


def segment_name(first_index: int) -> str:
    """File name of the segment whose first record has ``first_index``."""
    return f"{first_index:020d}.wal"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    done = 0
    total = len(view)
    while done < total:
        done += os.write(fd, view[done:])


def _fsync_dir(path: str) -> None:
    # A created, renamed or deleted file is durable only once its directory is synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ShortRead(Exception):
    """A segment was shorter than the index says: truncated or deleted meanwhile."""


def _pread_exact(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
        if len(data) == size:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            more = os.pread(fd, size - got, offset + got)
            if not more:
                raise _ShortRead(path)
            parts.append(more)
            got += len(more)
        return b"".join(parts)
    finally:
        os.close(fd)


class _Segment:
    """One segment file and the in-memory index of its records."""

    __slots__ = ("first_index", "name", "offsets", "path", "size")

    def __init__(self, directory: str, first_index: int, offsets: array, size: int) -> None:
        self.first_index = first_index
        self.name = segment_name(first_index)
        self.path = os.path.join(directory, self.name)
        self.offsets = offsets  # file offset of each record, so reads seek directly
        self.size = size  # bytes of valid data, header included

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.offsets) - 1

    def end_of(self, k: int) -> int:
        """File offset just past the record at position ``k`` in this segment."""
        return self.offsets[k + 1] if k + 1 < len(self.offsets) else self.size
