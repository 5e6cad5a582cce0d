"""The coordinator's operations as plans (`failover.core.coordinator.operations`), driven by
hand: events in (an agent's answer, a tick with the time, the caller going away), actions
out. No process, no clock: what the daemon would call is read off the actions, and its
answers are fed back with `CoordinatorCore.answer`."""

from __future__ import annotations

from typing import Any

import pytest

from failover import defaults
from failover.core.coordinator import (
    DUPLICA,
    Action,
    AssignRole,
    Done,
    Failed,
    HostInfo,
    Persist,
    Prepared,
    PrepareSwitchover,
    Progress,
    PushRoutes,
    ReleaseSwitchover,
    RestartAgent,
    Restarted,
    StartMigration,
    StartSwitchover,
    SwitchoverPlan,
)
from failover.core.coordinator.actions import Copied, CopyRound
from failover.core.coordinator.operations import PREPARE_ANSWER_GRACE_MS
from failover.errors import InvalidRequest

from .test_coordinator_rebuild import HB, METRICS, Driver


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def rows(actions: list[Action]) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [row for a in of(actions, Persist) for row in a.history]


def ready(hosts: int = 3, replicas: int = 3) -> Driver:
    """A cluster whose service s has its primary on h1 and every duplica in sync and
    promotable."""
    d = Driver([f"h{i}" for i in range(1, hosts + 1)])
    d.create(replicas=replicas)
    d.write("s", 10)
    d.step(3 * HB)
    s = d.core.services["s"]
    assert s.primary == "h1" and len(s.promotable) == replicas - 1, s
    return d


# --- switchover ---------------------------------------------------------------------------


def test_a_switchover_prepares_then_hands_over_under_a_new_persisted_epoch() -> None:
    d = ready()
    s = d.core.services["s"]
    actions = d.run(d.core.start_switchover("op", "s", "", d.now))
    [prepare] = actions
    assert isinstance(prepare, PrepareSwitchover)
    assert (prepare.host_id, prepare.address, prepare.epoch) == ("h1", "h1:1", 1)
    assert prepare.target in s.promotable and prepare.switchover_id
    assert prepare.timeout_ms == defaults.SWITCHOVER_TIMEOUT_MS
    assert prepare.answer_within_ms > prepare.timeout_ms
    assert d.core.switchovers == {"s": prepare.target}
    d.now += 7
    actions = d.run(d.core.answer("op", Prepared(True), d.now))
    # The new epoch is persisted before any agent hears of it (invariant 1).
    first_persist = next(i for i, a in enumerate(actions) if isinstance(a, Persist))
    first_assign = next(i for i, a in enumerate(actions) if isinstance(a, AssignRole))
    assert first_persist < first_assign
    assert [r[1] for r in rows(actions)] == ["switchover"]
    assert of(actions, PushRoutes) and actions[-1] == Done(
        "op", {"epoch": 2, "primary": prepare.target, "stall_ms": 7})
    assert (s.primary, s.epoch, s.replicas["h1"]) == (prepare.target, 2, DUPLICA)
    assert "h1" in s.in_sync and d.core.switchovers == {} and d.core.operations == {}
    # A late or repeated answer changes nothing.
    assert d.core.answer("op", Prepared(True), d.now) == []


