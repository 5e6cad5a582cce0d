"""Snapshot files: round trip, every kind of damage detected, atomic writes, the store."""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from demo_services.bank import BankService
from demo_services.kv import KvService
from failover import defaults
from failover.errors import SnapshotCorruptError
from failover.service import ServiceKind
from failover.storage.snapshot import (
    SnapshotHeader,
    SnapshotStore,
    iter_chunks,
    iter_compressed_chunks,
    load_snapshot,
    read_header,
    snapshot_name,
    verify_snapshot,
    write_compressed_snapshot,
    write_snapshot,
)


class BlobKind(ServiceKind):
    """A minimal kind whose snapshot is several small chunks, so damage can hit each one."""

    name = "blob"
    version = 2

    def __init__(self, parts: Iterable[bytes] = ()) -> None:
        self.parts = list(parts)

    def apply(self, command: dict) -> dict:
        self.parts.append(command["data"])
        return {"ok": True}

    def query(self, request: dict) -> dict:
        return {"ok": True, "parts": list(self.parts)}

    def snapshot(self) -> Iterator[bytes]:
        return iter(list(self.parts))

    def restore(self, chunks: Iterable[bytes]) -> None:
        self.parts = list(chunks)  # collected whole before replacing, like the demo kinds

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=32)
        for part in self.parts:
            h.update(struct.pack("<Q", len(part)) + part)
        return h.digest()


def _blob() -> BlobKind:
    return BlobKind([b"alpha" * 5, b"", b"gamma-gamma", b"\x00" * 40])


def _bank() -> BankService:
    bank = BankService()
    for name, balance in (("ann", 10), ("bob", 0), ("cy", 99)):
        bank.apply({"op": "open", "account": name, "balance": balance})
    bank.apply({"op": "transfer", "from": "cy", "to": "bob", "amount": 9})
    return bank


def _save(directory: Path, kind: ServiceKind, index: int = 5, epoch: int = 2) -> Path:
    return SnapshotStore(directory).save_kind(
        kind, applied_index=index, epoch=epoch, extra={"history": [[1, 0], [2, 3]]}
    )


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_blob, _bank], ids=["blob", "bank"])
def test_round_trip(tmp_path: Path, make) -> None:
    kind = make()
    path = _save(tmp_path, kind, index=42, epoch=3)
    assert path.name == snapshot_name(42) == "snap-00000000000000000042.fsnap"
    header = read_header(path)
    chunks = list(kind.snapshot())
    assert header == SnapshotHeader(
        kind=kind.name,
        kind_version=kind.version,
        applied_index=42,
        epoch=3,
        digest=kind.digest(),
        raw_bytes=sum(map(len, chunks)),
        extra={"history": [[1, 0], [2, 3]]},
    )
    assert list(iter_chunks(path)) == chunks  # chunk boundaries survive
    assert verify_snapshot(path) == header
    fresh = type(kind)()
    assert load_snapshot(path, fresh) == header
    assert fresh.digest() == kind.digest()


def test_kv_round_trip_spans_several_chunks(tmp_path: Path) -> None:
    kv = KvService()
    big = bytes(range(256)) * 1024  # 256 KiB per value: the arena passes one chunk
    for i in range(6):
        kv.apply({"op": "put", "key": f"k{i}", "value": big + bytes([i])})
    path = _save(tmp_path, kv)
    assert len(list(iter_compressed_chunks(path))) > 2
    fresh = KvService()
    load_snapshot(path, fresh)
    assert fresh.digest() == kv.digest()
    assert fresh.query({"op": "get", "key": "k3"})["value"] == big + b"\x03"


def test_compressed_frames_install_without_recompression(tmp_path: Path) -> None:
    kind = _blob()
    source = _save(tmp_path / "a", kind)
    header = read_header(source)
    installed = write_compressed_snapshot(tmp_path / "b", header, iter_compressed_chunks(source))
    assert installed.read_bytes() == source.read_bytes()
    fresh = BlobKind()
    load_snapshot(installed, fresh)
    assert fresh.parts == kind.parts


