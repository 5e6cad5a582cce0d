"""The replicated state machine: a service kind plus the exactly-once sessions.

Committed entries are applied here, in index order, identically on every replica
(docs/design.md, invariant 4). Pure: no I/O, no clock; the agent feeds it entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from itertools import repeat
from operator import itemgetter
from typing import Any

import msgpack

from failover import defaults
from failover.core.sessions import (
    EXPIRED,
    Claims,
    ClientSessions,
    Reply,
    ReplyStatus,
    TooOld,
    decode_request_id,
    opens_session,
)
from failover.errors import InvalidRequest, RequestRejected
from failover.service import ServiceKind, kind_failure, nesting_depth

_FORMAT_VERSION = 1


def decode_request(payload: bytes) -> dict[str, Any]:
    """Decodes a msgpack request dict; anything else is an InvalidRequest."""
    try:
        request = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidRequest(f"request is not valid msgpack: {exc}") from None
    if not isinstance(request, dict):
        raise _not_a_map(request)
    return request


def check_loggable(payload: bytes, request: object) -> None:
    """Refuses (InvalidRequest) a write too large or too deeply nested to be logged.

    Runs on the primary before the entry is logged, so such a request never reaches any
    replica's apply: every replica must be able to apply whatever is logged, and a value
    nested deep enough to exhaust the stack (in a kind, or in `repr` for an error message)
    would fail differently on replicas whose stacks differ."""
    if len(payload) > defaults.REQUEST_BYTES_MAX:
        raise InvalidRequest(f"request of {len(payload)} bytes is over request_bytes_max "
                             f"({defaults.REQUEST_BYTES_MAX}); send smaller requests")
    depth_max = defaults.REQUEST_DEPTH_MAX
    if nesting_depth(request, depth_max) > depth_max:
        raise InvalidRequest(f"request nests lists and maps more than {depth_max} deep (the "
                             "request_depth_max limit); send a flatter request")


def encode_result(result: dict[str, Any]) -> bytes:
    """Encodes a result dict as msgpack (bytes stay bytes, str stays str)."""
    return msgpack.packb(result, use_bin_type=True)


#: The payload of a request that only opens its session (Raft's RegisterClient, dissertation
#: 6.3): msgpack nil, which no kind takes as a request (requests are maps). It is logged like
#: any write, with the open flag in its request id, and answers OK without calling the kind;
#: a client sends it before its first request, so no real request ever opens a session.
SESSION_OPEN_PAYLOAD = b"\xc0"


#: A committed log entry as `apply_many` takes it: (epoch, index, request_id, payload), as
#: `failover.storage.records.Entry` is. An empty payload is the barrier a new primary writes
#: first in its epoch; an empty request id, a request outside the exactly-once sessions.
LoggedEntry = tuple[int, int, bytes, bytes]


#: One outcome of a batch: the result dict, or the refusal the single `apply` would raise.
Outcome = dict[str, Any] | InvalidRequest | RequestRejected


def apply_each(kind: ServiceKind, commands: Sequence[dict[str, Any]]) -> list[Outcome]:
    """The default batch apply: `kind.apply` on each command in order, a refusal
    (InvalidRequest, RequestRejected) taken as that command's outcome, and any other
    exception turned into the InvalidRequest `failover.service.kind_failure` makes of it
    (apply is total: invariant 13).

    A kind may define ``apply_batch(commands) -> list[Outcome]`` doing the same faster; it
    must give exactly these outcomes, unexpected exceptions included, and leave exactly this
    state (the digest, and the bytes of a paged arena). An exception out of ``apply_batch``
    itself is a bug that leaves the state machine unusable.
    """
    outcomes: list[Outcome] = []
    append = outcomes.append
    apply = kind.apply
    for command in commands:
        try:
            append(apply(command))
        except (InvalidRequest, RequestRejected) as exc:
            append(exc)
        except Exception as exc:
            append(kind_failure(kind.name, exc))
    return outcomes


def batch_apply_of(kind: ServiceKind) -> Callable[[Sequence[dict[str, Any]]], list[Outcome]]:
    """The kind's own ``apply_batch`` when it has one, else `apply_each` on it."""
    own = getattr(kind, "apply_batch", None)
    if own is not None:
        return own  # type: ignore[no-any-return]
    return lambda commands: apply_each(kind, commands)


