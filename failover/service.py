"""The service API: what a kind (kv, bank, a user's plug-in) implements.

A kind is a deterministic state machine. The framework feeds it committed log entries in index
order through `apply`, answers reads through `query`, and moves or persists its state through
`snapshot` / `restore` (and, for kinds with a paged arena, page by page in a live migration).
Replicas compare `digest` values to prove they hold the same state (docs/design.md, invariant 8).

Requests and results are plain dicts of msgpack-able values (str keys; None, bool, int, float,
str, bytes, lists and dicts of those). Register a kind under the `failover.services` entry-point
group of its package; `failover.kinds` finds it there.

The helpers at the end (`require_dict`, `require_op`, `require`, `require_int`) validate request
dicts with messages that name the op and the field, raising InvalidRequest.

Apply is total (docs/design.md, invariant 13): an exception other than InvalidRequest or
RequestRejected out of `apply` is a bug in the kind, and the framework turns it into the
refusal `kind_failure` makes, the same on every replica. A request reaches `apply` only after
the primary checked its size and nesting (`defaults.REQUEST_DEPTH_MAX`), so a kind may recurse
over a request's values.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, ClassVar

from failover import defaults
from failover.errors import InvalidRequest
from failover.paged_state import PagedState

__all__ = [
    "ServiceKind",
    "kind_failure",
    "nesting_depth",
    "require",
    "require_dict",
    "require_int",
    "require_op",
]


class ServiceKind(abc.ABC):
    """Base class of every service kind.

    Subclasses set `name` (the entry-point name, e.g. ``"kv"``) and `version` (the version of
    the state format they write into snapshots, starting at 1) and implement the abstract
    methods. One instance holds one replica's state; the framework calls it from one thread.

    Determinism is the contract: `apply` must produce the same result and the same state on
    every replica given the same commands in the same order, so it reads no clock, no random
    source, no environment and does no I/O, and iterates only over ordered structures.
    """

    name: ClassVar[str]
    version: ClassVar[int]

    #: The ops that only read. The default `is_read_only` routes exactly these to `query`.
    read_only_ops: ClassVar[frozenset[str]] = frozenset()

    #: What one replica of this kind needs on its host, which placement reserves: CPU in
    #: cores, memory and disk in bytes. Override with the kind's real footprint.
    needs_cpu: ClassVar[float] = defaults.KIND_NEEDS_CPU
    needs_memory_bytes: ClassVar[int] = defaults.KIND_NEEDS_MEMORY_BYTES
    needs_disk_bytes: ClassVar[int] = defaults.KIND_NEEDS_DISK_BYTES

    @classmethod
    def is_read_only(cls, request: dict) -> bool:
        """Whether `request` only reads, so it may take the query path instead of the log.

        Pure: looks at the request only. Anything it cannot classify (not a dict, no op) is
        reported as a write, so that `apply` validates it and refuses it on every replica alike.
        """
        if not isinstance(request, dict):
            return False
        op = request.get("op")
        return isinstance(op, str) and op in cls.read_only_ops

    @abc.abstractmethod
    def apply(self, command: dict) -> dict:
        """Apply one committed command and return its result.

        Deterministic (see the class doc). Raises InvalidRequest for a malformed command
        (unknown op, missing field, wrong type) or RequestRejected when the application refuses
        it (an overdraw); in both cases the state is exactly as before the call.
        """

    @abc.abstractmethod
    def query(self, request: dict) -> dict:
        """Answer a read-only request without changing state (InvalidRequest when malformed)."""

    @abc.abstractmethod
    def snapshot(self) -> Iterator[bytes]:
        """The whole state as chunks of roughly `defaults.SNAPSHOT_CHUNK_BYTES` bytes.

        The chunks show the state as of the call, so the framework may go on applying while it
        writes or ships them: copy (or serialize) what you need before returning the iterator,
        rather than in a generator body that only runs on the first `next()`.
        No chunk may exceed `defaults.SNAPSHOT_CHUNK_BYTES_MAX`.
        """

    @abc.abstractmethod
    def restore(self, chunks: Iterable[bytes]) -> None:
        """Replace the whole state by the one `chunks` (from `snapshot`) describe.

        Treat `chunks` as one byte stream: chunk boundaries are not guaranteed. Consume every
        chunk (the snapshot reader checks the file's trailer at the end of the iteration).
        Snapshots written by an older `version` of the kind must still restore. Raise
        StateCorruptError when the data does not decode into a valid state; if anything
        raises, the previous state should be left as it was.
        """

    @abc.abstractmethod
    def digest(self) -> bytes:
        """blake2b-256 (32 bytes) of the state: equal state if and only if equal digest."""

    @property
    def paged(self) -> PagedState | None:
        """The paged arena holding the state, for kinds that migrate page by page; else None."""
        return None

    def reload_paged(self) -> None:
        """Rebuild in-memory structures after the arena's pages were replaced underneath.

        The receiving side of a live migration writes pages straight into `paged` and then
        calls this before the replica serves; a kind that derives an index from its arena
        rebuilds it here (StateCorruptError when the pages do not form a valid state).
        Kinds without a paged arena, or whose arena is all of their state, need not override.
        """
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.name!r} v{self.version}>"


# --- request validation --------------------------------------------------------------------

_REPR_CHARS_MAX = 60  # long values are cut in messages so one bad request cannot flood a log
# Values nested deeper are not shown: `repr` recurses, and where it runs out of stack depends
# on the caller's stack, which differs between replicas (messages are replicated replies).
_REPR_DEPTH_MAX = 8


def nesting_depth(value: object, depth_max: int) -> int:
    """How deep lists and maps nest in `value` (a scalar is 0, ``[1]`` is 1), counted up to
    `depth_max` + 1 at most. Iterative, so that no value can exhaust the stack."""
    depth = 0
    level: list[Any] = [value] if type(value) is dict or type(value) is list else []
    while level and depth <= depth_max:
        depth += 1
        inner: list[Any] = []
        for item in level:
            children = item.values() if type(item) is dict else item
            inner.extend(v for v in children if type(v) is dict or type(v) is list)
        level = inner
    return depth


def kind_failure(kind_name: str, exc: BaseException) -> InvalidRequest:
    """The refusal a request gets when the kind's `apply` raised `exc`, an exception other
    than InvalidRequest or RequestRejected (a bug in the kind).

    The message names the exception's type only: its text may hold what differs between
    replicas (an address, a depth), and replies are part of the replicated state. A
    MemoryError is raised again: running out of memory is this replica's condition, not the
    request's, and refusing the request here alone would set this replica apart."""
    if isinstance(exc, MemoryError):
        raise exc
    return InvalidRequest(
        f"the {kind_name!r} service failed on this request ({type(exc).__name__} in its "
        "apply, a bug in the service kind); it was refused alike on every replica: report "
        "it to the kind's authors with the request")


def _short_repr(value: object) -> str:
    if nesting_depth(value, _REPR_DEPTH_MAX) > _REPR_DEPTH_MAX:
        return f"<a {type(value).__name__} nested over {_REPR_DEPTH_MAX} deep>"
    text = repr(value)
    return text if len(text) <= _REPR_CHARS_MAX else text[: _REPR_CHARS_MAX - 3] + "..."


def _type_names(types: tuple[type, ...]) -> str:
    names = ["None" if t is type(None) else t.__name__ for t in types]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _where(request: Mapping[str, Any]) -> str:
    op = request.get("op")
    return f"{op!r} request" if isinstance(op, str) else "request"


def require_dict(request: object) -> dict:
    """`request` itself, when it is a dict with str keys; InvalidRequest otherwise."""
    if not isinstance(request, dict):
        raise InvalidRequest(
            f"a request must be a dict (a msgpack map), got {type(request).__name__}: "
            f"{_short_repr(request)}"
        )
    for key in request:
        if not isinstance(key, str):
            raise InvalidRequest(f"request field names must be str, got {_short_repr(key)}")
    return request


def require_op(request: object, ops: Collection[str]) -> str:
    """The request's ``op``, when it is one of `ops`; InvalidRequest otherwise.

    Also checks that `request` is a dict (see `require_dict`).
    """
    request = require_dict(request)
    if "op" not in request:
        raise InvalidRequest(f"request has no 'op' field; expected one of {sorted(ops)}")
    op = request["op"]
    if not isinstance(op, str) or op not in ops:
        raise InvalidRequest(f"unknown op {_short_repr(op)}; expected one of {sorted(ops)}")
    return op


def require(
    request: Mapping[str, Any],
    field: str,
    types: type | tuple[type, ...],
    *,
    max_bytes: int | None = None,
) -> Any:
    """The value of `field` in `request`, checked to be an instance of `types`.

    Raises InvalidRequest naming the op and the field when the field is missing or has another
    type. A bool is not accepted where an int (or float) is asked for, though Python counts
    bool as int; include `bool` in `types` to accept it. Include ``type(None)`` to accept None.
    With `max_bytes`, a str (UTF-8 encoded) or bytes value longer than that is refused too.
    """
    wanted = types if isinstance(types, tuple) else (types,)
    if field not in request:
        raise InvalidRequest(
            f"{_where(request)} is missing field {field!r} ({_type_names(wanted)})"
        )
    value = request[field]
    ok = isinstance(value, wanted) and not (isinstance(value, bool) and bool not in wanted)
    if not ok:
        raise InvalidRequest(
            f"field {field!r} of {_where(request)} must be {_type_names(wanted)}, got "
            f"{type(value).__name__}: {_short_repr(value)}"
        )
    if max_bytes is not None and isinstance(value, str | bytes | bytearray):
        size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(value)
        if size > max_bytes:
            raise InvalidRequest(
                f"field {field!r} of {_where(request)} is {size} bytes; the limit is "
                f"{max_bytes} bytes"
            )
    return value


def require_int(
    request: Mapping[str, Any],
    field: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """The int value of `field` (never a bool), checked against `minimum` and `maximum`."""
    value: int = require(request, field, int)
    if minimum is not None and value < minimum:
        raise InvalidRequest(
            f"field {field!r} of {_where(request)} must be at least {minimum}, got {value}"
        )
    if maximum is not None and value > maximum:
        raise InvalidRequest(
            f"field {field!r} of {_where(request)} must be at most {maximum}, got {value}"
        )
    return value
