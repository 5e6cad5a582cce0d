"""Checkers that judge a chaos run's recorded history (see `failover.chaos.history`).

They are pure: they take ops and observed states and return verdicts, with no I/O, clock,
asyncio or grpc. Every verdict is one of "holds", "violated" (with an explanation and the
ops involved) or, where the check is bounded, an explicit "unknown", never a false pass.

What is checked (docs/design.md, Invariants):

- `check_linearizable_kv`: every kv key's history is linearizable against a register
  (put, get, cas, delete). Invariants 4, 5, 6, 9 and 10 all show up here: a lost,
  reordered, twice-applied or stale operation makes some key's history non-linearizable.
  Keys whose writes are unique are decided exactly in polynomial time
  (`failover.chaos.register`); the others are searched within a budget.
- `check_acked_puts`: no acknowledged write is missing from the final state (invariant 9;
  in async mode the loss is counted and shown, not hidden).
- `check_bank`: the bank's total is constant and no balance is negative at every snapshot
  (after every fault and at the end), and the final balances are explained by every
  acknowledged transfer applied exactly once plus some subset of the unknown ones.
- `check_one_writer_per_epoch`: at most one primary acknowledged writes in any epoch
  (invariants 1-3: fencing by epoch).
- `verdict`: runs all of these and assembles the dict the chaos report shows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from failover.chaos.history import BANK_KINDS, KV_KINDS, WRITE_KINDS, Op, op_to_dict
from failover.chaos.register import RegisterViolation, decide_unique_register, group_by_key
from failover.core.log_position import epoch_at

__all__ = [
    "DEFAULT_TIME_BUDGET_STEPS",
    "DEFAULT_UNKNOWN_TRANSFERS_MAX",
    "BankVerdict",
    "KvVerdict",
    "KvViolation",
    "LostWrite",
    "Tri",
    "check_acked_puts",
    "check_bank",
    "check_history",
    "check_linearizable_kv",
    "check_one_writer_per_epoch",
    "snapshots_from_ops",
    "verdict",
]

Tri = bool | Literal["unknown"]
"""True (holds), False (violated) or "unknown" (the bounded check could not decide)."""

DEFAULT_TIME_BUDGET_STEPS = 2_000_000
DEFAULT_UNKNOWN_TRANSFERS_MAX = 20
_OPS_SHOWN_MAX = 20  # ops attached to one violation


def _ops_shown(ops: Iterable[Op]) -> list[dict[str, Any]]:
    return [op_to_dict(op) for op in list(ops)[:_OPS_SHOWN_MAX]]


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps str and bytes apart (the kv kind compares type and content)."""
    return type(a) is type(b) and a == b


def _end(op: Op) -> float:
    """When an op's effect was last possible: its completion, or never-bounded if unknown."""
    if op.outcome == "unknown" or op.complete_ms is None:
        return math.inf
    return max(op.complete_ms, op.invoke_ms)


def _key_label(service: str, key: str) -> str:
    return f"{service}/{key}" if service else key


# --- kv: the register model --------------------------------------------------------------

_Step = Callable[[Any], tuple[bool, Any]]
"""Apply one op to a register state (the value, None when absent): (legal, next state)."""


def _model_step(op: Op) -> _Step | None:
    """The op as a register transition, or None when it constrains nothing (dropped).

    Results are checked only for ok ops and only for the fields present, so a history
    that records less is judged on what it has. Unknown ops carry no result: any
    transition they make is legal, which is why they may also be skipped (never applied).
    """
    if op.outcome == "fail":
        return None  # definitely never took effect
    res = op.result if op.outcome == "ok" and op.result is not None else None
    kind = op.kind
    if kind == "get":
        if res is None:
            return None  # a read with no answer changes nothing and shows nothing
        has_found = "found" in res
        found = bool(res.get("found"))
        has_value = "value" in res
        value = res.get("value")

        def get(state: Any) -> tuple[bool, Any]:
            if has_found and found != (state is not None):
                return False, state
            if has_value and (found or not has_found) and not _same_or_absent(value, state):
                return False, state
            return True, state

        return get
    if kind in ("put", "delete"):
        new = op.args.get("value") if kind == "put" else None
        if res is None or "found" not in res:
            return lambda state: (True, new)
        found = bool(res["found"])
        return lambda state: ((state is not None) == found, new)
    if kind == "cas":
        expected = op.args.get("expected")
        new = op.args.get("value")
        swapped_seen = res is not None and "swapped" in res
        swapped = bool(res.get("swapped")) if res is not None else False
        value_seen = res is not None and "value" in res
        value_now = res.get("value") if res is not None else None

        def cas(state: Any) -> tuple[bool, Any]:
            matches = state is None if expected is None else _same(state, expected)
            after = new if matches else state
            if swapped_seen and swapped != matches:
                return False, state
            if value_seen and not _same_or_absent(value_now, after):
                return False, state
            return True, after

        return cas
    raise ValueError(f"op kind {kind!r} is not a kv op ({sorted(KV_KINDS)})")


def _same_or_absent(seen: Any, state: Any) -> bool:
    return seen is None and state is None or _same(seen, state)


