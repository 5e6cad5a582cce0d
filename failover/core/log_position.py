"""Log positions, epoch histories and the divergence point between two logs.

An epoch history lists (epoch, first_index) for every epoch that wrote entries, oldest first.
Only one primary writes in an epoch (the coordinator raises epochs and fences), so two logs
holding an entry with the same (epoch, index) hold the same entries up to that index: the
divergence point is the highest index at which both histories name the same epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class LogPosition(NamedTuple):
    """The entry at `index` was written in `epoch`; (0, 0) is the empty log."""

    epoch: int
    index: int


EpochHistory = Sequence[tuple[int, int]]  # (epoch, first_index), oldest first


def check_history(history: EpochHistory, last_index: int) -> None:
    """Asserts the shape every epoch history must have."""
    previous_epoch, previous_first = 0, 0
    for epoch, first_index in history:
        assert epoch > previous_epoch, f"epochs must grow in a history: {list(history)}"
        assert first_index > previous_first, f"first indexes must grow: {list(history)}"
        previous_epoch, previous_first = epoch, first_index
    assert not history or history[-1][1] <= last_index + 1, (history, last_index)


def epoch_at(history: EpochHistory, index: int) -> int:
    """The epoch of the entry at `index` by the history (0 for index 0 or before any epoch)."""
    result = 0
    for epoch, first_index in history:
        if first_index > index:
            break
        result = epoch
    return result


def match_index(
    history_a: EpochHistory, last_a: int, history_b: EpochHistory, last_b: int
) -> int:
    """The highest index up to which logs a and b hold the same entries (0 when none).

    For each epoch present in both, the two logs agree on the overlap of that epoch's index
    ranges; the answer is the largest such overlap's end.
    """
    ranges_a = _epoch_ranges(history_a, last_a)
    ranges_b = _epoch_ranges(history_b, last_b)
    best = 0
    for epoch, (start_a, end_a) in ranges_a.items():
        span_b = ranges_b.get(epoch)
        if span_b is None:
            continue
        start, end = max(start_a, span_b[0]), min(end_a, span_b[1])
        if start <= end:
            best = max(best, end)
    return best


def _epoch_ranges(history: EpochHistory, last_index: int) -> dict[int, tuple[int, int]]:
    ranges: dict[int, tuple[int, int]] = {}
    for i, (epoch, first_index) in enumerate(history):
        end = history[i + 1][1] - 1 if i + 1 < len(history) else last_index
        if first_index <= end:
            ranges[epoch] = (first_index, end)
    return ranges
