"""Our daemons (and etcd) as real processes on 127.0.0.1: a free port to listen on, waiting for
a condition under a deadline, and a process in its own session that is started, probed until it
serves, signalled (SIGSTOP, SIGKILL, SIGTERM) and restarted. `failover.localcluster` builds
clusters from these; `failover.etcd_local` runs etcd members with them.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from failover.errors import FailoverError
from failover.net.channels import blocking_channel
from failover.net.tls import TlsFiles, TlsMaterial

__all__ = ["READY_TIMEOUT_S", "ManagedProcess", "free_port", "sync_channel", "tls_flags",
           "wait_for"]

T = TypeVar("T")

READY_TIMEOUT_S = 20.0


_PORTS_LOW = 10_000  # local daemons listen between this and the ephemeral range
_PORT_TRIES_MAX = 200
_PORTS_GIVEN_MAX = 8_192  # remembered by `free_port`; a third of the range it draws from

_ports_given: dict[int, None] = {}  # in the order given, oldest first


def free_port() -> int:
    """A port nothing listens on right now, below the kernel's ephemeral range, and not one
    this process handed out already (the last `_PORTS_GIVEN_MAX` of them).

    A port the OS hands out for port 0 comes from the ephemeral range, which outgoing
    connections also draw from: one of them could take it between this check and the daemon's
    bind ("address already in use"). Below that range only another listener can.

    A cluster draws its daemons' ports before any of them binds, so a port drawn twice was
    free both times: two agents got the same one (a 1 in 4,000 chance per cluster, and a test
    run starts hundreds). The second agent's child failed to bind and its supervisor started
    it again and again, while the first agent answered the readiness probe on that port, and
    the cluster waited out its registration deadline."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    rng = random.Random()
    for _ in range(_PORT_TRIES_MAX if ephemeral_low > _PORTS_LOW + 1000 else 0):
        port = rng.randrange(_PORTS_LOW, ephemeral_low)
        if port in _ports_given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return _given(port)
    for _ in range(_PORT_TRIES_MAX):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _ports_given:
            return _given(port)
    raise OSError(f"no free port found in {_PORT_TRIES_MAX} tries")


def _given(port: int) -> int:
    """Remembers `port` as handed out, forgetting the oldest beyond `_PORTS_GIVEN_MAX`."""
    _ports_given[port] = None
    while len(_ports_given) > _PORTS_GIVEN_MAX:
        del _ports_given[next(iter(_ports_given))]
    return port


def wait_for(condition: Callable[[], T], timeout_s: float, what: str,
             interval_s: float = 0.02) -> T:
    """Polls `condition` until it returns something truthy; raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the condition may fail while a process starts
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout_s:.1f} s waiting for {what}{detail}")
        time.sleep(interval_s)


def tls_flags(files: TlsFiles | None) -> list[str]:
    """The ``--tls-ca/--tls-cert/--tls-key`` flags of a daemon or failoverctl for `files`."""
    if files is None:
        return []
    return ["--tls-ca", str(files.ca), "--tls-cert", str(files.cert), "--tls-key", str(files.key)]


def sync_channel(address: str, tls: TlsFiles | TlsMaterial | None = None) -> grpc.Channel:
    """A blocking channel to a daemon: mutual TLS with `tls`, in the clear without. With the
    daemons' own channel options: gRPC's default reconnect backoff starts at 1 s, and a
    readiness probe whose first try found the daemon not listening yet then failed at once
    for a second or more after it was serving (every cluster start waited it out)."""
    material = tls.load() if isinstance(tls, TlsFiles) else tls
    return blocking_channel(address, material)


class ManagedProcess:
    """A daemon of ours as a process in its own session, logging to a file under the root.

    With `tls` (the daemon's own certificate) it serves mutual TLS; `caller_tls` is the
    certificate the harness presents on the channel it opens to the daemon."""

    what = "process"

    def __init__(self, address: str, log_path: Path, *, tls: TlsFiles | None = None,
                 caller_tls: TlsFiles | None = None, insecure: bool = False) -> None:
        self.address = address
        self.log_path = log_path
        self.tls = tls
        self.caller_tls = caller_tls
        self.insecure = insecure  # serve in the clear beyond loopback (netns without TLS)
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self._caller_material: TlsMaterial | None = None
        self.restarts = 0
        self.paused = False  # SIGSTOPped by `pause`
        self.env: dict[str, str] = {}  # added to the daemon's environment (e.g. PYTHONPATH)

    def tls_command(self) -> list[str]:
        """The daemon's TLS flags (or --insecure when told to serve in the clear)."""
        if self.tls is not None:
            return tls_flags(self.tls)
        return ["--insecure"] if self.insecure else []

    def command(self) -> list[str]:
        raise NotImplementedError

    def probe(self) -> None:
        """One cheap call that succeeds once the daemon serves."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Runs before each start (e.g. making the data dir)."""

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            if self.caller_tls is not None and self._caller_material is None:
                self._caller_material = self.caller_tls.load()
            self._channel = sync_channel(self.address, self._caller_material)
        return self._channel

    def start(self, wait: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.paused = False
        self.prepare()
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise FailoverError(f"{self.what} exited with {self.proc.returncode}; "
                                    f"log tail:\n{self.log_tail()}")
            self.probe()
            return True

        wait_for(ready, timeout_s, f"{self.what} to serve on {self.address}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: the process stops answering (and acting); its sockets stay open, as a
        hung host's do."""
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        self.signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused:
            self.resume()  # a stopped process dies of SIGKILL too; resumed, it is reaped cleanly
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
