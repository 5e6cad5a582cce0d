"""Durable write-ahead log: segment files of framed records, one directory per replica.

Directory layout::

    00000000000000000001.wal   segments, each named by the index of its first record
    epochs.meta                epoch history and compaction base, replaced atomically

A segment is an 8-byte magic header followed by records. A record is::

    <u32 LE body length> <u32 LE CRC32C of the body> <body>
    body = msgpack [epoch, index, request_id (bytes), payload (bytes)]

The same framing is what replication ships (``encode_records``/``read_records`` on the
primary, ``append_records`` on the duplica), so a shipped batch is written byte for byte.

Durability (``fsync_policy``):

* ``always``: every ``append`` writes and fsyncs before it returns.
* ``batch`` (group commit): appenders write under the lock, then wait for a shared fsync.
  One of them (the leader) fsyncs for everything written so far, with the lock released, so
  the others keep encoding and writing meanwhile; a follower whose bytes that fsync covered
  returns without an fsync of its own.
* ``never``: write only; the OS decides when the bytes reach the disk.

Appends from several threads are written in index order: a batch that arrives before its
predecessor waits for it (briefly, or while that predecessor is in flight), so a caller may
assign indexes under its own short lock and call ``append`` outside it.

Crash safety: a bad frame in the last segment with no whole, valid record of a later index
after it is a torn tail (an incomplete header, a short body, a zero-filled tail, a final
record failing its CRC): open cuts it off, syncs, and reports it in ``open_report``. Any
other bad frame (in an earlier segment, or followed by a valid record) is damage inside the
log: ``LogCorruptError`` naming the file and offset. A complete valid record is never cut.

The epoch history ``(epoch, first_index)`` lives in ``epochs.meta`` beside the segments,
written (temp file, fsync, rename, fsync dir) before the first entry of a new epoch and
before a compaction deletes anything. On open the records are the truth for the entries
present; the file supplies the history of entries compacted away.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import logging
import os
import re
import struct
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import add, itemgetter
from typing import Any, NamedTuple, NoReturn

import crc32c as _crc32c_module
import msgpack

from failover import defaults
from failover.errors import (
    ConfigError,
    DiskFullError,
    LogCorruptError,
    LogGapError,
    ShippedRecordsCorruptError,
    StorageError,
)

__all__ = [
    "META_NAME",
    "SEGMENT_MAGIC",
    "CheckedRecords",
    "Entry",
    "OpenReport",
    "WriteAheadLog",
    "check_records",
    "decode_records",
    "encode_records",
    "segment_name",
    "skip_records",
]

_log = logging.getLogger(__name__)

_crc32c = _crc32c_module.crc32c
_HEADER = struct.Struct("<II")
_HEADER_BYTES = _HEADER.size
SEGMENT_MAGIC = b"FOWAL\x00\x00\x01"  # "failover WAL", format version 1
_SEGMENT_NAME_RE = re.compile(r"^(\d{20})\.wal$")
META_NAME = "epochs.meta"
_META_TMP_NAME = META_NAME + ".tmp"
_META_MAGIC = b"FOWALM\x00\x01"
# A segment must hold its header plus at least one small record; anything smaller is a typo.
_SEGMENT_BYTES_MIN = 256
# An append whose first index is ahead of the log waits this long for the appends that fill
# the gap to show up (executor threads may start in any order), and at most the call
# deadline while such appends are in flight. A gap with nobody to fill it is a caller bug.
_TURN_GRACE_S = 0.05
_TURN_DEADLINE_S = defaults.CALL_DEADLINE_MS / 1000
# Reads copy bytes without holding the lock and retry when a truncate or compaction changed
# the files meanwhile; this many retries in a row means something is badly wrong.
_READ_RETRIES_MAX = 100

_field_epoch = itemgetter(0)
_field_index = itemgetter(1)
_field_request_id = itemgetter(2)
_field_payload = itemgetter(3)
_head_length = itemgetter(0)  # of a frame header (length, CRC32C)
_head_crc = itemgetter(1)
_unpackb = msgpack.unpackb
_unpackb_tuple = functools.partial(msgpack.unpackb, use_list=False)


class Entry(NamedTuple):
    """One log entry: written at ``index`` by the primary of ``epoch``.

    A tuple in field order is exactly the msgpack body of its record, so framing a batch
    packs the entries themselves, with no per-entry attribute access.
    """

    epoch: int
    index: int
    request_id: bytes  # b"" when none
    payload: bytes


@dataclass(frozen=True, slots=True)
class OpenReport:
    """What ``WriteAheadLog.open`` found and repaired."""

    torn_bytes_dropped: int  # bytes of a torn tail truncated on open (0 if none)
    torn_segment: str | None  # file name it was cut from
    entries: int  # entries held after open


def segment_name(first_index: int) -> str:
    """File name of the segment whose first record has ``first_index``."""
    return f"{first_index:020d}.wal"


# --- framing --------------------------------------------------------------------------------

_packers = threading.local()


def _packer() -> msgpack.Packer:
    # A Packer keeps an internal buffer, so each thread gets its own; reusing it is what
    # makes packing fast.
    try:
        return _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer()
        return packer


def _frame_rows(rows: list[tuple]) -> tuple[bytes, list[int]]:
    """Frames field tuples; returns the bytes and each record's body length.

    Every step is a C-level ``map`` over the batch and the result is one ``join``: per entry
    no Python bytecode runs, which is what keeps encoding below the cost of the fsync.
    """
    bodies = list(map(_packer().pack, rows))
    lengths = list(map(len, bodies))
    parts: list[bytes] = [b""] * (2 * len(bodies))
    parts[0::2] = map(_HEADER.pack, lengths, map(_crc32c, bodies))
    parts[1::2] = bodies
    return b"".join(parts), lengths


def encode_records(entries: Sequence[Entry]) -> bytes:
    """Frames ``entries`` exactly as the log stores them (and replication ships them)."""
    if not entries:
        return b""
    return _frame_rows(list(entries))[0]


class _Scan:
    """What one pass over framed bytes found."""

    __slots__ = ("changes", "next_index", "offsets", "problem", "prev_epoch", "stop")

    def __init__(self) -> None:
        self.offsets = array("Q")  # start of each valid record, relative to the buffer
        self.changes: list[tuple[int, int]] = []  # (epoch, index) where the epoch changed
        self.next_index = 0
        self.prev_epoch = -1
        self.stop = 0  # end of the last valid record
        # (offset, reason, may_be_torn): may_be_torn is False when the frame itself is whole
        # and checks out, so only a bug (never a crash) can have written it.
        self.problem: tuple[int, str, bool] | None = None


def _scan(
    buf: bytes | bytearray | memoryview,
    start: int,
    end: int,
    *,
    next_index: int,
    prev_epoch: int,
    check_order: bool,
    out: list[Entry] | None = None,
) -> _Scan:
    """Walks the frames in ``buf[start:end]``, checking each; stops at the first bad one.

    With ``check_order`` every record must carry ``next_index`` (then +1 each) and epochs
    must not go down from ``prev_epoch``. Decoded entries go to ``out`` when given.
    """
    result = _Scan()
    mv = memoryview(buf)
    unpack_header = _HEADER.unpack_from
    crc = _crc32c
    unpackb = msgpack.unpackb
    record_bytes_max = defaults.WAL_RECORD_BYTES_MAX
    offsets_append = result.offsets.append
    changes = result.changes
    pos = start
    problem = None
    while pos < end:
        if end - pos < _HEADER_BYTES:
            problem = (pos, f"incomplete record header ({end - pos} bytes)", True)
            break
        length, checksum = unpack_header(buf, pos)
        if length == 0:
            problem = (pos, "record length is zero", True)
            break
        if length > record_bytes_max:
            problem = (pos, f"record length {length} exceeds {record_bytes_max}", True)
            break
        body_end = pos + _HEADER_BYTES + length
        if body_end > end:
            problem = (pos, f"record of {length} bytes cut off after {end - pos - 8}", True)
            break
        body = mv[pos + _HEADER_BYTES : body_end]
        if crc(body) != checksum:
            problem = (pos, "CRC32C mismatch", True)
            break
        try:
            fields = unpackb(body)
        except Exception as exc:  # msgpack raises several types for bad input
            problem = (pos, f"record body is not valid msgpack ({exc})", False)
            break
        if type(fields) is not list or len(fields) != 4:
            problem = (pos, "record body is not [epoch, index, request_id, payload]", False)
            break
        epoch, index, request_id, payload = fields
        if type(epoch) is not int or type(index) is not int:
            problem = (pos, "record epoch or index is not an integer", False)
            break
        if check_order:
            if index != next_index:
                problem = (pos, f"record has index {index} where {next_index} was expected", False)
                break
            next_index += 1
            if epoch != prev_epoch:
                if epoch < prev_epoch:
                    problem = (pos, f"epoch goes down from {prev_epoch} to {epoch}", False)
                    break
                changes.append((epoch, index))
                prev_epoch = epoch
        if out is not None:
            out.append(Entry(epoch, index, request_id, payload))
        offsets_append(pos)
        pos = body_end
    result.next_index = next_index
    result.prev_epoch = prev_epoch
    result.stop = pos
    result.problem = problem
    return result


def _unpack_frames(data: bytes | memoryview,
                   unpack: Callable[[bytes], Any] = _unpackb,
                   ) -> tuple[list[tuple[int, int]], list] | None:
    """Every frame's header (length, CRC32C) and body decoded by `unpack`, with the
    per-record work done by C-level maps over the batch; None when a frame is off (a bad
    length, a partial frame at the end, a CRC mismatch, a body that is not msgpack).

    Only the walk from one frame header to the next runs bytecode per record.
    """
    end = len(data)
    heads: list[tuple[int, int]] = []
    append = heads.append
    unpack_header = _HEADER.unpack_from
    record_bytes_max = defaults.WAL_RECORD_BYTES_MAX
    pos = 0
    try:
        while pos < end:
            head = unpack_header(data, pos)
            append(head)
            length = head[0]
            if not 0 < length <= record_bytes_max:
                return None
            pos += _HEADER_BYTES + length
    except struct.error:  # an incomplete header at the end
        return None
    if pos != end or not heads:
        return None
    starts = list(accumulate(map(add, map(_head_length, heads), repeat(_HEADER_BYTES)),
                             initial=0))
    bodies = list(map(data.__getitem__,
                      map(slice, map(add, starts, repeat(_HEADER_BYTES)), starts[1:])))
    if list(map(_crc32c, bodies)) != list(map(_head_crc, heads)):
        return None
    try:
        return heads, list(map(unpack, bodies))
    except Exception:  # msgpack raises several types for bad input
        return None


class CheckedRecords(NamedTuple):
    """Shipped records that passed `check_records`, for `WriteAheadLog.append_records`."""

    first_index: int
    last_index: int
    lengths: list[int]  # each record's body length
    changes: list[tuple[int, int]]  # (epoch, first index) at the start and at each change
    # Each record's fields in `Entry` order, as plain tuples: the garbage collector stops
    # tracking a tuple of ints and bytes the first time it sees it, so these may be kept.
    fields: list[tuple[int, int, bytes, bytes]]


def check_records(records: bytes, first_index: int,
                  last_index: int) -> CheckedRecords | None:
    """Checks every record of a shipped batch as `_scan` with `check_order` does (frame,
    CRC32C, body [int epoch, int index, bytes request_id, bytes payload], indexes
    `first_index..last_index` in order, epochs never going down): a record that passed its
    CRC can still hold a body its primary never meant (a bug), and a duplica that logs it
    holds a log it cannot replay. None when anything is off (`append_records` then says
    where and why).

    Thread-safe and touching no log: a duplica runs it on a batch as soon as it arrives,
    while the batches before it are still being written and synced. The per-record work is
    C-level maps over the batch, as in `_decode_fast`.
    """
    unpacked = _unpack_frames(records, _unpackb_tuple)
    if unpacked is None:
        return None
    heads, fields = unpacked
    if set(map(type, fields)) != {tuple} or set(map(len, fields)) != {4}:
        return None
    epochs = list(map(_field_epoch, fields))
    indexes = list(map(_field_index, fields))
    if (
        indexes != list(range(first_index, last_index + 1))
        # Compared as numbers above, so check the types too: 5.0 == 5 and True == 1.
        or set(map(type, indexes)) != {int}
        or set(map(type, epochs)) != {int}
        or set(map(type, map(_field_request_id, fields))) != {bytes}
        or set(map(type, map(_field_payload, fields))) != {bytes}
    ):
        return None
    try:
        changes = _epoch_changes(epochs, first_index)
    except ValueError:  # epochs go down
        return None
    return CheckedRecords(first_index, last_index, list(map(_head_length, heads)), changes,
                          fields)


def _decode_fast(data: bytes | memoryview) -> list[Entry] | None:
    """Decodes framed records as ``_scan`` does with ``out`` and no order check, with the
    per-record work done by C-level maps over the batch; None when anything is off (a bad
    frame, a body of another shape), and then ``_scan`` finds where and why.

    This is the replay path, where decoding costs as much as applying.
    """
    unpacked = _unpack_frames(data)
    if unpacked is None:
        return None
    rows = unpacked[1]
    # Every body must be [int, int, request_id, payload]; then the rows become entries.
    if (
        set(map(type, rows)) != {list}
        or set(map(len, rows)) != {4}
        or set(map(type, map(_field_epoch, rows))) != {int}
        or set(map(type, map(_field_index, rows))) != {int}
    ):
        return None
    return list(map(tuple.__new__, repeat(Entry), rows))


def skip_records(data: bytes | memoryview, count: int, start: int = 0) -> int:
    """The offset just past `count` frames from `start` in `data` (its end, if it holds
    fewer): where to cut records already checked, to decode them a part at a time.

    Only the frames' lengths are read; `decode_records` checks the parts.
    """
    end = len(data)
    unpack_header = _HEADER.unpack_from
    pos = start
    while count > 0 and pos + _HEADER_BYTES <= end:
        pos += _HEADER_BYTES + unpack_header(data, pos)[0]
        count -= 1
    return min(pos, end) if count == 0 else end


def decode_records(data: bytes | memoryview, *, where: str = "<stream>") -> list[Entry]:
    """Decodes framed records, checking every frame (length bound, CRC32C, body shape).

    Raises ``LogCorruptError(where, offset, reason)`` on any bad frame, including a partial
    frame at the end.
    """
    if not len(data):
        return []
    fast = _decode_fast(data)
    if fast is not None:
        return fast
    out: list[Entry] = []
    scan = _scan(data, 0, len(data), next_index=0, prev_epoch=-1, check_order=False, out=out)
    if scan.problem is not None:
        offset, reason, _ = scan.problem
        raise LogCorruptError(where, offset, reason)
    return out


def _valid_record_follows(buf: bytes, after: int, end: int, indexes: tuple[int, ...]) -> bool:
    """True when a whole, valid record carrying one of ``indexes`` starts after ``after``.

    Decides torn tail versus corruption: a crash leaves garbage only in its last write, so
    a later record that checks out means the bad frame is damage inside the log. Every body
    starts with 0x94 (a 4-element msgpack array), so only those positions are tried.
    """
    unpack_header = _HEADER.unpack_from
    record_bytes_max = defaults.WAL_RECORD_BYTES_MAX
    mv = memoryview(buf)
    at = buf.find(b"\x94", after + 1 + _HEADER_BYTES, end)
    while at >= 0:
        pos = at - _HEADER_BYTES
        length, checksum = unpack_header(buf, pos)
        body_end = at + length
        if 0 < length <= record_bytes_max and body_end <= end:
            body = mv[at:body_end]
            if _crc32c(body) == checksum:
                try:
                    fields = msgpack.unpackb(body)
                except Exception:  # not a record after all
                    fields = None
                if type(fields) is list and len(fields) == 4 and fields[1] in indexes:
                    return True
        at = buf.find(b"\x94", at + 1, end)
    return False


# --- file helpers ---------------------------------------------------------------------------


def _record_starts(lengths: list[int], base: int) -> array:
    """File offsets of records with these body lengths written at ``base``, plus the end."""
    return array("Q", accumulate(map(add, lengths, repeat(_HEADER_BYTES)), initial=base))


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


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return DiskFullError(
            f"no space left on the device while {what}: nothing was written, the log is "
            "unchanged; free space in the data dir, then retry"
        )
    return StorageError(f"I/O error while {what}: {exc}; the log is unchanged")


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


# --- the log --------------------------------------------------------------------------------


class WriteAheadLog:
    """A replica's write-ahead log. Every method is thread-safe.

    Create one with ``WriteAheadLog.open``. Public state (read-only): ``first_index``,
    ``last_index``, ``last_epoch``, ``durable_index``, ``epoch_history``, ``open_report``,
    ``fsync_policy``.
    """

    open_report: OpenReport
    fsync_policy: str

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        *,
        fsync_policy: str = defaults.WAL_FSYNC_POLICY,
        segment_bytes_max: int = defaults.WAL_SEGMENT_BYTES_MAX,
    ) -> WriteAheadLog:
        """Opens (or creates) the log in ``directory``, repairing a torn tail.

        Raises ``ConfigError`` for a bad policy or segment size (before any I/O),
        ``LogCorruptError`` when a record other than the torn tail fails its check.
        """
        if fsync_policy not in defaults.WAL_FSYNC_POLICIES:
            raise ConfigError(
                f"unknown WAL fsync policy {fsync_policy!r}: use one of "
                + ", ".join(defaults.WAL_FSYNC_POLICIES)
            )
        if (
            isinstance(segment_bytes_max, bool)
            or not isinstance(segment_bytes_max, int)
            or segment_bytes_max < _SEGMENT_BYTES_MIN
        ):
            raise ConfigError(
                f"WAL segment_bytes_max={segment_bytes_max!r} is too small: use an integer of "
                f"at least {_SEGMENT_BYTES_MIN} (default {defaults.WAL_SEGMENT_BYTES_MAX})"
            )
        log = cls.__new__(cls)
        log._init(os.fspath(directory), fsync_policy, segment_bytes_max)
        return log

    def _init(self, directory: str, fsync_policy: str, segment_bytes_max: int) -> None:
        self.directory = directory
        self.fsync_policy = fsync_policy
        self._segment_bytes_max = segment_bytes_max
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._segments: list[_Segment] = []
        self._segment_firsts: list[int] = []  # first_index of each segment, for bisect
        self._fd: int | None = None  # the last segment, open for appending
        self._base_index = 0  # compaction base: the snapshot's last index
        self._base_epoch = 0
        self._history: list[tuple[int, int]] = []  # (epoch, first_index), oldest first
        self._history_starts: list[int] = []
        self._last_index = 0
        self._last_epoch = 0
        self._durable_index = 0
        # First index -> number of appends registered but not yet written (encoding or
        # queued): an append ahead of the log waits only if one of them can fill the gap.
        self._inflight: dict[int, int] = {}
        self._syncing = False  # a group-commit leader is in fsync
        self._gen = 0  # bumped when entries are dropped: waiters for them stop waiting
        self._layout_gen = 0  # bumped when files shrink or vanish: readers retry
        self._sync_failures = 0
        self._sync_error: StorageError | None = None
        self._broken: StorageError | None = None
        self._closed = False
        os.makedirs(directory, exist_ok=True)
        self._load()

    # -- opening -----------------------------------------------------------------------------

    def _load(self) -> None:
        directory = self.directory
        with contextlib.suppress(FileNotFoundError):  # left by an interrupted meta write
            os.unlink(os.path.join(directory, _META_TMP_NAME))
        meta = self._read_meta()
        if meta is not None:
            self._base_index, self._base_epoch, file_history = meta
        else:
            file_history = []
        base = self._base_index
        firsts = sorted(
            int(m.group(1)) for m in map(_SEGMENT_NAME_RE.match, os.listdir(directory)) if m
        )
        if meta is None and firsts and firsts[0] > 1:
            raise LogCorruptError(
                os.path.join(directory, META_NAME),
                0,
                f"the epoch history file is missing but the log starts at index {firsts[0]}",
            )
        removed = False
        # A compaction writes its base first, then deletes: finish an interrupted one.
        while len(firsts) >= 2 and firsts[1] - 1 <= base:
            os.unlink(os.path.join(directory, segment_name(firsts.pop(0))))
            removed = True

        torn_bytes = 0
        torn_segment: str | None = None
        changes: list[tuple[int, int]] = []
        prev_epoch = -1
        expected: int | None = None
        for i, first in enumerate(firsts):
            is_last = i == len(firsts) - 1
            path = os.path.join(directory, segment_name(first))
            with open(path, "rb") as f:
                data = f.read()
            if len(data) < len(SEGMENT_MAGIC) and is_last and SEGMENT_MAGIC.startswith(data):
                # Torn while the segment was being created: nothing of it was ever written.
                torn_bytes, torn_segment = len(data), segment_name(first)
                _log.warning("write-ahead log: removing torn new segment %s", path)
                os.unlink(path)
                removed = True
                break
            if data[: len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
                raise LogCorruptError(path, 0, "not a write-ahead log segment (bad magic)")
            if expected is None:
                if first > base + 1:
                    raise LogCorruptError(
                        path, 0, f"entries {base + 1}..{first - 1} are missing before it"
                    )
            elif first != expected:
                raise LogCorruptError(
                    path, 0, f"segment starts at index {first} but {expected} was expected"
                )
            scan = _scan(
                data,
                len(SEGMENT_MAGIC),
                len(data),
                next_index=first,
                prev_epoch=prev_epoch,
                check_order=True,
            )
            size = len(data)
            if scan.problem is not None:
                offset, reason, may_be_torn = scan.problem
                if not (
                    is_last
                    and may_be_torn
                    and not _valid_record_follows(
                        data, offset, len(data), (scan.next_index, scan.next_index + 1)
                    )
                ):
                    raise LogCorruptError(path, offset, reason)
                torn_bytes, torn_segment = size - offset, segment_name(first)
                _log.warning(
                    "write-ahead log: cutting a torn tail of %d bytes off %s at offset %d (%s)",
                    torn_bytes,
                    path,
                    offset,
                    reason,
                )
                fd = os.open(path, os.O_RDWR)
                try:
                    os.ftruncate(fd, offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                size = offset
            if not scan.offsets and not is_last:
                raise LogCorruptError(path, len(SEGMENT_MAGIC), "segment holds no records")
            changes.extend(scan.changes)
            prev_epoch = scan.prev_epoch
            expected = scan.next_index
            self._segments.append(_Segment(directory, first, scan.offsets, size))

        # Segments wholly inside the compaction base (an interrupted compaction, or a
        # header-only segment left by a torn first write) are not part of the log.
        while self._segments and self._segments[0].last_index <= base:
            os.unlink(self._segments.pop(0).path)
            removed = True
        if removed:
            _fsync_dir(directory)
        self._segment_firsts = [s.first_index for s in self._segments]

        held_first = self._segments[0].first_index if self._segments else base + 1
        held_last = self._segments[-1].last_index if self._segments else base
        if held_last >= held_first:
            # The records are the truth for the entries present; the file only supplies the
            # epochs of entries that compaction removed.
            kept = [h for h in file_history if h[1] < held_first]
            while kept and kept[-1][0] > changes[0][0]:
                kept.pop()
            if kept and kept[-1][0] == changes[0][0]:
                changes = changes[1:]
            self._set_history(kept + changes)
            self._last_epoch = self._history[-1][0]
        else:
            self._set_history([h for h in file_history if h[1] <= base])
            self._last_epoch = self._base_epoch
        self._last_index = held_last
        if self._segments:
            self._fd = os.open(self._segments[-1].path, os.O_RDWR | os.O_APPEND)
            if self.fsync_policy != "never":
                os.fsync(self._fd)  # what a crashed process left in the page cache
        self._durable_index = held_last
        self.open_report = OpenReport(
            torn_bytes_dropped=torn_bytes,
            torn_segment=torn_segment,
            entries=max(0, held_last - held_first + 1),
        )

    def _read_meta(self) -> tuple[int, int, list[tuple[int, int]]] | None:
        path = os.path.join(self.directory, META_NAME)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        start = len(_META_MAGIC) + _HEADER_BYTES
        if len(data) < start or data[: len(_META_MAGIC)] != _META_MAGIC:
            raise LogCorruptError(path, 0, "not an epoch history file (bad magic)")
        length, checksum = _HEADER.unpack_from(data, len(_META_MAGIC))
        body = data[start : start + length]
        if len(body) != length or _crc32c(body) != checksum:
            raise LogCorruptError(path, len(_META_MAGIC), "epoch history fails its CRC32C")
        try:
            meta = msgpack.unpackb(body)
            history = [(int(e), int(i)) for e, i in meta["history"]]
            return int(meta["base_index"]), int(meta["base_epoch"]), history
        except Exception as exc:  # any shape error means the same: unusable file
            raise LogCorruptError(path, start, f"epoch history is malformed ({exc})") from exc

    def _write_meta(self, base_index: int, base_epoch: int, history: list) -> None:
        """Replaces the epoch history file atomically and durably (temp, fsync, rename)."""
        body = msgpack.packb(
            {
                "version": 1,
                "base_index": base_index,
                "base_epoch": base_epoch,
                "history": [list(h) for h in history],
            }
        )
        data = _META_MAGIC + _HEADER.pack(len(body), _crc32c(body)) + body
        tmp = os.path.join(self.directory, _META_TMP_NAME)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(self.directory, META_NAME))
            _fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _storage_error(exc, "writing the epoch history") from exc

    def _set_history(self, history: list[tuple[int, int]]) -> None:
        self._history = history
        self._history_starts = [h[1] for h in history]

    # -- state -------------------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        """First index held: 1 for a new log, compaction base + 1 after full compaction."""
        with self._lock:
            return self._first_index_locked()

    def _first_index_locked(self) -> int:
        return self._segments[0].first_index if self._segments else self._base_index + 1

    @property
    def last_index(self) -> int:
        """Index of the last entry written; the compaction base when none is held."""
        with self._lock:
            return self._last_index

    @property
    def last_epoch(self) -> int:
        """Epoch of the last entry (or of the compaction base); 0 for a new log."""
        with self._lock:
            return self._last_epoch

    @property
    def durable_index(self) -> int:
        """Highest index whose ``append`` has satisfied the fsync policy."""
        with self._lock:
            return self._durable_index

    @property
    def epoch_history(self) -> list[tuple[int, int]]:
        """``(epoch, first_index)`` of every epoch the log has seen, oldest first (a copy)."""
        with self._lock:
            return list(self._history)

    def _check_open_locked(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise StorageError(f"write-ahead log {self.directory} is closed")

    def _epoch_from_history(self, index: int) -> int:
        i = bisect.bisect_right(self._history_starts, index) - 1
        return self._history[i][0] if i >= 0 else self._base_epoch

    # -- appending ---------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> int:
        """Appends ``entries`` and returns the index of the last one, once durable by policy.

        Entries must have consecutive indexes starting at ``last_index + 1`` and epochs that
        never go down (nor below ``last_epoch``); otherwise ``ValueError``. Threads may call
        this concurrently with batches for consecutive index ranges: they are written in
        index order (a batch arriving before its predecessor waits briefly for it).
        Raises ``DiskFullError`` when the disk is full; the log is then unchanged.
        """
        count = len(entries)
        if count == 0:
            with self._lock:
                self._check_open_locked()
                return self._last_index
        rows = entries if isinstance(entries, list) else list(entries)
        first = rows[0][1]
        if list(map(_field_index, rows)) != list(range(first, first + count)):
            raise ValueError(
                f"entries to append must have consecutive indexes: batch starts at {first!r} "
                f"but its indexes are not {first!r}..{first + count - 1!r}"
            )
        epochs = list(map(_field_epoch, rows))
        changes = _epoch_changes(epochs, first)
        with self._lock:
            self._check_open_locked()
            self._register_locked(first)
        try:
            # Encoding runs outside the lock so it overlaps other threads' writes and fsyncs.
            blob, lengths = _frame_rows(rows)
        except BaseException:
            with self._lock:
                self._unregister_locked(first)
            raise
        return self._append_framed(blob, lengths, first, count, changes)

    def append_records(
        self,
        records: bytes,
        first_index: int,
        last_index: int,
        out: list[tuple[int, int, bytes, bytes]] | None = None,
        *,
        epoch_max: int | None = None,
        checked: CheckedRecords | None = None,
    ) -> int:
        """Appends pre-framed records (another replica's ``read_records``) byte for byte.

        Every record is checked (`check_records`: frame, CRC32C, body shape, consecutive
        indexes ``first_index..last_index``, epoch order), and no epoch may pass
        ``epoch_max`` (the shipping primary's own), before anything is written: on a bad
        record ``ShippedRecordsCorruptError`` and the log is untouched. ``checked`` is
        `check_records`' result for these same records when the caller already has it.
        The records' fields are added to ``out`` when given (plain tuples in ``Entry``
        order). ``first_index`` must be ``last_index + 1`` of this log, else ``ValueError``
        (as for ``append``).
        """
        if last_index < first_index:
            if records:
                raise ShippedRecordsCorruptError(0, "records given for an empty index range")
            with self._lock:
                self._check_open_locked()
                return self._last_index
        if checked is None:
            checked = check_records(records, first_index, last_index)
            if checked is None:
                self._raise_why_refused(records, first_index, last_index)
        assert (checked.first_index, checked.last_index) == (first_index, last_index), (
            "checked records are not these", checked.first_index, first_index)
        changes = checked.changes
        if epoch_max is not None and changes[-1][0] > epoch_max:
            raise ShippedRecordsCorruptError(
                0, f"a record of epoch {changes[-1][0]} came from the primary of "
                f"epoch {epoch_max}: a primary ships no entry of a later epoch")
        if out is not None:
            out.extend(checked.fields)
        with self._lock:
            self._check_open_locked()
            self._register_locked(first_index)
        return self._append_framed(
            records, checked.lengths, first_index, last_index - first_index + 1, changes
        )

    @staticmethod
    def _raise_why_refused(records: bytes, first_index: int, last_index: int) -> NoReturn:
        """`check_records` refused these records: the record-by-record scan says where and
        why."""
        scan = _scan(records, 0, len(records), next_index=first_index, prev_epoch=-1,
                     check_order=True)
        if scan.problem is not None:
            offset, reason, _ = scan.problem
            raise ShippedRecordsCorruptError(offset, reason)
        if scan.next_index - 1 != last_index:
            raise ShippedRecordsCorruptError(
                len(records),
                f"records hold indexes {first_index}..{scan.next_index - 1} but the batch "
                f"claimed {first_index}..{last_index}",
            )
        # The one check `_scan` leaves out (it runs on every open, where each one costs).
        raise ShippedRecordsCorruptError(0, "a record's request_id or payload is not bytes")

    def _append_framed(
        self,
        blob: bytes,
        lengths: list[int],
        first: int,
        count: int,
        changes: list[tuple[int, int]],
    ) -> int:
        """Writes framed records in index order, then waits until durable by policy.

        The caller registered ``first`` in ``_inflight``; this unregisters it.
        """
        last = first + count - 1
        with self._lock:
            try:
                self._await_turn_locked(first)
                if changes[0][0] < self._last_epoch:
                    raise ValueError(
                        f"entry {first} has epoch {changes[0][0]}, below the log's last epoch "
                        f"{self._last_epoch}: epochs never go down (truncate first)"
                    )
                self._write_entries_locked(blob, lengths, first, count, changes)
            finally:
                self._unregister_locked(first)
            if self.fsync_policy == "batch":
                self._await_durable_locked(last)
        return last

    def _register_locked(self, first: int) -> None:
        self._inflight[first] = self._inflight.get(first, 0) + 1

    def _unregister_locked(self, first: int) -> None:
        left = self._inflight[first] - 1
        if left:
            self._inflight[first] = left
        else:
            del self._inflight[first]
        self._cond.notify_all()

    def _await_turn_locked(self, first: int) -> None:
        """Waits until ``first`` is the next index (earlier batches written), bounded."""
        grace_end = None
        while True:
            self._check_open_locked()
            expected = self._last_index + 1
            if first == expected:
                return
            if first < expected:
                raise ValueError(
                    f"cannot append at index {first}: the log already holds up to "
                    f"{expected - 1}; the next entry must have index {expected}"
                )
            now = time.monotonic()
            if grace_end is None:
                grace_end = now + _TURN_GRACE_S
                hard_end = now + _TURN_DEADLINE_S
            # Wait longer only while the append that comes next is in flight.
            end = hard_end if expected in self._inflight else grace_end
            if now >= end:
                raise ValueError(
                    f"cannot append at index {first}: the log ends at {expected - 1}, so the "
                    f"next entry must have index {expected} (entries must be contiguous)"
                )
            self._cond.wait(end - now)

    def _write_entries_locked(
        self,
        blob: bytes,
        lengths: list[int],
        first: int,
        count: int,
        changes: list[tuple[int, int]],
    ) -> None:
        history = self._history
        added = changes if not history or changes[0][0] != history[-1][0] else changes[1:]
        if added:
            # The history is durable before the first entry of a new epoch is written.
            self._write_meta(self._base_index, self._base_epoch, history + added)
            self._set_history(history + added)
        try:
            synced_to = self._write_frames_locked(blob, lengths, first)
        except BaseException:
            if added:
                self._set_history(history)  # the file's extra entry is dropped on open
            raise
        last = first + count - 1
        self._last_index = last
        self._last_epoch = changes[-1][0]
        if self.fsync_policy != "batch":
            self._durable_index = last
        elif synced_to > self._durable_index:
            self._durable_index = synced_to

    def _write_frames_locked(self, blob: bytes, lengths: list[int], first: int) -> int:
        """Writes records (body ``lengths``) to the active segment, rolling when it is full.

        One ``write`` per segment touched (normally one). Nothing in memory changes until
        every write (and, for ``always``, the fsync) succeeded; on failure the files are cut
        back to where they were. Returns the last index made durable by a roll's fsync.
        """
        seg = self._segments[-1] if self._segments else None
        if seg is not None and seg.size + len(blob) <= self._segment_bytes_max:
            # The usual case: the whole batch fits in the active segment.
            starts = _record_starts(lengths, seg.size)
            try:
                _write_all(self._fd, blob)
                if self.fsync_policy == "always":
                    os.fsync(self._fd)
            except BaseException as exc:
                self._undo_write_locked([], seg.size)
                if isinstance(exc, OSError):
                    raise _storage_error(exc, f"appending entries from index {first}") from exc
                raise
            seg.size = starts.pop()
            seg.offsets.extend(starts)
            return 0
        return self._write_rolling_locked(blob, lengths, first)

    def _write_rolling_locked(self, blob: bytes, lengths: list[int], first: int) -> int:
        count = len(lengths)
        starts = _record_starts(lengths, 0)  # offset of each record in blob, then the end
        view = memoryview(blob)
        limit = self._segment_bytes_max
        seg = self._segments[-1] if self._segments else None
        fd = self._fd
        orig_size = seg.size if seg is not None else 0
        seg_size = orig_size
        seg_records = len(seg.offsets) if seg is not None else 0
        created: list[tuple[_Segment, int]] = []
        pending: list[tuple[_Segment, array, int]] = []  # (segment, new offsets, new size)
        synced_to = 0
        k = 0
        try:
            while k < count:
                if seg is None:
                    seg = _Segment(self.directory, first + k, array("Q"), 0)
                    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL
                    fd = os.open(seg.path, flags, 0o644)
                    created.append((seg, fd))
                    if self.fsync_policy != "never":
                        _fsync_dir(self.directory)
                    seg_size = seg_records = 0
                head = SEGMENT_MAGIC if seg_size == 0 else b""
                room = limit - seg_size - len(head)
                # Records k..j-1 fit in this segment.
                j = bisect.bisect_right(starts, starts[k] + room, k + 1, count + 1) - 1
                if j == k:
                    if seg_records == 0:
                        j = k + 1  # an oversized record gets a segment of its own
                    else:
                        # Roll. The full segment is synced first (whatever the policy), so a
                        # later segment never exists on disk beside an incomplete earlier one,
                        # and a group-commit leader only ever has to sync the last segment.
                        os.fsync(fd)
                        synced_to = seg.first_index + seg_records - 1
                        seg = None
                        continue
                chunk = view[starts[k] : starts[j]]
                _write_all(fd, head + chunk if head else chunk)
                shift = seg_size + len(head) - starts[k]
                seg_size += len(head) + starts[j] - starts[k]
                offsets = array("Q", map(add, starts[k:j], repeat(shift)))
                pending.append((seg, offsets, seg_size))
                seg_records += j - k
                k = j
            if self.fsync_policy == "always":
                os.fsync(fd)
        except BaseException as exc:
            self._undo_write_locked(created, orig_size)
            if isinstance(exc, OSError):
                raise _storage_error(exc, f"appending entries from index {first}") from exc
            raise
        for segment, offsets, size in pending:
            segment.offsets.extend(offsets)
            segment.size = size
        if created:
            if self._fd is not None:
                os.close(self._fd)
            for segment, new_fd in created[:-1]:
                os.close(new_fd)
                self._segments.append(segment)
                self._segment_firsts.append(segment.first_index)
            segment, self._fd = created[-1]
            self._segments.append(segment)
            self._segment_firsts.append(segment.first_index)
        return synced_to

    def _undo_write_locked(self, created: list[tuple[_Segment, int]], orig_size: int) -> None:
        """Cuts the files back to their state before a failed write."""
        try:
            for segment, fd in created:
                os.close(fd)
                os.unlink(segment.path)
            if self._fd is not None:
                os.ftruncate(self._fd, orig_size)
        except OSError as exc:
            self._broken = StorageError(
                f"write-ahead log {self.directory}: a failed append could not be undone "
                f"({exc}); reopen the log (its open repairs the tail)"
            )
            _log.error("%s", self._broken)

    # -- group commit ------------------------------------------------------------------------

    def _await_durable_locked(self, target: int) -> None:
        """Returns once ``target`` is durable: leads an fsync or waits for the leader's."""
        gen = self._gen
        failures = self._sync_failures
        while self._durable_index < target:
            if self._gen != gen:
                if self._sync_failures != failures and self._sync_error is not None:
                    raise self._sync_error
                return  # a truncate dropped these entries meanwhile (and synced the rest)
            self._check_open_locked()
            if self._syncing:
                self._cond.wait()
            else:
                self._lead_sync_locked()

    def _lead_sync_locked(self) -> None:
        """Fsyncs everything written so far, with the lock released during the fsync."""
        self._syncing = True
        target = self._last_index
        gen = self._gen
        error: OSError | None = None
        try:
            # A duplicate, so that a truncate or roll closing the segment's descriptor
            # meanwhile cannot make this fsync hit whatever file reuses the number.
            fd = os.dup(self._fd) if self._fd is not None else None
        except OSError as exc:
            fd, error = None, exc
        if fd is None and error is None:
            # No segment file: nothing beyond the compaction base is written, nothing to sync.
            self._durable_index = max(self._durable_index, self._last_index)
        if fd is not None:
            self._lock.release()
            try:
                os.fsync(fd)
            except OSError as exc:
                error = exc
            finally:
                os.close(fd)
                self._lock.acquire()
        self._syncing = False
        try:
            if error is None:
                if self._gen == gen and target > self._durable_index:
                    self._durable_index = target
            else:
                self._fail_unsynced_locked(error)
        finally:
            self._cond.notify_all()

    def _fail_unsynced_locked(self, error: OSError) -> None:
        # After a failed fsync the kernel may have dropped the dirty pages, so the unsynced
        # entries cannot be trusted: drop them from the file and fail their appends.
        durable = self._durable_index
        dropped = self._last_index - durable
        what = f"syncing the log ({dropped} unsynced entries after index {durable} dropped)"
        failure = _storage_error(error, what)
        self._sync_failures += 1
        self._sync_error = failure
        try:
            self._truncate_locked(max(durable, self._first_index_locked() - 1))
        except (OSError, StorageError) as exc:
            self._broken = StorageError(
                f"write-ahead log {self.directory}: fsync failed ({error}) and the unsynced "
                f"tail could not be dropped ({exc}); reopen the log"
            )
        raise failure from error

    def sync(self) -> None:
        """Fsyncs everything written so far (whatever the policy)."""
        with self._lock:
            self._check_open_locked()
            while self._syncing:
                self._cond.wait()
                self._check_open_locked()
            self._lead_sync_locked()

    # -- reading -----------------------------------------------------------------------------

    def read(self, first: int, last: int) -> list[Entry]:
        """Entries ``first..last`` (inclusive); ``LogGapError`` outside the held range."""
        if last < first:
            return []
        spans = self._read_spans(first, last, None, None)[0]
        out: list[Entry] = []
        for path, start, data in spans:
            fast = _decode_fast(data)
            if fast is not None:
                out += fast
                continue
            scan = _scan(
                data, 0, len(data), next_index=0, prev_epoch=-1, check_order=False, out=out
            )
            if scan.problem is not None:
                offset, reason, _ = scan.problem
                raise LogCorruptError(path, start + offset, reason)
        return out

    def read_records(
        self, first: int, *, entries_max: int, bytes_max: int
    ) -> tuple[bytes, int, int]:
        """Raw framed records from ``first`` on, for shipping: ``(records, first, last)``.

        At most ``entries_max`` entries and ``bytes_max`` bytes, but always at least one
        entry. ``LogGapError`` if ``first`` was compacted away; ``(b"", first, first - 1)``
        when nothing at or after ``first`` is held yet. The bytes are not re-checked here:
        ``append_records`` on the receiving side checks every frame.
        """
        if entries_max < 1 or bytes_max < 1:
            raise ValueError(
                f"entries_max and bytes_max must be at least 1, got {entries_max}, {bytes_max}"
            )
        spans, last = self._read_spans(first, None, entries_max, bytes_max)
        if not spans:
            return b"", first, first - 1
        if len(spans) == 1:
            return spans[0][2], first, last
        return b"".join(span[2] for span in spans), first, last

    def _read_spans(
        self, first: int, last: int | None, entries_max: int | None, bytes_max: int | None
    ) -> tuple[list[tuple[str, int, bytes]], int]:
        """Copies the records ``first..last`` (or as many as the limits allow) from disk.

        The plan is made under the lock, the copy without it (so appenders are not held up),
        and a truncate or compaction meanwhile makes it start over.
        """
        for _ in range(_READ_RETRIES_MAX):
            with self._lock:
                self._check_open_locked()
                held_first = self._first_index_locked()
                if first < held_first:
                    raise LogGapError(
                        f"index {first} is not in the log: it was compacted (the log holds "
                        f"{held_first}..{self._last_index}); install a snapshot instead"
                    )
                if last is None:
                    if first > self._last_index:
                        return [], first - 1
                    plan, last_planned = self._plan_limited_locked(first, entries_max, bytes_max)
                else:
                    if last > self._last_index:
                        raise LogGapError(
                            f"indexes {first}..{last} are not all in the log: it holds "
                            f"{held_first}..{self._last_index}"
                        )
                    plan, last_planned = self._plan_locked(first, last), last
                layout_gen = self._layout_gen
            try:
                spans = [(path, a, _pread_exact(path, a, b - a)) for path, a, b in plan]
            except (FileNotFoundError, _ShortRead):
                spans = None
            with self._lock:
                if self._layout_gen == layout_gen:
                    if spans is None:
                        raise LogCorruptError(
                            plan[0][0], plan[0][1], "segment file changed outside this process"
                        )
                    return spans, last_planned
        raise StorageError(
            f"write-ahead log {self.directory}: reads kept racing truncations; retry later"
        )

    def _plan_locked(self, first: int, last: int) -> list[tuple[str, int, int]]:
        plan = []
        i = bisect.bisect_right(self._segment_firsts, first) - 1
        index = first
        while index <= last:
            seg = self._segments[i]
            k0 = index - seg.first_index
            upto = min(last, seg.last_index)
            k1 = upto - seg.first_index
            plan.append((seg.path, seg.offsets[k0], seg.end_of(k1)))
            index = upto + 1
            i += 1
        return plan

    def _plan_limited_locked(
        self, first: int, entries_max: int, bytes_max: int
    ) -> tuple[list[tuple[str, int, int]], int]:
        plan = []
        entries_left = min(entries_max, self._last_index - first + 1)
        bytes_left = bytes_max
        i = bisect.bisect_right(self._segment_firsts, first) - 1
        index = first
        while entries_left > 0 and i < len(self._segments):
            seg = self._segments[i]
            offsets = seg.offsets
            k0 = index - seg.first_index
            k_end = min(len(offsets), k0 + entries_left)  # one past the last candidate
            start = offsets[k0]
            # Records k0..k-1 fit while the end of k-1 (the start of k) is within budget.
            limit = start + bytes_left
            k = bisect.bisect_right(offsets, limit, k0 + 1, k_end) - 1
            if k == k_end - 1 and seg.end_of(k) <= limit:
                k += 1
            if k <= k0:
                if plan:
                    break  # budget spent
                k = k0 + 1  # always ship at least one entry, however large
            end = seg.end_of(k - 1)
            plan.append((seg.path, start, end))
            taken = k - k0
            entries_left -= taken
            bytes_left -= end - start
            index += taken
            if k < len(offsets) or bytes_left <= 0:
                break
            i += 1
        return plan, index - 1

    def epoch_at(self, index: int) -> int:
        """Epoch of the entry at ``index``; also valid for the compaction base index.

        ``LogGapError`` for any other index not held.
        """
        with self._lock:
            self._check_open_locked()
            if index == self._base_index:
                return self._base_epoch
            held_first = self._first_index_locked()
            if held_first <= index <= self._last_index:
                return self._epoch_from_history(index)
            raise LogGapError(
                f"no epoch known for index {index}: the log holds {held_first}.."
                f"{self._last_index} (compaction base {self._base_index})"
            )

    # -- truncation and compaction -----------------------------------------------------------

    def truncate_after(self, index: int) -> int:
        """Drops every entry after ``index``; returns how many were dropped.

        Durable (fsynced) before it returns; the epoch history is trimmed to match.
        ``LogGapError`` when ``index < first_index - 1`` (those entries were compacted).
        """
        with self._lock:
            self._check_open_locked()
            if index >= self._last_index:
                return 0
            held_first = self._first_index_locked()
            if index < held_first - 1:
                raise LogGapError(
                    f"cannot truncate after index {index}: entries up to {held_first - 1} were "
                    "compacted into a snapshot; install a snapshot instead"
                )
            dropped = self._last_index - index
            try:
                self._truncate_locked(index)
            except OSError as exc:
                self._broken = StorageError(
                    f"write-ahead log {self.directory}: truncation after {index} failed "
                    f"({exc}); reopen the log"
                )
                raise self._broken from exc
            return dropped

    def _truncate_locked(self, index: int) -> None:
        history = [h for h in self._history if h[1] <= index]
        base_index, base_epoch = self._base_index, self._base_epoch
        if index < base_index:
            # The snapshot base lies in the dropped suffix: the log now ends before it.
            base_index, base_epoch = index, self._epoch_from_history(index) if index else 0
        last_epoch = base_epoch if index == base_index else history[-1][0]
        if history != self._history or base_index != self._base_index:
            # Written first: an interrupted truncation then leaves the records beyond, which
            # open reconciles (records win), never a base beyond the records.
            self._write_meta(base_index, base_epoch, history)
        removed = False
        while self._segments and self._segments[-1].first_index > index:
            seg = self._segments.pop()
            self._segment_firsts.pop()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.unlink(seg.path)
            removed = True
        if self._segments:
            seg = self._segments[-1]
            if self._fd is None:
                self._fd = os.open(seg.path, os.O_RDWR | os.O_APPEND)
            keep = index - seg.first_index + 1
            if keep < len(seg.offsets):
                cut = seg.offsets[keep]
                os.ftruncate(self._fd, cut)
                del seg.offsets[keep:]
                seg.size = cut
            os.fsync(self._fd)
        if removed:
            _fsync_dir(self.directory)
        self._base_index, self._base_epoch = base_index, base_epoch
        self._set_history(history)
        self._last_index = index
        self._last_epoch = last_epoch
        self._durable_index = index  # the fsync above covered everything left
        self._gen += 1
        self._layout_gen += 1
        self._cond.notify_all()

    def compact(self, snapshot_index: int, snapshot_epoch: int,
                snapshot_history: Sequence[tuple[int, int]] | None = None) -> int:
        """Drops whole segments whose entries are all ``<= snapshot_index``.

        ``(snapshot_index, snapshot_epoch)`` becomes the base, so ``epoch_at(base)`` keeps
        working for divergence checks. ``snapshot_index`` may lie beyond ``last_index`` (a
        replica that installed a snapshot): the log is then empty and the next append must
        be ``snapshot_index + 1``; `snapshot_history`, the epoch history of the log the
        snapshot was taken from, then becomes this log's history up to the base (without it,
        the snapshot's epoch is recorded as starting at the base). Returns the new
        ``first_index``.
        """
        if snapshot_index < 0 or snapshot_epoch < 0:
            raise ValueError(f"bad snapshot position ({snapshot_index}, {snapshot_epoch})")
        with self._lock:
            self._check_open_locked()
            if snapshot_index <= self._base_index:
                return self._first_index_locked()  # already compacted that far
            history = self._history
            if snapshot_index <= self._last_index:
                held = self._epoch_from_history(snapshot_index)
                if held != snapshot_epoch:
                    raise ValueError(
                        f"snapshot at index {snapshot_index} claims epoch {snapshot_epoch} but "
                        f"the log holds epoch {held} there"
                    )
            else:
                # Installed snapshot: an epoch's start is the same on every replica that has
                # any of its entries, so starts up to the snapshot's epoch stay true; later
                # epochs of this log were on a diverged branch. If the snapshot's epoch is
                # new here, it is recorded as starting at the base (it started at or before).
                if snapshot_history:
                    # The source's history is the truth up to the snapshot: who wrote what.
                    history = [(int(e), int(i)) for e, i in snapshot_history
                               if i <= snapshot_index]
                else:
                    history = [h for h in history
                               if h[0] <= snapshot_epoch and h[1] <= snapshot_index]
                if not history or history[-1][0] != snapshot_epoch:
                    history.append((snapshot_epoch, snapshot_index))
            # The base is durable before any segment goes, so a crash in between leaves
            # segments that open recognises as compacted, never a gap.
            self._write_meta(snapshot_index, snapshot_epoch, history)
            removed = False
            try:
                while self._segments and (
                    (
                        self._segments[1].first_index - 1
                        if len(self._segments) > 1
                        else self._segments[0].last_index
                    )
                    <= snapshot_index
                ):
                    seg = self._segments.pop(0)
                    self._segment_firsts.pop(0)
                    if not self._segments and self._fd is not None:
                        os.close(self._fd)
                        self._fd = None
                    os.unlink(seg.path)
                    removed = True
                if removed:
                    _fsync_dir(self.directory)
            except OSError as exc:
                self._broken = StorageError(
                    f"write-ahead log {self.directory}: compaction to {snapshot_index} failed "
                    f"({exc}); reopen the log (open finishes the compaction)"
                )
                raise self._broken from exc
            finally:
                if removed:
                    self._layout_gen += 1
            self._base_index, self._base_epoch = snapshot_index, snapshot_epoch
            self._set_history(history)
            if snapshot_index >= self._last_index:
                self._last_index = snapshot_index
                self._last_epoch = snapshot_epoch
                self._durable_index = max(self._durable_index, snapshot_index)
                self._cond.notify_all()
            return self._first_index_locked()

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the log; appends still waiting for an fsync fail. Idempotent."""
        with self._lock:
            if self._closed:
                return
            while self._syncing:
                self._cond.wait()
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._cond.notify_all()

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"WriteAheadLog({self.directory!r}, policy={self.fsync_policy}, "
            f"first={self._first_index_locked()}, last={self._last_index}, "
            f"durable={self._durable_index})"
        )


def _epoch_changes(epochs: list[int], first: int) -> list[tuple[int, int]]:
    """``(epoch, index)`` at the batch start and wherever the epoch changes inside it.

    ``ValueError`` if epochs go down within the batch.
    """
    e0 = epochs[0]
    if epochs.count(e0) == len(epochs):  # the usual case: one epoch, checked in C
        return [(e0, first)]
    changes = [(e0, first)]
    prev = e0
    for offset, epoch in enumerate(epochs):
        if epoch != prev:
            if epoch < prev:
                raise ValueError(
                    f"epochs must not go down within a batch: index {first + offset} has "
                    f"epoch {epoch} after {prev}"
                )
            changes.append((epoch, first + offset))
            prev = epoch
    return changes
