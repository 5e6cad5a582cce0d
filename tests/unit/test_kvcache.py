"""The kvcache kind: ops against a dict-of-lists model, limits, determinism, snapshots, and the
arena pages alone (a live migration's target) rebuilding the same state."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo_services.kvcache import UNIT_BYTES, KvCacheService
from failover import defaults, kinds
from failover.errors import InvalidRequest, RequestRejected, StateCorruptError
from failover.paged_state import PagedState

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SESSIONS_MAX = 3
BLOCKS_MAX = 6


def _filled(size: int, byte: int) -> bytes:
    return bytes([byte]) * size


NAMES = st.sampled_from(["a", "b", "c", "d", "сессия", "s" * 40])
BLOCKS = st.one_of(
    st.binary(max_size=40),
    # Blocks of several units, exactly a unit, and ones ending just past a unit boundary.
    st.builds(_filled, st.integers(1, 3 * UNIT_BYTES + 1), st.integers(0, 255)),
    st.sampled_from([UNIT_BYTES, 2 * UNIT_BYTES, UNIT_BYTES + 1]).map(lambda n: b"\x07" * n),
)

BAD = st.sampled_from(
    [
        None,
        [],
        "append_block",
        {},
        {"op": "nope"},
        {"op": 3},
        {1: "stats"},
        {"op": "append_block", "session": "a"},
        {"op": "append_block", "block": b"x"},
        {"op": "append_block", "session": "a", "block": "text"},
        {"op": "append_block", "session": "a", "block": None},
        {"op": "append_block", "session": b"a", "block": b"x"},
        {"op": "append_block", "session": "", "block": b"x"},
        {"op": "append_block", "session": "n" * 257, "block": b"x"},
        {"op": "read_session"},
        {"op": "read_session", "session": "a", "first": -1},
        {"op": "read_session", "session": "a", "count": True},
        {"op": "read_session", "session": "a", "first": "0"},
        {"op": "drop_session", "session": None},
    ]
)


@st.composite
def commands(draw: st.DrawFn) -> list[Any]:
    out: list[Any] = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(
            ["append", "append", "append", "read", "read_range", "drop", "stats", "bad"]
        ))  # fmt: skip
        if kind == "append":
            out.append({"op": "append_block", "session": draw(NAMES), "block": draw(BLOCKS)})
        elif kind == "read":
            out.append({"op": "read_session", "session": draw(NAMES)})
        elif kind == "read_range":
            request: dict[str, Any] = {"op": "read_session", "session": draw(NAMES)}
            if draw(st.booleans()):
                request["first"] = draw(st.integers(0, 8))
            if draw(st.booleans()):
                request["count"] = draw(st.integers(0, 8))
            out.append(request)
        elif kind == "drop":
            out.append({"op": "drop_session", "session": draw(NAMES)})
        elif kind == "stats":
            out.append({"op": "stats"})
        else:
            out.append(draw(BAD))
    return out


class Model:
    """kvcache semantics on a dict of lists; the result, or the exception type."""

    def __init__(self) -> None:
        self.sessions: dict[str, list[bytes]] = {}

    def run(self, c: Any) -> dict | type[Exception]:
        ops = ("append_block", "read_session", "drop_session", "stats")
        if not isinstance(c, dict) or not all(isinstance(k, str) for k in c):
            return InvalidRequest
        if c.get("op") not in ops:
            return InvalidRequest
        op = c["op"]
        if op == "stats":
            blocks = [b for bs in self.sessions.values() for b in bs]
            return {"sessions": len(self.sessions), "blocks": len(blocks),
                    "bytes": sum(map(len, blocks))}  # fmt: skip
        name = c.get("session")
        if not isinstance(name, str) or not name or len(name.encode()) > 256:
            return InvalidRequest
        if op == "drop_session":
            dropped = self.sessions.pop(name, None)
            found = dropped is not None
            return {"ok": True, "found": found, "blocks_dropped": len(dropped or [])}
        if op == "read_session":
            for key in ("first", "count"):
                if key in c and (type(c[key]) is not int or c[key] < 0):
                    return InvalidRequest
            blocks = self.sessions.get(name)
            if blocks is None:
                return {"ok": True, "found": False, "blocks": [], "total": 0, "next": 0}
            start = min(c.get("first", 0), len(blocks))
            end = len(blocks) if "count" not in c else min(len(blocks), start + c["count"])
            return {"ok": True, "found": True, "blocks": blocks[start:end],
                    "total": len(blocks), "next": end}  # fmt: skip
        block = c.get("block")
        if type(block) is not bytes or len(block) > defaults.KVCACHE_BLOCK_BYTES_MAX:
            return InvalidRequest
        if name not in self.sessions and len(self.sessions) >= SESSIONS_MAX:
            return RequestRejected
        blocks = self.sessions.setdefault(name, [])
        if len(blocks) >= BLOCKS_MAX:
            return RequestRejected
        blocks.append(block)
        return {"ok": True, "blocks": len(blocks), "bytes": sum(map(len, blocks))}


def _new(**kwargs: Any) -> KvCacheService:
    kwargs.setdefault("sessions_max", SESSIONS_MAX)
    kwargs.setdefault("session_blocks_max", BLOCKS_MAX)
    return KvCacheService(**kwargs)


def _run(kind: KvCacheService, command: Any) -> dict | type[Exception]:
    """Apply (or query, for read-only ops) as the framework would; exceptions become types."""
    before = kind.digest()
    try:
        if kind.is_read_only(command):
            result = kind.query(command)
            assert kind.digest() == before, f"query {command!r} changed state"
        else:
            result = kind.apply(command)
    except (InvalidRequest, RequestRejected) as exc:
        assert str(exc)  # every refusal says why
        assert kind.digest() == before, f"{command!r} raised {exc!r} but changed state"
        return type(exc)
    if isinstance(command, dict) and command.get("op") == "stats":
        assert result.pop("ok") is True
        assert result.pop("arena_bytes") == kind.paged.size_bytes
        assert 0 <= result.pop("free_bytes") < kind.paged.size_bytes
    return result


def _arena(kind: KvCacheService) -> bytes:
    return kind.paged.read(0, kind.paged.size_bytes)


def _like(kind: KvCacheService) -> KvCacheService:
    """An empty instance shaped and bounded as `kind`."""
    return KvCacheService(page_bytes=kind.paged.page_bytes, pages_max=kind.paged.pages_max,
                          sessions_max=kind.sessions_max,
                          session_blocks_max=kind.session_blocks_max)  # fmt: skip


def _restored(kind: KvCacheService) -> KvCacheService:
    copy = _like(kind)
    copy.restore(kind.snapshot())
    return copy


def _migrated(source: KvCacheService, target: KvCacheService | None = None) -> KvCacheService:
    """A live migration's target: the source's dirty pages (all of them, the first time),
    the arena's size, then reload_paged()."""
    if target is None:
        target = _like(source)
        source.paged.mark_all_dirty()
    for n in source.paged.take_dirty():
        target.paged.set_page(n, source.paged.page(n))
    target.paged.grow(source.paged.page_count)
    target.reload_paged()
    return target