# --- kv: linearizability -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KvViolation:
    """One key whose history no register order explains."""

    key: str
    service: str
    explanation: str
    ops: list[dict[str, Any]]
    anomaly: str = "not_linearizable"  # see `RegisterViolation.anomaly` for decided keys
    details: dict[str, Any] = field(default_factory=dict)  # the read, the write it missed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "key": self.key,
            "service": self.service,
            "explanation": self.explanation,
            "ops": self.ops,
            "anomaly": self.anomaly,
            "details": self.details,
        }


@dataclass(frozen=True, slots=True)
class KvVerdict:
    """The outcome of `check_linearizable_kv`.

    `linearizable` is False when any key is violated, else "unknown" when any key's search
    ran out of budget, else True. `keys_unknown` lists those keys (as "service/key" when the
    op names a service) and `unknown_reasons` says, per key, why it was not decided.
    `keys_decided` counts the keys decided by the unique-value method; the others were
    searched. `steps` is the search work done, summed over keys.
    """

    linearizable: Tri
    keys_checked: int
    keys_unknown: list[str]
    violations: list[KvViolation]
    steps: int
    unknown_reasons: dict[str, str] = field(default_factory=dict)
    keys_decided: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "linearizable": self.linearizable,
            "keys_checked": self.keys_checked,
            "keys_unknown": list(self.keys_unknown),
            "violations": [v.to_dict() for v in self.violations],
            "steps": self.steps,
            "unknown_reasons": dict(self.unknown_reasons),
            "keys_decided": self.keys_decided,
        }


@dataclass(slots=True)
class _KeyResult:
    outcome: Tri
    steps: int
    explanation: str = ""
    ops: list[Op] = field(default_factory=list)


def _check_key(ops: list[Op], initial: Any, budget: int) -> _KeyResult:
    """Wing & Gong's search with Lowe's memoisation, on one key's ops.

    Events (invocations and completions) sit in a doubly linked list in time order, an
    invocation before a completion at the same time (so equal stamps count as concurrent:
    never a false violation). The search walks the list: at an invocation it tries to
    linearize that op next (the op is "minimal": nothing still in the list completed before
    it was invoked); if the model allows it and the pair (set of linearized ops, new state)
    was not seen before, it lifts the op out and starts again from the head. Reaching a
    completion means that op was not linearized before it returned: backtrack. Unknown ops
    complete at +infinity, so they may be linearized at any point after their invocation;
    the search succeeds once every op with a known completion is linearized (the unknown
    ones left over are the ones that never took effect).
    """
    steps_of = [_model_step(op) for op in ops]
    kept = [(op, st) for op, st in zip(ops, steps_of, strict=True) if st is not None]
    if not kept:
        return _KeyResult(True, 0)
    n = len(kept)
    finite = [_end(op) != math.inf for op, _ in kept]
    required = sum(finite)
    if required == 0:
        return _KeyResult(True, 0)

    events = []
    for i, (op, _) in enumerate(kept):
        events.append((op.invoke_ms, 0, i))
        events.append((_end(op), 1, i))
    events.sort()
    # Node 0 is the head, nodes 1..2n the events in order, node 2n+1 the tail.
    tail = 2 * n + 1
    nxt = list(range(1, tail + 1)) + [tail]
    prv = [0] + list(range(0, tail))
    is_call = [False] * (tail + 1)
    op_of = [-1] * (tail + 1)
    match = [0] * (tail + 1)
    call_node = [0] * n
    for pos, (_, ret, i) in enumerate(events, 1):
        op_of[pos] = i
        if ret:
            match[call_node[i]] = pos
        else:
            is_call[pos] = True
            call_node[i] = pos
    step_fn = [st for _, st in kept]

    cache: set[tuple[int, Any]] = set()
    stack: list[tuple[int, Any]] = []  # (call node lifted, state before it)
    linearized = 0
    state = initial
    done = 0
    steps = 0
    best_depth = -1
    best_block = -1
    best_prefix: list[int] = []
    best_state: Any = None
    node = nxt[0]
    while True:
        steps += 1
        if steps > budget:
            return _KeyResult("unknown", steps - 1)
        if node == tail:  # unreachable: completions follow every invocation
            raise AssertionError("linearizability search ran off the event list")
        i = op_of[node]
        if is_call[node]:
            legal, after = step_fn[i](state)
            if legal:
                now = linearized | (1 << i)
                memo = (now, after)
                if memo not in cache:
                    cache.add(memo)
                    stack.append((node, state))
                    state = after
                    linearized = now
                    ret = match[node]
                    nxt[prv[node]] = nxt[node]
                    prv[nxt[node]] = prv[node]
                    nxt[prv[ret]] = nxt[ret]
                    prv[nxt[ret]] = prv[ret]
                    if finite[i]:
                        done += 1
                        if done == required:
                            return _KeyResult(True, steps)
                    node = nxt[0]
                    continue
            node = nxt[node]
            continue
        # The completion of op i, which is not linearized yet: this order cannot work.
        if len(stack) > best_depth:
            best_depth = len(stack)
            best_block = i
            best_prefix = [op_of[c] for c, _ in stack]
            best_state = state
        if not stack:
            break
        node, state = stack.pop()
        j = op_of[node]
        linearized &= ~(1 << j)
        if finite[j]:
            done -= 1
        ret = match[node]
        nxt[prv[ret]] = ret
        prv[nxt[ret]] = ret
        nxt[prv[node]] = node
        prv[nxt[node]] = node
        node = nxt[node]

    blocked = kept[best_block][0]
    prefix_ops = [kept[k][0] for k in best_prefix]
    overlapping = [
        op
        for op, _ in kept
        if op is not blocked and op.invoke_ms <= _end(blocked) and _end(op) >= blocked.invoke_ms
    ]
    shown_state = "absent" if best_state is None else repr(best_state)
    explanation = (
        f"no register order explains {blocked.describe()}: the longest consistent order found "
        f"linearizes {best_depth} of {n} ops and leaves the key {shown_state}"
    )
    if prefix_ops:
        explanation += f"; its last op is {prefix_ops[-1].describe()}"
    involved = [blocked, *overlapping, *reversed(prefix_ops[-5:])]
    unique: list[Op] = []
    for op in involved:
        if all(op is not u for u in unique):
            unique.append(op)
    return _KeyResult(False, steps, explanation, unique)


