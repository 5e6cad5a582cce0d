"""The coordinator's store in etcd, shared by several coordinators of which one leads (issue 15).

Keys, under ``/failover/<cluster>/`` (docs/etcd.md)::

    leader                   {"address": HOST:PORT}  on the leader's lease; its create_revision
                                                     is the leader's term
    members/<HOST:PORT>      {"address": HOST:PORT}  each campaigning coordinator, on its lease
    meta                     {"format": 1, "seq": newest history seq, "commit": id}; put by
                                                     every commit, so its mod_revision is the
                                                     store's `revision`
    state/<key>              the state value, as is
    history/<20-digit seq>   {"at", "first", "events": [[service, kind, message, details]]}:
                             the events of one commit, keyed by the seq of its newest

Every commit is one etcd transaction, conditioned on the leader key's create_revision being
this handle's term (a deposed leader's write is refused by etcd itself) and on meta's
mod_revision (compare-and-set). It is never split: etcd must allow `txn_ops_max` operations and
`request_bytes_max` bytes per request (``--max-txn-ops``, ``--max-request-bytes``), which
`open` checks; a commit beyond them is refused with ValueError, nothing applied.

Leadership: a lease of ``ceil(leader_ttl_ms / 1000)`` whole seconds (etcd may raise it to its
minimum TTL, 1.5 election timeouts), kept alive every ``leader_ttl_ms / 3``. The leader counts
itself deposed ``leader_ttl_ms`` (less a clock drift margin) after it SENT the last keep-alive
that succeeded: etcd cannot expire the lease, nor grant the key to another, before that.

aetcd opens only insecure channels to one endpoint: `EtcdClient` is its client on a channel of
ours (TLS when given); the store keeps one per endpoint and moves to the next when a call fails
for want of an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
import msgpack
from aetcd import rpc, watcher

from failover import defaults
from failover.errors import (
    ConfigError,
    LeadershipLostError,
    StorageError,
    StoreConflictError,
    StoreOutcomeUnknownError,
)
from failover.storage.store import (
    CoordinatorInfo,
    HistoryEvent,
    HistoryRecord,
    Store,
    check_address,
    check_changes,
    check_event,
    check_history_limit,
    decode_details,
)

__all__ = ["FORMAT_VERSION", "EtcdClient", "EtcdStore", "EtcdTls", "parse_endpoints"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_SEQ_DIGITS = 20  # zero-padded, so key order is seq order
_GRPC_OVERHEAD_BYTES = 512 * 1024  # etcd's gRPC receive limit is --max-request-bytes plus this
_TXN_OVERHEAD_BYTES = 4096  # etcd wraps a txn in a raft request: room for its header
# (endpoints, request_bytes_max) whose etcd took a request of that size, in this process.
_REQUEST_BYTES_CHECKED: set[tuple[tuple[str, ...], int]] = set()
_COMMIT_ATTEMPTS = 3  # a commit whose answer was lost is sent again (same id) this many times
# Failures that say nothing came back: the call may not have reached etcd, or reached a member
# that cannot answer (no quorum, stopped): another endpoint may.
_NO_ANSWER = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
})


@dataclass(frozen=True)
class EtcdTls:
    """The PEM files the store presents to etcd (``--etcd-tls-ca``, ``--etcd-tls-cert``,
    ``--etcd-tls-key``): etcd's CA certificate, and the client certificate and key etcd
    accepts (etcd's own PKI, not the failover cluster's)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_options(cls, ca: str | Path | None, cert: str | Path | None,
                     key: str | Path | None) -> EtcdTls | None:
        """All three, or None when none is given; ConfigError when only some are."""
        given = {"--etcd-tls-ca": ca, "--etcd-tls-cert": cert, "--etcd-tls-key": key}
        missing = [flag for flag, value in given.items() if not value]
        if len(missing) == len(given):
            return None
        if missing:
            raise ConfigError("TLS to etcd needs all of --etcd-tls-ca, --etcd-tls-cert and "
                              f"--etcd-tls-key: {', '.join(missing)} missing")
        return cls(Path(str(ca)), Path(str(cert)), Path(str(key)))

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials from the three files; ConfigError naming an unreadable one."""
        blobs = []
        for what, path in (("CA certificate", self.ca), ("certificate", self.cert),
                           ("key", self.key)):
            try:
                blob = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"etcd TLS {what} {path} cannot be read: {exc.strerror}") \
                    from None
            if b"-----BEGIN" not in blob:
                raise ConfigError(f"etcd TLS {what} {path} is not a PEM file")
            blobs.append(blob)
        ca, cert, key = blobs
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)


class EtcdClient(aetcd.Client):
    """aetcd's client on a channel of ours: TLS when `credentials` are given (aetcd itself
    opens only insecure channels), with our message size limits."""

    def __init__(self, endpoint: str, *, credentials: grpc.ChannelCredentials | None,
                 options: dict[str, Any]) -> None:
        host, _, port = endpoint.rpartition(":")
        super().__init__(host=host.strip("[]"), port=int(port), options=options)
        self.endpoint = endpoint
        self._credentials = credentials

    async def connect(self) -> None:
        """Opens the channel (no I/O: gRPC connects at the first call)."""
        if self._connected.is_set():
            return
        options = list(self._options.items())
        if self._credentials is not None:
            self.channel = grpc.aio.secure_channel(self.endpoint, self._credentials, options)
        else:
            self.channel = grpc.aio.insecure_channel(self.endpoint, options)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                        metadata=self.metadata)
        self._connected.set()


def parse_endpoints(text: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` as a list; ConfigError naming what is wrong."""
    endpoints = []
    for part in text.split(","):
        item = part.strip()
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 \
                or "/" in item or " " in item:
            raise ConfigError(f"etcd endpoint {item!r} is not HOST:PORT: give "
                              "etcd://HOST:PORT[,HOST:PORT...] (e.g. etcd://10.0.0.5:2379)")
        endpoints.append(item)
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"etcd endpoints {text!r} name one endpoint twice")
    return endpoints


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def _range_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)


