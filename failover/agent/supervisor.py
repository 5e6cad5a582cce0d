"""The agent's supervisor: `failover-agent` runs its work in a child process and tells the
coordinator at once when that process exits (issue 16, the crash fast path; docs/design.md,
Failure detection).

The supervisor is the process `failover-agent` starts. It holds no replica and no port and
runs no event loop. It counts the child's **incarnation** in `DATA-DIR/agent-incarnation`
(written before the child starts, so numbers never repeat, also across supervisors), starts
the child (`python -m failover.agent` with the same flags, the incarnation in its
environment), and waits for it (its pidfd, then `waitpid`): when that returns the child is gone for
certain, whatever killed it. It then reports "host H's agent process of incarnation X exited
with code C at T" to the leading coordinator (`ProcessExited`, authenticated with the host's
own certificate) and starts the next incarnation, after a backoff that doubles while the
child keeps dying, at most `SUPERVISOR_RESTARTS_MAX` times in `SUPERVISOR_RESTART_WINDOW_MS`
(then it gives up and exits: the host is then silent, and the timeout path takes over).

gRPC in the parent. The report must go out within milliseconds, so the supervisor keeps a
blocking gRPC channel to each coordinator, made and connected before the first child starts;
starting a Python reporter process per exit would cost more than the whole target. A process
that has gRPC's threads must never `fork` (the child would inherit locks held by threads that
do not exist in it), so the supervisor never forks: it starts every child with
`os.posix_spawn`, which glibc carries out as `clone(CLONE_VM | CLONE_VFORK)` followed at once
by `execve`, running no `pthread_atfork` handlers and no Python code in between. The child
runs none of the parent's gRPC state: it is a fresh interpreter.

Process groups. The harness starts `failover-agent` in a session of its own; the child stays
in the supervisor's process group, so that a signal to the group (a terminal's Ctrl-C, the
chaos runner's SIGSTOP of a hung host, a SIGKILL of "the agent") reaches both. The child asks
the kernel to SIGKILL it when its parent dies (`PR_SET_PDEATHSIG`), so a supervisor killed
alone takes its child with it: the host goes silent and the timeout path decides, as for a
lost host; an orphaned child that nobody reports on is never left serving. SIGTERM or SIGINT
to the supervisor is passed to the child, which stops cleanly; that exit is reported too
(its primaries then fail over at once), and the supervisor exits with the child's code.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import grpc

from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.restart import reexec_command
from failover.agent.term import CoordinatorTerm
from failover.clock import monotonic_ms
from failover.errors import ConfigError, StorageError
from failover.net import channels
from failover.net.leader import LeaderFollower
from failover.net.tls import TlsMaterial
from failover.observe import logs
from failover.storage.atomic import read_counter, write_atomic
from failover.storage.modes import make_private_dir
from failover.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger("failover.agent.supervisor")

INCARNATION_FILE = "agent-incarnation"
_INCARNATION_FILE_BYTES_MAX = 32
# The child's environment: which process it is, and whom to expect as its parent.
ROLE_ENV = "FAILOVER_AGENT_CHILD"
INCARNATION_ENV = "FAILOVER_AGENT_INCARNATION"
SUPERVISOR_PID_ENV = "FAILOVER_AGENT_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1
_WAKE_S = 0.1  # how often a wait on the child looks whether a stop was asked


# --- the child's side ------------------------------------------------------------------------


def child_incarnation() -> int:
    """In the child: its incarnation (0 when not started by a supervisor). Also ties the
    child's life to the supervisor's (`PR_SET_PDEATHSIG`), and exits at once if the
    supervisor is already gone (it died between spawning and this call)."""
    if os.environ.get(ROLE_ENV) != "1":
        return 0
    try:
        incarnation = int(os.environ.get(INCARNATION_ENV, ""))
        supervisor = int(os.environ.get(SUPERVISOR_PID_ENV, ""))
    except ValueError:
        raise ConfigError(f"{ROLE_ENV} is set but {INCARNATION_ENV} or {SUPERVISOR_PID_ENV} "
                          "is not a number: only the supervisor starts the agent's child "
                          "process; unset them to run an agent without one") from None
    if not 0 < incarnation <= defaults.AGENT_INCARNATION_MAX:
        raise ConfigError(f"{INCARNATION_ENV}={incarnation} is outside "
                          f"1..{defaults.AGENT_INCARNATION_MAX}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != supervisor:
        raise SystemExit("failover-agent: the supervisor that started this process is gone")
    return incarnation


# --- the incarnation counter -----------------------------------------------------------------


class IncarnationCounter:
    """The last incarnation started on this host, in `data_dir / INCARNATION_FILE` (0600,
    replaced atomically). A number is written before the child that carries it starts, so
    no two processes of one data dir ever carry the same one."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / INCARNATION_FILE

    def next(self) -> int:
        """The next incarnation, recorded durably (StorageError if it cannot be)."""
        value = self._read() + 1
        if value > defaults.AGENT_INCARNATION_MAX:
            raise StorageError(f"{self.path}: incarnation {value} is past the largest; "
                               "delete the file only while no agent runs on this data dir")
        try:
            write_atomic(self.path, f"{value}\n".encode())
        except OSError as exc:
            raise StorageError(f"cannot record agent incarnation {value} in {self.path}: "
                               f"{exc}; free space or fix the data dir's permissions") from exc
        return value

    def _read(self) -> int:
        try:
            value = read_counter(self.path, _INCARNATION_FILE_BYTES_MAX)
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc}; fix its permissions (it "
                               "belongs to the agent's user, mode 0600)") from exc
        if isinstance(value, str):
            raise StorageError(f"{self.path} holds {value!r}, not an incarnation: it numbers "
                               "this host's agent processes; delete it only while no agent "
                               "runs on this data dir")
        return value


