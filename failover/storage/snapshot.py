"""Snapshot files: a service's whole state at one applied index, checked end to end.

File layout (integers little-endian)::

    magic      8 bytes  b"FOSNAP\\x00\\x01" (format 1)
    header     u32 body length | body | u32 CRC32C(magic, length, body)
               body = u64 applied_index, u64 epoch, u64 raw_bytes, u32 kind_version,
                      then msgpack {"kind": str, "digest": bytes, "extra": map}
    chunk*     b"C" | u32 compressed length | u32 raw length | u32 CRC32C | one lz4 frame
               (the CRC covers the tag, both lengths and the frame)
    trailer    b"T" | u64 chunk count | u64 raw bytes | u32 CRC32C of every chunk record in
               order | b"FOSNAPND" | u32 CRC32C of the trailer's preceding bytes
    end of file

The per-chunk CRCs catch damage inside a chunk; the trailer catches lost, duplicated or
reordered chunks and truncation; bytes after the trailer are damage too. A length above
`defaults.SNAPSHOT_CHUNK_BYTES_MAX` is damage, never an allocation.

Chunks are stored as the lz4 frames they are shipped as (`iter_compressed_chunks`), so sending
a snapshot to a duplica and installing it there recompresses nothing. The duplica writes the
frames and restores them as they arrive (`ShippedSnapshot`), each decompressed once.
A file is written under a temporary name in its directory, fsynced, renamed into place and the
directory fsynced: a crash leaves the old file set or the new one, never half a file under a
snapshot name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import crc32c
import lz4.frame
import msgpack

from failover import defaults
from failover.errors import SnapshotCorruptError
from failover.service import ServiceKind
from failover.storage.modes import FILE_MODE, make_private_dir

__all__ = [
    "Restorable",
    "ShippedSnapshot",
    "SnapshotHeader",
    "SnapshotStore",
    "iter_chunks",
    "iter_compressed_chunks",
    "load_snapshot",
    "read_header",
    "snapshot_name",
    "verify_snapshot",
    "write_compressed_snapshot",
    "write_snapshot",
]

log = logging.getLogger(__name__)

MAGIC = b"FOSNAP\x00\x01"
_END_MAGIC = b"FOSNAPND"
_U32 = struct.Struct("<I")
_FIXED = struct.Struct("<QQQI")  # applied_index, epoch, raw_bytes, kind_version
_CHUNK_HEAD = struct.Struct("<cIII")  # tag, compressed length, raw length, CRC32C
_TRAILER = struct.Struct("<cQQI8s")  # tag, chunk count, raw bytes, chunks CRC, end magic
_CHUNK_RAW_MAX = defaults.SNAPSHOT_CHUNK_BYTES_MAX
# lz4 can expand incompressible input a little (LZ4_compressBound: n + n/255 + 16) plus its
# frame header and end mark; a compressed length above this bound cannot be ours.
_CHUNK_COMPRESSED_MAX = _CHUNK_RAW_MAX + _CHUNK_RAW_MAX // 255 + 1024
_HEADER_BODY_MAX = defaults.SNAPSHOT_CHUNK_BYTES_MAX
_NAME = re.compile(r"^snap-(\d{20})\.fsnap$")
_TEMP_PREFIX = ".snap-"
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class SnapshotHeader:
    """What a snapshot file says about itself.

    `digest` is the kind's `digest()` of the state; `raw_bytes` the total size of the kind's
    chunks before compression; `extra` the framework's own fields (such as the epoch
    history), msgpack-able, coming back with lists where tuples went in.
    """

    kind: str
    kind_version: int
    applied_index: int
    epoch: int
    digest: bytes
    raw_bytes: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


def snapshot_name(applied_index: int) -> str:
    """The file name of the snapshot at `applied_index` (sorts by index)."""
    return f"snap-{applied_index:020d}.fsnap"


# --- writing -------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_header(header: SnapshotHeader) -> bytes:
    for name, bits in (
        ("kind_version", 32),
        ("applied_index", 64),
        ("epoch", 64),
        ("raw_bytes", 64),
    ):
        value = getattr(header, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
            raise ValueError(f"snapshot {name} must be an int in [0, 2**{bits}), got {value!r}")
    if not isinstance(header.kind, str) or not header.kind:
        raise ValueError(f"snapshot kind must be a non-empty str, got {header.kind!r}")
    if not isinstance(header.digest, bytes):
        raise ValueError(f"snapshot digest must be bytes, got {type(header.digest).__name__}")
    body = _FIXED.pack(
        header.applied_index, header.epoch, header.raw_bytes, header.kind_version
    ) + msgpack.packb(
        {"kind": header.kind, "digest": header.digest, "extra": dict(header.extra)},
        use_bin_type=True,
    )
    if len(body) > _HEADER_BODY_MAX:
        raise ValueError(f"snapshot header of {len(body)} bytes passes {_HEADER_BODY_MAX}")
    head = MAGIC + _U32.pack(len(body)) + body
    return head + _U32.pack(crc32c.crc32c(head))


def _compress_all(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, int]]:
    for chunk in chunks:
        if len(chunk) > _CHUNK_RAW_MAX:
            raise ValueError(
                f"a snapshot chunk of {len(chunk)} bytes passes the bound of {_CHUNK_RAW_MAX}; "
                "the kind's snapshot() must cut its state smaller"
            )
        yield lz4.frame.compress(chunk), len(chunk)


def _decompress(frame: bytes | memoryview, raw_max: int) -> bytes:
    """One whole lz4 frame, refusing more than `raw_max` bytes out (ValueError)."""
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        raw = decompressor.decompress(frame, max_length=raw_max + 1)
    except RuntimeError as exc:  # lz4 reports a malformed frame as RuntimeError
        raise ValueError(f"lz4 frame does not decode: {exc}") from exc
    if len(raw) > raw_max:
        raise ValueError(f"lz4 frame decodes to more than {raw_max} bytes")
    if not decompressor.eof or decompressor.unused_data:
        raise ValueError("lz4 frame is incomplete or followed by extra bytes")
    return raw


def _check_frames(frames: Iterable[bytes]) -> Iterator[tuple[bytes, int]]:
    for frame in frames:
        if len(frame) > _CHUNK_COMPRESSED_MAX:
            raise ValueError(f"an lz4 frame of {len(frame)} bytes passes the chunk bound")
        yield bytes(frame), len(_decompress(frame, _CHUNK_RAW_MAX))


class _Writer:
    """Writes one snapshot file under a temporary name, chunk by chunk; `finish` completes
    and syncs it, `publish` renames it into place, `discard` deletes it. A writer that is not
    published leaves nothing behind once discarded."""

    def __init__(self, directory: Path, header: SnapshotHeader) -> None:
        self.directory = directory
        self.header = header
        make_private_dir(directory)
        self._head = _encode_header(header)
        fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=directory)
        self.temp = Path(temp_name)
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 less the umask: exactly 0600
            f = os.fdopen(fd, "w+b")
        except BaseException:
            os.close(fd)
            self.temp.unlink()
            raise
        self._file: BinaryIO | None = f
        try:
            f.write(self._head)  # raw_bytes is a placeholder until the end
        except BaseException:
            self.discard()
            raise
        self.count = self.raw_total = 0
        self._chunks_crc = 0
        self.finished = False

    def add(self, frame: bytes, raw_len: int) -> None:
        """Appends one chunk record: an lz4 frame that decodes to `raw_len` bytes."""
        f = self._file
        assert f is not None, "the snapshot file is closed"
        record_head = _CHUNK_HEAD.pack(b"C", len(frame), raw_len, 0)[:-4]
        crc = crc32c.crc32c(frame, value=crc32c.crc32c(record_head))
        record_head += _U32.pack(crc)
        f.write(record_head)
        f.write(frame)
        self._chunks_crc = crc32c.crc32c(frame, value=crc32c.crc32c(record_head,
                                                                    self._chunks_crc))
        self.count += 1
        self.raw_total += raw_len

    def finish(self) -> None:
        """Writes the trailer and the final header, and syncs the file (still unpublished)."""
        f = self._file
        assert f is not None, "the snapshot file is closed"
        trailer = _TRAILER.pack(b"T", self.count, self.raw_total, self._chunks_crc, _END_MAGIC)
        f.write(trailer + _U32.pack(crc32c.crc32c(trailer)))
        if self.header.raw_bytes and self.header.raw_bytes != self.raw_total:
            # Only a shipped snapshot names its raw size up front: a mismatch means the
            # chunks were lost or damaged on the way.
            raise SnapshotCorruptError(
                str(self.temp),
                f"its header says {self.header.raw_bytes} raw bytes, the chunks hold "
                f"{self.raw_total}",
            )
        final_head = _encode_header(dataclasses.replace(self.header, raw_bytes=self.raw_total))
        assert len(final_head) == len(self._head)  # fixed-width fields: same length
        f.seek(0)
        f.write(final_head)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        self.finished = True

    def publish(self) -> Path:
        """Renames the finished file into place (replacing one of the same index) and syncs
        the directory; returns the final path."""
        assert self.finished, "finish() the snapshot before publishing it"
        final = self.directory / snapshot_name(self.header.applied_index)
        os.replace(self.temp, final)
        _fsync_dir(self.directory)
        return final

    def discard(self) -> None:
        """Closes and deletes the unpublished file (idempotent)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