class ReplicatedStateMachine:
    """Applies committed entries to a kind, recording each request's reply exactly once."""

    def __init__(self, kind: ServiceKind, sessions: ClientSessions | None = None) -> None:
        self.kind = kind
        self.sessions = sessions if sessions is not None else ClientSessions()
        self.applied_index = 0
        self.applied_epoch = 0

    def apply(self, epoch: int, index: int, request_id: bytes, payload: bytes) -> Reply:
        """Applies one committed entry; a request id seen before gets its recorded reply."""
        assert index == self.applied_index + 1, (index, self.applied_index)
        assert epoch >= self.applied_epoch, (epoch, self.applied_epoch)
        self.applied_index, self.applied_epoch = index, epoch
        if not request_id:
            return self._execute(payload, index, epoch)
        client_id, seq = decode_request_id(request_id)
        seen = self.sessions.lookup(client_id, seq, opens_session(request_id))
        if isinstance(seen, Reply):
            return seen  # logged twice (a retry that raced a failover): applied once
        if isinstance(seen, TooOld):
            return _past_window(client_id, seq, seen, index, epoch)
        if seen is EXPIRED:
            return _expired(client_id, seq, index, epoch)
        reply = self._execute(payload, index, epoch)
        self.sessions.record(client_id, seq, reply)
        return reply

    def apply_many(self, entries: Sequence[LoggedEntry]) -> list[Reply]:
        """Applies consecutive committed entries; their replies, in order.

        Equal to `apply_barrier` (for an entry with an empty payload) or `apply` on each entry
        in turn: the same replies, the same recorded replies and evictions in the sessions,
        the same state and digest. It is faster because the sessions are looked up and
        recorded in one pass and the kind executes the fresh requests in one batch (its
        ``apply_batch``, else `apply_each`). Entries that do not continue `applied_index`, or
        whose epoch goes down, raise AssertionError before anything changes. As with `apply`,
        an exception other than a refusal out of the kind is a bug that leaves this state
        machine unusable.
        """
        count = len(entries)
        if not count:
            return []
        first = self.applied_index + 1
        epochs = list(map(_epoch_of, entries))
        indexes = list(map(_index_of, entries))
        assert indexes == list(range(first, first + count)), (first, entries[0])
        assert self.applied_epoch <= epochs[0] and all(map(int.__le__, epochs, epochs[1:])), (
            self.applied_epoch, epochs[:3])
        replies: list[Reply | None] = [None] * count
        # Barriers answer at once; requests with an id go through the sessions; without
        # one, a request executes as it is.
        everything = range(count)
        keyed: Sequence[int] = ()
        run: Sequence[int] = ()
        if all(map(_payload_of, entries)) and all(map(_request_id_of, entries)):
            keyed = everything  # the common case: every entry is a request with an id
        else:
            keyed, run = [], []
            for position, entry in enumerate(entries):
                if not entry[3]:
                    replies[position] = _new_reply((_OK, _EMPTY_RESULT, entry[1], entry[0]))
                elif entry[2]:
                    keyed.append(position)
                else:
                    run.append(position)
        claims: Claims | None = None
        copies: list[tuple[int, int]] = []  # (position, the earlier position it repeats)
        claimed = keyed
        if keyed:
            request_ids = (list(map(_request_id_of, entries)) if keyed is everything
                           else [entries[p][2] for p in keyed])
            found, claims = self.sessions.claim_many(request_ids)
            if found:  # some were seen before: they get the reply recorded for them
                for k, seen in found.items():
                    position = keyed[k]
                    if type(seen) is int:
                        copies.append((position, keyed[seen]))
                    elif seen is EXPIRED:
                        entry = entries[position]
                        replies[position] = _expired(*decode_request_id(entry[2]), entry[1],
                                                     entry[0])
                    elif isinstance(seen, TooOld):
                        entry = entries[position]
                        replies[position] = _past_window(*decode_request_id(entry[2]), seen,
                                                         entry[1], entry[0])
                    else:
                        replies[position] = seen  # type: ignore[assignment]
                claimed = [p for k, p in enumerate(keyed) if k not in found]
            run = sorted([*run, *claimed]) if run else claimed
        if len(run) == count:  # every entry executes: the replies are theirs, in order
            replies = self._execute_many(entries)  # type: ignore[assignment]
        elif run:
            executed = self._execute_many([entries[p] for p in run])
            for position, reply in zip(run, executed, strict=True):
                replies[position] = reply
        if claims is not None and claims.seqs:
            self.sessions.settle(claims, replies if claimed is everything  # type: ignore[arg-type]
                                 else [replies[p] for p in claimed])
        for position, source in copies:
            replies[position] = replies[source]
        self.applied_index, self.applied_epoch = indexes[-1], epochs[-1]
        return replies  # type: ignore[return-value]  # every position was filled

    def _execute_many(self, entries: Sequence[LoggedEntry]) -> list[Reply]:
        """Executes the requests of `entries` on the kind, in order; their replies."""
        payloads = list(map(_payload_of, entries))
        try:
            requests: list[Any] = list(map(_unpackb, payloads))
        except Exception:  # some payload is not msgpack: find which, one by one
            requests = [_decode_or_error(payload) for payload in payloads]
        if set(map(type, requests)) == {dict}:
            outcomes = batch_apply_of(self.kind)(requests)
            assert len(outcomes) == len(entries), (len(outcomes), len(entries))
            name = self.kind.name
            if set(map(type, outcomes)) == {dict}:
                # Every request succeeded (the common case): the replies are built by C-level
                # maps. Kinds often return equal results (kv: the same two dicts for every
                # put), so each result object is encoded once; `outcomes` keeps them alive
                # meanwhile, so no id is reused.
                try:
                    encoded = {key: encode_result(result)
                               for key, result in dict(zip(map(id, outcomes), outcomes,
                                                           strict=True)).items()}
                except Exception:  # a result that does not encode: `_outcome_reply` says so
                    return list(map(_outcome_reply, outcomes, entries, repeat(name)))
                datas = map(encoded.__getitem__, map(id, outcomes))
                return list(map(_new_reply, zip(repeat(_OK), datas, map(_index_of, entries),
                                                map(_epoch_of, entries))))
            return list(map(_outcome_reply, outcomes, entries, repeat(name)))
        replies: list[Reply] = []
        commands = [r for r in requests if type(r) is dict]
        outcomes = iter(batch_apply_of(self.kind)(commands) if commands else ())
        for request, entry in zip(requests, entries, strict=True):
            if type(request) is dict:
                replies.append(_outcome_reply(next(outcomes), entry, self.kind.name))
            elif entry[3] == SESSION_OPEN_PAYLOAD:
                replies.append(_new_reply((_OK, _EMPTY_RESULT, entry[1], entry[0])))
            else:
                error = request if isinstance(request, InvalidRequest) else _not_a_map(request)
                replies.append(_new_reply((ReplyStatus.INVALID, str(error).encode(), entry[1],
                                           entry[0])))
        assert next(outcomes, None) is None, "the kind gave more outcomes than commands"
        return replies

    def apply_barrier(self, epoch: int, index: int) -> Reply:
        """Applies the empty entry a new primary writes first in its epoch (no kind call)."""
        assert index == self.applied_index + 1, (index, self.applied_index)
        assert epoch >= self.applied_epoch, (epoch, self.applied_epoch)
        self.applied_index, self.applied_epoch = index, epoch
        return Reply(ReplyStatus.OK, encode_result({}), index, epoch)

    def _execute(self, payload: bytes, index: int, epoch: int) -> Reply:
        if payload == SESSION_OPEN_PAYLOAD:
            return Reply(ReplyStatus.OK, _EMPTY_RESULT, index, epoch)
        try:
            result = self.kind.apply(decode_request(payload))
        except RequestRejected as exc:
            return Reply(ReplyStatus.REJECTED, str(exc).encode(), index, epoch)
        except InvalidRequest as exc:
            return Reply(ReplyStatus.INVALID, str(exc).encode(), index, epoch)
        except Exception as exc:  # a bug in the kind: refused alike on every replica
            return Reply(ReplyStatus.INVALID, str(kind_failure(self.kind.name, exc)).encode(),
                         index, epoch)
        return _outcome_reply(result, (epoch, index, b"", payload), self.kind.name)

    def query(self, payload: bytes) -> Reply:
        """Answers a read-only request from applied state."""
        try:
            result = self.kind.query(decode_request(payload))
        except RequestRejected as exc:
            return Reply(ReplyStatus.REJECTED, str(exc).encode(), self.applied_index,
                         self.applied_epoch)
        except InvalidRequest as exc:
            return Reply(ReplyStatus.INVALID, str(exc).encode(), self.applied_index,
                         self.applied_epoch)
        return Reply(ReplyStatus.OK, encode_result(result), self.applied_index,
                     self.applied_epoch)

    def digest(self) -> bytes:
        """Digest of the kind's state and the sessions (equal on replicas at equal index)."""
        h = hashlib.blake2b(digest_size=32)
        h.update(self.kind.digest())
        h.update(self.sessions.digest())
        return h.digest()

    def snapshot(self) -> Iterator[bytes]:
        """Chunks: the framework's own (indexes, sessions), then the kind's."""
        yield msgpack.packb(
            [_FORMAT_VERSION, self.applied_index, self.applied_epoch, self.sessions.to_bytes()],
            use_bin_type=True,
        )
        yield from self.kind.snapshot()

    def restore(self, chunks: Iterable[bytes]) -> None:
        """Replaces the whole state from `snapshot()` chunks."""
        it = iter(chunks)
        version, applied_index, applied_epoch, sessions = msgpack.unpackb(next(it), raw=False)
        assert version == _FORMAT_VERSION, f"unknown state machine snapshot format {version}"
        self.kind.restore(it)
        self.sessions = ClientSessions.from_bytes(
            sessions, self.sessions.replies_per_client_max, self.sessions.clients_max
        )
        self.applied_index, self.applied_epoch = applied_index, applied_epoch


