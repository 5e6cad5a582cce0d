"""Page batch codecs: zero elision, XOR deltas, lz4 frames, batching, decoder errors, digests."""

from __future__ import annotations

import random
from array import array

import lz4.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failover import defaults
from failover.errors import MigrationError
from failover.paged_state import PagedState
from failover.v1 import migration_pb2
from migration.codec import (
    RAW,
    XOR_DELTA,
    ZERO,
    EncodedBatch,
    PageDecoder,
    PageEncoder,
    arena_digest,
    batches,
    page_digest,
    whole_arena_digest,
)

PB = 4096


def roundtrip(
    encoder: PageEncoder, decoder: PageDecoder, pages: list[tuple[int, bytes]]
) -> EncodedBatch:
    batch = encoder.encode(pages)
    decoded = decoder.decode(batch.page_numbers, batch.encodings, batch.pages_lz4)
    assert decoded == [(n, bytes(p)) for n, p in pages]
    return batch


def poke(page: bytes, rng: random.Random, writes: int = 3) -> bytes:
    out = bytearray(page)
    for _ in range(writes):
        offset = rng.randrange(len(out) - 8)
        out[offset : offset + 8] = rng.randbytes(8)
    return bytes(out)


def test_encodings_are_the_protos() -> None:
    assert RAW == migration_pb2.PAGE_ENCODING_RAW
    assert ZERO == migration_pb2.PAGE_ENCODING_ZERO
    assert XOR_DELTA == migration_pb2.PAGE_ENCODING_XOR_DELTA