def _never_written(ops: list[Op], initial: Any) -> tuple[Op, Any] | None:
    """A get that returned a value no op on the key could have written, if any."""
    written: list[Any] = [initial]
    for op in ops:
        if op.outcome != "fail" and op.kind in ("put", "cas"):
            written.append(op.args.get("value"))
    for op in ops:
        if op.kind != "get" or op.outcome != "ok" or not op.result:
            continue
        if op.result.get("found", True) and op.result.get("value") is not None:
            value = op.result["value"]
            if not any(_same(value, w) for w in written):
                return op, value
    return None


def check_linearizable_kv(
    ops: Iterable[Op],
    time_budget_steps: int = DEFAULT_TIME_BUDGET_STEPS,
    *,
    initial: Mapping[str, Any] | None = None,
) -> KvVerdict:
    """Check that every kv key's history is linearizable against a register.

    Ops of other kinds are ignored. Each (service, key) is checked on its own (a register's
    histories compose per key: P-compositionality), starting from `initial[key]` (absent by
    default). Failed ops never took effect and are dropped; unknown ops may take effect at
    any time after their invocation, or never. A get of a missing key returns found=False.
    An op's id in a violation is its position in `ops` (its line in history.jsonl, from 0).

    A key whose writes are unique (the chaos workload's) is decided by
    `failover.chaos.register.decide_unique_register`: exact, polynomial, never "unknown".
    Other keys (deletes, a value written twice) go to the general search, bounded by
    `time_budget_steps` deterministic steps (no wall clock): a key that needs more is
    reported in `keys_unknown`, with the reason in `unknown_reasons`, and makes the verdict
    "unknown", never a pass. Each violation names the key and explains which op no order
    explains; a decided one names the read, the value it saw and the write it missed.
    """
    if time_budget_steps < 1:
        raise ValueError("time_budget_steps must be at least 1")
    all_ops = list(ops)
    start = dict(initial or {})
    violations: list[KvViolation] = []
    unknown: list[str] = []
    reasons: dict[str, str] = {}
    steps = 0
    decided = 0
    by_key = group_by_key(all_ops)
    for (service, key), numbered in sorted(by_key.items()):
        first = start.get(key)
        decision = decide_unique_register(numbered, first)
        if decision.applicable:
            decided += 1
            violations.extend(
                KvViolation(key, service, v.explanation, _numbered_shown(all_ops, v.ops),
                            anomaly=v.anomaly, details=_violation_details(v))
                for v in decision.violations)
            continue
        key_ops = [op for _, op in numbered]
        bad = _never_written(key_ops, first)
        if bad is not None:
            op, value = bad
            violations.append(
                KvViolation(
                    key,
                    service,
                    f"{op.describe()} read {value!r}, a value no put or cas on the key wrote",
                    _ops_shown([op]),
                    anomaly="never_written",
                )
            )
            continue
        res = _check_key(key_ops, first, time_budget_steps)
        steps += res.steps
        if res.outcome == "unknown":
            label = _key_label(service, key)
            unknown.append(label)
            reasons[label] = (f"not decided in polynomial time ({decision.reason}), and the "
                              f"general search ran out of its budget of {time_budget_steps:,} "
                              f"steps over {len(key_ops):,} ops")
        elif res.outcome is False:
            violations.append(KvViolation(key, service, res.explanation, _ops_shown(res.ops)))
    overall: Tri = False if violations else ("unknown" if unknown else True)
    return KvVerdict(overall, len(by_key), unknown, violations, steps, reasons, decided)


def _numbered_shown(ops: Sequence[Op], ids: Iterable[int]) -> list[dict[str, Any]]:
    return [{"id": i, **op_to_dict(ops[i])} for i in list(ids)[:_OPS_SHOWN_MAX]]


