"""The chaos checkers classify known-good and known-bad histories right."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failover.chaos.checkers import (
    check_acked_puts,
    check_bank,
    check_linearizable_kv,
    check_one_writer_per_epoch,
    verdict,
)
from failover.chaos.history import HistoryRecorder, Op, dump_ops, load_ops

# --- history builders --------------------------------------------------------------------


def op(
    process: int,
    kind: str,
    key: str,
    args: dict[str, Any],
    t0: float,
    t1: float | None,
    result: dict[str, Any] | None = None,
    outcome: str = "ok",
    **extra: Any,
) -> Op:
    if outcome == "unknown":
        t1, result = None, None
    return Op(process, kind, key, args, t0, t1, outcome, result, **extra)


def put(
    p: int,
    key: str,
    value: Any,
    t0: float,
    t1: float | None,
    outcome: str = "ok",
    found: bool | None = None,
    **extra: Any,
) -> Op:
    result = {"ok": True} if found is None else {"ok": True, "found": found}
    return op(p, "put", key, {"value": value}, t0, t1, result, outcome, **extra)


def get(p: int, key: str, value: Any, t0: float, t1: float | None, **extra: Any) -> Op:
    result = {"ok": True, "found": value is not None, "value": value}
    return op(p, "get", key, {}, t0, t1, result, **extra)


def cas(
    p: int,
    key: str,
    expected: Any,
    value: Any,
    t0: float,
    t1: float | None,
    swapped: bool | None = None,
    outcome: str = "ok",
) -> Op:
    result = None if swapped is None else {"ok": True, "swapped": swapped}
    return op(p, "cas", key, {"expected": expected, "value": value}, t0, t1, result, outcome)


def delete(p: int, key: str, t0: float, t1: float | None, found: bool | None = None) -> Op:
    result = {"ok": True} if found is None else {"ok": True, "found": found}
    return op(p, "delete", key, {}, t0, t1, result)


def transfer(
    p: int,
    src: str,
    dst: str,
    amount: int,
    t0: float,
    t1: float | None,
    outcome: str = "ok",
    **extra: Any,
) -> Op:
    args = {"from": src, "to": dst, "amount": amount}
    return op(p, "transfer", "", args, t0, t1, {"ok": True}, outcome, **extra)


# --- linearizable kv histories -----------------------------------------------------------


def test_sequential_history_is_linearizable() -> None:
    h = [
        get(0, "k", None, 0, 1),
        put(0, "k", "a", 2, 3, found=False),
        get(1, "k", "a", 4, 5),
        cas(0, "k", "a", "b", 6, 7, swapped=True),
        cas(1, "k", "a", "c", 8, 9, swapped=False),
        get(0, "k", "b", 10, 11),
        delete(1, "k", 12, 13, found=True),
        get(0, "k", None, 14, 15),
    ]
    v = check_linearizable_kv(h)
    assert v.linearizable is True and v.keys_checked == 1 and not v.violations


def test_concurrent_puts_and_gets_admit_either_order() -> None:
    # Two overlapping puts; overlapping readers see them in opposite orders, which is fine
    # as long as one final order explains every read.
    base = [put(0, "k", "a", 0, 10), put(1, "k", "b", 1, 11)]
    for final in ("a", "b"):
        other = "b" if final == "a" else "a"
        h = [*base, get(2, "k", other, 2, 9), get(3, "k", final, 12, 13)]
        assert check_linearizable_kv(h).linearizable is True
    # A read overlapping both puts may see nothing yet.
    assert check_linearizable_kv([*base, get(2, "k", None, 0.5, 3)]).linearizable is True


@pytest.mark.parametrize("seen", ["new", None])
def test_unknown_put_may_or_may_not_have_happened(seen: str | None) -> None:
    h = [put(0, "k", "new", 0, None, outcome="unknown"), get(1, "k", seen, 5, 6)]
    assert check_linearizable_kv(h).linearizable is True


def test_unknown_put_may_take_effect_long_after_its_client_gave_up() -> None:
    h = [
        put(0, "k", "late", 0, None, outcome="unknown"),
        put(0, "k", "next", 10, 11),  # the same worker moved on after a timeout
        get(1, "k", "next", 12, 13),
        get(1, "k", "late", 14, 15),  # the old request finally applied
    ]
    assert check_linearizable_kv(h).linearizable is True


def test_failed_ops_never_took_effect() -> None:
    h = [put(0, "k", "a", 0, 1), put(0, "k", "b", 2, 3, outcome="fail"), get(1, "k", "a", 4, 5)]
    assert check_linearizable_kv(h).linearizable is True
    h[-1] = get(1, "k", "b", 4, 5)
    assert check_linearizable_kv(h).linearizable is False


def test_keys_are_independent_and_bytes_differ_from_str() -> None:
    h = [
        put(0, "x", b"v", 0, 1),
        put(0, "y", "v", 2, 3),
        get(1, "x", b"v", 4, 5),
        get(1, "y", "v", 4, 5),
    ]
    v = check_linearizable_kv(h)
    assert v.linearizable is True and v.keys_checked == 2
    h[2] = get(1, "x", "v", 4, 5)  # the str "v" was never written to x
    assert check_linearizable_kv(h).linearizable is False


def test_equal_timestamps_count_as_concurrent() -> None:
    # The put completes at 5 and the get starts at 5: either order is allowed.
    assert (
        check_linearizable_kv(
            [put(0, "k", "a", 0, 1), put(0, "k", "b", 2, 5), get(1, "k", "a", 5, 6)]
        ).linearizable
        is True
    )


# --- violating kv histories --------------------------------------------------------------


def test_stale_read_is_a_violation() -> None:
    h = [
        put(0, "k", "old", 0, 1),
        put(0, "k", "new", 2, 3),
        get(1, "k", "old", 4, 5),  # starts after "new" was acknowledged
    ]
    v = check_linearizable_kv(h)
    assert v.linearizable is False
    (bad,) = v.violations
    assert bad.key == "k" and "get" in bad.explanation and "'old'" in bad.explanation
    assert any(o["kind"] == "get" for o in bad.ops)


def test_lost_write_is_a_violation() -> None:
    h = [
        put(0, "k", "a", 0, 1),
        put(1, "k", "b", 2, 3),
        get(0, "k", "a", 4, 5),
        get(1, "k", "a", 6, 7),
    ]
    assert check_linearizable_kv(h).linearizable is False


def test_read_of_a_value_never_written_is_a_violation() -> None:
    v = check_linearizable_kv([put(0, "k", "a", 0, 1), get(1, "k", "zzz", 2, 3)])
    assert v.linearizable is False
    assert "no put or cas" in v.violations[0].explanation


def test_wrong_found_flags_and_cas_results_are_violations() -> None:
    assert check_linearizable_kv([put(0, "k", "a", 0, 1, found=True)]).linearizable is False
    h = [put(0, "k", "a", 0, 1), cas(0, "k", "a", "b", 2, 3, swapped=False)]
    assert check_linearizable_kv(h).linearizable is False
    h = [delete(0, "k", 0, 1, found=True)]
    assert check_linearizable_kv(h).linearizable is False


def test_non_monotonic_reads_are_a_violation() -> None:
    # Both puts are done; two later sequential reads disagree on the final value.
    h = [
        put(0, "k", "a", 0, 10),
        put(1, "k", "b", 0, 10),
        get(2, "k", "a", 11, 12),
        get(2, "k", "b", 13, 14),
    ]
    assert check_linearizable_kv(h).linearizable is False


def test_budget_exhaustion_gives_unknown_never_pass() -> None:
    n = 10
    # One value written twice: outside the unique-value method, so the search decides.
    puts = [put(i, "k", f"v{i}", 0, 100) for i in range(n)] + [put(n + 1, "k", "v0", 0, 100)]
    # After all the puts, "v0" then "v1": impossible, but only an exhaustive search of the
    # puts' orders proves it.
    h = [*puts, get(n, "k", "v0", 101, 102), get(n, "k", "v1", 103, 104)]
    small = check_linearizable_kv(h, time_budget_steps=200)
    assert small.linearizable == "unknown" and small.keys_unknown == ["k"]
    assert not small.violations
    assert "not unique" in small.unknown_reasons["k"]
    assert "budget of 200 steps" in small.unknown_reasons["k"]
    full = check_linearizable_kv(h)
    assert full.linearizable is False and full.steps > 200
    # A violation elsewhere outranks an unknown key.
    other = [put(0, "z", "a", 0, 1), get(1, "z", "b", 2, 3)]
    assert check_linearizable_kv(h + other, time_budget_steps=200).linearizable is False


# --- generated histories of a real register ----------------------------------------------

_kinds = st.sampled_from(["put", "put", "get", "get", "cas", "delete"])
_values = st.sampled_from(["a", "b", "c", b"a"])


@st.composite
def register_histories(draw: st.DrawFn, max_ops: int = 18) -> list[Op]:
    """Run a sequential register: each op takes effect at a point inside its interval."""
    processes = draw(st.integers(1, 4))
    clock = [0] * processes
    planned = []
    for seq in range(draw(st.integers(0, max_ops))):
        p = draw(st.integers(0, processes - 1))
        kind = draw(_kinds)
        args: dict[str, Any] = {}
        if kind == "put":
            args = {"value": draw(_values)}
        elif kind == "cas":
            args = {"expected": draw(st.one_of(st.none(), _values)), "value": draw(_values)}
        invoke = clock[p] + draw(st.integers(0, 3))
        effect = invoke + draw(st.integers(0, 4))
        complete = effect + draw(st.integers(0, 4))
        outcome = draw(st.sampled_from(["ok", "ok", "ok", "ok", "fail", "unknown"]))
        applied = outcome == "ok" or (outcome == "unknown" and draw(st.booleans()))
        if outcome == "unknown":
            effect = invoke + draw(st.integers(0, 30))  # may land after the client gave up
        clock[p] = complete
        planned.append((effect, seq, p, kind, args, invoke, complete, outcome, applied))
    results: dict[int, dict[str, Any]] = {}
    state: Any = None
    for _effect, seq, _p, kind, args, *_rest, applied in sorted(planned, key=lambda x: x[:2]):
        if not applied:
            continue
        if kind == "get":
            results[seq] = {"ok": True, "found": state is not None, "value": state}
        elif kind == "put":
            results[seq] = {"ok": True, "found": state is not None}
            state = args["value"]
        elif kind == "delete":
            results[seq] = {"ok": True, "found": state is not None}
            state = None
        else:
            exp = args["expected"]
            hit = state is None if exp is None else type(state) is type(exp) and state == exp
            state = args["value"] if hit else state
            results[seq] = {"ok": True, "swapped": hit, "value": state}
    return [
        Op(
            p,
            kind,
            "k",
            args,
            invoke,
            complete if outcome != "unknown" else None,
            outcome,
            results.get(seq) if outcome == "ok" else None,
        )
        for _e, seq, p, kind, args, invoke, complete, outcome, _a in planned
    ]


@settings(max_examples=300, deadline=None)
@given(register_histories())
def test_histories_of_a_real_register_are_linearizable(history: list[Op]) -> None:
    v = check_linearizable_kv(history)
    assert v.linearizable is True, v.violations


def _brute_force_linearizable(history: list[Op]) -> bool:
    """An independent, exhaustive oracle: try every order (no memo, no event list)."""
    ops = [o for o in history if o.outcome != "fail" and not (o.kind == "get" and not o.result)]
    end = [math.inf if o.outcome == "unknown" else o.complete_ms for o in ops]

    def apply(o: Op, state: Any) -> tuple[bool, Any]:
        r = o.result or {}
        if o.kind == "get":
            return (
                r["found"] == (state is not None)
                and r["value"] == state
                and type(r["value"]) is type(state)
            ), state
        if o.kind in ("put", "delete"):
            new = o.args["value"] if o.kind == "put" else None
            return ("found" not in r or r["found"] == (state is not None)), new
        exp = o.args["expected"]
        hit = state is None if exp is None else type(state) is type(exp) and state == exp
        after = o.args["value"] if hit else state
        ok = "swapped" not in r or (
            r["swapped"] == hit and r["value"] == after and type(r["value"]) is type(after)
        )
        return ok, after

    def search(left: frozenset[int], state: Any) -> bool:
        if all(end[i] == math.inf for i in left):
            return True
        for i in left:
            if any(end[j] < ops[i].invoke_ms for j in left if j != i):
                continue  # some other remaining op returned before i was invoked
            ok, after = apply(ops[i], state)
            if ok and search(left - {i}, after):
                return True
        return False

    return search(frozenset(range(len(ops))), None)


@settings(max_examples=300, deadline=None)
@given(register_histories(max_ops=7), st.data())
def test_checker_agrees_with_brute_force_on_mutated_histories(
    history: list[Op], data: st.DataObject
) -> None:
    reads = [i for i, o in enumerate(history) if o.kind == "get" and o.outcome == "ok"]
    if reads:  # corrupt one read: sometimes still explainable, often not
        i = data.draw(st.sampled_from(reads))
        value = data.draw(st.one_of(st.none(), _values))
        old = history[i]
        history[i] = Op(
            old.process,
            "get",
            "k",
            {},
            old.invoke_ms,
            old.complete_ms,
            "ok",
            {"ok": True, "found": value is not None, "value": value},
        )
    expected = _brute_force_linearizable(history)
    assert check_linearizable_kv(history).linearizable is expected


def test_many_keys_are_checked_quickly() -> None:
    rng = random.Random(7)
    ops: list[Op] = []
    for k in range(200):
        state: str | None = None
        t = 0.0
        for i in range(50):
            # Pairs of overlapping ops by two workers; the effect point decides the result.
            key = f"key{k}"
            if rng.random() < 0.5:
                ops.append(put(i % 3, key, f"{k}-{i}", t, t + 2, found=state is not None))
                state = f"{k}-{i}"
            else:
                ops.append(get(i % 3, key, state, t, t + 2))
            t += rng.choice([1.0, 3.0])
    v = check_linearizable_kv(ops)
    assert v.linearizable is True and v.keys_checked == 200


# --- acknowledged writes -----------------------------------------------------------------


def test_lost_acked_put_is_counted() -> None:
    h = [put(0, "k", 1, 0, 1), put(0, "k", 2, 2, 3), put(0, "j", 1, 0, 1)]
    assert check_acked_puts(h, {"k": 2, "j": 1}) == []
    (lost,) = check_acked_puts(h, {"k": 1, "j": 1})  # the acknowledged 2 is gone
    assert lost.op.args["value"] == 2 and lost.final_value == 1
    assert len(check_acked_puts(h, {"k": None, "j": None})) == 3


def test_write_that_may_follow_explains_the_final_value() -> None:
    h = [put(0, "k", 1, 0, 5), put(1, "k", 2, 1, 4)]  # concurrent: either may be last
    assert check_acked_puts(h, {"k": 1}) == [] and check_acked_puts(h, {"k": 2}) == []
    h = [put(0, "k", 1, 0, 1), put(1, "k", 2, 5, None, outcome="unknown")]
    assert check_acked_puts(h, {"k": 2}) == []
    h = [put(0, "k", 1, 0, 1), put(1, "k", 2, 5, 6, outcome="fail")]
    assert len(check_acked_puts(h, {"k": 2})) == 1  # a failed put explains nothing
    h = [put(0, "k", 1, 0, 1), delete(1, "k", 2, 3)]
    assert check_acked_puts(h, {"k": None}) == []
    assert check_acked_puts(h, {}) == []  # keys not read are not judged


# --- bank --------------------------------------------------------------------------------

START = {"a": 100, "b": 100, "c": 100}


def _final(**deltas: int) -> dict[str, int]:
    return {k: v + deltas.get(k, 0) for k, v in START.items()}


def test_bank_clean_run_holds() -> None:
    h = [
        transfer(0, "a", "b", 10, 0, 1),
        transfer(1, "b", "c", 7, 0, 1),
        transfer(2, "c", "a", 3, 0, 1, outcome="fail"),
    ]
    v = check_bank(
        h, [("after crash", START), ("end", _final(a=-10, b=3, c=7))], 300, initial_balances=START
    )
    assert v.invariant is True and v.exactly_once is True and not v.violations


def test_double_applied_transfer_is_caught() -> None:
    h = [transfer(0, "a", "b", 10, 0, 1)]
    v = check_bank(h, [("end", _final(a=-20, b=20))], 300, initial_balances=START)
    assert v.invariant is True and v.exactly_once is False
    (bad,) = v.violations
    assert bad["kind"] == "not_exactly_once" and "applied twice" in bad["detail"]


def test_unknown_transfers_may_or_may_not_have_applied() -> None:
    h = [
        transfer(0, "a", "b", 10, 0, 1),
        transfer(1, "b", "c", 7, 0, None, outcome="unknown"),
        transfer(2, "c", "a", 5, 0, None, outcome="unknown"),
    ]
    for final in (_final(a=-10, b=10), _final(a=-10, b=3, c=7), _final(a=-5, b=3, c=2)):
        assert check_bank(h, [("end", final)], 300, initial_balances=START).exactly_once is True
    # The acknowledged transfer applied twice, with the unknown ones either way: no subset.
    v = check_bank(h, [("end", _final(a=-20, b=13, c=7))], 300, initial_balances=START)
    assert v.exactly_once is False


def test_too_many_unknown_transfers_is_unknown_not_pass() -> None:
    h = [transfer(i, "a", "b", i + 1, 0, None, outcome="unknown") for i in range(6)]
    v = check_bank(
        h, [("end", _final(a=-3, b=3))], 300, initial_balances=START, unknown_transfers_max=5
    )
    assert v.exactly_once == "unknown" and v.invariant is True
    v = check_bank(h, [("end", _final(a=-3, b=3))], 300, initial_balances=START)
    assert v.exactly_once is True
    v = check_bank(h, [("end", _final(a=-100, b=100))], 300, initial_balances=START)
    assert v.exactly_once is False  # 1+2+...+6 = 21 < 100


def test_negative_balance_and_broken_total_are_caught() -> None:
    v = check_bank([], [("after kill", {"a": -5, "b": 205, "c": 100})], 300, initial_balances=START)
    assert v.invariant is False
    assert [x["kind"] for x in v.violations] == ["negative_balance", "not_exactly_once"]
    v = check_bank(
        [],
        [("after partition", {"a": 100, "b": 100, "c": 99}), ("end", START)],
        300,
        initial_balances=START,
    )
    assert v.invariant is False and v.exactly_once is True
    first = v.violations[0]
    assert first["kind"] == "bank_total" and "after partition" in first["detail"]
    reads = [
        op(0, "total", "", {}, 0, 1, {"ok": True, "total": 299, "accounts": 3}),
        op(1, "balance", "", {"account": "a"}, 0, 1, {"ok": True, "account": "a", "balance": -1}),
    ]
    v = check_bank(reads, [("end", START)], 300, initial_balances=START)
    assert {x["kind"] for x in v.violations} == {"bank_total", "negative_balance"}


def test_initial_balances_come_from_opens() -> None:
    opens = [
        op(0, "open", "", {"account": a, "balance": b}, 0, 1, {"ok": True})
        for a, b in START.items()
    ]
    early_total = op(1, "total", "", {}, 0.5, 0.6, {"ok": True, "total": 100, "accounts": 1})
    h = [*opens, early_total, transfer(0, "a", "b", 10, 2, 3)]
    v = check_bank(h, [("end", _final(a=-10, b=10))], 300)
    assert v.invariant is True and v.exactly_once is True
    assert check_bank([], [("end", START)], 300).exactly_once == "unknown"


# --- fencing -----------------------------------------------------------------------------


def test_two_writers_in_one_epoch_are_caught() -> None:
    h = [
        put(0, "k", "a", 0, 1, epoch=3, primary="h1"),
        put(1, "k", "b", 2, 3, epoch=3, primary="h2"),
        put(0, "k", "c", 4, 5, epoch=4, primary="h2"),
        get(1, "k", "c", 6, 7),
    ]
    (bad,) = check_one_writer_per_epoch(h)
    assert bad["kind"] == "two_writers_in_epoch" and bad["epoch"] == 3
    assert bad["primaries"] == ["h1", "h2"]
    assert check_one_writer_per_epoch(h[:1] + h[2:]) == []
    # Epochs belong to a service: the same epoch number in two services is no conflict.
    other = [
        put(0, "k", "a", 0, 1, epoch=3, primary="h1", service="s1"),
        put(0, "k", "a", 0, 1, epoch=3, primary="h2", service="s2"),
    ]
    assert check_one_writer_per_epoch(other) == []


# --- verdict and history round trip ------------------------------------------------------


def test_verdict_assembles_every_check() -> None:
    h = [
        put(0, "k", "a", 0, 1, epoch=1, primary="h1"),
        get(1, "k", "a", 2, 3),
        transfer(2, "a", "b", 10, 0, 1, epoch=1, primary="h1", service="bank"),
    ]
    good = verdict(
        h,
        final_kv={"k": "a"},
        bank_snapshots=[("end", _final(a=-10, b=10))],
        bank_initial_total=300,
        bank_initial_balances=START,
    )
    assert good["linearizable"] is True and good["bank_invariant"] is True
    assert good["exactly_once"] is True and good["lost_acked_writes"] == 0
    assert good["violations"] == [] and good["passed"] is True

    kv_only = verdict(h[:2], final_kv={"k": None})
    assert kv_only["bank_invariant"] is None and kv_only["exactly_once"] is None
    assert kv_only["lost_acked_writes"] == 1 and kv_only["passed"] is False
    assert [x["kind"] for x in kv_only["violations"]] == ["lost_acked_write"]
    # Async mode: the loss is allowed but still counted and shown.
    relaxed = verdict(h[:2], final_kv={"k": None}, replication_mode="async")
    assert relaxed["lost_acked_writes"] == 1 and len(relaxed["lost_writes"]) == 1
    assert relaxed["violations"] == [] and relaxed["passed"] is True

    unsure = verdict(
        [put(i, "k", f"v{i}", 0, 9) for i in range(8)]
        + [put(8, "k", "v0", 0, 9)]  # a value written twice: only the search can judge it
        + [get(9, "k", "v0", 10, 11), get(9, "k", "v1", 12, 13)],
        time_budget_steps=50,
    )
    assert unsure["linearizable"] == "unknown" and unsure["passed"] == "unknown"


def test_history_round_trips_through_json_lines() -> None:
    rec = HistoryRecorder()
    h1 = rec.invoke(0, "put", "k", {"value": b"\x00\xff"}, 1.5)
    h2 = rec.invoke(1, "cas", "k", {"expected": None, "value": "s"}, 2.0, service="kv1")
    with pytest.raises(ValueError):
        rec.invoke(0, "get", "k", {}, 2.5)
    rec.complete(h1, 3.0, "ok", {"ok": True, "found": False}, epoch=2, index=7, primary="h1")
    h3 = rec.invoke(0, "get", "k", {}, 4.0)
    rec.complete(h3, 5.0, "unknown")
    ops = rec.ops()  # h2 is still in flight: unknown
    assert [o.outcome for o in ops] == ["ok", "unknown", "unknown"]
    assert ops[1].complete_ms is None and ops[1].service == "kv1" and h2 == 1
    text = dump_ops(ops)
    assert text.count("\n") == 3
    assert load_ops(text + "\n") == ops
    assert load_ops(text)[0].args["value"] == b"\x00\xff"
    with pytest.raises(ValueError, match="line 1"):
        load_ops('{"nope": 1}\n')
    with pytest.raises(ValueError):
        Op(0, "get", "k", {}, 0, 1, "maybe", None)


def test_async_mode_counts_a_provably_truncated_transfer_as_lost_not_as_a_violation() -> None:
    from failover.chaos.checkers import provably_truncated, verdict
    from failover.chaos.history import Op

    def transfer(n: int, epoch: int, index: int, frm: str, to: str, amount: int) -> Op:
        return Op(process=n, kind="transfer", key="", service="bank",
                  args={"from": frm, "to": to, "amount": amount}, invoke_ms=n * 10.0,
                  complete_ms=n * 10.0 + 5, outcome="ok", result={"ok": True}, epoch=epoch,
                  index=index, primary=f"h{epoch}")

    kept = transfer(1, 1, 10, "a", "b", 5)
    lost = transfer(2, 1, 11, "a", "b", 7)  # acked by epoch 1's primary, then overwritten
    # Epoch 2 opened with its empty entry at 11 (overwriting epoch 1's 11), then this at 12.
    after = transfer(3, 2, 12, "b", "a", 1)
    ops = [kept, lost, after]
    assert provably_truncated(ops) == [lost]
    # With the final log's epoch history the answer is exact, whatever the replies show.
    assert provably_truncated(ops, {"bank": [(1, 1), (2, 11)]}) == [lost]
    assert provably_truncated(ops, {"bank": [(1, 1), (2, 12)]}) == []
    start = {"a": 100, "b": 100}
    final = {"a": 100 - 5 + 1, "b": 100 + 5 - 1}  # the lost transfer is not in the state
    args = {"bank_snapshots": [("end", final)], "bank_initial_total": 200,
            "bank_initial_balances": start}
    async_verdict = verdict(ops, replication_mode="async", **args)
    assert async_verdict["exactly_once"] is True and async_verdict["passed"] is True
    assert async_verdict["lost_acked_writes"] == 1
    sync_verdict = verdict(ops, replication_mode="sync", **args)
    assert sync_verdict["exactly_once"] is False and sync_verdict["passed"] is False


# --- unique values: decided in polynomial time -------------------------------------------


def _decide(history: list[Op]) -> Any:
    from failover.chaos.register import decide_unique_register

    decision = decide_unique_register(list(enumerate(history)))
    assert decision.applicable, decision.reason
    return decision


def test_stale_read_is_decided_and_names_the_read_and_the_missed_write() -> None:
    h = [
        put(0, "k", "old", 0, 10, epoch=3, index=40, primary="host1"),
        put(1, "k", "new", 20, 30, epoch=3, index=41, primary="host1"),
        # Thousands of concurrent, legal ops around it must not hide it or make it "unknown".
        *[put(2 + i % 10, "k", f"noise{i}", 40 + i, 60 + i) for i in range(10)],
        get(20, "k", "old", 1000, 1010, epoch=4, primary="host3"),
    ]
    v = check_linearizable_kv(h)
    assert v.linearizable is False and v.keys_unknown == [] and v.keys_decided == 1
    (bad,) = v.violations
    assert bad.anomaly == "stale_read"
    d = bad.details
    assert d["read_id"] == len(h) - 1 and d["value"] == "old"
    assert d["read"]["epoch"] == 4 and d["read"]["primary"] == "host3"
    assert d["read"]["invoke_ms"] == 1000
    # The write it missed is one written after "old" and acknowledged before the read began.
    missed = d["missed_write"]
    assert missed["kind"] == "put" and missed["complete_ms"] < 1000
    assert missed["args"]["value"] != "old"
    assert d["read_value_written_by"]["id"] == 0
    assert "stale read: op #12" in bad.explanation and "epoch 4 on host3" in bad.explanation
    assert "'old'" in bad.explanation
    # The simplest case names exactly the write of "new".
    (simple,) = check_linearizable_kv(h[:2] + [h[-1]]).violations
    assert simple.details["missed_write"]["id"] == 1
    assert simple.details["missed_write"]["epoch"] == 3
    assert simple.details["missed_write"]["primary"] == "host1"
    assert "op #1 (p1 put [20.0, 30.0], epoch 3 on host1 at index 41)" in simple.explanation


def test_read_of_a_value_never_written_is_decided() -> None:
    d = _decide([put(0, "k", "a", 0, 1), get(1, "k", "zzz", 2, 3)])
    assert d.linearizable is False
    (bad,) = d.violations
    assert bad.anomaly == "never_written" and bad.read == 1 and bad.value == "zzz"
    d = _decide([put(0, "k", "a", 0, 1, outcome="fail"), get(1, "k", "a", 2, 3)])
    assert [v.anomaly for v in d.violations] == ["failed_write_seen"]


def test_read_before_its_write_was_invoked_is_decided() -> None:
    d = _decide([get(1, "k", "a", 0, 1), put(0, "k", "a", 2, 3)])
    assert d.linearizable is False
    (bad,) = d.violations
    assert bad.anomaly == "read_before_write" and bad.read == 0 and bad.value == "a"
    assert "op #0" in bad.explanation and "op #1" in bad.explanation
    # Equal stamps are concurrent: the read may complete the instant the write is invoked.
    assert _decide([get(1, "k", "a", 0, 2), put(0, "k", "a", 2, 3)]).linearizable is True
    # The same through a cas chain: "c" comes after "a", whose write began after "c" was read.
    h = [get(1, "k", "c", 0, 1), put(0, "k", "a", 2, 3),
         cas(0, "k", "a", "c", 4, 5, swapped=True)]
    assert [v.anomaly for v in _decide(h).violations] == ["read_before_write"]


def test_unknown_writes_observed_or_not() -> None:
    late = put(0, "k", "late", 0, None, outcome="unknown")
    # Never observed: it may never have taken effect.
    assert _decide([late, put(1, "k", "a", 5, 6), get(2, "k", "a", 7, 8)]).linearizable
    # Observed long after its client gave up: it took effect late, which is allowed.
    h = [late, put(1, "k", "a", 5, 6), get(2, "k", "a", 7, 8), get(2, "k", "late", 9, 10),
         get(2, "k", "late", 11, 12)]
    assert _decide(h).linearizable is True
    # Once observed it stays until overwritten: back to "a" is a stale read.
    h.append(get(2, "k", "a", 13, 14))
    d = _decide(h)
    assert d.linearizable is False and d.violations[0].anomaly == "stale_read"
    assert d.violations[0].read == 5 and d.violations[0].value == "a"
    # An unknown cas is seen through the value it wrote, and then it read its expected.
    h = [put(0, "k", "a", 0, 1), cas(1, "k", "a", "b", 2, None, outcome="unknown"),
         put(0, "k", "c", 3, 4), get(2, "k", "b", 5, 6)]
    d = _decide(h)  # "b" replaced "a" atomically, yet "c" was written (acked) before
    assert d.linearizable is False
    h[2] = put(0, "k", "c", 3, 4, outcome="fail")
    assert _decide(h).linearizable is True
    # found=True on the first acknowledged put is explained by an unseen unknown write.
    assert _decide([late, put(1, "k", "a", 5, 6, found=True)]).linearizable is True
    d = _decide([put(1, "k", "a", 5, 6, found=True)])
    assert [v.anomaly for v in d.violations] == ["found_flag"]


def test_cas_chains() -> None:
    chain = [
        put(0, "k", "v0", 0, 1, found=False),
        get(1, "k", "v0", 2, 3),
        cas(1, "k", "v0", "v1", 4, 5, swapped=True),
        cas(2, "k", "v0", "x", 4.5, 6, swapped=False),  # too late: sees v1
        cas(0, "k", "v1", "v2", 6, 8, swapped=True),
        get(2, "k", "v2", 7, 9),
        cas(1, "k", "v2", "v3", 10, 11, swapped=True),
    ]
    chain[3] = op(2, "cas", "k", {"expected": "v0", "value": "x"}, 4.5, 6,
                  {"ok": True, "swapped": False, "value": "v1"})
    assert _decide(chain).linearizable is True
    # A read of v1 after v2 was acknowledged is stale, inside the chain.
    d = _decide([*chain, get(3, "k", "v1", 12, 13)])
    assert d.linearizable is False
    (bad,) = d.violations
    assert bad.anomaly == "stale_read" and bad.read == 7 and bad.value == "v1"
    # Two cas cannot both replace v1.
    d = _decide([*chain, cas(3, "k", "v1", "w", 6, 7, swapped=True)])
    assert "replaced_twice" in [v.anomaly for v in d.violations]
    # A cas that reports it did not swap although it saw its expected value is wrong.
    d = _decide([put(0, "k", "a", 0, 1),
                 op(1, "cas", "k", {"expected": "a", "value": "b"}, 2, 3,
                    {"ok": True, "swapped": False, "value": "a"})])
    assert [v.anomaly for v in d.violations] == ["bad_reply"]
    # A put's value cannot be replaced atomically by a cas and also overwritten in between.
    d = _decide([put(0, "k", "a", 0, 1), cas(1, "k", "a", "b", 5, 6, swapped=True),
                 put(2, "k", "c", 2, 3)])
    assert d.linearizable is False


def _simulated_register(rng: random.Random, keys: int, workers: int, n: int,
                        unknown_rate: float = 0.02) -> list[Op]:
    """A real register run by concurrent workers: each op takes effect at one instant inside
    its interval; some outcomes are lost (unknown) and some of those never apply."""
    planned = []
    clock = [0.0] * workers
    for seq in range(n):
        p = rng.randrange(workers)
        key = f"k{rng.randrange(keys)}"
        roll = rng.random()
        kind = "get" if roll < 0.5 else "put" if roll < 0.75 else "cas"
        invoke = clock[p] + rng.uniform(0, 2)
        effect = invoke + rng.uniform(0, 5)
        complete = effect + rng.uniform(0, 5)
        outcome = "unknown" if rng.random() < unknown_rate else "ok"
        applied = outcome == "ok" or rng.random() < 0.5
        clock[p] = complete
        planned.append([effect, seq, p, key, kind, invoke, complete, outcome, applied])
    state: dict[str, Any] = {}
    ops: dict[int, Op] = {}
    for _effect, seq, p, key, kind, invoke, complete, outcome, applied in sorted(planned):
        cur = state.get(key)
        end = None if outcome == "unknown" else complete
        if kind == "get":
            res = {"ok": True, "found": cur is not None, "value": cur}
            ops[seq] = Op(p, "get", key, {}, invoke, end, outcome,
                          res if outcome == "ok" else None)
        elif kind == "put":
            value = f"p{p}-{seq}"
            if applied:
                state[key] = value
            ops[seq] = Op(p, "put", key, {"value": value}, invoke, end, outcome,
                          {"ok": True, "found": cur is not None} if outcome == "ok" else None)
        else:  # a cas from the value the worker read just before (often still current)
            expected = cur if rng.random() < 0.7 else f"p{p}-{seq - 1}"
            value = f"p{p}-{seq}"
            hit = expected == cur
            if applied and hit:
                state[key] = value
            res = {"ok": True, "swapped": hit, "value": value if hit else cur}
            ops[seq] = Op(p, "cas", key, {"expected": expected, "value": value}, invoke, end,
                          outcome, res if outcome == "ok" else None)
    return [ops[s] for s in sorted(ops)]


def test_thousands_of_concurrent_ops_on_two_hot_keys_are_decided_fast() -> None:
    import time

    h = _simulated_register(random.Random(11), keys=2, workers=12, n=20_000)
    assert sum(o.outcome == "unknown" for o in h) > 100
    assert sum(o.kind == "cas" and o.result is not None and o.result["swapped"]
               for o in h) > 1000
    started = time.perf_counter()
    v = check_linearizable_kv(h)
    elapsed = time.perf_counter() - started
    assert v.linearizable is True, v.violations[:1]
    assert v.keys_decided == 2 and v.steps == 0
    assert elapsed < 5.0, elapsed  # about 0.3 s here; the search would not finish at all
    # One stale read among them is found, named, and still fast.
    last = max(o.complete_ms or 0 for o in h)
    first_put = next(i for i, o in enumerate(h) if o.kind == "put" and o.outcome == "ok"
                     and o.key == "k0")
    stale = get(99, "k0", h[first_put].args["value"], last + 1, last + 2)
    v = check_linearizable_kv([*h, stale])
    assert v.linearizable is False
    (bad,) = v.violations
    assert bad.anomaly == "stale_read" and bad.details["read_id"] == len(h)


def _unique_histories(rng: random.Random, n: int) -> list[Op]:
    h = _simulated_register(rng, keys=1, workers=3, n=n, unknown_rate=0.2)
    return [o if rng.random() > 0.1 else Op(o.process, o.kind, o.key, o.args, o.invoke_ms,
                                             o.complete_ms, "fail", None) for o in h]


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 7), st.data())
def test_unique_value_method_agrees_with_brute_force(seed: int, n: int,
                                                     data: st.DataObject) -> None:
    rng = random.Random(seed)
    history = _unique_histories(rng, n)
    written = [None, "never"] + [o.args["value"] for o in history if o.kind != "get"]
    reads = [i for i, o in enumerate(history) if o.outcome == "ok" and o.kind != "cas"]
    if reads and data.draw(st.booleans()):  # corrupt a get's value or a put's found flag
        i = data.draw(st.sampled_from(reads))
        old = history[i]
        if old.kind == "get":
            value = data.draw(st.sampled_from(written))
            res = {"ok": True, "found": value is not None, "value": value}
        else:
            res = {"ok": True, "found": not old.result["found"]}  # type: ignore[index]
        history[i] = Op(old.process, old.kind, "k0", old.args, old.invoke_ms, old.complete_ms,
                        "ok", res)
    expected = _brute_force_linearizable(history)
    assert _decide(history).linearizable is expected


def test_unique_value_method_agrees_with_the_search_on_longer_histories() -> None:
    from failover.chaos.checkers import _check_key

    rng = random.Random(5)
    disagreements = 0
    violated = 0
    for _ in range(300):
        history = _unique_histories(rng, 30)
        reads = [i for i, o in enumerate(history) if o.kind == "get" and o.outcome == "ok"]
        if reads and rng.random() < 0.7:
            i = rng.choice(reads)
            value = rng.choice([o.args["value"] for o in history if o.kind != "get"] or [None])
            history[i] = get(history[i].process, "k0", value, history[i].invoke_ms,
                             history[i].complete_ms)
        searched = _check_key(history, None, 10_000_000).outcome
        assert searched != "unknown"
        decided = _decide(history).linearizable
        violated += decided is False
        disagreements += decided is not searched
    assert disagreements == 0 and violated > 50


# --- a saved history, re-checked offline --------------------------------------------------


def _recorded_run(*, stale: bool = False, bad_snapshot: bool = False) -> list[Op]:
    """What the chaos runner records: its settings, the bank's opens and snapshots, the
    workload, each service's final epoch history and the final read of every key."""
    from failover.chaos.history import CHECKER_PROCESS as R

    kv, bank = "chaos-kv", "chaos-bank"
    start = {"ok": True, "balances": {"a0": 100, "a1": 100}}
    end = {"ok": True, "balances": {"a0": 90, "a1": 110 if not bad_snapshot else 111}}
    h = [
        op(R, "run", "", {"mode": "sync", "seed": 7}, 0, 0, {}),
        op(R, "open", "", {"account": "a0", "balance": 100}, 1, 2, {"ok": True},
           service=bank, epoch=1, index=2, primary="host1"),
        op(R, "open", "", {"account": "a1", "balance": 100}, 3, 4, {"ok": True},
           service=bank, epoch=1, index=3, primary="host1"),
        op(R, "read_all", "", {"snapshot": "start"}, 5, 6, start, service=bank),
        transfer(100, "a0", "a1", 10, 7, 8, service=bank, epoch=1, index=4, primary="host1"),
        put(0, "k0", "p0-1", 10, 11, found=False, service=kv, epoch=1, index=2,
            primary="host1"),
        put(1, "k0", "p1-1", 20, 21, found=True, service=kv, epoch=2, index=4,
            primary="host2"),
        get(2, "k0", "p0-1" if stale else "p1-1", 30, 31, service=kv, epoch=2,
            primary="host2"),
        op(R, "epoch_history", "", {}, 40, 40, {"epoch_history": [[1, 1], [2, 3]]},
           service=kv),
        op(R, "epoch_history", "", {}, 40, 40, {"epoch_history": [[1, 1]]}, service=bank),
        get(R, "k0", "p1-1", 41, 42, service=kv, epoch=2, primary="host2"),
        op(R, "read_all", "", {"snapshot": "end"}, 43, 44, end, service=bank),
    ]
    h[-2] = op(R, "get", "k0", {"final": True}, 41, 42,
               {"ok": True, "found": True, "value": "p1-1"}, service=kv)
    return h


