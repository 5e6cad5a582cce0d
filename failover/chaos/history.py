"""The recorded history of a chaos run: one `Op` per client request, as the client saw it.

A history is what the checkers in `failover.chaos.checkers` judge. It is plain data: this
module reads no clock and does no I/O. The runner passes the (monotonic) times in, and saves
the history with `dump_ops` (JSON lines, one op a line) so that a run can be re-checked later
with `load_ops` and `failover.chaos.checkers.check_history` (`failoverctl chaos check`).
Everything the checkers judge is in the history: besides the client requests, the runner's
own records (process `CHECKER_PROCESS`): the run's settings, the bank's opens and
snapshots, the final read of every kv key, and each service's final epoch history.

Outcomes, as the client knows them:

- ``"ok"``: the server acknowledged the op; `result` holds the reply dict.
- ``"fail"``: the op definitely did not take effect (refused before it was logged, e.g.
  RequestRejected, InvalidRequest, or a stale-epoch refusal).
- ``"unknown"``: the op may or may not have taken effect, now or at any later time
  (Unavailable, a deadline, a crash of the process that held it). `complete_ms` is None.

Values in `args` and `result` may be str or bytes (the `kv` kind keeps the type written).
JSON has no bytes, so `dump_ops` writes a bytes value as ``{"$bytes": "<base64>"}`` and
`load_ops` turns it back; a dict whose only key is ``"$bytes"`` is therefore reserved.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "BANK_KINDS",
    "CHECKER_PROCESS",
    "KV_KINDS",
    "META_KINDS",
    "OUTCOMES",
    "WRITE_KINDS",
    "HistoryRecorder",
    "Op",
    "dump_ops",
    "load_ops",
    "op_from_dict",
    "op_to_dict",
]

KV_KINDS = frozenset({"put", "get", "cas", "delete"})
BANK_KINDS = frozenset({"open", "transfer", "balance", "total", "read_all"})
# Records that are not client requests, kept so a history can be re-checked on its own:
# "run" (args: the run's settings, e.g. the replication mode) and "epoch_history" (result:
# ``{"epoch_history": [[epoch, first_index], ...]}``, a service's final log epochs).
META_KINDS = frozenset({"run", "epoch_history"})
# The process of the runner's own records: meta records, the bank snapshots (read_all with
# args ``{"snapshot": label}``) and the final read of every kv key (get, ``{"final": True}``).
CHECKER_PROCESS = -1
# Kinds that change state when they take effect (a cas only when it swaps).
WRITE_KINDS = frozenset({"put", "cas", "delete", "open", "transfer"})
OUTCOMES = frozenset({"ok", "fail", "unknown"})

_BYTES_TAG = "$bytes"


@dataclass(frozen=True, slots=True)
class Op:
    """One client request and what the client learned about it.

    `process` is the client worker that sent it; a worker has at most one op in flight, so
    two ops of one process never overlap in time. `kind` is the request's op ("put", "get",
    "cas", "delete" for kv; "open", "transfer", "balance", "total", "read_all" for bank).
    `key` is the kv key ("" for bank). `args` are the request's fields other than op and key
    (``{"value"}`` for put, ``{"expected", "value"}`` for cas, ``{"from", "to", "amount"}``
    for transfer). Times are monotonic milliseconds; `complete_ms` is None when the outcome
    is unknown. `result` is the reply dict of an ok op. `epoch`, `index` and `primary` are
    what the server reported with its reply, when known (0 / "" otherwise). `service` names
    the replica set when a run drives several (epochs and keys are per service).
    """

    process: int
    kind: str
    key: str
    args: dict[str, Any]
    invoke_ms: float
    complete_ms: float | None
    outcome: str
    result: dict[str, Any] | None
    epoch: int = 0
    index: int = 0
    primary: str = ""
    service: str = ""

    def __post_init__(self) -> None:
        """Reject an outcome that is not one of OUTCOMES."""
        if self.outcome not in OUTCOMES:
            raise ValueError(f"op outcome {self.outcome!r} is not one of {sorted(OUTCOMES)}")

    @property
    def is_write(self) -> bool:
        """True for kinds that change state when they take effect."""
        return self.kind in WRITE_KINDS

    def describe(self) -> str:
        """A one-line human description, for violation reports."""
        where = f"{self.service}/" if self.service else ""
        key = f" {where}{self.key!r}" if self.key or where else ""
        args = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        done = "?" if self.complete_ms is None else f"{self.complete_ms:g}"
        text = f"p{self.process} {self.kind}{key}({args}) [{self.invoke_ms:g}, {done}] "
        text += self.outcome
        if self.result is not None:
            shown = {k: v for k, v in self.result.items() if k != "ok"}
            text += f" -> {shown!r}"
        return text


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES_TAG: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES_TAG in value and isinstance(value[_BYTES_TAG], str):
            return base64.b64decode(value[_BYTES_TAG])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


_FIELDS = tuple(f.name for f in fields(Op))


def op_to_dict(op: Op) -> dict[str, Any]:
    """The op as a JSON-ready dict (bytes values tagged, see the module doc)."""
    return {name: _encode(getattr(op, name)) for name in _FIELDS}


def op_from_dict(data: Mapping[str, Any]) -> Op:
    """The inverse of `op_to_dict`; unknown fields are an error, missing defaults apply."""
    extra = set(data) - set(_FIELDS)
    if extra:
        raise ValueError(f"op record has unknown fields {sorted(extra)}")
    return Op(**{k: _decode(v) for k, v in data.items()})


def dump_ops(ops: Iterable[Op]) -> str:
    """The ops as JSON lines (one op a line, each line ending in a newline)."""
    return "".join(
        json.dumps(op_to_dict(op), sort_keys=True, separators=(",", ":")) + "\n" for op in ops
    )


def load_ops(text: str) -> list[Op]:
    """Parse what `dump_ops` wrote; blank lines are skipped. ValueError names a bad line."""
    ops: list[Op] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ops.append(op_from_dict(json.loads(line)))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"history line {number}: {exc}") from exc
    return ops


@dataclass(slots=True)
class _Pending:
    process: int
    kind: str
    key: str
    args: dict[str, Any]
    invoke_ms: float
    service: str


@dataclass(slots=True)
class HistoryRecorder:
    """Builds a history as a run goes. Times are arguments: it reads no clock.

    `invoke` returns a handle for `complete`. Ops still in flight when `ops()` is called
    are reported with outcome "unknown" (they may yet take effect).
    """

    _done: list[tuple[int, Op]] = field(default_factory=list)
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _busy: dict[int, int] = field(default_factory=dict)  # process -> handle in flight
    _next: int = 0

    def invoke(
        self,
        process: int,
        kind: str,
        key: str,
        args: Mapping[str, Any],
        now_ms: float,
        *,
        service: str = "",
    ) -> int:
        """Record a request sent at `now_ms`; ValueError if `process` has one in flight."""
        if process in self._busy:
            raise ValueError(f"process {process} already has op {self._busy[process]} in flight")
        handle = self._next
        self._next += 1
        self._pending[handle] = _Pending(process, kind, key, dict(args), now_ms, service)
        self._busy[process] = handle
        return handle

    def complete(
        self,
        handle: int,
        now_ms: float,
        outcome: str,
        result: Mapping[str, Any] | None = None,
        *,
        epoch: int = 0,
        index: int = 0,
        primary: str = "",
    ) -> Op:
        """Record the end of the op `handle`; an "unknown" outcome keeps complete_ms None."""
        pending = self._pending.pop(handle)
        del self._busy[pending.process]
        op = Op(
            process=pending.process,
            kind=pending.kind,
            key=pending.key,
            args=pending.args,
            invoke_ms=pending.invoke_ms,
            complete_ms=None if outcome == "unknown" else now_ms,
            outcome=outcome,
            result=dict(result) if result is not None and outcome == "ok" else None,
            epoch=epoch,
            index=index,
            primary=primary,
            service=pending.service,
        )
        self._done.append((handle, op))
        return op

    def ops(self) -> list[Op]:
        """Every op so far in invocation order, in-flight ones as "unknown"."""
        items = list(self._done)
        for handle, p in self._pending.items():
            items.append(
                (
                    handle,
                    Op(
                        p.process,
                        p.kind,
                        p.key,
                        p.args,
                        p.invoke_ms,
                        None,
                        "unknown",
                        None,
                        service=p.service,
                    ),
                )
            )
        items.sort(key=lambda item: item[0])
        return [op for _, op in items]
