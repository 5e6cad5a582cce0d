"""`counter`: named integer counters, an example of a failover service kind in its own package.

Requests (counter names are non-empty str of at most `NAME_BYTES_MAX` UTF-8 bytes):

=============================================  ===========================================
``{"op": "incr", "counter", "by"?}``           ``{"ok": True, "counter", "value"}`` (after)
``{"op": "get", "counter"}`` (read-only)       ``{"ok": True, "counter", "value"}``
=============================================  ===========================================

``by`` is an int (never a bool), 1 when absent; it may be negative or zero. A counter that
was never incremented reads 0. Refusals (`RequestRejected`): an increment that would take a
counter outside the int64 range (msgpack's, so every value stays encodable), and a new counter
past `COUNTERS_MAX`. A malformed request is `InvalidRequest`. Either way the state is exactly
as before the call, on every replica.

The state is a plain dict (so the kind migrates by log replay, not page by page); a snapshot
is one msgpack document of the counters in name order. How a kind is written and what it must
guarantee: docs/writing-a-kind.md in the failover repository.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import msgpack

from failover import defaults
from failover.errors import InvalidRequest, RequestRejected, StateCorruptError
from failover.service import ServiceKind, require, require_int, require_op

__all__ = ["COUNTERS_MAX", "NAME_BYTES_MAX", "VALUE_MAX", "VALUE_MIN", "CounterService"]

# Limits of this kind. They are part of its contract with its clients and replicated state,
# so they live here, with the kind, not in failover's own defaults.
NAME_BYTES_MAX = 256
COUNTERS_MAX = 100_000  # each costs memory on every replica; a bound keeps that bounded
VALUE_MIN = -(1 << 63)  # int64: msgpack's signed range
VALUE_MAX = (1 << 63) - 1

_SNAP_MAGIC = "failover.counter"
_SNAP_FORMAT = 1  # the format this version writes; restore reads 1.._SNAP_FORMAT

_OPS = frozenset({"incr", "get"})


def _name(request: dict) -> str:
    name: str = require(request, "counter", str, max_bytes=NAME_BYTES_MAX)
    if not name:
        raise InvalidRequest(f"field 'counter' of {request['op']!r} request must not be empty")
    return name


class CounterService(ServiceKind):
    """The `counter` kind: counter name -> int64 value."""

    name = "counter"
    version = 1
    read_only_ops = frozenset({"get"})
    # Small: a few dicts and ints per replica (placement reserves this on its host).
    needs_memory_bytes = 16 << 20
    needs_disk_bytes = 64 << 20

    def __init__(self) -> None:
        """No counters: every one reads 0."""
        self._values: dict[str, int] = {}

    def apply(self, command: dict) -> dict:
        """Apply an increment (or answer a read-only op); see the module doc.

        Every check comes before the one assignment, so a refusal changes nothing.
        """
        op = require_op(command, _OPS)
        if op != "incr":
            return self._get(command)
        name = _name(command)
        by = require_int(command, "by") if "by" in command else 1
        before = self._values.get(name)
        if before is None and len(self._values) >= COUNTERS_MAX:
            raise RequestRejected(f"{COUNTERS_MAX} counters exist already; counter {name!r} "
                                  "cannot be added")
        value = (before or 0) + by
        if not VALUE_MIN <= value <= VALUE_MAX:
            raise RequestRejected(f"incrementing {name!r} ({before or 0}) by {by} leaves the "
                                  "int64 range; the counter is unchanged")
        self._values[name] = value
        return {"ok": True, "counter": name, "value": value}

    def query(self, request: dict) -> dict:
        """Answer get from the applied state."""
        op = require_op(request, _OPS)
        if op not in self.read_only_ops:
            raise InvalidRequest(f"op {op!r} changes state; send it as a write, not a query")
        return self._get(request)

    def snapshot(self) -> Iterator[bytes]:
        """One msgpack document, cut into chunks of `defaults.SNAPSHOT_CHUNK_BYTES`."""
        # Encoded now, not in a generator body: the framework goes on applying while it
        # writes the chunks, and they must show the state as of this call.
        data = self._encode()
        step = defaults.SNAPSHOT_CHUNK_BYTES
        return iter([data[start : start + step] for start in range(0, len(data), step)])

    def restore(self, chunks: Iterable[bytes]) -> None:
        """Replace the state by a snapshot's; StateCorruptError leaves the old state in place."""
        data = b"".join(chunks)  # chunk boundaries mean nothing: one byte stream
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise StateCorruptError(f"counter snapshot does not decode: {exc}") from exc
        if (not isinstance(doc, list) or len(doc) != 3 or doc[0] != _SNAP_MAGIC
                or type(doc[1]) is not int or not 1 <= doc[1] <= _SNAP_FORMAT
                or not isinstance(doc[2], list) or len(doc[2]) > COUNTERS_MAX):
            raise StateCorruptError("not a counter snapshot of a known format")
        values: dict[str, int] = {}
        for item in doc[2]:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                    or not item[0] or item[0] in values or type(item[1]) is not int
                    or not VALUE_MIN <= item[1] <= VALUE_MAX):
                raise StateCorruptError(f"counter snapshot holds a bad entry {item!r:.80}")
            values[item[0]] = item[1]
        self._values = values  # the one assignment, after every check

    def digest(self) -> bytes:
        """blake2b-256 of the counters in name order: equal state, equal digest."""
        return hashlib.blake2b(self._encode(), digest_size=32,
                               person=b"failover.counter").digest()

    # --- internals -----------------------------------------------------------------------

    def _encode(self) -> bytes:
        # Sorted by name: equal states encode alike whatever order the counters appeared in.
        items = [[name, self._values[name]] for name in sorted(self._values)]
        return msgpack.packb([_SNAP_MAGIC, _SNAP_FORMAT, items], use_bin_type=True)

    def _get(self, request: dict) -> dict:
        name = _name(request)
        return {"ok": True, "counter": name, "value": self._values.get(name, 0)}