def _reads(kind: KvCacheService, names: list[str]) -> list[dict]:
    return [kind.query({"op": "read_session", "session": n}) for n in names]


# --- against the model ---------------------------------------------------------------------


@SETTINGS
@given(commands(), st.data())
def test_agrees_with_model_replicas_snapshots_and_pages(commands: list[Any], data: st.DataObject):
    model, a, b = Model(), _new(), _new()
    split = data.draw(st.integers(0, len(commands)))
    how = data.draw(st.sampled_from(["snapshot", "pages"]))
    for i, command in enumerate(commands):
        if i == split:
            # A replica that restarted from a snapshot, or received the pages, mid-way.
            b = _restored(b) if how == "snapshot" else _migrated(b)
        expected = model.run(command)
        assert _run(a, command) == expected, command
        assert _run(b, command) == expected, command
    assert a.digest() == b.digest()
    assert _arena(a) == _arena(b)
    assert a.session_count == len(model.sessions)

    names = [*model.sessions, "absent"]
    for copy in (_restored(a), _migrated(a)):
        assert copy.digest() == a.digest()
        assert _reads(copy, names) == _reads(a, names) == [
            model.run({"op": "read_session", "session": n}) for n in names
        ]
        assert copy.query({"op": "stats"}) == a.query({"op": "stats"})


