"""Installing a shipped snapshot: frames written and restored as they arrive, checked end to
end, and a damaged or interrupted install leaves the replica as it was."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest

from demo_services.kv import KvService
from failover.agent.config import AgentConfig
from failover.agent.host import Agent, _header_to_proto
from failover.agent.replica import Replica
from failover.core.sessions import encode_request_id
from failover.core.state_machine import ReplicatedStateMachine
from failover.errors import SnapshotCorruptError, Unavailable
from failover.storage import snapshot as snapshot_module
from failover.storage.records import Entry
from failover.storage.snapshot import (
    ShippedSnapshot,
    SnapshotHeader,
    SnapshotStore,
    iter_compressed_chunks,
    read_header,
)
from failover.v1 import replication_pb2

UNREACHABLE = "127.0.0.1:1"


def _source(tmp_path: Path, puts: int, tag: str = "v") -> tuple[ReplicatedStateMachine, Path]:
    """A kv state of `puts` entries (with request ids) and its snapshot file."""
    sm = ReplicatedStateMachine(KvService())
    entries = [Entry(1, 1, b"", b"")] + [
        Entry(1, i + 2, encode_request_id("c", i + 1, opens=i == 0),
              msgpack.packb({"op": "put", "key": f"k{i}", "value": tag * 50}))
        for i in range(puts)]
    sm.apply_many(entries)
    header = SnapshotHeader(kind="kv", kind_version=KvService.version,
                            applied_index=sm.applied_index, epoch=1, digest=sm.digest(),
                            extra={"history": [[1, 1]]})
    path = SnapshotStore(tmp_path / f"source-{tag}").save(header, list(sm.snapshot()))
    return sm, path


class _View:
    def __init__(self, sm: ReplicatedStateMachine) -> None:
        self.sm, self.name, self.version = sm, sm.kind.name, sm.kind.version

    def restore(self, chunks: Iterator[bytes]) -> None:
        self.sm.restore(chunks)

    def digest(self) -> bytes:
        return self.sm.digest()


# --- ShippedSnapshot -----------------------------------------------------------------------


def test_shipped_frames_restore_and_publish_the_same_file(tmp_path: Path) -> None:
    source, path = _source(tmp_path, 3000)
    header = read_header(path)
    shipped = ShippedSnapshot(tmp_path / "dest", header)
    fresh = ReplicatedStateMachine(KvService())
    shipped.receive(iter_compressed_chunks(path), _View(fresh))
    assert fresh.digest() == source.digest() and fresh.applied_index == source.applied_index
    assert [p.name for p in (tmp_path / "dest").iterdir()] == [shipped.temp_path.name]
    published = shipped.publish()
    assert published.read_bytes() == path.read_bytes()
    assert [p.name for p in (tmp_path / "dest").iterdir()] == [published.name]


def _broken_frames(path: Path, how: str) -> Iterator[bytes]:
    frames = list(iter_compressed_chunks(path))
    if how == "flipped":
        frames[1] = frames[1][:20] + bytes([frames[1][20] ^ 0xFF]) + frames[1][21:]
    elif how == "not_lz4":
        frames[1] = b"definitely not an lz4 frame"
    elif how == "missing":
        del frames[1]
    yield from frames[:2] if how == "interrupted" else frames
    if how == "interrupted":
        raise Unavailable("the stream broke")


@pytest.mark.parametrize("how", ["flipped", "not_lz4", "missing", "interrupted", "digest",
                                 "raw_bytes"])
def test_damaged_or_interrupted_shipping_leaves_no_file(tmp_path: Path, how: str) -> None:
    _, path = _source(tmp_path, 3000)
    header = read_header(path)
    if how == "digest":
        header = SnapshotHeader(**{**header.__dict__, "digest": bytes(32)})
    if how == "raw_bytes":
        header = SnapshotHeader(**{**header.__dict__, "raw_bytes": header.raw_bytes + 1})
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "snap-00000000000000000007.fsnap").write_bytes(b"an older one, untouched")
    shipped = ShippedSnapshot(dest, header)
    expected = Unavailable if how == "interrupted" else SnapshotCorruptError
    with pytest.raises(expected):
        shipped.receive(_broken_frames(path, how), _View(ReplicatedStateMachine(KvService())))
    assert [p.name for p in dest.iterdir()] == ["snap-00000000000000000007.fsnap"]
    assert (dest / "snap-00000000000000000007.fsnap").read_bytes() == b"an older one, untouched"


def test_a_snapshot_of_another_kind_is_refused(tmp_path: Path) -> None:
    _, path = _source(tmp_path, 10)
    header = SnapshotHeader(**{**read_header(path).__dict__, "kind": "bank"})
    shipped = ShippedSnapshot(tmp_path / "dest", header)
    with pytest.raises(SnapshotCorruptError, match="kind 'bank'"):
        shipped.receive(iter_compressed_chunks(path), _View(ReplicatedStateMachine(KvService())))
    assert list((tmp_path / "dest").iterdir()) == []


# --- the agent's receive path --------------------------------------------------------------


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    config = AgentConfig.from_mapping(
        {"host_id": "d", "listen": "127.0.0.1:7999", "data_dir": str(tmp_path / "agent")})
    agent = Agent(config)
    await agent.start()
    yield agent
    await agent.stop()


async def _duplica(agent: Agent) -> Replica:
    return await agent.assign_role("kv1", "kv", "duplica", 1, "sync", ("p", UNREACHABLE), {},
                                   set())


async def _stream(path: Path, frames: list[bytes] | None = None, *, last: bool = True,
                  gate: asyncio.Event | None = None
                  ) -> AsyncIterator[replication_pb2.SnapshotChunk]:
    header = _header_to_proto(read_header(path))
    for n, frame in enumerate(frames if frames is not None else iter_compressed_chunks(path)):
        chunk = replication_pb2.SnapshotChunk(service="kv1", epoch=1, data=frame)
        if n == 0:
            chunk.header.CopyFrom(header)
        yield chunk
        if gate is not None and n == 1:
            await gate.wait()  # the rest of the stream is held back
    if last:
        yield replication_pb2.SnapshotChunk(service="kv1", epoch=1, last=True)


def _files(replica: Replica) -> list[str]:
    return sorted(p.name for p in replica.snapshots.directory.iterdir())


async def test_install_restores_while_receiving_then_replaces_state_and_log(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica = await _duplica(agent)
    source, path = _source(tmp_path, 20_000)
    written: list[int] = []
    add = snapshot_module._Writer.add

    def counting_add(self: object, frame: bytes, raw_len: int) -> None:
        written.append(raw_len)
        add(self, frame, raw_len)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot_module._Writer, "add", counting_add)
    gate = asyncio.Event()
    install = asyncio.create_task(agent.receive_snapshot(_stream(path, gate=gate)))
    # Two frames in and the stream held back: both are written and decompressed into the
    # restore already, not waiting for the rest of the snapshot.
    deadline = asyncio.get_running_loop().time() + 10
    while len(written) < 2:
        assert asyncio.get_running_loop().time() < deadline, "the frames were not taken"
        await asyncio.sleep(0.01)
    assert replica.sm.applied_index == 0 and not install.done()
    assert any(p.suffix == ".tmp" for p in replica.snapshots.directory.iterdir())
    gate.set()
    reply = await asyncio.wait_for(install, 30)
    assert reply.digest == source.digest() == replica.sm.digest()
    assert reply.applied_index == replica.sm.applied_index == source.applied_index
    assert replica.wal.first_index == source.applied_index + 1
    assert len(written) == len(list(iter_compressed_chunks(path)))
    assert _files(replica) == [path.name]
    assert (replica.snapshots.directory / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("how", ["flipped", "truncated", "no_last_chunk", "digest", "stale"])
async def test_a_damaged_install_leaves_the_replica_as_it_was(agent: Agent, tmp_path: Path,
                                                              how: str) -> None:
    replica = await _duplica(agent)
    first, first_path = _source(tmp_path, 2000, tag="a")
    await agent.receive_snapshot(_stream(first_path))
    assert replica.sm.digest() == first.digest()
    before = (replica.sm.digest(), replica.sm.applied_index, replica.wal.first_index,
              replica.wal.last_index, _files(replica))

    second, path = _source(tmp_path, 5000, tag="b")
    frames = list(iter_compressed_chunks(path))
    stream = _stream(path, frames)
    expected: type[Exception] = SnapshotCorruptError
    if how == "flipped":
        frames[-1] = frames[-1][:30] + bytes([frames[-1][30] ^ 0x55]) + frames[-1][31:]
    elif how == "truncated":
        stream = _stream(path, frames[:-1])
    elif how == "no_last_chunk":
        stream = _stream(path, frames, last=False)
        expected = Exception  # an InvalidRequest: the stream ended early
    elif how == "digest":
        bad = SnapshotHeader(**{**read_header(path).__dict__, "digest": bytes(32)})
        stream = _stream(SnapshotStore(tmp_path / "lying").save(bad, list(second.snapshot())))
    else:  # an older epoch than the replica's
        await agent.assign_role("kv1", "kv", "duplica", 3, "sync", ("p", UNREACHABLE), {},
                                set())
        expected = Exception  # StaleEpochError
    with pytest.raises(expected):
        await agent.receive_snapshot(stream)
    after = (replica.sm.digest(), replica.sm.applied_index, replica.wal.first_index,
             replica.wal.last_index, _files(replica))
    assert after == before
