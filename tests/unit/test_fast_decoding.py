"""The replay's fast decoders accept exactly what the slow ones accept, with the same result.

* the write-ahead log's batch decoder (`wal._decode_fast`, used by `read` and
  `decode_records`) against the record-by-record scan, on good and damaged records;
* kv's run-at-a-time arena check (`kv._parse_runs`, used by `restore` and `reload_paged`)
  against the slot-by-slot walk, on arenas of random commands and damaged ones.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo_services import kv as kv_module
from demo_services.kv import KvService
from failover.errors import LogCorruptError, StateCorruptError
from failover.storage import records as records_module
from failover.storage.records import Entry, decode_records, encode_records
from failover.storage.wal import WriteAheadLog

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ENTRIES = st.lists(
    st.builds(Entry, st.integers(0, 2**40), st.integers(0, 2**40), st.binary(max_size=20),
              st.binary(max_size=300)),
    min_size=1, max_size=30)


def _slow_decode(data: bytes) -> list[Entry] | tuple[int, str]:
    out: list[Entry] = []
    scan = records_module._scan(data, 0, len(data), next_index=0, prev_epoch=-1,
                                check_order=False, out=out)
    return out if scan.problem is None else scan.problem[:2]


def _decode(data: bytes) -> list[Entry] | tuple[int, str]:
    try:
        return decode_records(data)
    except LogCorruptError as exc:
        return exc.offset, exc.reason


@SETTINGS
@given(ENTRIES, st.data())
def test_wal_batch_decode_equals_the_scan_on_damage_too(entries: list[Entry],
                                                        data: st.DataObject) -> None:
    blob = encode_records(entries)
    assert records_module._decode_fast(blob) == entries
    assert decode_records(blob) == entries
    damage = data.draw(st.sampled_from(["flip", "cut", "extend", "body"]))
    if damage == "flip":
        at = data.draw(st.integers(0, len(blob) - 1))
        bad = blob[:at] + bytes([blob[at] ^ data.draw(st.integers(1, 255))]) + blob[at + 1:]
    elif damage == "cut":
        bad = blob[: data.draw(st.integers(1, len(blob) - 1))] if len(blob) > 1 else b"\x00"
    elif damage == "extend":
        bad = blob + data.draw(st.binary(min_size=1, max_size=12))
    else:  # a well-framed record whose body is not [int, int, bytes, bytes]
        body = data.draw(st.sampled_from([b"\x93\x01\x02\x03", b"\x94\xa1x\x01\xc4\x00\xc4\x00",
                                          b"\x94\x01\xc3\xc4\x00\xc4\x00", b"\xc1", b"\x01"]))
        bad = blob + _frame(body)
    slow = _slow_decode(bad)
    if isinstance(slow, list):
        assert records_module._decode_fast(bad) == slow
    else:
        assert records_module._decode_fast(bad) is None
    assert _decode(bad) == slow


def _frame(body: bytes) -> bytes:
    import crc32c

    return records_module._HEADER.pack(len(body), crc32c.crc32c(body)) + body


def test_wal_read_uses_the_batch_decoder_and_still_names_damage(tmp_path: Any) -> None:
    entries = [Entry(1, i, b"r%d" % i, b"p" * 50) for i in range(1, 201)]
    with WriteAheadLog.open(tmp_path, fsync_policy="never") as log:
        log.append(entries)
        assert log.read(1, 200) == entries
        assert log.read(17, 60) == entries[16:60]
    segment = next(tmp_path.glob("*.wal"))
    raw = bytearray(segment.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    segment.write_bytes(bytes(raw))
    with pytest.raises(LogCorruptError, match=segment.name):
        WriteAheadLog.open(tmp_path, fsync_policy="never")


# --- kv arenas -----------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "ключ", "", "k" * 40, "x" * 300])
VALUES = st.one_of(st.text(max_size=10), st.binary(max_size=10),
                   st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 3000),
                             st.integers(0, 255)))
COMMANDS = st.lists(
    st.one_of(
        st.builds(lambda k, v: {"op": "put", "key": k, "value": v}, KEYS, VALUES),
        st.builds(lambda k: {"op": "delete", "key": k}, KEYS),
    ),
    max_size=60)


def _layout(parse: Any, buf: bytearray) -> Any:
    try:
        layout = parse(buf)
    except StateCorruptError:
        return StateCorruptError
    if layout is None:
        return None
    return layout.bump, layout.live, layout.heads, sorted(layout.index.items())


@SETTINGS
@given(COMMANDS, st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)),
                          max_size=3))
def test_kv_run_check_accepts_exactly_what_the_walk_accepts(commands: list[dict],
                                                            flips: list[tuple[int, int]]
                                                            ) -> None:
    kv = KvService()
    kv.apply_batch(commands)
    arena = bytearray(kv.paged.read(0, kv.paged.size_bytes))
    walked = _layout(kv_module._parse_arena_walk, arena)
    assert walked is not StateCorruptError
    assert _layout(kv_module._parse_runs, arena) == walked
    for at, mask in flips:  # damage anywhere, the slot headers included
        arena[at % len(arena)] ^= mask
    walked = _layout(kv_module._parse_arena_walk, arena)
    fast = _layout(kv_module._parse_runs, arena)
    if walked is StateCorruptError:
        assert fast is None
    else:
        assert fast in (walked, None)  # None: the walk decides, and it accepts
    assert _layout(kv_module._parse_arena, arena) == walked


def test_kv_restore_in_any_chunking_and_damage_keep_the_old_state() -> None:
    source = KvService()
    source.apply_batch([{"op": "put", "key": f"k{i:05d}", "value": "v" * (i % 300)}
                        for i in range(3000)])
    source.apply_batch([{"op": "delete", "key": f"k{i:05d}"} for i in range(0, 3000, 7)])
    good = b"".join(source.snapshot())
    for step in (1, 7, 4096, len(good)):
        target = KvService()
        target.restore(good[i:i + step] for i in range(0, len(good), step))
        assert target.digest() == source.digest() and target.key_count == source.key_count
        assert target.query({"op": "get", "key": "k00008"})["value"] == "v" * 8
    target = KvService()
    target.apply({"op": "put", "key": "mine", "value": "kept"})
    before = target.digest()
    for bad in (good[:10], good[:-4096], good + bytes(4096), good[:16] + b"\x01" + good[17:]):
        with pytest.raises(StateCorruptError):
            target.restore([bad])
        assert target.digest() == before


def _slots(buf: bytearray) -> list[tuple[int, int, int]]:
    """(offset, state, size class) of every slot of a valid arena."""
    bump = kv_module._ARENA_HEAD.unpack_from(buf, 0)[2]
    out, offset = [], kv_module._DATA_START
    while offset < bump:
        state, cls = buf[offset], buf[offset + 1]
        out.append((offset, state, cls))
        offset += kv_module._SIZES[cls]
    return out


def _put_u32(buf: bytearray, at: int, value: int) -> None:
    buf[at:at + 4] = value.to_bytes(4, "little")


@pytest.mark.parametrize("damage", [
    "state", "tag", "link", "record_too_small", "record_too_big", "key_not_utf8",
    "duplicate_key", "free_tag", "free_key_len", "live_count"])
@pytest.mark.parametrize("with_free_slots", [False, True], ids=["all_live", "mixed"])
def test_kv_run_check_refuses_each_kind_of_slot_damage(damage: str,
                                                       with_free_slots: bool) -> None:
    if damage.startswith("free_") and not with_free_slots:
        pytest.skip("needs free slots")
    kv = KvService()
    kv.apply_batch([{"op": "put", "key": f"key-{i:03d}", "value": "v" * 60} for i in range(300)])
    if with_free_slots:
        kv.apply_batch([{"op": "delete", "key": f"key-{i:03d}"} for i in range(0, 300, 10)])
    arena = bytearray(kv.paged.read(0, kv.paged.size_bytes))
    slots = _slots(arena)
    live = [o for o, state, _ in slots if state == kv_module._LIVE]
    free = [o for o, state, _ in slots if state == kv_module._FREE]
    assert (len(live), len(free)) == ((270, 30) if with_free_slots else (300, 0))
    at = live[len(live) // 2]
    if damage == "state":
        arena[at] = 7
    elif damage == "tag":
        arena[at + 2] = 3
    elif damage == "link":
        arena[at + 12] = 1
    elif damage == "record_too_small":  # the record would fit a smaller size class
        _put_u32(arena, at + 8, 0)
    elif damage == "record_too_big":
        _put_u32(arena, at + 8, 4000)
    elif damage == "key_not_utf8":
        arena[at + 20] = 0xFF
    elif damage == "duplicate_key":
        arena[at + 20:at + 27] = arena[live[0] + 20:live[0] + 27]
    elif damage == "free_tag":
        arena[free[3] + 2] = 1
    elif damage == "free_key_len":
        _put_u32(arena, free[3] + 4, 1)
    else:
        arena[16:24] = (len(live) + 1).to_bytes(8, "little")
    assert kv_module._parse_runs(arena) is None
    with pytest.raises(StateCorruptError):
        kv_module._parse_arena(arena)


def test_skip_records_cuts_checked_records_into_parts() -> None:
    entries = [Entry(1, i, b"r" * (i % 5), b"p" * (i * 7 % 300)) for i in range(1, 41)]
    blob = encode_records(entries)
    assert records_module.skip_records(blob, 0) == 0
    assert records_module.skip_records(blob, 40) == len(blob)
    assert records_module.skip_records(blob, 99) == len(blob)
    parts, start = [], 0
    while start < len(blob):
        cut = records_module.skip_records(blob, 6, start)
        parts.append(decode_records(memoryview(blob)[start:cut]))
        start = cut
    assert [len(p) for p in parts] == [6] * 6 + [4]
    assert [e for p in parts for e in p] == entries