def _violation_details(v: RegisterViolation) -> dict[str, Any]:
    out: dict[str, Any] = {"read_id": v.read, "value": v.value, "missed_write_id": v.missed_write}
    out.update(v.details)
    return out


# --- kv: acknowledged writes -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LostWrite:
    """An acknowledged write that the final state shows was lost."""

    op: Op
    final_value: Any
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "key": self.op.key,
            "service": self.op.service,
            "final_value": self.final_value,
            "explanation": self.explanation,
            "op": op_to_dict(self.op),
        }


_MAYBE = object()  # a write whose written value is not known


def _written(op: Op) -> Any:
    """The value a kv write leaves (None for delete), or _MAYBE for a cas that did not swap."""
    if op.kind == "put":
        return op.args.get("value")
    if op.kind == "delete":
        return None
    if op.kind == "cas":
        if op.outcome == "ok" and op.result is not None and "swapped" in op.result:
            return op.args.get("value") if op.result["swapped"] else _MAYBE
        return op.args.get("value")
    return _MAYBE


def _may_write(op: Op) -> bool:
    """Whether a kv op may have changed its key (a known non-swapping cas did not)."""
    if op.outcome == "fail" or op.kind not in ("put", "cas", "delete"):
        return False
    return _written(op) is not _MAYBE


def check_acked_puts(ops: Iterable[Op], final_read: Mapping[Any, Any]) -> list[LostWrite]:
    """Acknowledged kv writes that the final state proves lost.

    `final_read` maps a key (or a (service, key) pair, looked up first) to the value read
    at the end of the run, after every client stopped; None means the key is absent. Keys
    not in `final_read` are not checked.

    Rule. An acknowledged write W (an ok put; an ok cas that swapped; an ok delete, which
    writes "absent") is lost when the final value differs from what W wrote and no other
    write X on the key could have been ordered after W and wrote the final value. X "could
    have been ordered after W" when X did not fail and did not complete before W was
    invoked (an unknown X may have taken effect at any later time).

    Soundness (no false loss, for any workload, as long as the final read is correct and
    nothing else wrote the keys): W took effect, so the last write in the key's order is W
    or a write after W, and it wrote the final value; if no such write exists, W was lost.
    Completeness depends on the workload: with the chaos workload, where each key is written
    by one process at a time with unique, increasing values (so a key's writes never
    overlap), every acknowledged write that is not the final value and was not followed by
    a later write is reported. A write lost and then overwritten is invisible to this check
    (the linearizability check sees it if a read came in between).
    """
    by_key: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind in ("put", "cas", "delete"):
            by_key[(op.service, op.key)].append(op)
    lost: list[LostWrite] = []
    for (service, key), key_ops in sorted(by_key.items()):
        if (service, key) in final_read:
            final = final_read[(service, key)]
        elif key in final_read:
            final = final_read[key]
        else:
            continue
        # The latest end of a write that left the final value: a write W is explained iff
        # such a write (necessarily not W, whose value differs) did not end before W began.
        explained_until = max(
            (_end(x) for x in key_ops if _may_write(x) and _same_or_absent(_written(x), final)),
            default=-math.inf,
        )
        for op in key_ops:
            if op.outcome != "ok" or not _may_write(op):
                continue
            if _same_or_absent(_written(op), final) or explained_until >= op.invoke_ms:
                continue
            shown = "absent" if final is None else repr(final)
            lost.append(
                LostWrite(
                    op,
                    final,
                    f"{op.describe()} was acknowledged, but the key ends {shown} and no write "
                    f"that could follow it wrote that",
                )
            )
    return lost


# --- bank --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BankVerdict:
    """The outcome of `check_bank`.

    `invariant` is True when every snapshot and every acknowledged read kept the total and
    had no negative balance. `exactly_once` is True when the final balances are explained by
    every acknowledged transfer applied once plus some subset of the unknown ones, False
    when no such subset exists, "unknown" when the search was too large (or there is no
    final snapshot or no initial balances to compare with).
    """

    invariant: bool
    exactly_once: Tri
    violations: list[dict[str, Any]]
    snapshots_checked: int
    transfers_ok: int
    transfers_unknown: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "invariant": self.invariant,
            "exactly_once": self.exactly_once,
            "violations": list(self.violations),
            "snapshots_checked": self.snapshots_checked,
            "transfers_ok": self.transfers_ok,
            "transfers_unknown": self.transfers_unknown,
            "note": self.note,
        }


def _transfer_effect(op: Op) -> dict[str, int]:
    source, target, amount = op.args["from"], op.args["to"], int(op.args["amount"])
    return {source: -amount, target: amount}


def _subset_sums(vectors: Sequence[tuple[int, ...]], width: int) -> set[tuple[int, ...]]:
    sums = {(0,) * width}
    for vec in vectors:
        sums |= {tuple(a + b for a, b in zip(s, vec, strict=True)) for s in sums}
    return sums