@SETTINGS
@given(commands(), st.sampled_from([1024, 16384]))
def test_other_page_sizes_hold_the_same_sessions(commands: list[Any], page_bytes: int) -> None:
    model, kind = Model(), _new(page_bytes=page_bytes)
    for command in commands:
        assert _run(kind, command) == model.run(command), command
    assert kind.paged.size_bytes % UNIT_BYTES == 0
    names = [*model.sessions, "absent"]
    for copy in (_restored(kind), _migrated(kind)):
        assert copy.digest() == kind.digest()
        assert _reads(copy, names) == _reads(kind, names)


# --- ops -----------------------------------------------------------------------------------


def test_ops_and_results() -> None:
    kc = KvCacheService()
    block = bytes(range(256)) * 128  # 32 KiB
    assert kc.apply({"op": "append_block", "session": "s", "block": block}) == {
        "ok": True, "blocks": 1, "bytes": 32768,
    }  # fmt: skip
    assert kc.apply({"op": "append_block", "session": "s", "block": b"tail"}) == {
        "ok": True, "blocks": 2, "bytes": 32772,
    }  # fmt: skip
    assert kc.apply({"op": "append_block", "session": "t", "block": b""})["blocks"] == 1
    assert kc.query({"op": "read_session", "session": "s"}) == {
        "ok": True, "found": True, "blocks": [block, b"tail"], "total": 2, "next": 2,
    }  # fmt: skip
    assert kc.query({"op": "read_session", "session": "s", "first": 1}) == {
        "ok": True, "found": True, "blocks": [b"tail"], "total": 2, "next": 2,
    }  # fmt: skip
    assert kc.query({"op": "read_session", "session": "s", "first": 0, "count": 1})["blocks"] == [
        block
    ]
    assert kc.query({"op": "read_session", "session": "s", "first": 9})["blocks"] == []
    assert kc.query({"op": "read_session", "session": "t"})["blocks"] == [b""]
    assert kc.query({"op": "read_session", "session": "u"}) == {
        "ok": True, "found": False, "blocks": [], "total": 0, "next": 0,
    }  # fmt: skip
    stats = kc.query({"op": "stats"})
    assert stats == {"ok": True, "sessions": 2, "blocks": 3, "bytes": 32772,
                     "arena_bytes": kc.paged.size_bytes, "free_bytes": 0}  # fmt: skip
    assert kc.apply({"op": "drop_session", "session": "s"}) == {
        "ok": True, "found": True, "blocks_dropped": 2,
    }  # fmt: skip
    assert kc.apply({"op": "drop_session", "session": "s"}) == {
        "ok": True, "found": False, "blocks_dropped": 0,
    }  # fmt: skip
    assert kc.query({"op": "stats"})["sessions"] == 1
    # Reads also answer through apply, like the other kinds; writes never through query.
    assert kc.apply({"op": "read_session", "session": "t"})["found"]
    with pytest.raises(InvalidRequest, match="send it as a write"):
        kc.query({"op": "append_block", "session": "s", "block": b"x"})
    assert KvCacheService.is_read_only({"op": "read_session", "session": "s"})
    assert KvCacheService.is_read_only({"op": "stats"})
    assert not KvCacheService.is_read_only({"op": "append_block"})
    assert not KvCacheService.is_read_only({"op": "drop_session"})


