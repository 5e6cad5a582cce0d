"""The demo kinds against models, their snapshots and digests, the registry, the helpers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo_services.bank import BALANCE_MAX, BankService
from demo_services.kv import KEY_BYTES_MAX, KvService
from failover import kinds
from failover.errors import (
    InvalidRequest,
    KindLoadError,
    RequestRejected,
    StateCorruptError,
    UnknownKindError,
)
from failover.service import ServiceKind, require, require_int, require_op

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ----------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "ключ", "", "k" * 40])


def _filled(size: int, byte: int) -> bytes:
    return bytes([byte]) * size


VALUES = st.one_of(
    st.text(max_size=12),
    st.binary(max_size=12),
    # Large values cross page boundaries and move records between size classes.
    st.builds(_filled, st.integers(0, 9000), st.integers(0, 255)),
    st.builds(lambda n: "é" * n, st.integers(0, 3000)),
)

BAD_COMMON = st.sampled_from(
    [
        None,
        [],
        "put",
        7,
        {},
        {"op": None},
        {"op": "nope"},
        {"op": 3},
        {1: "put"},
    ]
)

KV_BAD = st.one_of(
    BAD_COMMON,
    st.sampled_from(
        [
            {"op": "put", "key": "a"},
            {"op": "put", "value": "x"},
            {"op": "put", "key": 1, "value": "x"},
            {"op": "put", "key": b"a", "value": "x"},
            {"op": "put", "key": "a", "value": 5},
            {"op": "put", "key": "a", "value": None},
            {"op": "put", "key": "a", "value": True},
            {"op": "put", "key": "a" * (KEY_BYTES_MAX + 1), "value": "x"},
            {"op": "get"},
            {"op": "delete", "key": None},
            {"op": "cas", "key": "a", "value": "x"},
            {"op": "cas", "key": "a", "expected": 1, "value": "x"},
            {"op": "cas", "key": "a", "expected": None},
        ]
    ),
)


@st.composite
def kv_commands(draw: st.DrawFn) -> list[Any]:
    commands: list[Any] = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["put", "put", "get", "delete", "cas", "bad"]))
        if kind == "bad":
            commands.append(draw(KV_BAD))
        elif kind == "put":
            commands.append({"op": "put", "key": draw(KEYS), "value": draw(VALUES)})
        elif kind in ("get", "delete"):
            commands.append({"op": kind, "key": draw(KEYS)})
        else:
            expected = draw(st.one_of(st.none(), VALUES, st.sampled_from(["x", b"x"])))
            commands.append(
                {"op": "cas", "key": draw(KEYS), "expected": expected, "value": draw(VALUES)}
            )
    return commands


ACCOUNTS = st.sampled_from(["ann", "bob", "cy", "dee"])
AMOUNTS = st.one_of(st.integers(-3, 60), st.sampled_from([BALANCE_MAX, BALANCE_MAX + 1]))

BANK_BAD = st.one_of(
    BAD_COMMON,
    st.sampled_from(
        [
            {"op": "open", "account": "ann"},
            {"op": "open", "account": "ann", "balance": True},
            {"op": "open", "account": "ann", "balance": "5"},
            {"op": "open", "account": "ann", "balance": 1.5},
            {"op": "open", "account": "", "balance": 1},
            {"op": "open", "account": 3, "balance": 1},
            {"op": "transfer", "from": "ann", "to": "bob"},
            {"op": "transfer", "from": "ann", "to": "bob", "amount": False},
            {"op": "transfer", "from": "ann", "to": None, "amount": 1},
            {"op": "balance"},
        ]
    ),
)


@st.composite
def bank_commands(draw: st.DrawFn) -> list[Any]:
    commands: list[Any] = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["open", "transfer", "transfer", "balance", "total", "bad"]))
        if kind == "bad":
            commands.append(draw(BANK_BAD))
        elif kind == "open":
            commands.append({"op": "open", "account": draw(ACCOUNTS), "balance": draw(AMOUNTS)})
        elif kind == "transfer":
            commands.append(
                {"op": "transfer", "from": draw(ACCOUNTS), "to": draw(ACCOUNTS),
                 "amount": draw(AMOUNTS)}
            )  # fmt: skip
        elif kind == "balance":
            commands.append({"op": "balance", "account": draw(ACCOUNTS)})
        else:
            commands.append({"op": "total"})
    return commands


# --- models --------------------------------------------------------------------------------


class KvModel:
    """The kv semantics on a plain dict; returns the result or the exception type."""

    def __init__(self) -> None:
        self.data: dict[str, str | bytes] = {}

    def run(self, c: Any) -> dict | type[Exception]:
        if not isinstance(c, dict) or c.get("op") not in ("put", "get", "delete", "cas"):
            return InvalidRequest
        op = c["op"]
        key = c.get("key")
        if not isinstance(key, str) or len(key.encode()) > KEY_BYTES_MAX:
            return InvalidRequest
        if op == "get":
            return {"ok": True, "found": key in self.data, "value": self.data.get(key)}
        if op == "delete":
            return {"ok": True, "found": self.data.pop(key, None) is not None}
        value = c.get("value")
        if type(value) not in (str, bytes):
            return InvalidRequest
        if op == "put":
            found = key in self.data
            self.data[key] = value
            return {"ok": True, "found": found}
        if "expected" not in c or type(c["expected"]) not in (str, bytes, type(None)):
            return InvalidRequest
        current = self.data.get(key)
        expected = c["expected"]
        if (current is None and expected is None) or (
            expected is not None and type(current) is type(expected) and current == expected
        ):
            self.data[key] = value
            return {"ok": True, "swapped": True, "value": value}
        return {"ok": True, "swapped": False, "value": current}


class BankModel:
    def __init__(self) -> None:
        self.accounts: dict[str, int] = {}

    def run(self, c: Any) -> dict | type[Exception]:
        ops = ("open", "transfer", "balance", "total")
        if not isinstance(c, dict) or not all(isinstance(k, str) for k in c):
            return InvalidRequest
        if c.get("op") not in ops:
            return InvalidRequest
        op = c["op"]

        def name(field: str) -> str | None:
            v = c.get(field)
            return v if isinstance(v, str) and v else None

        def amount(field: str, low: int) -> int | None:
            v = c.get(field)
            return v if type(v) is int and low <= v <= BALANCE_MAX else None

        if op == "total":
            return {"ok": True, "total": sum(self.accounts.values()),
                    "accounts": len(self.accounts)}  # fmt: skip
        if op == "balance":
            account = name("account")
            if account is None:
                return InvalidRequest
            if account not in self.accounts:
                return RequestRejected
            return {"ok": True, "account": account, "balance": self.accounts[account]}
        if op == "open":
            account, balance = name("account"), amount("balance", 0)
            if account is None or balance is None:
                return InvalidRequest
            if account in self.accounts:
                return RequestRejected
            if sum(self.accounts.values()) + balance > BALANCE_MAX:
                return RequestRejected
            self.accounts[account] = balance
            return {"ok": True, "account": account, "balance": balance}
        src, dst, amt = name("from"), name("to"), amount("amount", 1)
        if src is None or dst is None or amt is None:
            return InvalidRequest
        if src == dst or src not in self.accounts or dst not in self.accounts:
            return RequestRejected
        if amt > self.accounts[src]:
            return RequestRejected
        self.accounts[src] -= amt
        self.accounts[dst] += amt
        return {"ok": True, "from_balance": self.accounts[src], "to_balance": self.accounts[dst]}


def _run(kind: ServiceKind, command: Any) -> dict | type[Exception]:
    """Apply (or query, for read-only ops) as the framework would; exceptions become types."""
    before = kind.digest()
    try:
        if kind.is_read_only(command):
            return kind.query(command)
        return kind.apply(command)
    except (InvalidRequest, RequestRejected) as exc:
        assert str(exc)  # every refusal says why
        assert kind.digest() == before, f"{command!r} raised {exc!r} but changed state"
        return type(exc)


def _restored(kind: ServiceKind) -> ServiceKind:
    copy = type(kind)()
    copy.restore(kind.snapshot())
    return copy


# --- kv ------------------------------------------------------------------------------------


@SETTINGS
@given(kv_commands(), st.data())
def test_kv_agrees_with_model_replicas_and_snapshots(commands: list[Any], data: st.DataObject):
    model, a, b = KvModel(), KvService(), KvService()
    split = data.draw(st.integers(0, len(commands)))
    for i, command in enumerate(commands):
        if i == split:
            b = _restored(b)  # a replica that restarted from a snapshot mid-way
        expected = model.run(command)
        assert _run(a, command) == expected, command
        assert _run(b, command) == expected, command
    assert a.digest() == b.digest()
    assert a.key_count == len(model.data)

    copy = _restored(a)
    assert copy.digest() == a.digest()
    for key in [*model.data, "absent"]:
        request = {"op": "get", "key": key}
        assert copy.query(request) == a.query(request) == model.run(request)


@SETTINGS
@given(kv_commands())
def test_kv_pages_alone_rebuild_the_state(commands: list[Any]) -> None:
    # What the target of a live migration does: take every page, then reload_paged().
    source = KvService()
    for command in commands:
        _run(source, command)
    target = KvService()
    for n in source.paged.take_dirty():
        target.paged.set_page(n, source.paged.page(n))
    target.paged.grow(source.paged.page_count)
    target.reload_paged()
    assert target.digest() == source.digest()
    assert target.key_count == source.key_count
    more = {"op": "put", "key": "after", "value": b"x" * 5000}
    assert target.apply(more) == source.apply(more)
    assert target.digest() == source.digest()


def test_kv_results_and_types() -> None:
    kv = KvService()
    assert kv.apply({"op": "put", "key": "s", "value": "text"}) == {"ok": True, "found": False}
    assert kv.apply({"op": "put", "key": "b", "value": b"text"}) == {"ok": True, "found": False}
    assert kv.query({"op": "get", "key": "s"}) == {"ok": True, "found": True, "value": "text"}
    assert kv.query({"op": "get", "key": "b"})["value"] == b"text"
    assert kv.apply({"op": "cas", "key": "s", "expected": b"text", "value": "no"}) == {
        "ok": True, "swapped": False, "value": "text",
    }  # fmt: skip
    assert kv.apply({"op": "cas", "key": "n", "expected": None, "value": "new"})["swapped"]
    assert kv.apply({"op": "delete", "key": "n"}) == {"ok": True, "found": True}
    assert kv.apply({"op": "delete", "key": "n"}) == {"ok": True, "found": False}
    assert KvService.is_read_only({"op": "get", "key": "s"})
    assert not KvService.is_read_only({"op": "put", "key": "s", "value": "v"})
    assert not KvService.is_read_only(["get"])
    with pytest.raises(InvalidRequest, match="send it as a write"):
        kv.query({"op": "put", "key": "s", "value": "v"})


def test_kv_freed_space_is_reused_deterministically() -> None:
    kv = KvService()
    for i in range(50):
        kv.apply({"op": "put", "key": f"k{i}", "value": b"v" * 3000})
    pages = kv.paged.page_count
    for i in range(50):
        kv.apply({"op": "delete", "key": f"k{i}"})
    for i in range(50):
        kv.apply({"op": "put", "key": f"j{i}", "value": b"w" * 3000})
    assert kv.paged.page_count == pages  # the free lists served every new record


def test_kv_full_arena_refuses_without_change() -> None:
    kv = KvService(pages_max=2)
    before = kv.digest()
    with pytest.raises(RequestRejected, match="full"):
        kv.apply({"op": "put", "key": "big", "value": b"x" * 10_000})
    assert kv.digest() == before and kv.paged.page_count == 1


def test_kv_value_size_bound() -> None:
    kv = KvService()
    with pytest.raises(InvalidRequest, match="limit"):
        kv.apply({"op": "put", "key": "k", "value": b"x" * (4 * 1024 * 1024 + 1)})


def test_kv_restore_refuses_damage_and_keeps_the_old_state() -> None:
    source = KvService()
    for i in range(20):
        source.apply({"op": "put", "key": f"k{i}", "value": f"v{i}" * 30})
    for i in range(0, 20, 3):
        source.apply({"op": "delete", "key": f"k{i}"})
    good = b"".join(source.snapshot())
    target = KvService()
    target.apply({"op": "put", "key": "mine", "value": "kept"})
    before = target.digest()
    arena_at = 16  # after the snapshot header
    damaged = [
        b"",
        b"XXXX" + good[4:],
        good[:-1],
        good + bytes(4096),
        # Bump offset (arena header bytes 8..16) pointing past the arena.
        good[: arena_at + 8] + (10**9).to_bytes(8, "little") + good[arena_at + 16 :],
        # Live count off by one.
        good[: arena_at + 16] + (99).to_bytes(8, "little") + good[arena_at + 24 :],
        # A slot's state byte at the start of the data area.
        good[: arena_at + 1024] + b"\x07" + good[arena_at + 1025 :],
    ]
    for data in damaged:
        with pytest.raises(StateCorruptError):
            target.restore([data])
        assert target.digest() == before
    target.restore([good[:5], good[5:]])  # chunk boundaries do not matter
    assert target.digest() == source.digest()


# --- bank ----------------------------------------------------------------------------------


@SETTINGS
@given(bank_commands(), st.data())
def test_bank_agrees_with_model_replicas_and_snapshots(commands: list[Any], data: st.DataObject):
    model, a, b = BankModel(), BankService(), BankService()
    split = data.draw(st.integers(0, len(commands)))
    for i, command in enumerate(commands):
        if i == split:
            b = _restored(b)
        total_before = a.query({"op": "total"})["total"]
        expected = model.run(command)
        assert _run(a, command) == expected, command
        assert _run(b, command) == expected, command
        total = a.query({"op": "total"})["total"]
        if isinstance(command, dict) and command.get("op") == "transfer":
            assert total == total_before  # transfers never create or destroy money
        assert total == sum(model.accounts.values())
    assert a.digest() == b.digest()
    copy = _restored(a)
    assert copy.digest() == a.digest()
    for account in ["ann", "bob", "cy", "dee"]:
        request = {"op": "balance", "account": account}
        assert _run(copy, request) == _run(a, request) == model.run(request)
    assert copy.query({"op": "total"}) == a.query({"op": "total"})


def test_bank_refusals_say_why() -> None:
    bank = BankService()
    bank.apply({"op": "open", "account": "ann", "balance": 5})
    bank.apply({"op": "open", "account": "bob", "balance": 0})
    with pytest.raises(RequestRejected, match="overdraw.*'ann' holds 5.*needs 6"):
        bank.apply({"op": "transfer", "from": "ann", "to": "bob", "amount": 6})
    with pytest.raises(RequestRejected, match="already open"):
        bank.apply({"op": "open", "account": "ann", "balance": 1})
    with pytest.raises(RequestRejected, match="no account named 'zed'"):
        bank.apply({"op": "transfer", "from": "ann", "to": "zed", "amount": 1})
    with pytest.raises(RequestRejected, match="itself"):
        bank.apply({"op": "transfer", "from": "ann", "to": "ann", "amount": 1})
    with pytest.raises(
        InvalidRequest, match="'amount' of 'transfer' request must be int, got bool"
    ):
        bank.apply({"op": "transfer", "from": "ann", "to": "bob", "amount": True})
    with pytest.raises(InvalidRequest, match="'amount'.*at least 1"):
        bank.apply({"op": "transfer", "from": "ann", "to": "bob", "amount": 0})
    assert bank.apply({"op": "transfer", "from": "ann", "to": "bob", "amount": 5}) == {
        "ok": True, "from_balance": 0, "to_balance": 5,
    }  # fmt: skip
    assert BankService.is_read_only({"op": "total"})
    assert not BankService.is_read_only({"op": "transfer"})


def test_bank_restore_refuses_damage() -> None:
    bank = BankService()
    bank.apply({"op": "open", "account": "ann", "balance": 5})
    before = bank.digest()
    for data in [b"", b"\xc1", b"\x93\xa3abc\x01\x90", bytes(10)]:
        with pytest.raises(StateCorruptError):
            bank.restore([data])
        assert bank.digest() == before


def test_digests_are_32_bytes_and_distinguish_states() -> None:
    for kind in (KvService(), BankService()):
        assert len(kind.digest()) == 32
    a, b = KvService(), KvService()
    a.apply({"op": "put", "key": "k", "value": "v"})
    b.apply({"op": "put", "key": "k", "value": b"v"})  # same bytes, other type
    assert a.digest() != b.digest()


# --- registry ------------------------------------------------------------------------------


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EntryPoint]]:
    """Replaces the installed entry points by a list the test fills in."""
    points: list[EntryPoint] = []

    def entry_points(group: str) -> list[EntryPoint]:
        return [ep for ep in points if ep.group == group]

    monkeypatch.setattr(kinds, "entry_points", entry_points)
    kinds.clear_cache()
    yield points
    monkeypatch.undo()
    kinds.clear_cache()


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=kinds.ENTRY_POINT_GROUP)


def test_registry_finds_the_demo_kinds() -> None:
    found = kinds.available_kinds()
    assert found["kv"] is KvService and found["bank"] is BankService
    assert kinds.load_kind("kv") is KvService
    assert kinds.load_kind("kv") is kinds.load_kind("kv")
    assert isinstance(kinds.create("bank"), BankService)
    assert {"kv", "bank"} <= set(kinds.registered_names())


def test_unknown_kind_lists_the_registered_names() -> None:
    with pytest.raises(UnknownKindError) as info:
        kinds.load_kind("ledger")
    message = str(info.value)
    assert "'ledger'" in message and "'bank'" in message and "'kv'" in message


def test_broken_plugins_are_reported(
    fake_entry_points: list[EntryPoint], caplog: pytest.LogCaptureFixture
) -> None:
    fake_entry_points.extend(
        [
            _ep("kv", "demo_services.kv:KvService"),
            _ep("kv", "demo_services.kv:KvService"),  # a harmless duplicate
            _ep("gone", "no_such_module_here:Kind"),
            _ep("notkind", "demo_services.kv:KEY_BYTES_MAX"),
            _ep("alias", "demo_services.bank:BankService"),  # declares name "bank"
            _ep("twice", "demo_services.kv:KvService"),
            _ep("twice", "demo_services.bank:BankService"),
        ]
    )
    with caplog.at_level(logging.WARNING):
        assert kinds.available_kinds() == {"kv": KvService}
    with pytest.raises(KindLoadError, match="cannot be loaded: ModuleNotFoundError"):
        kinds.load_kind("gone")
    with pytest.raises(KindLoadError, match="not a failover.service.ServiceKind"):
        kinds.load_kind("notkind")
    with pytest.raises(KindLoadError, match="declares name='bank'"):
        kinds.load_kind("alias")
    with pytest.raises(KindLoadError, match="several packages"):
        kinds.load_kind("twice")
    with pytest.raises(UnknownKindError, match="registered kinds: 'alias', 'gone', 'kv'"):
        kinds.load_kind("bank")


# --- request helpers -----------------------------------------------------------------------


def test_request_helpers_name_the_field() -> None:
    request = {"op": "open", "account": "ann", "balance": True, "n": 3}
    assert require_op(request, {"open"}) == "open"
    assert require(request, "account", str) == "ann"
    assert require_int(request, "n", minimum=1, maximum=3) == 3
    with pytest.raises(InvalidRequest, match="field 'balance' of 'open' request must be int, got"):
        require_int(request, "balance")
    assert require(request, "balance", (int, bool)) is True
    with pytest.raises(InvalidRequest, match="missing field 'zzz' \\(str or bytes\\)"):
        require(request, "zzz", (str, bytes))
    with pytest.raises(InvalidRequest, match="at most 2"):
        require_int(request, "n", maximum=2)
    with pytest.raises(InvalidRequest, match="must be a dict.*list"):
        require_op(["open"], {"open"})
    with pytest.raises(InvalidRequest, match="unknown op 'close'; expected one of \\['open'\\]"):
        require_op({"op": "close"}, {"open"})
    with pytest.raises(InvalidRequest, match="no 'op' field"):
        require_op({}, {"open"})
    with pytest.raises(InvalidRequest, match="4 bytes; the limit is 3"):
        require({"op": "x", "k": "a€"}, "k", str, max_bytes=3)
    long = {"op": "x", "k": 12345678901234567890 * 10**80}
    with pytest.raises(InvalidRequest) as info:
        require(long, "k", str)
    assert len(str(info.value)) < 200  # a huge value does not flood the message