def _subset_reaches(vectors: Sequence[tuple[int, ...]], target: tuple[int, ...]) -> bool:
    """Whether some subset of `vectors` sums to `target` (meet in the middle: 2 x 2^(n/2))."""
    width = len(target)
    half = len(vectors) // 2
    left = _subset_sums(vectors[:half], width)
    for right in _subset_sums(vectors[half:], width):
        if tuple(t - r for t, r in zip(target, right, strict=True)) in left:
            return True
    return False


def _read_balances(result: Mapping[str, Any]) -> Mapping[str, int] | None:
    for name in ("balances", "accounts"):
        value = result.get(name)
        if isinstance(value, Mapping):
            return value
    return None


def check_bank(
    ops: Iterable[Op],
    snapshots: Sequence[tuple[str, Mapping[str, int]]],
    initial_total: int,
    *,
    initial_balances: Mapping[str, int] | None = None,
    unknown_transfers_max: int = DEFAULT_UNKNOWN_TRANSFERS_MAX,
) -> BankVerdict:
    """Check the bank's invariants and that acknowledged transfers applied exactly once.

    `snapshots` are (label, balances) pairs read after every fault and at the end; the last
    one is the final state, read after every client stopped. `initial_total` is the total
    once every account is open. `initial_balances` are the balances before the first
    transfer; when not given they are taken from the ok "open" ops of the history.

    Invariant: every snapshot sums to `initial_total` and holds no negative balance; so do
    the acknowledged reads ("total" results, "balance" results, the balances an ok transfer
    reports, and a "read_all" result's ``balances`` or ``accounts`` mapping). Reads invoked
    before the last open completed are not held to the total. A read_all whose args name a
    ``snapshot`` is judged as that snapshot only (`snapshots_from_ops` lists them).

    Exactly once (method). The bank keeps no ledger of applied transfer ids, so the check
    goes through balances. Let D = final - initial - (sum of the effects of every ok
    transfer), an integer vector over accounts; failed transfers never applied. The final
    state is consistent with exactly-once iff D is the sum of the effects of some subset of
    the unknown transfers. The unknown transfers are split into groups connected by shared
    accounts; D must be zero on accounts no unknown transfer touches, and each group is
    searched on its own by meet in the middle. A group of more than `unknown_transfers_max`
    transfers is not searched: the verdict is then "unknown" (unless another group already
    proved a violation), never a pass. A transfer applied twice (or lost) shows up as a D
    that no subset explains; workloads make this unambiguous by giving transfers distinct
    amounts, so that no mix of other transfers can mimic one.
    """
    all_ops = [op for op in ops if op.kind in BANK_KINDS]
    violations: list[dict[str, Any]] = []

    def flag(kind: str, detail: str, **extra: Any) -> None:
        violations.append({"kind": kind, "detail": detail, **extra})

    for label, balances in snapshots:
        total = sum(balances.values())
        if total != initial_total:
            flag(
                "bank_total",
                f"snapshot {label!r}: balances sum to {total}, expected {initial_total}",
                snapshot=label,
            )
        negative = {a: b for a, b in sorted(balances.items()) if b < 0}
        if negative:
            flag("negative_balance", f"snapshot {label!r}: {negative}", snapshot=label)

    opens = [op for op in all_ops if op.kind == "open" and op.outcome != "fail"]
    opened_by = max((_end(op) for op in opens), default=-math.inf)
    for op in all_ops:
        if op.outcome != "ok" or op.result is None:
            continue
        res = op.result
        after_opens = op.invoke_ms > opened_by
        seen: dict[str, int] = {}
        if op.kind == "balance" and "balance" in res:
            seen[str(res.get("account", op.args.get("account", "?")))] = res["balance"]
        elif op.kind == "transfer":
            for side, name in (("from_balance", "from"), ("to_balance", "to")):
                if side in res:
                    seen[str(op.args.get(name, "?"))] = res[side]
        elif (
            op.kind == "total"
            and "total" in res
            and after_opens
            and (res["total"] != initial_total)
        ):
            flag("bank_total", f"{op.describe()}: total is not {initial_total}", op=op_to_dict(op))
        elif op.kind == "read_all" and "snapshot" not in op.args:  # snapshots: see above
            balances = _read_balances(res)
            if balances is not None:
                seen.update(balances)
                total = sum(balances.values())
                if after_opens and total != initial_total:
                    flag(
                        "bank_total",
                        f"{op.describe()}: balances sum to {total}, expected {initial_total}",
                        op=op_to_dict(op),
                    )
        negative = {a: b for a, b in sorted(seen.items()) if b < 0}
        if negative:
            flag("negative_balance", f"{op.describe()}: {negative}", op=op_to_dict(op))

    transfers_ok = [op for op in all_ops if op.kind == "transfer" and op.outcome == "ok"]
    transfers_unknown = [op for op in all_ops if op.kind == "transfer" and op.outcome == "unknown"]
    invariant = not violations
    start = dict(initial_balances) if initial_balances is not None else None
    if start is None and opens and all(op.outcome == "ok" for op in opens):
        start = {op.args["account"]: int(op.args["balance"]) for op in opens}
    exactly_once: Tri
    note = ""
    if not snapshots:
        exactly_once, note = "unknown", "no final snapshot to compare balances with"
    elif start is None:
        exactly_once, note = "unknown", "no initial balances (give them, or record the opens)"
    else:
        exactly_once, note = _exactly_once(
            start, snapshots[-1], transfers_ok, transfers_unknown, unknown_transfers_max, flag
        )
    return BankVerdict(
        invariant,
        exactly_once,
        violations,
        len(snapshots),
        len(transfers_ok),
        len(transfers_unknown),
        note,
    )


