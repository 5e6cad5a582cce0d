"""ReplicaCore's side of trust (issue 13, invariant 14): a duplica takes shipped items and
snapshots only from the primary the coordinator named, an epoch is adopted only from it, a
primary takes none, and a looping switchover prepare cannot freeze writes."""

from __future__ import annotations

import pytest

from failover import defaults
from failover.core.log_position import LogPosition
from failover.core.replica import Append, PersistMeta, Refuse
from failover.core.replication import AckView
from failover.core.roles import DUPLICA, PRIMARY
from failover.errors import PermissionDenied, StaleEpochError, Unavailable
from tests.unit.test_replica_core import Node, catch_up

EMPTY = LogPosition(0, 0)
HUGE = (1 << 63) - 1


def duplica_of(primary: str = "p", epoch: int = 1) -> Node:
    node = Node()
    node.run([node.core.assign(DUPLICA, epoch, "sync", (primary, "addr"), {}, set())])
    return node


def test_a_same_epoch_batch_from_a_host_that_is_not_the_named_primary_is_refused() -> None:
    node = duplica_of("p")
    assert node.core.on_batch(1, EMPTY, 3, 3, node.info(), 0, sender="x") == [
        Refuse("not_primary")]
    assert node.core.on_batch(1, EMPTY, 3, 3, node.info(), 0, sender="") == [
        Refuse("not_primary")]
    assert node.core.hears_primary(0) == (False, 0)  # a refused sender is not the primary
    assert node.core.on_truncate(1, 0, 0, sender="x") == [Refuse("not_primary")]
    assert node.core.on_probe(1, 0, sender="x") == [Refuse("not_primary")]
    assert "its primary is 'p'" in node.core.sender_error(1, "x")
    # The named primary is taken, and an unchecked sender (None) as before.
    assert node.core.on_batch(1, EMPTY, 3, 3, node.info(), 0, sender="p") == [Append()]
    assert node.core.on_batch(1, EMPTY, 3, 3, node.info(), 0) == [Append()]


@pytest.mark.parametrize("epoch", [2, HUGE])
def test_a_newer_epoch_from_any_other_sender_is_not_adopted(epoch: int) -> None:
    node = duplica_of("p")
    for event in (lambda: node.core.on_probe(epoch, 0, sender="x"),
                  lambda: node.core.on_batch(epoch, EMPTY, 0, 0, node.info(), 0, sender="x"),
                  lambda: node.core.on_truncate(epoch, 0, 0, sender="x")):
        assert event() == [Refuse("not_primary")]  # no PersistMeta: nothing to write
    assert node.core.epoch == 1 and node.meta_on_disk.epoch == 1
    # From the primary it was told about, a newer epoch is adopted (persisted first).
    adopt = node.core.on_probe(epoch, 0, sender="p")
    assert isinstance(adopt[0], PersistMeta) and adopt[0].meta.epoch == epoch


def test_an_older_epoch_is_refused_stale_whoever_sends_it_so_a_deposed_primary_is_fenced() -> None:
    node = duplica_of("p", epoch=3)
    assert node.core.on_batch(2, EMPTY, 1, 0, node.info(), 0, sender="x") == [
        Refuse("stale_epoch")]


def test_a_primary_takes_no_shipped_item_and_steps_down_for_none() -> None:
    node = Node()
    node.assign(PRIMARY, 1)
    for epoch in (1, 2, HUGE):
        assert node.core.on_batch(epoch, EMPTY, 1, 0, node.info(), 0, sender="x") == [
            Refuse("not_primary")]
        assert node.core.on_probe(epoch, 0, sender="x") == [Refuse("not_primary")]
    assert (node.core.role, node.core.epoch) == (PRIMARY, 1)
    assert node.meta_on_disk.role == PRIMARY and node.meta_on_disk.epoch == 1
    # Unchecked (the simulation's drivers), a newer primary still deposes it, as before.
    assert isinstance(node.core.on_probe(2, 0)[0], PersistMeta)