def _check_file(path: Any) -> tuple[int, dict[str, Any]]:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "failover.cli", "--format", "json", "chaos", "check", str(path)],
        capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout)


def test_a_saved_history_is_rechecked_offline(tmp_path: Any) -> None:
    from failover.chaos.checkers import check_history

    clean = _recorded_run()
    result = check_history(clean)
    assert result["passed"] is True, result["violations"]
    assert result["bank"]["snapshots_checked"] == 2 and result["exactly_once"] is True
    assert result["lost_checked"] is True and result["keys_decided"] == 1
    (tmp_path / "history.jsonl").write_text(dump_ops(clean))
    code, out = _check_file(tmp_path)  # a report dir holds history.jsonl
    assert code == 0 and out["passed"] is True and out["replication_mode"] == "sync"

    stale = tmp_path / "stale.jsonl"
    stale.write_text(dump_ops(_recorded_run(stale=True)))
    code, out = _check_file(stale)
    assert code == 1 and out["passed"] is False and out["linearizable"] is False
    (v,) = out["violations"]
    assert v["anomaly"] == "stale_read" and v["details"]["read_id"] == 7
    assert v["details"]["missed_write"]["id"] == 6
    assert v["details"]["missed_write"]["primary"] == "host2"

    # The final reads and the snapshots recorded as ops are what the checkers judge.
    lost = _recorded_run()
    lost[-2] = op(lost[-2].process, "get", "k0", {"final": True}, 41, 42,
                  {"ok": True, "found": True, "value": "p0-1"}, service="chaos-kv")
    kinds = {v["kind"] for v in check_history(lost)["violations"]}
    assert kinds == {"not_linearizable", "lost_acked_write"}
    bad = check_history(_recorded_run(bad_snapshot=True))
    assert [v["snapshot"] for v in bad["violations"] if v["kind"] == "bank_total"] == ["end"]
    # An epoch history that overwrote an acknowledged write: lost in sync mode.
    truncated = _recorded_run()
    truncated[8] = op(-1, "epoch_history", "", {}, 40, 40,
                      {"epoch_history": [[1, 1], [2, 2]]}, service="chaos-kv")
    assert any(v["kind"] == "lost_acked_write" for v in check_history(truncated)["violations"])
    relaxed = check_history(truncated, replication_mode="async")
    assert relaxed["async_excluded_ops"] == 1  # the lost put (no read saw it)
    assert not any(v["kind"] == "lost_acked_write" for v in relaxed["violations"])

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "failover.cli", "chaos", "check", str(garbage)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "history line 1" in done.stderr
