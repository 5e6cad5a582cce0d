"""The example kind of examples/counter, loaded from its source (no install needed): its ops,
that a refusal changes nothing, that apply is total, and that replicas and snapshots agree.
tests/integration/test_counter_plugin.py installs it and fails it over with real processes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failover.core.sessions import encode_request_id
from failover.core.state_machine import ReplicatedStateMachine, encode_result
from failover.errors import InvalidRequest, RequestRejected, StateCorruptError
from failover.service import ServiceKind

PACKAGE = Path(__file__).resolve().parents[2] / "examples" / "counter" / "failover_counter"
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load() -> ModuleType:
    """The example's module from its file, under a name of its own (an installed copy, if
    any, stays untouched)."""
    spec = importlib.util.spec_from_file_location("_example_failover_counter",
                                                  PACKAGE / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


counter = _load()
CounterService: type[ServiceKind] = counter.CounterService


def test_ops_and_results() -> None:
    kind = CounterService()
    assert kind.apply({"op": "get", "counter": "home"}) == {"ok": True, "counter": "home",
                                                           "value": 0}
    assert kind.apply({"op": "incr", "counter": "home"})["value"] == 1
    assert kind.apply({"op": "incr", "counter": "home", "by": 5})["value"] == 6
    assert kind.apply({"op": "incr", "counter": "home", "by": -7})["value"] == -1
    assert kind.query({"op": "get", "counter": "home"})["value"] == -1
    assert CounterService.is_read_only({"op": "get", "counter": "home"})
    assert not CounterService.is_read_only({"op": "incr", "counter": "home"})
    with pytest.raises(InvalidRequest, match="send it as a write"):
        kind.query({"op": "incr", "counter": "home"})


@pytest.mark.parametrize("request_, error, message", [
    ({"op": "incr"}, InvalidRequest, "missing field 'counter'"),
    ({"op": "incr", "counter": ""}, InvalidRequest, "must not be empty"),
    ({"op": "incr", "counter": "x" * 257}, InvalidRequest, "257 bytes"),
    ({"op": "incr", "counter": "home", "by": True}, InvalidRequest, "must be int, got bool"),
    ({"op": "incr", "counter": "home", "by": 1.5}, InvalidRequest, "must be int"),
    ({"op": "decr", "counter": "home"}, InvalidRequest, "unknown op"),
    ({"op": "incr", "counter": "home", "by": 1 << 63}, RequestRejected, "int64 range"),
])
def test_a_refusal_says_why_and_changes_nothing(request_: dict, error: type[Exception],
                                                message: str) -> None:
    kind = CounterService()
    kind.apply({"op": "incr", "counter": "home", "by": 3})
    before = kind.digest()
    with pytest.raises(error, match=message):
        kind.apply(request_)
    assert kind.digest() == before


def test_the_number_of_counters_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(counter, "COUNTERS_MAX", 2)
    kind = CounterService()
    kind.apply({"op": "incr", "counter": "a"})
    kind.apply({"op": "incr", "counter": "b"})
    before = kind.digest()
    with pytest.raises(RequestRejected, match="2 counters exist already"):
        kind.apply({"op": "incr", "counter": "c"})
    assert kind.digest() == before
    assert kind.apply({"op": "incr", "counter": "a"})["value"] == 2  # existing ones go on


REQUESTS = st.one_of(
    st.fixed_dictionaries(
        {"op": st.sampled_from(["incr", "get", "nope"])},
        optional={"counter": st.one_of(st.sampled_from(["a", "b", ""]), st.integers(),
                                       st.none()),
                  "by": st.one_of(st.integers(-(1 << 64), 1 << 64), st.booleans(),
                                  st.floats(allow_nan=False), st.text(max_size=3))}),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    st.none(), st.integers(), st.lists(st.integers(), max_size=2),
)


@SETTINGS
@given(st.lists(REQUESTS, max_size=40))
def test_apply_is_total_and_replicas_agree_with_snapshots(requests: list[Any]) -> None:
    """Any request gets a result or a refusal, never another exception; two replicas fed the
    same requests, one of them restored from the other's snapshot half way, agree."""
    a, b = CounterService(), CounterService()
    for i, request in enumerate(requests):
        if i == len(requests) // 2:
            b = CounterService()
            b.restore(list(a.snapshot()))
        outcomes = []
        for kind in (a, b):
            try:
                outcomes.append(kind.apply(request))
            except (InvalidRequest, RequestRejected) as exc:
                outcomes.append((type(exc), str(exc)))
        assert outcomes[0] == outcomes[1], request
        if isinstance(outcomes[0], dict):
            encode_result(outcomes[0])  # every result is msgpack-able
    assert a.digest() == b.digest()


def test_the_state_machine_applies_it_once_per_request_id() -> None:
    """Through the framework's replicated state machine, as every replica runs it: a request
    logged twice (a retry that raced a failover) is applied once, its reply recorded."""
    one, two = ReplicatedStateMachine(CounterService()), ReplicatedStateMachine(CounterService())
    incr = msgpack.packb({"op": "incr", "counter": "home", "by": 2})
    entries = [(1, 1, encode_request_id("c1", 1, opens=True), incr),
               (1, 2, encode_request_id("c1", 1), incr),  # the same request again
               (1, 3, encode_request_id("c1", 2), incr)]
    replies = one.apply_many(entries)
    assert [msgpack.unpackb(r.data)["value"] for r in replies] == [2, 2, 4]
    for entry in entries:
        two.apply(*entry)
    assert one.digest() == two.digest()


def test_snapshots_round_trip_and_damage_is_refused() -> None:
    source = CounterService()
    for n in range(50):
        source.apply({"op": "incr", "counter": f"c{n % 7}", "by": n})
    data = b"".join(source.snapshot())
    copy = CounterService()
    copy.restore([data[:3], data[3:]])  # chunk boundaries do not matter
    assert copy.digest() == source.digest()
    before = copy.digest()
    renamed = data.replace(b"failover.counter", b"failover.kounter")
    for damaged in (b"", b"\xc1", data[:-1], renamed):
        with pytest.raises(StateCorruptError):
            copy.restore([damaged])
        assert copy.digest() == before