# --- the report ------------------------------------------------------------------------------


class ExitReporter:
    """Sends `ProcessExited` to the leading coordinator over blocking channels made once
    (before any child starts: see the module's note on fork), following a follower's
    redirect like the agent's link (`failover.net.leader`), and refusing an answer from a
    coordinator term older than the host has seen (a deposed leader; the child keeps the
    term in the data dir, `failover.agent.term`)."""

    def __init__(self, config: AgentConfig, tls: TlsMaterial | None) -> None:
        self.config = config
        addresses = [str(a) for a in config.coordinators]
        # No coordinator configured: nobody to tell (the agent alone, in tests).
        self.coordinators = LeaderFollower(
            addresses, backoff_min_ms=10,
            backoff_max_ms=defaults.SUPERVISOR_REPORT_CALL_TIMEOUT_MS) if addresses else None
        self._channels = {a: channels.blocking_channel(a, tls) for a in addresses}
        for channel in self._channels.values():
            # Connect now, so that the report does not wait for a TCP and TLS handshake.
            channel.subscribe(_ignore_state, try_to_connect=True)

    def report(self, incarnation: int, exit_code: int, exited_at: float) -> bool:
        """Tells the leader; True once one accepted it. Gives up after
        `SUPERVISOR_REPORT_TIMEOUT_MS` or on a refusal (the host then counts as silent once
        its heartbeats stop: the timeout path)."""
        if self.coordinators is None:
            return False
        request = coordinator_pb2.ProcessExitedRequest(
            host_id=self.config.host_id, incarnation=incarnation, exit_code=exit_code,
            exited_at=exited_at)
        deadline_ms = monotonic_ms() + defaults.SUPERVISOR_REPORT_TIMEOUT_MS
        while True:
            address = self.coordinators.current
            left_ms = deadline_ms - monotonic_ms()
            if left_ms <= 0:
                log.warning("no coordinator took the exit report of incarnation %d within "
                            "%d ms (%s): the timeout path decides", incarnation,
                            defaults.SUPERVISOR_REPORT_TIMEOUT_MS,
                            self.coordinators.describe())
                return False
            stub = coordinator_pb2_grpc.CoordinatorStub(self._channels[address])
            call_ms = min(left_ms, defaults.SUPERVISOR_REPORT_CALL_TIMEOUT_MS)
            try:
                reply = stub.ProcessExited(request, timeout=call_ms / 1000)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                            grpc.StatusCode.PERMISSION_DENIED):
                    details = exc.details()  # type: ignore[attr-defined]
                    log.warning("coordinator %s refused the exit report of incarnation %d: "
                                "%s", address, incarnation, details)
                    return False
                wait_s = self.coordinators.failed(exc)
                time.sleep(min(wait_s, max(0, deadline_ms - monotonic_ms()) / 1000))
                continue
            seen = _term_seen(self.config.data_dir)
            if reply.coordinator_term < seen:
                log.warning("coordinator %s answered the exit report at term %d, older than "
                            "term %d this host has seen: deposed; trying the next", address,
                            reply.coordinator_term, seen)
                time.sleep(min(self.coordinators.failed(),
                               max(0, deadline_ms - monotonic_ms()) / 1000))
                continue
            self.coordinators.answered()
            return True

    def close(self) -> None:
        for channel in self._channels.values():
            channel.unsubscribe(_ignore_state)  # its watcher thread ends before the channel
            channel.close()


def _ignore_state(_state: grpc.ChannelConnectivity) -> None:
    """A connectivity watcher: subscribing one is what makes a channel connect now."""


def _term_seen(data_dir: Path) -> int:
    """The highest coordinator term the child recorded (read afresh: the child writes it)."""
    try:
        return CoordinatorTerm(data_dir).seen
    except StorageError as exc:
        log.warning("%s", exc)
        return 0


# --- the supervisor --------------------------------------------------------------------------


