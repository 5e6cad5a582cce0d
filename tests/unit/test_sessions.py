from failover.core.sessions import (
    EXPIRED,
    ClientSessions,
    Reply,
    ReplyStatus,
    TooOld,
    decode_request_id,
    encode_request_id,
)


def reply(i: int) -> Reply:
    return Reply(ReplyStatus.OK, b"r%d" % i, i)


def test_request_id_round_trips() -> None:
    assert decode_request_id(encode_request_id("client:1", 2**40)) == ("client:1", 2**40)


def test_recorded_reply_is_returned_and_window_is_bounded() -> None:
    s = ClientSessions(replies_per_client_max=4, clients_max=10)
    for seq in (3, 1, 2, 5, 4, 6):  # applied out of order, as concurrent requests may be
        s.record("c", seq, reply(seq))
    assert s.lookup("c", 6) == reply(6)
    assert s.lookup("c", 3) == reply(3)
    # The two smallest seqs were dropped: their outcome can no longer be told.
    assert s.lookup("c", 1) == TooOld(2) and s.lookup("c", 2) == TooOld(2)
    assert s.lookup("c", 7) is None


def test_least_recently_applied_client_is_evicted_and_round_trip_keeps_state() -> None:
    s = ClientSessions(replies_per_client_max=2, clients_max=2)
    s.record("a", 1, reply(1))
    s.record("b", 1, reply(2))
    s.record("a", 2, reply(3))
    s.record("c", 1, reply(4))  # evicts b, applied least recently
    # b is unknown now: a request of it is expired, unless it opens the session.
    assert s.lookup("b", 1) is EXPIRED and s.lookup("b", 1, opens=True) is None
    assert s.lookup("a", 1) == reply(1)
    copy = ClientSessions.from_bytes(s.to_bytes(), 2, 2)
    assert copy.digest() == s.digest()
    copy.record("a", 3, reply(5))
    s.record("a", 3, reply(5))
    assert copy.digest() == s.digest() and copy.lookup("a", 1) == TooOld(1)


def test_only_a_request_that_opens_its_session_adds_a_client() -> None:
    s = ClientSessions(replies_per_client_max=4, clients_max=2)
    assert s.lookup("a", 1) is EXPIRED and s.lookup("a", 1, opens=True) is None
    found, claims = s.claim_many([encode_request_id("a", 1), encode_request_id("a", 2, True),
                                  encode_request_id("a", 3), encode_request_id("b", 1)])
    # a:1 comes before a's session is open: expired. a:2 opens it, a:3 goes under it; b is
    # unknown and does not open one.
    assert found == {0: EXPIRED, 3: EXPIRED} and claims.seqs == [2, 3]
    assert s.knows("a") and not s.knows("b") and len(s) == 1
    # The client evicted, its retries are expired: never new (Raft dissertation, 6.3).
    s.record("b", 1, reply(1))
    s.record("c", 1, reply(2))
    assert not s.knows("a")
    found, claims = s.claim_many([encode_request_id("a", 3), encode_request_id("a", 2)])
    assert found == {0: EXPIRED, 1: EXPIRED} and not claims.seqs
    assert s.lookup("a", 2) is EXPIRED
