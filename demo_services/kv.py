"""`kv`: a key-value store kept in a paged arena, so it migrates page by page.

Requests (keys are str; values are str or bytes, and a read gives back the type written):

=========================================  ================================================
``{"op": "put", "key", "value"}``          ``{"ok": True, "found": <key existed before>}``
``{"op": "get", "key"}`` (read-only)       ``{"ok": True, "found": bool, "value": v | None}``
``{"op": "delete", "key"}``                ``{"ok": True, "found": <key existed before>}``
``{"op": "cas", "key", "expected",         ``{"ok": True, "swapped": bool, "value": <value now,
"value"}``                                 None when absent>}``
=========================================  ================================================

``cas`` stores `value` only when the current value equals `expected` in type and content;
``expected: None`` means "only when the key is absent".

Arena layout (all integers little-endian). Every byte of the state is in the arena, including
the allocator's metadata, so a target that received all pages holds the whole state:

- offset 0: arena header: magic ``FOKV``, format, bump offset (first never-used byte),
  live record count, size-class count, then one free-list head offset per size class.
- from ``_DATA_START``: slots, back to back up to the bump offset. A slot's size is its size
  class; each starts with a slot header: state (live/free), size class, value type tag, key
  length, value length, next free slot of the class (free slots only); then key and value
  bytes; the rest of the slot is zero.

The allocator is deterministic (same commands, same bytes): a record goes into the size class
that fits it (four classes per doubling, so at most 25% slack); a free list per class (last
freed, first reused) serves before the bump offset moves; an overwrite stays in place when the
new record needs the same class; freed bytes are zeroed. The in-memory index (key -> slot
offset) is derived: `restore` and `reload_paged` rebuild it by walking the slots (a run of
same-class slots at a time). `apply_batch` applies a log's worth of commands with the same
results and bytes as `apply` one by one, faster (the replay path).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress, repeat
from operator import add, not_

from failover import defaults
from failover.errors import FailoverError, InvalidRequest, RequestRejected, StateCorruptError
from failover.paged_state import ARENA_SNAPSHOT_HEAD, PagedState, assemble_arena_snapshot
from failover.service import ServiceKind, kind_failure, require, require_op

__all__ = ["KEY_BYTES_MAX", "VALUE_BYTES_MAX", "KvService"]

# Keys are small by design: they are held in memory twice (index and arena).
KEY_BYTES_MAX = 4096
VALUE_BYTES_MAX = defaults.REQUEST_BYTES_MAX

_ARENA_MAGIC = b"FOKV"
_ARENA_FORMAT = 1
_ARENA_HEAD = struct.Struct("<4sIQQI4x")  # magic, format, bump, live count, class count
_SLOT_HEAD = struct.Struct("<BBBxIIQ")  # state, class, tag, key len, value len, next free
_SLOT_HEAD_BYTES = _SLOT_HEAD.size
_SNAP_MAGIC = b"FKVS"
_SNAP_HEAD = ARENA_SNAPSHOT_HEAD

_FREE = 2
_LIVE = 1
_TAG_STR = 1
_TAG_BYTES = 2

_RECORD_BYTES_MAX = _SLOT_HEAD.size + KEY_BYTES_MAX + VALUE_BYTES_MAX


def _size_classes() -> tuple[int, ...]:
    # 32, 40, 48, 56, 64, 80, ... : four steps per doubling, multiples of 8.
    sizes: list[int] = []
    step = 8
    while not sizes or sizes[-1] < _RECORD_BYTES_MAX:
        sizes.extend(m * step for m in (4, 5, 6, 7))
        step *= 2
    return tuple(sizes[: bisect_left(sizes, _RECORD_BYTES_MAX) + 1])


_SIZES = _size_classes()
_HEADS = struct.Struct(f"<{len(_SIZES)}Q")
_DATA_START = 1024
assert _ARENA_HEAD.size + _HEADS.size <= _DATA_START

_OPS = frozenset({"put", "get", "delete", "cas"})


def _class_for(record_bytes: int) -> int:
    return bisect_left(_SIZES, record_bytes)


def _encode_value(value: str | bytes) -> tuple[int, bytes]:
    if isinstance(value, str):
        return _TAG_STR, value.encode("utf-8", "surrogatepass")
    return _TAG_BYTES, bytes(value)


def _decode_value(tag: int, data: bytes) -> str | bytes:
    return data.decode("utf-8", "surrogatepass") if tag == _TAG_STR else data


class _Layout:
    """The allocator's metadata and the key index, as parsed from an arena."""

    __slots__ = ("bump", "live", "heads", "index")

    def __init__(self, bump: int, live: int, heads: list[int], index: dict[str, int]) -> None:
        self.bump = bump
        self.live = live
        self.heads = heads
        self.index = index


