"""The write-ahead log: framing, segments, crash repair, group commit, compaction."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failover import defaults
from failover.errors import (
    ConfigError,
    DiskFullError,
    LogCorruptError,
    LogGapError,
    StorageError,
)
from failover.storage import records as records_module
from failover.storage import wal as wal_module
from failover.storage.records import Entry, decode_records, encode_records
from failover.storage.segments import SEGMENT_MAGIC, segment_name
from failover.storage.wal import META_NAME, WriteAheadLog

SMALL_SEGMENT_BYTES = 1024


def make(first: int, count: int, epoch: int = 1, size: int = 40) -> list[Entry]:
    """``count`` entries from ``first``; payloads differ per index so mix-ups show."""
    return [
        Entry(epoch, i, b"req-%d" % i if i % 3 else b"", (b"%d:" % i).ljust(size, b"x"))
        for i in range(first, first + count)
    ]


def segments(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".wal")


def open_log(path: Path, **kwargs) -> WriteAheadLog:
    kwargs.setdefault("segment_bytes_max", SMALL_SEGMENT_BYTES)
    return WriteAheadLog.open(path, **kwargs)


# --- framing --------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    entries = make(7, 5) + [Entry(2, 12, b"", b""), Entry(3, 13, b"\x00" * 5, b"\xff" * 300)]
    data = encode_records(entries)
    assert decode_records(data) == entries
    assert decode_records(memoryview(data)) == entries
    assert encode_records([]) == b"" and decode_records(b"") == []


@pytest.mark.parametrize("cut", [1, 7, 8, 20])
def test_decode_rejects_partial_trailing_frame(cut: int) -> None:
    data = encode_records(make(1, 3))
    with pytest.raises(LogCorruptError) as info:
        decode_records(data[:-cut], where="batch-9")
    assert info.value.path == "batch-9"
    last_start = len(data) - len(encode_records(make(3, 1)))
    assert info.value.offset == last_start


def test_decode_rejects_flipped_byte_and_oversized_length() -> None:
    data = bytearray(encode_records(make(1, 3)))
    data[20] ^= 0x01
    with pytest.raises(LogCorruptError, match="CRC32C"):
        decode_records(bytes(data))
    huge = records_module._HEADER.pack(defaults.WAL_RECORD_BYTES_MAX + 1, 0) + b"x" * 16
    with pytest.raises(LogCorruptError, match="exceeds"):
        decode_records(huge)


# --- basic log behaviour --------------------------------------------------------------------


def test_new_log_state(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        assert (log.first_index, log.last_index, log.last_epoch, log.durable_index) == (1, 0, 0, 0)
        assert log.epoch_history == []
        assert log.epoch_at(0) == 0
        assert log.append([]) == 0
        assert log.open_report.entries == 0 and log.open_report.torn_bytes_dropped == 0


def test_round_trip_across_segment_rolls(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    entries = make(1, 10) + make(11, 1) + make(12, 40) + make(52, 3)
    assert log.append(entries[:10]) == 10
    assert log.append(entries[10:11]) == 11
    assert log.append(entries[11:51]) == 51  # one batch spanning several segments
    assert log.append(entries[51:]) == 54
    files = segments(tmp_path)
    assert len(files) > 3
    assert all(f.stat().st_size <= SMALL_SEGMENT_BYTES for f in files)
    assert [int(f.stem) for f in files][0] == 1
    assert log.read(1, 54) == entries
    for first, last in [(1, 1), (5, 30), (9, 12), (30, 54), (54, 54), (20, 19)]:
        assert log.read(first, last) == entries[first - 1 : last]
    with pytest.raises(LogGapError):
        log.read(50, 55)
    log.close()
    with open_log(tmp_path) as log:
        assert log.read(1, 54) == entries
        assert log.open_report.entries == 54


def test_oversized_record_gets_its_own_segment(tmp_path: Path) -> None:
    big = Entry(1, 2, b"", b"B" * (3 * SMALL_SEGMENT_BYTES))
    with open_log(tmp_path) as log:
        log.append(make(1, 1) + [big] + make(3, 2))
        assert log.read(1, 4)[1] == big
    with open_log(tmp_path) as log:
        assert log.read(2, 2) == [big]
        assert [int(f.stem) for f in segments(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("policy", defaults.WAL_FSYNC_POLICIES)
def test_reopen_after_each_policy(tmp_path: Path, policy: str) -> None:
    log = open_log(tmp_path, fsync_policy=policy)
    assert log.fsync_policy == policy
    entries = make(1, 30)
    for k in range(0, 30, 7):
        log.append(entries[k : k + 7])
        assert log.durable_index == log.last_index
    log.close()
    with open_log(tmp_path, fsync_policy=policy) as log:
        assert log.read(1, 30) == entries
        assert log.durable_index == 30
        log.append(make(31, 2))
        log.sync()
        assert log.durable_index == 32


def test_unknown_policy_and_bad_segment_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="always, batch, never"):
        WriteAheadLog.open(tmp_path / "x", fsync_policy="sometimes")
    with pytest.raises(ConfigError):
        WriteAheadLog.open(tmp_path / "x", segment_bytes_max=10)
    assert not (tmp_path / "x").exists()  # rejected before any I/O


def test_closed_log_refuses(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 2))
    log.close()
    log.close()
    with pytest.raises(Exception, match="closed"):
        log.append(make(3, 1))
    with pytest.raises(Exception, match="closed"):
        log.read(1, 1)


# --- contiguity -----------------------------------------------------------------------------


def test_non_contiguous_append_raises_value_error(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 5, epoch=2))
        with pytest.raises(ValueError, match="next entry must have index 6"):
            log.append(make(8, 1, epoch=2))  # gap ahead
        with pytest.raises(ValueError, match="already holds"):
            log.append(make(5, 2, epoch=2))  # overlap
        with pytest.raises(ValueError, match="consecutive"):
            log.append([*make(6, 1, epoch=2), *make(8, 1, epoch=2)])  # gap inside the batch
        with pytest.raises(ValueError, match="epoch"):
            log.append(make(6, 1, epoch=1))  # epoch below the log's
        with pytest.raises(ValueError, match="go down"):
            log.append([*make(6, 1, epoch=3), *make(7, 1, epoch=2)])
        assert log.last_index == 5 and log.read(1, 5) == make(1, 5, epoch=2)
        assert log.append(make(6, 1, epoch=2)) == 6


def test_out_of_order_concurrent_batches_are_written_in_index_order(tmp_path: Path) -> None:
    """A batch that arrives before its predecessor waits for it instead of failing."""
    with open_log(tmp_path, fsync_policy="batch") as log:
        errors: list[BaseException] = []

        def late() -> None:
            time.sleep(0.01)
            try:
                log.append(make(1, 3))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=late)
        thread.start()
        assert log.append(make(4, 3)) == 6
        thread.join()
        assert not errors
        assert log.read(1, 6) == make(1, 6)


# --- read_records / append_records ----------------------------------------------------------


def test_read_records_limits_and_decode_round_trip(tmp_path: Path) -> None:
    entries = make(1, 60)
    with open_log(tmp_path) as log:
        log.append(entries)
        records, first, last = log.read_records(1, entries_max=1000, bytes_max=1 << 20)
        assert (first, last) == (1, 60)
        assert records == encode_records(entries)  # spans every segment, no headers inside
        assert decode_records(records) == entries
        records, first, last = log.read_records(10, entries_max=5, bytes_max=1 << 20)
        assert (first, last) == (10, 14) and decode_records(records) == entries[9:14]
        one = len(encode_records(entries[:1]))
        records, first, last = log.read_records(3, entries_max=100, bytes_max=3 * one + 5)
        assert (first, last) == (3, 5) and len(records) <= 3 * one + 5
        records, first, last = log.read_records(7, entries_max=100, bytes_max=1)
        assert (first, last) == (7, 7) and decode_records(records) == [entries[6]]
        assert log.read_records(61, entries_max=10, bytes_max=100) == (b"", 61, 60)
        with pytest.raises(ValueError):
            log.read_records(1, entries_max=0, bytes_max=100)
        # A budget that crosses a segment boundary.
        for start in range(1, 61):
            records, first, last = log.read_records(start, entries_max=17, bytes_max=900)
            assert first == start and decode_records(records) == entries[start - 1 : last]
            assert last - first + 1 <= 17
            assert len(records) <= 900 or last == first


def test_append_records_ships_byte_identical(tmp_path: Path) -> None:
    primary = open_log(tmp_path / "p")
    primary.append(make(1, 20, epoch=1))
    primary.append(make(21, 25, epoch=3))
    duplica = open_log(tmp_path / "d")
    index = 1
    while index <= primary.last_index:
        records, first, last = primary.read_records(index, entries_max=7, bytes_max=600)
        assert duplica.append_records(records, first, last) == last
        index = last + 1
    assert duplica.read(1, 45) == primary.read(1, 45)
    assert duplica.epoch_history == primary.epoch_history == [(1, 1), (3, 21)]
    for a, b in zip(segments(tmp_path / "p"), segments(tmp_path / "d"), strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    primary.close()
    duplica.close()


def test_append_records_with_bad_frame_writes_nothing(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 3))
        before = [(f.name, f.read_bytes()) for f in segments(tmp_path)]
        good = encode_records(make(4, 5))
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0x40
        cases = [
            (bytes(flipped), 4, 8),  # CRC mismatch in the middle
            (good[:-3], 4, 8),  # partial trailing frame
            (good, 4, 9),  # claims more than it holds
            (encode_records([*make(4, 2), *make(7, 3)]), 4, 8),  # index gap inside
            (b"\x00" * 8 + good, 4, 8),  # zero-length frame
        ]
        for records, first, last in cases:
            with pytest.raises(LogCorruptError) as info:
                log.append_records(records, first, last)
            assert info.value.path == "<shipped records>"
            assert log.last_index == 3
            assert [(f.name, f.read_bytes()) for f in segments(tmp_path)] == before
        with pytest.raises(ValueError):
            log.append_records(encode_records(make(5, 2)), 5, 6)  # not the next index
        assert log.append_records(good, 4, 8) == 8
        assert log.read(1, 8) == make(1, 8)


# --- epochs ---------------------------------------------------------------------------------


def test_epoch_at_and_history_across_restart(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 10, epoch=1))
    log.append(make(11, 5, epoch=2) + make(16, 5, epoch=4))  # epoch change inside a batch
    log.append(make(21, 3, epoch=4))
    history = [(1, 1), (2, 11), (4, 16)]
    assert log.epoch_history == history
    assert [log.epoch_at(i) for i in (1, 10, 11, 15, 16, 23)] == [1, 1, 2, 2, 4, 4]
    assert log.last_epoch == 4
    with pytest.raises(LogGapError):
        log.epoch_at(24)
    log.close()
    with open_log(tmp_path) as log:
        assert log.epoch_history == history and log.last_epoch == 4
        assert log.epoch_at(12) == 2


def test_history_is_durable_before_the_first_entry_of_a_new_epoch(
    tmp_path: Path, monkeypatch
) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 3, epoch=1))
    seen: list[list[tuple[int, int]]] = []
    real_write_all = wal_module._write_all

    def spying_write_all(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".wal"):
            seen.append(log._read_meta()[2])  # what a crash right now would find
        return real_write_all(fd, data)

    monkeypatch.setattr(wal_module, "_write_all", spying_write_all)
    log.append(make(4, 2, epoch=2))
    log.append(make(6, 1, epoch=2))
    monkeypatch.undo()
    assert seen == [[(1, 1), (2, 4)], [(1, 1), (2, 4)]]
    log.close()


def test_history_of_an_epoch_whose_entries_never_landed_is_dropped(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 5, epoch=1))
    log.close()
    size = segments(tmp_path)[-1].stat().st_size
    log = open_log(tmp_path)
    log.append(make(6, 2, epoch=2))  # history file gains (2, 6) before the records
    log.close()
    os.truncate(segments(tmp_path)[-1], size)  # as if the records never reached the disk
    with open_log(tmp_path) as log:
        assert log.epoch_history == [(1, 1)] and log.last_epoch == 1 and log.last_index == 5


# --- truncation -----------------------------------------------------------------------------


def test_truncate_after(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 20, epoch=1))
    log.append(make(21, 20, epoch=2))
    log.append(make(41, 10, epoch=3))
    assert log.truncate_after(60) == 0
    assert log.truncate_after(25) == 25
    assert (log.last_index, log.last_epoch, log.durable_index) == (25, 2, 25)
    assert log.epoch_history == [(1, 1), (2, 21)]
    assert log.truncate_after(18) == 7
    assert log.epoch_history == [(1, 1)] and log.last_epoch == 1
    with pytest.raises(LogGapError):
        log.read(18, 19)
    log.append(make(19, 4, epoch=5))
    log.close()
    with open_log(tmp_path) as log:
        assert log.last_index == 22
        assert log.read(1, 22) == make(1, 18, epoch=1) + make(19, 4, epoch=5)
        assert log.epoch_history == [(1, 1), (5, 19)]
        assert log.truncate_after(0) == 22
        assert (log.first_index, log.last_index, log.last_epoch) == (1, 0, 0)
        assert segments(tmp_path) == []
    with open_log(tmp_path) as log:
        assert log.last_index == 0 and log.epoch_history == []


# --- compaction -----------------------------------------------------------------------------


def test_compaction_drops_whole_segments(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 30, epoch=1))
    log.append(make(31, 30, epoch=2))
    names = [int(f.stem) for f in segments(tmp_path)]
    first = log.compact(40, 2)
    # The segment holding 40 stays whole; everything before it goes.
    assert first == max(n for n in names if n <= 41)
    assert [int(f.stem) for f in segments(tmp_path)][0] == first
    assert log.first_index == first and log.epoch_at(40) == 2 and log.epoch_at(first) >= 1
    assert log.read(first, 60) == (make(1, 30, epoch=1) + make(31, 30, epoch=2))[first - 1 :]
    with pytest.raises(LogGapError):
        log.read(first - 1, 60)
    with pytest.raises(LogGapError):
        log.read_records(first - 1, entries_max=1, bytes_max=1)
    with pytest.raises(LogGapError):
        log.truncate_after(first - 2)
    with pytest.raises(ValueError):
        log.compact(50, 1)  # the log holds epoch 2 at 50
    assert log.compact(30, 1) == first  # behind the base: nothing to do
    assert log.epoch_history == [(1, 1), (2, 31)]
    log.close()
    with open_log(tmp_path) as log:
        assert log.first_index == first and log.epoch_at(40) == 2
        assert log.epoch_history == [(1, 1), (2, 31)]
        assert log.compact(60, 2) == 61
        assert (log.first_index, log.last_index, log.last_epoch) == (61, 60, 2)
        assert segments(tmp_path) == []
        log.append(make(61, 2, epoch=2))
    with open_log(tmp_path) as log:
        assert log.read(61, 62) == make(61, 2, epoch=2) and log.epoch_at(60) == 2


def test_compact_beyond_last_index_installs_snapshot_base(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 10, epoch=1))
    log.append(make(11, 5, epoch=3))  # a branch the new primary does not have
    assert log.compact(100, 2) == 101
    assert (log.first_index, log.last_index, log.last_epoch) == (101, 100, 2)
    assert log.epoch_at(100) == 2
    assert log.epoch_history == [(1, 1), (2, 100)]
    with pytest.raises(LogGapError):
        log.epoch_at(99)
    with pytest.raises(ValueError):
        log.append(make(11, 1, epoch=3))
    with pytest.raises(ValueError):
        log.append(make(101, 1, epoch=1))  # below the snapshot's epoch
    log.append(make(101, 3, epoch=2))
    log.close()
    with open_log(tmp_path) as log:
        assert (log.first_index, log.last_index) == (101, 103)
        assert log.epoch_history == [(1, 1), (2, 100)]
        assert log.epoch_at(100) == 2


def test_interrupted_compaction_is_finished_on_open(tmp_path: Path, monkeypatch) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 40))
    assert len(segments(tmp_path)) >= 3
    real_unlink = os.unlink

    def failing_unlink(path, *args, **kwargs):
        if str(path).endswith(".wal"):
            raise OSError(errno.EIO, "simulated crash")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", failing_unlink)
    with pytest.raises(Exception, match="compaction"):
        log.compact(30, 1)  # the base is on disk, no segment was deleted
    monkeypatch.undo()
    with pytest.raises(Exception, match="reopen"):
        log.append(make(41, 1))
    log.close()
    assert (tmp_path / segment_name(1)).exists()
    with open_log(tmp_path) as log:
        assert not (tmp_path / segment_name(1)).exists()
        assert log.epoch_at(30) == 1
        assert log.first_index > 1 and log.first_index <= 31
        assert log.read(log.first_index, 40) == make(1, 40)[log.first_index - 1 :]


# --- crash repair ---------------------------------------------------------------------------


def test_crash_cut_at_every_byte_of_the_last_record(tmp_path: Path) -> None:
    entries = make(1, 25)
    log = open_log(tmp_path)
    log.append(entries[:20])
    log.append(entries[20:])
    log.close()
    last_file = segments(tmp_path)[-1]
    assert len(segments(tmp_path)) > 1
    original = last_file.read_bytes()
    record_bytes = len(encode_records(entries[-1:]))
    start = len(original) - record_bytes
    for cut in range(start, len(original)):
        last_file.write_bytes(original[:cut])
        log = open_log(tmp_path)
        report = log.open_report
        assert report.torn_bytes_dropped == cut - start
        assert report.torn_segment == (last_file.name if cut > start else None)
        assert report.entries == 24 and log.last_index == 24
        assert log.read(1, 24) == entries[:24]
        assert last_file.stat().st_size == start
        assert log.append(entries[24:]) == 25
        log.close()
        with open_log(tmp_path) as log:
            assert log.read(1, 25) == entries and log.open_report.torn_bytes_dropped == 0


def test_crash_cut_inside_the_first_record_of_a_new_segment(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 40))
    last_file = segments(tmp_path)[-1]
    first = int(last_file.stem)
    record = encode_records(make(first, 1))
    for cut in [0, 3, len(SEGMENT_MAGIC), len(SEGMENT_MAGIC) + 5]:
        last_file.write_bytes((SEGMENT_MAGIC + record)[:cut])
        with open_log(tmp_path) as log:
            assert log.last_index == first - 1
            assert log.read(1, first - 1) == make(1, first - 1)
            assert log.append(make(first, 1)) == first
        with open_log(tmp_path) as log:
            assert log.last_index == first


def test_torn_tail_of_zeros_and_crc_mismatch_in_final_record(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 5))
    seg = segments(tmp_path)[-1]
    good = seg.read_bytes()
    seg.write_bytes(good + b"\x00" * 300)  # size grew, data never landed
    with open_log(tmp_path) as log:
        assert log.open_report.torn_bytes_dropped == 300 and log.last_index == 5
    data = bytearray(good)
    data[-2] ^= 0xFF  # the final record fails its CRC and nothing follows it
    seg.write_bytes(bytes(data))
    with open_log(tmp_path) as log:
        assert log.last_index == 4
        assert log.open_report.torn_bytes_dropped == len(encode_records(make(5, 1)))


def test_flipped_byte_in_the_middle_raises_with_file_and_offset(tmp_path: Path) -> None:
    entries = make(1, 40)
    with open_log(tmp_path) as log:
        log.append(entries)
    files = segments(tmp_path)
    assert len(files) >= 3
    for victim, which in [(files[-1], 1), (files[0], 2), (files[1], -1)]:
        original = victim.read_bytes()
        first = int(victim.stem)
        held = decode_records(original[len(SEGMENT_MAGIC) :])
        k = which if which >= 0 else len(held) - 1  # -1: the last record of an earlier file
        offset = len(SEGMENT_MAGIC) + len(encode_records(held[:k]))
        data = bytearray(original)
        data[offset + 12] ^= 0x01
        victim.write_bytes(bytes(data))
        with pytest.raises(LogCorruptError) as info:
            open_log(tmp_path)
        assert info.value.path == str(victim) and info.value.offset == offset
        assert victim.name in str(info.value) and str(offset) in str(info.value)
        assert first + k == held[k].index
        victim.write_bytes(original)
    with open_log(tmp_path) as log:
        assert log.read(1, 40) == entries


def test_corrupt_length_in_last_segment_is_not_mistaken_for_a_torn_tail(tmp_path: Path) -> None:
    with open_log(tmp_path, segment_bytes_max=1 << 20) as log:
        log.append(make(1, 10))
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    offset = len(SEGMENT_MAGIC) + len(encode_records(make(1, 3)))
    data[offset + 2] = 0x7F  # the length now claims far past the end of the file
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError) as info:
        open_log(tmp_path)
    assert info.value.offset == offset


def test_bad_segment_magic_and_missing_history(tmp_path: Path) -> None:
    with open_log(tmp_path) as log:
        log.append(make(1, 40))
    files = segments(tmp_path)
    files[1].write_bytes(b"NOTAWAL!" + files[1].read_bytes()[8:])
    with pytest.raises(LogCorruptError, match="magic"):
        open_log(tmp_path)
    files[0].unlink()
    (tmp_path / META_NAME).unlink()
    with pytest.raises(LogCorruptError, match="missing"):
        open_log(tmp_path)


# --- durability failures --------------------------------------------------------------------


def test_disk_full_during_append_leaves_log_valid(tmp_path: Path, monkeypatch) -> None:
    log = open_log(tmp_path, fsync_policy="always")
    log.append(make(1, 5))
    seg = segments(tmp_path)[-1]
    size = seg.stat().st_size
    real_write = os.write
    target_fd = log._fd

    def full_write(fd, data):
        if fd == target_fd:
            real_write(fd, bytes(data)[:17])  # a partial write, then no space
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_write)
    with pytest.raises(DiskFullError):
        log.append(make(6, 3))
    monkeypatch.undo()
    assert log.last_index == 5 and seg.stat().st_size == size
    assert log.append(make(6, 3)) == 8
    log.close()
    with open_log(tmp_path) as log:
        assert log.read(1, 8) == make(1, 8) and log.open_report.torn_bytes_dropped == 0


def test_disk_full_while_rolling_removes_new_segment(tmp_path: Path, monkeypatch) -> None:
    log = open_log(tmp_path)
    log.append(make(1, 5))
    before = [(f.name, f.read_bytes()) for f in segments(tmp_path)]
    real_write = os.write
    active_fd = log._fd

    def full_write(fd, data):
        if fd != active_fd:  # the segment the roll creates
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_write)
    with pytest.raises(DiskFullError):
        log.append(make(6, 40))
    monkeypatch.undo()
    assert [(f.name, f.read_bytes()) for f in segments(tmp_path)] == before
    assert log.append(make(6, 40)) == 45
    log.close()
    with open_log(tmp_path) as log:
        assert log.read(1, 45) == make(1, 45)


def test_failed_group_fsync_fails_the_unsynced_appends(tmp_path: Path, monkeypatch) -> None:
    log = open_log(tmp_path, fsync_policy="batch")
    log.append(make(1, 3))

    real_fsync = os.fsync
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def fsync_failing_once(fd):
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_failing_once)
    with pytest.raises(DiskFullError):
        log.append(make(4, 2))
    assert log.last_index == 3 and log.durable_index == 3
    assert log.append(make(4, 2)) == 5

    def fsync_always_failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync_always_failing)
    with pytest.raises(StorageError):
        log.append(make(6, 1))
    with pytest.raises(StorageError, match="reopen"):  # the tail could not be dropped either
        log.append(make(6, 1))
    monkeypatch.undo()
    log.close()
    with open_log(tmp_path) as log:
        assert log.read(1, 5) == make(1, 5)
        assert log.last_index in (5, 6)  # 6 only if its bytes made it before the failure


# --- group commit ---------------------------------------------------------------------------


def test_group_commit_shares_fsyncs(tmp_path: Path, monkeypatch) -> None:
    log = open_log(tmp_path, fsync_policy="batch", segment_bytes_max=1 << 20)
    fsyncs = 0
    count_lock = threading.Lock()
    real_fsync = os.fsync

    def slow_fsync(fd):
        nonlocal fsyncs
        with count_lock:
            fsyncs += 1
        time.sleep(0.002)  # a disk slow enough that appenders pile up behind it
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    threads_count, appends_each, batch = 6, 15, 4
    next_index = 1
    index_lock = threading.Lock()
    errors: list[BaseException] = []

    def appender() -> None:
        nonlocal next_index
        try:
            for _ in range(appends_each):
                with index_lock:  # the caller assigns indexes in order, then appends
                    first = next_index
                    next_index += batch
                returned = log.append(make(first, batch))
                assert returned == first + batch - 1
                assert log.durable_index >= returned
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=appender) for _ in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert not errors
    appends = threads_count * appends_each
    total = appends * batch
    assert log.last_index == total and log.durable_index == total
    assert fsyncs < appends / 2, (fsyncs, appends)
    log.close()
    with open_log(tmp_path) as log:
        assert log.read(1, total) == make(1, total)


def test_reads_while_appending_and_truncating(tmp_path: Path) -> None:
    log = open_log(tmp_path, fsync_policy="never")
    log.append(make(1, 50))
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                records, first, last = log.read_records(1, entries_max=30, bytes_max=4000)
                assert decode_records(records) == make(1, last)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(30):
        log.append(make(51, 20))
        log.truncate_after(50)
    stop.set()
    thread.join()
    log.close()
    assert not errors


# --- model-based ----------------------------------------------------------------------------


class Model:
    """What the log must hold, kept the simple way."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self.last = 0
        self.epoch = 0
        self.base = (0, 0)
        self.history: list[tuple[int, int]] = []