def test_a_snapshot_is_installed_only_on_a_duplica_at_its_epoch_from_its_named_primary() -> None:
    node = duplica_of("p", epoch=2)
    node.core.check_snapshot(2, "p")
    node.core.check_snapshot(2)  # unchecked sender
    with pytest.raises(PermissionDenied, match="install a snapshot"):
        node.core.check_snapshot(2, "x")
    for epoch in (1, 3, HUGE):
        with pytest.raises(StaleEpochError):
            node.core.check_snapshot(epoch, "p")
    primary = Node()
    primary.assign(PRIMARY, 1)
    for sender in ("p", "x", None):
        with pytest.raises(PermissionDenied, match="replace the data"):
            primary.core.check_snapshot(1, sender)


def test_a_not_primary_refusal_marks_the_duplica_failed_at_the_sender() -> None:
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.links_up.add("b")
    node.run(node.core.link_up("b", 0))
    node.run(node.core.on_ack("b", AckView("not_primary", 1, message="not yours"), 0))
    assert node.core.primary is not None
    assert node.core.primary.peers["b"].last_error == "not yours"


def test_a_looping_prepare_holds_writes_at_most_half_of_the_time() -> None:
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.flush()
    node.core.prepare_switchover(1, "b", "s1", now_ms=0)
    node.run(node.core.prepare_failed("s1", now_ms=1000))  # held 1000 ms, then given up
    assert not node.core.holding
    for switchover_id in ("s1", "s2"):  # the same id or another: writes flow 1000 ms first
        with pytest.raises(Unavailable, match="writes flow for 500 ms"):
            node.core.prepare_switchover(1, "b", switchover_id, now_ms=1500)
    assert not node.core.holding
    node.core.check_primary(0)
    node.core.prepare_switchover(1, "b", "s2", now_ms=2000)
    assert node.core.holding


def test_joining_a_prepared_hold_again_never_extends_its_deadline() -> None:
    node = Node()
    node.assign(PRIMARY, 1, {"b": "addr"}, {"b"})
    node.flush()
    node.core.prepare_switchover(1, "b", "s1", now_ms=0)
    catch_up(node, "b")
    timer = node.core.switchover_prepared(100)[0]
    node.core.prepare_switchover(1, "b", "s1", now_ms=4000)  # the same id joins
    assert node.core.switchover_prepared(4000) == []  # no later deadline
    assert node.core.tick(100 + defaults.SWITCHOVER_TIMEOUT_MS) and not node.core.holding
    with pytest.raises(Unavailable):  # and it held 5100 ms: no new hold for as long
        node.core.prepare_switchover(1, "b", "s1", now_ms=100 + defaults.SWITCHOVER_TIMEOUT_MS)
    assert timer.at_ms == 100 + defaults.SWITCHOVER_TIMEOUT_MS


def test_a_serving_primarys_data_is_dropped_only_at_its_own_epoch() -> None:
    node = Node(role=PRIMARY, coordinated=True)
    node.core.grant_lease(1, 1000, 0)  # confirmed by the coordinator: it serves
    for epoch in (2, HUGE):
        with pytest.raises(PermissionDenied, match="demoted before its data is dropped"):
            node.core.check_drop(epoch, delete_data=True)
    node.core.check_drop(2, delete_data=False)  # closing it keeps its data
    node.core.check_drop(1, delete_data=True)  # its service deleted
    with pytest.raises(StaleEpochError):
        duplica_of("p", epoch=3).core.check_drop(2, delete_data=True)
    duplica_of("p", epoch=3).core.check_drop(HUGE, delete_data=True)


def test_a_primary_recovered_and_never_confirmed_may_be_dropped_at_a_newer_epoch() -> None:
    # Deposed while it was down: it serves nothing, and the coordinator's records no longer
    # hold it; refusing would leave its data behind for good.
    zombie = Node(role=PRIMARY, coordinated=True)
    assert not zombie.core.coordinator_confirmed
    zombie.core.check_drop(2, delete_data=True)