def _exactly_once(
    start: Mapping[str, int],
    final_snapshot: tuple[str, Mapping[str, int]],
    ok: list[Op],
    unknown: list[Op],
    limit: int,
    flag: Callable[..., None],
) -> tuple[Tri, str]:
    """The exactly-once part of `check_bank` (see its doc for the method)."""
    label, final = final_snapshot
    residual: dict[str, int] = defaultdict(int)
    for name in set(start) | set(final):
        residual[name] = final.get(name, 0) - start.get(name, 0)
    for op in ok:
        for name, delta in _transfer_effect(op).items():
            residual[name] -= delta

    # Group the unknown transfers by shared accounts (union-find).
    parent: dict[str, str] = {}

    def root(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for op in unknown:
        parent[root(op.args["from"])] = root(op.args["to"])
    groups: dict[str, list[Op]] = defaultdict(list)
    for op in unknown:
        groups[root(op.args["from"])].append(op)

    untouched = {a: d for a, d in sorted(residual.items()) if d and a not in parent}
    failed: list[str] = []
    if untouched:
        failed.append(f"accounts no unknown transfer touches are off by {untouched}")
        if not unknown:
            failed.extend(_single_transfer_hint(dict(residual), ok))
    too_big = 0
    for group in groups.values():
        accounts = sorted({a for op in group for a in (op.args["from"], op.args["to"])})
        target = tuple(residual.get(a, 0) for a in accounts)
        if len(group) > limit:
            too_big += 1
            continue
        vectors = []
        for op in group:
            effect = _transfer_effect(op)
            vectors.append(tuple(effect.get(a, 0) for a in accounts))
        if not _subset_reaches(vectors, target):
            off = {a: d for a, d in zip(accounts, target, strict=True) if d}
            failed.append(
                f"accounts {accounts} are off by {off} from the acknowledged transfers, which "
                f"no subset of their {len(group)} unknown transfers explains"
            )
    if failed:
        flag(
            "not_exactly_once",
            f"final snapshot {label!r}: " + "; ".join(failed),
            snapshot=label,
        )
        return False, ""
    if too_big:
        return "unknown", (f"{too_big} group(s) of unknown transfers exceed {limit}; not searched")
    return True, ""


def _single_transfer_hint(residual: dict[str, int], ok: list[Op]) -> list[str]:
    """Name an acknowledged transfer whose effect (once more, or undone) is the whole gap."""
    gap = {a: d for a, d in residual.items() if d}
    for op in ok:
        effect = _transfer_effect(op)
        if gap == effect:
            return [f"it is exactly one more application of {op.describe()} (applied twice)"]
        if gap == {a: -d for a, d in effect.items()}:
            return [f"it is exactly {op.describe()} undone (acknowledged but not applied)"]
    return []


# --- async mode: writes the log provably lost -------------------------------------------


def provably_truncated(
    ops: Iterable[Op],
    final_histories: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> list[Op]:
    """Acknowledged writes whose log entry was overwritten by a later epoch.

    An entry written at (epoch e, index i) survives only if the final log holds epoch e at
    index i. With the service's final epoch history (epoch, first index) that is exact.
    Without it, from the replies alone: every epoch's first entry is the new primary's empty
    entry, so an acknowledged op at (e2 > e, i2) shows epoch e2 started at or before i2 - 1;
    an entry of epoch e at an index >= i2 - 1 was overwritten. In async mode this is the
    loss the mode allows; in sync mode it must never happen to an acknowledged write.
    """
    by_service: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.outcome == "ok" and op.epoch > 0 and op.index > 0:
            by_service[op.service].append(op)
    lost: list[Op] = []
    for service, service_ops in by_service.items():
        history = (final_histories or {}).get(service)
        if history:
            lost.extend(op for op in service_ops
                        if op.kind in WRITE_KINDS and epoch_at(history, op.index) != op.epoch)
            continue
        epochs = sorted({op.epoch for op in service_ops})
        lowest_index = {e: min(op.index for op in service_ops if op.epoch == e) for e in epochs}
        # For each epoch, the lowest index acknowledged in any later epoch.
        later_min: dict[int, float] = {}
        running = math.inf
        for e in reversed(epochs):
            later_min[e] = running
            running = min(running, lowest_index[e])
        lost.extend(op for op in service_ops
                    if op.kind in WRITE_KINDS and later_min[op.epoch] - 1 <= op.index)
    return lost


def _written_value(op: Op) -> Any:
    return None if op.kind == "delete" else op.args.get("value")


# --- fencing -----------------------------------------------------------------------------


def check_one_writer_per_epoch(ops: Iterable[Op]) -> list[dict[str, Any]]:
    """Epochs in which more than one primary acknowledged writes.

    Looks at ok ops of write kinds that carry an epoch (> 0) and the answering primary;
    epochs are per service. Each violation is ``{"kind": "two_writers_in_epoch", "detail",
    "service", "epoch", "primaries", "ops"}`` with one acknowledged write of each primary.
    """
    first: dict[tuple[str, int], dict[str, Op]] = defaultdict(dict)
    for op in ops:
        if op.outcome == "ok" and op.kind in WRITE_KINDS and op.epoch > 0 and op.primary:
            first[(op.service, op.epoch)].setdefault(op.primary, op)
    out: list[dict[str, Any]] = []
    for (service, epoch), by_primary in sorted(first.items()):
        if len(by_primary) < 2:
            continue
        primaries = sorted(by_primary)
        where = f"service {service!r} " if service else ""
        out.append(
            {
                "kind": "two_writers_in_epoch",
                "detail": f"{where}epoch {epoch}: writes acknowledged by {primaries}",
                "service": service,
                "epoch": epoch,
                "primaries": primaries,
                "ops": _ops_shown(by_primary[p] for p in primaries),
            }
        )
    return out


# --- a recorded history on its own ----------------------------------------------------------


def snapshots_from_ops(ops: Iterable[Op]) -> list[tuple[str, dict[str, int]]]:
    """The bank snapshots recorded as ops (ok read_all with args ``{"snapshot": label}``),
    in history order: the last one is the final state."""
    out: list[tuple[str, dict[str, int]]] = []
    for op in ops:
        if (op.kind == "read_all" and op.outcome == "ok" and "snapshot" in op.args
                and op.result is not None):
            balances = _read_balances(op.result)
            if balances is not None:
                out.append((str(op.args["snapshot"]), dict(balances)))
    return out


def check_history(
    ops: Sequence[Op],
    *,
    replication_mode: Literal["sync", "async"] | None = None,
    time_budget_steps: int = DEFAULT_TIME_BUDGET_STEPS,
    unknown_transfers_max: int = DEFAULT_UNKNOWN_TRANSFERS_MAX,
) -> dict[str, Any]:
    """Judge a chaos history from what it records alone; returns `verdict`'s dict.

    This is what a chaos run reports and what `failoverctl chaos check` re-runs offline, so
    the two agree. It takes from the history (see `failover.chaos.history`): the mode from
    the "run" record (`replication_mode` overrides it; "sync" when there is none), the final
    value of each kv key from its final read (get with args ``{"final": True}``), the bank's
    initial balances from its opens and its snapshots from the snapshot reads, and each
    service's final epoch history from its "epoch_history" record.
    """
    run = next((op for op in ops if op.kind == "run"), None)
    mode = replication_mode or (str(run.args.get("mode", "sync")) if run else "sync")
    if mode not in ("sync", "async"):
        raise ValueError(f"the history's mode {mode!r} is neither 'sync' nor 'async'")
    final_kv: dict[Any, Any] = {}
    for op in ops:
        if (op.kind == "get" and op.args.get("final") and op.outcome == "ok"
                and op.result is not None):
            found = op.result.get("found", op.result.get("value") is not None)
            final_kv[(op.service, op.key)] = op.result.get("value") if found else None
    histories = {
        op.service: [(int(e), int(i)) for e, i in op.result["epoch_history"]]
        for op in ops
        if op.kind == "epoch_history" and op.result is not None
    }
    has_bank = any(op.kind in BANK_KINDS for op in ops)
    balances: dict[str, int] | None = None
    total: int | None = None
    if has_bank:
        opens = [op for op in ops if op.kind == "open"]
        if not opens or any(op.outcome != "ok" for op in opens):
            raise ValueError(
                "the history has bank operations but not every account's open was "
                "acknowledged, so the initial balances are unknown (a history recorded "
                "before opens were kept cannot be re-checked for the bank)")
        balances = {str(op.args["account"]): int(op.args["balance"]) for op in opens}
        total = sum(balances.values())
    return verdict(
        ops,
        final_kv=final_kv or None,
        bank_snapshots=snapshots_from_ops(ops) if has_bank else None,
        bank_initial_total=total,
        bank_initial_balances=balances,
        replication_mode=mode,  # type: ignore[arg-type]
        final_histories=histories or None,
        time_budget_steps=time_budget_steps,
        unknown_transfers_max=unknown_transfers_max,
    )


# --- all together ------------------------------------------------------------------------


def verdict(
    ops: Sequence[Op],
    *,
    final_kv: Mapping[Any, Any] | None = None,
    bank_snapshots: Sequence[tuple[str, Mapping[str, int]]] | None = None,
    bank_initial_total: int | None = None,
    bank_initial_balances: Mapping[str, int] | None = None,
    replication_mode: Literal["sync", "async"] = "sync",
    final_histories: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    time_budget_steps: int = DEFAULT_TIME_BUDGET_STEPS,
    unknown_transfers_max: int = DEFAULT_UNKNOWN_TRANSFERS_MAX,
) -> dict[str, Any]:
    """Run every checker and assemble the report's verdict dict.

    Keys: ``linearizable`` (True/False/"unknown"), ``bank_invariant`` (True/False, None
    when the run had no bank), ``exactly_once`` (True/False/"unknown", None without bank),
    ``lost_acked_writes`` (int; 0 when `final_kv` is not given, see ``lost_checked``),
    ``lost_writes`` (each lost write, shown in both modes), ``violations`` (list of
    ``{"kind", "detail", ...}``), ``passed`` (True only when every check holds, False when
    any is violated, else "unknown"), and the details ``keys_checked``, ``keys_unknown``,
    ``keys_unknown_why`` (key -> why it was not decided), ``keys_decided`` (by the
    unique-value method), ``kv_steps``, ``bank``. Op ids in violations are positions in `ops`.

    In sync mode a lost acknowledged write breaks invariant 9 and is a violation. In async
    mode the loss is allowed but still counted and listed in ``lost_writes``, never hidden.
    """
    if replication_mode not in ("sync", "async"):
        raise ValueError(f"replication_mode must be 'sync' or 'async', not {replication_mode!r}")
    violations: list[dict[str, Any]] = []

    async_excluded: list[Op] = []
    kv_ops: Sequence[Op] = ops
    if replication_mode == "async":
        # Writes the log provably lost in a failover are the async trade: they count as lost
        # and as never applied, and reads that saw their (unique) values saw data the mode
        # later lost. What remains must still be linearizable.
        truncated_kv = [op for op in provably_truncated(ops, final_histories)
                        if op.kind in KV_KINDS]
        lost_values = {(op.service, op.key, _written_value(op)) for op in truncated_kv}
        gone = {id(op) for op in truncated_kv}
        kv_ops = []
        for op in ops:
            if id(op) in gone:
                kv_ops.append(replace(op, outcome="fail"))
            elif (op.outcome == "ok" and op.result is not None
                  and (op.service, op.key, op.result.get("value")) in lost_values):
                async_excluded.append(op)
                # Judged as never answered; kept in place so that op ids stay positions.
                kv_ops.append(replace(op, outcome="fail"))
            else:
                kv_ops.append(op)
        async_excluded.extend(truncated_kv)
    kv = check_linearizable_kv(kv_ops, time_budget_steps)
    for v in kv.violations:
        violations.append({"kind": "not_linearizable", "detail": v.explanation, **v.to_dict()})

    lost = check_acked_puts(ops, final_kv) if final_kv is not None else []
    if replication_mode == "sync":
        for item in lost:
            violations.append(
                {"kind": "lost_acked_write", "detail": item.explanation, **item.to_dict()}
            )

    has_bank = bank_snapshots is not None or any(op.kind in BANK_KINDS for op in ops)
    bank: BankVerdict | None = None
    truncated: list[Op] = []
    if has_bank and replication_mode == "async":
        # Acknowledged transfers the log provably lost in a failover: the async trade. They
        # are counted and listed as lost, and the exactly-once check runs without them.
        truncated = [op for op in provably_truncated(ops, final_histories)
                     if op.kind == "transfer"]
        gone = {id(op) for op in truncated}
        ops = [replace(op, outcome="fail") if id(op) in gone else op for op in ops]
    if has_bank:
        if bank_initial_total is None:
            raise ValueError("a run with a bank needs bank_initial_total")
        bank = check_bank(
            ops,
            bank_snapshots or [],
            bank_initial_total,
            initial_balances=bank_initial_balances,
            unknown_transfers_max=unknown_transfers_max,
        )
        violations.extend(bank.violations)

    violations.extend(check_one_writer_per_epoch(ops))
    if replication_mode == "sync":
        # Sync mode acknowledges only what every in-sync duplica has: nothing acknowledged
        # may ever be overwritten by a later epoch (invariant 9).
        for op in provably_truncated(ops, final_histories):
            violations.append({"kind": "lost_acked_write",
                               "detail": f"{op.describe()} was acknowledged at epoch "
                                         f"{op.epoch}, index {op.index}, then overwritten"})

    tri: list[Any] = [kv.linearizable]
    if bank is not None:
        tri.append(bank.exactly_once)
    passed: Tri = False if violations else ("unknown" if "unknown" in tri else True)
    return {
        "linearizable": kv.linearizable,
        "bank_invariant": bank.invariant if bank is not None else None,
        "exactly_once": bank.exactly_once if bank is not None else None,
        "async_excluded_ops": len(async_excluded),
        "lost_acked_writes": len(lost) + len(truncated),
        "lost_checked": final_kv is not None,
        "lost_writes": [item.to_dict() for item in lost]
        + [{"kind": "truncated_transfer", "detail": op.describe()} for op in truncated],
        "violations": violations,
        "passed": passed,
        "replication_mode": replication_mode,
        "keys_checked": kv.keys_checked,
        "keys_unknown": kv.keys_unknown,
        "keys_unknown_why": kv.unknown_reasons,
        "keys_decided": kv.keys_decided,
        "kv_steps": kv.steps,
        "bank": bank.to_dict() if bank is not None else None,
    }