def test_bad_requests_say_why_and_change_nothing() -> None:
    kc = KvCacheService()
    kc.apply({"op": "append_block", "session": "s", "block": b"x"})
    before = kc.digest()
    cases = [
        ({"op": "append_block", "session": "s", "block": b"x" * (1 << 20 | 1)},
         "'block' of 'append_block' request is 1048577 bytes; the limit is 1048576"),
        ({"op": "append_block", "session": "s", "block": "text"}, "'block'.*must be bytes"),
        ({"op": "append_block", "session": "s"}, "missing field 'block'"),
        ({"op": "append_block", "session": "", "block": b"x"}, "'session'.*must not be empty"),
        ({"op": "append_block", "session": "n" * 257, "block": b"x"},
         "'session'.*257 bytes; the limit is 256"),
        ({"op": "read_session", "session": "s", "first": -1}, "'first'.*at least 0"),
        ({"op": "read_session", "session": "s", "count": True}, "'count'.*must be int"),
        ({"op": "drop_session"}, "missing field 'session'"),
        ({"op": "evict"}, "unknown op 'evict'"),
    ]  # fmt: skip
    for request, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            kc.apply(request)
        assert kc.digest() == before


def test_count_limits_are_refused_by_name() -> None:
    kc = KvCacheService(sessions_max=2, session_blocks_max=3)
    for name in ("a", "b"):
        kc.apply({"op": "append_block", "session": name, "block": b"x"})
    before = kc.digest()
    with pytest.raises(RequestRejected, match="holds 2 sessions.*KVCACHE_SESSIONS_MAX.*'c'"):
        kc.apply({"op": "append_block", "session": "c", "block": b"x"})
    assert kc.digest() == before
    kc.apply({"op": "append_block", "session": "a", "block": b"y"})
    kc.apply({"op": "append_block", "session": "a", "block": b"z"})
    before = kc.digest()
    with pytest.raises(RequestRejected, match="'a' holds 3 blocks.*KVCACHE_SESSION_BLOCKS_MAX"):
        kc.apply({"op": "append_block", "session": "a", "block": b"w"})
    assert kc.digest() == before
    kc.apply({"op": "drop_session", "session": "b"})
    assert kc.apply({"op": "append_block", "session": "c", "block": b"x"})["blocks"] == 1


def test_full_arena_refuses_without_change() -> None:
    # Eight units: the header, then a session's head and ref unit and five block units.
    kc = KvCacheService(pages_max=8)
    assert kc.paged.page_count == 1
    before = kc.digest()
    with pytest.raises(RequestRejected, match="kvcache is full.*'s'.*raise pages_max"):
        kc.apply({"op": "append_block", "session": "s", "block": b"x" * (6 * UNIT_BYTES)})
    # The block alone would have fitted, growing the arena: that growth was undone too.
    assert kc.digest() == before and kc.paged.page_count == 1
    kc.apply({"op": "append_block", "session": "s", "block": b"x" * (5 * UNIT_BYTES)})
    assert kc.paged.page_count == 8
    before = kc.digest()
    with pytest.raises(RequestRejected, match="full"):
        kc.apply({"op": "append_block", "session": "s", "block": b"y"})
    assert kc.digest() == before
    kc.apply({"op": "append_block", "session": "s", "block": b""})  # takes no unit
    kc.apply({"op": "drop_session", "session": "s"})
    kc.apply({"op": "append_block", "session": "t", "block": b"z" * (5 * UNIT_BYTES)})
    assert kc.paged.page_count == 8


