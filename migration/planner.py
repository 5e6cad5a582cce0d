"""The pre-copy planner: when to copy again, when to cut over, how hard to throttle (pure).

Pure like `failover/core/`: the caller measures each round and reports it; the planner keeps
the counts and returns a `Decision`. No clock, no I/O: times come in as arguments, so a
migration replays exactly from its reports.

The caller's loop (the source side)::

    planner = MigrationPlanner(PlannerConfig(state_bytes=state.size_bytes))
    decision = planner.start()
    state.take_dirty()                                  # count writes from round 0 on
    pages = range(state.page_count)                     # round 0 sends every page
    while not decision.cutover:
        throttle writes by decision.throttle_ms; send `pages` live as round decision.round
        pages = state.take_dirty()                      # dirtied during that round
        decision = planner.round_done(RoundReport(decision.round, sent, raw_bytes,
                                                  wire_bytes, elapsed_ms, len(pages)))
    pause applying                                      # throttle off: decision.throttle_ms 0
    pages = sorted(set(pages).union(state.take_dirty()))  # stopcopy: every page
    send `pages` as round decision.round, final; compare digests
    planner.cutover_done(RoundReport(decision.round, sent, raw_bytes, wire_bytes,
                                     elapsed_ms))
    stats = planner.stats(total_ms=..., setup_ms=..., downtime_ms=...)

Taking the dirty set right when a round ends and reporting its size makes the next round send
exactly what the planner was told, so the byte bound below holds exactly.

After each pre-copy round the planner cuts over, in this order of precedence, when:

* `fits`: the predicted stop-copy time is within `max_downtime_ms` (a round that leaves
  nothing dirty always fits). The prediction is a fixed cost (`MIGRATION_CUT_OVERHEAD_MS`:
  the burst, the target's check, its answer) plus the dirty bytes at a fraction
  (`MIGRATION_CUT_BANDWIDTH_FRACTION`) of the live rounds' measured bandwidth, since a short
  paused burst does not pipeline like a long round;
* `rounds_max`: one more pre-copy round would leave no room for the stop-copy round within
  `rounds_max` rounds (the stop-copy round counts: a migration sends at most `rounds_max`
  rounds);
* `bytes_max`: one more pre-copy round would take the raw bytes of the pre-copy rounds past
  `bytes_factor_max x state_bytes` (the stop-copy round, which must send what is dirty at the
  pause, comes on top).

Bandwidth is raw page bytes per ms of a round (so compression and zero pages count in its
favour), smoothed as an exponentially weighted mean with weight
`defaults.MIGRATION_BANDWIDTH_EWMA_WEIGHT` (0.5) on the newest round. A mean rather than the
maximum of recent rounds: a maximum is optimistic, and an optimistic estimate under-predicts the
pause and breaks `max_downtime_ms`, while a pessimistic one only costs another round. Weighting
the newest round follows the conditions the stop-copy round will meet (the rounds shrink towards
its size, so their fixed per-round costs weigh alike; a throttle changes the source's load)
within two rounds, and damps a single slow round (a GC pause, a scheduler hiccup). Rounds that
took no measurable time or sent no bytes carry no measurement and are skipped.

Auto-converge, as QEMU does it: when a round's dirty set did not shrink by at least
`defaults.MIGRATION_DIRTY_SHRINK_FRACTION_MIN` (10%) against the pages that round sent (the
previous dirty set), the writer is outrunning the copy, and the source must delay each write by
`throttle_ms` during the next round: `throttle_initial_ms` (1 ms) at first, doubling per
non-shrinking round up to `throttle_max_ms` (32 ms). A shrinking round keeps the throttle as it
is. At cutover the throttle is 0: the source is paused for the stop-copy round and resumes
unthrottled.

The `stopcopy` method has no pre-copy rounds: `start` cuts over at once and round 0, sent while
the source is paused, carries every page. The same planner keeps its stats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from failover import defaults
from failover.errors import ConfigError, MigrationError
from migration.stats import MigrationStats, RoundStats

PRECOPY = "precopy"
STOPCOPY = "stopcopy"
METHODS = (PRECOPY, STOPCOPY)

# Why a migration cut over (Decision.reason, MigrationStats.cutover_reason).
FITS = "fits"
ROUNDS_MAX = "rounds_max"
BYTES_MAX = "bytes_max"
REASONS = (FITS, ROUNDS_MAX, BYTES_MAX, STOPCOPY)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """What one migration may spend. Invalid values raise ConfigError at construction.

    `state_bytes` is the state's size when the migration starts (the paged arena plus the
    non-paged state): `bytes_factor_max` is relative to it.
    """

    state_bytes: int
    method: str = PRECOPY
    max_downtime_ms: float = defaults.MAX_DOWNTIME_MS
    rounds_max: int = defaults.MIGRATION_ROUNDS_MAX
    bytes_factor_max: float = defaults.MIGRATION_BYTES_FACTOR_MAX
    page_bytes: int = defaults.PAGE_BYTES
    throttle_initial_ms: float = defaults.MIGRATION_THROTTLE_INITIAL_MS
    throttle_max_ms: float = defaults.MIGRATION_THROTTLE_MAX_MS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"migration method {self.method!r}: choose one of {', '.join(METHODS)}"
            )
        if not _is_int(self.state_bytes) or self.state_bytes < 0:
            raise ConfigError(
                f"state_bytes must be a whole number of bytes >= 0, got {self.state_bytes!r}"
            )
        if not _is_number(self.max_downtime_ms) or self.max_downtime_ms <= 0:
            raise ConfigError(
                f"max_downtime_ms must be a finite number > 0, got {self.max_downtime_ms!r}"
            )
        if not _is_int(self.rounds_max) or self.rounds_max < 1:
            raise ConfigError(
                f"rounds_max must be a whole number >= 1 (it counts the stop-copy round), "
                f"got {self.rounds_max!r}"
            )
        if not _is_number(self.bytes_factor_max) or self.bytes_factor_max < 1:
            raise ConfigError(
                f"bytes_factor_max must be a finite number >= 1 (round 0 alone sends the whole "
                f"state once), got {self.bytes_factor_max!r}"
            )
        if (
            not _is_int(self.page_bytes)
            or self.page_bytes <= 0
            or self.page_bytes & (self.page_bytes - 1)
        ):
            raise ConfigError(
                f"page_bytes must be a positive power of two, got {self.page_bytes!r}"
            )
        if not _is_number(self.throttle_initial_ms) or self.throttle_initial_ms <= 0:
            raise ConfigError(
                f"throttle_initial_ms must be a finite number > 0, got {self.throttle_initial_ms!r}"
            )
        if not _is_number(self.throttle_max_ms) or self.throttle_max_ms < self.throttle_initial_ms:
            raise ConfigError(
                f"throttle_max_ms must be a finite number >= throttle_initial_ms "
                f"({self.throttle_initial_ms}), got {self.throttle_max_ms!r}"
            )

    @property
    def bytes_max(self) -> int:
        """The bound on raw bytes sent by the pre-copy rounds."""
        return math.floor(self.bytes_factor_max * self.state_bytes)


@dataclass(frozen=True, slots=True)
class RoundReport:
    """What the caller measured of one round it sent.

    `pages` were sent, `raw_bytes` is their size before encoding (pages x page_bytes),
    `wire_bytes` after; `elapsed_ms` is the round's duration on a monotonic clock; and
    `dirty_pages` the pages dirtied during the round, which the next round sends (0 for the
    stop-copy round, sent with the source paused).
    """

    round: int
    pages: int
    raw_bytes: int
    wire_bytes: int
    elapsed_ms: float
    dirty_pages: int = 0

    def check(self) -> None:
        """Raise MigrationError when a count is negative or not a number."""
        for name in ("round", "pages", "raw_bytes", "wire_bytes", "dirty_pages"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise MigrationError(
                    f"round report: {name} must be a whole number >= 0, got {value!r}"
                )
        if not _is_number(self.elapsed_ms) or self.elapsed_ms < 0:
            raise MigrationError(
                f"round report: elapsed_ms must be a finite number >= 0, got {self.elapsed_ms!r}"
            )


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do next.

    `round` is the round to send next: another pre-copy round (`cutover` False, sent live
    with each source write delayed by `throttle_ms`), or the stop-copy round (`cutover` True,
    sent with the source paused; `reason` says why, and `throttle_ms` is 0).
    `predicted_downtime_ms` is what a stop-copy round would take now (dirty bytes /
    `bandwidth_bytes_per_ms`); both are None before any round was measured.
    """

    cutover: bool
    round: int
    reason: str
    throttle_ms: float
    predicted_downtime_ms: float | None
    bandwidth_bytes_per_ms: float | None


