"""Typed errors. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class FailoverError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(FailoverError):
    """A configuration value is missing or out of range; raised at start, before any I/O."""


# --- storage -------------------------------------------------------------------------------


class StorageError(FailoverError):
    """The write-ahead log or a snapshot cannot be used as it is on disk."""


class LogCorruptError(StorageError):
    """A record in the middle of the write-ahead log fails its check.

    The replica must not start from this log: restore the file from a copy, or discard the
    replica's data dir so that it is rebuilt from another replica.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"write-ahead log corrupt in {path} at byte offset {offset}: {reason}; "
            "the replica cannot start from it: discard its data dir to rebuild it from "
            "another replica"
        )


class ShippedRecordsCorruptError(LogCorruptError):
    """A shipped batch holds a record that fails its check (frame, CRC32C, body, index or
    epoch order); the duplica refused the whole batch and wrote none of it."""

    def __init__(self, offset: int, reason: str) -> None:
        self.path = "<shipped records>"
        self.offset = offset
        self.reason = reason
        StorageError.__init__(
            self,
            f"shipped records refused at byte offset {offset}: {reason}; nothing of the batch "
            "was written and the duplica's log is intact: the primary sends it again; if it "
            "keeps failing, the primary's own log holds the bad record: rebuild the primary's "
            "replica from a duplica",
        )


class SnapshotCorruptError(StorageError):
    """A snapshot file is damaged; it is never loaded."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"snapshot {path} is damaged: {reason}; it was not loaded: delete it and recover "
            "from an older snapshot plus the log, or rebuild the replica from another one"
        )


class LogGapError(StorageError):
    """A read or append names indexes the log does not hold (compacted or not yet written)."""


class DiskFullError(StorageError):
    """The data dir has no space left: the write was refused cleanly, nothing was corrupted."""


# --- services and requests -----------------------------------------------------------------


class UnknownKindError(FailoverError):
    """No service kind is registered under the requested name."""


class InvalidRequest(FailoverError):
    """A request is malformed (unknown op, missing field, wrong type); state is untouched."""


class RequestRejected(FailoverError):
    """The service refused a well-formed request (an overdraw); state is untouched.

    A refusal is a deterministic outcome: every replica refuses alike and a retry with the same
    request id gets the same refusal.
    """


class SessionExpired(RequestRejected):
    """The request's session is no longer known to the service (evicted after
    `SESSION_CLIENTS_MAX` other clients, see `failover.core.sessions`), so a retry can no longer
    be told from a new request. This attempt was refused and changed nothing, but an earlier
    attempt of the same call may have been applied: read the state to check before sending
    it again. The `Client` opens a new session for its later calls.

    Over gRPC: FAILED_PRECONDITION, its message starting with ``SessionExpired``.
    """


class Overloaded(FailoverError):
    """The primary holds too many writes, or too many bytes of them, not yet answered
    (`PENDING_REQUESTS_MAX`, `PENDING_REQUEST_BYTES_MAX`): this request was refused before it
    was logged, so nothing was applied. Retry after a backoff, or send less at once.

    Over gRPC: RESOURCE_EXHAUSTED, its message starting with ``Overloaded``. The `Client`
    retries it with backoff until the call's deadline.
    """


# --- cluster -------------------------------------------------------------------------------


class DrainCannotFinish(InvalidRequest):
    """A drain asked to finish (`failoverctl drain HOST --wait`) cannot: some replica of the
    host has no other host to go to; the message gives the placement reasons. Nothing was
    changed. Over gRPC: FAILED_PRECONDITION."""


class WatcherBehind(Overloaded):
    """A history watcher (WatchHistory, `failoverctl events --follow`) fell more than
    `HISTORY_WATCH_QUEUE_MAX` events behind and was cut off, so that it never slows the
    coordinator. Over gRPC: RESOURCE_EXHAUSTED; the message names the seq to resume after
    (`failoverctl events --since SEQ`)."""


class Unavailable(FailoverError):
    """The service could not be reached before the call's deadline; the request may or may not
    have been applied: retry with the same client (same request id) to find out."""


class ReplicaBrokenError(Unavailable):
    """This host's replica of the service cannot read its own snapshot or log (damaged or
    unreadable): it serves nothing, takes no batch, is not promotable, and says why in its
    status until the coordinator rebuilds it from a peer. Retry: the coordinator moves its
    role to another replica."""


class StaleEpochError(FailoverError):
    """A message carries an epoch lower than the receiver's: the sender has been fenced."""


