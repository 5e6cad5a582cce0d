"""The replicated state machine: a service kind plus the exactly-once sessions.

Committed entries are applied here, in index order, identically on every replica
(design.md, invariant 4). Pure: no I/O, no clock; the agent feeds it entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

from failover.core.sessions import (
    ClientSessions,
    Reply,
    ReplyStatus,
    TooOld,
    decode_request_id,
)
from failover.errors import InvalidRequest, RequestRejected
from failover.service import ServiceKind

_FORMAT_VERSION = 1


def decode_request(payload: bytes) -> dict[str, Any]:
    """Decodes a msgpack request dict; anything else is an InvalidRequest."""
    try:
        request = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidRequest(f"request is not valid msgpack: {exc}") from None
    if not isinstance(request, dict):
        raise InvalidRequest(f"request must be a map, not {type(request).__name__}")
    return request


def encode_result(result: dict[str, Any]) -> bytes:
    """Encodes a result dict as msgpack (bytes stay bytes, str stays str)."""
    return msgpack.packb(result, use_bin_type=True)


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
        seen = self.sessions.lookup(client_id, seq)
        if isinstance(seen, Reply):
            return seen  # logged twice (a retry that raced a failover): applied once
        if isinstance(seen, TooOld):
            return Reply(ReplyStatus.INVALID, _too_old(client_id, seq, seen).encode(), index,
                         epoch)
        reply = self._execute(payload, index, epoch)
        self.sessions.record(client_id, seq, reply)
        return reply

    def apply_barrier(self, epoch: int, index: int) -> Reply:
        """Applies the empty entry a new primary writes first in its epoch (no kind call)."""
        assert index == self.applied_index + 1, (index, self.applied_index)
        assert epoch >= self.applied_epoch, (epoch, self.applied_epoch)
        self.applied_index, self.applied_epoch = index, epoch
        return Reply(ReplyStatus.OK, encode_result({}), index, epoch)

    def _execute(self, payload: bytes, index: int, epoch: int) -> Reply:
        try:
            result = self.kind.apply(decode_request(payload))
        except RequestRejected as exc:
            return Reply(ReplyStatus.REJECTED, str(exc).encode(), index, epoch)
        except InvalidRequest as exc:
            return Reply(ReplyStatus.INVALID, str(exc).encode(), index, epoch)
        return Reply(ReplyStatus.OK, encode_result(result), index, epoch)

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


def _too_old(client_id: str, seq: int, seen: TooOld) -> str:
    return (
        f"request {client_id}:{seq} is older than the retry window (seqs up to "
        f"{seen.floor_seq} were forgotten); its outcome cannot be told: read the state to check"
    )
