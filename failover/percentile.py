"""Nearest-rank percentiles, as the benchmarks and chaos reports state them."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (0 < q <= 100) of an ascending sequence; None if
    empty. Nearest rank never interpolates, so p99 of 20 samples is their maximum."""
    assert 0 < q <= 100, q
    if not sorted_values:
        return None
    rank = max(1, int(-(-q * len(sorted_values) // 100)))  # ceil(q/100 * n)
    return sorted_values[min(rank, len(sorted_values)) - 1]