@pytest.mark.parametrize("ending", ["refused", "timeout", "cancelled"])
def test_a_switchover_that_ends_early_releases_the_primary_and_says_why(ending: str) -> None:
    d = ready()
    s = d.core.services["s"]
    [prepare] = d.run(d.core.start_switchover("op", "s", "h3", d.now))
    assert prepare.target == "h3"
    if ending == "refused":
        actions = d.run(d.core.answer("op", Prepared(False, "h3 did not catch up"), d.now))
    elif ending == "timeout":
        # Nothing happens before the answer's deadline...
        d.step(defaults.SWITCHOVER_TIMEOUT_MS)
        assert d.core.switchovers == {"s": "h3"}
        assert not [a for a in d.actions if isinstance(a, ReleaseSwitchover | Failed)]
        # ...then the plan gives up by itself.
        d.step(prepare.answer_within_ms - defaults.SWITCHOVER_TIMEOUT_MS)
        actions = [a for a in d.actions if isinstance(a, ReleaseSwitchover | Persist | Failed)]
    else:
        actions = d.run(d.core.cancel("op", "the caller went away", d.now))
    release = of(actions, ReleaseSwitchover)
    assert release == [ReleaseSwitchover("h1", "h1:1", "s", 1, prepare.switchover_id)]
    [row] = [r for r in rows(actions) if r[1] == "switchover_aborted"]
    assert row[0] == "s" and "h1 serves on" in row[2] and row[3]["target"] == "h3"
    [failed] = of(actions, Failed)
    assert failed.op_id == "op" and "abandoned" in failed.why
    # Abandoned in the core: failover, rebuilds and later switchovers go on.
    assert d.core.switchovers == {} and d.core.operations == {}
    assert (s.primary, s.epoch) == ("h1", 1)
    # The answer that arrives after all takes no effect.
    assert d.core.answer("op", Prepared(True), d.now) == []
    assert (s.primary, s.epoch) == ("h1", 1)


def test_an_unanswered_prepare_is_asked_again_with_the_same_id_within_the_first_bounds(
) -> None:
    """Found by sweep seed short/246 (before the fix): the primary prepared at once and its
    answer was lost; the coordinator waited the whole answer deadline (6 s), the primary held
    writes for its whole timeout (5 s), and the gap after that hold refused the next try.
    Asked again, a primary that prepared already answers at once (it joins its own hold)."""
    d = ready()
    s = d.core.services["s"]
    [first] = d.run(d.core.start_switchover("op", "s", "h3", d.now))
    d.actions.clear()
    started = d.now
    op_deadline = started + first.answer_within_ms
    d.step(defaults.PREPARE_RESEND_MS - 1)
    assert not of(d.actions, PrepareSwitchover)  # not before PREPARE_RESEND_MS
    d.step(defaults.SWITCHOVER_TIMEOUT_MS + PREPARE_ANSWER_GRACE_MS
           - defaults.PREPARE_RESEND_MS - 1)
    again = of(d.actions, PrepareSwitchover)
    assert len(again) == defaults.SWITCHOVER_TIMEOUT_MS // defaults.PREPARE_RESEND_MS - 1, again
    for prepare in again:
        # The same switchover at the same epoch: the primary joins the hold it holds.
        assert (prepare.switchover_id, prepare.epoch, prepare.target) == (
            first.switchover_id, 1, "h3")
        # Never a hold past the first one's end, every answer awaited to the same deadline.
        assert prepare.answer_within_ms - prepare.timeout_ms == PREPARE_ANSWER_GRACE_MS
        assert 0 < prepare.timeout_ms < first.timeout_ms
    # An answer to any of them completes the switchover.
    actions = d.run(d.core.answer("op", Prepared(True), d.now))
    assert of(actions, Done) and (s.primary, s.epoch) == ("h3", 2)
    assert d.now < op_deadline
    d.actions.clear()
    d.step(2 * defaults.PREPARE_RESEND_MS)
    assert not of(d.actions, PrepareSwitchover)


def test_a_switchover_to_a_member_not_known_to_hold_every_write_is_refused() -> None:
    d = ready()
    s = d.core.services["s"]
    s.promotable = ["h2"]
    with pytest.raises(InvalidRequest, match="promotable"):
        d.core.start_switchover("op", "s", "h3", d.now)
    assert d.core.switchovers == {} and d.core.operations == {}
    [prepare] = d.core.start_switchover("op2", "s", "", d.now)
    assert prepare.target == "h2"


def test_a_switchover_of_a_service_deleted_meanwhile_is_abandoned() -> None:
    d = ready()
    [prepare] = d.run(d.core.start_switchover("op", "s", "", d.now))
    d.run(d.core.delete_service("s"))
    actions = d.run(d.core.answer("op", Prepared(True), d.now))
    assert of(actions, ReleaseSwitchover)[0].switchover_id == prepare.switchover_id
    assert "deleted" in of(actions, Failed)[0].why and not of(actions, AssignRole)


