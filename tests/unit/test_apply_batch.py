"""The batched apply path equals applying one entry at a time: replies, sessions, state.

`ReplicatedStateMachine.apply_many` (and below it `ClientSessions.claim_many` and the kinds'
batch apply, kv's own `apply_batch` or the default `apply_each`) must give exactly what
`apply` / `apply_barrier` give entry by entry, whatever the batches: the same replies
(recorded ones for duplicate request ids, refusals for invalid, too-old and expired requests,
and for requests a kind fails on), the same exactly-once table (evictions, and sessions
opened, included), the same digest, and for kv the same arena bytes and dirty pages.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo_services.bank import BankService
from demo_services.kv import KEY_BYTES_MAX, KvService
from failover.core.sessions import ClientSessions, Reply, ReplyStatus, encode_request_id
from failover.core.state_machine import ReplicatedStateMachine, apply_each
from failover.errors import InvalidRequest, RequestRejected
from failover.service import ServiceKind
from failover.storage.records import Entry

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEYS = st.sampled_from(["a", "b", "c", "ключ", "", "k" * 40, "k" * (KEY_BYTES_MAX + 1)])
VALUES = st.one_of(
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(["v" * 100, b"w" * 300, "é" * 700, b"\x00" * 5000]),
)


def _pack(request: Any) -> bytes:
    return msgpack.packb(request, use_bin_type=True)


@st.composite
def kv_payloads(draw: st.DrawFn) -> bytes:
    """Puts mostly (the fast path, new keys and overwrites, across size classes), the other
    ops, and invalid requests of every sort, including bytes that are not msgpack."""
    shape = draw(st.sampled_from(["put", "put", "put", "delete", "cas", "get", "extra", "bad",
                                  "not_map", "not_msgpack", "deep"]))
    key, value = draw(KEYS), draw(VALUES)
    if shape == "deep":  # a value nested deeper than any stack: logged before the depth check
        depth = draw(st.sampled_from([40, 1000, 1400]))
        return (b"\x83\xa2op\xa3put\xa3key" + _pack(key) + b"\xa5value" + b"\x91" * depth
                + b"\xa1x")
    if shape == "put":
        return _pack({"op": "put", "key": key, "value": value})
    if shape == "delete":
        return _pack({"op": "delete", "key": key})
    if shape == "get":
        return _pack({"op": "get", "key": key})
    if shape == "cas":
        expected = draw(st.one_of(st.none(), VALUES))
        return _pack({"op": "cas", "key": key, "expected": expected, "value": value})
    if shape == "extra":  # a put with a fourth field, or fields in another order
        return draw(st.sampled_from([
            _pack({"op": "put", "key": key, "value": value, "x": 1}),
            _pack({"value": value, "key": key, "op": "put"}),
        ]))
    if shape == "bad":
        return _pack(draw(st.sampled_from([
            {"op": "put", "key": key},
            {"op": "put", "key": 1, "value": value},
            {"op": "put", "key": key, "value": None},
            {"op": "put", "key": key, "value": True},
            {"op": "put", "key": key, "value": 7},
            {"op": "nope", "key": key, "value": value},
            {"op": None, "key": key, "value": value},
            {1: "put", "key": key, "value": value},
            {b"op": "put", "key": key, "value": value},
            {},
        ])))
    if shape == "not_map":
        return _pack(draw(st.sampled_from([[], "put", 7, None, ["op", "put"]])))
    return draw(st.sampled_from([b"\xc1", b"\x93\x01", b"\x81\xa2op", b"\x80\x80"]))


@st.composite
def bank_payloads(draw: st.DrawFn) -> bytes:
    account = draw(st.sampled_from(["ann", "bob", "cy"]))
    return _pack(draw(st.sampled_from([
        {"op": "open", "account": account, "balance": draw(st.integers(-1, 50))},
        {"op": "transfer", "from": account, "to": "bob", "amount": draw(st.integers(0, 60))},
        {"op": "balance", "account": account},
        {"op": "total"},
        {"op": "open"},
    ])))


@st.composite
def logs(draw: st.DrawFn, payloads: st.SearchStrategy[bytes]) -> list[Entry]:
    """A committed log: barriers opening epochs, requests with ids from a few clients (seqs
    that repeat, inside and across batches, and go back far), some without an id. A client's
    first request mostly opens its session; any request may, or may not, say it does."""
    entries: list[Entry] = []
    epoch = 1
    next_seq = {"c1": 1, "c2": 1, "c3": 1}
    issued: list[tuple[str, int]] = []
    opened: set[str] = set()
    for index in range(1, draw(st.integers(1, 70)) + 1):
        what = draw(st.sampled_from(["new", "new", "new", "new", "retry", "old", "barrier",
                                     "no_id"]))
        if what == "barrier" or index == 1:
            epoch += draw(st.integers(0, 1))
            entries.append(Entry(epoch, index, b"", b""))
            continue
        payload = draw(payloads)
        if what == "no_id":
            entries.append(Entry(epoch, index, b"", payload))
            continue
        if what in ("retry", "old") and issued:
            client, seq = draw(st.sampled_from(issued[-3:] if what == "retry" else issued))
        else:
            client = draw(st.sampled_from(sorted(next_seq)))
            seq = next_seq[client]
            next_seq[client] += draw(st.integers(1, 2))  # seqs may skip, as clients' do
            issued.append((client, seq))
        opens = draw(st.sampled_from([True, True, True, False] if client not in opened
                                     else [False, False, False, False, True]))
        opened.add(client)
        entries.append(Entry(epoch, index, encode_request_id(client, seq, opens), payload))
    return entries


def _one_by_one(sm: ReplicatedStateMachine, entries: list[Entry]) -> list[Reply]:
    """What the agent did before batches: apply, or apply_barrier for an empty payload."""
    return [sm.apply(*e) if e.payload else sm.apply_barrier(e.epoch, e.index) for e in entries]


def _batched(sm: ReplicatedStateMachine, entries: list[Entry], cuts: list[int]) -> list[Reply]:
    replies: list[Reply] = []
    start = 0
    for end in [*sorted(set(cuts)), len(entries)]:
        replies += sm.apply_many(entries[start:end])
        start = end
    return replies


def _machines(make_kind: Any, replies_max: int, clients_max: int
              ) -> tuple[ReplicatedStateMachine, ReplicatedStateMachine]:
    return tuple(  # type: ignore[return-value]
        ReplicatedStateMachine(make_kind(), ClientSessions(replies_max, clients_max))
        for _ in range(2))


def _assert_same(one: ReplicatedStateMachine, many: ReplicatedStateMachine,
                 expected: list[Reply], got: list[Reply]) -> None:
    assert got == expected
    assert [type(r.status) for r in got] == [ReplyStatus] * len(got)
    assert (many.applied_index, many.applied_epoch) == (one.applied_index, one.applied_epoch)
    assert many.sessions.to_bytes() == one.sessions.to_bytes()
    assert many.digest() == one.digest()


@SETTINGS
@given(logs(kv_payloads()), st.lists(st.integers(0, 70), max_size=8),
       st.integers(1, 4), st.integers(1, 3), st.booleans())
def test_kv_batches_equal_one_by_one(entries: list[Entry], cuts: list[int], replies_max: int,
                                     clients_max: int, small_arena: bool) -> None:
    # A small arena bound makes puts fail with "kv store is full" on the fast path too.
    pages = 3 if small_arena else None
    one, many = _machines(lambda: KvService(pages_max=pages), replies_max, clients_max)
    cuts = [c for c in cuts if c <= len(entries)]
    expected = _one_by_one(one, entries)
    got = _batched(many, entries, cuts)
    _assert_same(one, many, expected, got)
    a, b = one.kind.paged, many.kind.paged  # type: ignore[attr-defined]
    assert b.read(0, b.size_bytes) == a.read(0, a.size_bytes)
    assert b.take_dirty() == a.take_dirty()  # a live migration would send the same pages
    for key in ("a", "b", "ключ", "k" * 40):
        request = _pack({"op": "get", "key": key})
        assert many.query(request) == one.query(request)


@SETTINGS
@given(logs(bank_payloads()), st.lists(st.integers(0, 70), max_size=8))
def test_a_kind_without_apply_batch_goes_one_by_one(entries: list[Entry],
                                                    cuts: list[int]) -> None:
    assert not hasattr(BankService, "apply_batch")
    one, many = _machines(BankService, 3, 2)
    _assert_same(one, many, _one_by_one(one, entries), _batched(many, entries, cuts))


def test_duplicates_in_one_batch_get_the_first_reply_and_apply_once() -> None:
    sm = ReplicatedStateMachine(KvService())
    rid = encode_request_id("c", 1, opens=True)
    put = _pack({"op": "put", "key": "k", "value": "v"})
    replies = sm.apply_many([Entry(1, 1, b"", b""), Entry(1, 2, rid, put), Entry(1, 3, rid, put),
                             Entry(2, 4, b"", b""), Entry(2, 5, rid, put)])
    assert replies[1] == replies[2] == replies[4] == Reply(ReplyStatus.OK,
                                                           _pack({"ok": True, "found": False}),
                                                           2, 1)
    assert replies[3] == Reply(ReplyStatus.OK, _pack({}), 4, 2)
    assert sm.sessions.lookup("c", 1) == replies[1]
    assert (sm.applied_index, sm.applied_epoch) == (5, 2)


def test_entries_that_do_not_continue_the_log_change_nothing() -> None:
    sm = ReplicatedStateMachine(KvService())
    put = _pack({"op": "put", "key": "k", "value": "v"})
    sm.apply_many([Entry(2, 1, b"", b"")])
    before = sm.digest()
    for bad in ([Entry(2, 3, b"", put)], [Entry(2, 2, b"", put), Entry(2, 4, b"", put)],
                [Entry(1, 2, b"", put)], [Entry(2, 2, b"", put), Entry(1, 3, b"", put)]):
        with pytest.raises(AssertionError):
            sm.apply_many(bad)
        assert sm.digest() == before and sm.applied_index == 1
    assert sm.apply_many([]) == []


class _Picky(ServiceKind):
    """Refuses odd numbers; a kind with no apply_batch of its own."""

    name = "picky"
    version = 1

    def __init__(self) -> None:
        self.seen: list[int] = []

    def apply(self, command: dict) -> dict:
        n = command.get("n")
        if not isinstance(n, int):
            raise InvalidRequest("n must be an int")
        if n % 2:
            raise RequestRejected(f"{n} is odd")
        self.seen.append(n)
        return {"ok": True, "n": n}

    def query(self, request: dict) -> dict:
        return {"seen": list(self.seen)}

    def snapshot(self):  # type: ignore[no-untyped-def]
        return iter([_pack(self.seen)])

    def restore(self, chunks):  # type: ignore[no-untyped-def]
        self.seen = msgpack.unpackb(b"".join(chunks))

    def digest(self) -> bytes:
        return _pack(self.seen).ljust(32, b"\x00")[:32]


def test_apply_each_takes_refusals_as_outcomes() -> None:
    kind = _Picky()
    outcomes = apply_each(kind, [{"n": 2}, {"n": 3}, {"n": "x"}, {"n": 4}])
    assert outcomes[0] == {"ok": True, "n": 2} and outcomes[3] == {"ok": True, "n": 4}
    assert isinstance(outcomes[1], RequestRejected) and str(outcomes[1]) == "3 is odd"
    assert isinstance(outcomes[2], InvalidRequest)
    assert kind.seen == [2, 4]


@SETTINGS
@given(st.lists(kv_payloads(), max_size=40))
def test_kv_apply_batch_equals_apply(payloads: list[bytes]) -> None:
    commands = []
    for payload in payloads:
        try:
            commands.append(msgpack.unpackb(payload))
        except Exception:
            continue
    one, many = KvService(pages_max=4), KvService(pages_max=4)
    expected: list[Any] = []
    for command in commands:
        try:
            expected.append(one.apply(command))
        except (InvalidRequest, RequestRejected) as exc:
            expected.append((type(exc), str(exc)))
    got = [(type(o), str(o)) if isinstance(o, Exception) else o
           for o in many.apply_batch(commands)]
    assert got == expected
    assert many.digest() == one.digest()


class _Buggy(_Picky):
    """A kind with bugs: apply raises ZeroDivisionError for n == 0 and, for n == 8, returns a
    result msgpack cannot encode."""

    name = "buggy"

    def apply(self, command: dict) -> dict:
        if command.get("n") == 0:
            raise ZeroDivisionError(f"division by zero at {id(command):#x}")  # differs per run
        if command.get("n") == 8:
            self.seen.append(8)
            return {"ok": True, "n": {8}}
        return super().apply(command)


def _deep_stack(depth: int, call: Any) -> Any:
    """`call()` run `depth` frames deeper than here: a replica applies from some stack depth
    of its own, which must not change any reply."""
    return call() if depth == 0 else _deep_stack(depth - 1, call)


def test_a_kind_that_raises_gives_the_same_error_reply_everywhere_and_stays_usable() -> None:
    rid = encode_request_id
    entries = [Entry(1, 1, b"", b"")] + [
        Entry(1, 2 + k, rid("c", k + 1, opens=k == 0), _pack({"n": n}))
        for k, n in enumerate([2, 0, 4, 8, 3, 0, 6])]
    one, many = _machines(_Buggy, 8, 4)
    expected = _one_by_one(one, entries)
    got = _deep_stack(400, lambda: _batched(many, entries, [3, 5]))
    _assert_same(one, many, expected, got)
    failed = [r for r in got if r.status == ReplyStatus.INVALID]
    assert [r.index for r in failed] == [3, 5, 7]  # n == 0 twice, and the unencodable result
    assert all(b"'buggy' service failed on this request" in r.data for r in failed)
    assert b"ZeroDivisionError" in failed[0].data and b"TypeError" in failed[1].data
    assert b"0x" not in failed[0].data  # nothing of the exception's text, which may differ
    # The state machine goes on: a retry gets the recorded error, snapshots and digests work.
    assert one.apply(1, 9, rid("c", 2), _pack({"n": 0})) == failed[0]
    copy = ReplicatedStateMachine(_Buggy(), ClientSessions(8, 4))
    copy.restore(one.snapshot())
    assert copy.digest() == one.digest()
    assert copy.apply(2, 10, rid("c", 9), _pack({"n": 10})).status == ReplyStatus.OK


def test_a_value_nested_too_deep_to_show_is_refused_alike_at_any_stack_depth() -> None:
    """A put logged before the depth check existed (the issue's poisoned entry): apply answers
    it with the same refusal whatever the stack, and the state machine stays usable."""
    deep = b"\x83\xa2op\xa3put\xa3key\xa1k\xa5value" + b"\x91" * 1000 + b"\xa1x"
    entries = [Entry(1, 1, b"", b""), Entry(1, 2, encode_request_id("c", 1, opens=True), deep),
               Entry(1, 3, encode_request_id("c", 2), deep)]
    shallow, nested, batched = (ReplicatedStateMachine(KvService()) for _ in range(3))
    expected = _one_by_one(shallow, entries)
    assert _deep_stack(700, lambda: _one_by_one(nested, entries)) == expected
    assert _deep_stack(300, lambda: batched.apply_many(entries)) == expected
    assert expected[1].status == expected[2].status == ReplyStatus.INVALID
    assert b"nested over" in expected[1].data
    for sm in (nested, batched):
        assert sm.digest() == shallow.digest()
        assert sm.sessions.to_bytes() == shallow.sessions.to_bytes()
        list(sm.snapshot())