op_strategy = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 12), st.booleans()),
    st.tuples(st.just("truncate"), st.integers(0, 40), st.booleans()),
    st.tuples(st.just("compact"), st.integers(0, 40), st.booleans()),
    st.tuples(st.just("reopen"), st.just(0), st.booleans()),
)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(op_strategy, max_size=25), policy=st.sampled_from(defaults.WAL_FSYNC_POLICIES))
def test_random_operations_match_a_model(ops: list[tuple[str, int, bool]], policy: str) -> None:
    directory = tempfile.mkdtemp(prefix="wal-model-")
    try:
        log = WriteAheadLog.open(directory, fsync_policy=policy, segment_bytes_max=400)
        model = Model()
        for op, amount, flag in ops:
            if op == "append":
                epoch = model.epoch + (1 if flag or model.epoch == 0 else 0)
                batch = make(model.last + 1, amount, epoch=epoch, size=10 + amount * 7)
                assert log.append(batch) == model.last + amount
                if not model.history or model.history[-1][0] != epoch:
                    model.history.append((epoch, model.last + 1))
                for e in batch:
                    model.entries[e.index] = e
                model.last += amount
                model.epoch = epoch
            elif op == "truncate":
                index = min(amount, model.last)
                first = log.first_index
                if index < first - 1:
                    with pytest.raises(LogGapError):
                        log.truncate_after(index)
                    continue
                assert log.truncate_after(index) == model.last - index
                for i in range(index + 1, model.last + 1):
                    del model.entries[i]
                model.history = [h for h in model.history if h[1] <= index]
                if index < model.base[0]:
                    model.base = (index, model.history[-1][0] if model.history else 0)
                model.last = index
                model.epoch = (
                    model.entries[index].epoch if index in model.entries else (model.base[1])
                )
            elif op == "compact":
                beyond = flag and amount > model.last
                if beyond:
                    index, epoch = amount, model.epoch + 1
                    assert log.compact(index, epoch) == index + 1
                    model.history = [h for h in model.history if h[0] <= epoch]
                    model.history.append((epoch, index))
                    model.entries.clear()
                    model.last, model.epoch = index, epoch
                    model.base = (index, epoch)
                else:
                    index = min(amount, model.last)
                    if index <= model.base[0]:
                        continue
                    log.compact(index, model.entries[index].epoch)
                    model.base = (index, model.entries[index].epoch)
            else:
                log.close()
                log = WriteAheadLog.open(directory, fsync_policy=policy, segment_bytes_max=400)
                assert log.open_report.torn_bytes_dropped == 0
            first = log.first_index
            assert first <= model.base[0] + 1
            assert log.last_index == model.last and log.last_epoch == model.epoch
            assert log.epoch_history == model.history
            assert log.epoch_at(model.base[0]) == model.base[1]
            if model.last >= first:
                held = log.read(first, model.last)
                assert held == [model.entries[i] for i in range(first, model.last + 1)]
                for i in range(first, model.last + 1):
                    assert log.epoch_at(i) == model.entries[i].epoch
        log.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_segment_name_format() -> None:
    assert segment_name(1) == "00000000000000000001.wal"


