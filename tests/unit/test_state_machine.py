import msgpack

from demo_services.kv import KvService
from failover.core.sessions import ReplyStatus, encode_request_id
from failover.core.state_machine import ReplicatedStateMachine


def put(key: str) -> bytes:
    return msgpack.packb({"op": "put", "key": key, "value": "v"})


def test_a_retry_logged_again_gets_the_first_entrys_reply_with_its_epoch_and_index() -> None:
    sm = ReplicatedStateMachine(KvService())
    sm.apply_barrier(1, 1)
    rid = encode_request_id("client", 7)
    first = sm.apply(1, 2, rid, put("a"))
    sm.apply_barrier(2, 3)  # a failover: the retry reaches the new primary, logged again
    second = sm.apply(2, 4, rid, put("a"))
    assert first == second
    assert (second.epoch, second.index) == (1, 2)  # the entry that applied it, not the retry
    assert second.status == ReplyStatus.OK
    assert sm.applied_index == 4 and sm.applied_epoch == 2


def test_snapshot_restore_keeps_recorded_replies_and_their_entries() -> None:
    sm = ReplicatedStateMachine(KvService())
    sm.apply_barrier(1, 1)
    reply = sm.apply(1, 2, encode_request_id("c", 1), put("k"))
    copy = ReplicatedStateMachine(KvService())
    copy.restore(sm.snapshot())
    assert copy.digest() == sm.digest()
    assert copy.sessions.lookup("c", 1) == reply
