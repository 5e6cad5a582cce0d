"""The coordinator's store: commits, atomicity, history, durability, ownership, store URLs."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from failover import defaults
from failover.errors import ConfigError, LeadershipLostError, StorageError, StoreConflictError
from failover.storage.sqlite_store import SCHEMA_VERSION, SqliteStore, lock_path_for
from failover.storage.store import CoordinatorInfo, HistoryRecord, Store
from failover.storage.store_url import open_store

SUBPROCESS_TIMEOUT_S = 30


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "cluster.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(db_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs `script` in a new Python process (a second coordinator, or one after a restart)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


# --- commit and load ---------------------------------------------------------------------------


async def test_commit_load_round_trip(store: SqliteStore) -> None:
    assert await store.load() == {}
    assert await store.commit({"hosts/a": b"\x81\xa1x\x01", "epoch/kv1": b"\x05"}) == []
    assert await store.load() == {"hosts/a": b"\x81\xa1x\x01", "epoch/kv1": b"\x05"}
    await store.commit({"epoch/kv1": b"\x06", "empty": b""})
    assert await store.load() == {"hosts/a": b"\x81\xa1x\x01", "epoch/kv1": b"\x06", "empty": b""}


async def test_deletes(store: SqliteStore) -> None:
    await store.commit({"a": b"1", "b": b"2", "c": b"3"})
    await store.commit({"d": b"4"}, deletes=["a", "c", "never-there"])
    assert await store.load() == {"b": b"2", "d": b"4"}
    await store.commit({}, deletes=iter(["b"]))
    assert await store.load() == {"d": b"4"}


async def test_a_key_both_put_and_deleted_is_refused(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="both put and deleted"):
        await store.commit({"a": b"1"}, deletes=["a"])
    assert await store.load() == {}


async def test_deletes_as_a_bare_string_is_refused(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="single string"):
        await store.commit({}, deletes="abc")


@pytest.mark.parametrize(
    ("puts", "problem"),
    [
        ({"": b"x"}, "empty"),
        ({"k" * (defaults.STORE_KEY_BYTES_MAX + 1): b"x"}, "above the limit"),
        ({"é" * (defaults.STORE_KEY_BYTES_MAX // 2 + 1): b"x"}, "bytes of UTF-8"),
        ({7: b"x"}, "not a str"),
        ({"k": "text"}, "not bytes"),
        ({"k": bytearray(b"x")}, "not bytes"),
        ({"k": None}, "not bytes"),
        ({"k": b"\0" * (defaults.STORE_VALUE_BYTES_MAX + 1)}, "above the limit"),
    ],
)
async def test_invalid_keys_and_values_are_named(
    store: SqliteStore, puts: dict[object, object], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        await store.commit(puts)  # type: ignore[arg-type]
    assert await store.load() == {}


async def test_largest_key_and_value_are_accepted(store: SqliteStore) -> None:
    key = "k" * defaults.STORE_KEY_BYTES_MAX
    value = b"v" * defaults.STORE_VALUE_BYTES_MAX
    await store.commit({key: value})
    assert (await store.load())[key] == value


async def test_invalid_history_events_are_named(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="cannot be encoded with msgpack"):
        await store.commit({}, history=[("kv1", "failover", "m", {"x": object()})])
    with pytest.raises(ValueError, match="not a dict"):
        await store.commit({}, history=[("kv1", "failover", "m", [1, 2])])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="tuple"):
        await store.commit({}, history=[("kv1", "failover", "m")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="service"):
        await store.commit({}, history=[(None, "failover", "m", {})])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty kind"):
        await store.commit({}, history=[("kv1", "", "m", {})])
    assert await store.history() == []


# --- atomicity ---------------------------------------------------------------------------------


async def test_a_commit_failing_midway_applies_nothing(store: SqliteStore) -> None:
    await store.commit({"keep": b"old"}, history=[("", "host", "before", {})])
    revision = store.revision
    # Valid puts and a delete come first in the transaction; the bad value is found after them.
    with pytest.raises(ValueError, match="not bytes"):
        await store.commit(
            {"keep": b"new", "fresh": b"1", "bad": "not bytes"},  # type: ignore[dict-item]
            deletes=[],
            history=[("kv1", "failover", "promoted", {"epoch": 2})],
        )
    # Puts and deletes are written before the events: an event failing last undoes them.
    with pytest.raises(ValueError, match="msgpack"):
        await store.commit(
            {"keep": b"new", "fresh": b"1"},
            deletes=["keep2"],
            history=[("kv1", "failover", "ok", {}), ("kv1", "failover", "bad", {"x": {1, 2}})],
        )
    assert await store.load() == {"keep": b"old"}
    history = await store.history()
    assert [r.message for r in history] == ["before"]
    assert store.revision == revision
    # The seq an undone event took is not skipped over: the next commit gets the next one.
    assert await store.commit({}, history=[("", "host", "after", {})]) == [history[0].seq + 1]


async def test_an_unexpected_error_inside_the_transaction_rolls_back(db_path: Path) -> None:
    def broken_clock() -> float:
        raise RuntimeError("clock broke")  # called after the puts and deletes were written

    async with SqliteStore(db_path, clock=broken_clock) as store:
        with pytest.raises(RuntimeError, match="clock broke"):
            await store.commit({"a": b"1"}, history=[("", "host", "m", {})])
        assert await store.load() == {}
        assert await store.history() == []
        assert store.revision == 0


async def test_compare_and_set_by_revision(store: SqliteStore) -> None:
    assert store.revision == 0
    await store.commit({"a": b"1"}, expect_revision=0)
    assert store.revision == 1
    with pytest.raises(StoreConflictError) as caught:
        await store.commit({"a": b"2"}, history=[("", "host", "m", {})], expect_revision=0)
    assert (caught.value.expected, caught.value.actual) == (0, 1)
    assert await store.load() == {"a": b"1"}
    assert await store.history() == []
    await store.commit({"a": b"3"}, expect_revision=1)
    assert store.revision == 2
    # A commit with nothing to apply checks the revision but does not raise it.
    assert await store.commit({}, expect_revision=2) == []
    with pytest.raises(StoreConflictError):
        await store.commit({}, expect_revision=1)
    assert store.revision == 2


async def test_concurrent_commits_all_apply_in_order(store: SqliteStore) -> None:
    results = await asyncio.gather(
        *(
            store.commit({f"k{i}": bytes([i])}, history=[("", "host", f"m{i}", {"i": i})])
            for i in range(50)
        )
    )
    seqs = [seq for r in results for seq in r]
    assert seqs == sorted(seqs) and len(set(seqs)) == 50
    assert await store.load() == {f"k{i}": bytes([i]) for i in range(50)}
    assert store.revision == 50


# --- history -----------------------------------------------------------------------------------


async def test_history_order_filters_and_limit(db_path: Path) -> None:
    clock = iter(float(t) for t in range(1000, 2000))
    async with SqliteStore(db_path, clock=lambda: next(clock)) as store:
        seqs = await store.commit(
            {"epoch/kv1": b"\x02"},
            history=[
                ("kv1", "suspicion", "primary h1 silent", {"host": "h1"}),
                ("kv1", "failover", "promoted h2", {"epoch": 2, "to": "h2", "ids": (1, 2)}),
                ("", "host", "h1 down", {}),
            ],
        )
        seqs += await store.commit({}, history=[("bank", "switchover", "to h3", {"epoch": 5})])
        seqs += await store.commit({}, history=[("kv1", "failover", "promoted h3", {})])
        assert seqs == sorted(seqs) and len(set(seqs)) == 5

        everything = await store.history()
        assert [r.seq for r in everything] == seqs  # newest last
        assert everything[1] == HistoryRecord(
            seq=seqs[1],
            at=1000.0,
            service="kv1",
            kind="failover",
            message="promoted h2",
            details={"epoch": 2, "to": "h2", "ids": [1, 2]},
        )
        assert [r.at for r in everything] == [1000.0, 1000.0, 1000.0, 1001.0, 1002.0]

        assert [r.message for r in await store.history("kv1")] == [
            "primary h1 silent",
            "promoted h2",
            "promoted h3",
        ]
        assert [r.message for r in await store.history("")] == ["h1 down"]
        assert [r.message for r in await store.history(kind="failover")] == [
            "promoted h2",
            "promoted h3",
        ]
        assert [r.message for r in await store.history("kv1", kind="suspicion")] == [
            "primary h1 silent"
        ]
        assert await store.history("nope") == []
        assert [r.seq for r in await store.history(limit=2)] == seqs[-2:]
        assert [r.message for r in await store.history("kv1", limit=1)] == ["promoted h3"]
        assert await store.history(limit=0) == []
        with pytest.raises(ValueError, match="limit"):
            await store.history(limit=-1)


async def test_history_seqs_keep_increasing_across_reopen(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        first = await store.commit({}, history=[("", "host", "a", {}), ("", "host", "b", {})])
    async with SqliteStore(db_path) as store:
        second = await store.commit({}, history=[("", "host", "c", {})])
        assert second[0] > first[-1]
        assert [r.message for r in await store.history()] == ["a", "b", "c"]


async def test_history_is_bounded(db_path: Path) -> None:
    assert defaults.HISTORY_EVENTS_MAX == 100_000
    async with SqliteStore(db_path, history_max=5) as store:
        for i in range(4):
            await store.commit({}, history=[("", "host", f"e{i}", {})])
        # One commit with more events than the bound keeps only its newest.
        await store.commit({}, history=[("", "host", f"e{i}", {}) for i in range(4, 12)])
        kept = await store.history(limit=100)
        assert [r.message for r in kept] == [f"e{i}" for i in range(7, 12)]
        # Trimming never reuses a seq.
        newest = kept[-1].seq
        assert await store.commit({}, history=[("", "host", "e12", {})]) == [newest + 1]
        assert [r.message for r in await store.history(limit=100)] == [
            f"e{i}" for i in range(8, 13)
        ]
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM history").fetchone()[0] == 5


# --- reopen, durability, ownership -------------------------------------------------------------


async def test_reopen_keeps_everything(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        assert store.term == 1
        await store.commit({"a": b"1", "b": b"2"}, history=[("kv1", "service", "created", {})])
        await store.commit({"c": b"3"}, deletes=["a"])
        history = await store.history()
    async with SqliteStore(db_path) as store:
        assert store.term == 2  # a new leadership term at every open
        assert store.revision == 2
        assert await store.load() == {"b": b"2", "c": b"3"}
        assert await store.history() == history


async def test_sqlite_is_set_up_for_durability(store: SqliteStore, db_path: Path) -> None:
    def pragmas() -> tuple[str, int, int, int]:
        conn = store._connection()
        return (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
            conn.execute("PRAGMA user_version").fetchone()[0],
            threading.get_ident(),
        )

    mode, synchronous, version, worker = await store._run(pragmas)
    assert (mode, synchronous, version) == ("wal", 2, SCHEMA_VERSION)  # 2 is FULL
    assert worker != threading.get_ident()  # the connection lives on its own thread
    with sqlite3.connect(db_path) as conn:
        indexes = [row[1] for row in conn.execute("PRAGMA index_list(history)")]
        assert "history_service_seq" in indexes


async def test_committed_state_is_read_back_by_a_new_process(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await store.commit({"epoch/kv1": b"\x07"}, history=[("kv1", "failover", "e7", {"e": 7})])
    child = run_child(
        """
        import asyncio, json, sys
        from failover.storage.sqlite_store import SqliteStore

        async def main():
            async with SqliteStore(sys.argv[1]) as store:
                state = await store.load()
                history = await store.history()
            print(json.dumps({
                "state": {k: v.hex() for k, v in state.items()},
                "history": [[r.service, r.kind, r.message, r.details] for r in history],
            }))

        asyncio.run(main())
        """,
        str(db_path),
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == {
        "state": {"epoch/kv1": "07"},
        "history": [["kv1", "failover", "e7", {"e": 7}]],
    }


async def test_a_commit_survives_the_process_dying_right_after_it(db_path: Path) -> None:
    child = run_child(
        """
        import asyncio, os, sys
        from failover.storage.sqlite_store import SqliteStore

        async def main():
            store = SqliteStore(sys.argv[1])
            await store.open()
            await store.commit({"epoch/kv1": b"\\x09"}, history=[("kv1", "failover", "e9", {})])
            os._exit(0)  # no close, no checkpoint: only what commit made durable is there

        asyncio.run(main())
        """,
        str(db_path),
    )
    assert child.returncode == 0, child.stderr
    async with SqliteStore(db_path) as store:  # the dead process's lock went with it
        assert await store.load() == {"epoch/kv1": b"\x09"}
        assert [r.message for r in await store.history()] == ["e9"]


async def test_a_second_opener_is_refused(store: SqliteStore, db_path: Path) -> None:
    child = run_child(
        """
        import asyncio, sys
        from failover.errors import ConfigError
        from failover.storage.sqlite_store import SqliteStore

        async def main():
            try:
                await SqliteStore(sys.argv[1]).open()
            except ConfigError as exc:
                print(exc)
                sys.exit(3)

        asyncio.run(main())
        """,
        str(db_path),
    )
    assert child.returncode == 3, child.stderr
    assert "another coordinator" in child.stdout
    assert "uses this data dir" in child.stdout
    assert str(lock_path_for(db_path)) in child.stdout

    with pytest.raises(ConfigError, match="another coordinator .* uses this data dir"):
        await SqliteStore(db_path).open()
    await store.commit({"still": b"mine"})  # the owner is unaffected

    await store.close()
    async with SqliteStore(db_path) as again:  # released on close
        assert await again.load() == {"still": b"mine"}


async def test_the_data_dir_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "cluster.db"
    async with SqliteStore(path) as store:
        await store.commit({"k": b"v"})
    assert path.is_file()


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await store.commit({"k": b"v"})
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        await SqliteStore(db_path).open()
    with sqlite3.connect(db_path) as conn:  # the failed open let go of the file and its lock
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    async with SqliteStore(db_path) as store:
        assert await store.load() == {"k": b"v"}


async def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="not a usable SQLite database"):
        await SqliteStore(db_path).open()


async def test_a_damaged_database_is_refused_at_open_not_at_the_first_write(
    db_path: Path,
) -> None:
    async with SqliteStore(db_path) as store:
        for batch in range(20):
            await store.commit({f"service/s{batch}-{i}": bytes(200) for i in range(20)})
    with sqlite3.connect(db_path) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'state'").fetchone()
    data = bytearray(db_path.read_bytes())
    page_bytes = int.from_bytes(data[16:18], "big")
    start = (root - 1) * page_bytes
    data[start:start + 8] = b"\x5a" * 8  # the state table's root page header: unreadable
    db_path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="integrity check failed"):
        await SqliteStore(db_path).open()


async def test_use_outside_open_is_an_error(db_path: Path) -> None:
    store = SqliteStore(db_path)
    with pytest.raises(RuntimeError, match="not open"):
        await store.load()
    await store.open()
    with pytest.raises(RuntimeError, match="already open"):
        await store.open()
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(RuntimeError, match="not open"):
        await store.commit({"k": b"v"})


# --- store URLs --------------------------------------------------------------------------------


def test_open_store_default_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    store = open_store(None, tmp_path / "dd")
    assert isinstance(store, SqliteStore) and isinstance(store, Store)
    assert store.path == tmp_path / "dd" / "cluster.db"
    assert store.description == f"sqlite://{tmp_path}/dd/cluster.db"
    assert store.description.startswith("sqlite:///")
    assert not (tmp_path / "dd").exists()  # nothing happens on disk before open


def test_open_store_absolute_sqlite_url(tmp_path: Path) -> None:
    store = open_store(f"sqlite://{tmp_path}/elsewhere/state.db", tmp_path / "dd")
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "elsewhere" / "state.db"
    assert store.description == f"sqlite://{tmp_path}/elsewhere/state.db"


def test_open_store_relative_sqlite_url_is_under_the_data_dir(tmp_path: Path) -> None:
    store = open_store("sqlite://sub/state.db", tmp_path / "dd")
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "dd" / "sub" / "state.db"


@pytest.mark.parametrize(("url", "endpoints"), [
    ("etcd://10.0.0.1:2379", ["10.0.0.1:2379"]),
    ("etcd://a:2379,b:2379", ["a:2379", "b:2379"]),
    ("ETCD://x:1", ["x:1"]),
    ("etcd://[::1]:2379", ["[::1]:2379"]),
])
def test_open_store_etcd_names_the_endpoints(url: str, endpoints: list[str],
                                             tmp_path: Path) -> None:
    from failover.storage.etcd_store import EtcdStore, EtcdTls

    tls = EtcdTls(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem")
    store = open_store(url, tmp_path, cluster="prod", etcd_tls=tls, leader_ttl_ms=3000)
    assert isinstance(store, EtcdStore)
    assert store.endpoints == endpoints
    assert store.prefix == b"/failover/prod/"
    assert (store.leader_ttl_ms, store.lease_ttl_s, store.tls) == (3000, 3, tls)
    assert store.description.startswith("etcd+tls://")
    assert open_store(url, tmp_path).lease_ttl_s == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(("url", "options", "problem"), [
    ("etcd://", {}, "names no etcd endpoints"),
    ("etcd://host", {}, "not HOST:PORT"),
    ("etcd://host:0", {}, "not HOST:PORT"),
    ("etcd://host:99999", {}, "not HOST:PORT"),
    ("etcd://a:1,,b:2", {}, "not HOST:PORT"),
    ("etcd://a:1,a:1", {}, "twice"),
    ("etcd://a:1/prefix", {}, "names no etcd endpoints"),
    ("etcd://a:1", {"cluster": "a/b"}, "cluster name"),
    ("etcd://a:1", {"cluster": ""}, "cluster name"),
    ("etcd://a:1", {"leader_ttl_ms": 100}, "leader_ttl_ms"),
    ("etcd://a:1", {"leader_ttl_ms": 10 ** 6}, "leader_ttl_ms"),
    ("etcd://a:1", {"etcd_tls": "ca.pem"}, "not EtcdTls"),
])
def test_open_store_refuses_a_bad_etcd_url_or_option(
    url: str, options: dict[str, object], problem: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=problem):
        open_store(url, tmp_path, **options)  # type: ignore[arg-type]


def test_etcd_tls_files_all_or_none(tmp_path: Path) -> None:
    from failover.storage.etcd_store import EtcdTls

    assert EtcdTls.from_options(None, None, None) is None
    with pytest.raises(ConfigError, match="--etcd-tls-key missing"):
        EtcdTls.from_options("ca", "cert", None)
    tls = EtcdTls.from_options(tmp_path / "ca", tmp_path / "cert", tmp_path / "key")
    assert tls is not None
    with pytest.raises(ConfigError, match="cannot be read"):
        tls.credentials()
    for name in ("ca", "cert", "key"):
        (tmp_path / name).write_text("not pem")
    with pytest.raises(ConfigError, match="not a PEM file"):
        tls.credentials()


@pytest.mark.parametrize(
    "url",
    ["", "cluster.db", "/abs/cluster.db", "postgres://db/x", "sqlite:/x.db", "sqlite:x.db"],
)
def test_open_store_garbage_lists_the_accepted_forms(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not understood") as caught:
        open_store(url, tmp_path)
    assert "sqlite:///ABSOLUTE/PATH" in str(caught.value)
    assert "sqlite:///DATA-DIR/cluster.db" in str(caught.value)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://dir/", "sqlite://."])
def test_open_store_sqlite_url_without_a_file(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="names no database file"):
        open_store(url, tmp_path)


async def test_open_store_result_works(tmp_path: Path) -> None:
    async with open_store(None, tmp_path / "dd") as store:
        await store.commit({"k": b"v"}, history=[("", "host", "m", {})])
        assert await store.load() == {"k": b"v"}
    assert (tmp_path / "dd" / "cluster.db").is_file()
    assert (tmp_path / "dd" / "cluster.db.lock").is_file()


# --- leadership (the lock is the leadership) ---------------------------------------------------


async def test_a_sqlite_handle_leads_from_open_and_campaign_returns_at_once(
    store: SqliteStore,
) -> None:
    assert store.leading
    assert await asyncio.wait_for(store.campaign("127.0.0.1:7000"), 1.0) == store.term
    info = CoordinatorInfo(address="127.0.0.1:7000", leader=True, term=store.term)
    assert await store.leader() == info
    assert await store.coordinators() == [info]
    waiter = asyncio.create_task(store.wait_lost())
    await asyncio.sleep(0.05)  # wait_lost must still be waiting: nothing was lost
    assert not waiter.done()
    waiter.cancel()


async def test_resign_fences_commits_and_campaign_leads_again_under_a_new_term(
    store: SqliteStore, db_path: Path
) -> None:
    term = await store.campaign("127.0.0.1:7000")
    await store.commit({"a": b"1"})
    waiter = asyncio.create_task(store.wait_lost())
    await store.resign()
    await asyncio.wait_for(waiter, 1.0)  # wait_lost returns at the resign
    await store.resign()  # idempotent
    assert not store.leading
    assert await store.leader() is None
    assert await store.coordinators() == []
    with pytest.raises(LeadershipLostError, match="resigned"):
        await store.commit({"a": b"2"}, history=[("", "host", "late", {})])
    assert await store.load() == {"a": b"1"}  # reads still work, nothing applied
    assert await store.history() == []
    await asyncio.wait_for(store.wait_lost(), 1.0)  # not leading: at once
    new_term = await store.campaign("127.0.0.1:7000")
    assert new_term == store.term > term
    await store.commit({"a": b"3"})
    await store.close()
    reopened = SqliteStore(db_path)
    await reopened.open()
    try:
        assert reopened.term > new_term  # the raised term was persisted
    finally:
        await reopened.close()


async def test_wait_lost_returns_at_close(db_path: Path) -> None:
    s = SqliteStore(db_path)
    await s.open()
    waiter = asyncio.create_task(s.wait_lost())
    await s.close()
    await asyncio.wait_for(waiter, 1.0)
    assert not s.leading


@pytest.mark.parametrize(
    "address", ["", "a/b", "x" * (defaults.COORDINATOR_ADDRESS_BYTES_MAX + 1), "a\nb", 7]
)
async def test_campaign_refuses_a_bad_address(store: SqliteStore, address: object) -> None:
    with pytest.raises(ConfigError, match="coordinator address"):
        await store.campaign(address)  # type: ignore[arg-type]
