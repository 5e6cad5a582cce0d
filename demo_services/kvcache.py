"""`kvcache`: inference sessions holding token blocks, kept in a paged arena.

A session (a str name) is an ordered list of blocks: large binary values, typically 16-64 KiB
each, such as the attention keys and values of a run of tokens. This is the kind that moves
hundreds of MiB of hot state in a live migration.

Requests and their results:

- ``{"op": "append_block", "session", "block"}`` -> ``{"ok": True, "blocks": <blocks in the
  session now>, "bytes": <its bytes now>}``
- ``{"op": "read_session", "session"}``, read-only, optionally with ``"first"`` and
  ``"count"`` -> ``{"ok": True, "found": bool, "blocks": [bytes, ...], "total": <blocks in the
  session>, "next": <index of the first block not returned>}``
- ``{"op": "drop_session", "session"}`` -> ``{"ok": True, "found": bool, "blocks_dropped":
  int}``
- ``{"op": "stats"}``, read-only -> ``{"ok": True, "sessions", "blocks", "bytes",
  "arena_bytes", "free_bytes"}``

``append_block`` opens the session when it does not exist. ``read_session`` returns blocks
``first`` (default 0) onwards, at most ``count`` of them (default all), and stops before the
block that would take the reply past `defaults.KVCACHE_READ_BYTES_MAX` bytes (it always returns
at least one block of a non-empty range): read on from ``next`` while it is below ``total``.

Bounds (defaults.py): a block holds at most KVCACHE_BLOCK_BYTES_MAX bytes and a session name at
most KVCACHE_SESSION_NAME_BYTES_MAX (and at least one); a session at most
KVCACHE_SESSION_BLOCKS_MAX blocks; at most KVCACHE_SESSIONS_MAX sessions; the arena at most
`pages_max` pages. Past a count bound or when the arena is full, ``append_block`` is refused
(RequestRejected) and nothing changes.

Arena layout: the arena is cut into units of 4 KiB, numbered from 0, and every byte of the
state is in it, the allocator's too (integers little-endian, unit numbers u32):

- unit 0, the header: magic ``FOKC``, format, unit bytes, first session, last session.
- a session's head unit: magic ``KVCS``, previous session, next session (heads form a doubly
  linked list in creation order), block count, first ref unit, name length, total bytes, then
  the UTF-8 name.
- ref units: next ref unit of the session, a zero word, then 511 block refs (first
  unit, length).
- block data: whole units, the block's bytes from the first, the rest of the last unit zero
  (an empty block takes no unit and its ref is (0, 0)).
- every unit that none of these use is free, and zero.

The free units are not listed anywhere: they are what the sessions do not use, so `restore`
and `reload_paged` derive them, and the session index, by walking the sessions. Allocation is a
function of the free set only, so a replica that rebuilt its index allocates exactly as one
that did not: the smallest free run that fits, the lowest-numbered of those, taken from its
start. When no run fits, the arena grows at its end. Dropping a session zeroes its units, so
freed space is zero pages that the migration codec elides, and makes them free again.

Block data starts on a unit boundary, so with the default 4 KiB pages a 32 KiB block is
exactly eight pages, copied into the arena with one slice assignment.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from failover import defaults
from failover.errors import InvalidRequest, RequestRejected, StateCorruptError
from failover.paged_state import ARENA_SNAPSHOT_HEAD, PagedState, assemble_arena_snapshot
from failover.service import ServiceKind, require, require_int, require_op

__all__ = ["UNIT_BYTES", "KvCacheService"]

#: The arena's allocation unit; part of the state format, independent of the page size.
UNIT_BYTES = 4096

_ARENA_MAGIC = b"FOKC"
_ARENA_FORMAT = 1
_ARENA_HEAD = struct.Struct("<4sIIII")  # magic, format, unit bytes, first session, last session
_ARENA_LINKS_AT = 12  # offset of (first, last) in the header
_SESSION_HEAD = struct.Struct("<4sIIIIIQ")  # magic, prev, next, blocks, first ref, name len, bytes
_SESSION_MAGIC = b"KVCS"
_SESSION_PREV_AT = 4
_SESSION_NEXT_AT = 8
_SESSION_COUNTS_AT = 12  # offset of (blocks, first ref, name len, bytes)
_SESSION_COUNTS = struct.Struct("<IIIQ")
_U32 = struct.Struct("<I")
_LINKS = struct.Struct("<II")
_REF = struct.Struct("<II")  # first unit, length
_REF_UNIT_HEAD_BYTES = 8  # next ref unit (u32), 4 zero bytes
_REFS_PER_UNIT = (UNIT_BYTES - _REF_UNIT_HEAD_BYTES) // _REF.size
_REF_UNIT = struct.Struct(f"<II{2 * _REFS_PER_UNIT}I")  # next, zero, then the refs
_SNAP_MAGIC = b"FKCS"
_SNAP_HEAD = ARENA_SNAPSHOT_HEAD
_NAME_AREA_BYTES = UNIT_BYTES - _SESSION_HEAD.size
_ZEROS = bytes(1 << 20)  # written over freed units and compared against, a slice at a time
_ZEROS_VIEW = memoryview(_ZEROS)

assert _REF_UNIT.size == UNIT_BYTES
assert defaults.KVCACHE_SESSION_NAME_BYTES_MAX <= _NAME_AREA_BYTES
assert defaults.KVCACHE_BLOCK_BYTES_MAX <= defaults.KVCACHE_READ_BYTES_MAX
assert defaults.KVCACHE_BLOCK_BYTES_MAX < defaults.REQUEST_BYTES_MAX
assert defaults.KVCACHE_BLOCK_BYTES_MAX < 1 << 32

_OPS = frozenset({"append_block", "read_session", "drop_session", "stats"})


def _units_for(length: int) -> int:
    return -(-length // UNIT_BYTES)


def _corrupt(reason: str) -> StateCorruptError:
    return StateCorruptError(f"kvcache arena is not a valid state: {reason}")


# --- free space ----------------------------------------------------------------------------


class _FreeRuns:
    """The free units as maximal runs, and the allocation policy over them.

    `take(n)` returns the start of the smallest run of at least `n` units (the lowest-numbered
    of equal ones) and keeps the rest of that run free; `release` merges a run back with its
    free neighbours. Both depend on the set of free units only, never on how it was reached.
    Runs are indexed by start and by end (for merging) and, per length, in a heap of starts
    whose stale entries (runs merged or taken since) are skipped when met and swept out when
    they outnumber the live ones.

    `total` is the arena's size in units. When no run fits, `take` grows it (in steps of
    `grain` units, so it stays a whole number of pages) up to `limit`, and returns None without
    changing anything when even that cannot fit; the caller grows the arena to match, or,
    to undo, releases what it took and calls `truncate`.
    """

    __slots__ = ("total", "limit", "grain", "free_units", "_by_start", "_by_end", "_heaps",
                 "_lengths", "_entries")

    def __init__(self, total: int, limit: int, grain: int, runs: Iterable[tuple[int, int]]) -> None:
        self.total = total
        self.limit = limit
        self.grain = grain
        self.free_units = 0
        self._by_start: dict[int, int] = {}
        self._by_end: dict[int, int] = {}
        self._heaps: dict[int, list[int]] = {}
        self._lengths: list[int] = []  # sorted lengths that have a heap (maybe of stale entries)
        self._entries = 0
        for start, length in runs:
            self._add(start, length)

    def _add(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_end[start + length] = start
        self.free_units += length
        heap = self._heaps.get(length)
        if heap is None:
            self._heaps[length] = [start]
            insort(self._lengths, length)
        else:
            heapq.heappush(heap, start)
        self._entries += 1
        if self._entries > 2 * len(self._by_start) + 64:
            self._sweep()

    def _remove(self, start: int, length: int) -> None:
        del self._by_start[start]
        del self._by_end[start + length]
        self.free_units -= length  # its heap entry goes stale

    def _sweep(self) -> None:
        heaps: dict[int, list[int]] = {}
        for start, length in self._by_start.items():
            heaps.setdefault(length, []).append(start)
        for heap in heaps.values():
            heapq.heapify(heap)
        self._heaps = heaps
        self._lengths = sorted(heaps)
        self._entries = len(self._by_start)

    def release(self, start: int, length: int) -> None:
        """Make units [start, start + length) free again, merging with free neighbours."""
        left = self._by_end.get(start)
        if left is not None:
            self._remove(left, start - left)
            length += start - left
            start = left
        right = self._by_start.get(start + length)
        if right is not None:
            self._remove(start + length, right)
            length += right
        self._add(start, length)

    def take(self, n: int) -> int | None:
        """The first unit of `n` free units now taken, growing `total` if needed; None (and
        nothing changed) when the arena cannot grow that far."""
        lengths = self._lengths
        heaps = self._heaps
        by_start = self._by_start
        i = bisect_left(lengths, n)
        while i < len(lengths):
            length = lengths[i]
            heap = heaps[length]
            while heap and by_start.get(heap[0]) != length:
                heapq.heappop(heap)
                self._entries -= 1
            if not heap:
                del heaps[length]
                del lengths[i]
                continue
            start = heapq.heappop(heap)
            self._entries -= 1
            self._remove(start, length)
            if length > n:
                self._add(start + n, length - n)
            return start
        # Nothing fits: grow the arena, extending the free run at its end if there is one.
        tail = self._by_end.get(self.total)
        extra = n - (self.total - tail if tail is not None else 0)
        extra = -(-extra // self.grain) * self.grain
        if self.total + extra > self.limit:
            return None
        old_total = self.total
        self.total += extra
        self.release(old_total, extra)
        return self.take(n)

    def truncate(self, total: int) -> None:
        """Undo growth: shrink the arena back to `total` units (the units past it are free)."""
        if total == self.total:
            return
        start = self._by_end[self.total]
        assert start <= total, (start, total)
        self._remove(start, self.total - start)
        if start < total:
            self._add(start, total - start)
        self.total = total

    def free_runs(self) -> list[tuple[int, int]]:
        """The free runs (start, length), by start."""
        return sorted(self._by_start.items())


# --- sessions ------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Session:
    """One session as indexed in memory (derived from its head and ref units)."""

    name: str
    head: int  # its head unit
    starts: list[int] = field(default_factory=list)  # each block's first unit (0: empty block)
    lengths: list[int] = field(default_factory=list)  # each block's bytes
    refs: list[int] = field(default_factory=list)  # its ref units, in order
    name_len: int = 0  # bytes of its UTF-8 name
    held_bytes: int = 0  # bytes of its blocks
    prev: _Session | None = None
    next: _Session | None = None


@dataclass(slots=True)
class _Layout:
    """The index and free space, as parsed from an arena."""

    sessions: dict[str, _Session]
    first: _Session | None
    last: _Session | None
    total: int
    free_runs: list[tuple[int, int]]


def _is_zero(paged: PagedState, offset: int, length: int) -> bool:
    """Whether `length` bytes at `offset` are all zero (read a bounded slice at a time)."""
    step = len(_ZEROS)
    end = offset + length
    while offset < end:
        take = min(step, end - offset)
        if paged.read(offset, take) != _ZEROS[:take]:
            return False
        offset += take
    return True


def _parse(paged: PagedState) -> _Layout:
    """Check every structural invariant of the arena in `paged` and rebuild the index.

    Reads the header, the session heads and ref units, the unused tails of block units and
    the free units; not the blocks' bytes. Raises StateCorruptError naming the first problem.
    """
    size = paged.size_bytes
    if size < UNIT_BYTES or size % UNIT_BYTES:
        raise _corrupt(f"{size} bytes is not a whole number (>= 1) of {UNIT_BYTES}-byte units")
    total = size // UNIT_BYTES
    magic, fmt, unit_bytes, first, last = paged.unpack_from(_ARENA_HEAD, 0)
    if magic != _ARENA_MAGIC:
        raise _corrupt(f"bad magic {magic!r}")
    if fmt != _ARENA_FORMAT or unit_bytes != UNIT_BYTES:
        raise _corrupt(f"unknown arena format {fmt} with {unit_bytes}-byte units")
    if not _is_zero(paged, _ARENA_HEAD.size, UNIT_BYTES - _ARENA_HEAD.size):
        raise _corrupt("the rest of the header unit is not zero")

    sessions: dict[str, _Session] = {}
    used: list[tuple[int, int]] = [(0, 1)]  # (first unit, units) of everything in use
    previous: _Session | None = None
    head = first
    while head:
        if not 0 < head < total or len(sessions) >= total:
            raise _corrupt(f"session head unit {head} is outside the arena of {total} units")
        session = _parse_session(paged, head, total, previous, used)
        if session.name in sessions:
            raise _corrupt(f"session {session.name!r} is stored twice")
        sessions[session.name] = session
        if previous is not None:
            previous.next = session
        previous = session
        head = paged.unpack_from(_U32, head * UNIT_BYTES + _SESSION_NEXT_AT)[0]
    if last != (previous.head if previous is not None else 0):
        raise _corrupt(f"header names unit {last} as the last session, the list ends at "
                       f"{previous.head if previous is not None else 0}")

    used.sort()
    free_runs: list[tuple[int, int]] = []
    at = 0
    for start, units in used:
        if start < at:
            raise _corrupt(f"unit {start} is used twice")
        if start > at:
            free_runs.append((at, start - at))
        at = start + units
    if at > total:
        raise _corrupt(f"units up to {at} are in use, the arena has {total}")
    if at < total:
        free_runs.append((at, total - at))
    for start, units in free_runs:
        if not _is_zero(paged, start * UNIT_BYTES, units * UNIT_BYTES):
            raise _corrupt(f"free units {start}..{start + units - 1} are not zero")
    first_session = next(iter(sessions.values()), None)
    return _Layout(sessions, first_session, previous, total, free_runs)


def _parse_session(paged: PagedState, head: int, total: int, previous: _Session | None,
                   used: list[tuple[int, int]]) -> _Session:
    """One session from its head unit at `head`; appends the units it uses to `used`."""
    base = head * UNIT_BYTES
    magic, prev, _, count, ref, name_len, session_bytes = paged.unpack_from(_SESSION_HEAD, base)
    where = f"session at unit {head}"
    if magic != _SESSION_MAGIC:
        raise _corrupt(f"{where} has bad magic {magic!r}")
    if prev != (previous.head if previous is not None else 0):
        raise _corrupt(f"{where} links back to unit {prev}, not to the session before it")
    if not 0 < name_len <= _NAME_AREA_BYTES:
        raise _corrupt(f"{where} has a name of {name_len} bytes")
    name_at = base + _SESSION_HEAD.size
    try:
        name = paged.read(name_at, name_len).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise _corrupt(f"name of {where} is not UTF-8") from exc
    if not _is_zero(paged, name_at + name_len, _NAME_AREA_BYTES - name_len):
        raise _corrupt(f"the rest of the head unit of {where} is not zero")
    ref_count = -(-count // _REFS_PER_UNIT)
    if not count or ref_count > total:
        raise _corrupt(f"{where} claims {count} blocks")
    used.append((head, 1))
    session = _Session(name, head, name_len=name_len, prev=previous)
    starts, lengths = session.starts, session.lengths
    for k in range(ref_count):
        if not 0 < ref < total:
            raise _corrupt(f"ref unit {ref} of {where} is outside the arena of {total} units")
        used.append((ref, 1))
        session.refs.append(ref)
        values = paged.unpack_from(_REF_UNIT, ref * UNIT_BYTES)
        ref = values[0]
        held = min(_REFS_PER_UNIT, count - k * _REFS_PER_UNIT)
        starts.extend(values[2 : 2 + 2 * held : 2])
        lengths.extend(values[3 : 3 + 2 * held : 2])
        if values[1] or any(values[2 + 2 * held :]):
            raise _corrupt(f"ref unit {session.refs[-1]} of {where} holds more than its refs")
    if ref:
        raise _corrupt(f"the last ref unit of {where} links on to unit {ref}")
    for start, length in zip(starts, lengths, strict=True):
        if not length:
            if start:
                raise _corrupt(f"an empty block of {where} names unit {start}")
            continue
        units = _units_for(length)
        if start <= 0 or start + units > total:
            raise _corrupt(f"a block of {where} at unit {start} runs outside the arena")
        used.append((start, units))
        slack = units * UNIT_BYTES - length
        if slack and not _is_zero(paged, start * UNIT_BYTES + length, slack):
            raise _corrupt(f"the block at unit {start} of {where} is followed by nonzero bytes")
    session.held_bytes = sum(lengths)
    if session.held_bytes != session_bytes:
        raise _corrupt(
            f"{where} counts {session_bytes} bytes, its blocks hold {session.held_bytes}"
        )
    return session


# --- the kind ------------------------------------------------------------------------------


class KvCacheService(ServiceKind):
    """The `kvcache` kind: named sessions of binary token blocks, stored in a `PagedState`."""

    name = "kvcache"
    version = 1
    read_only_ops = frozenset({"read_session", "stats"})
    needs_memory_bytes = defaults.KVCACHE_NEEDS_MEMORY_BYTES
    needs_disk_bytes = defaults.KVCACHE_NEEDS_DISK_BYTES

    def __init__(
        self,
        *,
        page_bytes: int = defaults.PAGE_BYTES,
        pages_max: int | None = None,
        sessions_max: int = defaults.KVCACHE_SESSIONS_MAX,
        session_blocks_max: int = defaults.KVCACHE_SESSION_BLOCKS_MAX,
    ) -> None:
        """No sessions. `page_bytes` and `pages_max` shape the arena (see PagedState); the
        arena must hold at least one 4 KiB unit. `sessions_max` and `session_blocks_max`
        bound the sessions and the blocks in one session."""
        if sessions_max < 1 or session_blocks_max < 1:
            raise ValueError(
                f"sessions_max ({sessions_max}) and session_blocks_max ({session_blocks_max}) "
                "must be at least 1"
            )
        self._paged = PagedState(0, page_bytes=page_bytes, pages_max=pages_max)
        limit = self._paged.pages_max * page_bytes // UNIT_BYTES
        if limit < 1:
            raise ValueError(
                f"an arena of {self._paged.pages_max} pages of {page_bytes} bytes cannot hold "
                f"one {UNIT_BYTES}-byte unit"
            )
        self._sessions_max = sessions_max
        self._blocks_max = session_blocks_max
        self._grain = max(1, page_bytes // UNIT_BYTES)
        self._paged.grow(-(-UNIT_BYTES // page_bytes))
        total = self._paged.size_bytes // UNIT_BYTES
        self._free = _FreeRuns(total, limit, self._grain, [(1, total - 1)] if total > 1 else [])
        self._sessions: dict[str, _Session] = {}
        self._first: _Session | None = None
        self._last: _Session | None = None
        self._block_count = 0
        self._held_bytes = 0
        self._paged.write(0, _ARENA_HEAD.pack(_ARENA_MAGIC, _ARENA_FORMAT, UNIT_BYTES, 0, 0))

    # --- ServiceKind ---------------------------------------------------------------------

    @property
    def paged(self) -> PagedState:
        """The arena holding every byte of the state."""
        return self._paged

    @property
    def session_count(self) -> int:
        """How many sessions are held."""
        return len(self._sessions)

    @property
    def sessions_max(self) -> int:
        """The bound on sessions held at once (refusing to open more)."""
        return self._sessions_max

    @property
    def session_blocks_max(self) -> int:
        """The bound on blocks in one session (refusing to append more)."""
        return self._blocks_max

    def apply(self, command: dict) -> dict:
        """Apply append_block or drop_session (or answer a read-only op); see the module doc."""
        op = require_op(command, _OPS)
        if op == "append_block":
            return self._append(command)
        if op == "drop_session":
            return self._drop(command)
        return self._read(op, command)

    def query(self, request: dict) -> dict:
        """Answer read_session or stats."""
        op = require_op(request, _OPS)
        if op not in self.read_only_ops:
            raise InvalidRequest(f"op {op!r} changes state; send it as a write, not a query")
        return self._read(op, request)

    def snapshot(self) -> Iterator[bytes]:
        """A small header chunk, then the arena in chunks of SNAPSHOT_CHUNK_BYTES."""
        # Copied now, so that the framework may apply while the chunks are written out.
        paged = self._paged
        size = paged.size_bytes
        step = defaults.SNAPSHOT_CHUNK_BYTES
        chunks = [_SNAP_HEAD.pack(_SNAP_MAGIC, self.version, paged.page_bytes, paged.page_count)]
        chunks.extend(paged.read(start, min(step, size - start)) for start in range(0, size, step))
        return iter(chunks)

    def restore(self, chunks: Iterable[bytes]) -> None:
        """Replace the state by a snapshot's; StateCorruptError leaves the old state in place."""
        page_bytes = self._paged.page_bytes
        pages_max = self._paged.pages_max
        arena = assemble_arena_snapshot(chunks, magic=_SNAP_MAGIC, kind="kvcache",
                                        format_max=self.version, page_bytes=page_bytes,
                                        pages_max=pages_max)
        # Parsed in a scratch PagedState sharing the buffer, so a bad one changes nothing here.
        scratch = PagedState(0, page_bytes=page_bytes, pages_max=pages_max)
        scratch.adopt(arena)
        layout = _parse(scratch)
        self._paged.adopt(arena)
        self._adopt(layout)

    def reload_paged(self) -> None:
        """Rebuild the index from pages written straight into `paged` (migration target)."""
        self._adopt(_parse(self._paged))

    def digest(self) -> bytes:
        """blake2b-256 over the arena (allocator metadata included)."""
        return hashlib.blake2b(
            self._paged.digest(), digest_size=32, person=b"failover.kvcache"
        ).digest()

    # --- requests ------------------------------------------------------------------------

    @staticmethod
    def _session_name(request: dict) -> str:
        name: str = require(
            request, "session", str, max_bytes=defaults.KVCACHE_SESSION_NAME_BYTES_MAX
        )
        if not name:
            raise InvalidRequest(f"field 'session' of {request['op']!r} request must not be empty")
        return name

    def _read(self, op: str, request: dict) -> dict:
        if op == "stats":
            return {
                "ok": True,
                "sessions": len(self._sessions),
                "blocks": self._block_count,
                "bytes": self._held_bytes,
                "arena_bytes": self._paged.size_bytes,
                "free_bytes": self._free.free_units * UNIT_BYTES,
            }
        name = self._session_name(request)
        first = require_int(request, "first", minimum=0) if "first" in request else 0
        count = require_int(request, "count", minimum=0) if "count" in request else None
        session = self._sessions.get(name)
        if session is None:
            return {"ok": True, "found": False, "blocks": [], "total": 0, "next": 0}
        lengths = session.lengths
        total = len(lengths)
        start = min(first, total)
        end = total if count is None else min(total, start + count)
        blocks: list[bytes] = []
        budget = defaults.KVCACHE_READ_BYTES_MAX
        read = self._paged.read
        starts = session.starts
        for i in range(start, end):
            length = lengths[i]
            if length > budget and blocks:
                break
            budget -= length
            blocks.append(read(starts[i] * UNIT_BYTES, length))
        return {"ok": True, "found": True, "blocks": blocks, "total": total,
                "next": start + len(blocks)}

    def _append(self, command: dict) -> dict:
        name = self._session_name(command)
        block: bytes = require(command, "block", bytes, max_bytes=defaults.KVCACHE_BLOCK_BYTES_MAX)
        session = self._sessions.get(name)
        if session is None:
            if len(self._sessions) >= self._sessions_max:
                raise RequestRejected(
                    f"kvcache holds {len(self._sessions)} sessions, its limit "
                    f"(KVCACHE_SESSIONS_MAX); drop a session before opening {name!r}"
                )
            count = 0
        else:
            count = len(session.lengths)
            if count >= self._blocks_max:
                raise RequestRejected(
                    f"session {name!r} holds {count} blocks, the limit per session "
                    "(KVCACHE_SESSION_BLOCKS_MAX); drop it or use another session"
                )
        length = len(block)
        new_ref = count % _REFS_PER_UNIT == 0
        # Units taken, all or none: a new session's head, a ref unit, the block's.
        needs = (1 if session is None else 0, 1 if new_ref else 0, _units_for(length))
        head_at, ref_at, block_at = self._take(needs, name)

        paged = self._paged
        if length:
            paged.write(block_at * UNIT_BYTES, block)
        if session is None:
            name_bytes = name.encode("utf-8", "surrogatepass")
            session = _Session(name, head_at, name_len=len(name_bytes), prev=self._last)
            paged.write(
                head_at * UNIT_BYTES,
                _SESSION_HEAD.pack(_SESSION_MAGIC, self._last.head if self._last else 0, 0, 0, 0,
                                   len(name_bytes), 0) + name_bytes,
            )
            self._link_after_last(session)
        if new_ref:
            if session.refs:
                paged.write(session.refs[-1] * UNIT_BYTES, _U32.pack(ref_at))
            session.refs.append(ref_at)
        paged.write(
            session.refs[-1] * UNIT_BYTES + _REF_UNIT_HEAD_BYTES
            + (count % _REFS_PER_UNIT) * _REF.size,
            _REF.pack(block_at, length),
        )
        session.starts.append(block_at)
        session.lengths.append(length)
        session.held_bytes += length
        paged.write(
            session.head * UNIT_BYTES + _SESSION_COUNTS_AT,
            _SESSION_COUNTS.pack(count + 1, session.refs[0], session.name_len, session.held_bytes),
        )
        self._block_count += 1
        self._held_bytes += length
        return {"ok": True, "blocks": count + 1, "bytes": session.held_bytes}

    def _drop(self, command: dict) -> dict:
        name = self._session_name(command)
        session = self._sessions.pop(name, None)
        if session is None:
            return {"ok": True, "found": False, "blocks_dropped": 0}
        extents = [(session.head, 1)]
        extents.extend((ref, 1) for ref in session.refs)
        extents.extend((start, _units_for(length))
                       for start, length in zip(session.starts, session.lengths, strict=True)
                       if length)
        extents.sort()
        # Merge neighbours, so a session appended in one stretch is zeroed in a few writes.
        runs: list[list[int]] = []
        for start, units in extents:
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1][1] += units
            else:
                runs.append([start, units])
        paged = self._paged
        for start, units in runs:
            at = start * UNIT_BYTES
            end = at + units * UNIT_BYTES
            while at < end:
                take = min(len(_ZEROS), end - at)
                paged.write(at, _ZEROS_VIEW[:take])
                at += take
            self._free.release(start, units)
        self._unlink(session)
        dropped = len(session.lengths)
        self._block_count -= dropped
        self._held_bytes -= session.held_bytes
        return {"ok": True, "found": True, "blocks_dropped": dropped}

    # --- arena ---------------------------------------------------------------------------

    def _take(self, needs: tuple[int, ...], name: str) -> list[int]:
        """The first unit of a run for each of `needs` (0 for a need of 0 units), growing the
        arena as needed; RequestRejected, with nothing changed, when it is full."""
        free = self._free
        old_total = free.total
        taken: list[int] = []
        for units in needs:
            if not units:
                taken.append(0)
                continue
            start = free.take(units)
            if start is None:
                for got, got_units in zip(taken, needs, strict=False):
                    if got_units:
                        free.release(got, got_units)
                free.truncate(old_total)
                limit_bytes = free.limit * UNIT_BYTES
                raise RequestRejected(
                    f"kvcache is full: appending to {name!r} needs {sum(needs)} units of "
                    f"{UNIT_BYTES} bytes and the arena, bounded at {limit_bytes} bytes "
                    f"({self._paged.pages_max} pages), has no room for them; drop sessions or "
                    "raise pages_max"
                )
            taken.append(start)
        if free.total != old_total:
            self._paged.grow(free.total * UNIT_BYTES // self._paged.page_bytes)
        return taken

    def _write_list_ends(self) -> None:
        self._paged.write(
            _ARENA_LINKS_AT,
            _LINKS.pack(self._first.head if self._first else 0,
                        self._last.head if self._last else 0),
        )

    def _link_after_last(self, session: _Session) -> None:
        last = self._last
        if last is None:
            self._first = session
        else:
            last.next = session
            self._paged.write(last.head * UNIT_BYTES + _SESSION_NEXT_AT, _U32.pack(session.head))
        self._last = session
        self._sessions[session.name] = session
        self._write_list_ends()

    def _unlink(self, session: _Session) -> None:
        prev, nxt = session.prev, session.next
        paged = self._paged
        if prev is None:
            self._first = nxt
        else:
            prev.next = nxt
            paged.write(prev.head * UNIT_BYTES + _SESSION_NEXT_AT,
                        _U32.pack(nxt.head if nxt else 0))
        if nxt is None:
            self._last = prev
        else:
            nxt.prev = prev
            paged.write(nxt.head * UNIT_BYTES + _SESSION_PREV_AT,
                        _U32.pack(prev.head if prev else 0))
        if prev is None or nxt is None:
            self._write_list_ends()

    def _adopt(self, layout: _Layout) -> None:
        self._sessions = layout.sessions
        self._first = layout.first
        self._last = layout.last
        self._free = _FreeRuns(layout.total, self._free.limit, self._grain, layout.free_runs)
        self._block_count = sum(len(s.lengths) for s in layout.sessions.values())
        self._held_bytes = sum(s.held_bytes for s in layout.sessions.values())