def _get(key: bytes) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


class _Lease:
    """One etcd lease of this handle and when its last successful keep-alive was sent."""

    def __init__(self, lease_id: int, granted_ttl_s: int, sent_at: float) -> None:
        self.id = lease_id
        self.granted_ttl_s = granted_ttl_s
        self.renewed_at = sent_at  # monotonic seconds
        self.expired = False
        self.registered = False  # our members/ key is on it


class EtcdStore(Store):
    """The cluster state in etcd at `endpoints`, under ``/failover/<cluster>/``.

    `leader_ttl_ms` is the leader's lease; `history_max` bounds the history events `history`
    returns (the keys kept hold at most twice that); `txn_ops_max` and `request_bytes_max` are
    the etcd limits a commit must fit (etcd's flags at least these, checked at open).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        cluster: str = "default",
        tls: EtcdTls | None = None,
        leader_ttl_ms: int = defaults.LEADER_TTL_MS,
        history_max: int = defaults.HISTORY_EVENTS_MAX,
        txn_ops_max: int = defaults.ETCD_TXN_OPS_MAX,
        request_bytes_max: int = defaults.ETCD_REQUEST_BYTES_MAX,
        call_timeout_ms: int = defaults.ETCD_CALL_TIMEOUT_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not endpoints:
            raise ConfigError("the etcd store needs at least one endpoint HOST:PORT")
        if not cluster or "/" in cluster or not cluster.isprintable() or len(cluster) > 128:
            raise ConfigError(f"cluster name {cluster!r} must be 1 to 128 printable characters "
                              "without '/' (it names the etcd prefix /failover/<cluster>/)")
        if isinstance(leader_ttl_ms, bool) or not isinstance(leader_ttl_ms, int) or not (
                defaults.LEADER_TTL_MS_MIN <= leader_ttl_ms <= defaults.LEADER_TTL_MS_MAX):
            raise ConfigError(f"leader_ttl_ms is {leader_ttl_ms!r}: give whole milliseconds "
                              f"from {defaults.LEADER_TTL_MS_MIN} to {defaults.LEADER_TTL_MS_MAX}")
        if history_max < 1:
            raise ConfigError(f"history_max is {history_max}: keep at least one history event")
        if txn_ops_max < 8 or request_bytes_max < 2 * _GRPC_OVERHEAD_BYTES:
            raise ConfigError(f"txn_ops_max {txn_ops_max} or request_bytes_max "
                              f"{request_bytes_max} is too small for any commit")
        self.endpoints = list(endpoints)
        self.cluster = cluster
        self.tls = tls
        self.leader_ttl_ms = leader_ttl_ms
        # Whole seconds (etcd's unit), rounded up: etcd never expires the lease before the
        # leader, counting leader_ttl_ms from its last keep-alive sent, stops acting.
        self.lease_ttl_s = math.ceil(leader_ttl_ms / 1000)
        self.history_max = history_max
        self.txn_ops_max = txn_ops_max
        self.request_bytes_max = request_bytes_max
        self._call_timeout_s = call_timeout_ms / 1000
        self._clock = clock
        scheme = "etcd+tls" if tls is not None else "etcd"
        self.description = f"{scheme}://{','.join(self.endpoints)}/failover/{cluster}"
        self.prefix = f"/failover/{cluster}/".encode()
        self._leader_key = self.prefix + b"leader"
        self._meta_key = self.prefix + b"meta"
        self._state_prefix = self.prefix + b"state/"
        self._history_prefix = self.prefix + b"history/"
        self._members_prefix = self.prefix + b"members/"
        self._clients: list[EtcdClient] = []
        self._current = 0  # the endpoint calls go to; the next one after a call gets no answer
        self._opened = False
        # As of our last read or commit: meta's mod_revision (the revision) and newest seq.
        self._revision = 0
        self._seq = 0
        self._term = 0
        self._address = ""
        self._leading = False
        self._lost = asyncio.Event()
        self._lost.set()
        self.lost_reason = ""
        self._lease: _Lease | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._commit_lock = asyncio.Lock()
        self._campaign_lock = asyncio.Lock()

    # --- Store: open, close, reads -----------------------------------------------------------

    @property
    def revision(self) -> int:
        """The etcd revision of the last commit, as of this handle's last read or commit."""
        return self._revision

    @property
    def term(self) -> int:
        """The leader key's create_revision while this handle leads (the last one after)."""
        return self._term

    @property
    def lease_id(self) -> int:
        """This handle's etcd lease (0 when it has none): for operators and tests."""
        return self._lease.id if self._lease is not None else 0

    async def open(self) -> None:
        """Connects, checks etcd's limits and the store's format, reads the revision.

        Raises ConfigError when etcd allows smaller transactions or requests than this store
        needs, or holds a newer format; StorageError when no endpoint answers.
        """
        if self._opened:
            raise RuntimeError(f"{self.description} is already open")
        credentials = self.tls.credentials() if self.tls is not None else None
        options = {
            "grpc.max_send_message_length": self.request_bytes_max + 2 * _GRPC_OVERHEAD_BYTES,
            "grpc.max_receive_message_length": defaults.ETCD_RESPONSE_BYTES_MAX,
        }
        self._clients = [EtcdClient(e, credentials=credentials, options=options)
                         for e in self.endpoints]
        self._opened = True
        try:
            await self._check_limits()
            await self._read_meta()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Resigns (so another coordinator leads at once), then closes the channels."""
        if not self._opened:
            return
        with contextlib.suppress(StorageError):
            await self.resign()
        self._opened = False
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        self._clients = []

    async def load(self) -> dict[str, bytes]:
        """Every state key and value, read at one etcd revision."""
        kvs, meta = await self._read_prefix(self._state_prefix)
        self._note_meta(meta)
        start = len(self._state_prefix)
        return {kv.key[start:].decode("utf-8"): bytes(kv.value) for kv in kvs}

    async def history(
        self, service: str | None = None, limit: int = 100, kind: str | None = None
    ) -> list[HistoryRecord]:
        """The newest `limit` matching events, newest last. See `Store.history`."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"history limit {limit!r} is not a count of events (an int >= 0)")
        if limit == 0:
            return []
        found: list[HistoryRecord] = []
        end = _range_end(self._history_prefix)
        revision = 0
        cutoff = 0
        while len(found) < limit:
            rng, revision, cutoff = await self._history_page(
                self._history_prefix, end, revision, cutoff, rpc.RangeRequest.DESCEND)
            for kv in rng.kvs:
                batch = _unpack(kv.value)
                first = int(batch["first"])
                for index in reversed(range(len(batch["events"]))):
                    seq = first + index
                    svc, knd, message, details = batch["events"][index]
                    if seq < cutoff or (service is not None and svc != service) or (
                            kind is not None and knd != kind):
                        continue
                    found.append(HistoryRecord(seq=seq, at=float(batch["at"]), service=svc,
                                               kind=knd, message=message,
                                               details=decode_details(details)))
                    if len(found) == limit:
                        break
                if len(found) == limit or first <= cutoff:
                    return list(reversed(found))
            if not rng.more or not rng.kvs:
                break
            end = rng.kvs[-1].key  # the next page: keys below the last one read
        return list(reversed(found))

    async def history_after(
        self, after_seq: int, service: str | None = None, limit: int = 100
    ) -> list[HistoryRecord]:
        """The oldest `limit` matching events after `after_seq`. See `Store.history_after`.
        A batch's key is the seq of its newest event, so every batch holding an event after
        `after_seq` has a key at or above that seq + 1: one ascending range from there."""
        check_history_limit(limit)
        after_seq = max(0, int(after_seq))
        found: list[HistoryRecord] = []
        start = self._history_key(after_seq + 1)
        end = _range_end(self._history_prefix)
        revision = 0
        cutoff = 0
        while len(found) < limit:
            rng, revision, cutoff = await self._history_page(
                start, end, revision, cutoff, rpc.RangeRequest.ASCEND)
            for kv in rng.kvs:
                batch = _unpack(kv.value)
                first = int(batch["first"])
                for index, (svc, knd, message, details) in enumerate(batch["events"]):
                    seq = first + index
                    if seq <= after_seq or seq < cutoff or (
                            service is not None and svc != service):
                        continue
                    found.append(HistoryRecord(seq=seq, at=float(batch["at"]), service=svc,
                                               kind=knd, message=message,
                                               details=decode_details(details)))
                    if len(found) == limit:
                        return found
            if not rng.more or not rng.kvs:
                break
            start = rng.kvs[-1].key + b"\x00"  # the next page: keys above the last one read
        return found

    async def _history_page(self, key: bytes, end: bytes, revision: int, cutoff: int,
                            order: Any) -> tuple[Any, int, int]:
        """One page of history batches from `key` (below `end`) in `order`, read at
        `revision` (0: now), with that revision and the lowest seq still kept (`cutoff`,
        worked out from the first page's meta: older events are trimmed)."""
        request = rpc.RangeRequest(
            key=key, range_end=end, limit=defaults.ETCD_READ_PAGE_KEYS, revision=revision,
            sort_order=order, sort_target=rpc.RangeRequest.KEY)
        reply = await self._read_txn([rpc.RequestOp(request_range=request),
                                      _get(self._meta_key)], "read the history", large=True)
        if revision == 0:
            revision = reply.header.revision
            meta = reply.responses[1].response_range.kvs
            newest = _unpack(meta[0].value).get("seq", 0) if meta else 0
            cutoff = newest - self.history_max + 1
        return reply.responses[0].response_range, revision, cutoff

    # --- Store: commit -----------------------------------------------------------------------

    async def commit(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        history: Sequence[HistoryEvent] = (),
        *,
        expect_revision: int | None = None,
    ) -> list[int]:
        """One etcd transaction, fenced by this handle's term. See `Store.commit`.

        Raises LeadershipLostError when this handle does not lead (etcd refused, or its lease
        could not be renewed in time), StoreOutcomeUnknownError when no answer came back.
        """
        put_items, delete_keys = check_changes(puts, deletes)
        if not self._opened:
            raise RuntimeError(f"{self.description} is not open: call open() first")
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(
            key=self._state_prefix + key.encode(), value=value)) for key, value in put_items]
        ops += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
            key=self._state_prefix + key.encode())) for key in delete_keys]
        events = [check_event(event) for event in history]
        if len(ops) + 3 > self.txn_ops_max:
            raise ValueError(
                f"a commit of {len(ops)} state puts and deletes is above the etcd store's "
                f"limit of {self.txn_ops_max - 3} (one etcd transaction, --max-txn-ops "
                f"{self.txn_ops_max}); nothing was applied: raise both (docs/etcd.md)")
        async with self._commit_lock:
            self._check_leading()
            if not (ops or events):
                if expect_revision is not None:
                    await self._read_meta()
                    if self._revision != expect_revision:
                        raise StoreConflictError(expect_revision, self._revision)
                return []
            if expect_revision is not None and expect_revision != self._revision:
                await self._read_meta()  # our view may be old: compare with etcd's, below
            return await self._commit_locked(ops, events, expect_revision)

    async def _commit_locked(self, ops: list[rpc.RequestOp], events: list[tuple[str, str, str,
                             bytes]], expect_revision: int | None) -> list[int]:
        commit_id = secrets.token_bytes(8)  # finds this commit in meta after a lost answer
        unknown: StorageError | None = None
        lost_answer: StorageError | None = None  # an attempt whose fate etcd never told
        for _attempt in range(_COMMIT_ATTEMPTS):
            base = expect_revision if expect_revision is not None else self._revision
            seqs, request = self._commit_request(ops, events, base, commit_id)
            timeout_s = self._call_timeout_s + request.ByteSize() / \
                defaults.ETCD_COMMIT_BYTES_PER_S_MIN
            try:
                reply = await self._call(lambda c, r=request, t=timeout_s: c.kvstub.Txn(  # type: ignore[misc]
                    r, timeout=t), "commit")
            except StorageError as exc:
                unknown = lost_answer = exc
                if not self._still_leading():
                    break
                continue
            if reply.succeeded:
                self._revision, self._seq = reply.header.revision, seqs[-1] if seqs else self._seq
                return seqs
            leader_kvs = reply.responses[0].response_range.kvs
            meta_kvs = reply.responses[1].response_range.kvs
            meta = _unpack(meta_kvs[0].value) if meta_kvs else {}
            if meta.get("commit") == commit_id:  # an earlier attempt was applied after all
                self._note_meta(meta_kvs)
                return self._seqs_of(meta, len(events))
            if not leader_kvs or leader_kvs[0].create_revision != self._term:
                now = leader_kvs[0].create_revision if leader_kvs else 0
                self._lose(f"etcd refused a commit: the leader key's term is {now or 'none'}, "
                           f"not ours ({self._term})")
                if lost_answer is not None:  # that attempt may have been applied, then overwritten
                    break
                raise LeadershipLostError(
                    f"{self.description}: this coordinator (term {self._term}) no longer leads: "
                    f"{self.lost_reason}; nothing was applied: stop acting as leader")
            self._note_meta(meta_kvs)
            if expect_revision is not None:
                if lost_answer is not None:
                    break
                raise StoreConflictError(expect_revision, self._revision)
            unknown = None  # our view was old (an earlier answer was lost): again on etcd's
        if unknown is not None or lost_answer is not None:
            raise StoreOutcomeUnknownError(
                f"{self.description}: a commit got no answer from etcd "
                f"({unknown or lost_answer}); it may or may not have been applied: load the "
                "state again before deciding again")
        raise StorageError(f"{self.description}: a commit kept finding the store changed "
                           "under it; nothing was applied: load again and retry")

    def _commit_request(self, ops: list[rpc.RequestOp],
                        events: list[tuple[str, str, str, bytes]], base_revision: int,
                        commit_id: bytes) -> tuple[list[int], rpc.TxnRequest]:
        first = self._seq + 1
        seqs = list(range(first, first + len(events)))
        success = list(ops)
        newest = seqs[-1] if seqs else self._seq
        if events:
            kept = events[-self.history_max:]  # older ones would be trimmed at once
            batch = {"at": float(self._clock()), "first": newest - len(kept) + 1,
                     "events": [list(event) for event in kept]}
            success.append(rpc.RequestOp(request_put=rpc.PutRequest(
                key=self._history_key(newest), value=_pack(batch))))
            # Batches whose newest event is older than the newest history_max: one range.
            success.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=self._history_prefix, range_end=self._history_key(
                    max(newest - self.history_max + 1, 0)))))
        success.append(rpc.RequestOp(request_put=rpc.PutRequest(
            key=self._meta_key,
            value=_pack({"format": FORMAT_VERSION, "seq": newest, "commit": commit_id}))))
        request = rpc.TxnRequest(
            compare=[
                rpc.Compare(key=self._leader_key, target=rpc.Compare.CREATE,
                            result=rpc.Compare.EQUAL, create_revision=self._term),
                rpc.Compare(key=self._meta_key, target=rpc.Compare.MOD,
                            result=rpc.Compare.EQUAL, mod_revision=base_revision),
            ],
            success=success,
            failure=[_get(self._leader_key), _get(self._meta_key)],
        )
        size = request.ByteSize()
        if size > self.request_bytes_max - _TXN_OVERHEAD_BYTES:
            raise ValueError(
                f"a commit of {size} bytes is above the etcd store's request limit of "
                f"{self.request_bytes_max - _TXN_OVERHEAD_BYTES} (--max-request-bytes "
                f"{self.request_bytes_max}); nothing was applied: commit less at a time or "
                "raise both (docs/etcd.md)")
        return seqs, request

    def _seqs_of(self, meta: dict[str, Any], count: int) -> list[int]:
        newest = int(meta.get("seq", 0))
        return list(range(newest - count + 1, newest + 1)) if count else []

    def _history_key(self, seq: int) -> bytes:
        return self._history_prefix + str(seq).zfill(_SEQ_DIGITS).encode()

    # --- leadership --------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this handle leads and renewed its lease less than leader_ttl_ms ago."""
        return self._still_leading()

    async def campaign(self, address: str) -> int:
        """Registers `address` under members/ on this handle's lease, then waits until the
        leader key is vacant and takes it (a ``create_revision == 0`` transaction)."""
        self._address = check_address(address)
        if not self._opened:
            raise RuntimeError(f"{self.description} is not open: call open() first")
        async with self._campaign_lock:
            poll_s = defaults.ETCD_CAMPAIGN_POLL_MS / 1000
            try:
                while not self._still_leading():
                    try:
                        if await self._try_lead():
                            return self._term
                    except StorageError as exc:  # etcd unreachable: keep trying, as followers do
                        log.debug("%s: campaign: %s", self.description, exc)
                    await asyncio.sleep(poll_s)
            except BaseException:
                if not self._leading:
                    # Cancelled, maybe after etcd gave us the leader key and before we knew:
                    # the lease goes, and the key with it, or nobody could lead until we did.
                    self._drop_lease()
                raise
            return self._term

    async def _try_lead(self) -> bool:
        lease = await self._ensure_lease()
        value = _pack({"address": self._address})
        if not lease.registered:  # once per lease: the key lives as long as the lease
            member = rpc.PutRequest(key=self._members_prefix + self._address.encode(),
                                    value=value, lease=lease.id)
            await self._call(lambda c: c.kvstub.Put(member, timeout=self._call_timeout_s),
                             "register under members/")
            lease.registered = True
        # A plain read while someone leads: polling followers write nothing to etcd.
        reply = await self._read_txn([_get(self._leader_key)], "read the leader", tries=1)
        kvs = reply.responses[0].response_range.kvs
        if kvs and kvs[0].lease != lease.id:
            return False
        if kvs:
            term = kvs[0].create_revision  # ours already (an earlier answer was lost)
        else:
            request = rpc.TxnRequest(
                compare=[rpc.Compare(key=self._leader_key, target=rpc.Compare.CREATE,
                                     result=rpc.Compare.EQUAL, create_revision=0)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self._leader_key, value=value, lease=lease.id))],
                failure=[_get(self._leader_key)],
            )
            reply = await self._call(
                lambda c: c.kvstub.Txn(request, timeout=self._call_timeout_s), "campaign")
            if reply.succeeded:
                term = reply.header.revision  # the revision that created the leader key
            else:
                kvs = reply.responses[0].response_range.kvs
                if not kvs or kvs[0].lease != lease.id:
                    return False
                term = kvs[0].create_revision
        if lease.expired or self._lease is not lease:
            return False
        self._term = term
        self._leading = True
        self._lost = asyncio.Event()
        self.lost_reason = ""
        if not self._still_leading():  # the campaign took longer than the lease is sure
            self._lose("the lease could not be renewed in time while campaigning")
            return False
        log.info("%s: %s leads, term %d", self.description, self._address, term)
        self._spawn(self._watchdog(self._lost), "etcd-leader-watchdog")
        return True

    async def _watchdog(self, lost: asyncio.Event) -> None:
        """Loses leadership the moment the lease is no longer sure (leader_ttl_ms after the
        last successful keep-alive was sent), whatever the keep-alive calls are doing."""
        while not lost.is_set():
            lease = self._lease
            if not self._still_leading() or lease is None:
                self._lose(f"the lease was not renewed within {self.leader_ttl_ms} ms of the "
                           "last keep-alive sent (etcd unreachable?)")
                return
            deadline = lease.renewed_at + self._sure_s()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), max(0.0, deadline - time.monotonic()))

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def wait_lost(self) -> None:
        """Returns when leadership is lost: the lease not renewed within leader_ttl_ms of the
        last keep-alive sent, etcd refusing a commit, the leader key changed, or resign."""
        await self._lost.wait()

    async def resign(self) -> None:
        """Deletes the leader key if it is ours and revokes the lease (its keys go with it)."""
        lease, self._lease = self._lease, None
        was_leading = self._leading
        self._lose("resigned", logging.INFO)
        if lease is None or not self._opened:
            return
        lease.expired = True
        if was_leading:
            request = rpc.TxnRequest(
                compare=[rpc.Compare(key=self._leader_key, target=rpc.Compare.CREATE,
                                     result=rpc.Compare.EQUAL, create_revision=self._term)],
                success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self._leader_key))])
            with contextlib.suppress(StorageError):
                await self._call(lambda c: c.kvstub.Txn(request, timeout=self._call_timeout_s),
                                 "resign")
        await self._revoke(lease.id)

    async def leader(self) -> CoordinatorInfo | None:
        """The leader key's address and term, or None when it is vacant."""
        reply = await self._read_txn([_get(self._leader_key)], "read the leader")
        kvs = reply.responses[0].response_range.kvs
        if not kvs:
            return None
        return CoordinatorInfo(address=str(_unpack(kvs[0].value).get("address", "")),
                               leader=True, term=kvs[0].create_revision)

    async def coordinators(self) -> list[CoordinatorInfo]:
        """Every registered coordinator (members/ keys), the leader marked, by address."""
        members = rpc.RangeRequest(key=self._members_prefix,
                                   range_end=_range_end(self._members_prefix),
                                   limit=defaults.ETCD_READ_PAGE_KEYS)
        reply = await self._read_txn([_get(self._leader_key),
                                      rpc.RequestOp(request_range=members)], "read the members")
        leader_kvs = reply.responses[0].response_range.kvs
        leader = str(_unpack(leader_kvs[0].value).get("address", "")) if leader_kvs else None
        addresses = {str(_unpack(kv.value).get("address", ""))
                     for kv in reply.responses[1].response_range.kvs}
        if leader is not None:
            addresses.add(leader)
        return [CoordinatorInfo(address=a, leader=a == leader,
                                term=leader_kvs[0].create_revision if a == leader else 0)
                for a in sorted(addresses)]

    def _check_leading(self) -> None:
        if not self._still_leading():
            why = self.lost_reason or "it has not campaigned"
            raise LeadershipLostError(
                f"{self.description}: this coordinator does not lead ({why}); nothing was "
                "applied: campaign first")

    def _still_leading(self) -> bool:
        lease = self._lease
        if not self._leading or lease is None or lease.expired:
            return False
        return time.monotonic() < lease.renewed_at + self._sure_s()

    def _sure_s(self) -> float:
        """How long after a keep-alive was sent the lease is surely alive in etcd: leader_ttl_ms
        less the clock drift margin (etcd's clock may run a little faster than ours)."""
        return (self.leader_ttl_ms - defaults.LEASE_DRIFT_MARGIN_MS) / 1000

    def _lose(self, reason: str, level: int = logging.WARNING) -> None:
        if self._leading:
            log.log(level, "%s: %s lost leadership (term %d): %s", self.description,
                    self._address, self._term, reason)
            self.lost_reason = reason
            # A lease kept alive after the loss would keep the leader key from everyone else
            # if this coordinator never campaigned again: the next campaign takes a new one.
            self._drop_lease()
        self._leading = False
        self._lost.set()

    def _drop_lease(self) -> None:
        """Stops renewing this handle's lease and revokes it (in the background): etcd deletes
        the keys on it, the leader key if ours and our members key."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        lease.expired = True
        if self._opened:
            self._spawn(self._revoke(lease.id), f"etcd-revoke-{lease.id}")

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self._call(lambda c: c.leasestub.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease_id), timeout=self._call_timeout_s),
                "revoke the lease")
        except StorageError as exc:  # etcd expires it by itself within its TTL
            log.warning("%s: %s", self.description, exc)

    async def _ensure_lease(self) -> _Lease:
        lease = self._lease
        if lease is not None and not lease.expired:
            return lease
        sent = time.monotonic()
        reply = await self._call(lambda c: c.leasestub.LeaseGrant(
            rpc.LeaseGrantRequest(TTL=self.lease_ttl_s), timeout=self._call_timeout_s),
            "grant a lease")
        granted_s = int(reply.TTL)
        if granted_s > self.lease_ttl_s:
            log.info("%s: etcd granted a %d s lease for %d s asked (its minimum TTL): a "
                     "follower takes over that much later", self.description, granted_s,
                     self.lease_ttl_s)
        lease = _Lease(reply.ID, granted_s, sent)
        self._lease = lease
        self._spawn(self._keep_alive(lease), f"etcd-keepalive-{lease.id}")
        return lease

    async def _keep_alive(self, lease: _Lease) -> None:
        """Renews `lease` every leader_ttl_ms / 3 until it is dropped; while leading, checks the
        leader key is still ours, and loses leadership when the lease is no longer sure."""
        interval_s = self.leader_ttl_ms / 3000
        retry_s = self.leader_ttl_ms / 10_000
        while self._lease is lease and not lease.expired:
            sent = time.monotonic()
            remaining = lease.renewed_at + self._sure_s() - sent
            timeout = max(0.01, min(self._call_timeout_s, remaining)) if self._leading \
                else self._call_timeout_s
            ok = False
            try:
                ttl = await self._renew(lease.id, timeout)
                if ttl <= 0:
                    lease.expired = True
                    self._lose("etcd says our lease expired")
                    break
                lease.renewed_at = max(lease.renewed_at, sent)
                ok = True
                if self._leading:
                    await self._check_leader_key()
            except StorageError as exc:
                log.debug("%s: keep-alive: %s", self.description, exc)
            if not self._leading and time.monotonic() > lease.renewed_at + lease.granted_ttl_s:
                lease.expired = True  # surely gone in etcd: the next campaign grants another
                break
            pause = interval_s - (time.monotonic() - sent) if ok else retry_s
            await asyncio.sleep(max(0.0, pause))
        if self._lease is lease:
            self._lease = None

    async def _renew(self, lease_id: int, timeout_s: float) -> int:
        async def once(client: EtcdClient) -> int:
            stream = client.leasestub.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=timeout_s)
            async for reply in stream:
                return int(reply.TTL)
            return 0

        return await self._call(once, "renew the lease")

    async def _check_leader_key(self) -> None:
        reply = await self._read_txn([_get(self._leader_key)], "read the leader", tries=1)
        kvs = reply.responses[0].response_range.kvs
        if not kvs or kvs[0].create_revision != self._term:
            self._lose("the leader key changed or vanished")

    # --- etcd calls --------------------------------------------------------------------------

    async def _call(self, fn: Callable[[EtcdClient], Any], what: str) -> Any:
        """`fn` on the current endpoint's client; StorageError when it fails, after which the
        next call goes to the next endpoint if this one gave no answer."""
        if not self._clients:
            raise RuntimeError(f"{self.description} is not open: call open() first")
        index = self._current
        client = self._clients[index]
        try:
            await client.connect()
            return await fn(client)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _NO_ANSWER and self._current == index:
                self._current = (index + 1) % len(self._clients)
            raise _storage_error(self.description, client.endpoint, what, exc) from exc

    async def _read_txn(self, reads: list[rpc.RequestOp], what: str, *,
                        tries: int | None = None, large: bool = False) -> Any:
        """A read-only transaction (all its reads at one revision), tried on each endpoint.

        A `large` read (pages of state or history, up to ETCD_RESPONSE_BYTES_MAX) may take
        long to receive on a loaded machine: it is tried at least three times, its timeout
        doubling each time."""
        request = rpc.TxnRequest(success=reads)
        count = tries or (max(len(self.endpoints), 3) if large else len(self.endpoints))
        last: StorageError | None = None
        for attempt in range(count):
            timeout_s = self._call_timeout_s * (2 ** attempt if large else 1)
            try:
                return await self._call(
                    lambda c, t=timeout_s: c.kvstub.Txn(request, timeout=t), what)
            except StorageError as exc:
                last = exc
        assert last is not None
        raise last

    async def _read_prefix(self, prefix: bytes) -> tuple[list[Any], list[Any]]:
        """Every key under `prefix` and the meta key, in pages at the first page's revision;
        a page too large to receive is read again in smaller pages."""
        kvs: list[Any] = []
        start, end = prefix, _range_end(prefix)
        revision = 0
        meta: list[Any] = []
        page = defaults.ETCD_READ_PAGE_KEYS
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=page, revision=revision)
            try:
                reply = await self._read_txn([rpc.RequestOp(request_range=request),
                                              _get(self._meta_key)], "read the state",
                                             large=True)
            except StorageError as exc:
                if isinstance(exc.__cause__, grpc.aio.AioRpcError) and page > 1 and \
                        exc.__cause__.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    page = max(1, page // 8)
                    continue
                raise
            if revision == 0:
                revision = reply.header.revision
                meta = list(reply.responses[1].response_range.kvs)
            rng = reply.responses[0].response_range
            kvs.extend(rng.kvs)
            if not rng.more or not rng.kvs:
                return kvs, meta
            start = rng.kvs[-1].key + b"\0"

    async def _read_meta(self) -> None:
        reply = await self._read_txn([_get(self._meta_key)], "read the store's meta key")
        self._note_meta(reply.responses[0].response_range.kvs)

    def _note_meta(self, kvs: Sequence[Any]) -> None:
        if not kvs:
            self._revision, self._seq = 0, 0
            return
        meta = _unpack(kvs[0].value)
        if int(meta.get("format", 0)) > FORMAT_VERSION:
            raise ConfigError(
                f"{self.description} holds store format {meta.get('format')}, newer than this "
                f"coordinator understands ({FORMAT_VERSION}): run the newer failover-coordinator "
                "that wrote it, or use another --cluster")
        self._revision = kvs[0].mod_revision
        self._seq = int(meta.get("seq", 0))

    async def _check_limits(self) -> None:
        """ConfigError unless etcd takes transactions of txn_ops_max operations and requests
        of request_bytes_max bytes. Both probes are reads, so nothing is written."""
        never = rpc.Compare(key=self._meta_key, target=rpc.Compare.CREATE,
                            result=rpc.Compare.EQUAL, create_revision=-1)
        probe_key = self.prefix + b"probe"
        ops = [_get(probe_key)] * self.txn_ops_max
        await self._probe(rpc.TxnRequest(compare=[never], success=ops),
                          grpc.StatusCode.INVALID_ARGUMENT, "--max-txn-ops", self.txn_ops_max,
                          f"transactions of {self.txn_ops_max} operations")
        # etcd's gRPC takes messages up to --max-request-bytes plus 512 KiB. The probe (a read
        # of one long key) costs a second or so to send: one success per process suffices.
        checked = (tuple(self.endpoints), self.request_bytes_max)
        if checked in _REQUEST_BYTES_CHECKED:
            return
        target = self.request_bytes_max + _GRPC_OVERHEAD_BYTES

        def probe(key_bytes: int) -> rpc.TxnRequest:
            return rpc.TxnRequest(compare=[never], success=[rpc.RequestOp(
                request_range=rpc.RangeRequest(key=probe_key + bytes(key_bytes)))])

        # Every length prefix of a message of 2 to 256 MiB takes 4 bytes: measure the framing
        # on a 2 MiB key, then build the full-size probe once.
        framing = probe(1 << 21).ByteSize() - (1 << 21)
        big = probe(target - framing)
        await self._probe(big, grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-request-bytes",
                          self.request_bytes_max, f"requests of {self.request_bytes_max} bytes")
        _REQUEST_BYTES_CHECKED.add(checked)

    async def _probe(self, request: rpc.TxnRequest, refusal: grpc.StatusCode, flag: str,
                     needed: int, what: str) -> None:
        """`request` (reads only) on each endpoint in turn until one answers; ConfigError
        naming `flag` when etcd refuses it with `refusal`, StorageError when none answers."""
        last: StorageError | None = None
        for _ in range(len(self.endpoints)):
            index = self._current
            client = self._clients[index]
            try:
                await client.connect()
                await client.kvstub.Txn(request, timeout=self._call_timeout_s * 4)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == refusal:
                    raise ConfigError(
                        f"etcd at {self.description} refuses {what} ({exc.details()}): start "
                        f"every etcd member with {flag}={needed} or more (docs/etcd.md)"
                    ) from None
                if exc.code() not in _NO_ANSWER:
                    raise _storage_error(self.description, client.endpoint, f"check {flag}",
                                         exc) from exc
                self._current = (index + 1) % len(self._clients)
                last = _storage_error(self.description, client.endpoint, f"check {flag}", exc)
        assert last is not None
        raise last


def _storage_error(description: str, endpoint: str, what: str,
                   exc: grpc.aio.AioRpcError) -> StorageError:
    return StorageError(
        f"{description}: could not {what} on etcd {endpoint}: {exc.code().name} "
        f"{exc.details()}; check that etcd runs and has a quorum")