def test_reads_are_bounded_and_page_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "KVCACHE_READ_BYTES_MAX", 3 * UNIT_BYTES)
    monkeypatch.setattr(defaults, "KVCACHE_BLOCK_BYTES_MAX", 2 * UNIT_BYTES)
    kc = KvCacheService()
    blocks = [bytes([i]) * UNIT_BYTES for i in range(5)] + [b"b" * (2 * UNIT_BYTES)]
    for block in blocks:
        kc.apply({"op": "append_block", "session": "s", "block": block})
    got: list[bytes] = []
    first = 0
    while True:
        reply = kc.query({"op": "read_session", "session": "s", "first": first})
        assert sum(map(len, reply["blocks"])) <= 3 * UNIT_BYTES and reply["blocks"]
        got += reply["blocks"]
        first = reply["next"]
        if first == reply["total"]:
            break
    assert got == blocks


# --- the arena -----------------------------------------------------------------------------


def test_same_commands_same_arena_bytes() -> None:
    a, b = KvCacheService(), KvCacheService()
    for kc in (a, b):
        for i in range(60):
            block = bytes([i]) * (i * 700)
            kc.apply({"op": "append_block", "session": f"s{i % 7}", "block": block})
            if i % 9 == 8:
                kc.apply({"op": "drop_session", "session": f"s{(i * 3) % 7}"})
    assert a.digest() == b.digest() and len(a.digest()) == 32
    assert _arena(a) == _arena(b)
    c = KvCacheService()
    c.apply({"op": "append_block", "session": "s0", "block": b"other"})
    assert c.digest() != a.digest()


def test_a_rebuilt_index_allocates_like_the_original() -> None:
    # The free space is derived, not stored: after a rebuild every later choice is the same.
    source = KvCacheService()
    for i in range(40):
        source.apply({"op": "append_block", "session": f"s{i % 5}", "block": b"x" * (i * 900)})
    for name in ("s1", "s3"):
        source.apply({"op": "drop_session", "session": name})
    target = _migrated(source)
    copy = _restored(source)
    for i in range(40):
        command = {"op": "append_block", "session": f"n{i % 3}", "block": b"y" * (i * 1300)}
        results = {kc.apply(command)["bytes"] for kc in (source, target, copy)}
        assert len(results) == 1
    assert source.digest() == target.digest() == copy.digest()
    assert _arena(source) == _arena(target) == _arena(copy)


def test_long_runs_on_a_small_arena_stay_deterministic() -> None:
    # Many drops and appends of mixed sizes fragment the free space and fill the arena; a
    # replica rebuilt from its pages every few hundred commands answers and refuses alike.
    rng = random.Random(7)
    a, b = KvCacheService(pages_max=300), KvCacheService(pages_max=300)
    model: dict[str, list[bytes]] = {}
    refused = 0
    for i in range(4000):
        name = f"s{rng.randrange(30)}"
        if rng.random() < 0.15:
            command: dict[str, Any] = {"op": "drop_session", "session": name}
        else:
            size = rng.choice([0, 10, UNIT_BYTES, 5000, 9000, 20000, 33000])
            command = {"op": "append_block", "session": name, "block": bytes([i % 256]) * size}
        outcomes: list[Any] = []
        for kc in (a, b):
            try:
                outcomes.append(kc.apply(command))
            except RequestRejected:
                outcomes.append(RequestRejected)
        assert outcomes[0] == outcomes[1], (i, command["op"])
        if outcomes[0] is RequestRejected:
            refused += 1
        elif command["op"] == "drop_session":
            model.pop(name, None)
        else:
            model.setdefault(name, []).append(command["block"])
        if i % 500 == 499:
            assert _arena(a) == _arena(b)
            b = _migrated(b)
    assert refused  # the arena did fill up
    assert a.digest() == b.digest()
    for name, blocks in model.items():
        assert a.query({"op": "read_session", "session": name})["blocks"] == blocks


