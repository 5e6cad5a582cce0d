"""The pre-copy planner: convergence, auto-converge throttle, exact bounds, stop-copy, stats."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failover import defaults
from failover.errors import ConfigError, MigrationError
from migration import planner as planner_module
from migration import stats as stats_module
from migration.planner import (
    BYTES_MAX,
    FITS,
    PRECOPY,
    ROUNDS_MAX,
    STOPCOPY,
    Decision,
    MigrationPlanner,
    PlannerConfig,
    RoundReport,
)

PB = 4096


@dataclass
class Sim:
    """A deterministic source: a link of `bandwidth_bytes_per_ms` (raw), a fixed cost per
    round, and a writer dirtying `writes_per_ms(round)` distinct pages per ms, slowed by the
    throttle to at most `writers` writes per `throttle_ms` when `obeys_throttle`."""

    state_pages: int
    bandwidth_bytes_per_ms: float
    writes_per_ms: object  # callable: round -> writes per ms
    round_cost_ms: float = 0.5
    obeys_throttle: bool = True
    writers: float = 1.0  # concurrent writers: each waits throttle_ms per write
    wire_ratio: float = 3.0
    decisions: list[Decision] = field(default_factory=list)

    def run(self, planner: MigrationPlanner) -> tuple[Decision, int]:
        """Pre-copy rounds until cutover; returns the cutover decision and the pages left."""
        decision = planner.start()
        self.decisions.append(decision)
        pages = self.state_pages
        while not decision.cutover:
            elapsed = pages * PB / self.bandwidth_bytes_per_ms + self.round_cost_ms
            rate = self.writes_per_ms(decision.round)  # type: ignore[operator]
            if self.obeys_throttle and decision.throttle_ms > 0:
                rate = min(rate, self.writers / decision.throttle_ms)
            dirty = min(self.state_pages, int(rate * elapsed))
            decision = planner.round_done(
                RoundReport(
                    decision.round,
                    pages,
                    pages * PB,
                    int(pages * PB / self.wire_ratio),
                    elapsed,
                    dirty,
                )
            )
            self.decisions.append(decision)
            pages = dirty
        return decision, pages

    def finish(self, planner: MigrationPlanner, decision: Decision, pages: int) -> None:
        elapsed = pages * PB / self.bandwidth_bytes_per_ms + self.round_cost_ms
        planner.cutover_done(
            RoundReport(decision.round, pages, pages * PB, int(pages * PB / 3), elapsed)
        )


def config(**kwargs: object) -> PlannerConfig:
    kwargs.setdefault("state_bytes", 25_600 * PB)  # 100 MiB
    return PlannerConfig(**kwargs)  # type: ignore[arg-type]


# --- convergence ---------------------------------------------------------------------------


def cut_ms(pages: int, decision: Decision) -> float:
    """The paused round's predicted length for `pages` dirty pages (see the planner doc)."""
    assert decision.bandwidth_bytes_per_ms is not None
    return defaults.MIGRATION_CUT_OVERHEAD_MS + pages * PB / (
        decision.bandwidth_bytes_per_ms * defaults.MIGRATION_CUT_BANDWIDTH_FRACTION)


def test_a_slowing_writer_converges_by_fits_without_throttle() -> None:
    # 1 GB/s link; the writer dirties fewer pages each round (halving its rate).
    sim = Sim(25_600, 1_000_000.0, lambda r: 100.0 / (2**r))
    planner = MigrationPlanner(config())
    decision, pages = sim.run(planner)
    assert decision.cutover and decision.reason == FITS
    assert decision.predicted_downtime_ms is not None
    assert decision.predicted_downtime_ms <= defaults.MAX_DOWNTIME_MS
    assert decision.throttle_ms == 0.0
    assert all(d.throttle_ms == 0.0 for d in sim.decisions)
    assert 2 <= decision.round < defaults.MIGRATION_ROUNDS_MAX - 1
    # The prediction is the cut's fixed cost plus the dirty bytes at a fraction of the
    # estimate it reports.
    assert decision.bandwidth_bytes_per_ms is not None
    assert math.isclose(decision.predicted_downtime_ms, cut_ms(pages, decision))
    sim.finish(planner, decision, pages)
    stats = planner.stats(total_ms=200.0, setup_ms=3.0, downtime_ms=4.5)
    assert stats.cutover_reason == FITS and stats.method == PRECOPY
    assert stats.rounds == decision.round + 1
    assert stats.per_round[-1].paused and not any(r.paused for r in stats.per_round[:-1])
    assert [r.pages for r in stats.per_round][0] == 25_600