def test_shipped_snapshot_with_wrong_raw_size_is_refused(tmp_path: Path) -> None:
    source = _save(tmp_path / "a", _blob())
    header = read_header(source)
    frames = list(iter_compressed_chunks(source))
    lying = SnapshotHeader(**{**header.__dict__, "raw_bytes": header.raw_bytes + 1})
    with pytest.raises(SnapshotCorruptError, match="raw bytes"):
        write_compressed_snapshot(tmp_path / "b", lying, frames)
    with pytest.raises(ValueError, match="lz4"):
        write_compressed_snapshot(tmp_path / "b", header, [b"not an lz4 frame"])
    assert list((tmp_path / "b").iterdir()) == []  # nothing, not even a temp file


def test_empty_state_round_trips(tmp_path: Path) -> None:
    path = _save(tmp_path, BlobKind())
    fresh = BlobKind([b"old"])
    load_snapshot(path, fresh)
    assert fresh.parts == [] and read_header(path).raw_bytes == 0


# --- damage --------------------------------------------------------------------------------


_TRAILER_BYTES = 1 + 8 + 8 + 4 + 8 + 4  # tag, count, raw bytes, chunks CRC, end magic, CRC


def _regions(path: Path) -> dict[str, range]:
    data = path.read_bytes()
    (body_len,) = struct.unpack_from("<I", data, 8)
    header_end = 8 + 4 + body_len + 4
    trailer_start = len(data) - _TRAILER_BYTES
    return {
        "header": range(0, header_end),
        "chunk": range(header_end, trailer_start),
        "trailer": range(trailer_start, len(data)),
    }


def _assert_refused(path: Path, make) -> None:
    with pytest.raises(SnapshotCorruptError):
        verify_snapshot(path)
    fresh = type(make())()
    before = fresh.digest()
    with pytest.raises(SnapshotCorruptError):
        load_snapshot(path, fresh)
    assert fresh.digest() == before  # not loaded, not even partly


@pytest.mark.parametrize("region", ["header", "chunk", "trailer"])
@pytest.mark.parametrize("make", [_blob, _bank], ids=["blob", "bank"])
def test_every_flipped_byte_is_detected(tmp_path: Path, make, region: str) -> None:
    path = _save(tmp_path, make())
    good = path.read_bytes()
    positions = _regions(path)[region]
    assert len(positions) > 0
    for pos in positions:
        damaged = bytearray(good)
        damaged[pos] ^= 0x40
        path.write_bytes(damaged)
        _assert_refused(path, make)


@pytest.mark.parametrize("make", [_blob, _bank], ids=["blob", "bank"])
def test_every_truncation_is_detected(tmp_path: Path, make) -> None:
    path = _save(tmp_path, make())
    good = path.read_bytes()
    for size in range(len(good)):
        path.write_bytes(good[:size])
        _assert_refused(path, make)


def test_bytes_after_the_trailer_are_damage(tmp_path: Path) -> None:
    path = _save(tmp_path, _blob())
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(SnapshotCorruptError, match="follow the trailer"):
        verify_snapshot(path)


def test_reordered_chunks_are_caught_by_the_trailer(tmp_path: Path) -> None:
    # Two chunks of equal length and valid CRCs, swapped: only the trailer can tell.
    kind = BlobKind([b"first-part", b"other-part"])
    path = _save(tmp_path, kind)
    data = path.read_bytes()
    start = _regions(path)["chunk"].start
    record = (len(data) - start - _TRAILER_BYTES) // 2
    a, b = data[start : start + record], data[start + record : start + 2 * record]
    path.write_bytes(data[:start] + b + a + data[start + 2 * record :])
    with pytest.raises(SnapshotCorruptError, match="reordered"):
        load_snapshot(path, BlobKind())


def test_oversized_chunk_length_is_damage_not_an_allocation(tmp_path: Path) -> None:
    path = _save(tmp_path, _blob())
    data = bytearray(path.read_bytes())
    start = _regions(path)["chunk"].start
    struct.pack_into("<I", data, start + 1, defaults.SNAPSHOT_CHUNK_BYTES_MAX * 2)
    path.write_bytes(data)
    with pytest.raises(SnapshotCorruptError, match="bound"):
        verify_snapshot(path)


