"""Page batch codecs for pre-copy live migration (docs/design.md, Live migration).

The source keeps one `PageEncoder` for the whole migration and the target one `PageDecoder`;
each batch goes over the wire as a `PageBatch` (proto/failover/v1/migration.proto):

* `page_numbers` and `encodings`, one entry per page, in order;
* `pages_lz4`: ONE lz4 frame holding the payloads of the RAW and XOR_DELTA pages, in order,
  each exactly `page_bytes` long (empty when every page of the batch is ZERO).

Encodings:

* ZERO: an all-zero page; no bytes are sent.
* RAW: the page itself.
* XOR_DELTA: the page XOR its last sent version. A page sent before goes as a delta when few
  of its bits changed (`int.bit_count` of the XOR, one C call): a sparse delta is mostly zero
  bytes and lz4 squeezes those runs to almost nothing, while a page rewritten whole would
  compress worse as a delta than as itself. A page sent unchanged is a delta of zeros and costs
  no XOR at all. Nothing is compressed twice.

Both sides remember the last version of every page (as `bytes`, so memory is the state's size)
and a CRC32C of it in an `array` of uint32, so the cutover check (invariant 8) hashes 4 bytes per
page, not the arena: `PageEncoder.digest` and `PageDecoder.digest` must agree before the target
serves. CRC32C is computed in hardware (about 0.6 us per 4 KiB page, against about 7 us for
blake2b), and detects accidental damage, not a forger; the vector of CRCs is then hashed with
blake2b. The digest covers every page sent and received; it cannot see a source write that was
never marked dirty (that is `PagedState`'s contract).

An encoder or decoder refuses a bad batch with MigrationError before changing anything; one
that failed half way for another reason (MemoryError) is unusable from then on. Every encoded
batch must reach the decoder, in order, or the migration is abandoned: the encoder assumes the
target holds what it encoded.

Speed: the per-page work is a handful of C-level calls (`bytes ==` against a zero page, a dict
store, `crc32c`), and the payloads are joined and compressed with one `lz4.frame.compress` call
per batch (level `defaults.MIGRATION_LZ4_LEVEL`); `batches` cuts the pages into batches of about
`defaults.MIGRATION_BATCH_BYTES`, and `PageEncoder.encode_arena` cuts pages straight from an
arena buffer. A full copy encodes at about 70% of `lz4.frame.compress`'s speed on the same
pages; the rest is mostly the copy of each page the encoder keeps, and its CRC.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

import crc32c
import lz4.frame

from failover import defaults
from failover.errors import MigrationError

# PageEncoding values of migration.proto (tests/unit/test_migration_codec.py checks them).
RAW = 1
ZERO = 2
XOR_DELTA = 3
ENCODINGS = (RAW, ZERO, XOR_DELTA)

PAGE_NUMBER_MAX = 0xFFFF_FFFF  # page_numbers are uint32 on the wire
_PROBE_BYTES = 32  # bytes compared per quarter page to spot a rewritten page cheaply

PageData = bytes | bytearray | memoryview
T = TypeVar("T")

_U32 = next(code for code in "IL" if array(code).itemsize == 4)  # "I" on every common ABI
_DIGEST_PERSON = b"failover.migrate"
_DIGEST_HEAD = struct.Struct("<QQQ")  # page_bytes, page_count, len(extra)
_crc32c = crc32c.crc32c


def _check_page_bytes(page_bytes: int) -> int:
    if not isinstance(page_bytes, int) or page_bytes <= 0 or page_bytes & (page_bytes - 1):
        raise MigrationError(f"page_bytes must be a positive power of two, got {page_bytes!r}")
    return page_bytes


def _pages_max(pages_max: int | None, page_bytes: int) -> int:
    if pages_max is None:
        pages_max = max(1, defaults.PAGED_ARENA_BYTES_MAX // page_bytes)
    if not isinstance(pages_max, int) or not 0 < pages_max <= PAGE_NUMBER_MAX + 1:
        raise MigrationError(
            f"pages_max must be a whole number in 1..{PAGE_NUMBER_MAX + 1}, got {pages_max!r}"
        )
    return pages_max


# --- digests -------------------------------------------------------------------------------


def page_digest(page: PageData) -> int:
    """The digest of one page: its CRC32C, an int below 2**32."""
    return _crc32c(page)


def arena_digest(page_digests: Sequence[int], page_bytes: int, extra: bytes) -> bytes:
    """The state digest compared at cutover: blake2b-256 over the arena's shape, the page
    digests in page order (uint32 little-endian each) and `extra` (the non-paged state).

    `page_digests` holds one `page_digest` per page of the arena, including zero pages; an
    `array` of uint32 (typecode "I") is hashed without a copy on little-endian hosts.
    """
    if isinstance(page_digests, array) and page_digests.typecode == _U32:
        vector = page_digests
    else:
        vector = array(_U32, page_digests)
    if sys.byteorder != "little":
        vector = array(_U32, vector)
        vector.byteswap()
    h = hashlib.blake2b(digest_size=32, person=_DIGEST_PERSON)
    h.update(_DIGEST_HEAD.pack(page_bytes, len(vector), len(extra)))
    h.update(vector)
    h.update(extra)
    return h.digest()


def whole_arena_digest(arena: PageData, page_bytes: int, extra: bytes) -> bytes:
    """`arena_digest` computed from a whole arena (every page hashed): for checks off the
    critical path and for tests; the migration itself keeps the digests as pages move."""
    view = memoryview(arena).cast("B")
    if view.nbytes % page_bytes:
        raise MigrationError(
            f"an arena of {view.nbytes} bytes is not a whole number of {page_bytes}-byte pages"
        )
    starts = range(0, view.nbytes, page_bytes)
    digests = array(_U32, (_crc32c(view[start : start + page_bytes]) for start in starts))
    return arena_digest(digests, page_bytes, extra)


class _Digests:
    """Per-page CRC32C of the last version sent or received, grown with zero-page digests."""

    __slots__ = ("vector", "zero_digest", "page_bytes", "pages_seen")

    def __init__(self, page_bytes: int) -> None:
        self.page_bytes = page_bytes
        self.zero_digest = _crc32c(bytes(page_bytes))
        self.vector = array(_U32)
        self.pages_seen = 0  # the highest page number moved, plus one

    def grow(self, page_count: int) -> None:
        missing = page_count - len(self.vector)
        if missing > 0:
            self.vector.extend(array(_U32, [self.zero_digest]) * missing)

    def digest(self, page_count: int, extra: bytes, side: str) -> bytes:
        if page_count < 0:
            raise MigrationError(f"page_count must not be negative, got {page_count}")
        seen = self.pages_seen
        if seen > page_count:
            raise MigrationError(
                f"the {side} has page {seen - 1} but the arena is said to hold {page_count} "
                "pages: the arena shape and the pages moved disagree"
            )
        self.grow(page_count)
        del self.vector[page_count:]  # zero digests of an earlier, larger page_count
        return arena_digest(self.vector, self.page_bytes, extra)


# --- batching ------------------------------------------------------------------------------


def batches(
    items: Iterable[T],
    page_bytes: int = defaults.PAGE_BYTES,
    batch_bytes: int = defaults.MIGRATION_BATCH_BYTES,
) -> Iterator[list[T]]:
    """Cut `items` (page numbers, or (page_number, page) pairs) into lists of
    `batch_bytes // page_bytes` pages (at least one), the last one shorter: one list per
    `PageBatch`. Lazy: pages are taken from `items` as each list is needed."""
    _check_page_bytes(page_bytes)
    if batch_bytes <= 0:
        raise MigrationError(f"batch_bytes must be positive, got {batch_bytes}")
    per_batch = max(1, batch_bytes // page_bytes)
    it = iter(items)
    while chunk := list(islice(it, per_batch)):
        yield chunk


# --- encoder -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One encoded batch, ready for a `PageBatch` message."""

    page_numbers: list[int]
    encodings: list[int]  # RAW, ZERO or XOR_DELTA per page
    pages_lz4: bytes  # one lz4 frame of the RAW and XOR_DELTA payloads; b"" when there are none
    raw_bytes: int  # pages x page_bytes
    wire_bytes: int  # len(pages_lz4)
    zero_pages: int
    delta_pages: int


