"""The coordinator's durable store: cluster state as a small map of keys to msgpack blobs, and an
append-only history of events.

The coordinator keeps hosts, services, replicas, epochs, in-sync sets and the routes version
under keys of its choosing; the store neither knows nor parses them. A change is one `commit`:
its puts, deletes and history events are applied together or not at all, and are durable when
the call returns, so the coordinator can persist a new epoch before any agent hears of it
(docs/design.md, Invariants 1).

Built: `SqliteStore` (one coordinator, its data dir) and `EtcdStore` (several coordinators on
one etcd, one of them leading; docs/etcd.md). The interface carries what a shared store needs:

- `revision`: every commit that changes something raises it; `commit(expect_revision=...)`
  applies only if no other commit came in between (compare-and-set), else raises
  `StoreConflictError` with nothing applied;
- `term`: the leadership term this handle holds; a store that can lose leadership raises
  `LeadershipLostError` from a commit made after the term ended, with nothing applied.

Leadership (several coordinators on one store, one of them leading): `campaign` waits until
this handle leads and returns its term; `wait_lost` returns when that leadership ends;
`resign` gives it up; `leader` and `coordinators` say who leads and who is alive, from any
handle. A commit from a handle that does not lead raises `LeadershipLostError`, nothing
applied. With SQLite the file's lock is the leadership: a handle leads from `open` (one
coordinator per data dir), `campaign` returns at once and `wait_lost` returns only when the
handle resigns or closes.

Keys are non-empty strings of at most `defaults.STORE_KEY_BYTES_MAX` UTF-8 bytes; values are
`bytes` of at most `defaults.STORE_VALUE_BYTES_MAX`. A key may not be both put and deleted in one
commit (etcd refuses that in one transaction, so no store accepts it).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import msgpack

from failover import defaults
from failover.errors import ConfigError

__all__ = [
    "CoordinatorInfo",
    "HistoryEvent",
    "HistoryRecord",
    "Store",
    "check_address",
    "check_changes",
    "check_event",
    "check_history_limit",
    "check_key",
    "check_value",
    "decode_details",
    "encode_details",
]


HistoryEvent = tuple[str, str, str, dict[str, Any]]
"""One event to record: (service, kind, message, details); service "" is cluster-wide."""



@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One recorded event, as `Store.history` returns it."""

    seq: int
    """Assigned by the store when the event is committed; increases, never reused."""
    at: float
    """Wall-clock seconds since the epoch at commit (for people; never for ordering)."""
    service: str
    """The service the event is about; "" for cluster-wide events."""
    kind: str
    """"failover", "switchover", "suspicion", "host", "service", ..."""
    message: str
    """One line for people."""
    details: dict[str, Any]
    """Structured data (msgpack round trip: tuples come back as lists)."""


@dataclass(frozen=True, slots=True)
class CoordinatorInfo:
    """One coordinator as the store sees it (`Store.leader`, `Store.coordinators`)."""

    address: str
    """The coordinator's advertised gRPC HOST:PORT ("" when it named none)."""
    leader: bool
    """Whether it leads now."""
    term: int
    """The leader's term if it leads, else 0."""


