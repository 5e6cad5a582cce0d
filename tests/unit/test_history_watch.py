"""WatchHistory and `failoverctl events` (issue 17, item 4): the backlog after a seq, then
events as they are committed, filtered by service; a watcher that falls behind is cut off
without slowing the coordinator; a follower redirects; the CLI prints one JSON object per
line and takes --format after the subcommand."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from failover import defaults
from failover.coordinator import leadership
from failover.coordinator.history_feed import HistoryFeed
from failover.coordinator.server import Coordinator
from failover.core.coordinator import Timing
from failover.core.permissions import METHOD_PERMISSIONS, READ_STATUS
from failover.errors import Unavailable, WatcherBehind
from failover.storage.sqlite_store import SqliteStore
from failover.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.unit.test_cli_admin import run


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Coordinator, str]]:
    """A leading coordinator on SQLite, served as the daemon serves it."""
    coordinator = Coordinator(SqliteStore(tmp_path / "cluster.db"), Timing(),
                              address="127.0.0.1:1")
    await coordinator.start()
    server = grpc.aio.server(interceptors=[leadership.LeaderGate(coordinator)])
    leadership.add_to_server(server, coordinator)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield coordinator, f"127.0.0.1:{port}"
    await server.stop(0)
    await coordinator.stop()


async def _record(coordinator: Coordinator, service: str, what: str) -> None:
    """One history event, committed as the coordinator commits any (an audit row)."""
    await coordinator.audit("test", what, service, "ok", service)


async def _take(stream: grpc.aio.UnaryStreamCall, count: int) -> list[coordinator_pb2.HistoryEvent]:
    out = []
    async with asyncio.timeout(10):
        async for event in stream:
            out.append(event)
            if len(out) == count:
                break
    return out


async def test_a_watch_gets_the_backlog_after_a_seq_then_new_events_of_its_service(served):
    coordinator, address = served
    for i in range(3):
        await _record(coordinator, "kv", f"old{i}")
    await _record(coordinator, "bank", "other")
    kept = await coordinator.store.history(None, 100)
    first = kept[0].seq
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        request = coordinator_pb2.WatchHistoryRequest(service="kv", follow=True)
        request.after_seq = first  # the first kv event is before it: not sent
        stream = stub.WatchHistory(request)
        backlog = await _take(stream, 2)
        assert [e.message for e in backlog] == [kept[1].message, kept[2].message]
        await _record(coordinator, "bank", "not mine")
        await _record(coordinator, "kv", "live")
        live = await _take(stream, 1)
        assert live[0].service == "kv" and "live" in live[0].message
        assert live[0].seq > backlog[-1].seq
        stream.cancel()
        # Without follow and without after_seq: the newest `last`, then the stream ends.
        newest = [e async for e in stub.WatchHistory(
            coordinator_pb2.WatchHistoryRequest(last=2))]
        assert [e.message for e in newest] == [r.message for r in
                                               (await coordinator.store.history(None, 2))]
    await asyncio.sleep(0)
    assert coordinator.history_feed.watchers == 0


async def test_bad_input_is_invalid_argument(served):
    _, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for request in (coordinator_pb2.WatchHistoryRequest(service="../etc"),
                        coordinator_pb2.WatchHistoryRequest(
                            last=defaults.HISTORY_WATCH_LAST_MAX + 1)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.WatchHistory(request):
                    pass
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details()


async def test_a_slow_watcher_is_cut_off_and_never_slows_the_publisher(tmp_path):
    async with SqliteStore(tmp_path / "cluster.db") as store:
        feed = HistoryFeed(store, lambda: Unavailable("not leading"))
        watch = feed.watch(None, None, 0, follow=True)
        first = asyncio.ensure_future(watch.__anext__())
        async with asyncio.timeout(5):
            while feed.watchers == 0:  # the watch is registered and waits
                await asyncio.sleep(0.001)
        feed.publish([1], [("kv", "k", "one", {})])
        assert (await first).seq == 1
        # It reads nothing more while far more than its queue holds is published: every
        # publish returns at once.
        loop = asyncio.get_running_loop()
        started = loop.time()
        count = defaults.HISTORY_WATCH_QUEUE_MAX + 10
        for seq in range(2, 2 + count):
            feed.publish([seq], [("kv", "k", f"e{seq}", {})])
        assert loop.time() - started < 1.0
        with pytest.raises(WatcherBehind, match="resume after seq 1"):
            await watch.__anext__()
        assert feed.watchers == 0


async def test_a_coordinator_that_stops_leading_ends_its_watches_and_a_follower_redirects(
        served):
    coordinator, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        await _record(coordinator, "kv", "before")
        stream = stub.WatchHistory(coordinator_pb2.WatchHistoryRequest(follow=True, last=1))
        assert len(await _take(stream, 1)) == 1
        coordinator.deposed("test")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await _take(stream, 1)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as redirected:
            await _take(stub.WatchHistory(coordinator_pb2.WatchHistoryRequest()), 1)
        assert redirected.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not the leader" in (redirected.value.details() or "")


def test_watching_history_takes_the_right_to_read_it():
    assert METHOD_PERMISSIONS["/failover.v1.Coordinator/WatchHistory"] == READ_STATUS


async def test_events_prints_one_json_object_per_line_with_format_after_the_subcommand(
        served, capsys):
    coordinator, address = served
    for i in range(3):
        await _record(coordinator, "kv" if i != 1 else "bank", f"e{i}")
    code, out, err = await asyncio.to_thread(
        run, capsys, "--coordinator", address, "events", "--service", "kv", "--since", "0",
        "--format", "json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["service"] for e in lines] == ["kv", "kv"]
    assert set(lines[0]) == {"seq", "at", "service", "kind", "message", "details"}
    code, out, err = await asyncio.to_thread(
        run, capsys, "--coordinator", address, "events", "--last", "1")
    assert code == 0, err
    assert len(out.splitlines()) == 1 and "audit" in out


async def test_events_follow_prints_events_as_they_are_committed(served, capsys):
    coordinator, address = served
    task = asyncio.ensure_future(asyncio.to_thread(
        run, capsys, "--format", "json", "--coordinator", address, "events", "--follow",
        "--last", "0", "--resume-timeout-ms", "0"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while coordinator.history_feed.watchers == 0:
        assert loop.time() < deadline, "the CLI never started watching"
        await asyncio.sleep(0.02)
    await _record(coordinator, "kv", "live")
    coordinator.deposed("test over")  # ends the stream: the CLI says how to resume
    code, out, err = await asyncio.wait_for(task, 10)
    assert code == 1
    assert json.loads(out.splitlines()[0])["message"] == "test: live kv: ok"
    assert "resume with --since" in err and len(err.strip().splitlines()) == 1


async def test_events_follow_resumes_after_a_new_leader_without_repeating(served, capsys):
    coordinator, address = served
    await _record(coordinator, "kv", "before")
    task = asyncio.ensure_future(asyncio.to_thread(
        run, capsys, "--format", "json", "--coordinator", address, "events", "--follow",
        "--last", "1", "--resume-timeout-ms", "1500"))
    loop = asyncio.get_running_loop()

    async def watching() -> None:
        deadline = loop.time() + 10
        while coordinator.history_feed.watchers == 0:
            assert loop.time() < deadline, "the CLI is not watching"
            await asyncio.sleep(0.02)

    await watching()
    coordinator.deposed("a new leader, say")
    await coordinator.lead(2)  # the CLI resumes after "before", from whoever leads
    await watching()
    await _record(coordinator, "kv", "after")
    deadline = loop.time() + 10
    while coordinator.history_feed.queued:  # "after" is taken by the stream, so sent first
        assert loop.time() < deadline, "the watch does not take its events"
        await asyncio.sleep(0.01)
    coordinator.deposed("gone for good")  # past --resume-timeout-ms it gives up
    code, out, err = await asyncio.wait_for(task, 20)
    messages = [json.loads(line)["message"] for line in out.splitlines()]
    assert messages == ["test: before kv: ok", "test: after kv: ok"], (messages, err)
    assert code == 1 and "resume with --since" in err
