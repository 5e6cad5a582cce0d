"""One contract for every coordinator store, run against SQLite and a real local etcd (issue 15):
compare-and-set, history order and bounds, fencing of a deposed leader, the revision after a
restart, limits, the leader and coordinators views, and wait_lost.

Where etcd cannot be had (not installed and not root), the etcd cases are skipped with the
reason printed (`pytest -ra`)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aetcd import rpc

from failover import defaults
from failover.errors import ConfigError, LeadershipLostError, StorageError, StoreConflictError
from failover.etcd_local import EtcdCluster, ensure_etcd
from failover.storage.etcd_store import EtcdStore
from failover.storage.sqlite_store import SqliteStore
from failover.storage.store import CoordinatorInfo, Store
from failover.storage.store_url import open_store

LEADER_TTL_MS = 2000  # the default: a keep-alive may be late on a loaded machine
WAIT_S = 10.0  # the longest any condition here may take before the test fails
_clusters = itertools.count()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for the module (each test takes its own key prefix)."""
    found = ensure_etcd()
    if isinstance(found, str):
        pytest.skip(f"no etcd for the etcd store tests: {found}")
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


class Backend:
    """Handles on one store; `depose` ends a handle's leadership behind its back."""

    name = ""
    two_handles = False  # several handles on the store at once (SQLite: one, by its lock)

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.handles: list[Store] = []

    def make(self, **options: Any) -> Store:
        raise NotImplementedError

    async def open(self, **options: Any) -> Store:
        store = self.make(**options)
        await store.open()
        self.handles.append(store)
        return store

    async def depose(self, store: Store) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        for store in self.handles:
            await store.close()


class SqliteBackend(Backend):
    name = "sqlite"

    def make(self, **options: Any) -> Store:
        return SqliteStore(self.tmp_path / "data" / "cluster.db", **options)

    async def depose(self, store: Store) -> None:
        await store.resign()  # the only way a SQLite handle stops leading while open


class EtcdBackend(Backend):
    name = "etcd"
    two_handles = True

    def __init__(self, tmp_path: Path, cluster: EtcdCluster) -> None:
        super().__init__(tmp_path)
        self.etcd = cluster
        self.cluster = f"contract{next(_clusters)}"

    def make(self, **options: Any) -> Store:
        return EtcdStore([m.address for m in self.etcd.members], cluster=self.cluster,
                         leader_ttl_ms=LEADER_TTL_MS, **options)

    async def depose(self, store: Store) -> None:
        """Revokes the handle's lease from another client, as etcd does when it expires."""
        assert isinstance(store, EtcdStore)
        lease_id = store.lease_id
        other = self.make()
        await other.open()
        try:
            await other._call(lambda c: c.leasestub.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease_id), timeout=5), "revoke")
        finally:
            await other.close()