def test_drop_zeroes_and_space_is_reused() -> None:
    kc = KvCacheService()
    block = b"\xaa" * 32768
    for i in range(64):
        kc.apply({"op": "append_block", "session": f"s{i % 4}", "block": block})
    pages = kc.paged.page_count
    for i in range(4):
        assert kc.apply({"op": "drop_session", "session": f"s{i}"})["blocks_dropped"] == 16
    # Only the header is left: every freed page is zero (elided on the wire).
    assert all(kc.paged.is_zero_page(n) for n in range(1, kc.paged.page_count))
    assert kc.query({"op": "stats"})["free_bytes"] == kc.paged.size_bytes - UNIT_BYTES
    for i in range(64):
        kc.apply({"op": "append_block", "session": f"t{i % 2}", "block": block})
    assert kc.paged.page_count == pages
    assert kc.query({"op": "read_session", "session": "t1", "first": 31})["blocks"] == [block]


def test_many_blocks_cross_ref_units() -> None:
    kc = KvCacheService()
    blocks = [bytes([i % 251]) * (i % 300) for i in range(1300)]  # three ref units
    for block in blocks:
        kc.apply({"op": "append_block", "session": "long", "block": block})
    kc.apply({"op": "append_block", "session": "short", "block": b"s"})
    for copy in (_restored(kc), _migrated(kc)):
        assert copy.digest() == kc.digest()
        reply = copy.query({"op": "read_session", "session": "long"})
        assert reply["blocks"] == blocks and reply["next"] == 1300
    kc.apply({"op": "drop_session", "session": "long"})
    assert _migrated(kc).query({"op": "stats"})["blocks"] == 1


def test_precopy_rounds_converge_on_the_same_state() -> None:
    # Round 0 sends every page; later rounds only what was dirtied since, as in a migration.
    source = KvCacheService()
    for i in range(30):
        source.apply({"op": "append_block", "session": f"s{i % 3}", "block": bytes([i]) * 20000})
    target = _migrated(source)
    for i in range(30, 50):
        source.apply({"op": "append_block", "session": f"s{i % 4}", "block": bytes([i]) * 9000})
        if i == 40:
            source.apply({"op": "drop_session", "session": "s0"})
    target = _migrated(source, target)
    assert target.digest() == source.digest()
    names = ["s0", "s1", "s2", "s3"]
    assert _reads(target, names) == _reads(source, names)


def test_snapshot_is_taken_at_the_call() -> None:
    kc = KvCacheService()
    kc.apply({"op": "append_block", "session": "s", "block": b"before"})
    digest = kc.digest()
    chunks = kc.snapshot()
    kc.apply({"op": "append_block", "session": "s", "block": b"after" * 5000})
    copy = KvCacheService()
    copy.restore(chunks)
    assert copy.digest() == digest


def test_snapshot_chunks_are_bounded_and_boundaries_do_not_matter() -> None:
    kc = KvCacheService()
    for i in range(50):
        kc.apply({"op": "append_block", "session": f"s{i % 2}", "block": bytes([i]) * 50_000})
    chunks = list(kc.snapshot())
    assert max(map(len, chunks)) <= defaults.SNAPSHOT_CHUNK_BYTES
    data = b"".join(chunks)
    copy = KvCacheService()
    copy.restore([data[:3], data[3:100_000], data[100_000:]])
    assert copy.digest() == kc.digest()