class Supervisor:
    """Starts the child, waits for it, reports its exit, restarts it (bounded)."""

    def __init__(self, config: AgentConfig, tls: TlsMaterial | None,
                 command: list[str] | None = None) -> None:
        self.config = config
        self.command = command or reexec_command()
        # The child makes it too, but the incarnation is written there before it starts.
        make_private_dir(config.data_dir)
        self.counter = IncarnationCounter(config.data_dir)
        self.reporter = ExitReporter(config, tls)
        self.stopping = threading.Event()
        self.child: int | None = None
        self._exits: deque[int] = deque(maxlen=defaults.SUPERVISOR_RESTARTS_MAX)

    def on_signal(self, signum: int, _frame: object) -> None:
        """SIGTERM or SIGINT (installed by `run_supervised`): stop."""
        # A stop: passed on to the child, which stops cleanly; no restart after it.
        self.stopping.set()
        child = self.child
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    def _spawn(self, incarnation: int) -> int:
        env = {**os.environ, ROLE_ENV: "1", INCARNATION_ENV: str(incarnation),
               SUPERVISOR_PID_ENV: str(os.getpid())}
        # posix_spawn, never fork: this process holds gRPC channels (see the module's note).
        return os.posix_spawn(self.command[0], self.command, env)

    def _wait(self, pid: int) -> int:
        """Blocks until child `pid` exits; its exit code (negative: the signal). It waits on
        the child's pidfd, which becomes readable the moment the child is gone (no polling
        delay), waking every `_WAKE_S` to see whether a stop was asked; once one was, the
        child is SIGKILLed if it outlives `SUPERVISOR_STOP_TIMEOUT_MS`."""
        fd = os.pidfd_open(pid)
        stop_deadline_ms: float | None = None
        try:
            while True:
                select.select([fd], [], [], _WAKE_S)
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return os.waitstatus_to_exitcode(status)
                if not self.stopping.is_set():
                    continue
                now_ms = monotonic_ms()
                if stop_deadline_ms is None:
                    stop_deadline_ms = now_ms + defaults.SUPERVISOR_STOP_TIMEOUT_MS
                elif now_ms >= stop_deadline_ms:
                    log.warning("child %d still runs %d ms after SIGTERM: SIGKILL", pid,
                                defaults.SUPERVISOR_STOP_TIMEOUT_MS)
                    os.kill(pid, signal.SIGKILL)
                    stop_deadline_ms = float("inf")
        finally:
            os.close(fd)

    def run(self) -> int:
        """Supervises until stopped (the child's last exit code) or until the child dies
        too often (1)."""
        backoff_ms = defaults.SUPERVISOR_BACKOFF_MIN_MS
        try:
            while True:
                incarnation = self.counter.next()
                started_ms = monotonic_ms()
                self.child = self._spawn(incarnation)
                log.info("agent %s: started child %d, incarnation %d", self.config.host_id,
                         self.child, incarnation)
                code = self._wait(self.child)
                self.child = None
                exited_at = time.time()
                log.log(logging.INFO if self.stopping.is_set() else logging.WARNING,
                        "agent %s: child incarnation %d exited with code %d after %d ms",
                        self.config.host_id, incarnation, code, monotonic_ms() - started_ms)
                self.reporter.report(incarnation, code, exited_at)
                if self.stopping.is_set():
                    return code
                now_ms = monotonic_ms()
                self._exits.append(now_ms)
                if (len(self._exits) == self._exits.maxlen
                        and now_ms - self._exits[0] < defaults.SUPERVISOR_RESTART_WINDOW_MS):
                    log.error("agent %s: the child exited %d times within %d ms: giving up "
                              "(see its log above)", self.config.host_id, len(self._exits),
                              defaults.SUPERVISOR_RESTART_WINDOW_MS)
                    return 1
                if now_ms - started_ms >= defaults.SUPERVISOR_BACKOFF_MAX_MS:
                    backoff_ms = defaults.SUPERVISOR_BACKOFF_MIN_MS  # it had run a while
                if self.stopping.wait(backoff_ms / 1000):
                    return code
                backoff_ms = min(backoff_ms * 2, defaults.SUPERVISOR_BACKOFF_MAX_MS)
        finally:
            self.reporter.close()


def run_supervised(config: AgentConfig, tls: TlsMaterial | None) -> None:
    """Blocking entry point of `failover-agent` (unless --no-supervisor): exits with the
    supervisor's code."""
    # As its child logs (`--log-format`, `--log-level`): both write to the same stderr.
    logs.configure(config.host_id, config.log_format, config.log_level, sys.stderr)
    supervisor = Supervisor(config, tls)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, supervisor.on_signal)
    try:
        code = supervisor.run()
    except StorageError as exc:  # the incarnation file: nothing may start without it
        log.error("%s", exc)
        code = 1
    sys.exit(code)