def test_each_kind_of_page_gets_its_encoding_over_rounds() -> None:
    rng = random.Random(7)
    encoder, decoder = PageEncoder(PB), PageDecoder(PB)
    rand = rng.randbytes(PB)
    sparse = bytes(PB - 16) + rng.randbytes(16)
    repeated = b"token-42 " * (PB // 9) + b"x" * (PB % 9)
    # Round 0: first sends are RAW, zero pages ZERO with no bytes.
    first = [(0, rand), (1, bytes(PB)), (2, sparse), (3, repeated), (4, repeated)]
    b0 = roundtrip(encoder, decoder, first)
    assert b0.encodings == [RAW, ZERO, RAW, RAW, RAW]
    assert (b0.raw_bytes, b0.wire_bytes) == (5 * PB, len(b0.pages_lz4))
    assert (b0.zero_pages, b0.delta_pages) == (1, 0)
    assert len(lz4.frame.decompress(b0.pages_lz4)) == 4 * PB  # zero pages carry no bytes
    # Round 1: small writes go as deltas, a rewrite RAW, unchanged as a zero delta, zero page
    # written goes RAW (a delta against zeros is the page), a page cleared goes ZERO.
    rewritten = rng.randbytes(PB)
    second = [
        (0, poke(rand, rng)),
        (1, poke(bytes(PB), rng)),
        (2, bytes(PB)),
        (3, repeated),
        (4, rewritten),
    ]
    b1 = roundtrip(encoder, decoder, second)
    assert b1.encodings == [XOR_DELTA, RAW, ZERO, XOR_DELTA, RAW]
    assert (b1.zero_pages, b1.delta_pages) == (1, 2)
    # Round 2: deltas chain on the last sent version; a page cleared before comes back RAW.
    third = [(0, poke(second[0][1], rng)), (2, sparse), (4, poke(rewritten, rng))]
    b2 = roundtrip(encoder, decoder, third)
    assert b2.encodings == [XOR_DELTA, RAW, XOR_DELTA]
    assert b2.wire_bytes < PB  # two sparse deltas and one sparse page
    assert encoder.pages_sent == decoder.pages_received == 5


def test_deltas_make_small_writes_cheap_on_the_wire() -> None:
    rng = random.Random(3)
    pages = [(n, rng.randbytes(PB)) for n in range(256)]
    encoder, decoder = PageEncoder(PB), PageDecoder(PB)
    full = roundtrip(encoder, decoder, pages)
    touched = [(n, poke(p, rng, writes=4)) for n, p in pages]
    delta = roundtrip(encoder, decoder, touched)
    assert delta.delta_pages == 256
    assert delta.wire_bytes * 20 < full.wire_bytes
    # The same writes without deltas cost as much as the first copy.
    plain_encoder, plain_decoder = PageEncoder(PB, delta=False), PageDecoder(PB)
    roundtrip(plain_encoder, plain_decoder, pages)
    plain = roundtrip(plain_encoder, plain_decoder, touched)
    assert plain.delta_pages == 0 and plain.wire_bytes > 20 * delta.wire_bytes


def test_a_batch_of_only_zero_pages_sends_no_frame() -> None:
    encoder, decoder = PageEncoder(PB), PageDecoder(PB)
    batch = roundtrip(encoder, decoder, [(5, bytes(PB)), (9, bytearray(PB))])
    assert batch.pages_lz4 == b"" and batch.wire_bytes == 0 and batch.raw_bytes == 2 * PB
    assert roundtrip(encoder, decoder, []).page_numbers == []


def test_pages_are_copied_from_memoryviews_of_a_live_arena() -> None:
    rng = random.Random(11)
    source = PagedState.from_bytes(rng.randbytes(8 * PB), page_bytes=PB)
    target = PagedState(0, page_bytes=PB)
    encoder, decoder = PageEncoder(PB), PageDecoder(PB)
    for _ in range(4):
        numbers = source.take_dirty()
        batch = encoder.encode([(n, source.page(n)) for n in numbers])
        for n in numbers[:3]:  # the source keeps writing after encoding
            source.write(n * PB + 100, rng.randbytes(50))
        for n, page in decoder.decode(batch.page_numbers, batch.encodings, batch.pages_lz4):
            target.set_page(n, page)
    numbers = source.take_dirty()  # the stop-copy round
    batch = encoder.encode([(n, source.page(n)) for n in numbers])
    for n, page in decoder.decode(batch.page_numbers, batch.encodings, batch.pages_lz4):
        target.set_page(n, page)
    assert target.read(0, target.size_bytes) == source.read(0, source.size_bytes)
    extra = b"non-paged state"
    digest = encoder.digest(source.page_count, extra)
    assert digest == decoder.digest(target.page_count, extra)
    assert digest == whole_arena_digest(source.read(0, source.size_bytes), PB, extra)


def test_encode_arena_matches_encode_of_the_same_pages() -> None:
    rng = random.Random(13)
    arena = bytearray(rng.randbytes(6 * PB))
    arena[2 * PB : 3 * PB] = bytes(PB)
    by_pairs, by_arena, decoder = PageEncoder(PB), PageEncoder(PB), PageDecoder(PB)
    for _ in range(3):
        numbers = [0, 2, 3, 5, 1]
        view = memoryview(arena)
        a = by_pairs.encode([(n, view[n * PB : (n + 1) * PB]) for n in numbers])
        b = by_arena.encode_arena(arena, numbers)
        assert a == b
        decoded = decoder.decode(b.page_numbers, b.encodings, b.pages_lz4)
        assert decoded == [(n, bytes(arena[n * PB : (n + 1) * PB])) for n in numbers]
        del view
        arena[PB + 7] ^= 0x55
        arena[5 * PB + 100 : 5 * PB + 108] = rng.randbytes(8)
    assert by_pairs.digest(6, b"") == by_arena.digest(6, b"") == decoder.digest(6, b"")
    with pytest.raises(MigrationError, match=r"page number 6 is outside the arena's pages 0\.\.5"):
        PageEncoder(PB).encode_arena(arena, [6])
    with pytest.raises(MigrationError, match=r"page number -1 is outside"):
        PageEncoder(PB).encode_arena(arena, [-1])
    with pytest.raises(MigrationError, match=r"outside the arena's pages 0\.\.1"):
        PageEncoder(PB, pages_max=2).encode_arena(arena, [2])


def test_batches_cut_about_one_mib() -> None:
    assert defaults.MIGRATION_BATCH_BYTES == 1 << 20
    cut = list(batches(range(1000), PB))
    assert [len(c) for c in cut] == [256, 256, 256, 232]
    assert [n for c in cut for n in c] == list(range(1000))
    assert [len(c) for c in batches(range(10), 64, batch_bytes=256)] == [4, 4, 2]
    assert [len(c) for c in batches(range(3), PB, batch_bytes=100)] == [1, 1, 1]  # >= 1 page
    assert list(batches([], PB)) == []
    # Lazy: it takes pages only as each batch is needed.
    taken: list[int] = []

    def source() -> object:
        for n in range(600):
            taken.append(n)
            yield n

    it = batches(source(), PB)  # type: ignore[arg-type]
    next(it)
    assert len(taken) == 256
    with pytest.raises(MigrationError, match="batch_bytes must be positive"):
        list(batches([1], PB, batch_bytes=0))
    with pytest.raises(MigrationError, match="power of two"):
        list(batches([1], 1000))


def test_one_mib_batches_round_trip_through_the_proto() -> None:
    rng = random.Random(5)
    words = [rng.randbytes(4) for _ in range(300)]
    arena = {
        n: (bytes(PB) if n % 7 == 0 else b"".join(rng.choice(words) for _ in range(PB // 4)))
        for n in range(600)
    }
    encoder, decoder = PageEncoder(PB), PageDecoder(PB)
    received: dict[int, bytes] = {}
    for round_ in range(3):
        for chunk in batches(sorted(arena.items()), PB):
            encoded = encoder.encode(chunk)
            message = migration_pb2.PageBatch(
                round=round_,
                page_numbers=encoded.page_numbers,
                encodings=encoded.encodings,
                pages_lz4=encoded.pages_lz4,
                page_bytes=PB,
            )
            wire = migration_pb2.PageBatch.FromString(message.SerializeToString())
            assert len(wire.page_numbers) <= 256
            received.update(
                decoder.decode(
                    wire.page_numbers, wire.encodings, wire.pages_lz4, page_bytes=wire.page_bytes
                )
            )
        assert received == arena
        for n in rng.sample(sorted(arena), 100):
            arena[n] = poke(arena[n], rng)
    assert encoder.digest(600, b"") == decoder.digest(600, b"")


# --- decoder errors ------------------------------------------------------------------------


def sample_batch() -> tuple[PageEncoder, EncodedBatch]:
    rng = random.Random(1)
    encoder = PageEncoder(PB)
    batch = encoder.encode([(0, rng.randbytes(PB)), (1, bytes(PB)), (2, b"ab" * (PB // 2))])
    return encoder, batch


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: (b.page_numbers[:2], b.encodings, b.pages_lz4), "3 encodings"),
        (lambda b: (b.page_numbers, [RAW, 7, RAW], b.pages_lz4), r"unknown page encodings \[7\]"),
        (lambda b: (b.page_numbers, [RAW, 0, RAW], b.pages_lz4), r"unknown page encodings \[0\]"),
        (lambda b: (b.page_numbers, [RAW, RAW, RAW], b.pages_lz4), "need exactly 12288"),
        (
            lambda b: (b.page_numbers, [ZERO, ZERO, RAW], b.pages_lz4),
            "holds more than the 4096 bytes",
        ),
        (lambda b: (b.page_numbers, [RAW, ZERO, XOR_DELTA], b.pages_lz4), "never received"),
        (lambda b: (b.page_numbers, [ZERO] * 3, b.pages_lz4), "only ZERO pages but carries"),
        (lambda b: (b.page_numbers, b.encodings, b""), "carries none"),
        (lambda b: (b.page_numbers, b.encodings, b"garbage!" * 4), "does not decode"),
        (lambda b: (b.page_numbers, b.encodings, b.pages_lz4[:-6]), "incomplete"),
        (lambda b: (b.page_numbers, b.encodings, b.pages_lz4 + b"\0"), "extra bytes"),
        (
            lambda b: ([0, 1, -2], b.encodings, b.pages_lz4),
            r"outside the arena's bound 0\.\.262143",
        ),
        (
            lambda b: ([0, 1, 2**18], b.encodings, b.pages_lz4),
            r"outside the arena's bound 0\.\.262143",
        ),
        (lambda b: ([], [], b.pages_lz4), "no pages but carries"),
    ],
)
def test_the_decoder_refuses_inconsistent_batches(mangle: object, message: str) -> None:
    _, batch = sample_batch()
    decoder = PageDecoder(PB)
    with pytest.raises(MigrationError, match=message):
        decoder.decode(*mangle(batch))  # type: ignore[operator]
    # A refused batch changed nothing: the good one decodes, and a delta on it still fails.
    decoded = decoder.decode(batch.page_numbers, batch.encodings, batch.pages_lz4)
    assert [n for n, _ in decoded] == [0, 1, 2] and decoder.pages_received == 3


def test_a_delta_may_follow_its_page_in_the_same_batch() -> None:
    encoder, decoder = PageEncoder(64), PageDecoder(64)
    first, second = b"\x01" * 64, b"\x01" * 63 + b"\x02"
    batch = encoder.encode([(4, first), (4, second)])
    assert batch.encodings == [RAW, XOR_DELTA]
    assert decoder.decode(batch.page_numbers, batch.encodings, batch.pages_lz4) == [
        (4, first),
        (4, second),
    ]
    swapped = PageDecoder(64)
    with pytest.raises(MigrationError, match="page 4 came as an XOR delta but was never"):
        swapped.decode([4, 4], [XOR_DELTA, RAW], batch.pages_lz4)
    assert swapped.pages_received == 0


def test_the_decoder_refuses_a_frame_of_the_wrong_size() -> None:
    _, batch = sample_batch()
    short = lz4.frame.compress(lz4.frame.decompress(batch.pages_lz4)[:-1])
    with pytest.raises(MigrationError, match="holds 8191 bytes, but .* need exactly 8192"):
        PageDecoder(PB).decode(batch.page_numbers, batch.encodings, short)


def test_the_decoder_refuses_a_damaged_frame() -> None:
    _, batch = sample_batch()
    damaged = bytearray(batch.pages_lz4)
    damaged[4] ^= 0xFF  # the frame descriptor
    with pytest.raises(MigrationError, match="lz4 frame"):
        PageDecoder(PB).decode(batch.page_numbers, batch.encodings, bytes(damaged))


def test_the_decoder_refuses_another_page_size() -> None:
    _, batch = sample_batch()
    with pytest.raises(MigrationError, match="1024-byte pages; this migration's pages are 4096"):
        PageDecoder(PB).decode(
            batch.page_numbers, batch.encodings, batch.pages_lz4, page_bytes=1024
        )


def test_the_encoder_refuses_bad_pages_changing_nothing() -> None:
    encoder = PageEncoder(PB)
    with pytest.raises(MigrationError, match="page 3 is 100 bytes; this migration's pages are"):
        encoder.encode([(2, b"y" * PB), (3, b"x" * 100)])
    # Refused before anything changed: page 2 was not remembered as sent.
    assert encoder.pages_sent == 0
    assert encoder.encode([(2, b"y" * PB)]).encodings == [RAW]
    with pytest.raises(MigrationError, match=r"page number -1 is outside the arena's bound"):
        PageEncoder(PB).encode([(-1, bytes(PB))])
    with pytest.raises(MigrationError, match=r"page number 10 is outside the arena's bound 0\.\.9"):
        PageEncoder(PB, pages_max=10).encode([(10, bytes(PB))])
    with pytest.raises(
        MigrationError, match=r"pages_max must be a whole number in 1\.\.4294967296"
    ):
        PageDecoder(PB, pages_max=0)
    with pytest.raises(MigrationError, match="pages_max must be"):
        PageEncoder(PB, pages_max=2**32 + 1)
    with pytest.raises(MigrationError, match="power of two"):
        PageEncoder(3000)
    with pytest.raises(MigrationError, match="power of two"):
        PageDecoder(0)


# --- digests -------------------------------------------------------------------------------


def test_digests_see_every_page_the_shape_and_the_extra_state() -> None:
    rng = random.Random(2)
    pages = [rng.randbytes(64) for _ in range(4)] + [bytes(64)]
    arena = b"".join(pages)
    digests = [page_digest(p) for p in pages]
    base = arena_digest(digests, 64, b"extra")
    assert base == arena_digest(array("I", digests), 64, b"extra")
    assert base == whole_arena_digest(arena, 64, b"extra")
    assert len(base) == 32
    changed = bytearray(arena)
    changed[70] ^= 1
    assert whole_arena_digest(bytes(changed), 64, b"extra") != base
    assert arena_digest(digests, 64, b"extrb") != base
    assert arena_digest(digests + [page_digest(bytes(64))], 64, b"extra") != base  # grown
    assert arena_digest(digests, 128, b"extra") != base  # another page size
    # The extra state's length is hashed, so bytes cannot move between digests and extra.
    assert arena_digest(digests, 64, b"") != arena_digest(digests[:-1], 64, b"")
    with pytest.raises(MigrationError, match="whole number of 64-byte pages"):
        whole_arena_digest(arena[:-1], 64, b"")


def test_unsent_pages_count_as_zero_and_pages_past_the_arena_are_refused() -> None:
    encoder, decoder = PageEncoder(64), PageDecoder(64)
    page = b"\x07" * 64
    batch = encoder.encode([(2, page)])
    decoder.decode(batch.page_numbers, batch.encodings, batch.pages_lz4)
    expected = whole_arena_digest(bytes(128) + page + bytes(64 * 3), 64, b"")
    assert encoder.digest(6, b"") == decoder.digest(6, b"") == expected
    assert encoder.digest(8, b"") != expected  # the arena's size is part of its state
    assert encoder.digest(6, b"") == expected  # and asking for a larger one changed nothing
    with pytest.raises(MigrationError, match="source has page 2 but the arena is said to hold 2"):
        encoder.digest(2, b"")
    with pytest.raises(MigrationError, match="target has page 2"):
        decoder.digest(2, b"")


def test_a_page_changed_in_flight_changes_the_digest() -> None:
    encoder, decoder = PageEncoder(64), PageDecoder(64)
    batch = encoder.encode([(0, b"\x01" * 64), (1, b"\x02" * 64)])
    data = bytearray(lz4.frame.decompress(batch.pages_lz4))
    data[70] ^= 0x10  # damage that the frame itself does not catch
    decoder.decode(batch.page_numbers, batch.encodings, lz4.frame.compress(bytes(data)))
    assert encoder.digest(2, b"") != decoder.digest(2, b"")


# --- property ------------------------------------------------------------------------------

SMALL = 64  # small pages keep the property test fast

page_edit = st.one_of(
    st.just("zero"),
    st.just("same"),
    st.tuples(st.just("poke"), st.integers(0, SMALL - 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("fill"), st.binary(min_size=SMALL, max_size=SMALL)),
    st.tuples(st.just("copy"), st.integers(0, 15)),
)


@settings(max_examples=150, deadline=None)
@given(
    rounds=st.lists(
        st.lists(st.tuples(st.integers(0, 15), page_edit), max_size=24), min_size=1, max_size=6
    ),
    batch_bytes=st.sampled_from([SMALL, 3 * SMALL, 1024]),
    delta=st.booleans(),
)
def test_the_decoder_reproduces_every_page_across_rounds(
    rounds: list[list[tuple[int, object]]], batch_bytes: int, delta: bool
) -> None:
    arena: dict[int, bytes] = {}
    encoder, decoder = PageEncoder(SMALL, delta=delta), PageDecoder(SMALL)
    received: dict[int, bytes] = {}
    for edits in rounds:
        sent = []
        for n, edit in edits:
            page = arena.get(n, bytes(SMALL))
            if edit == "zero":
                page = bytes(SMALL)
            elif isinstance(edit, tuple) and edit[0] == "poke":
                offset, data = edit[1], edit[2][: SMALL - edit[1]]
                page = page[:offset] + data + page[offset + len(data) :]
            elif isinstance(edit, tuple) and edit[0] == "fill":
                page = edit[1]
            elif isinstance(edit, tuple) and edit[0] == "copy":
                page = arena.get(edit[1], bytes(SMALL))
            arena[n] = page
            sent.append((n, bytearray(page)))  # any bytes-like; repeats within a round too
        for chunk in batches(sent, SMALL, batch_bytes):
            batch = encoder.encode(chunk)
            assert batch.raw_bytes == len(chunk) * SMALL
            decoded = decoder.decode(batch.page_numbers, batch.encodings, batch.pages_lz4)
            assert decoded == [(n, bytes(p)) for n, p in chunk]
            received.update(decoded)
        assert received == arena
    assert encoder.digest(16, b"x") == decoder.digest(16, b"x")
    whole = b"".join(arena.get(n, bytes(SMALL)) for n in range(16))
    assert encoder.digest(16, b"x") == whole_arena_digest(whole, SMALL, b"x")


def test_a_whole_migration_planner_and_codecs_together() -> None:
    """The source loop of planner.py's docstring, with simulated time: the target ends with
    the source's state and the digests agree (invariant 8)."""
    from migration.planner import FITS, MigrationPlanner, PlannerConfig, RoundReport

    rng = random.Random(21)
    source = PagedState(512, page_bytes=PB)
    for n in range(0, 512, 3):
        source.write(n * PB, rng.randbytes(PB // 2))
    target = PagedState(0, page_bytes=PB)
    encoder, decoder = PageEncoder(PB), PageDecoder(PB)
    planner = MigrationPlanner(PlannerConfig(state_bytes=source.size_bytes, page_bytes=PB))
    bandwidth_bytes_per_ms = 100_000.0

    def send(numbers: list[int]) -> tuple[int, int, float]:
        raw = wire = 0
        for chunk in batches(numbers, PB):
            batch = encoder.encode([(n, source.page(n)) for n in chunk])
            for n, page in decoder.decode(batch.page_numbers, batch.encodings, batch.pages_lz4):
                target.set_page(n, page)
            raw, wire = raw + batch.raw_bytes, wire + batch.wire_bytes
        return raw, wire, raw / bandwidth_bytes_per_ms

    decision = planner.start()
    source.take_dirty()
    pages = list(range(source.page_count))
    writes = 200
    while not decision.cutover:
        raw, wire, elapsed = send(pages)
        for _ in range(writes):  # the writer, slowing down
            source.write(rng.randrange(source.size_bytes - 16), rng.randbytes(16))
        writes //= 3
        sent, pages = len(pages), source.take_dirty()
        decision = planner.round_done(
            RoundReport(decision.round, sent, raw, wire, elapsed, len(pages))
        )
    assert decision.reason == FITS
    pages = sorted(set(pages).union(source.take_dirty()))
    raw, wire, elapsed = send(pages)
    planner.cutover_done(RoundReport(decision.round, len(pages), raw, wire, elapsed))
    assert target.read(0, target.size_bytes) == source.read(0, source.size_bytes)
    assert encoder.digest(source.page_count, b"k") == decoder.digest(target.page_count, b"k")
    stats = planner.stats(total_ms=50.0, setup_ms=1.0, downtime_ms=elapsed)
    assert stats.rounds == decision.round + 1 and stats.compression_ratio is not None
    assert stats.compression_ratio > 2
