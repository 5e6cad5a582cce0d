"""Exactly-once requests: (client id, seq) -> the reply recorded when it was applied.

The table is part of the replicated state: every replica records the same replies at the same
indexes, so a retry after a lost reply or a failover gets the first answer. It is bounded per
client (a window of the newest seqs) and in clients (the least recently applied is evicted);
both evictions depend only on the applied sequence, so every replica evicts alike.

A session must be known before requests under it are accepted (Raft dissertation, 6.3): only
a request marked as opening its session (`encode_request_id(..., opens=True)`) may add a
client to the table. Any other request of a client the table does not hold is `EXPIRED`,
never new: its session was evicted, so a retry of a request applied before the eviction would
otherwise apply again. The client marks only the first attempts of the first request under a
new session id, and stops marking once an attempt may have reached the log, so a session id is
opened at most once and an evicted one is never opened again (see `failover.client`).

How long a retry is still recognised as one: until `SESSION_CLIENTS_MAX` (10,000) other
clients have had a request executed since its client's last executed request (that client is
then the least recently applied, and evicted), and as long as its seq is among that client's
`SESSION_REPLIES_PER_CLIENT_MAX` (256) newest seqs. There is no time bound (no clock here).
Past those bounds a retry is refused (`EXPIRED`, or `TooOld`), never applied again.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections import OrderedDict
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

import msgpack

from failover import defaults

_SEQ = struct.Struct(">Q")
# The byte between client id and seq in a logged request id is 1 when the request may open
# its session; other requests keep the 0 that every request id had before.
_OPENS = 1


class ReplyStatus(IntEnum):
    """How a request ended; every outcome is recorded and replayed alike on a retry."""

    OK = 0
    REJECTED = 1  # the service refused it (RequestRejected)
    INVALID = 2  # malformed (InvalidRequest)
    EXPIRED = 3  # its session is unknown (SessionExpired); nothing is recorded for it


class Reply(NamedTuple):
    """A recorded reply: `data` is the msgpack result for OK, else the error message;
    (epoch, index) name the log entry that applied the request, whichever attempt of it
    the reply goes back to."""

    status: ReplyStatus
    data: bytes
    index: int
    epoch: int = 0


class TooOld(NamedTuple):
    """The seq is below the client's window: whether it was applied can no longer be told."""

    floor_seq: int