def _write(directory: Path, header: SnapshotHeader, frames: Iterable[tuple[bytes, int]]) -> Path:
    """Write header, chunk records and trailer atomically; returns the final path."""
    writer = _Writer(directory, header)
    try:
        for frame, raw_len in frames:
            writer.add(frame, raw_len)
        writer.finish()
        return writer.publish()
    except BaseException:
        writer.discard()
        raise


class Restorable(Protocol):
    """What `load_snapshot` needs of the object it restores into."""

    def restore(self, chunks: Iterable[bytes]) -> None: ...

    def digest(self) -> bytes: ...


def write_snapshot(
    directory: str | os.PathLike[str],
    *,
    kind: str,
    kind_version: int,
    applied_index: int,
    epoch: int,
    digest: bytes,
    chunks: Iterable[bytes],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `chunks` (a kind's `snapshot()`), each lz4-compressed, as
    `directory/snap-<applied_index>.fsnap`, atomically and durably; returns the path.

    `raw_bytes` is counted from the chunks. An existing file of the same index is replaced.
    """
    header = SnapshotHeader(
        kind=kind,
        kind_version=kind_version,
        applied_index=applied_index,
        epoch=epoch,
        digest=digest,
        raw_bytes=0,
        extra=dict(extra or {}),
    )
    return _write(Path(directory), header, _compress_all(chunks))


def write_compressed_snapshot(
    directory: str | os.PathLike[str],
    header: SnapshotHeader,
    frames: Iterable[bytes],
) -> Path:
    """Write a snapshot from lz4 frames as another replica shipped them (no recompression).

    Each frame is checked to decode within the chunk bound. When `header.raw_bytes` is not 0
    it must equal the frames' decoded total (SnapshotCorruptError otherwise, nothing written).
    The caller still loads the result with `load_snapshot`, which checks the digest.
    """
    return _write(Path(directory), header, _check_frames(frames))


class _FramesFailed(Exception):
    """The frames' source failed (an interrupted stream): passed through, not damage."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class ShippedSnapshot:
    """A snapshot arriving from another replica as lz4 frames, written and restored in one
    pass: each frame is checked, written to a temporary file in `directory` and decompressed
    into the restore as it arrives, so nothing is decompressed twice or read back.

    `receive` does the whole pass and checks, as `load_snapshot` does, the kind, the raw size,
    every frame and the digest of the restored state; any damage or an interrupted stream
    raises (SnapshotCorruptError for damage) and deletes the temporary file. Only `publish`
    puts the file in place as a snapshot: until then a crash or a `discard` leaves the
    directory as it was.
    """

    def __init__(self, directory: str | os.PathLike[str], header: SnapshotHeader) -> None:
        self.header = header
        self._writer = _Writer(Path(directory), header)

    @property
    def temp_path(self) -> Path:
        """Where the file is written until it is published."""
        return self._writer.temp

    def receive(self, frames: Iterable[bytes], kind: Restorable) -> None:
        """Writes `frames` and restores them into `kind` (a fresh one: discard it when this
        raises), checking the digest at the end."""
        header, writer = self.header, self._writer
        # Errors name the snapshot and where it was going (the temporary file goes away).
        where = f"{snapshot_name(header.applied_index)} shipped into {writer.directory}"
        try:
            _check_kind(where, header, kind)

            def chunks() -> Iterator[bytes]:
                source = iter(frames)
                index = 0
                while True:
                    try:
                        frame = next(source)
                    except StopIteration:
                        return
                    except Exception as exc:  # the stream's own failure, not damage
                        raise _FramesFailed(exc) from exc
                    if len(frame) > _CHUNK_COMPRESSED_MAX:
                        raise SnapshotCorruptError(
                            where, f"chunk {index}: an lz4 frame of {len(frame)} bytes passes "
                                   "the chunk bound")
                    try:
                        raw = _decompress(frame, _CHUNK_RAW_MAX)
                    except ValueError as exc:
                        raise SnapshotCorruptError(where, f"chunk {index}: {exc}") from exc
                    writer.add(bytes(frame), len(raw))
                    index += 1
                    yield raw

            _restore_checked(where, header, kind, chunks())
            writer.finish()
        except _FramesFailed as failed:
            writer.discard()
            raise failed.error from None
        except BaseException:
            writer.discard()
            raise

    def publish(self) -> Path:
        """Puts the received snapshot in place; returns its path."""
        try:
            return self._writer.publish()
        except BaseException:
            self._writer.discard()
            raise

    def discard(self) -> None:
        """Deletes the received file (a snapshot that is not to be installed after all)."""
        self._writer.discard()


# --- reading -------------------------------------------------------------------------------


class _Reader:
    """Reads exact byte counts from a snapshot file, calling any shortfall damage."""

    def __init__(self, path: Path, f: BinaryIO) -> None:
        self.path = path
        self.f = f

    def corrupt(self, reason: str) -> SnapshotCorruptError:
        return SnapshotCorruptError(str(self.path), reason)

    def exact(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise self.corrupt(f"file ends inside the {what} (truncated)")
        return data

    def header(self) -> SnapshotHeader:
        magic = self.exact(len(MAGIC), "magic")
        if magic != MAGIC:
            raise self.corrupt(f"bad magic {magic!r}: not a snapshot of a known format")
        length_bytes = self.exact(_U32.size, "header length")
        (length,) = _U32.unpack(length_bytes)
        if not _FIXED.size < length <= _HEADER_BODY_MAX:
            raise self.corrupt(f"header length {length} is out of range")
        body = self.exact(length, "header")
        (crc,) = _U32.unpack(self.exact(_U32.size, "header CRC"))
        if crc32c.crc32c(magic + length_bytes + body) != crc:
            raise self.corrupt("header CRC mismatch")
        applied_index, epoch, raw_bytes, kind_version = _FIXED.unpack_from(body, 0)
        try:
            rest = msgpack.unpackb(body[_FIXED.size :], raw=False)
        except Exception as exc:  # checked by CRC, so only a writer bug lands here
            raise self.corrupt(f"header does not decode: {exc}") from exc
        if (
            not isinstance(rest, dict)
            or not isinstance(rest.get("kind"), str)
            or not isinstance(rest.get("digest"), bytes)
            or not isinstance(rest.get("extra"), dict)
        ):
            raise self.corrupt("header lacks kind, digest or extra")
        return SnapshotHeader(
            kind=rest["kind"],
            kind_version=kind_version,
            applied_index=applied_index,
            epoch=epoch,
            digest=rest["digest"],
            raw_bytes=raw_bytes,
            extra=rest["extra"],
        )

    def frames(self, header: SnapshotHeader) -> Iterator[tuple[bytes, int]]:
        """Every chunk's (lz4 frame, raw length), CRC-checked; then the trailer, checked."""
        count = raw_total = 0
        chunks_crc = 0
        while True:
            tag = self.exact(1, "next record")
            if tag == b"T":
                break
            if tag != b"C":
                raise self.corrupt(f"unknown record tag {tag!r} after chunk {count}")
            rest = self.exact(_CHUNK_HEAD.size - 1, f"chunk {count} header")
            _, length, raw_len, crc = _CHUNK_HEAD.unpack(tag + rest)
            if length > _CHUNK_COMPRESSED_MAX or raw_len > _CHUNK_RAW_MAX:
                raise self.corrupt(
                    f"chunk {count} claims {length} compressed / {raw_len} raw bytes, past "
                    f"the bound of {_CHUNK_RAW_MAX}"
                )
            frame = self.exact(length, f"chunk {count}")
            record_head = tag + rest
            if crc32c.crc32c(frame, value=crc32c.crc32c(record_head[:-4])) != crc:
                raise self.corrupt(f"chunk {count} CRC mismatch")
            chunks_crc = crc32c.crc32c(frame, value=crc32c.crc32c(record_head, chunks_crc))
            count += 1
            raw_total += raw_len
            yield frame, raw_len
        trailer = tag + self.exact(_TRAILER.size - 1, "trailer")
        (crc,) = _U32.unpack(self.exact(_U32.size, "trailer CRC"))
        if crc32c.crc32c(trailer) != crc:
            raise self.corrupt("trailer CRC mismatch")
        _, want_count, want_raw, want_crc, end = _TRAILER.unpack(trailer)
        if end != _END_MAGIC:
            raise self.corrupt("bad trailer magic")
        if (want_count, want_raw, want_crc) != (count, raw_total, chunks_crc):
            raise self.corrupt(
                f"trailer expects {want_count} chunks / {want_raw} raw bytes, the file holds "
                f"{count} / {raw_total}, or the chunks' CRC differs (chunks lost or reordered)"
            )
        if raw_total != header.raw_bytes:
            raise self.corrupt(
                f"header says {header.raw_bytes} raw bytes, the chunks hold {raw_total}"
            )
        if self.f.read(1):
            raise self.corrupt("bytes follow the trailer")


def read_header(path: str | os.PathLike[str]) -> SnapshotHeader:
    """The header of the snapshot at `path`, CRC-checked; the chunks are not read.

    Raises SnapshotCorruptError when the header is damaged.
    """
    path = Path(path)
    with path.open("rb") as f:
        return _Reader(path, f).header()


def _iter_frames(path: Path) -> Iterator[tuple[bytes, int]]:
    with path.open("rb") as f:
        reader = _Reader(path, f)
        yield from reader.frames(reader.header())


def iter_compressed_chunks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The chunks' lz4 frames as stored, each CRC-checked, to ship as they are.

    Damage raises SnapshotCorruptError during the iteration, possibly at its very end (the
    trailer): act on the chunks only once the iterator is exhausted.
    """
    for frame, _ in _iter_frames(Path(path)):
        yield frame


def iter_chunks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The chunks decompressed, as the kind's `snapshot()` produced them (see
    `iter_compressed_chunks` on when damage is reported)."""
    path = Path(path)
    for index, (frame, raw_len) in enumerate(_iter_frames(path)):
        try:
            raw = _decompress(frame, raw_len)
        except ValueError as exc:
            raise SnapshotCorruptError(str(path), f"chunk {index}: {exc}") from exc
        if len(raw) != raw_len:
            raise SnapshotCorruptError(
                str(path), f"chunk {index} decodes to {len(raw)} bytes, its record says {raw_len}"
            )
        yield raw


def verify_snapshot(path: str | os.PathLike[str]) -> SnapshotHeader:
    """Check every CRC, the trailer and the file's end without decompressing; the header.

    Raises SnapshotCorruptError on damage. This is what `SnapshotStore.latest` calls.
    """
    path = Path(path)
    with path.open("rb") as f:
        reader = _Reader(path, f)
        header = reader.header()
        for _ in reader.frames(header):
            pass
    return header


def load_snapshot(path: str | os.PathLike[str], kind: Restorable) -> SnapshotHeader:
    """Restore the snapshot at `path` into `kind` and check its digest; returns the header.

    `kind` is a ServiceKind, or anything with its `restore` and `digest` (the agent passes its
    replicated state machine); its `name` and `version`, when it has them, are checked against
    the header first. Any damage, a snapshot of another kind or of a newer kind version, a
    restore that fails, or a digest that differs afterwards raises SnapshotCorruptError.
    Restore into a fresh instance and discard it on failure: a kind may have been changed
    before the damage showed.
    """
    path = Path(path)
    header = read_header(path)
    _check_kind(str(path), header, kind)
    _restore_checked(str(path), header, kind, iter_chunks(path))
    return header


def _check_kind(where: str, header: SnapshotHeader, kind: Restorable) -> None:
    """Refuses a snapshot of another kind, or of a newer version of the kind."""
    name = getattr(kind, "name", None)
    if name is not None and header.kind != name:
        raise SnapshotCorruptError(where, f"it holds kind {header.kind!r}, not {name!r}")
    version = getattr(kind, "version", None)
    if version is not None and header.kind_version > version:
        raise SnapshotCorruptError(
            where,
            f"it was written by version {header.kind_version} of kind {header.kind!r}; this "
            f"code knows versions up to {version}",
        )


def _restore_checked(
    where: str, header: SnapshotHeader, kind: Restorable, chunks: Iterator[bytes]
) -> None:
    """`kind.restore(chunks)`, every chunk consumed, then the digest compared with the
    header's; any failure is SnapshotCorruptError."""
    try:
        kind.restore(chunks)
        # Drive the reader to its end even if the kind stopped early, so that the trailer
        # is checked; a chunk the kind did not read is damage as well.
        for _ in chunks:
            raise SnapshotCorruptError(where, "the kind's restore left chunks unread")
    except (SnapshotCorruptError, _FramesFailed):
        raise
    except Exception as exc:  # a kind's restore may fail in any way on bad data
        raise SnapshotCorruptError(
            where, f"restoring it failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if kind.digest() != header.digest:
        raise SnapshotCorruptError(
            where, "the restored state's digest differs from the one recorded"
        )


# --- the per-replica directory -------------------------------------------------------------


class SnapshotStore:
    """The snapshots of one replica, in one directory of its own."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Open (creating) `directory` and delete temp files that a crash left behind."""
        self._directory = Path(directory)
        make_private_dir(self._directory)
        for leftover in self._directory.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    @property
    def directory(self) -> Path:
        """The directory this store owns."""
        return self._directory

    def path_for(self, applied_index: int) -> Path:
        """Where the snapshot at `applied_index` lives (whether or not it exists)."""
        return self._directory / snapshot_name(applied_index)

    def save(self, header: SnapshotHeader, chunks: Iterable[bytes]) -> Path:
        """Write `chunks` as the snapshot `header` describes; returns its path.

        `header.raw_bytes` is ignored: it is counted from the chunks. `header.epoch` is the
        epoch of the entry at `header.applied_index`; `header.digest` must be the digest of
        the state the chunks hold (take both at the same moment, see `save_kind`).
        """
        return write_snapshot(
            self._directory,
            kind=header.kind,
            kind_version=header.kind_version,
            applied_index=header.applied_index,
            epoch=header.epoch,
            digest=header.digest,
            chunks=chunks,
            extra=header.extra,
        )

    def save_kind(
        self,
        kind: ServiceKind,
        *,
        applied_index: int,
        epoch: int,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write `kind`'s current state as the snapshot at `applied_index`; returns its path."""
        digest = kind.digest()
        chunks = kind.snapshot()  # state as of now: taken right after the digest, same thread
        return write_snapshot(
            self._directory,
            kind=kind.name,
            kind_version=kind.version,
            applied_index=applied_index,
            epoch=epoch,
            digest=digest,
            chunks=chunks,
            extra=extra,
        )

    def save_compressed(self, header: SnapshotHeader, frames: Iterable[bytes]) -> Path:
        """Write a snapshot shipped by another replica (see `write_compressed_snapshot`)."""
        return write_compressed_snapshot(self._directory, header, frames)

    def receive(self, header: SnapshotHeader) -> ShippedSnapshot:
        """A snapshot to receive from another replica into this directory (`ShippedSnapshot`).
        """
        return ShippedSnapshot(self._directory, header)

    def paths(self) -> list[Path]:
        """Every snapshot file's path, newest (highest index) first, unchecked."""
        found = [p for p in self._directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def latest(self) -> Path | None:
        """The newest snapshot that passes `verify_snapshot`; damaged ones are skipped with a
        warning. None when there is none."""
        for path in self.paths():
            try:
                verify_snapshot(path)
            except SnapshotCorruptError as exc:
                log.warning("skipping damaged snapshot: %s", exc)
                continue
            except FileNotFoundError:
                continue  # pruned meanwhile
            except OSError as exc:  # an unreadable file is as useless as a damaged one
                log.warning("skipping unreadable snapshot %s: %s", path, exc)
                continue
            return path
        return None

    def prune(self, keep: int = 2) -> list[Path]:
        """Delete all but the newest `keep` snapshots whose header reads; returns the deleted.

        Files older than the oldest kept one go, damaged or not. Damaged files newer than it
        stay, for an operator to look at; `latest` skips them.
        """
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        kept = 0
        deleted: list[Path] = []
        for path in self.paths():
            if kept >= keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                deleted.append(path)
                continue
            try:
                read_header(path)
            except (SnapshotCorruptError, FileNotFoundError):
                continue
            kept += 1
        if deleted:
            _fsync_dir(self._directory)
        return deleted
