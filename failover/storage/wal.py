"""Durable write-ahead log with group commit: segment files of framed records, one directory
per replica.

Directory layout::

    00000000000000000001.wal   segments, each named by the index of its first record
    epochs.meta                epoch history and compaction base, replaced atomically

How a segment file is laid out and named is ``failover.storage.segments``; how a record is
framed (the same bytes replication ships, so a shipped batch is written byte for byte) is
``failover.storage.records``. This module is the log over them: ordering, durability,
reads, truncation, compaction and the epoch history.

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
import logging
import os
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import add
from typing import NoReturn

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
from failover.storage.modes import make_private_dir, open_private
from failover.storage.records import (
    _HEADER,
    _HEADER_BYTES,
    CheckedRecords,
    Entry,
    _crc32c,
    _decode_fast,
    _epoch_changes,
    _field_epoch,
    _field_index,
    _frame_rows,
    _record_starts,
    _scan,
    _valid_record_follows,
    check_records,
)
from failover.storage.segments import (
    _SEGMENT_BYTES_MIN,
    _SEGMENT_NAME_RE,
    SEGMENT_MAGIC,
    _fsync_dir,
    _pread_exact,
    _Segment,
    _ShortRead,
    _write_all,
    segment_name,
)

__all__ = ["META_NAME", "OpenReport", "WriteAheadLog"]

_log = logging.getLogger(__name__)

META_NAME = "epochs.meta"
_META_TMP_NAME = META_NAME + ".tmp"
_META_MAGIC = b"FOWALM\x00\x01"
# An append whose first index is ahead of the log waits this long for the appends that fill
# the gap to show up (executor threads may start in any order), and at most the call
# deadline while such appends are in flight. A gap with nobody to fill it is a caller bug.
_TURN_GRACE_S = 0.05
_TURN_DEADLINE_S = defaults.CALL_DEADLINE_MS / 1000
# Reads copy bytes without holding the lock and retry when a truncate or compaction changed
# the files meanwhile; this many retries in a row means something is badly wrong.
_READ_RETRIES_MAX = 100


@dataclass(frozen=True, slots=True)
class OpenReport:
    """What ``WriteAheadLog.open`` found and repaired."""

    torn_bytes_dropped: int  # bytes of a torn tail truncated on open (0 if none)
    torn_segment: str | None  # file name it was cut from
    entries: int  # entries held after open


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return DiskFullError(
            f"no space left on the device while {what}: nothing was written, the log is "
            "unchanged; free space in the data dir, then retry"
        )
    return StorageError(f"I/O error while {what}: {exc}; the log is unchanged")


# --- the log --------------------------------------------------------------------------------


class WriteAheadLog:
    """A replica's write-ahead log. Every method is thread-safe.

    Create one with ``WriteAheadLog.open``. Public state (read-only): ``first_index``,
    ``last_index``, ``last_epoch``, ``durable_index``, ``epoch_history``, ``open_report``,
    ``fsync_policy``.
    """

    open_report: OpenReport
    fsync_policy: str
    # Called with the seconds each append's fsync took (the agent's
    # failover_wal_fsync_duration_seconds); None: not measured. Runs on the appending thread.
    fsync_observer: Callable[[float], None] | None = None

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
        make_private_dir(directory)
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
            fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
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

    def append(self, entries: Sequence[Entry], *, durable: bool = True) -> int:
        """Appends ``entries`` and returns the index of the last one, once durable by policy.

        Entries must have consecutive indexes starting at ``last_index + 1`` and epochs that
        never go down (nor below ``last_epoch``); otherwise ``ValueError``. Threads may call
        this concurrently with batches for consecutive index ranges: they are written in
        index order (a batch arriving before its predecessor waits briefly for it).
        Raises ``DiskFullError`` when the disk is full; the log is then unchanged.

        With ``durable`` False and the ``batch`` policy it returns once the entries are
        written, before their fsync: `wait_durable` then waits for it (a primary ships
        what it wrote while its own fsync runs).
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
        return self._append_framed(blob, lengths, first, count, changes, durable)

    def wait_durable(self, index: int) -> int:
        """Returns once entries up to ``index`` are durable (leading an fsync or waiting for
        the one running); the durable index. Raises the fsync's error if it failed (the
        unsynced entries are then dropped from the log)."""
        with self._lock:
            self._check_open_locked()
            self._await_durable_locked(min(index, self._last_index))
            return self._durable_index

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
        durable: bool = True,
    ) -> int:
        """Writes framed records in index order, then waits until durable by policy (unless
        ``durable`` is False).

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
            if self.fsync_policy == "batch" and durable:
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
                    self._fsync_measured(self._fd)
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
                    fd = open_private(seg.path, os.O_RDWR | os.O_APPEND | os.O_EXCL)
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
                self._fsync_measured(fd)
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

    def _fsync_measured(self, fd: int) -> None:
        """An append's fsync, its duration told to `fsync_observer` when there is one."""
        observer = self.fsync_observer
        if observer is None:
            os.fsync(fd)
            return
        started = time.perf_counter()
        os.fsync(fd)
        observer(time.perf_counter() - started)

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
                self._fsync_measured(fd)
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