def test_a_quiet_state_cuts_over_after_round_zero() -> None:
    planner = MigrationPlanner(config())
    assert planner.start() == Decision(False, 0, "", 0.0, None, None)
    decision = planner.round_done(RoundReport(0, 25_600, 25_600 * PB, 1000, 100.0, 0))
    assert decision.cutover and decision.reason == FITS and decision.round == 1
    assert decision.predicted_downtime_ms == 0.0
    planner.cutover_done(RoundReport(1, 0, 0, 0, 0.1))
    assert planner.finished


def test_an_outrunning_writer_gets_a_growing_bounded_throttle_and_then_fits() -> None:
    # 2000 writers dirty 2000 pages/ms unthrottled: more than a whole round can send.
    sim = Sim(25_600, 1_000_000.0, lambda r: 2000.0, writers=2000.0)
    planner = MigrationPlanner(config(bytes_factor_max=10))
    decision, _ = sim.run(planner)
    throttles = [d.throttle_ms for d in sim.decisions[:-1]]
    # Round 0 runs unthrottled; each round that leaves every page dirty doubles the delay,
    # until 16 ms per write lets the copy gain (then it is kept).
    assert throttles[:6] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert set(throttles[6:]) <= {16.0}
    assert decision.cutover and decision.reason == FITS
    assert decision.predicted_downtime_ms is not None
    assert decision.predicted_downtime_ms <= defaults.MAX_DOWNTIME_MS
    assert decision.throttle_ms == 0.0 and planner.throttle_ms == 0.0  # stopped at cutover
    assert planner.precopy_raw_bytes <= planner.config.bytes_max


def test_an_outrunning_writer_still_ends_within_the_default_bounds() -> None:
    sim = Sim(25_600, 1_000_000.0, lambda r: 2000.0, writers=2000.0)
    planner = MigrationPlanner(config())
    decision, _ = sim.run(planner)
    assert [d.throttle_ms for d in sim.decisions] == [0.0, 1.0, 2.0, 0.0]
    assert decision.cutover and decision.reason == BYTES_MAX and decision.round == 3
    assert planner.precopy_raw_bytes == 3 * 25_600 * PB == planner.config.bytes_max


def test_a_writer_that_ignores_the_throttle_hits_the_max_and_ends_by_a_bound() -> None:
    sim = Sim(1000, 10_000.0, lambda r: 1e6, obeys_throttle=False)
    planner = MigrationPlanner(config(state_bytes=1000 * PB, bytes_factor_max=1000))
    decision, _ = sim.run(planner)
    throttles = [d.throttle_ms for d in sim.decisions[:-1]]
    assert max(throttles) == defaults.MIGRATION_THROTTLE_MAX_MS  # grows, then stays bounded
    assert throttles[-1] == defaults.MIGRATION_THROTTLE_MAX_MS
    assert decision.reason == ROUNDS_MAX and decision.round == defaults.MIGRATION_ROUNDS_MAX - 1