_EMPTY_RESULT = msgpack.packb({}, use_bin_type=True)
_OK = ReplyStatus.OK
_unpackb = msgpack.unpackb
_epoch_of = itemgetter(0)
_index_of = itemgetter(1)
_request_id_of = itemgetter(2)
_payload_of = itemgetter(3)


#: Reply(*fields), without the named tuple's argument handling (the batch hot path).
_new_reply: Callable[[tuple[ReplyStatus, bytes, int, int]], Reply] = partial(tuple.__new__, Reply)


def _outcome_reply(outcome: Outcome, entry: LoggedEntry, kind_name: str) -> Reply:
    """The reply `apply` gives for an entry whose request had this outcome (a result that
    does not encode is the kind's bug, refused as `kind_failure` says)."""
    if isinstance(outcome, RequestRejected):
        return _new_reply((ReplyStatus.REJECTED, str(outcome).encode(), entry[1], entry[0]))
    if isinstance(outcome, InvalidRequest):
        return _new_reply((ReplyStatus.INVALID, str(outcome).encode(), entry[1], entry[0]))
    try:
        data = encode_result(outcome)
    except Exception as exc:
        data = str(kind_failure(kind_name, exc)).encode()
        return _new_reply((ReplyStatus.INVALID, data, entry[1], entry[0]))
    return _new_reply((_OK, data, entry[1], entry[0]))