class Expired:
    """The request's session is not in the table and the request does not open it: the
    session was evicted (or never opened), so whether the request was applied before can no
    longer be told. `EXPIRED` is the one instance."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "EXPIRED"


EXPIRED = Expired()


def encode_request_id(client_id: str, seq: int, opens: bool = False) -> bytes:
    """The request id as stored in a log entry: client id, a byte (1 when the request opens
    its session, else 0), 8-byte big-endian seq."""
    raw = client_id.encode()
    assert raw and b"\x00" not in raw and len(raw) <= defaults.CLIENT_ID_BYTES_MAX, client_id
    assert 0 < seq < 1 << 64, seq
    return raw + (b"\x01" if opens else b"\x00") + _SEQ.pack(seq)


def decode_request_id(request_id: bytes) -> tuple[str, int]:
    """Inverse of `encode_request_id` (see `opens_session` for the third part)."""
    assert len(request_id) >= 10 and request_id[-9] <= _OPENS, request_id
    return request_id[:-9].decode(), _SEQ.unpack(request_id[-8:])[0]


def opens_session(request_id: bytes) -> bool:
    """Whether the request (id from `encode_request_id`) may open its session."""
    return request_id[-9] == _OPENS


class _Client:
    __slots__ = ("replies", "seqs", "floor_seq")

    def __init__(self) -> None:
        # seq -> its reply; while `claim_many` applies a batch, the position of a request in
        # it may stand where its reply will be (`settle` replaces it).
        self.replies: dict[int, Reply | int] = {}
        self.seqs: list[int] = []  # heap of the seqs in `replies`: the smallest goes first
        self.floor_seq = 0  # every seq <= floor_seq was applied and its reply dropped


class Claims(NamedTuple):
    """Where `ClientSessions.claim_many` recorded claims, in order: the i-th request to
    execute is seq `seqs[i]` of the client `clients[i]`."""

    clients: list[_Client]
    seqs: list[int]


class ClientSessions:
    """The recorded replies of every client, bounded and deterministically evicted."""

    def __init__(
        self,
        replies_per_client_max: int = defaults.SESSION_REPLIES_PER_CLIENT_MAX,
        clients_max: int = defaults.SESSION_CLIENTS_MAX,
    ) -> None:
        assert replies_per_client_max >= 1 and clients_max >= 1
        self.replies_per_client_max = replies_per_client_max
        self.clients_max = clients_max
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def lookup(self, client_id: str, seq: int, opens: bool = False
               ) -> Reply | TooOld | Expired | None:
        """The recorded reply, `TooOld` when it fell out of the window, `EXPIRED` when the
        client is unknown and the request does not open its session, or None when the
        request is to be executed."""
        client = self._clients.get(client_id)
        if client is None:
            return None if opens else EXPIRED
        reply = client.replies.get(seq)
        if reply is not None:
            return reply
        if seq <= client.floor_seq:
            return TooOld(client.floor_seq)
        return None

    def knows(self, client_id: str) -> bool:
        """Whether the client's session is in the table."""
        return client_id in self._clients

    def record(self, client_id: str, seq: int, reply: Reply) -> None:
        """Records the reply of a request just applied (adding its client when the request
        opened its session: `lookup` decides that)."""
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client()
        else:
            self._clients.move_to_end(client_id)
        assert seq not in client.replies and seq > client.floor_seq, (client_id, seq)
        self._admit(client, seq, reply)

    def _admit(self, client: _Client, seq: int, reply: Reply | int) -> None:
        """Records `reply` for a new `seq` of `client` (already the most recently applied)
        and evicts what the bounds require: the client's oldest seq, the least recent client.
        """
        replies = client.replies
        replies[seq] = reply
        if len(replies) > self.replies_per_client_max:
            oldest = heapq.heappushpop(client.seqs, seq)
            del replies[oldest]
            if oldest > client.floor_seq:
                client.floor_seq = oldest
        else:
            heapq.heappush(client.seqs, seq)
        if len(self._clients) > self.clients_max:
            self._clients.popitem(last=False)

    def claim_many(
        self, request_ids: Sequence[bytes]
    ) -> tuple[dict[int, Reply | TooOld | Expired | int], Claims]:
        """Looks up and records a batch of requests, as applying them one by one would.

        Walks the request ids (see `encode_request_id`) in order. A request that `lookup`
        would find at that point goes into the dict returned first, by its position in the
        batch, with what `lookup` would return: a Reply recorded before the batch, TooOld,
        EXPIRED, or an int (the position of the same request earlier in this batch). Every
        other request
        is to be executed: a claim (its position) is recorded where `record` would record its
        reply, with the same evictions, and the `Claims` returned second say where, in order.
        Pass them with the replies to `settle` before anything else reads the table.
        """
        found: dict[int, Reply | TooOld | Expired | int] = {}
        claims = Claims([], [])
        claimed_clients = claims.clients.append
        claimed_seqs = claims.seqs.append
        clients = self._clients
        get = clients.get
        move_to_end = clients.move_to_end
        replies_max = self.replies_per_client_max
        clients_max = self.clients_max
        heappush = heapq.heappush
        heappushpop = heapq.heappushpop
        from_bytes = int.from_bytes
        opens = _OPENS
        # The client of the previous request, while the requests come from one client:
        # it needs no lookup, and once recorded it is the most recent client already.
        last_raw = b""
        client = _Client()
        at_end = False
        for position, request_id in enumerate(request_ids):
            assert len(request_id) >= 10 and request_id[-9] <= opens, request_id
            raw = request_id[:-9]
            seq = from_bytes(request_id[-8:], "big")
            if raw != last_raw:
                client_id = raw.decode()
                existing = get(client_id)
                if existing is None:
                    if request_id[-9] != opens:
                        # Unknown and not opening: expired, never new (Raft, 6.3). The next
                        # request of this client is looked up again: it may open the session.
                        found[position] = EXPIRED
                        last_raw = b""
                        continue
                    client = clients[client_id] = _Client()
                    at_end = True
                    if len(clients) > clients_max:
                        clients.popitem(last=False)
                else:
                    client = existing
                    at_end = False
                last_raw = raw
            replies = client.replies
            seen = replies.get(seq)
            if seen is not None:
                found[position] = seen
                continue
            if seq <= client.floor_seq:
                found[position] = TooOld(client.floor_seq)
                continue
            if not at_end:
                move_to_end(client_id)
                at_end = True
            # As `_admit` (inlined: this is the replay's hot path); the client count only
            # changes above, where a new client is added.
            replies[seq] = position
            if len(replies) > replies_max:
                oldest = heappushpop(client.seqs, seq)
                del replies[oldest]
                if oldest > client.floor_seq:
                    client.floor_seq = oldest
            else:
                heappush(client.seqs, seq)
            claimed_clients(client)
            claimed_seqs(seq)
        return found, claims

    @staticmethod
    def settle(claims: Claims, replies: Sequence[Reply]) -> None:
        """Puts each claim's reply where `claim_many` recorded the claim, unless evicted since
        (a client evicted from the table keeps no replies: setting them there is harmless)."""
        assert len(claims.seqs) == len(replies), (len(claims.seqs), len(replies))
        for client, seq, reply in zip(claims.clients, claims.seqs, replies, strict=True):
            replies_of = client.replies
            if seq in replies_of:
                replies_of[seq] = reply

    def to_bytes(self) -> bytes:
        """Serialises the table (in eviction order) for snapshots."""
        table = [
            [cid, c.floor_seq,
             [[s, int(r.status), r.data, r.index, r.epoch] for s, r in c.replies.items()]]
            for cid, c in self._clients.items()
        ]
        return msgpack.packb(table, use_bin_type=True)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        replies_per_client_max: int = defaults.SESSION_REPLIES_PER_CLIENT_MAX,
        clients_max: int = defaults.SESSION_CLIENTS_MAX,
    ) -> ClientSessions:
        """Inverse of `to_bytes`."""
        sessions = cls(replies_per_client_max, clients_max)
        for cid, floor_seq, replies in msgpack.unpackb(data, raw=False):
            client = _Client()
            client.floor_seq = floor_seq
            client.replies = {s: Reply(ReplyStatus(st), d, i, e) for s, st, d, i, e in replies}
            client.seqs = sorted(client.replies)  # a sorted list is a heap
            sessions._clients[cid] = client
        return sessions

    def digest(self) -> bytes:
        """A digest of the whole table, part of the replica's state digest."""
        return hashlib.blake2b(self.to_bytes(), digest_size=32).digest()