class Store(abc.ABC):
    """Durable cluster state. Every method is async; commit is atomic and durable on return
    (the coordinator persists a new epoch before any agent hears of it).

    A store is used as ``await store.open() ... await store.close()`` or as
    ``async with store:``. A caller cancelled while awaiting `commit` does not know whether
    the commit was applied: load again to find out.
    """

    description: str
    """Where the state lives, for status and logs, e.g. ``sqlite:///var/lib/fo/cluster.db``."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Opens (creating it if missing) and takes ownership of the store.

        Raises `ConfigError` when the store cannot be used by this coordinator (another one
        owns it, its format is newer than this code).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases the store; calls that were already waiting finish first. Idempotent."""

    @abc.abstractmethod
    async def load(self) -> dict[str, bytes]:
        """The whole state map (it is small), as of one revision, which `revision` then gives."""

    @abc.abstractmethod
    async def commit(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        history: Sequence[HistoryEvent] = (),
        *,
        expect_revision: int | None = None,
    ) -> list[int]:
        """Applies `puts`, `deletes` and records `history` events in one atomic, durable
        transaction; returns the events' seqs in order.

        With `expect_revision`, applies only if the store is still at that revision, else raises
        `StoreConflictError`. An invalid key, value or event raises `ValueError` naming it.
        Whatever it raises, nothing of the commit was applied.
        """

    @abc.abstractmethod
    async def history(
        self, service: str | None = None, limit: int = 100, kind: str | None = None
    ) -> list[HistoryRecord]:
        """The newest `limit` events (newest last), of one service ("" for cluster-wide ones)
        or of all when `service` is None, and of one kind when `kind` is given."""

    @abc.abstractmethod
    async def history_after(
        self, after_seq: int, service: str | None = None, limit: int = 100
    ) -> list[HistoryRecord]:
        """The oldest `limit` kept events with a seq above `after_seq` (oldest first), of one
        service ("" for cluster-wide ones) or of all when `service` is None: a watcher's
        backlog, read page by page (`failoverctl events --since`)."""

    @property
    @abc.abstractmethod
    def revision(self) -> int:
        """The store's revision as of this handle's last open, load or commit."""

    @property
    @abc.abstractmethod
    def term(self) -> int:
        """The leadership term this handle holds (> 0 once it leads; SQLite: from open), higher
        at every new leadership."""

    # --- leadership ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def campaign(self, address: str) -> int:
        """Waits until this handle leads and returns its term; `address` (the coordinator's
        advertised gRPC HOST:PORT) is what `leader` and `coordinators` then show.

        Cancellable: a cancelled campaign leaves this handle not leading. Raises ConfigError for
        an address longer than `defaults.COORDINATOR_ADDRESS_BYTES_MAX`.
        """

    @abc.abstractmethod
    async def wait_lost(self) -> None:
        """Returns when this handle's leadership is lost (at once if it does not lead).

        The caller must stop acting as leader when it returns: commits raise
        `LeadershipLostError` from then on, until a new `campaign` succeeds.
        """

    @abc.abstractmethod
    async def resign(self) -> None:
        """Gives up leadership, so another coordinator can lead at once. Idempotent."""

    @property
    @abc.abstractmethod
    def leading(self) -> bool:
        """Whether this handle leads now, as far as it knows (commits may still be refused:
        the store, not this flag, is the judge)."""

    @abc.abstractmethod
    async def leader(self) -> CoordinatorInfo | None:
        """Who leads now as the store says (None when nobody does); from any handle."""

    @abc.abstractmethod
    async def coordinators(self) -> list[CoordinatorInfo]:
        """Every coordinator alive (each registers itself when it campaigns), sorted by
        address, the leader marked; from any handle."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


def check_key(key: object) -> str:
    """Returns `key` if it is a valid state key, else raises ValueError naming the problem."""
    if not isinstance(key, str):
        raise ValueError(f"store key {key!r} is a {type(key).__name__}, not a str")
    if not key:
        raise ValueError("store key is empty: every key needs a name")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"store key {key!r} is not valid UTF-8 text: {exc.reason}") from None
    if size > defaults.STORE_KEY_BYTES_MAX:
        raise ValueError(
            f"store key {key[:40]!r}... is {size} bytes of UTF-8, above the limit of "
            f"{defaults.STORE_KEY_BYTES_MAX}"
        )
    return key


def check_value(key: str, value: object) -> bytes:
    """Returns `value` if it is a valid state value for `key`, else raises ValueError."""
    if not isinstance(value, bytes):
        raise ValueError(
            f"store value for key {key!r} is a {type(value).__name__}, not bytes "
            "(encode it with msgpack first)"
        )
    if len(value) > defaults.STORE_VALUE_BYTES_MAX:
        raise ValueError(
            f"store value for key {key!r} is {len(value)} bytes, above the limit of "
            f"{defaults.STORE_VALUE_BYTES_MAX}"
        )
    return value


def check_address(address: object) -> str:
    """Returns `address` if it is a valid coordinator address to advertise, else ConfigError."""
    if not isinstance(address, str):
        raise ConfigError(f"coordinator address {address!r} is not text: give HOST:PORT")
    size = len(address.encode("utf-8", "replace"))
    # It names the coordinator's members key in a shared store: no "/" (a key level).
    if (
        not address
        or size > defaults.COORDINATOR_ADDRESS_BYTES_MAX
        or "/" in address
        or not address.isprintable()
    ):
        raise ConfigError(
            f"coordinator address {address[:60]!r} is not a HOST:PORT of 1 to "
            f"{defaults.COORDINATOR_ADDRESS_BYTES_MAX} bytes without '/' or control characters"
        )
    return address


def check_changes(puts: Mapping[str, bytes],
                  deletes: Iterable[str]) -> tuple[list[tuple[str, bytes]], list[str]]:
    """A commit's puts and deletes checked, as (key, value) pairs and distinct delete keys in
    order, copied (a caller changing its containers later changes nothing); ValueError names
    the first bad one. Every store checks a commit with this, before it applies anything."""
    if isinstance(deletes, str | bytes):
        raise ValueError(f"deletes is the single string {deletes!r}: pass a list of keys")
    put_items = [(check_key(key), check_value(key, value)) for key, value in puts.items()]
    put_keys = {key for key, _ in put_items}
    delete_keys: list[str] = []
    for key in deletes:
        if check_key(key) in put_keys:
            raise ValueError(f"store key {key!r} is both put and deleted in one commit: do one")
        if key not in delete_keys:
            delete_keys.append(key)
    return put_items, delete_keys


def encode_details(details: object) -> bytes:
    """A history event's details as msgpack, or ValueError when they are not a msgpack-able
    dict within `defaults.STORE_VALUE_BYTES_MAX`."""
    if not isinstance(details, dict):
        raise ValueError(f"history event details are a {type(details).__name__}, not a dict")
    try:
        blob = msgpack.packb(details, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"history event details cannot be encoded with msgpack: {exc}") from None
    if len(blob) > defaults.STORE_VALUE_BYTES_MAX:
        raise ValueError(
            f"history event details are {len(blob)} bytes encoded, above the limit of "
            f"{defaults.STORE_VALUE_BYTES_MAX}"
        )
    return blob


def decode_details(blob: bytes | None) -> dict[str, Any]:
    """The details dict stored by `encode_details`."""
    if not blob:
        return {}
    details = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    return details if isinstance(details, dict) else {"value": details}


def check_history_limit(limit: object) -> int:
    """`limit` if it is a count of events (an int >= 0), else ValueError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"history limit {limit!r} is not a count of events (an int >= 0)")
    return limit


def check_event(event: object) -> tuple[str, str, str, bytes]:
    """(service, kind, message, encoded details) of a valid history event, else ValueError."""
    if not isinstance(event, tuple | list) or len(event) != 4:
        raise ValueError(
            f"history event {event!r} is not a (service, kind, message, details) tuple"
        )
    service, kind, message, details = event
    for name, text in (("service", service), ("kind", kind), ("message", message)):
        if not isinstance(text, str):
            raise ValueError(f"history event {name} {text!r} is a {type(text).__name__}, not a str")
    if not kind:
        raise ValueError(f"history event {message!r} has an empty kind")
    return service, kind, message, encode_details(details)