def test_append_records_hands_back_the_entries_it_checked(tmp_path: Path) -> None:
    source = WriteAheadLog.open(tmp_path / "a")
    source.append([Entry(2, i, b"r%d" % i, b"p" * i) for i in range(1, 40)])
    records, first, last = source.read_records(1, entries_max=100, bytes_max=1 << 20)
    target = WriteAheadLog.open(tmp_path / "b")
    out: list[Entry] = []
    assert target.append_records(records, first, last, out=out) == 39
    assert out == decode_records(records) == target.read(1, 39)


def test_append_records_fast_path_keeps_epoch_changes_and_refuses_bad_batches(
    tmp_path: Path,
) -> None:
    source = WriteAheadLog.open(tmp_path / "a")
    source.append([Entry(1, i, b"", b"x") for i in range(1, 6)])
    source.append([Entry(3, i, b"", b"y") for i in range(6, 11)])
    records, first, last = source.read_records(1, entries_max=100, bytes_max=1 << 20)
    target = WriteAheadLog.open(tmp_path / "b")
    with pytest.raises(LogCorruptError, match="claimed"):
        target.append_records(records, 1, 11)  # one record short of the claim
    flipped = bytearray(records)
    flipped[len(records) // 2] ^= 0x40
    with pytest.raises(LogCorruptError):
        target.append_records(bytes(flipped), first, last)
    assert target.last_index == 0
    assert target.append_records(records, first, last) == 10
    assert target.epoch_history == source.epoch_history == [(1, 1), (3, 6)]
    one_epoch, f2, l2 = source.read_records(6, entries_max=100, bytes_max=1 << 20)
    other = WriteAheadLog.open(tmp_path / "c")
    other.compact(5, 1)
    assert other.append_records(one_epoch, f2, l2) == 10
    assert other.read(6, 10) == source.read(6, 10)
    assert other.epoch_at(6) == 3


def test_compaction_to_an_installed_snapshot_adopts_the_snapshot_history(tmp_path) -> None:
    # A replica that installs a snapshot (or receives a migrated copy) at index 500 of a log
    # whose epoch 1 began at 1 and epoch 2 at 300 must say so, not that epoch 2 began at 500:
    # checkers and divergence checks read who wrote what from this history.
    wal = WriteAheadLog.open(tmp_path / "wal")
    try:
        wal.compact(500, 2, [(1, 1), (2, 300), (3, 700)])
        assert wal.epoch_history == [(1, 1), (2, 300)]
        assert (wal.first_index, wal.last_index) == (501, 500)
    finally:
        wal.close()
    again = WriteAheadLog.open(tmp_path / "wal")
    try:
        assert again.epoch_history == [(1, 1), (2, 300)]
    finally:
        again.close()
    # Without it, the snapshot's epoch is recorded as starting at the base.
    other = WriteAheadLog.open(tmp_path / "other")
    try:
        other.compact(500, 2)
        assert other.epoch_history == [(2, 500)]
    finally:
        other.close()