def test_the_throttle_doubles_up_to_its_max_and_is_kept_while_rounds_shrink() -> None:
    cfg = config(throttle_initial_ms=1.0, throttle_max_ms=4.0, rounds_max=100, bytes_factor_max=100)
    planner = MigrationPlanner(cfg)
    planner.start()
    bandwidth = 100.0  # bytes per ms: slow, so nothing fits
    seen = []
    pages = 1000
    for round_, dirty in enumerate([950, 950, 950, 950, 950, 800, 700, 700]):
        d = planner.round_done(
            RoundReport(round_, pages, pages * PB, 1, pages * PB / bandwidth, dirty)
        )
        assert not d.cutover
        seen.append(d.throttle_ms)
        pages = dirty
    # 950 of 1000 and 950 of 950 do not shrink by 10%: 1, 2, 4, 4 (capped), 4; 800 of 950
    # shrinks (kept); 700 of 800 shrinks by 12.5% (kept); 700 of 700 does not: stays at max.
    assert seen == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]


def test_shrinking_by_less_than_ten_percent_counts_as_not_shrinking() -> None:
    planner = MigrationPlanner(config(rounds_max=100, bytes_factor_max=100))
    planner.start()
    # 91 of 100 is 9% smaller: throttle; then 81 of 91 is 11% smaller: kept, not grown.
    d = planner.round_done(RoundReport(0, 100, 100 * PB, 1, 100 * PB / 10.0, 91))
    assert d.throttle_ms == 1.0
    d = planner.round_done(RoundReport(1, 91, 91 * PB, 1, 91 * PB / 10.0, 81))
    assert d.throttle_ms == 1.0
    # exactly 10% smaller shrinks enough.
    d = planner.round_done(RoundReport(2, 80, 80 * PB, 1, 80 * PB / 10.0, 72))
    assert d.throttle_ms == 1.0


# --- bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize("rounds_max", [1, 2, 3, 7, 30])
def test_rounds_max_counts_every_round_exactly(rounds_max: int) -> None:
    # A writer that ignores the throttle and a link that is never fast enough.
    sim = Sim(1000, 10.0, lambda r: 1e6, obeys_throttle=False)
    planner = MigrationPlanner(
        config(state_bytes=1000 * PB, rounds_max=rounds_max, bytes_factor_max=1e6)
    )
    decision, pages = sim.run(planner)
    assert decision.cutover and decision.reason == ROUNDS_MAX
    assert decision.round == rounds_max - 1  # the stop-copy round is the last allowed
    sim.finish(planner, decision, pages)
    stats = planner.stats(total_ms=1.0, setup_ms=0.0, downtime_ms=1.0)
    assert stats.rounds == rounds_max
    assert [r.round for r in stats.per_round] == list(range(rounds_max))


def test_bytes_max_stops_before_a_round_would_pass_it() -> None:
    # 100 pages of state, factor 3: 300 pages of pre-copy. Round 0 sends 100, then every
    # round leaves 40 dirty: 100 + 40 * 5 = 300 fits exactly; a sixth 40 would pass it.
    cfg = config(state_bytes=100 * PB, bytes_factor_max=3, rounds_max=1000)
    planner = MigrationPlanner(cfg)
    decision = planner.start()
    pages = 100
    while not decision.cutover:
        decision = planner.round_done(
            RoundReport(decision.round, pages, pages * PB, 1, pages * PB / 1.0, 40)
        )
        pages = 40
    assert decision.reason == BYTES_MAX
    assert planner.precopy_raw_bytes == cfg.bytes_max == 300 * PB
    assert decision.round == 6  # rounds 0..5 pre-copy, round 6 stop-copy
    planner.cutover_done(RoundReport(6, 40, 40 * PB, 1, 40.0 * PB))
    stats = planner.stats(total_ms=1.0, setup_ms=0.0, downtime_ms=1.0)
    assert sum(r.raw_bytes for r in stats.per_round if not r.paused) == 300 * PB


def test_fits_wins_over_the_other_bounds() -> None:
    planner = MigrationPlanner(config(state_bytes=10 * PB, rounds_max=2, bytes_factor_max=1))
    planner.start()
    d = planner.round_done(RoundReport(0, 10, 10 * PB, 1, 1.0, 1))  # 40960 B/ms
    assert d.reason == FITS