def _damaged_snapshots(good: bytes) -> list[bytes]:
    arena_at = 16  # after the snapshot header

    def at(offset: int, data: bytes) -> bytes:
        return good[:arena_at + offset] + data + good[arena_at + offset + len(data):]

    u = UNIT_BYTES
    return [
        b"",
        b"XXXX" + good[4:],
        good[:-1],
        good + bytes(u),
        good[:8] + (1024).to_bytes(4, "little") + good[12:],  # another page size
        at(0, b"NOPE"),  # arena magic
        at(12, (999).to_bytes(4, "little")),  # first session outside the arena
        at(16, (0).to_bytes(4, "little")),  # last session is not the list's end
        at(100, b"\x01"),  # the rest of the header unit
        at(u, b"XXXX"),  # the first session's magic
        at(u + 12, (600).to_bytes(4, "little")),  # its block count (needs a 2nd ref unit)
        at(u + 12, (0).to_bytes(4, "little")),  # no blocks
        at(u + 24, (5).to_bytes(8, "little")),  # its byte count
        at(u + 20, (0).to_bytes(4, "little")),  # its name length
        at(u + 32, b"\xff"),  # its name is not UTF-8
        at(2 * u - 1, b"\x01"),  # past its name
        at(2 * u + 8, (1).to_bytes(4, "little")),  # a block ref names the head unit
        at(2 * u + 4000, b"\x01"),  # past the last ref
        at(2 * u + 5, b"\x01"),  # the zero word after the ref unit's link
        at(3 * u + 300, b"\x01"),  # past a block's bytes
        at(len(good) - arena_at - 1, b"\x01"),  # a free unit
    ]


def test_restore_refuses_damage_and_keeps_the_old_state() -> None:
    source = KvCacheService()
    source.apply({"op": "append_block", "session": "first", "block": b"x" * 300})
    source.apply({"op": "append_block", "session": "second", "block": b"y" * 5000})
    source.apply({"op": "append_block", "session": "third", "block": b"z" * 9000})
    source.apply({"op": "drop_session", "session": "third"})  # leaves free (zero) units at the end
    good = b"".join(source.snapshot())
    target = KvCacheService()
    target.apply({"op": "append_block", "session": "mine", "block": b"kept"})
    before = target.digest()
    for i, data in enumerate(_damaged_snapshots(good)):
        with pytest.raises(StateCorruptError):
            target.restore([data])
        assert target.digest() == before, i
        assert target.query({"op": "read_session", "session": "mine"})["blocks"] == [b"kept"]
    target.restore([good])
    assert target.digest() == source.digest()


def test_reload_paged_refuses_damaged_pages() -> None:
    source = KvCacheService()
    source.apply({"op": "append_block", "session": "s", "block": b"x" * 300})
    target = _migrated(source)
    target.paged.write(UNIT_BYTES, b"XXXX")
    with pytest.raises(StateCorruptError, match="bad magic"):
        target.reload_paged()
    empty = KvCacheService()
    empty.paged.load(bytes(UNIT_BYTES))
    with pytest.raises(StateCorruptError, match="bad magic"):
        empty.reload_paged()


def test_constructor_bounds() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        KvCacheService(page_bytes=1024, pages_max=3)
    with pytest.raises(ValueError, match="at least 1"):
        KvCacheService(sessions_max=0)
    assert KvCacheService(page_bytes=1024).paged.page_count == 4
    big = KvCacheService(page_bytes=16384)
    assert big.query({"op": "stats"})["free_bytes"] == 3 * UNIT_BYTES


def test_append_of_a_block_is_one_copy_not_a_loop() -> None:
    # Cheap guard against a per-byte path: 256 appends of 32 KiB stay well under a second.
    kc = KvCacheService()
    block = bytes(32768)
    start = time.perf_counter()
    for i in range(256):
        kc.apply({"op": "append_block", "session": f"s{i % 8}", "block": block})
    assert time.perf_counter() - start < 1.0


# --- registry ------------------------------------------------------------------------------


def test_registered_as_kvcache() -> None:
    kind = kinds.load_kind("kvcache")
    assert kind is KvCacheService
    assert "kvcache" in kinds.registered_names()
    assert isinstance(kinds.create("kvcache"), KvCacheService)
    assert KvCacheService.needs_memory_bytes == defaults.KVCACHE_NEEDS_MEMORY_BYTES
    assert KvCacheService.needs_disk_bytes == defaults.KVCACHE_NEEDS_DISK_BYTES
    assert isinstance(KvCacheService().paged, PagedState)