class PageEncoder:
    """The source side: encodes batches of pages and remembers what it sent.

    Keep one encoder for the whole migration: a page it sent before may go as an XOR delta
    against that version. The XOR costs about 8 us per 4 KiB page (three int conversions in
    C), several times lz4's cost for the page, and saves about 1.7 KB of wire per sparsely
    written page (measured: 58x against 2.3x compression): deltas pay off on links slower than
    about 200 MB/s. `delta=False` sends every non-zero page RAW, for faster links.
    """

    __slots__ = (
        "_page_bytes",
        "_pages_max",
        "_zero",
        "_last",
        "_digests",
        "_delta_bits_max",
        "_probes",
        "_broken",
    )

    def __init__(
        self,
        page_bytes: int = defaults.PAGE_BYTES,
        *,
        pages_max: int | None = None,
        delta: bool = True,
    ) -> None:
        """An encoder for pages of `page_bytes` bytes (a power of two) numbered below
        `pages_max` (default: `defaults.PAGED_ARENA_BYTES_MAX // page_bytes`, like
        `PagedState`)."""
        self._page_bytes = _check_page_bytes(page_bytes)
        self._pages_max = _pages_max(pages_max, page_bytes)
        self._zero = bytes(page_bytes)
        self._last: dict[int, bytes] = {}
        self._digests = _Digests(page_bytes)
        bits = int(page_bytes * 8 * defaults.MIGRATION_DELTA_CHANGED_BITS_FRACTION_MAX)
        self._delta_bits_max = bits if delta else -1
        # Four short probes, one in the middle of each quarter page: a page that differs from
        # its last sent version in all four was rewritten, and goes RAW without an XOR.
        quarter = page_bytes // 4
        probe = max(1, min(_PROBE_BYTES, quarter))
        self._probes = tuple(
            (q * quarter + (quarter - probe) // 2, q * quarter + (quarter - probe) // 2 + probe)
            for q in range(4)
        )
        self._broken = ""

    @property
    def page_bytes(self) -> int:
        """Bytes per page."""
        return self._page_bytes

    @property
    def pages_sent(self) -> int:
        """Distinct pages encoded so far."""
        return len(self._last)

    def encode(self, pages: Iterable[tuple[int, PageData]]) -> EncodedBatch:
        """Encode one batch of (page_number, page) pairs, in order.

        Each page is copied (so the caller may keep writing to its arena) and remembered as
        the page's last sent version. Raises MigrationError, changing nothing, for a page of
        the wrong size or a page number outside 0..pages_max-1.
        """
        self._check_usable()
        pairs = list(pages)
        numbers = [n for n, _ in pairs]
        self._check_numbers(numbers, self._pages_max)
        # A copy (the caller's arena changes on), except for bytes, which cannot change.
        datas = [p.tobytes() if type(p) is memoryview else bytes(p) for _, p in pairs]
        if datas and set(map(len, datas)) != {self._page_bytes}:
            n, data = next(
                (n, d) for n, d in zip(numbers, datas, strict=True) if len(d) != self._page_bytes
            )
            raise MigrationError(
                f"page {n} is {len(data)} bytes; this migration's pages are "
                f"{self._page_bytes} bytes"
            )
        return self._encode(numbers, datas)

    def encode_arena(self, arena: PageData, page_numbers: Iterable[int]) -> EncodedBatch:
        """Encode one batch of the pages `page_numbers`, cut from `arena` (page n at byte
        n * page_bytes): like `encode`, without a view object per page (about 0.4 us less per
        page than `(n, state.page(n))` pairs). Raises MigrationError, changing nothing, for a
        page number outside 0..pages_max-1 or past the end of `arena`."""
        self._check_usable()
        view = memoryview(arena).cast("B")
        page_bytes = self._page_bytes
        numbers = list(page_numbers)
        self._check_numbers(
            numbers, min(self._pages_max, view.nbytes // page_bytes), "arena's pages"
        )
        datas = [view[n * page_bytes : (n + 1) * page_bytes].tobytes() for n in numbers]
        return self._encode(numbers, datas)

    def _check_usable(self) -> None:
        if self._broken:
            raise MigrationError(f"this page encoder failed before ({self._broken}); start over")

    @staticmethod
    def _check_numbers(numbers: list[int], pages_max: int, what: str = "arena's bound") -> None:
        if numbers:
            low, high = min(numbers), max(numbers)
            bad = low if low < 0 else high if high >= pages_max else None
            if bad is not None:
                raise MigrationError(f"page number {bad} is outside the {what} 0..{pages_max - 1}")

    def _encode(self, numbers: list[int], datas: list[bytes]) -> EncodedBatch:
        page_bytes = self._page_bytes
        zero = self._zero
        last = self._last
        digests = self._digests
        if numbers:
            digests.pages_seen = max(digests.pages_seen, max(numbers) + 1)
            digests.grow(digests.pages_seen)
        vector = digests.vector
        zero_digest = digests.zero_digest
        delta_bits_max = self._delta_bits_max
        (a0, b0), (a1, b1), (a2, b2), (a3, b3) = self._probes
        from_bytes = int.from_bytes
        crc = _crc32c
        encodings: list[int] = []
        payload: list[bytes] = []
        zero_pages = delta_pages = 0
        try:
            for n, data in zip(numbers, datas, strict=True):
                if data == zero:
                    encodings.append(ZERO)
                    last[n] = zero
                    vector[n] = zero_digest
                    zero_pages += 1
                    continue
                prev = last.get(n)
                last[n] = data
                vector[n] = crc(data)
                if prev is None or prev is zero or delta_bits_max < 0:
                    encodings.append(RAW)  # a delta against zeros is the page itself
                    payload.append(data)
                elif prev == data:
                    encodings.append(XOR_DELTA)  # sent unchanged: a delta of zeros
                    payload.append(zero)
                    delta_pages += 1
                elif (
                    data[a0:b0] != prev[a0:b0]
                    and data[a1:b1] != prev[a1:b1]
                    and data[a2:b2] != prev[a2:b2]
                    and data[a3:b3] != prev[a3:b3]
                ):
                    encodings.append(RAW)  # changed in every quarter: rewritten, not patched
                    payload.append(data)
                else:
                    xor = from_bytes(data, "little") ^ from_bytes(prev, "little")
                    if xor.bit_count() <= delta_bits_max:
                        encodings.append(XOR_DELTA)
                        payload.append(xor.to_bytes(page_bytes, "little"))
                        delta_pages += 1
                    else:
                        encodings.append(RAW)
                        payload.append(data)
            pages_lz4 = (
                lz4.frame.compress(
                    b"".join(payload), compression_level=defaults.MIGRATION_LZ4_LEVEL
                )
                if payload
                else b""
            )
        except BaseException as exc:  # MemoryError, KeyboardInterrupt: the memory is half set
            self._broken = str(exc) or type(exc).__name__
            raise
        return EncodedBatch(
            page_numbers=numbers,
            encodings=encodings,
            pages_lz4=pages_lz4,
            raw_bytes=len(numbers) * page_bytes,
            wire_bytes=len(pages_lz4),
            zero_pages=zero_pages,
            delta_pages=delta_pages,
        )

    def digest(self, page_count: int, extra: bytes) -> bytes:
        """The state digest of what was sent: `arena_digest` over the last sent version of
        each of `page_count` pages (pages never sent count as zero pages) and `extra`.

        Costs a hash of 4 bytes per page, so it fits in the cutover pause. Raises
        MigrationError when a page at or beyond `page_count` was sent.
        """
        return self._digests.digest(page_count, extra, "source")


# --- decoder -------------------------------------------------------------------------------


class PageDecoder:
    """The target side: decodes batches and remembers the last version of each page."""

    __slots__ = ("_page_bytes", "_pages_max", "_zero", "_last", "_digests", "_broken")

    def __init__(
        self, page_bytes: int = defaults.PAGE_BYTES, *, pages_max: int | None = None
    ) -> None:
        """A decoder for pages of `page_bytes` bytes (a power of two) numbered below
        `pages_max` (default: `defaults.PAGED_ARENA_BYTES_MAX // page_bytes`, like
        `PagedState`): a batch naming a page past it is refused before any memory is grown."""
        self._page_bytes = _check_page_bytes(page_bytes)
        self._pages_max = _pages_max(pages_max, page_bytes)
        self._zero = bytes(page_bytes)
        self._last: dict[int, bytes] = {}
        self._digests = _Digests(page_bytes)
        self._broken = ""

    @property
    def page_bytes(self) -> int:
        """Bytes per page."""
        return self._page_bytes

    @property
    def pages_received(self) -> int:
        """Distinct pages decoded so far."""
        return len(self._last)

    def decode(
        self,
        page_numbers: Sequence[int],
        encodings: Sequence[int],
        pages_lz4: bytes,
        *,
        page_bytes: int | None = None,
    ) -> list[tuple[int, bytes]]:
        """The (page_number, page) pairs of one batch, in order, with XOR deltas applied
        against each page's last received version.

        `page_bytes`, when given (the batch's field), must match the decoder's. Raises
        MigrationError, changing nothing, on any inconsistency: counts, an unknown encoding, a
        page number past `pages_max`, a delta for a page never received, a corrupt or
        wrong-sized lz4 frame.
        """
        if self._broken:
            raise MigrationError(f"this page decoder failed before ({self._broken}); start over")
        numbers, codes, payload = self._check(page_numbers, encodings, pages_lz4, page_bytes)
        try:
            return self._apply(numbers, codes, payload)
        except BaseException as exc:  # MemoryError, KeyboardInterrupt: the memory is half set
            self._broken = str(exc) or type(exc).__name__
            raise

    def _check(
        self,
        page_numbers: Sequence[int],
        encodings: Sequence[int],
        pages_lz4: bytes,
        batch_page_bytes: int | None,
    ) -> tuple[list[int], list[int], bytes]:
        page_bytes = self._page_bytes
        if batch_page_bytes is not None and batch_page_bytes != page_bytes:
            raise MigrationError(
                f"the batch has {batch_page_bytes}-byte pages; this migration's pages are "
                f"{page_bytes} bytes"
            )
        numbers = list(page_numbers)
        codes = list(encodings)
        if len(numbers) != len(codes):
            raise MigrationError(
                f"the batch has {len(numbers)} page numbers but {len(codes)} encodings"
            )
        if not numbers:
            if pages_lz4:
                raise MigrationError("the batch has no pages but carries page bytes")
            return numbers, codes, b""
        unknown = set(codes).difference(ENCODINGS)
        if unknown:
            raise MigrationError(
                f"the batch has unknown page encodings {sorted(unknown)}; known are "
                f"RAW={RAW}, ZERO={ZERO}, XOR_DELTA={XOR_DELTA}"
            )
        if min(numbers) < 0 or max(numbers) >= self._pages_max:
            raise MigrationError(
                f"the batch has page numbers outside the arena's bound 0..{self._pages_max - 1}"
            )
        if XOR_DELTA in codes:
            deltas = {n for n, code in zip(numbers, codes, strict=True) if code == XOR_DELTA}
            unknown_pages = deltas.difference(self._last)
            if unknown_pages:  # rare: the page may have come earlier in this very batch
                seen: set[int] = set()
                for n, code in zip(numbers, codes, strict=True):
                    if code == XOR_DELTA and n in unknown_pages and n not in seen:
                        raise MigrationError(
                            f"page {n} came as an XOR delta but was never received before"
                        )
                    seen.add(n)
        payload = self._decompress(pages_lz4, (len(codes) - codes.count(ZERO)) * page_bytes)
        return numbers, codes, payload

    def _apply(
        self, numbers: list[int], codes: list[int], payload: bytes
    ) -> list[tuple[int, bytes]]:
        if not numbers:
            return []
        page_bytes = self._page_bytes
        zero = self._zero
        last = self._last
        digests = self._digests
        digests.pages_seen = max(digests.pages_seen, max(numbers) + 1)
        digests.grow(digests.pages_seen)
        vector = digests.vector
        zero_digest = digests.zero_digest
        from_bytes = int.from_bytes
        crc = _crc32c
        out: list[tuple[int, bytes]] = []
        offset = 0
        for n, code in zip(numbers, codes, strict=True):
            if code == ZERO:
                last[n] = zero
                vector[n] = zero_digest
                out.append((n, zero))
                continue
            chunk = payload[offset : offset + page_bytes]
            offset += page_bytes
            if code == XOR_DELTA:
                prev = last[n]
                if chunk == zero:
                    page = prev
                elif prev is zero:
                    page = chunk
                else:
                    page = (from_bytes(chunk, "little") ^ from_bytes(prev, "little")).to_bytes(
                        page_bytes, "little"
                    )
            else:
                page = chunk
            last[n] = page
            vector[n] = zero_digest if page == zero else crc(page)
            out.append((n, page))
        return out

    @staticmethod
    def _decompress(pages_lz4: bytes, expected_bytes: int) -> bytes:
        if not expected_bytes:
            if pages_lz4:
                raise MigrationError("the batch has only ZERO pages but carries page bytes")
            return b""
        if not pages_lz4:
            raise MigrationError(
                f"the batch needs {expected_bytes} bytes of RAW and XOR_DELTA pages but "
                "carries none"
            )
        decompressor = lz4.frame.LZ4FrameDecompressor()
        try:
            payload = decompressor.decompress(pages_lz4, max_length=expected_bytes + 1)
        except RuntimeError as exc:  # lz4 reports a malformed frame as RuntimeError
            raise MigrationError(f"the batch's lz4 frame does not decode: {exc}") from exc
        if len(payload) > expected_bytes:
            raise MigrationError(
                f"the batch's lz4 frame holds more than the {expected_bytes} bytes its RAW and "
                "XOR_DELTA pages need"
            )
        if not decompressor.eof:
            raise MigrationError("the batch's lz4 frame is incomplete (cut short)")
        if decompressor.unused_data:
            raise MigrationError("the batch's lz4 frame is followed by extra bytes")
        if len(payload) != expected_bytes:
            raise MigrationError(
                f"the batch's lz4 frame holds {len(payload)} bytes, but its RAW and XOR_DELTA "
                f"pages need exactly {expected_bytes}"
            )
        return payload

    def digest(self, page_count: int, extra: bytes) -> bytes:
        """The state digest of what was received, built like `PageEncoder.digest`; equal
        digests at cutover mean the target holds what the source sent (invariant 8)."""
        return self._digests.digest(page_count, extra, "target")
