"""A paged arena with a dirty map: the state of kinds that migrate fast.

Pre-copy live migration (docs/design.md, Live migration) sends every page in round 0 and then, in
each next round, the pages written during the last one. `PagedState` keeps the state in one
`bytearray` cut into fixed-size pages and remembers which pages were written since the last
`take_dirty()`; the migration code swaps that set out once per round.

The dirty map holds one byte per page rather than one bit: marking a run of pages is then a
single slice assignment, counting is `bytearray.count`, and listing is `itertools.compress`,
all of which run in C. At the default bound (1 GiB of 4 KiB pages) the map is 256 KiB.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from itertools import compress
from typing import Any

from failover import defaults
from failover.errors import PagedStateFullError, StateCorruptError

# Default bound on the arena, in bytes, when the caller names no `pages_max`. Growing past it
# raises PagedStateFullError instead of exhausting the host's memory.
# TODO(defaults): belongs in failover/defaults.py as PAGED_STATE_BYTES_MAX.

_DIGEST_HEAD = struct.Struct("<QQ")  # page_bytes, page_count: the arena's shape is state too


class PagedState:
    """A growable arena of `page_count` pages of `page_bytes` bytes, with a dirty map.

    Every `write` and `set_page` marks the pages it touches dirty; `take_dirty` returns the
    dirty pages and starts a fresh, empty set. Growing adds zero pages and does not mark them
    dirty: a receiver learns the arena's size separately and zero-fills it alike.

    The arena never shrinks except through `load`, which replaces it whole.
    """

    __slots__ = ("_page_bytes", "_pages_max", "_arena", "_dirty", "_zero_page")

    def __init__(
        self,
        page_count: int = 0,
        *,
        page_bytes: int = defaults.PAGE_BYTES,
        pages_max: int | None = None,
    ) -> None:
        """Create an arena of `page_count` zero pages.

        `pages_max` bounds growth; it defaults to `defaults.PAGED_ARENA_BYTES_MAX // page_bytes`.
        """
        if page_bytes <= 0 or page_bytes & (page_bytes - 1):
            raise ValueError(f"page_bytes must be a positive power of two, got {page_bytes}")
        if pages_max is None:
            pages_max = max(1, defaults.PAGED_ARENA_BYTES_MAX // page_bytes)
        if pages_max <= 0:
            raise ValueError(f"pages_max must be positive, got {pages_max}")
        if page_count < 0:
            raise ValueError(f"page_count must not be negative, got {page_count}")
        if page_count > pages_max:
            raise PagedStateFullError(page_count, pages_max, page_bytes)
        self._page_bytes = page_bytes
        self._pages_max = pages_max
        self._arena = bytearray(page_count * page_bytes)
        self._dirty = bytearray(page_count)
        self._zero_page = bytes(page_bytes)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        page_bytes: int = defaults.PAGE_BYTES,
        pages_max: int | None = None,
    ) -> PagedState:
        """An arena holding a copy of `data` (a whole number of pages), every page dirty."""
        state = cls(0, page_bytes=page_bytes, pages_max=pages_max)
        state.load(data)
        return state

    # --- shape ---------------------------------------------------------------------------

    @property
    def page_bytes(self) -> int:
        """Bytes per page."""
        return self._page_bytes

    @property
    def page_count(self) -> int:
        """Pages in the arena now."""
        return len(self._dirty)

    @property
    def pages_max(self) -> int:
        """The bound on `page_count`."""
        return self._pages_max

    @property
    def size_bytes(self) -> int:
        """Bytes in the arena now (`page_count * page_bytes`)."""
        return len(self._arena)

    def grow(self, page_count: int) -> None:
        """Grow the arena to at least `page_count` pages; the new pages are zero, not dirty.

        Asking for fewer pages than there are is a no-op. Raises PagedStateFullError, growing
        nothing, when `page_count` passes `pages_max`.
        """
        current = len(self._dirty)
        if page_count <= current:
            return
        if page_count > self._pages_max:
            raise PagedStateFullError(page_count, self._pages_max, self._page_bytes)
        extra_pages = page_count - current
        try:
            # One page at a time is the common growth (an allocator's bump): the shared zero
            # page spares a temporary.
            self._arena += (self._zero_page if extra_pages == 1
                            else bytes(extra_pages * self._page_bytes))
        except BufferError:
            # A `page()` view is still alive and pins the bytearray's size. Move to a new
            # bytearray instead: the old views keep reading the old (now frozen) pages.
            arena = bytearray(page_count * self._page_bytes)
            arena[: len(self._arena)] = self._arena
            self._arena = arena
        self._dirty.extend(bytes(extra_pages))

    def load(self, data: bytes | bytearray | memoryview) -> None:
        """Replace the whole arena by a copy of `data` and mark every page dirty.

        `data` must be a whole number of pages within `pages_max`; otherwise nothing changes.
        """
        size = memoryview(data).nbytes
        if size % self._page_bytes:
            raise ValueError(
                f"arena data of {size} bytes is not a whole number of {self._page_bytes}-byte pages"
            )
        page_count = size // self._page_bytes
        if page_count > self._pages_max:
            raise PagedStateFullError(page_count, self._pages_max, self._page_bytes)
        # A new bytearray rather than an in-place resize: live `page()` views stay valid.
        self._arena = bytearray(data)
        self._dirty = bytearray(b"\x01" * page_count)

    def adopt(self, arena: bytearray) -> None:
        """Replace the whole arena by `arena` itself, without copying it, and mark every page
        dirty. The caller hands the bytearray over: it must not use it afterwards.

        `arena` must be a whole number of pages within `pages_max`; otherwise nothing changes.
        """
        if len(arena) % self._page_bytes:
            raise ValueError(
                f"arena data of {len(arena)} bytes is not a whole number of "
                f"{self._page_bytes}-byte pages"
            )
        page_count = len(arena) // self._page_bytes
        if page_count > self._pages_max:
            raise PagedStateFullError(page_count, self._pages_max, self._page_bytes)
        self._arena = arena
        self._dirty = bytearray(b"\x01" * page_count)

    # --- bytes ---------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self._arena):
            raise IndexError(
                f"range [{offset}, {offset + length}) is outside the arena of "
                f"{len(self._arena)} bytes; grow() it first"
            )

    def read(self, offset: int, length: int) -> bytes:
        """A copy of `length` bytes at `offset`."""
        self._check_range(offset, length)
        return bytes(self._arena[offset : offset + length])

    def unpack_from(self, layout: struct.Struct, offset: int) -> tuple[Any, ...]:
        """`layout` unpacked from the bytes at `offset`, without copying them out first."""
        self._check_range(offset, layout.size)
        return layout.unpack_from(self._arena, offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset` and mark every page it touches dirty.

        The range must lie inside the arena (IndexError otherwise): growing is the caller's
        decision, so that every replica grows alike.
        """
        length = len(data)
        end = offset + length
        if offset < 0 or end > len(self._arena):
            self._check_range(offset, length)  # raises, naming the range
        if not length:
            return
        self._arena[offset:end] = data
        first = offset // self._page_bytes
        last = (end - 1) // self._page_bytes
        if first == last:
            self._dirty[first] = 1
        else:
            self._dirty[first : last + 1] = b"\x01" * (last + 1 - first)

    # --- pages ---------------------------------------------------------------------------

    def _check_page(self, n: int) -> None:
        if not 0 <= n < len(self._dirty):
            raise IndexError(f"page {n} is outside the arena of {len(self._dirty)} pages")

    def page(self, n: int) -> memoryview:
        """A read-only view of page `n`, without copying.

        The view reads the live page, so copy it if it must not change under you. While any
        view is alive the arena moves to a new buffer when it grows (see `grow`), after which
        the view keeps showing the page as it was; release views promptly.
        """
        self._check_page(n)
        start = n * self._page_bytes
        return memoryview(self._arena)[start : start + self._page_bytes].toreadonly()

    def set_page(self, n: int, data: bytes | bytearray | memoryview) -> None:
        """Overwrite page `n` whole (the receiving side of a migration), growing as needed.

        The page is marked dirty like any write. Raises PagedStateFullError past `pages_max`.
        """
        if len(data) != self._page_bytes:
            raise ValueError(
                f"page {n} data is {len(data)} bytes; a page is {self._page_bytes} bytes"
            )
        if n < 0:
            raise IndexError(f"page number must not be negative, got {n}")
        if n >= len(self._dirty):
            self.grow(n + 1)
        start = n * self._page_bytes
        self._arena[start : start + self._page_bytes] = data
        self._dirty[n] = 1

    def is_zero_page(self, n: int) -> bool:
        """Whether page `n` is all zero bytes (such pages are elided on the wire)."""
        self._check_page(n)
        start = n * self._page_bytes
        return self._arena[start : start + self._page_bytes] == self._zero_page

    # --- dirty tracking ------------------------------------------------------------------

    def is_dirty(self, n: int) -> bool:
        """Whether page `n` was written since the last `take_dirty`."""
        self._check_page(n)
        return bool(self._dirty[n])

    def dirty_count(self) -> int:
        """How many pages were written since the last `take_dirty`."""
        return self._dirty.count(1)

    def take_dirty(self) -> list[int]:
        """The dirty page numbers, ascending, and a fresh empty dirty set (the per-round swap)."""
        taken = self._dirty
        self._dirty = bytearray(len(taken))
        return list(compress(range(len(taken)), taken))

    def mark_dirty(self, pages: Iterable[int]) -> None:
        """Mark `pages` dirty again (a round that failed to send them puts them back)."""
        for n in pages:
            self._check_page(n)
            self._dirty[n] = 1

    def mark_all_dirty(self) -> None:
        """Mark every page dirty (start of a full copy)."""
        self._dirty = bytearray(b"\x01" * len(self._dirty))

    # --- identity ------------------------------------------------------------------------

    def digest(self) -> bytes:
        """blake2b-256 of the page size, page count and every byte: equal arenas, equal digest."""
        h = hashlib.blake2b(digest_size=32, person=b"failover.paged")
        h.update(_DIGEST_HEAD.pack(self._page_bytes, len(self._dirty)))
        h.update(self._arena)
        return h.digest()

    def __repr__(self) -> str:
        return (
            f"PagedState(page_count={self.page_count}, page_bytes={self._page_bytes}, "
            f"pages_max={self._pages_max}, dirty={self.dirty_count()})"
        )


