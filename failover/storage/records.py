"""Record framing: how log entries are laid out as bytes, on disk and on the wire.

A record is::

    <u32 LE body length> <u32 LE CRC32C of the body> <body>
    body = msgpack [epoch, index, request_id (bytes), payload (bytes)]

The write-ahead log stores records in its segment files, and replication ships the same
bytes (``encode_records`` on the primary; ``check_records`` then
``WriteAheadLog.append_records`` on the duplica), so a shipped batch is written byte for byte.

Failure rules: a frame is bad when its header is incomplete, its length is zero or above
``defaults.WAL_RECORD_BYTES_MAX``, its body is cut off, its CRC32C does not match, or its
body is not ``[int epoch, int index, request_id, payload]``. Decoding stops at the first bad
frame and names its offset (``LogCorruptError``); the checks of a shipped batch also require
its indexes in order and its epochs never going down, and answer None when anything is off.
A frame whose header and CRC32C check out but whose body is wrong can only come from a bug,
never from a crash (``_Scan.problem`` says which). Whether a bad frame is a torn tail or
damage inside the log is the log's decision (``_valid_record_follows`` helps it).

The decoders do their per-record work as C-level maps over a batch (``_decode_fast``,
``check_records``) and fall back to the record-by-record ``_scan`` only to say where and
why a batch is bad.
"""

from __future__ import annotations

import functools
import struct
import threading
from array import array
from collections.abc import Callable, Sequence
from itertools import accumulate, repeat
from operator import add, itemgetter
from typing import Any, NamedTuple

import crc32c as _crc32c_module
import msgpack

from failover import defaults
from failover.errors import LogCorruptError

__all__ = [
    "CheckedRecords",
    "Entry",
    "check_records",
    "decode_records",
    "encode_records",
    "skip_records",
]

_crc32c = _crc32c_module.crc32c
_HEADER = struct.Struct("<II")
_HEADER_BYTES = _HEADER.size

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


def _record_starts(lengths: list[int], base: int) -> array:
    """File offsets of records with these body lengths written at ``base``, plus the end."""
    return array("Q", accumulate(map(add, lengths, repeat(_HEADER_BYTES)), initial=base))


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