class StaleCoordinatorTermError(StaleEpochError):
    """A control call came from a coordinator whose term is older than one this agent has
    seen: that coordinator was deposed (another leads), and the call changed nothing. The
    deposed coordinator must stop acting and follow the leader.

    Over gRPC: FAILED_PRECONDITION, its type named in trailing metadata
    (`ERROR_TYPE_METADATA_KEY`)."""

    def __init__(self, term: int, seen: int) -> None:
        self.term = term
        self.seen = seen
        super().__init__(f"coordinator term {term} is older than term {seen} this agent has "
                         "seen: that coordinator was deposed")


class NotPrimaryError(FailoverError):
    """This replica is not the primary; the hint names the primary when it is known."""

    def __init__(self, service: str, primary_address: str = "", epoch: int = 0) -> None:
        self.service = service
        self.primary_address = primary_address
        self.epoch = epoch
        where = f"; the primary is {primary_address} at epoch {epoch}" if primary_address else ""
        super().__init__(f"this replica of {service!r} is not the primary{where}")


# --- service state -------------------------------------------------------------------------


class PagedStateFullError(FailoverError):
    """Growing a paged state would pass its bound (`pages_max`); nothing was grown."""

    def __init__(self, pages_requested: int, pages_max: int, page_bytes: int) -> None:
        self.pages_requested = pages_requested
        self.pages_max = pages_max
        self.page_bytes = page_bytes
        super().__init__(
            f"paged state cannot grow to {pages_requested} pages of {page_bytes} bytes: its "
            f"bound is {pages_max} pages ({pages_max * page_bytes} bytes); raise pages_max "
            "or keep less state in this service"
        )


class StateCorruptError(FailoverError):
    """Serialized service state (snapshot chunks, migrated pages) does not decode into a valid
    state of the kind; the state that was there before is untouched."""


class KindLoadError(FailoverError):
    """A registered service kind cannot be used: its module fails to import, the entry point
    names no ServiceKind, or two packages register different kinds under one name."""


# --- coordinator store ---------------------------------------------------------------------


class StoreConflictError(StorageError):
    """A commit named the store revision it expected and the store has moved past it (another
    commit came first); nothing was applied: load again, decide again, commit again."""

    def __init__(self, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"store commit expected revision {expected} but the store is at {actual}: another "
            "commit came first and nothing was applied; load the state again and retry"
        )


class LeadershipLostError(StorageError):
    """This coordinator's leadership term is over (a store shared by several coordinators, such
    as etcd, elected another leader); the commit was not applied. The coordinator must stop
    acting as leader at once and campaign again."""


class StoreOutcomeUnknownError(StorageError):
    """A commit was sent to a shared store (etcd) and no answer came back in time, even after
    retrying on the other endpoints: it may or may not have been applied (it is never applied
    in part). Load the state again to find out before deciding again."""


# --- live migration ------------------------------------------------------------------------


class MigrationError(FailoverError):
    """A live migration cannot go on: a page batch does not decode (unknown encoding, wrong
    length, a delta for a page never received, a corrupt lz4 frame), or its steps came out of
    order. The migration aborts before cutover, so the source never stopped being the owner;
    start a new migration with a fresh encoder, decoder and planner."""


# --- trust ---------------------------------------------------------------------------------


class PermissionDenied(FailoverError):
    """The caller's certificate does not grant what it asked for (its role lacks the
    permission, or an agent acted under a host id other than its own); nothing was done.

    Over gRPC: PERMISSION_DENIED, the message naming the caller and the role it lacks.
    """

    def __init__(self, caller: str, action: str, needed: str) -> None:
        self.caller = caller
        self.action = action
        self.needed = needed
        super().__init__(
            f"permission denied: {caller} may not {action}: it needs {needed}; issue it a "
            "certificate of that role (failoverctl certs issue) or call with one"
        )

    @classmethod
    def from_status(cls, details: str) -> PermissionDenied:
        """The error a PERMISSION_DENIED status stands for, its message the server's."""
        error = cls.__new__(cls)
        error.caller = error.action = error.needed = ""
        FailoverError.__init__(error, details or "permission denied")
        return error