def test_no_measurement_means_no_fit() -> None:
    planner = MigrationPlanner(config(rounds_max=3))
    planner.start()
    d = planner.round_done(RoundReport(0, 10, 10 * PB, 1, 0.0, 5))  # took no measurable time
    assert not d.cutover and d.predicted_downtime_ms is None and d.bandwidth_bytes_per_ms is None
    d = planner.round_done(RoundReport(1, 5, 5 * PB, 1, 0.0, 5))
    assert d.cutover and d.reason == ROUNDS_MAX and d.predicted_downtime_ms is None


def test_bandwidth_is_an_ewma_of_raw_bytes_per_ms() -> None:
    planner = MigrationPlanner(config(max_downtime_ms=1, rounds_max=100, bytes_factor_max=100))
    planner.start()
    d = planner.round_done(RoundReport(0, 100, 100 * PB, 7, 100.0, 50))
    assert d.bandwidth_bytes_per_ms == pytest.approx(4096.0)
    d = planner.round_done(RoundReport(1, 50, 50 * PB, 7, 25.0, 40))  # sample 8192
    w = defaults.MIGRATION_BANDWIDTH_EWMA_WEIGHT
    assert d.bandwidth_bytes_per_ms == pytest.approx(w * 8192 + (1 - w) * 4096)
    assert d.predicted_downtime_ms == pytest.approx(cut_ms(40, d))
    # A round without bytes leaves the estimate alone.
    d = planner.round_done(RoundReport(2, 0, 0, 0, 5.0, 40))
    assert d.bandwidth_bytes_per_ms == pytest.approx(w * 8192 + (1 - w) * 4096)


# --- stop-copy -----------------------------------------------------------------------------


def test_stopcopy_cuts_over_at_once_and_sends_everything_paused() -> None:
    planner = MigrationPlanner(config(method=STOPCOPY, state_bytes=50 * PB))
    d = planner.start()
    assert d == Decision(True, 0, STOPCOPY, 0.0, None, None)
    with pytest.raises(MigrationError, match="cutover_done"):
        planner.round_done(RoundReport(0, 50, 50 * PB, 10, 5.0, 0))
    planner.cutover_done(RoundReport(0, 50, 50 * PB, 10 * PB, 5.0))
    stats = planner.stats(total_ms=9.0, setup_ms=1.0, downtime_ms=6.0)
    assert stats.method == STOPCOPY and stats.cutover_reason == STOPCOPY
    assert stats.rounds == 1 and stats.per_round[0].paused
    assert stats.compression_ratio == pytest.approx(5.0)


def test_precopy_with_one_round_is_a_stop_copy() -> None:
    d = MigrationPlanner(config(rounds_max=1)).start()
    assert d.cutover and d.round == 0 and d.reason == ROUNDS_MAX


# --- stats ---------------------------------------------------------------------------------


def test_stats_are_json_ready_and_carry_each_round() -> None:
    sim = Sim(2000, 50_000.0, lambda r: 3000.0 if r < 2 else 10.0)
    planner = MigrationPlanner(config(state_bytes=2000 * PB))
    decision, pages = sim.run(planner)
    sim.finish(planner, decision, pages)
    stats = planner.stats(total_ms=400.0, setup_ms=2.5, downtime_ms=3.0)
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["method"] == PRECOPY and data["rounds"] == len(data["per_round"]) == stats.rounds
    assert data["raw_bytes"] == sum(r["raw_bytes"] for r in data["per_round"])
    assert data["compression_ratio"] == pytest.approx(data["raw_bytes"] / data["wire_bytes"])
    assert data["setup_ms"] == 2.5 and data["downtime_ms"] == 3.0 and data["total_ms"] == 400.0
    first = data["per_round"][0]
    assert set(first) == {
        "round",
        "paused",
        "pages",
        "raw_bytes",
        "wire_bytes",
        "elapsed_ms",
        "dirty_pages",
        "dirty_pages_per_s",
        "throttle_ms",
    }
    assert first["dirty_pages_per_s"] == pytest.approx(
        first["dirty_pages"] * 1000 / first["elapsed_ms"]
    )
    assert [r["throttle_ms"] for r in data["per_round"]] == [
        d.throttle_ms for d in sim.decisions[:-1]
    ] + [0.0]
    assert data["predicted_downtime_ms"] == decision.predicted_downtime_ms