def _corrupt(reason: str) -> StateCorruptError:
    return StateCorruptError(f"kv arena is not a valid state: {reason}")


def _parse_arena(buf: bytes | bytearray) -> _Layout:
    """Check every structural invariant of an arena and rebuild its index.

    Runs of slots of one size class are checked and indexed by C-level slicing of the whole
    run at once (`_parse_runs`); an arena that fails any check there is walked again slot by
    slot (`_parse_arena_walk`), which names the first problem. Both accept exactly the same
    arenas and give the same layout.
    """
    layout = _parse_runs(buf)
    return layout if layout is not None else _parse_arena_walk(buf)


def _parse_arena_walk(buf: bytes | bytearray) -> _Layout:
    """`_parse_arena`, one slot at a time (raises naming the first problem)."""
    if len(buf) < _DATA_START:
        raise _corrupt(f"{len(buf)} bytes is smaller than the arena header")
    magic, fmt, bump, live, class_count = _ARENA_HEAD.unpack_from(buf, 0)
    if magic != _ARENA_MAGIC:
        raise _corrupt(f"bad magic {magic!r}")
    if fmt != _ARENA_FORMAT:
        raise _corrupt(f"unknown arena format {fmt}")
    if class_count != len(_SIZES):
        raise _corrupt(f"{class_count} size classes, expected {len(_SIZES)}")
    if not _DATA_START <= bump <= len(buf):
        raise _corrupt(f"bump offset {bump} outside [{_DATA_START}, {len(buf)}]")
    if buf.count(0, bump) != len(buf) - bump:
        raise _corrupt("bytes past the bump offset are not zero")
    heads = list(_HEADS.unpack_from(buf, _ARENA_HEAD.size))

    index: dict[str, int] = {}
    free: dict[int, int] = {}  # offset -> size class
    offset = _DATA_START
    while offset < bump:
        if offset + _SLOT_HEAD.size > bump:
            raise _corrupt(f"slot header at {offset} runs past the bump offset {bump}")
        state, cls, tag, key_len, value_len, next_free = _SLOT_HEAD.unpack_from(buf, offset)
        if cls >= len(_SIZES) or offset + _SIZES[cls] > bump:
            raise _corrupt(f"slot at {offset} has bad size class {cls}")
        if state == _LIVE:
            need = _SLOT_HEAD.size + key_len + value_len
            if tag not in (_TAG_STR, _TAG_BYTES) or next_free or _class_for(need) != cls:
                raise _corrupt(f"live slot at {offset} has an inconsistent header")
            start = offset + _SLOT_HEAD.size
            try:
                key = bytes(buf[start : start + key_len]).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise _corrupt(f"key of slot at {offset} is not UTF-8") from exc
            if key in index:
                raise _corrupt(f"key {key!r} is stored twice")
            index[key] = offset
        elif state == _FREE:
            if tag or key_len or value_len:
                raise _corrupt(f"free slot at {offset} has a record header")
            free[offset] = cls
        else:
            raise _corrupt(f"slot at {offset} has unknown state {state}")
        offset += _SIZES[cls]

    for cls, head in enumerate(heads):
        node = head
        while node:
            # Popping each node as it is visited also catches cycles and shared tails.
            if free.pop(node, None) != cls:
                raise _corrupt(f"free list of class {cls} reaches {node}, not a free slot of it")
            node = _SLOT_HEAD.unpack_from(buf, node)[5]
    if free:
        raise _corrupt(f"{len(free)} free slots are on no free list")
    if live != len(index):
        raise _corrupt(f"header counts {live} records, the slots hold {len(index)}")
    return _Layout(bump, live, heads, index)


