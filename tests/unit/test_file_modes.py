"""What storage creates is the daemon user's alone (issue 13, item 7): directories 0700 and
files 0600 (logs, metas, snapshots, cluster.db and its -wal/-shm, the lock, atomic writes),
whatever the umask; an existing directory keeps its mode."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo_services.bank import BankService
from failover.storage.atomic import write_atomic
from failover.storage.modes import make_private_dir, open_private, write_private_file
from failover.storage.records import Entry
from failover.storage.snapshot import SnapshotStore
from failover.storage.sqlite_store import SqliteStore
from failover.storage.wal import META_NAME, WriteAheadLog


@pytest.fixture(params=[0o022, 0o000, 0o277], ids=["umask022", "umask000", "umask277"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private_tree(root: Path) -> None:
    """`root` and everything under it: directories 0700, files 0600."""
    seen = [root, *root.rglob("*")]
    assert len(seen) > 1
    for path in seen:
        want = 0o700 if path.is_dir() else 0o600
        assert mode(path) == want, f"{path} is {mode(path):o}, want {want:o}"


def test_make_private_dir_makes_every_missing_level_0700(tmp_path: Path, umask: int) -> None:
    make_private_dir(tmp_path / "a" / "b" / "c")
    assert_private_tree(tmp_path / "a")
    make_private_dir(tmp_path / "a" / "b" / "c")  # exists: fine


def test_make_private_dir_leaves_an_existing_dir_as_it_is(tmp_path: Path, umask: int) -> None:
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    os.chmod(chosen, 0o755)
    make_private_dir(chosen / "data")
    assert mode(chosen) == 0o755
    assert mode(chosen / "data") == 0o700


def test_make_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        make_private_dir(tmp_path / "f")


def test_private_files_are_0600(tmp_path: Path, umask: int) -> None:
    write_private_file(tmp_path / "key", b"secret")
    assert (tmp_path / "key").read_bytes() == b"secret"
    assert mode(tmp_path / "key") == 0o600
    with pytest.raises(FileExistsError):
        write_private_file(tmp_path / "key", b"other")
    assert (tmp_path / "key").read_bytes() == b"secret"
    os.close(open_private(tmp_path / "lock", os.O_RDWR))
    assert mode(tmp_path / "lock") == 0o600


def test_open_private_keeps_the_mode_of_a_file_with_content(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.write_bytes(b"data")
    os.chmod(old, 0o640)
    os.close(open_private(old, os.O_RDWR))
    assert mode(old) == 0o640


def test_write_atomic_is_0600(tmp_path: Path, umask: int) -> None:
    write_atomic(tmp_path / "meta", b"one")
    write_atomic(tmp_path / "meta", b"two")
    assert (tmp_path / "meta").read_bytes() == b"two"
    assert mode(tmp_path / "meta") == 0o600


def test_wal_dir_segments_and_meta_are_private(tmp_path: Path, umask: int) -> None:
    directory = tmp_path / "replica" / "wal"
    log = WriteAheadLog.open(directory, segment_bytes_max=1024)
    try:
        for index in range(1, 60):
            log.append([Entry(1 + index // 20, index, b"", b"x" * 40)])
    finally:
        log.close()
    names = {p.name for p in directory.iterdir()}
    assert META_NAME in names
    assert len([n for n in names if n.endswith(".wal")]) > 1
    assert_private_tree(tmp_path / "replica")


def test_snapshots_are_private(tmp_path: Path, umask: int) -> None:
    bank = BankService()
    bank.apply({"op": "open", "account": "ann", "balance": 10})
    path = SnapshotStore(tmp_path / "replica" / "snapshots").save_kind(
        bank, applied_index=3, epoch=1)
    assert path.exists()
    assert_private_tree(tmp_path / "replica")


async def test_cluster_db_and_its_companions_are_private(tmp_path: Path, umask: int) -> None:
    store = SqliteStore(tmp_path / "data" / "cluster.db")
    await store.open()
    try:
        await store.commit({"hosts/a": b"x"})
        names = {p.name for p in (tmp_path / "data").iterdir()}
        assert {"cluster.db", "cluster.db-wal"} <= names, names
        assert_private_tree(tmp_path / "data")
    finally:
        await store.close()
    assert_private_tree(tmp_path / "data")