# --- arena snapshots -------------------------------------------------------------------------

# The snapshot of a kind whose whole state is its arena: this head, then the arena's bytes.
ARENA_SNAPSHOT_HEAD = struct.Struct("<4sIII")  # magic, format, page_bytes, page_count


def assemble_arena_snapshot(chunks: Iterable[bytes], *, magic: bytes, kind: str,
                            format_max: int, page_bytes: int, pages_max: int) -> bytearray:
    """The arena bytes of an arena snapshot, assembled as its chunks arrive (no second copy).

    Checks the head (magic, a format up to `format_max`, this replica's `page_bytes`) and the
    size, bounded by `pages_max` while reading; raises StateCorruptError naming `kind`
    otherwise. The caller still checks that the bytes form a valid state of its kind.
    """
    def corrupt(reason: str) -> StateCorruptError:
        return StateCorruptError(f"{kind} arena is not a valid state: {reason}")

    limit = ARENA_SNAPSHOT_HEAD.size + pages_max * page_bytes
    head = bytearray()
    arena = bytearray()
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise corrupt(f"snapshot is larger than the arena bound of {limit} bytes")
        if len(head) < ARENA_SNAPSHOT_HEAD.size:
            take = ARENA_SNAPSHOT_HEAD.size - len(head)
            head += chunk[:take]
            arena += chunk[take:]
        else:
            arena += chunk
    if len(head) < ARENA_SNAPSHOT_HEAD.size:
        raise corrupt(f"snapshot of {received} bytes has no header")
    found, fmt, their_page_bytes, page_count = ARENA_SNAPSHOT_HEAD.unpack_from(head, 0)
    if found != magic or not 1 <= fmt <= format_max:
        raise corrupt(f"not a {kind} snapshot of a known format ({found!r}, format {fmt})")
    if their_page_bytes != page_bytes:
        raise corrupt(f"snapshot pages are {their_page_bytes} bytes, this replica's are "
                      f"{page_bytes}")
    if len(arena) != their_page_bytes * page_count:
        raise corrupt(f"{len(arena)} arena bytes, the header says {page_count} pages")
    return arena