def test_a_switchover_abandoned_after_a_reload_releases_without_persisting() -> None:
    """After a failed commit the daemon ends each plan it had not seen end: the switchover
    whose hand-over was never stored still releases the primary, and writes nothing."""
    d = ready()
    [prepare] = d.core.start_switchover("op", "s", "", d.now)
    plan = d.core.operations["op"]
    assert isinstance(plan, SwitchoverPlan)
    assert of(d.core.answer("op", Prepared(True), d.now), Done)  # its Persist then failed
    actions = plan.abandon("the store refused a commit")
    assert not of(actions, Persist)
    assert of(actions, ReleaseSwitchover)[0].switchover_id == prepare.switchover_id
    assert of(actions, Failed)


# --- drain --------------------------------------------------------------------------------


def test_a_drain_moves_the_primary_by_switchover_and_retries_after_a_failure() -> None:
    d = ready()
    d.run(d.core.set_draining("h1", True))
    d.step(2 * HB)
    [move] = of(d.actions, StartSwitchover)
    d.actions.clear()
    [prepare] = d.run(d.core.start_primary_move("drain-1", move, d.now))
    assert isinstance(prepare, PrepareSwitchover) and prepare.target == move.to_host
    d.step(HB)  # no second move while this one is in progress
    assert not of(d.actions, StartSwitchover)
    actions = d.run(d.core.answer("drain-1", Prepared(False, "UNAVAILABLE"), d.now))
    assert of(actions, ReleaseSwitchover) and of(actions, Failed)
    [row] = rows(actions)
    assert row[1] == "drain" and "trying again: " in row[2]
    # Asked again once a failure timeout has passed since the last attempt.
    d.step(defaults.FAILURE_TIMEOUT_MS)
    [again] = of(d.actions, StartSwitchover)
    [prepare] = d.run(d.core.start_primary_move("drain-2", again, d.now))
    actions = d.run(d.core.answer("drain-2", Prepared(True), d.now))
    assert of(actions, Done) and d.core.services["s"].primary == again.to_host


def test_a_drain_move_that_cannot_start_is_recorded_not_raised() -> None:
    d = ready()
    actions = d.core.start_primary_move("drain-1", StartSwitchover("s", "h9"), d.now)
    [row] = rows(actions)
    assert row[1] == "drain" and "h9" in row[2]
    assert of(actions, Failed) and d.core.operations == {} and d.core.switchovers == {}


# --- migration ----------------------------------------------------------------------------


def test_a_migration_copies_then_records_the_copy_and_reports_its_rounds() -> None:
    d = ready(hosts=4)
    [start] = d.run(d.core.start_migration("op", "s", "h4", d.now))
    assert isinstance(start, StartMigration)
    assert (start.host_id, start.target_host_id, start.epoch) == ("h1", "h4", 1)
    assert d.core.migrations == {"s": ("h1", "h4")}
    [progress] = d.core.answer("op", CopyRound("round", 1, 10, 2, detail="as-it-came"), d.now)
    assert progress == Progress("op", "round", "round 1, 10 pages, 2 dirty", detail="as-it-came")
    actions = d.run(d.core.answer("op", Copied(True, {"pages": 10}), d.now))
    assert [r[1] for r in rows(actions)] == ["migration"]
    assert of(actions, Progress)[-1].step == "catching_up" and not of(actions, Done)
    assert d.core.services["s"].replicas["h4"] == "building"
    assert d.core.migrations == {}


def test_a_failed_or_interrupted_copy_is_aborted_and_the_source_serves_on() -> None:
    d = ready(hosts=4)
    d.run(d.core.start_migration("op", "s", "h4", d.now))
    actions = d.run(d.core.answer("op", Copied(False, why="target unreachable"), d.now))
    assert [r[1] for r in rows(actions)] == ["migration_aborted"]
    [failed] = of(actions, Failed)
    assert "h1 serves on: target unreachable" in failed.why
    assert d.core.migrations == {} and "h4" not in d.core.services["s"].replicas
    d.run(d.core.start_migration("op2", "s", "h4", d.now))
    actions = d.run(d.core.cancel("op2", "interrupted", d.now))
    assert [r[1] for r in rows(actions)] == ["migration_aborted"] and of(actions, Failed)
    assert d.core.migrations == {}


