import msgpack

from demo_services.bank import BankService
from demo_services.kv import KvService
from failover.core.sessions import ClientSessions, ReplyStatus, encode_request_id
from failover.core.state_machine import ReplicatedStateMachine
from failover.storage.records import Entry


def put(key: str) -> bytes:
    return msgpack.packb({"op": "put", "key": key, "value": "v"})


def test_a_retry_logged_again_gets_the_first_entrys_reply_with_its_epoch_and_index() -> None:
    sm = ReplicatedStateMachine(KvService())
    sm.apply_barrier(1, 1)
    first = sm.apply(1, 2, encode_request_id("client", 7, opens=True), put("a"))
    sm.apply_barrier(2, 3)  # a failover: the retry reaches the new primary, logged again
    second = sm.apply(2, 4, encode_request_id("client", 7), put("a"))
    assert first == second
    assert (second.epoch, second.index) == (1, 2)  # the entry that applied it, not the retry
    assert second.status == ReplyStatus.OK
    assert sm.applied_index == 4 and sm.applied_epoch == 2


def test_snapshot_restore_keeps_recorded_replies_and_their_entries() -> None:
    sm = ReplicatedStateMachine(KvService())
    sm.apply_barrier(1, 1)
    reply = sm.apply(1, 2, encode_request_id("c", 1, opens=True), put("k"))
    copy = ReplicatedStateMachine(KvService())
    copy.restore(sm.snapshot())
    assert copy.digest() == sm.digest()
    assert copy.sessions.lookup("c", 1) == reply


def _bank_entries(first: int, count: int, clients: str) -> list[Entry]:
    """`count` opens of an account, each by a new client that opens its session."""
    return [Entry(1, first + k, encode_request_id(f"{clients}{k}", 1, opens=True),
                  msgpack.packb({"op": "open", "account": f"{clients}{k}", "balance": 1}))
            for k in range(count)]


def test_a_retry_after_its_session_was_evicted_is_expired_also_after_a_restore() -> None:
    sm = ReplicatedStateMachine(BankService(), ClientSessions(4, clients_max=3))
    sm.apply_barrier(1, 1)
    transfer = msgpack.packb({"op": "transfer", "from": "alice", "to": "bob", "amount": 10})
    sm.apply_many([
        Entry(1, 2, encode_request_id("setup", 1, opens=True),
              msgpack.packb({"op": "open", "account": "alice", "balance": 90})),
        Entry(1, 3, encode_request_id("setup", 2),
              msgpack.packb({"op": "open", "account": "bob", "balance": 0})),
        Entry(1, 4, encode_request_id("payer", 1, opens=True), transfer)])
    sm.apply_many(_bank_entries(5, 3, "other"))  # three other clients: payer is evicted
    assert not sm.sessions.knows("payer")
    copy = ReplicatedStateMachine(BankService(), ClientSessions(4, clients_max=3))
    copy.restore(sm.snapshot())
    retry = Entry(1, 8, encode_request_id("payer", 1), transfer)
    for machine, reply in ((sm, sm.apply(*retry)), (copy, copy.apply_many([retry])[0])):
        assert reply.status == ReplyStatus.EXPIRED and reply.data.startswith(b"SessionExpired")
        assert (reply.index, reply.epoch) == (8, 1)
        balance = machine.query(msgpack.packb({"op": "balance", "account": "alice"}))
        assert msgpack.unpackb(balance.data)["balance"] == 80  # debited once, not twice
    assert copy.digest() == sm.digest()