@pytest.fixture(params=["sqlite", "etcd"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    chosen: Backend
    if request.param == "sqlite":
        chosen = SqliteBackend(tmp_path)
    else:
        chosen = EtcdBackend(tmp_path, request.getfixturevalue("etcd"))
    try:
        yield chosen
    finally:
        await chosen.close()


async def leader_of(backend: Backend, address: str = "127.0.0.1:7001",
                    **options: Any) -> Store:
    store = await backend.open(**options)
    await asyncio.wait_for(store.campaign(address), WAIT_S)
    assert store.leading
    return store


# --- compare-and-set ---------------------------------------------------------------------------


async def test_compare_and_set(backend: Backend) -> None:
    store = await leader_of(backend)
    r0 = store.revision
    await store.commit({"a": b"1"}, expect_revision=r0)
    r1 = store.revision
    assert r1 > r0
    with pytest.raises(StoreConflictError) as caught:
        await store.commit({"a": b"2"}, history=[("", "host", "m", {})], expect_revision=r0)
    assert (caught.value.expected, caught.value.actual) == (r0, r1)
    assert await store.load() == {"a": b"1"}
    assert await store.history() == []
    await store.commit({"a": b"3"}, deletes=["nothing"], expect_revision=r1)
    r2 = store.revision
    assert r2 > r1
    assert await store.commit({}, expect_revision=r2) == []  # checks, raises nothing
    with pytest.raises(StoreConflictError):
        await store.commit({}, expect_revision=r1)
    assert store.revision == r2
    assert await store.load() == {"a": b"3"}


async def test_concurrent_commits_all_apply_in_order(backend: Backend) -> None:
    store = await leader_of(backend)
    results = await asyncio.gather(*(
        store.commit({f"k{i}": bytes([i])}, history=[("", "host", f"m{i}", {"i": i})])
        for i in range(20)))
    seqs = [seq for r in results for seq in r]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20
    assert await store.load() == {f"k{i}": bytes([i]) for i in range(20)}
    assert [r.message for r in await store.history()] == [f"m{i}" for i in range(20)]


# --- history -----------------------------------------------------------------------------------


async def test_history_order_and_filters(backend: Backend) -> None:
    store = await leader_of(backend)
    seqs = await store.commit({"epoch/kv1": b"\x02"}, history=[
        ("kv1", "suspicion", "primary h1 silent", {"host": "h1"}),
        ("kv1", "failover", "promoted h2", {"epoch": 2, "ids": (1, 2)}),
        ("", "host", "h1 down", {}),
    ])
    seqs += await store.commit({}, history=[("bank", "switchover", "to h3", {"epoch": 5})])
    seqs += await store.commit({}, history=[("kv1", "failover", "promoted h3", {})])
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    everything = await store.history()
    assert [r.seq for r in everything] == seqs
    assert everything[1].details == {"epoch": 2, "ids": [1, 2]}
    assert [r.message for r in await store.history("kv1")] == [
        "primary h1 silent", "promoted h2", "promoted h3"]
    assert [r.message for r in await store.history("")] == ["h1 down"]
    assert [r.message for r in await store.history(kind="failover")] == [
        "promoted h2", "promoted h3"]
    assert [r.seq for r in await store.history(limit=2)] == seqs[-2:]
    assert [r.message for r in await store.history("kv1", limit=1)] == ["promoted h3"]
    assert await store.history("nope") == []
    assert await store.history(limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        await store.history(limit=-1)


async def test_history_is_bounded_and_seqs_only_grow(backend: Backend) -> None:
    store = await leader_of(backend, history_max=5)
    for i in range(4):
        await store.commit({}, history=[("", "host", f"e{i}", {})])
    # One commit with more events than the bound keeps only its newest.
    await store.commit({}, history=[("", "host", f"e{i}", {}) for i in range(4, 12)])
    kept = await store.history(limit=100)
    assert [r.message for r in kept] == [f"e{i}" for i in range(7, 12)]
    newest = kept[-1].seq
    assert await store.commit({}, history=[("", "host", "e12", {})]) == [newest + 1]
    assert [r.message for r in await store.history(limit=100)] == [f"e{i}" for i in range(8, 13)]
    assert [r.message for r in await store.history(limit=2)] == ["e11", "e12"]


async def test_history_after_a_seq_pages_oldest_first(backend: Backend) -> None:
    """A history watcher's backlog (`history_after`): the kept events after a seq, oldest
    first, a page at a time, of one service or all; trimmed ones are not returned."""
    store = await leader_of(backend, history_max=6)
    seqs = await store.commit({}, history=[("kv1", "a", "e0", {}), ("", "host", "e1", {})])
    seqs += await store.commit({}, history=[("kv1", "a", f"e{i}", {}) for i in range(2, 5)])
    seqs += await store.commit({}, history=[("bank", "a", "e5", {"n": 5})])
    assert [r.message for r in await store.history_after(0)] == [f"e{i}" for i in range(6)]
    assert [r.seq for r in await store.history_after(seqs[1])] == seqs[2:]
    assert [r.message for r in await store.history_after(seqs[0], limit=2)] == ["e1", "e2"]
    assert [r.message for r in await store.history_after(seqs[2], "kv1")] == ["e3", "e4"]
    assert [r.message for r in await store.history_after(0, "")] == ["e1"]
    assert (await store.history_after(seqs[4]))[0].details == {"n": 5}
    assert await store.history_after(seqs[-1]) == []
    await store.commit({}, history=[("kv1", "a", "e6", {}), ("kv1", "a", "e7", {})])
    assert [r.message for r in await store.history_after(0)] == [f"e{i}" for i in range(2, 8)]
    with pytest.raises(ValueError, match="limit"):
        await store.history_after(0, limit=-1)


# --- fencing -----------------------------------------------------------------------------------


async def test_a_deposed_leader_cannot_commit(backend: Backend) -> None:
    first = await leader_of(backend, "127.0.0.1:7001")
    term = first.term
    await first.commit({"k": b"1"}, history=[("", "host", "first", {})])
    await backend.depose(first)
    if backend.two_handles:
        second = await leader_of(backend, "127.0.0.1:7002")
        assert second.term > term
    with pytest.raises(LeadershipLostError):
        await first.commit({"k": b"2", "new": b"x"}, deletes=["gone"],
                           history=[("", "host", "late", {})])
    await asyncio.wait_for(first.wait_lost(), WAIT_S)
    assert not first.leading
    assert await first.load() == {"k": b"1"}  # a follower still reads; nothing applied
    assert [r.message for r in await first.history()] == ["first"]
    if backend.two_handles:
        await second.commit({"k": b"3"})
        assert await first.load() == {"k": b"3"}
    # Campaigning again leads under a new, higher term.
    if not backend.two_handles:
        assert await asyncio.wait_for(first.campaign("127.0.0.1:7001"), WAIT_S) > term


async def test_a_handle_that_never_campaigned_cannot_commit_on_a_shared_store(
    backend: Backend,
) -> None:
    store = await backend.open()
    if not backend.two_handles:
        assert store.leading  # SQLite: its lock is the leadership, from open
        return
    assert not store.leading
    with pytest.raises(LeadershipLostError, match="campaign"):
        await store.commit({"k": b"1"})
    assert await store.load() == {}
    await asyncio.wait_for(store.wait_lost(), 1.0)  # not leading: returns at once


async def test_resign_is_idempotent_and_lets_another_lead(backend: Backend) -> None:
    first = await leader_of(backend, "127.0.0.1:7001")
    await first.resign()
    await first.resign()
    assert not first.leading
    await asyncio.wait_for(first.wait_lost(), 1.0)
    with pytest.raises(LeadershipLostError):
        await first.commit({"k": b"1"})
    if backend.two_handles:
        start = time.monotonic()
        second = await leader_of(backend, "127.0.0.1:7002")
        assert time.monotonic() - start < LEADER_TTL_MS / 1000  # no lease to wait out
        assert second.term > first.term


# --- restart -----------------------------------------------------------------------------------


async def test_revision_state_and_history_survive_a_restart(backend: Backend) -> None:
    store = await leader_of(backend)
    first = await store.commit({"a": b"1", "b": b"2"}, history=[("kv1", "service", "made", {})])
    await store.commit({"c": b"3"}, deletes=["a"])
    revision, history = store.revision, await store.history()
    await store.close()
    backend.handles.remove(store)
    again = await leader_of(backend)
    assert again.revision == revision
    assert await again.load() == {"b": b"2", "c": b"3"}
    assert again.revision == revision
    assert await again.history() == history
    await again.commit({}, expect_revision=revision)
    assert (await again.commit({}, history=[("", "host", "after", {})]))[0] > first[0]


# --- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("puts", "deletes", "problem"), [
    ({"": b"x"}, [], "empty"),
    ({"k" * (defaults.STORE_KEY_BYTES_MAX + 1): b"x"}, [], "above the limit"),
    ({7: b"x"}, [], "not a str"),
    ({"k": "text"}, [], "not bytes"),
    ({"k": b"\0" * (defaults.STORE_VALUE_BYTES_MAX + 1)}, [], "above the limit"),
    ({"k": b"1"}, ["k"], "both put and deleted"),
    ({}, "k", "single string"),
])
async def test_invalid_commits_are_refused_whole(
    backend: Backend, puts: dict[Any, Any], deletes: Any, problem: str
) -> None:
    store = await leader_of(backend)
    await store.commit({"keep": b"old"})
    with pytest.raises(ValueError, match=problem):
        await store.commit({"keep": b"new", **puts}, deletes=deletes,
                           history=[("", "host", "m", {})])
    assert await store.load() == {"keep": b"old"}
    assert await store.history() == []


async def test_the_largest_key_and_value_are_accepted(backend: Backend) -> None:
    store = await leader_of(backend)
    key = "k" * defaults.STORE_KEY_BYTES_MAX
    value = b"v" * defaults.STORE_VALUE_BYTES_MAX
    await store.commit({key: value})
    assert (await store.load())[key] == value


# --- who leads ---------------------------------------------------------------------------------


async def test_leader_and_coordinators_views(backend: Backend) -> None:
    first = await leader_of(backend, "127.0.0.1:7001")
    me = CoordinatorInfo("127.0.0.1:7001", leader=True, term=first.term)
    assert await first.leader() == me
    if not backend.two_handles:
        assert await first.coordinators() == [me]
        return
    follower = await backend.open()
    assert await follower.leader() == me
    campaign = asyncio.create_task(follower.campaign("127.0.0.1:7002"))
    expected = [me, CoordinatorInfo("127.0.0.1:7002", leader=False, term=0)]
    deadline = time.monotonic() + WAIT_S
    while await follower.coordinators() != expected:  # the follower registers as it campaigns
        assert time.monotonic() < deadline, await follower.coordinators()
        await asyncio.sleep(0.02)
    assert not campaign.done()  # it waits while the leader leads
    # ... reading the leader key, writing nothing: etcd's revision stands still meanwhile.
    assert isinstance(follower, EtcdStore)
    before = (await follower._read_txn([], "revision")).header.revision
    await asyncio.sleep(defaults.ETCD_CAMPAIGN_POLL_MS * 5 / 1000)  # about five polls
    assert (await follower._read_txn([], "revision")).header.revision == before
    await first.resign()
    term = await asyncio.wait_for(campaign, WAIT_S)
    assert await first.leader() == CoordinatorInfo("127.0.0.1:7002", leader=True, term=term)
    assert await follower.coordinators() == [
        CoordinatorInfo("127.0.0.1:7002", leader=True, term=term)]  # the resigned one left


async def test_a_cancelled_campaign_leaves_the_handle_not_leading(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    backend = EtcdBackend(tmp_path, etcd)  # SQLite campaigns at once: nothing to cancel
    try:
        await leader_of(backend, "127.0.0.1:7001")
        other = await backend.open()
        campaign = asyncio.create_task(other.campaign("127.0.0.1:7002"))
        await asyncio.sleep(0.1)  # let it reach its wait for the vacant key
        campaign.cancel()
        with pytest.raises(asyncio.CancelledError):
            await campaign
        assert not other.leading
        # Its lease is given up (had etcd granted it the leader key unbeknownst, the key goes
        # too): it no longer shows among the coordinators.
        assert isinstance(other, EtcdStore) and other.lease_id == 0
        deadline = time.monotonic() + WAIT_S
        while len(await other.coordinators()) != 1:
            assert time.monotonic() < deadline, await other.coordinators()
            await asyncio.sleep(0.02)
    finally:
        await backend.close()


# --- wait_lost ---------------------------------------------------------------------------------


async def test_wait_lost_fires_when_the_lease_is_gone(backend: Backend) -> None:
    store = await leader_of(backend)
    waiter = asyncio.create_task(store.wait_lost())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    start = time.monotonic()
    await backend.depose(store)
    await asyncio.wait_for(waiter, LEADER_TTL_MS / 1000 + 0.5)
    assert time.monotonic() - start <= LEADER_TTL_MS / 1000 + 0.5
    assert not store.leading


async def test_wait_lost_fires_within_the_ttl_when_etcd_stops_answering(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    backend = EtcdBackend(tmp_path, etcd)
    try:
        store = await leader_of(backend)
        await store.commit({"k": b"1"})
        member = etcd.members[0]
        member.pause()
        try:
            paused_at = time.monotonic()
            await asyncio.wait_for(store.wait_lost(), LEADER_TTL_MS / 1000 + 1.0)
            lost_after_s = time.monotonic() - paused_at
            assert lost_after_s <= LEADER_TTL_MS / 1000, lost_after_s
            with pytest.raises(LeadershipLostError):
                await store.commit({"k": b"2"})
        finally:
            member.resume()
        etcd.wait_healthy()
        assert await asyncio.wait_for(store.campaign("127.0.0.1:7001"), WAIT_S) > 0
        await store.commit({"k": b"3"})
        assert await store.load() == {"k": b"3"}
    finally:
        await backend.close()


async def test_etcd_itself_refuses_a_stale_leader(etcd: EtcdCluster, tmp_path: Path) -> None:
    """A leader paused mid-term (its own clock has not run out yet) whose lease etcd dropped:
    its commit reaches etcd, which refuses it by the leader key's create_revision."""
    backend = EtcdBackend(tmp_path, etcd)
    try:
        stale = await leader_of(backend, "127.0.0.1:7001")
        assert isinstance(stale, EtcdStore)
        for task in list(stale._background):  # as if its process were paused: no keep-alives
            task.cancel()
        await backend.depose(stale)
        fresh = await leader_of(backend, "127.0.0.1:7002")
        assert stale.leading  # it cannot know yet: only etcd can stop it
        with pytest.raises(LeadershipLostError, match="etcd refused"):
            await stale.commit({"k": b"stale"}, history=[("", "host", "stale", {})])
        assert not stale.leading
        assert await fresh.load() == {}
        assert await fresh.history() == []
    finally:
        await backend.close()


# --- etcd's limits -----------------------------------------------------------------------------


async def test_a_commit_beyond_etcds_transaction_limit_is_refused_whole(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    backend = EtcdBackend(tmp_path, etcd)
    try:
        store = await leader_of(backend, txn_ops_max=64)
        with pytest.raises(ValueError, match="--max-txn-ops"):
            await store.commit({f"k{i}": b"x" for i in range(62)})
        assert await store.load() == {}
        await store.commit({f"k{i}": b"x" for i in range(61)})
        assert len(await store.load()) == 61
    finally:
        await backend.close()


async def test_an_etcd_with_smaller_limits_is_refused_at_open(tmp_path: Path) -> None:
    found = ensure_etcd()
    if isinstance(found, str):
        pytest.skip(f"no etcd for the etcd store tests: {found}")
    with EtcdCluster(tmp_path / "small", txn_ops_max=128, request_bytes_max=1 << 20) as small:
        store = open_store(small.url, tmp_path, cluster="small")
        with pytest.raises(ConfigError, match="--max-txn-ops=16384"):
            await store.open()
        store = EtcdStore([small.members[0].address], txn_ops_max=128,
                          request_bytes_max=2 << 20)
        with pytest.raises(ConfigError, match=f"--max-request-bytes={2 << 20}"):
            await store.open()
        store = EtcdStore([small.members[0].address], txn_ops_max=128,
                          request_bytes_max=1 << 20)
        await store.open()  # within etcd's limits
        await store.close()


# --- TLS ---------------------------------------------------------------------------------------


async def test_the_store_speaks_mutual_tls_to_etcd(tmp_path: Path) -> None:
    found = ensure_etcd()
    if isinstance(found, str):
        pytest.skip(f"no etcd for the etcd store tests: {found}")
    with EtcdCluster(tmp_path / "tls", tls=True) as secure:
        assert secure.client_tls is not None
        assert secure.members[0].client_url.startswith("https://")
        store = open_store(secure.url, tmp_path, cluster="tls", etcd_tls=secure.client_tls,
                           leader_ttl_ms=LEADER_TTL_MS)
        assert store.description.startswith("etcd+tls://")
        await store.open()
        try:
            term = await asyncio.wait_for(store.campaign("127.0.0.1:7001"), WAIT_S)
            await store.commit({"k": b"1"}, history=[("", "host", "over tls", {})])
            assert await store.load() == {"k": b"1"}
            assert await store.leader() == CoordinatorInfo("127.0.0.1:7001", True, term)
        finally:
            await store.close()
        # Without a certificate etcd answers nothing: the store cannot open.
        plain = EtcdStore([secure.members[0].address], cluster="tls", call_timeout_ms=500)
        with pytest.raises(StorageError, match="could not"):
            await plain.open()