def test_a_migration_is_refused_before_anything_changes() -> None:
    d = ready(hosts=4)
    with pytest.raises(InvalidRequest, match="method"):
        d.core.start_migration("op", "s", "h4", d.now, method="teleport")
    with pytest.raises(InvalidRequest, match="already holds"):
        d.core.start_migration("op", "s", "h2", d.now)
    assert d.core.migrations == {} and d.core.operations == {}


def test_a_move_that_would_have_to_keep_its_source_is_refused() -> None:
    """Found by sweep seed long/41 (with the prepare asked again): a service short of a
    replica moved its primary to the one free host; the source, marked leaving, could never
    be retired (nothing else could replace it), so the move waited out its deadline and the
    service counted one replica short for good."""
    d = ready(hosts=4)
    d.broken[("h3", "s")] = "its snapshot does not read back"
    d.beat("h3")
    with pytest.raises(InvalidRequest, match="2 of its 3 replicas: the missing ones are "
                                             "rebuilt first"):
        d.core.start_migration("op", "s", "h4", d.now)
    assert d.core.migrations == {} and d.core.operations == {}
    assert d.core.services["s"].leaving == []


def test_a_replica_lost_during_the_copy_is_replaced_by_it_and_the_source_stays() -> None:
    d = ready(hosts=4)
    s = d.core.services["s"]
    d.run(d.core.start_migration("op", "s", "h4", d.now))
    d.broken[("h3", "s")] = "its snapshot does not read back"
    d.beat("h3")
    actions = d.run(d.core.answer("op", Copied(True, {"pages": 10}), d.now))
    [row] = [r for r in rows(actions) if r[1] == "migration"]
    assert "h1 stays: s has 2 of its 3 replicas without it" in row[2]
    assert row[3]["source_stays"] is True
    [failed] = of(actions, Failed)
    assert "the copy on h4 replaces it and h1 stays" in failed.why
    assert s.replicas["h4"] == "building" and s.primary == "h1" and s.leaving == []
    assert d.core.operations == {} and not of(actions, StartSwitchover)


# --- patch --------------------------------------------------------------------------------


def restart(d: Driver, host: str, started_at: float) -> None:
    """The agent re-executed: it registers again with its new start time."""
    d.run(d.core.register(HostInfo(host, f"{host}:1", started_at=started_at), d.now, METRICS))


def test_a_patch_moves_primaries_off_before_the_restart_then_waits_and_fails_back() -> None:
    d = ready()
    s = d.core.services["s"]
    actions = d.run(d.core.start_patch("op", ["h1"], d.now, command="true", failback=True,
                                       method="switchover"))
    assert "h1" in d.core.patching
    assert [a.step for a in of(actions, Progress)] == ["drain"]
    [prepare] = of(actions, PrepareSwitchover)
    assert not of(actions, RestartAgent), "no restart while h1 holds a primary"
    # The primary is off: only then is h1 taken out of the in-sync sets and restarted.
    actions = d.run(d.core.answer("op", Prepared(True), d.now))
    assert s.primary == prepare.target and "h1" not in s.in_sync
    order = [type(a).__name__ for a in actions]
    assert order.index("RestartAgent") > order.index("AssignRole")
    assert [a.step for a in of(actions, Progress)] == ["move", "restart"]
    [restart_call] = of(actions, RestartAgent)
    assert (restart_call.host_id, restart_call.command) == ("h1", "true")
    assert not of(actions, Done | Failed)
    actions = d.run(d.core.answer("op", Restarted(True, version="v1"), d.now))
    assert [r[2] for r in rows(actions)] == ["h1 re-executes (was version v1)"]
    # Waiting for the agent to come back with a new start time: a heartbeat or a
    # registration with the old one is not it.
    d.step(3 * HB)
    restart(d, "h1", 0.0)
    d.step(HB)
    assert not [a for a in of(d.actions, Progress) if a.step == "recover"]
    assert "h1" in d.core.patching
    d.actions.clear()
    restart(d, "h1", 2.0)
    d.step(HB)
    assert [a.step for a in of(d.actions, Progress)] == ["recover"]
    assert "h1" not in d.core.patching
    # Its replica catches up and rejoins the in-sync set; then the primary moves back.
    d.catch_up("s", "h1")
    d.step(3 * HB)
    [back] = of(d.actions, PrepareSwitchover)
    assert (back.target, back.host_id) == ("h1", prepare.target)
    assert back.switchover_id != prepare.switchover_id
    d.actions.clear()
    actions = d.run(d.core.answer("op", Prepared(True), d.now))
    assert s.primary == "h1"
    assert [a.step for a in of(actions, Progress)] == ["failback", "done"]
    assert [r[2] for r in rows(actions) if r[1] == "patch"] == ["h1 patched"]
    assert actions[-1] == Done("op", {"hosts": ["h1"]}) and d.core.operations == {}


