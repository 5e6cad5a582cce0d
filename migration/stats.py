"""Statistics of one live migration: per round and overall, ready for JSON (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RoundStats:
    """One round of a migration, as the caller measured it.

    `throttle_ms` is the delay per source write that was in force during the round;
    `dirty_pages` the pages written during it (what the next round sends), and
    `dirty_pages_per_s` their rate (None when the round took no measurable time).
    The stop-copy round (`paused`) runs with the source paused, so nothing is dirtied.
    """

    round: int
    paused: bool
    pages: int
    raw_bytes: int
    wire_bytes: int
    elapsed_ms: float
    dirty_pages: int
    dirty_pages_per_s: float | None
    throttle_ms: float

    def to_dict(self) -> dict[str, Any]:
        """The round as a dict of JSON types."""
        return {
            "round": self.round,
            "paused": self.paused,
            "pages": self.pages,
            "raw_bytes": self.raw_bytes,
            "wire_bytes": self.wire_bytes,
            "elapsed_ms": self.elapsed_ms,
            "dirty_pages": self.dirty_pages,
            "dirty_pages_per_s": self.dirty_pages_per_s,
            "throttle_ms": self.throttle_ms,
        }


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """One whole migration: its method, why it cut over, its times and its rounds.

    `total_ms` runs from the start to the target holding the cut state; `setup_ms` is the part
    before round 0 (connecting, sending the setup batch); `downtime_ms` the time the source was
    paused; `predicted_downtime_ms` what the planner expected of the stop-copy round when it
    decided to cut over (None without a bandwidth measurement, as with `stopcopy`).
    """

    method: str
    cutover_reason: str
    state_bytes: int
    total_ms: float
    setup_ms: float
    downtime_ms: float
    predicted_downtime_ms: float | None
    per_round: tuple[RoundStats, ...]

    @property
    def rounds(self) -> int:
        """Rounds sent, the stop-copy round included."""
        return len(self.per_round)

    @property
    def raw_bytes(self) -> int:
        """Page bytes sent over all rounds, before encoding (pages x page_bytes)."""
        return sum(r.raw_bytes for r in self.per_round)

    @property
    def wire_bytes(self) -> int:
        """Encoded bytes sent over all rounds."""
        return sum(r.wire_bytes for r in self.per_round)

    @property
    def compression_ratio(self) -> float | None:
        """raw_bytes / wire_bytes; None when nothing went on the wire (all pages zero)."""
        wire = self.wire_bytes
        return self.raw_bytes / wire if wire else None

    def to_dict(self) -> dict[str, Any]:
        """The migration as a dict of JSON types (`json.dumps` takes it as it is)."""
        return {
            "method": self.method,
            "cutover_reason": self.cutover_reason,
            "state_bytes": self.state_bytes,
            "total_ms": self.total_ms,
            "setup_ms": self.setup_ms,
            "downtime_ms": self.downtime_ms,
            "predicted_downtime_ms": self.predicted_downtime_ms,
            "rounds": self.rounds,
            "raw_bytes": self.raw_bytes,
            "wire_bytes": self.wire_bytes,
            "compression_ratio": self.compression_ratio,
            "per_round": [r.to_dict() for r in self.per_round],
        }