def test_stats_without_wire_bytes_have_no_ratio() -> None:
    planner = MigrationPlanner(config(method=STOPCOPY))
    planner.start()
    planner.cutover_done(RoundReport(0, 10, 10 * PB, 0, 0.0))
    stats = planner.stats(total_ms=0.0, setup_ms=0.0, downtime_ms=0.0)
    assert stats.compression_ratio is None
    assert stats.per_round[0].dirty_pages_per_s is None
    assert json.loads(json.dumps(stats.to_dict()))["compression_ratio"] is None


# --- determinism and properties ------------------------------------------------------------


def test_the_same_reports_give_the_same_decisions() -> None:
    def run() -> tuple[list[Decision], dict[str, object]]:
        sim = Sim(5000, 20_000.0, lambda r: max(0.0, 900.0 - 50 * r), writers=300.0)
        planner = MigrationPlanner(config(state_bytes=5000 * PB))
        decision, pages = sim.run(planner)
        sim.finish(planner, decision, pages)
        return sim.decisions, planner.stats(total_ms=1.0, setup_ms=0.1, downtime_ms=0.5).to_dict()

    assert run() == run()


@settings(max_examples=200, deadline=None)
@given(
    state_pages=st.integers(0, 5000),
    rounds_max=st.integers(1, 40),
    bytes_factor_max=st.floats(1.0, 6.0),
    max_downtime_ms=st.floats(0.1, 50.0),
    dirty=st.lists(st.integers(0, 6000), min_size=40, max_size=40),
    elapsed=st.lists(st.floats(0.0, 1e4), min_size=40, max_size=40),
)
def test_any_report_sequence_respects_every_bound(
    state_pages: int,
    rounds_max: int,
    bytes_factor_max: float,
    max_downtime_ms: float,
    dirty: list[int],
    elapsed: list[float],
) -> None:
    cfg = PlannerConfig(
        state_bytes=state_pages * PB,
        rounds_max=rounds_max,
        bytes_factor_max=bytes_factor_max,
        max_downtime_ms=max_downtime_ms,
    )
    planner = MigrationPlanner(cfg)
    decision = planner.start()
    pages = state_pages
    throttles = [decision.throttle_ms]
    while not decision.cutover:
        r = decision.round
        decision = planner.round_done(
            RoundReport(r, pages, pages * PB, pages * PB // 2, elapsed[r], dirty[r])
        )
        throttles.append(decision.throttle_ms)
        pages = dirty[r]
        if decision.cutover:
            break
        # a pre-copy round is only decided within both bounds
        assert decision.round + 2 <= rounds_max
        assert planner.precopy_raw_bytes + pages * PB <= cfg.bytes_max
    assert decision.round + 1 <= rounds_max
    assert decision.throttle_ms == 0.0
    live = throttles[:-1]
    assert all(0.0 <= t <= defaults.MIGRATION_THROTTLE_MAX_MS for t in live)
    assert all(b >= a for a, b in zip(live, live[1:], strict=False))  # never relaxed mid-way
    if decision.reason == FITS:
        assert decision.predicted_downtime_ms is not None
        assert decision.predicted_downtime_ms <= max_downtime_ms
    planner.cutover_done(RoundReport(decision.round, pages, pages * PB, 1, 1.0))
    assert planner.stats(total_ms=1.0, setup_ms=0.0, downtime_ms=1.0).rounds <= rounds_max


# --- misuse and config ---------------------------------------------------------------------


def test_reports_out_of_order_are_refused() -> None:
    planner = MigrationPlanner(config())
    with pytest.raises(MigrationError, match="start"):
        planner.round_done(RoundReport(0, 1, PB, 1, 1.0, 0))
    planner.start()
    with pytest.raises(MigrationError, match="started already"):
        planner.start()
    with pytest.raises(MigrationError, match="round 3 but round 0 was due"):
        planner.round_done(RoundReport(3, 1, PB, 1, 1.0, 0))
    with pytest.raises(MigrationError, match="pre-copy round: report it with round_done"):
        planner.cutover_done(RoundReport(0, 1, PB, 1, 1.0))
    with pytest.raises(MigrationError, match="pages must be a whole number"):
        planner.round_done(RoundReport(0, -1, PB, 1, 1.0, 0))
    with pytest.raises(MigrationError, match="elapsed_ms"):
        planner.round_done(RoundReport(0, 1, PB, 1, math.nan, 0))
    with pytest.raises(MigrationError, match="after cutover_done"):
        planner.stats(total_ms=1.0, setup_ms=0.0, downtime_ms=0.0)
    d = planner.round_done(RoundReport(0, 1, PB, 1, 1.0, 2))
    assert d.cutover
    with pytest.raises(MigrationError, match="source must be paused"):
        planner.cutover_done(RoundReport(1, 2, 2 * PB, 1, 1.0, dirty_pages=1))
    planner.cutover_done(RoundReport(1, 2, 2 * PB, 1, 1.0))
    with pytest.raises(MigrationError, match="finished"):
        planner.cutover_done(RoundReport(2, 0, 0, 0, 1.0))
    with pytest.raises(MigrationError, match="downtime_ms"):
        planner.stats(total_ms=1.0, setup_ms=0.0, downtime_ms=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "postcopy"}, "migration method 'postcopy': choose one of precopy, stopcopy"),
        ({"state_bytes": -1}, "state_bytes must be a whole number of bytes >= 0"),
        ({"state_bytes": 1.5}, "state_bytes must be a whole number"),
        ({"max_downtime_ms": 0}, "max_downtime_ms must be a finite number > 0"),
        ({"max_downtime_ms": math.inf}, "max_downtime_ms must be a finite number > 0"),
        ({"rounds_max": 0}, r"rounds_max must be a whole number >= 1 \(it counts the stop-copy"),
        ({"rounds_max": True}, "rounds_max must be a whole number"),
        ({"bytes_factor_max": 0.5}, r"bytes_factor_max must be a finite number >= 1 \(round 0"),
        ({"bytes_factor_max": math.nan}, "bytes_factor_max must be a finite number"),
        ({"page_bytes": 3000}, "page_bytes must be a positive power of two, got 3000"),
        ({"throttle_initial_ms": 0}, "throttle_initial_ms must be a finite number > 0"),
        ({"throttle_max_ms": 0.5}, r"throttle_max_ms must be a finite number >= throttle_initial"),
    ],
)
def test_invalid_config_is_rejected_clearly(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**kwargs)


def test_defaults_come_from_defaults_py() -> None:
    cfg = PlannerConfig(state_bytes=1)
    assert (cfg.max_downtime_ms, cfg.rounds_max, cfg.bytes_factor_max) == (20, 30, 3)
    assert cfg.page_bytes == defaults.PAGE_BYTES
    assert cfg.bytes_max == 3


# --- purity --------------------------------------------------------------------------------

FORBIDDEN = {
    "grpc",
    "asyncio",
    "socket",
    "selectors",
    "threading",
    "multiprocessing",
    "concurrent",
    "time",
    "datetime",
    "os",
    "io",
    "pathlib",
    "subprocess",
    "random",
    "lz4",
    "crc32c",
}


@pytest.mark.parametrize("module", [planner_module, stats_module])
def test_the_planner_imports_no_io_clock_or_thread(module: object) -> None:
    tree = ast.parse(Path(module.__file__).read_text())  # type: ignore[attr-defined]
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN
    assert imported <= {"__future__", "math", "dataclasses", "typing", "failover", "migration"}
