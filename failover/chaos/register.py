"""Linearizability of one register whose writes are unique, decided in O(n log n).

Gibbons and Korach ("Testing shared memories", SIAM J. Comput. 1997) showed that a history
of a read/write register in which every write writes a distinct value can be checked in
polynomial time: each read maps to the one write of the value it saw, the writes are ordered,
and each read is checked against the real-time window of its write. The general search
(Wing and Gong, in `failover.chaos.checkers`) is exponential and gives up exactly when a key
is hot. The chaos workload writes unique values (puts, and cas that swap to a new value), so
its kv histories are decided here, always, with no budget. `decide_unique_register` extends
the zone argument of Gibbons and Korach to compare-and-set, to the put's ``found`` flag and to
operations of unknown outcome; what it cannot express (deletes, a value written twice, a
reply missing the fields it needs) it declines with a reason, and the caller searches.

Semantics (the same as the general search). An op is linearized at one instant inside
[invoke, complete]; equal stamps count as concurrent (an op may take effect at the very
instant another completes). A failed op never took effect. An op of unknown outcome may take
effect at any instant after its invocation, or never: its completion is +infinity.

The method.

1. Map. A get reads the value it returned (absent is the initial value); a cas that did not
   swap reads the value it reported; a swapped cas reads its expected value and writes its
   new value at one instant; a put writes its value and, with ``found=False``, read "absent".
   A read of a value that no op wrote, or that only a failed op wrote, is a violation.
2. Unknown outcomes. A write of unknown outcome took effect if and only if its value was
   seen (by a read, or as the expected value of a cas that took effect); then it stays, with
   its end at +infinity. An unseen one is dropped: "never took effect" explains it.
3. Clusters and blocks. A cluster is one write and the reads of its value: in any
   linearization they are contiguous, write first. A swapped cas joins the cluster of the
   value it replaced to the cluster of its own value (nothing comes between), so clusters form
   chains, "blocks", each starting at the initial value or at a put. Two cas that replaced
   the same value, or a chain with no first write, are violations.
4. Inside a block. Placed when earlier blocks have pushed time to t, the block's k-th write
   goes at max(t, the latest invocation among the earlier clusters' ops and that write),
   which must not pass the earliest completion in its cluster. So a block is possible iff
   (a) in each cluster, no op completed before its own write, or an op of an earlier cluster
   of the block, was invoked (a read before its write; a stale read inside a cas chain), and
   (b) t <= L, the earliest completion in the block; afterwards t = max(t, S), S being the
   latest invocation in the block.
5. Between blocks. Block A may precede block B iff S_A <= L_B. An order of all blocks exists
   iff no two conflict, L_A < S_B and L_B < S_A (in a cycle of forced precedences, the block
   with the least L forms a two-cycle with its predecessor in the cycle). The usual conflict
   is a stale read: A is a write and a read of its value that began after B's write had
   completed, B's write having begun after A's write completed. Found by sorting on L with
   prefix maxima of S.
6. found=True. A put that reported found=True needs a write before it. With the initial value
   absent and no cas or ``found=False`` put after it, the first block after it must start
   with a write that did not report found=True (possibly an unseen write of unknown outcome,
   taken back for the purpose), which can be first iff no block completed before it began.

Each step is exact, so the answer is a decision in both directions: no "unknown". The cost is
a sort: thousands of operations on one key take milliseconds.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from failover.chaos.history import Op

__all__ = [
    "RegisterDecision",
    "RegisterViolation",
    "VIOLATIONS_PER_KEY_MAX",
    "decide_unique_register",
    "op_ref",
]

VIOLATIONS_PER_KEY_MAX = 10  # distinct anomalies reported per key (the first proves it)

_ABSENT: Hashable = ("absent",)  # the value key of "no value"
_INIT = -1  # the virtual write of the initial value (the op id of nothing)


def _end(op: Op) -> float:
    if op.outcome == "unknown" or op.complete_ms is None:
        return math.inf
    return max(op.complete_ms, op.invoke_ms)


def _vkey(value: Any) -> Hashable | None:
    """A key that keeps str and bytes apart; None when the value is unhashable."""
    if value is None:
        return _ABSENT
    try:
        hash(value)
    except TypeError:
        return None
    return (type(value).__name__, value)


def _shown(value: Any) -> str:
    return "absent" if value is None else repr(value)


def op_ref(op_id: int, op: Op) -> dict[str, Any]:
    """How a violation names an op: its id (its line in history.jsonl, from 0), times, and
    the epoch and primary that answered, when recorded."""
    return {
        "id": op_id,
        "process": op.process,
        "kind": op.kind,
        "key": op.key,
        "args": dict(op.args),
        "invoke_ms": op.invoke_ms,
        "complete_ms": op.complete_ms,
        "outcome": op.outcome,
        "result": op.result,
        "epoch": op.epoch,
        "index": op.index,
        "primary": op.primary,
    }


def _name(op_id: int, op: Op) -> str:
    done = "unknown" if op.complete_ms is None else f"{op.complete_ms:.1f}"
    where = ""
    if op.epoch or op.primary:
        where = f", epoch {op.epoch}" + (f" on {op.primary}" if op.primary else "")
        if op.index:
            where += f" at index {op.index}"
    return f"op #{op_id} (p{op.process} {op.kind} [{op.invoke_ms:.1f}, {done}]{where})"


@dataclass(frozen=True, slots=True)
class RegisterViolation:
    """One anomaly: what no order of the register explains, naming the ops that prove it.

    `anomaly` is one of "stale_read", "read_before_write", "never_written",
    "failed_write_seen", "bad_reply", "replaced_twice", "cas_cycle", "found_flag".
    `read` is the op id of the read that saw what it should not have (or None), `value` what
    it saw, `missed_write` the op id of the acknowledged write it missed (or None), and `ops`
    every op id involved (the proof). `details` holds the same ops in full (`op_ref`).
    """

    anomaly: str
    explanation: str
    read: int | None = None
    value: Any = None
    missed_write: int | None = None
    ops: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RegisterDecision:
    """What `decide_unique_register` found.

    `applicable` is False when the history is outside what the method decides (then
    `reason` says why and nothing else is meaningful); otherwise `linearizable` is the
    answer and `violations` proves a False one.
    """

    applicable: bool
    linearizable: bool = False
    violations: list[RegisterViolation] = field(default_factory=list)
    reason: str = ""


class _Decline(Exception):
    """The history is outside the method; the message says why."""


@dataclass(slots=True)
class _Write:
    op_id: int
    op: Op
    vkey: Hashable
    value: Any
    pred: Hashable | None  # the value it replaced atomically (cas, found=False put)
    found_true: bool = False  # a put that reported found=True
    effective: bool = False


@dataclass(slots=True)
class _Cluster:
    vkey: Hashable
    value: Any
    writer: _Write | None  # None: the initial value
    reads: list[tuple[int, Op]] = field(default_factory=list)

    def members(self) -> list[tuple[int, Op | None]]:
        head: list[tuple[int, Op | None]] = [
            (_INIT, None) if self.writer is None else (self.writer.op_id, self.writer.op)
        ]
        return head + list(self.reads)


def _start_of(op: Op | None) -> float:
    return -math.inf if op is None else op.invoke_ms


def _end_of(op: Op | None) -> float:
    return -math.inf if op is None else _end(op)


@dataclass(slots=True)
class _Block:
    clusters: list[_Cluster]
    low: float = math.inf  # L: the earliest completion
    low_op: int = _INIT
    high: float = -math.inf  # S: the latest invocation
    high_op: int = _INIT
    head_found_true: bool = False


class _Checker:
    def __init__(self, history: Sequence[tuple[int, Op]], initial: Any) -> None:
        self.ops = {op_id: op for op_id, op in history}
        self.history = history
        init_key = _vkey(initial)
        if init_key is None:
            raise _Decline("the initial value is not hashable")
        self.init_key = init_key
        self.initial = initial
        self.violations: list[RegisterViolation] = []
        self.writers: dict[Hashable, _Write] = {}
        self.failed_writers: dict[Hashable, tuple[int, Op]] = {}
        self.unseen_first: list[_Write] = []  # unknown writes that could be first if taken
        self.home: dict[int, _Cluster] = {}  # op id -> the cluster it belongs to
        self.reported: set[int] = set()  # late ops already named in a violation

    # --- 1 and 2: map reads to writes ---------------------------------------------------

    def flag(self, violation: RegisterViolation) -> None:
        if len(self.violations) < VIOLATIONS_PER_KEY_MAX:
            self.violations.append(violation)

    def classify(self) -> list[tuple[int, Op, Hashable, Any]]:
        """Every read as (op id, op, value key, value); records the writes."""
        reads: list[tuple[int, Op, Hashable, Any]] = []
        for op_id, op in self.history:
            if op.outcome == "fail":
                if op.kind in ("put", "cas"):
                    key = _vkey(op.args.get("value"))
                    if key is not None:
                        self.failed_writers.setdefault(key, (op_id, op))
                continue
            res = op.result if op.outcome == "ok" else None
            if op.kind == "get":
                if res is None:
                    continue  # a read with no answer shows nothing
                read = self._get_value(op_id, op, res)
                if read is not None:
                    reads.append((op_id, op, *read))
            elif op.kind == "put":
                found = res.get("found") if res is not None else None
                self._add_write(op_id, op, _ABSENT if found is False else None,
                                found_true=found is True)
            elif op.kind == "cas":
                expected = op.args.get("expected")
                if res is not None and "swapped" not in res:
                    raise _Decline(f"{_name(op_id, op)} has no 'swapped' in its reply")
                if res is None or res["swapped"]:
                    if res is not None and "value" in res and not _same(res["value"],
                                                                        op.args.get("value")):
                        self._bad_reply(op_id, op, "it swapped but reports another value")
                        continue
                    pred = _vkey(expected)
                    if pred is None:
                        raise _Decline(f"{_name(op_id, op)} expects an unhashable value")
                    self._add_write(op_id, op, pred)
                    continue
                if "value" not in res:
                    raise _Decline(f"{_name(op_id, op)} has no 'value' in its reply")
                current = res["value"]
                if _same(current, expected) or (current is None and expected is None):
                    self._bad_reply(op_id, op, f"it reports {_shown(current)}, the value it "
                                               "expected, yet did not swap")
                    continue
                key = _vkey(current)
                if key is None:
                    raise _Decline(f"{_name(op_id, op)} read an unhashable value")
                reads.append((op_id, op, key, current))
            elif op.kind == "delete":
                raise _Decline("the key has deletes (absent is written more than once)")
            else:
                raise ValueError(f"op kind {op.kind!r} is not a kv op")
        return reads

    def _get_value(self, op_id: int, op: Op, res: dict[str, Any],
                   ) -> tuple[Hashable, Any] | None:
        if "found" in res and not res["found"]:
            return _ABSENT, None
        if "value" not in res:
            if "found" in res:
                raise _Decline(f"{_name(op_id, op)} says found but not the value")
            return None
        key = _vkey(res["value"])
        if key is None:
            raise _Decline(f"{_name(op_id, op)} read an unhashable value")
        return key, res["value"]

    def _add_write(self, op_id: int, op: Op, pred: Hashable | None, *,
                   found_true: bool = False) -> None:
        value = op.args.get("value")
        if value is None:
            raise _Decline(f"{_name(op_id, op)} writes no value")
        key = _vkey(value)
        if key is None:
            raise _Decline(f"{_name(op_id, op)} writes an unhashable value")
        if key == self.init_key:
            raise _Decline(f"{_name(op_id, op)} writes the initial value again")
        if key in self.writers:
            other = self.writers[key]
            raise _Decline(f"values are not unique: {_name(other.op_id, other.op)} and "
                           f"{_name(op_id, op)} both write {_shown(value)}")
        self.writers[key] = _Write(op_id, op, key, value, pred, found_true,
                                   effective=op.outcome == "ok")

    def _bad_reply(self, op_id: int, op: Op, why: str) -> None:
        self.flag(RegisterViolation(
            "bad_reply", f"{_name(op_id, op)} on {op.key!r}: {why}", read=op_id,
            ops=[op_id], details={"read": op_ref(op_id, op)}))

    def mark_effective(self, reads: list[tuple[int, Op, Hashable, Any]]) -> None:
        """Writes of unknown outcome whose value was seen took effect (step 2)."""
        todo = [key for _, _, key, _ in reads]
        todo += [w.pred for w in self.writers.values() if w.effective and w.pred is not None]
        while todo:
            key = todo.pop()
            writer = self.writers.get(key)
            if writer is None or writer.effective:
                continue
            writer.effective = True
            if writer.pred is not None:
                todo.append(writer.pred)
        for writer in self.writers.values():
            if not writer.effective and writer.pred in (None, self.init_key):
                self.unseen_first.append(writer)
        self.writers = {k: w for k, w in self.writers.items() if w.effective}

    def check_sources(self, reads: list[tuple[int, Op, Hashable, Any]]) -> None:
        """Every value read (or replaced) was written by an op that took effect."""
        seen: list[tuple[int, Op, Hashable, Any]] = list(reads)
        for w in self.writers.values():
            if w.pred is not None:
                expected = None if w.pred == _ABSENT else w.op.args.get("expected")
                seen.append((w.op_id, w.op, w.pred, expected))
        for op_id, op, key, value in seen:
            if key == self.init_key or key in self.writers:
                continue
            failed = self.failed_writers.get(key)
            if failed is not None:
                anomaly = "failed_write_seen"
                why = (f"which only {_name(*failed)} wrote, and that op failed (it was "
                       "refused, so it never took effect)")
                involved = [op_id, failed[0]]
            else:
                anomaly, why, involved = "never_written", "a value no put or cas wrote", [op_id]
            verb = "replaced" if op.kind in ("cas", "put") else "read"
            self.flag(RegisterViolation(
                anomaly, f"{_name(op_id, op)} on {op.key!r} {verb} {_shown(value)}, {why}",
                read=op_id, value=value, ops=involved,
                details={"read": op_ref(op_id, op)}))

    # --- 3: clusters and blocks -------------------------------------------------------------

    def blocks(self, reads: list[tuple[int, Op, Hashable, Any]]) -> list[_Block]:
        clusters: dict[Hashable, _Cluster] = {
            self.init_key: _Cluster(self.init_key, self.initial, None)}
        for key, w in self.writers.items():
            clusters[key] = _Cluster(key, w.value, w)
        for op_id, op, key, _value in reads:
            if key in clusters:
                clusters[key].reads.append((op_id, op))
        for cluster in clusters.values():
            for op_id, _ in cluster.members():
                self.home[op_id] = cluster
        successor: dict[Hashable, _Write] = {}
        for w in sorted(self.writers.values(), key=lambda w: w.op_id):
            if w.pred is None or w.pred not in clusters:
                continue
            other = successor.get(w.pred)
            if other is not None:
                value = clusters[w.pred].value
                self.flag(RegisterViolation(
                    "replaced_twice",
                    f"{_name(other.op_id, other.op)} and {_name(w.op_id, w.op)} on "
                    f"{w.op.key!r} both replaced {_shown(value)} atomically (as a swapped cas "
                    "or a put that found the key absent); a value written once can be "
                    "replaced atomically once",
                    value=value, ops=[other.op_id, w.op_id],
                    details={"first": op_ref(other.op_id, other.op),
                             "second": op_ref(w.op_id, w.op)}))
                continue
            successor[w.pred] = w
        heads = [self.init_key] + [k for k, w in self.writers.items() if w.pred is None]
        out: list[_Block] = []
        placed: set[Hashable] = set()
        for head in heads:
            chain = [clusters[head]]
            placed.add(head)
            while chain[-1].vkey in successor:
                nxt = successor[chain[-1].vkey].vkey
                if nxt in placed:
                    break
                placed.add(nxt)
                chain.append(clusters[nxt])
            block = _Block(chain)
            block.head_found_true = chain[0].writer is not None and chain[0].writer.found_true
            out.append(block)
        loose = [w for k, w in self.writers.items() if k not in placed and w.pred in clusters]
        if loose:
            w = min(loose, key=lambda w: w.op_id)
            self.flag(RegisterViolation(
                "cas_cycle",
                f"{_name(w.op_id, w.op)} on {w.op.key!r} is in a ring of swapped cas with no "
                "first write: each replaced a value that another of them wrote",
                ops=sorted(x.op_id for x in loose)[:20]))
        return out

    # --- how violations name what an op did ---------------------------------------------

    def _saw(self, op_id: int) -> tuple[bool, Any]:
        """(True, the value the op read) for a read, a cas or a found=False put, else
        (False, None): a put that read nothing."""
        cluster = self.home[op_id]
        writer = cluster.writer
        if writer is None or writer.op_id != op_id:
            return True, cluster.value
        if writer.pred is None:
            return False, None
        return True, None if writer.pred == _ABSENT else writer.op.args.get("expected")

    def _did(self, op_id: int) -> str:
        """What the op did to the key, in words ("saw 'x'", "replaced 'x' by 'y'")."""
        if op_id == _INIT:
            return "the initial state"
        cluster = self.home[op_id]
        reads, seen = self._saw(op_id)
        if cluster.writer is None or cluster.writer.op_id != op_id:
            return f"{_name(op_id, self.ops[op_id])}, which saw {_shown(cluster.value)},"
        what = f"replaced {_shown(seen)} by" if reads else "wrote"
        return f"{_name(op_id, self.ops[op_id])}, which {what} {_shown(cluster.value)},"

    # --- 4: inside a block ------------------------------------------------------------------

    def check_block(self, block: _Block) -> None:
        """Step 4 (a), and the block's L and S."""
        late, late_id = -math.inf, _INIT  # the latest invocation among earlier clusters
        for cluster in block.clusters:
            members = cluster.members()
            early_id, early = min(members, key=lambda m: _end_of(m[1]))
            writer_op = None if cluster.writer is None else cluster.writer.op
            start, start_id = late, late_id
            if _start_of(writer_op) > late:
                start, start_id = _start_of(writer_op), members[0][0]
            if start > _end_of(early):
                self._flag_inside(cluster, start_id, early_id)
            if _end_of(early) < block.low:
                block.low, block.low_op = _end_of(early), early_id
            for op_id, op in members:
                if _start_of(op) > late:
                    late, late_id = _start_of(op), op_id
        block.high, block.high_op = late, late_id

    def _flag_inside(self, cluster: _Cluster, late_id: int, early_id: int) -> None:
        """`early_id`, of `cluster`, completed before `late_id` was invoked, although the
        block orders `late_id` first: it is the cluster's write or an op of an earlier
        cluster of the same cas chain."""
        if late_id in self.reported:
            return  # the nearest cluster of the chain already proved it
        self.reported.add(late_id)
        late, early = self.ops[late_id], self.ops[early_id]
        writer = cluster.writer
        assert writer is not None  # the initial value's virtual write starts at -infinity
        home = self.home[late_id]
        ids = sorted({late_id, early_id, writer.op_id})
        details = {"read": op_ref(late_id, late), "completed_before": op_ref(early_id, early),
                   "missed_write": op_ref(writer.op_id, writer.op)}
        if home.writer is not None and home.writer.op_id == late_id:
            # A write came after an op that saw its value, or a value the cas chain puts
            # after it.
            text = (f"{self._did(early_id)} on {early.key!r} completed at "
                    f"{_end(early):.1f}, before {self._did(late_id)} was invoked at "
                    f"{late.invoke_ms:.1f}")
            if home is not cluster:
                text += (f"; yet a chain of swapped cas puts {_shown(cluster.value)} after "
                         f"{_shown(home.value)}")
            self.flag(RegisterViolation("read_before_write", text, read=early_id,
                                        value=cluster.value, ops=ids, details=details))
            return
        old = home.value
        seen = (f"and completed at {_end(early):.1f}" if early_id == writer.op_id else
                f"and {self._did(early_id)} completed at {_end(early):.1f}")
        text = (f"stale read: {_name(late_id, late)} on {late.key!r} saw {_shown(old)} "
                f"(written by {self._writer_name(home)}), but a chain of swapped cas replaced "
                f"{_shown(old)}: {_name(writer.op_id, writer.op)} wrote "
                f"{_shown(cluster.value)} {seen}, before the read was invoked at "
                f"{late.invoke_ms:.1f}")
        self.flag(RegisterViolation("stale_read", text, read=late_id, value=old,
                                    missed_write=writer.op_id, ops=ids, details=details))

    def _writer_name(self, cluster: _Cluster) -> str:
        if cluster.writer is None:
            return "the initial state"
        return _name(cluster.writer.op_id, cluster.writer.op)

    # --- 5: between blocks ------------------------------------------------------------------

    def check_order(self, blocks: list[_Block]) -> None:
        """Step 5: a conflict is a pair with L_A < S_B and L_B < S_A."""
        by_low = sorted(range(len(blocks)), key=lambda i: blocks[i].low)
        lows = [blocks[i].low for i in by_low]
        top: list[tuple[int, int]] = []  # the two greatest S among by_low[: k + 1]
        best, second = -1, -1
        for i in by_low:
            if best < 0 or blocks[i].high > blocks[best].high:
                best, second = i, best
            elif second < 0 or blocks[i].high > blocks[second].high:
                second = i
            top.append((best, second))
        for x, block in enumerate(blocks):
            k = bisect.bisect_left(lows, block.high)  # the blocks with L < S_x
            if k == 0:
                continue
            a, b = top[k - 1]
            other = b if a == x else a
            if other >= 0 and blocks[other].high > block.low:
                self._flag_pair(blocks[other], block)

    def _flag_pair(self, first: _Block, second: _Block) -> None:
        """first.low < second.high and second.low < first.high: neither order works.

        Told from the op invoked late (a.high_op): it began after b's op b.low_op had
        completed, so b's values come first; yet a.low_op completed before b.high_op
        began, so a's values come first. When that late op is a read, it is a stale read
        that missed the write of the value b.low_op saw or wrote.
        """
        # Blame a read rather than a put, and of two reads the later one: a stale read began
        # after the newer value was acknowledged, so it is the later of the two.
        options = [(x, y) for x, y in ((first, second), (second, first)) if y.low_op != _INIT]
        a, b = max(options, key=lambda o: (self._saw(o[0].high_op)[0], o[0].high))
        if a.high_op in self.reported:
            return
        self.reported.add(a.high_op)
        late, done = self.ops[a.high_op], self.ops[b.low_op]
        reads, old = self._saw(a.high_op)
        newer = self.home[b.low_op]
        missed = newer.writer
        assert missed is not None  # b is not the initial block: its L is finite
        why = (f"{self._did(a.low_op)} completed at {a.low:.1f}, before "
               f"{self._did(b.high_op)} was invoked at {b.high:.1f}")
        if a.low_op == _INIT:
            why = f"the key started {_shown(self.initial)}"
        if reads:
            anomaly = "stale_read"
            seen = (f"and completed at {b.low:.1f}" if missed.op_id == b.low_op else
                    f"and {self._did(b.low_op)} completed at {b.low:.1f}")
            text = (f"stale read: {_name(a.high_op, late)} on {late.key!r} saw {_shown(old)}"
                    f", but {_name(missed.op_id, missed.op)} wrote {_shown(newer.value)} "
                    f"after it {seen}, before the read was invoked at {a.high:.1f}. "
                    f"{_shown(newer.value)} came after {_shown(old)} because {why}")
        else:
            anomaly = "write_order"
            text = (f"no order of the writes on {late.key!r} works: {self._did(b.low_op)} "
                    f"completed at {b.low:.1f}, before {self._did(a.high_op)} was invoked at "
                    f"{a.high:.1f}; yet {why}")
        ids = sorted({i for i in (a.high_op, b.low_op, a.low_op, b.high_op, missed.op_id)
                      if i != _INIT})
        details: dict[str, Any] = {"read": op_ref(a.high_op, late),
                                   "completed_before": op_ref(b.low_op, done),
                                   "missed_write": op_ref(missed.op_id, missed.op)}
        source = self.home[a.high_op].writer
        if reads and source is not None and source.op_id != a.high_op:
            details["read_value_written_by"] = op_ref(source.op_id, source.op)
        self.flag(RegisterViolation(anomaly, text, read=a.high_op, value=old,
                                    missed_write=missed.op_id, ops=ids, details=details))

    # --- 6: found=True ----------------------------------------------------------------------

    def check_found(self, blocks: list[_Block]) -> None:
        """Step 6 (run when the order holds: no conflict among the blocks)."""
        if self.init_key != _ABSENT:
            return  # the key starts with a value: found=True holds for every put
        init = next(b for b in blocks if b.clusters[0].writer is None)
        rest = [b for b in blocks if b is not init]
        if len(init.clusters) > 1 or not any(b.head_found_true for b in rest):
            return  # a write follows the initial value inside its block: found=True holds
        lows = sorted(b.low for b in rest)

        def least_low_without(block: _Block | None) -> float:
            if block is not None and block.low == lows[0]:
                return lows[1] if len(lows) > 1 else math.inf
            return lows[0]

        if any(not b.head_found_true and b.high <= least_low_without(b) for b in rest):
            return  # a block with a plain first write can go first
        if any(w.op.invoke_ms <= lows[0] for w in self.unseen_first):
            return  # an unseen write of unknown outcome may have been first
        first = min((b for b in rest if b.head_found_true), key=lambda b: b.high)
        writer = first.clusters[0].writer
        assert writer is not None
        self.flag(RegisterViolation(
            "found_flag",
            f"{_name(writer.op_id, writer.op)} on {writer.op.key!r} reported found=True, but "
            "in every order the register allows, no write comes before it: the key was "
            "absent at the start and no other write can have been first",
            read=writer.op_id, ops=[writer.op_id],
            details={"read": op_ref(writer.op_id, writer.op)}))


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def decide_unique_register(history: Sequence[tuple[int, Op]], initial: Any = None,
                           ) -> RegisterDecision:
    """Decide whether one key's history is linearizable, when every write is unique.

    `history` is the key's ops with their ids (the id names an op in violations: the
    chaos runner uses its line in history.jsonl, from 0); `initial` is the value before the
    first op (None: absent). Ops of kinds get, put, cas (and delete, which declines) are
    understood; results are judged on the fields present, like the general search.

    Returns `RegisterDecision(applicable=False, reason=...)` when the history is outside the
    method: a value written twice (or the initial value written again), a delete, or a reply
    missing a field the method needs. Otherwise the decision is exact (see the module doc),
    and a False one carries up to `VIOLATIONS_PER_KEY_MAX` violations, each naming the read,
    the value it saw and the write it missed (ids, times, epochs, primaries).
    """
    try:
        checker = _Checker(history, initial)
        reads = checker.classify()
    except _Decline as exc:
        return RegisterDecision(False, reason=str(exc))
    checker.mark_effective(reads)
    checker.check_sources(reads)
    blocks = checker.blocks(reads)
    for block in blocks:
        checker.check_block(block)
    checker.check_order(blocks)
    if not checker.violations:
        checker.check_found(blocks)
    return RegisterDecision(True, not checker.violations, checker.violations)


def group_by_key(ops: Sequence[Op]) -> dict[tuple[str, str], list[tuple[int, Op]]]:
    """kv ops by (service, key), each with its position in `ops` as its id."""
    by_key: dict[tuple[str, str], list[tuple[int, Op]]] = defaultdict(list)
    for op_id, op in enumerate(ops):
        if op.kind in ("get", "put", "cas", "delete"):
            by_key[(op.service, op.key)].append((op_id, op))
    return by_key