def test_a_patch_surges_a_copy_first_and_switches_over_when_the_copy_fails() -> None:
    d = ready(hosts=4)
    actions = d.run(d.core.start_patch("op", ["h1"], d.now))
    [start] = of(actions, StartMigration)
    assert (start.host_id, start.target_host_id) == ("h1", "h4")
    assert not of(actions, RestartAgent)
    [round_step] = of(d.core.answer("op", CopyRound("round", 1, 5, 3), d.now), Progress)
    assert round_step.step == "move" and "round 1, 5 pages, 3 dirty" in round_step.message
    actions = d.run(d.core.answer("op", Copied(False, why="the copy broke"), d.now))
    assert "switching over instead" in of(actions, Progress)[-1].message
    assert of(actions, PrepareSwitchover) and not of(actions, RestartAgent)
    actions = d.run(d.core.answer("op", Prepared(True), d.now))
    assert of(actions, RestartAgent)


def test_a_patch_step_that_fails_stops_with_the_cluster_serving_and_history_says_so() -> None:
    d = ready()
    d.run(d.core.start_patch("op", ["h1", "h2"], d.now, method="switchover"))
    d.run(d.core.answer("op", Prepared(True), d.now))
    actions = d.run(d.core.answer("op", Restarted(False, why="exit status 3"), d.now))
    [row] = rows(actions)
    assert row[1] == "patch_failed" and "exit status 3" in row[2]
    [failed_step] = of(actions, Progress)
    assert failed_step.step == "failed" and not failed_step.ok
    assert of(actions, Failed) and d.core.patching == set() and d.core.operations == {}


def test_a_patched_host_that_does_not_come_back_fails_the_patch_at_its_deadline() -> None:
    d = ready()
    d.run(d.core.start_patch("op", ["h1"], d.now, method="switchover"))
    d.run(d.core.answer("op", Prepared(True), d.now))
    d.run(d.core.answer("op", Restarted(True, version="v1"), d.now))
    d.actions.clear()
    d.step(defaults.PATCH_RESTART_TIMEOUT_MS - HB)
    assert not of(d.actions, Failed) and "h1" in d.core.patching
    d.step(2 * HB)
    [failed] = of(d.actions, Failed)
    assert "did not come back" in failed.why
    assert [r[1] for r in rows(d.actions) if r[1].startswith("patch")] == ["patch_failed"]
    assert d.core.patching == set()


def test_a_patch_is_refused_before_anything_changes() -> None:
    d = ready()
    with pytest.raises(InvalidRequest, match="no host 'h9'"):
        d.core.start_patch("op", ["h9"], d.now)
    with pytest.raises(InvalidRequest, match="name a host"):
        d.core.start_patch("op", [], d.now)
    with pytest.raises(InvalidRequest, match="method"):
        d.core.start_patch("op", ["h1"], d.now, method="teleport")
    assert d.core.patching == set() and d.core.operations == {}


def test_a_cancelled_patch_releases_its_switchover_and_unmarks_the_host() -> None:
    d = ready()
    [prepare] = of(d.run(d.core.start_patch("op", ["h1"], d.now, method="switchover")),
                   PrepareSwitchover)
    actions = d.run(d.core.cancel("op", "interrupted", d.now))
    assert of(actions, ReleaseSwitchover)[0].switchover_id == prepare.switchover_id
    assert [r[1] for r in rows(actions)] == ["switchover_aborted", "patch_failed"]
    assert of(actions, Failed) and d.core.patching == set() and d.core.switchovers == {}