_RUN_SLOTS_MAX = 1 << 16  # slots checked per step of a run (bounds the temporary lists)
_LITTLE_ENDIAN = sys.byteorder == "little"


def _parse_runs(buf: bytes | bytearray) -> _Layout | None:
    """`_parse_arena` for a valid arena, a run of same-class slots at a time; None when any
    check fails (then the walk says which). See `_check_run` for what a run must hold."""
    if not _LITTLE_ENDIAN or len(buf) < _DATA_START:
        return None
    magic, fmt, bump, live, class_count = _ARENA_HEAD.unpack_from(buf, 0)
    if (magic != _ARENA_MAGIC or fmt != _ARENA_FORMAT or class_count != len(_SIZES)
            or not _DATA_START <= bump <= len(buf) or buf.count(0, bump) != len(buf) - bump):
        return None
    heads = list(_HEADS.unpack_from(buf, _ARENA_HEAD.size))
    index: dict[str, int] = {}
    free: dict[int, int] = {}
    view = memoryview(buf)
    offset = _DATA_START
    while offset < bump:
        if offset + _SLOT_HEAD_BYTES > bump:
            return None
        cls = buf[offset + 1]
        if cls >= len(_SIZES):
            return None
        size = _SIZES[cls]
        # The slots that follow while each one's class byte says `cls`: slot k of the run
        # starts at offset + k * size exactly because every slot before it is of that size.
        fit = min((bump - offset) // size, _RUN_SLOTS_MAX)
        if not fit:
            return None
        classes = bytes(buf[offset + 1 : offset + 1 + fit * size : size])
        count = fit - len(classes.lstrip(classes[:1]))
        end = offset + count * size
        if not _check_run(buf, view[offset:end], offset, count, cls, index, free):
            return None
        offset = end
    for cls, head in enumerate(heads):
        node = head
        while node:
            if free.pop(node, None) != cls:
                return None
            node = _SLOT_HEAD.unpack_from(buf, node)[5]
    if free or live != len(index):
        return None
    return _Layout(bump, live, heads, index)


def _check_run(buf: bytes | bytearray, run: memoryview, offset: int, count: int, cls: int,
               index: dict[str, int], free: dict[int, int]) -> bool:
    """Checks `count` slots of class `cls` starting at `offset` (`run` views their bytes)
    and adds their keys to `index` and free slots to `free`; False if any check fails.

    As the walk: each slot is live or free; a live one has a known value tag, no free-list
    link, a record whose size class is `cls` and a UTF-8 key not seen before; a free one has
    an all-zero record header apart from its link.
    """
    size = _SIZES[cls]
    stride = size // 4  # sizes are multiples of 8, slots 4-aligned: a u32 view fits them
    words = run.cast("I")
    key_lens = words[1::stride].tolist()
    value_lens = words[2::stride].tolist()
    links = words[3::stride].tolist()
    links_high = words[4::stride].tolist()
    states = bytes(run[0::size])
    tags = bytes(run[2::size])
    offsets = range(offset, offset + count * size, size)
    lives = states.count(_LIVE)
    if lives + states.count(_FREE) != count:
        return False
    if lives == count:
        live_offsets: Sequence[int] = offsets
        live_keys, live_values = key_lens, value_lens
        if tags.count(_TAG_STR) + tags.count(_TAG_BYTES) != count or any(links) or any(
                links_high):
            return False
    else:
        is_live = list(map(_LIVE.__eq__, states))
        is_free = list(map(not_, is_live))
        live_offsets = list(compress(offsets, is_live))
        live_keys = list(compress(key_lens, is_live))
        live_values = list(compress(value_lens, is_live))
        live_tags = bytes(compress(tags, is_live))
        if (live_tags.count(_TAG_STR) + live_tags.count(_TAG_BYTES) != lives
                or any(compress(links, is_live)) or any(compress(links_high, is_live))):
            return False
        if (any(compress(tags, is_free)) or any(compress(key_lens, is_free))
                or any(compress(value_lens, is_free))):
            return False
        free.update(zip(compress(offsets, is_free), repeat(cls)))
    if not lives:
        return True
    # Each record needs exactly this class: more than the class below holds, at most its own.
    needs = list(map(add, live_keys, live_values))
    floor = _SIZES[cls - 1] if cls else 0
    if not floor < min(needs) + _SLOT_HEAD_BYTES or max(needs) + _SLOT_HEAD_BYTES > size:
        return False
    starts = list(map(add, live_offsets, repeat(_SLOT_HEAD_BYTES)))
    try:
        keys = list(map(str, map(buf.__getitem__, map(slice, starts, map(add, starts,
                                                                          live_keys))),
                        repeat("utf-8"), repeat("surrogatepass")))
    except UnicodeDecodeError:
        return False
    before = len(index)
    index.update(zip(keys, live_offsets, strict=True))
    return len(index) == before + lives


class KvService(ServiceKind):
    """The `kv` kind: str keys to str or bytes values, stored in a `PagedState`."""

    name = "kv"
    version = 1
    read_only_ops = frozenset({"get"})

    def __init__(
        self, *, page_bytes: int = defaults.PAGE_BYTES, pages_max: int | None = None
    ) -> None:
        """An empty store; `page_bytes` and `pages_max` shape its arena (see PagedState)."""
        self._paged = PagedState(0, page_bytes=page_bytes, pages_max=pages_max)
        self._paged.grow(-(-_DATA_START // page_bytes))
        self._bump = _DATA_START
        self._live = 0
        self._heads = [0] * len(_SIZES)
        self._index: dict[str, int] = {}
        self._write_header()

    # --- ServiceKind ---------------------------------------------------------------------

    @property
    def paged(self) -> PagedState:
        """The arena holding every byte of the state."""
        return self._paged

    @property
    def key_count(self) -> int:
        """How many keys are stored."""
        return len(self._index)

    def apply(self, command: dict) -> dict:
        """Apply put, delete or cas (or answer get); see the module doc for the results."""
        op = require_op(command, _OPS)
        if op == "get":
            return self._get(command)
        if op == "put":
            key, key_bytes = self._key(command)
            tag, value_bytes = _encode_value(self._value(command, "value"))
            found = self._store(key, key_bytes, tag, value_bytes)
            return {"ok": True, "found": found}
        if op == "delete":
            key, _ = self._key(command)
            return {"ok": True, "found": self._delete(key)}
        return self._cas(command)

    def apply_batch(self, commands: Sequence[dict]) -> list[dict | FailoverError]:
        """`apply` on each command in order, a refusal (InvalidRequest, RequestRejected)
        taken as that command's outcome (any other exception as `kind_failure` makes it, as
        `failover.core.state_machine.apply_each` does); the same outcomes and state as one by
        one.

        A put of a str key and a str or bytes value within the bounds (the bulk of a log)
        takes a fast path that checks exactly what `apply` checks (a dict of exactly those
        three fields) and, for a new key, allocates from the bump offset inline; anything else
        goes through `apply`. The arena header is written once at the end rather than after
        each put. Equal results are the same dict object (the framework encodes it once).
        """
        outcomes: list[dict | FailoverError] = []
        append = outcomes.append
        found_results = ({"ok": True, "found": False}, {"ok": True, "found": True})
        created = found_results[0]
        index = self._index
        heads = self._heads
        paged = self._paged
        write = paged.write
        put = self._put_record
        pack_head = _SLOT_HEAD.pack
        sizes = _SIZES
        head_bytes = _SLOT_HEAD_BYTES
        key_max, value_max = KEY_BYTES_MAX, VALUE_BYTES_MAX
        tag_str, tag_bytes, live_state = _TAG_STR, _TAG_BYTES, _LIVE
        header_stale = False
        try:
            for command in commands:
                if type(command) is dict and len(command) == 3 and command.get("op") == "put":
                    key = command.get("key")
                    value = command.get("value")
                    value_type = type(value)
                    if type(key) is str and (value_type is str or value_type is bytes):
                        key_bytes = key.encode("utf-8", "surrogatepass")
                        if value_type is str:
                            tag, value_bytes = tag_str, value.encode("utf-8", "surrogatepass")
                        else:
                            tag, value_bytes = tag_bytes, value
                        key_len = len(key_bytes)
                        value_len = len(value_bytes)
                        if key_len <= key_max and value_len <= value_max:
                            cls = bisect_left(sizes, head_bytes + key_len + value_len)
                            offset = self._bump
                            # A new key (every stored one lies below the bump offset) and no
                            # free slot of its class: the record goes at the bump offset.
                            if not heads[cls] and index.setdefault(key, offset) == offset:
                                end = offset + sizes[cls]
                                if end <= paged.size_bytes:
                                    self._bump = end
                                else:
                                    try:
                                        self._allocate(cls)  # grows the arena, or refuses
                                    except RequestRejected as exc:
                                        del index[key]
                                        append(exc)
                                        continue
                                write(offset, pack_head(live_state, cls, tag, key_len, value_len,
                                                        0) + key_bytes + value_bytes)
                                self._live += 1
                                header_stale = True
                                append(created)
                                continue
                            try:
                                found, moved = put(key, key_bytes, tag, value_bytes)
                            except RequestRejected as exc:
                                append(exc)
                                continue
                            header_stale = header_stale or moved
                            append(found_results[found])
                            continue
                try:
                    append(self.apply(command))
                except (InvalidRequest, RequestRejected) as exc:
                    append(exc)
                except Exception as exc:
                    append(kind_failure(self.name, exc))
        finally:
            if header_stale:
                self._write_header()
        return outcomes

    def query(self, request: dict) -> dict:
        """Answer a get."""
        op = require_op(request, _OPS)
        if op not in self.read_only_ops:
            raise InvalidRequest(f"op {op!r} changes state; send it as a write, not a query")
        return self._get(request)

    def snapshot(self) -> Iterator[bytes]:
        """A small header chunk, then the arena in chunks of SNAPSHOT_CHUNK_BYTES."""
        # Copied now, so that the framework may apply while the chunks are written out.
        data = self._paged.read(0, self._paged.size_bytes)
        head = _SNAP_HEAD.pack(
            _SNAP_MAGIC, self.version, self._paged.page_bytes, self._paged.page_count
        )
        step = defaults.SNAPSHOT_CHUNK_BYTES

        def chunks() -> Iterator[bytes]:
            yield head
            for start in range(0, len(data), step):
                yield data[start : start + step]

        return chunks()

    def restore(self, chunks: Iterable[bytes]) -> None:
        """Replace the state by a snapshot's; StateCorruptError leaves the old state in place.

        The arena is assembled as the chunks arrive (no copy of it afterwards), then
        checked and indexed in one pass (`_parse_arena`)."""
        page_bytes_here = self._paged.page_bytes
        arena = assemble_arena_snapshot(chunks, magic=_SNAP_MAGIC, kind="kv",
                                        format_max=self.version,
                                        page_bytes=page_bytes_here,
                                        pages_max=self._paged.pages_max)
        layout = _parse_arena(arena)
        self._paged.adopt(arena)
        self._adopt(layout)

    def reload_paged(self) -> None:
        """Rebuild the index from pages written straight into `paged` (migration target)."""
        self._adopt(_parse_arena(self._paged.read(0, self._paged.size_bytes)))

    def digest(self) -> bytes:
        """blake2b-256 over the arena (allocator metadata included)."""
        return hashlib.blake2b(self._paged.digest(), digest_size=32, person=b"failover.kv").digest()

    # --- requests ------------------------------------------------------------------------

    @staticmethod
    def _key(request: dict) -> tuple[str, bytes]:
        key: str = require(request, "key", str, max_bytes=KEY_BYTES_MAX)
        return key, key.encode("utf-8", "surrogatepass")

    @staticmethod
    def _value(request: dict, field: str) -> str | bytes:
        return require(request, field, (str, bytes), max_bytes=VALUE_BYTES_MAX)

    def _get(self, request: dict) -> dict:
        key, _ = self._key(request)
        value = self._lookup(key)
        return {"ok": True, "found": value is not None, "value": value}

    def _cas(self, command: dict) -> dict:
        key, key_bytes = self._key(command)
        expected = require(command, "expected", (str, bytes, type(None)))
        value = self._value(command, "value")
        current = self._lookup(key)
        if expected is None:
            matches = current is None
        else:
            matches = type(current) is type(expected) and current == expected
        if not matches:
            return {"ok": True, "swapped": False, "value": current}
        tag, value_bytes = _encode_value(value)
        self._store(key, key_bytes, tag, value_bytes)
        return {"ok": True, "swapped": True, "value": value}

    # --- arena ---------------------------------------------------------------------------

    def _adopt(self, layout: _Layout) -> None:
        self._bump = layout.bump
        self._live = layout.live
        self._heads = layout.heads
        self._index = layout.index

    def _write_header(self) -> None:
        self._paged.write(
            0,
            _ARENA_HEAD.pack(_ARENA_MAGIC, _ARENA_FORMAT, self._bump, self._live, len(_SIZES))
            + _HEADS.pack(*self._heads),
        )

    def _slot_head(self, offset: int) -> tuple[int, int, int, int, int, int]:
        return self._paged.unpack_from(_SLOT_HEAD, offset)  # type: ignore[return-value]

    def _lookup(self, key: str) -> str | bytes | None:
        offset = self._index.get(key)
        if offset is None:
            return None
        _, _, tag, key_len, value_len, _ = self._slot_head(offset)
        start = offset + _SLOT_HEAD.size + key_len
        return _decode_value(tag, self._paged.read(start, value_len))

    def _allocate(self, cls: int) -> int:
        """A slot of class `cls`; RequestRejected, with nothing changed, when the arena is full."""
        head = self._heads[cls]
        if head:
            self._heads[cls] = self._slot_head(head)[5]
            return head
        end = self._bump + _SIZES[cls]
        pages = -(-end // self._paged.page_bytes)
        if pages > self._paged.pages_max:
            raise RequestRejected(
                f"kv store is full: the record needs the arena to grow to {pages} pages and "
                f"its bound is {self._paged.pages_max} pages; delete keys or raise pages_max"
            )
        self._paged.grow(pages)
        offset, self._bump = self._bump, end
        return offset

    def _store(self, key: str, key_bytes: bytes, tag: int, value_bytes: bytes) -> bool:
        """Put a record; whether the key existed before."""
        found, moved = self._put_record(key, key_bytes, tag, value_bytes)
        if moved:
            self._write_header()
        return found

    def _put_record(
        self, key: str, key_bytes: bytes, tag: int, value_bytes: bytes
    ) -> tuple[bool, bool]:
        """Put a record without writing the arena header; (whether the key existed before,
        whether the header is now stale: the caller writes it)."""
        key_len = len(key_bytes)
        value_len = len(value_bytes)
        need = _SLOT_HEAD_BYTES + key_len + value_len
        cls = bisect_left(_SIZES, need)
        record = _SLOT_HEAD.pack(_LIVE, cls, tag, key_len, value_len, 0) + key_bytes + value_bytes
        old = self._index.get(key)
        if old is not None:
            _, old_cls, _, old_key_len, old_value_len, _ = self._paged.unpack_from(_SLOT_HEAD, old)
            if old_cls == cls:
                old_need = _SLOT_HEAD_BYTES + old_key_len + old_value_len
                # Zero what the old record used beyond the new one: slack is always zero.
                if old_need > need:
                    record += bytes(old_need - need)
                self._paged.write(old, record)
                return True, False
        offset = self._allocate(cls)
        self._paged.write(offset, record)
        self._index[key] = offset
        if old is None:
            self._live += 1
        else:
            self._release(old)
        return old is not None, True

    def _delete(self, key: str) -> bool:
        offset = self._index.pop(key, None)
        if offset is None:
            return False
        self._release(offset)
        self._live -= 1
        self._write_header()
        return True

    def _release(self, offset: int) -> None:
        """Zero a slot's record and push it on its class's free list (header written later)."""
        _, cls, _, key_len, value_len, _ = self._slot_head(offset)
        self._paged.write(
            offset,
            _SLOT_HEAD.pack(_FREE, cls, 0, 0, 0, self._heads[cls]) + bytes(key_len + value_len),
        )
        self._heads[cls] = offset