def _decode_or_error(payload: bytes) -> Any:
    try:
        return decode_request(payload)
    except InvalidRequest as exc:
        return exc


def _not_a_map(request: object) -> InvalidRequest:
    return InvalidRequest(f"request must be a map, not {type(request).__name__}")


def _expired(client_id: str, seq: int, index: int, epoch: int) -> Reply:
    return _new_reply((ReplyStatus.EXPIRED, (
        f"SessionExpired: request {client_id}:{seq} names a session this service does not "
        "know (evicted after too many other clients, or never opened) and does not open "
        "one; it was not applied here, but an earlier attempt of it may have been: read the "
        "state to check, and send new requests under a new session").encode(), index, epoch))


def too_old_message(client_id: str, seq: int, seen: TooOld) -> str:
    """Why a retry older than its session's window is refused (`SessionExpired`): like an
    evicted session's, its outcome can no longer be told, and an earlier attempt may have
    been applied, so the caller must not take it as "not applied"."""
    return (
        f"SessionExpired: request {client_id}:{seq} is older than the retry window (seqs up to "
        f"{seen.floor_seq} were forgotten); it was not applied here, but an earlier attempt of "
        "it may have been: read the state to check before sending it again")


def _past_window(client_id: str, seq: int, seen: TooOld, index: int, epoch: int) -> Reply:
    return _new_reply((ReplyStatus.EXPIRED, too_old_message(client_id, seq, seen).encode(),
                       index, epoch))
