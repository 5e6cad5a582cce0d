"""PagedState: dirty tracking, the per-round swap, growth bound, receiver side, digest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failover.errors import PagedStateFullError
from failover.paged_state import PagedState

PB = 64  # small pages keep the tests fast and make page boundaries easy to hit


def test_new_arena_is_zero_and_clean() -> None:
    p = PagedState(3, page_bytes=PB)
    assert (p.page_count, p.page_bytes, p.size_bytes) == (3, PB, 3 * PB)
    assert p.dirty_count() == 0
    assert all(p.is_zero_page(n) for n in range(3))
    assert p.read(0, 3 * PB) == bytes(3 * PB)


def test_write_marks_every_touched_page_across_boundaries() -> None:
    p = PagedState(6, page_bytes=PB)
    p.write(PB - 1, b"ab")  # last byte of page 0, first of page 1
    assert p.take_dirty() == [0, 1]
    p.write(2 * PB, b"x" * PB)  # exactly page 2
    assert p.take_dirty() == [2]
    p.write(3 * PB + 5, b"y" * (2 * PB))  # 3, 4 and into 5
    assert p.take_dirty() == [3, 4, 5]
    p.write(10, b"")  # an empty write touches nothing
    assert p.dirty_count() == 0
    assert p.read(PB - 1, 2) == b"ab"


def test_take_dirty_swaps_in_a_fresh_set() -> None:
    p = PagedState(4, page_bytes=PB)
    p.write(0, b"a")
    p.write(3 * PB, b"b")
    assert p.dirty_count() == 2
    assert p.take_dirty() == [0, 3]
    assert p.dirty_count() == 0 and p.take_dirty() == []
    p.write(PB, b"c")  # a write after the swap lands in the new round only
    assert p.take_dirty() == [1]


def test_mark_all_dirty_and_mark_dirty() -> None:
    p = PagedState(5, page_bytes=PB)
    p.mark_all_dirty()
    assert p.take_dirty() == [0, 1, 2, 3, 4]
    p.mark_dirty([4, 1])
    assert p.is_dirty(1) and not p.is_dirty(2)
    assert p.take_dirty() == [1, 4]


def test_write_outside_the_arena_is_refused() -> None:
    p = PagedState(1, page_bytes=PB)
    with pytest.raises(IndexError, match="grow"):
        p.write(PB - 1, b"ab")
    with pytest.raises(IndexError):
        p.read(-1, 1)
    assert p.dirty_count() == 0 and p.is_zero_page(0)


def test_grow_adds_clean_zero_pages_up_to_the_bound() -> None:
    p = PagedState(1, page_bytes=PB, pages_max=4)
    p.write(0, b"keep")
    p.take_dirty()
    p.grow(3)
    assert p.page_count == 3 and p.dirty_count() == 0
    assert p.read(0, 4) == b"keep" and p.is_zero_page(2)
    p.grow(2)  # never shrinks
    assert p.page_count == 3
    p.grow(4)
    with pytest.raises(PagedStateFullError, match="bound is 4 pages") as info:
        p.grow(5)
    assert info.value.pages_requested == 5 and info.value.pages_max == 4
    assert p.page_count == 4
    with pytest.raises(PagedStateFullError):
        PagedState(5, page_bytes=PB, pages_max=4)


def test_grow_while_a_page_view_is_alive() -> None:
    p = PagedState(1, page_bytes=PB)
    p.write(0, b"old")
    view = p.page(0)
    p.grow(8)  # a bytearray with live exports cannot resize in place; the arena moves
    p.write(0, b"new")
    assert bytes(view[:3]) == b"old"
    assert bytes(p.page(0)[:3]) == b"new" and p.page_count == 8


def test_page_view_is_read_only() -> None:
    p = PagedState(2, page_bytes=PB)
    p.write(PB, b"z" * PB)
    view = p.page(1)
    assert view.readonly and bytes(view) == b"z" * PB
    with pytest.raises(TypeError):
        view[0] = 1
    with pytest.raises(IndexError):
        p.page(2)


def test_set_page_grows_and_marks_dirty() -> None:
    p = PagedState(0, page_bytes=PB, pages_max=8)
    p.set_page(5, b"q" * PB)
    assert p.page_count == 6 and p.take_dirty() == [5]
    assert bytes(p.page(5)) == b"q" * PB and p.is_zero_page(4)
    with pytest.raises(ValueError, match="page is 64 bytes"):
        p.set_page(0, b"short")
    with pytest.raises(PagedStateFullError):
        p.set_page(8, bytes(PB))


def test_receiver_rebuilds_an_equal_arena_from_dirty_rounds() -> None:
    source = PagedState(4, page_bytes=PB)
    target = PagedState(0, page_bytes=PB)
    source.mark_all_dirty()
    for round_writes in ([(0, b"hello")], [(3 * PB - 2, b"span"), (10, b"x")], []):
        for offset, data in round_writes:
            source.write(offset, data)
        for n in source.take_dirty():
            if not source.is_zero_page(n):
                target.set_page(n, source.page(n))
        target.grow(source.page_count)
    assert target.digest() == source.digest()


def test_digest_tracks_content_and_shape() -> None:
    a, b = PagedState(2, page_bytes=PB), PagedState(2, page_bytes=PB)
    assert a.digest() == b.digest() and len(a.digest()) == 32
    a.write(70, b"x")
    assert a.digest() != b.digest()
    b.write(70, b"x")
    assert a.digest() == b.digest()
    b.grow(3)  # an extra zero page is a different state
    assert a.digest() != b.digest()
    assert PagedState(2, page_bytes=PB).digest() != PagedState(1, page_bytes=2 * PB).digest()


def test_load_and_from_bytes() -> None:
    p = PagedState(1, page_bytes=PB, pages_max=3)
    p.load(b"a" * (2 * PB))
    assert p.page_count == 2 and p.take_dirty() == [0, 1]
    with pytest.raises(ValueError, match="whole number"):
        p.load(b"a" * (PB + 1))
    with pytest.raises(PagedStateFullError):
        p.load(bytes(4 * PB))
    assert p.read(0, 2 * PB) == b"a" * (2 * PB)
    q = PagedState.from_bytes(p.read(0, p.size_bytes), page_bytes=PB)
    assert q.digest() == p.digest()


def test_page_bytes_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError):
        PagedState(1, page_bytes=100)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 8 * PB - 1), st.binary(min_size=0, max_size=3 * PB)),
        max_size=20,
    )
)
def test_dirty_set_is_exactly_the_touched_pages(writes: list[tuple[int, bytes]]) -> None:
    p = PagedState(8, page_bytes=PB)
    model = bytearray(8 * PB)
    touched: set[int] = set()
    for offset, data in writes:
        data = data[: 8 * PB - offset]
        p.write(offset, data)
        model[offset : offset + len(data)] = data
        touched.update(range(offset // PB, (offset + len(data) - 1) // PB + 1) if data else [])
    assert p.dirty_count() == len(touched)
    assert p.take_dirty() == sorted(touched)
    assert p.read(0, 8 * PB) == bytes(model)
    assert [p.is_zero_page(n) for n in range(8)] == [
        not any(model[n * PB : (n + 1) * PB]) for n in range(8)
    ]
