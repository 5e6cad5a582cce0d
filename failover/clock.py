"""The one clock agents and the coordinator measure leases, timeouts and silences with.

It is CLOCK_BOOTTIME: like CLOCK_MONOTONIC it never goes back and ignores changes of the
wall-clock time, but it also counts the time the machine was suspended. A primary whose host
was suspended (a paused VM, a laptop lid) past its lease must find the lease over when it
wakes; on CLOCK_MONOTONIC, which stops during a suspend, the lease would seem to run on and
the primary would answer reads alone beside the one promoted meanwhile (invariant 6).
Platforms without CLOCK_BOOTTIME (macOS, Windows) fall back to CLOCK_MONOTONIC.

Every reading that is compared with another must come from here: the values of two clocks
cannot be compared. `failover.core` reads no clock at all: its callers pass these values in.
"""

from __future__ import annotations

import time


def _boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _has_boottime() -> bool:
    try:
        _boottime_ns()
    except (AttributeError, OSError):  # not defined here, or the kernel refuses it
        return False
    return True


#: Nanoseconds on CLOCK_BOOTTIME (or CLOCK_MONOTONIC where there is none); only differences
#: between two readings mean anything.
monotonic_ns = _boottime_ns if _has_boottime() else time.monotonic_ns


def monotonic_ms() -> int:
    """Whole milliseconds on the same clock as `monotonic_ns`."""
    return monotonic_ns() // 1_000_000