def test_digest_mismatch_is_refused(tmp_path: Path) -> None:
    kind = _blob()
    path = write_snapshot(
        tmp_path,
        kind="blob",
        kind_version=2,
        applied_index=1,
        epoch=1,
        digest=b"\x00" * 32,
        chunks=kind.snapshot(),
    )
    verify_snapshot(path)  # the file itself is intact
    with pytest.raises(SnapshotCorruptError, match="digest"):
        load_snapshot(path, BlobKind())


def test_wrong_kind_and_newer_version_are_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, _bank())
    with pytest.raises(SnapshotCorruptError, match="holds kind 'bank', not 'kv'"):
        load_snapshot(path, KvService())

    class OldBlob(BlobKind):
        version = 1

    newer = _save(tmp_path / "n", _blob())
    with pytest.raises(SnapshotCorruptError, match="version 2"):
        load_snapshot(newer, OldBlob())


def test_failing_restore_is_reported_as_damage(tmp_path: Path) -> None:
    path = _save(tmp_path, _blob())

    class Picky(BlobKind):
        def restore(self, chunks: Iterable[bytes]) -> None:
            raise RuntimeError("nope")

    with pytest.raises(SnapshotCorruptError, match="RuntimeError: nope"):
        load_snapshot(path, Picky())


def test_load_into_a_state_machine_like_object(tmp_path: Path) -> None:
    # The agent passes an object with only restore() and digest(): no name or version.
    kind = _bank()
    path = _save(tmp_path, kind)

    class View:
        def __init__(self) -> None:
            self.inner = BankService()

        def restore(self, chunks: Iterable[bytes]) -> None:
            self.inner.restore(chunks)

        def digest(self) -> bytes:
            return self.inner.digest()

    view = View()
    load_snapshot(path, view)
    assert view.inner.digest() == kind.digest()


# --- atomic writes and the store -----------------------------------------------------------


def test_write_leaves_no_temp_files(tmp_path: Path) -> None:
    _save(tmp_path, _blob(), index=1)
    _save(tmp_path, _blob(), index=1)  # same index again: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot_name(1)]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"part"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        write_snapshot(
            tmp_path, kind="blob", kind_version=1, applied_index=3, epoch=1,
            digest=b"", chunks=chunks(),
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="bound"):
        write_snapshot(
            tmp_path, kind="blob", kind_version=1, applied_index=3, epoch=1, digest=b"",
            chunks=[bytes(defaults.SNAPSHOT_CHUNK_BYTES_MAX + 1)],
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_store_removes_leftover_temp_files(tmp_path: Path) -> None:
    (tmp_path / ".snap-crashed.tmp").write_bytes(b"half")
    SnapshotStore(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_latest_skips_a_damaged_newest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SnapshotStore(tmp_path)
    assert store.latest() is None
    older = store.save_kind(_bank(), applied_index=10, epoch=1)
    newest = store.save_kind(_bank(), applied_index=20, epoch=1)
    assert store.latest() == newest
    data = bytearray(newest.read_bytes())
    data[-10] ^= 1
    newest.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        assert store.latest() == older
    assert "skipping damaged snapshot" in caplog.text and newest.name in caplog.text
    newest.write_bytes(b"")
    assert store.latest() == older


def test_store_save_takes_a_header(tmp_path: Path) -> None:
    kind = _bank()
    store = SnapshotStore(tmp_path)
    header = SnapshotHeader(
        kind="bank", kind_version=1, applied_index=9, epoch=4, digest=kind.digest(),
        raw_bytes=0, extra={"history": [[4, 1]]},
    )  # fmt: skip
    path = store.save(header, list(kind.snapshot()))
    assert read_header(path).raw_bytes == sum(map(len, kind.snapshot()))
    assert store.latest() == path


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    paths = [store.save_kind(_blob(), applied_index=i, epoch=1) for i in (1, 2, 3, 4)]
    paths[3].write_bytes(b"garbage")  # damaged newest: kept for an operator, not counted
    deleted = store.prune(keep=2)
    assert sorted(deleted) == [paths[0]]
    assert store.paths() == [paths[3], paths[2], paths[1]]
    assert store.latest() == paths[2]
    with pytest.raises(ValueError):
        store.prune(keep=0)
