from hypothesis import given, settings
from hypothesis import strategies as st

from failover.core.log_position import check_history, epoch_at, match_index


def history_of(epochs: list[int]) -> list[tuple[int, int]]:
    """The epoch history of a log whose entry i+1 has epoch epochs[i]."""
    out: list[tuple[int, int]] = []
    for i, e in enumerate(epochs, start=1):
        if not out or out[-1][0] != e:
            out.append((e, i))
    return out


def test_epoch_at_follows_the_history() -> None:
    h = [(1, 1), (3, 5), (4, 9)]
    assert [epoch_at(h, i) for i in (0, 1, 4, 5, 8, 9, 100)] == [0, 1, 1, 3, 3, 4, 4]


def test_identical_logs_match_to_the_shorter_end() -> None:
    h = [(1, 1), (2, 4)]
    assert match_index(h, 10, h, 7) == 7


def test_divergent_suffix_is_excluded() -> None:
    primary = history_of([1, 1, 1, 3, 3])  # epoch 2's primary wrote nothing that survived
    old = history_of([1, 1, 1, 2, 2, 2])  # the old primary wrote 4..6 in epoch 2
    assert match_index(primary, 5, old, 6) == 3


def test_empty_logs_match_nothing() -> None:
    assert match_index([], 0, [(1, 1)], 5) == 0


@settings(max_examples=300, deadline=None)
@given(
    common=st.lists(st.integers(1, 3), max_size=20),
    tail_a=st.lists(st.integers(4, 6), max_size=10),
    tail_b=st.lists(st.integers(7, 9), max_size=10),
)
def test_match_is_the_longest_common_prefix(
    common: list[int], tail_a: list[int], tail_b: list[int]
) -> None:
    # Epochs only grow along a log, and diverging suffixes come from different epochs.
    common.sort()
    tail_a.sort()
    tail_b.sort()
    a, b = common + tail_a, common + tail_b
    ha, hb = history_of(a), history_of(b)
    check_history(ha, len(a))
    check_history(hb, len(b))
    assert match_index(ha, len(a), hb, len(b)) == len(common)
