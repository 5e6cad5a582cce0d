"""The agent's supervisor (`failover.agent.supervisor`, issue 16) with stand-in children: it
numbers each child durably, sees each exit for certain (its code, or the signal), reports it
to the coordinator before starting the next, follows a follower's redirect to the leader,
refuses an answer from a deposed coordinator's term, and gives up after too many exits."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.supervisor import INCARNATION_FILE, IncarnationCounter, Supervisor
from failover.errors import StorageError
from failover.net.channels import LEADER_METADATA_KEY
from failover.processes import free_port
from failover.v1 import coordinator_pb2, coordinator_pb2_grpc


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Records exit reports; a follower redirects to `leader`."""

    def __init__(self, term: int = 1, leader: str = "") -> None:
        self.reports: list[coordinator_pb2.ProcessExitedRequest] = []
        self.term = term
        self.leader = leader

    def ProcessExited(self, request, context):  # type: ignore[no-untyped-def]
        if self.leader:
            context.set_trailing_metadata(((LEADER_METADATA_KEY, self.leader),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader")
        self.reports.append(request)
        return coordinator_pb2.ProcessExitedReply(coordinator_term=self.term)


@pytest.fixture
def coordinators() -> Iterator[tuple[list[FakeCoordinator], list[str]]]:
    servers, fakes, addresses = [], [], []
    leader_address = f"127.0.0.1:{free_port()}"
    for leader in (leader_address, ""):  # a follower first, naming the leader
        fake = FakeCoordinator(leader=leader)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
        address = f"127.0.0.1:{free_port()}" if leader else leader_address
        server.add_insecure_port(address)
        server.start()
        servers.append(server)
        fakes.append(fake)
        addresses.append(address)
    yield fakes, addresses
    for server in servers:
        server.stop(None)


def config(tmp_path: Path, addresses: list[str]) -> AgentConfig:
    return AgentConfig.from_mapping({"host_id": "h1", "listen": "127.0.0.1:7000",
                                     "data_dir": str(tmp_path), "coordinator": ",".join(addresses)})


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_each_exit_is_reported_with_its_incarnation_before_the_next_child_starts(
        tmp_path: Path, coordinators: tuple[list[FakeCoordinator], list[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    (follower, leader), addresses = coordinators
    monkeypatch.setattr(defaults, "SUPERVISOR_RESTARTS_MAX", 3)
    monkeypatch.setattr(defaults, "SUPERVISOR_BACKOFF_MIN_MS", 1)
    # The child learns its incarnation (and its parent's death signal) as the agent does,
    # and dies of SIGKILL the second time.
    code = ("import os, signal, sys\n"
            "from failover.agent.supervisor import child_incarnation\n"
            "n = child_incarnation()\n"
            "if n == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
            "sys.exit(n)\n")
    supervisor = Supervisor(config(tmp_path, addresses), None, child(code))
    assert supervisor.run() == 1  # three exits within the window: it gives up
    assert [(r.host_id, r.incarnation, r.exit_code) for r in leader.reports] == [
        ("h1", 1, 1), ("h1", 2, -9), ("h1", 3, 3)]
    assert not follower.reports  # redirected to the leader
    assert (tmp_path / INCARNATION_FILE).read_text().strip() == "3"
    assert (tmp_path / INCARNATION_FILE).stat().st_mode & 0o777 == 0o600


def test_an_answer_from_an_older_term_than_the_host_has_seen_is_not_taken(
        tmp_path: Path, coordinators: tuple[list[FakeCoordinator], list[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    (_, leader), addresses = coordinators
    monkeypatch.setattr(defaults, "SUPERVISOR_REPORT_TIMEOUT_MS", 200)
    (tmp_path / "coordinator-term").write_text("5\n")  # the child saw term 5
    leader.term = 4  # a deposed leader answers
    supervisor = Supervisor(config(tmp_path, addresses), None, child("pass"))
    assert supervisor.reporter.report(1, 0, 0.0) is False
    leader.term = 5
    assert supervisor.reporter.report(1, 0, 0.0) is True


def test_a_stop_is_passed_to_the_child_and_not_followed_by_a_restart(
        tmp_path: Path, coordinators: tuple[list[FakeCoordinator], list[str]]) -> None:
    (_, leader), addresses = coordinators
    ready = tmp_path / "child-ready"
    code = ("import pathlib, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "time.sleep(30)\n")
    supervisor = Supervisor(config(tmp_path, addresses), None, child(code))
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(supervisor.run()))
    runner.start()
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:  # its handler is installed
        time.sleep(0.01)
    supervisor.on_signal(15, None)  # what SIGTERM runs (`run_supervised` installs it)
    runner.join(15)
    assert result == [0]
    assert [(r.incarnation, r.exit_code) for r in leader.reports] == [(1, 0)]


def test_a_damaged_incarnation_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / INCARNATION_FILE).write_text("seven\n")
    with pytest.raises(StorageError, match="delete it only while no agent runs"):
        IncarnationCounter(tmp_path).next()


def test_a_data_dir_that_does_not_exist_yet_is_made_private_before_the_first_child(
        tmp_path: Path) -> None:
    """The supervisor writes the incarnation before any child made the data dir (a fresh
    host: the first agents with TLS failed to start, the file's directory missing)."""
    data_dir = tmp_path / "fresh" / "host1"
    supervisor = Supervisor(config(data_dir, []), None, child("pass"))
    assert supervisor.counter.next() == 1
    assert data_dir.stat().st_mode & 0o777 == 0o700


def test_the_supervisor_process_does_not_import_the_agent_it_supervises(tmp_path: Path) -> None:
    """`failover-agent` with a supervisor imports only what the supervisor needs: the agent
    (its replicas, servers and metrics) loads in the child alone, so that every start of an
    agent is not slowed by importing it twice."""
    code = (
        "import sys\n"
        "from failover.agent import supervisor\n"
        "supervisor.run_supervised = lambda config, tls: print(' '.join(sorted(sys.modules)))\n"
        "from failover.agent.main import main\n"
        f"main(['--host-id', 'h1', '--listen', '127.0.0.1:{free_port()}', '--data-dir', "
        f"{str(tmp_path / 'data')!r}, '--insecure'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert "failover.agent.supervisor" in loaded  # the stand-in ran where the supervisor would
    assert not loaded & {"failover.agent.daemon", "failover.agent.host",
                         "failover.agent.replica", "failover.net.agent_servicers"}