class MigrationPlanner:
    """Drives one migration, `precopy` or `stopcopy`, from the caller's round reports."""

    __slots__ = (
        "_config",
        "_next",
        "_rounds",
        "_precopy_raw_bytes",
        "_bandwidth",
        "_throttle_ms",
        "_reason",
        "_predicted_ms",
        "_finished",
    )

    def __init__(self, config: PlannerConfig) -> None:
        """A planner for one migration under `config`."""
        self._config = config
        self._next: Decision | None = None  # the decision the next report answers
        self._rounds: list[RoundStats] = []
        self._precopy_raw_bytes = 0
        self._bandwidth: float | None = None
        self._throttle_ms = 0.0
        self._reason = ""
        self._predicted_ms: float | None = None
        self._finished = False

    @property
    def config(self) -> PlannerConfig:
        """The migration's bounds."""
        return self._config

    @property
    def bandwidth_bytes_per_ms(self) -> float | None:
        """The smoothed raw bandwidth so far; None before any round was measured."""
        return self._bandwidth

    @property
    def throttle_ms(self) -> float:
        """The delay per source write now in force (0 when none)."""
        return self._throttle_ms

    @property
    def precopy_raw_bytes(self) -> int:
        """Raw bytes sent by the pre-copy rounds so far."""
        return self._precopy_raw_bytes

    @property
    def finished(self) -> bool:
        """Whether the stop-copy round was reported."""
        return self._finished

    def start(self) -> Decision:
        """The first decision: pre-copy round 0 (every page, live), or with `stopcopy` (or
        `rounds_max` 1) cutover at once, round 0 carrying every page while paused."""
        if self._next is not None or self._finished:
            raise MigrationError("the migration planner was started already; use a new one")
        config = self._config
        if config.method == STOPCOPY:
            decision = self._cutover(0, STOPCOPY, None)
        elif config.rounds_max == 1:
            decision = self._cutover(0, ROUNDS_MAX, None)
        else:
            decision = Decision(False, 0, "", 0.0, None, None)
            self._next = decision
        return decision

    def round_done(self, report: RoundReport) -> Decision:
        """Take the measurements of the pre-copy round just sent; decide the next round.

        Raises MigrationError when no pre-copy round was due or the report names another
        round than the one decided.
        """
        expected = self._expect(report, cutover=False)
        config = self._config
        self._precopy_raw_bytes += report.raw_bytes
        if report.elapsed_ms > 0 and report.raw_bytes > 0:
            sample = report.raw_bytes / report.elapsed_ms
            weight = defaults.MIGRATION_BANDWIDTH_EWMA_WEIGHT
            self._bandwidth = (
                sample
                if self._bandwidth is None
                else weight * sample + (1.0 - weight) * self._bandwidth
            )
        self._rounds.append(
            self._round_stats(report, paused=False, throttle_ms=expected.throttle_ms)
        )
        dirty_bytes = report.dirty_pages * config.page_bytes
        if dirty_bytes == 0:
            predicted: float | None = 0.0
        elif self._bandwidth is None:
            predicted = None
        else:
            # The paused round is not pipelined like the live ones (one short burst, then the
            # target's check and its answer): it runs at a fraction of their bandwidth, after
            # a fixed cost (measured at about half, and a few ms, with 256 MiB of kvcache).
            predicted = (defaults.MIGRATION_CUT_OVERHEAD_MS + dirty_bytes
                         / (self._bandwidth * defaults.MIGRATION_CUT_BANDWIDTH_FRACTION))
        next_round = report.round + 1
        if predicted is not None and predicted <= config.max_downtime_ms:
            return self._cutover(next_round, FITS, predicted)
        if next_round + 2 > config.rounds_max:  # another pre-copy round, then the stop-copy one
            return self._cutover(next_round, ROUNDS_MAX, predicted)
        if self._precopy_raw_bytes + dirty_bytes > config.bytes_max:
            return self._cutover(next_round, BYTES_MAX, predicted)
        shrink_min = defaults.MIGRATION_DIRTY_SHRINK_FRACTION_MIN
        if report.dirty_pages > report.pages * (1.0 - shrink_min):  # the writer outruns us
            self._throttle_ms = (
                config.throttle_initial_ms
                if self._throttle_ms == 0.0
                else min(self._throttle_ms * 2.0, config.throttle_max_ms)
            )
        decision = Decision(False, next_round, "", self._throttle_ms, predicted, self._bandwidth)
        self._next = decision
        return decision

    def cutover_done(self, report: RoundReport) -> None:
        """Take the measurements of the stop-copy round (sent with the source paused, so its
        `dirty_pages` must be 0). Raises MigrationError when no cutover was decided or the
        report names another round."""
        self._expect(report, cutover=True)
        if report.dirty_pages:
            raise MigrationError(
                f"the stop-copy round {report.round} reports {report.dirty_pages} pages dirtied "
                "during it, but the source must be paused while it is sent"
            )
        self._rounds.append(self._round_stats(report, paused=True, throttle_ms=0.0))
        self._next = None
        self._finished = True

    def stats(self, *, total_ms: float, setup_ms: float, downtime_ms: float) -> MigrationStats:
        """The migration's statistics, once the stop-copy round was reported; the caller
        measured the three times (see MigrationStats)."""
        if not self._finished:
            raise MigrationError(
                "migration stats are complete only after cutover_done reported the stop-copy round"
            )
        for name, value in (
            ("total_ms", total_ms),
            ("setup_ms", setup_ms),
            ("downtime_ms", downtime_ms),
        ):
            if not _is_number(value) or value < 0:
                raise MigrationError(f"{name} must be a finite number >= 0, got {value!r}")
        return MigrationStats(
            method=self._config.method,
            cutover_reason=self._reason,
            state_bytes=self._config.state_bytes,
            total_ms=float(total_ms),
            setup_ms=float(setup_ms),
            downtime_ms=float(downtime_ms),
            predicted_downtime_ms=self._predicted_ms,
            per_round=tuple(self._rounds),
        )

    # --- internals -----------------------------------------------------------------------

    def _expect(self, report: RoundReport, *, cutover: bool) -> Decision:
        decision = self._next
        if decision is None:
            state = "finished" if self._finished else "not started (call start() first)"
            raise MigrationError(f"no round is due: the migration planner is {state}")
        if decision.cutover != cutover:
            raise MigrationError(
                f"round {decision.round} is the stop-copy round: report it with cutover_done"
                if decision.cutover
                else f"round {decision.round} is a pre-copy round: report it with round_done"
            )
        report.check()
        if report.round != decision.round:
            raise MigrationError(
                f"the report is for round {report.round} but round {decision.round} was due"
            )
        return decision

    def _cutover(self, round_: int, reason: str, predicted: float | None) -> Decision:
        self._throttle_ms = 0.0
        self._reason = reason
        self._predicted_ms = predicted
        decision = Decision(True, round_, reason, 0.0, predicted, self._bandwidth)
        self._next = decision
        return decision

    def _round_stats(self, report: RoundReport, *, paused: bool, throttle_ms: float) -> RoundStats:
        rate = report.dirty_pages * 1000.0 / report.elapsed_ms if report.elapsed_ms > 0 else None
        return RoundStats(
            round=report.round,
            paused=paused,
            pages=report.pages,
            raw_bytes=report.raw_bytes,
            wire_bytes=report.wire_bytes,
            elapsed_ms=float(report.elapsed_ms),
            dirty_pages=report.dirty_pages,
            dirty_pages_per_s=rate,
            throttle_ms=throttle_ms,
        )
