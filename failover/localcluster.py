"""A cluster of real agent processes on 127.0.0.1, for tests, demos, benchmarks and chaos runs.

Each agent is its own process in its own session (so a signal reaches it alone), with a free
port and a data dir under one root. Waits poll a condition under a deadline.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from failover.errors import FailoverError
from failover.netns import HostNetwork
from failover.smalldisk import SmallDisk
from failover.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc

T = TypeVar("T")

READY_TIMEOUT_S = 20.0


_PORTS_LOW = 10_000  # local daemons listen between this and the ephemeral range
_PORT_TRIES_MAX = 200


def free_port() -> int:
    """A port nothing listens on right now, below the kernel's ephemeral range.

    A port the OS hands out for port 0 comes from the ephemeral range, which outgoing
    connections also draw from: one of them could take it between this check and the daemon's
    bind ("address already in use"). Below that range only another listener can."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    rng = random.Random()
    for _ in range(_PORT_TRIES_MAX if ephemeral_low > _PORTS_LOW + 1000 else 0):
        port = rng.randrange(_PORTS_LOW, ephemeral_low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


class ManagedProcess:
    """A daemon of ours as a process in its own session, logging to a file under the root."""

    what = "process"

    def __init__(self, address: str, log_path: Path) -> None:
        self.address = address
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self.restarts = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def probe(self) -> None:
        """One cheap call that succeeds once the daemon serves."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Runs before each start (e.g. making the data dir)."""

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def start(self, wait: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.prepare()
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
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

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
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


class AgentProcess(ManagedProcess):
    """One `failover-agent` process."""

    def __init__(self, root: Path, host_id: str, *, fsync_policy: str = "batch",
                 extra: dict[str, Any] | None = None, ip: str = "127.0.0.1",
                 prefix: list[str] | None = None) -> None:
        super().__init__(f"{ip}:{free_port()}", root / f"{host_id}.log")
        self.prefix = list(prefix or [])  # e.g. `ip netns exec NS` for a partitionable host
        self.what = f"agent {host_id}"
        self.host_id = host_id
        self.data_dir = root / host_id
        self.fsync_policy = fsync_policy
        self.extra = dict(extra or {})

    def command(self) -> list[str]:
        cmd = [*self.prefix, sys.executable, "-m", "failover.agent", "--host-id", self.host_id,
               "--listen", self.address, "--data-dir", str(self.data_dir),
               "--fsync-policy", self.fsync_policy]
        for key, value in self.extra.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        return cmd

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def probe(self) -> None:
        self.control().GetStatus(agent_pb2.GetStatusRequest(), timeout=0.5)

    def control(self) -> agent_pb2_grpc.AgentControlStub:
        return agent_pb2_grpc.AgentControlStub(self.channel())

    # --- control shortcuts ---------------------------------------------------------------

    def status(self) -> agent_pb2.AgentStatus:
        return self.control().GetStatus(agent_pb2.GetStatusRequest(), timeout=5)

    def replica(self, service: str) -> agent_pb2.ReplicaStatus | None:
        for r in self.status().replicas:
            if r.service == service:
                return r
        return None

    def digest(self, service: str) -> agent_pb2.GetDigestReply:
        return self.control().GetDigest(agent_pb2.GetDigestRequest(service=service), timeout=5)


class CoordinatorProcess(ManagedProcess):
    """One `failover-coordinator` process with its data dir (the SQLite store) under root."""

    what = "the coordinator"

    def __init__(self, root: Path, ip: str = "127.0.0.1",
                 args: Sequence[str] = ()) -> None:
        super().__init__(f"{ip}:{free_port()}", root / "coordinator.log")
        self.data_dir = root / "coordinator"
        self.args = list(args)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "failover.coordinator", "--listen", self.address,
                "--data-dir", str(self.data_dir), *self.args]

    def probe(self) -> None:
        self.stub().GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=0.5)

    def stub(self) -> coordinator_pb2_grpc.CoordinatorStub:
        return coordinator_pb2_grpc.CoordinatorStub(self.channel())

    def status(self) -> coordinator_pb2.ClusterStatus:
        return self.stub().GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=5)

    def history(self, service: str = "") -> list[coordinator_pb2.HistoryEvent]:
        return list(self.stub().GetHistory(
            coordinator_pb2.HistoryRequest(service=service, limit=1000), timeout=5).events)


class LocalCluster:
    """Agents (and optionally a coordinator) under one root dir; closing it kills every
    process it started."""

    def __init__(self, root: Path, hosts: int = 3, *, fsync_policy: str = "batch",
                 extra: dict[str, Any] | None = None, coordinator: bool = False,
                 netns: bool = False, coordinator_args: Sequence[str] = (),
                 disk_bytes: int = 0) -> None:
        """With `netns`, every agent runs in its own network namespace (root only; see
        `failover.netns`), so that `partition(host)` can cut it off for real. With
        `disk_bytes`, every agent's data dir is a tmpfs of that size (root only; see
        `failover.smalldisk`), so that `disks[host].fill()` fills it for real.
        `coordinator_args` are extra flags of `failover-coordinator` (--host-dead-ms ...)."""
        self.root = root
        host_ids = [f"host{i}" for i in range(1, hosts + 1)]
        self.net = HostNetwork(host_ids) if netns else None
        if self.net is not None:
            self.net.setup()
        gateway = self.net.gateway if self.net is not None else "127.0.0.1"
        self.coordinator = (CoordinatorProcess(root, gateway, coordinator_args)
                            if coordinator else None)
        if self.coordinator is not None:
            extra = {**(extra or {}), "coordinator": self.coordinator.address}
        self.agents = {
            h: AgentProcess(
                root, h, fsync_policy=fsync_policy, extra=extra,
                ip=self.net.addresses[h] if self.net is not None else "127.0.0.1",
                prefix=self.net.command_prefix(h) if self.net is not None else None)
            for h in host_ids
        }
        self.disks = {h: SmallDisk(a.data_dir, disk_bytes)
                      for h, a in self.agents.items()} if disk_bytes else {}

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        for disk in self.disks.values():
            if not disk.mounted:
                disk.mount()
        if self.coordinator is not None:
            self.coordinator.start(wait=False)
        for agent in self.agents.values():
            agent.start(wait=False)
        if self.coordinator is not None:
            self.coordinator.wait_ready()
        for agent in self.agents.values():
            agent.wait_ready()
        if self.coordinator is not None:
            coordinator = self.coordinator
            wait_for(lambda: sum(h.alive for h in coordinator.status().hosts)
                     == len(self.agents), READY_TIMEOUT_S, "every agent to register")

    def close(self) -> None:
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                self.coordinator.kill()
            self.coordinator.close()
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.kill()
            agent.close()
        for disk in self.disks.values():
            disk.unmount()
        if self.net is not None:
            self.net.close()

    def partition(self, host_id: str) -> None:
        """Cuts a host off from every other host and the coordinator (needs `netns`)."""
        assert self.net is not None, "partitions need LocalCluster(netns=True)"
        self.net.partition(host_id)

    def heal(self, host_id: str) -> None:
        assert self.net is not None
        self.net.heal(host_id)

    def create(self, service: str, kind: str, replicas: int = 2, mode: str = "sync") -> None:
        """Creates a service through the coordinator and waits until its primary serves."""
        assert self.coordinator is not None, "create needs a coordinator"
        self.coordinator.stub().CreateService(coordinator_pb2.CreateServiceRequest(
            name=service, kind=kind, replicas=replicas,
            mode=(common_pb2.REPLICATION_MODE_ASYNC if mode == "async"
                  else common_pb2.REPLICATION_MODE_SYNC)), timeout=10)
        wait_for(lambda: self.primary_of(service) is not None, READY_TIMEOUT_S,
                 f"{service} to have a serving primary")

    def primary_of(self, service: str) -> str | None:
        """The host whose replica of `service` is primary at the coordinator's epoch."""
        assert self.coordinator is not None
        status = self.coordinator.status()
        view = next((s for s in status.services if s.name == service), None)
        if view is None:
            return None
        for replica in view.replicas:
            if replica.role == common_pb2.ROLE_PRIMARY:
                agent = self.agents[replica.host_id]
                if not agent.alive:
                    return None
                report = agent.replica(service)
                if (report is not None and report.role == common_pb2.ROLE_PRIMARY
                        and report.epoch == view.epoch):
                    return replica.host_id
        return None

    def __iter__(self) -> Iterator[AgentProcess]:
        return iter(self.agents.values())

    def __getitem__(self, host_id: str) -> AgentProcess:
        return self.agents[host_id]

    @property
    def addresses(self) -> str:
        return ",".join(a.address for a in self.agents.values())

    def form(self, service: str, kind: str, primary: str, duplicas: list[str], *,
             epoch: int = 1, mode: str = "sync", in_sync: list[str] | None = None) -> None:
        """Forms a replica set by assigning roles directly (the coordinator does this later)."""
        in_sync = duplicas if in_sync is None else in_sync
        mode_pb = (common_pb2.REPLICATION_MODE_ASYNC if mode == "async"
                   else common_pb2.REPLICATION_MODE_SYNC)
        p = self.agents[primary]
        for host in duplicas:
            self.agents[host].control().AssignRole(agent_pb2.AssignRoleRequest(
                service=service, kind=kind, role=common_pb2.ROLE_DUPLICA, epoch=epoch,
                mode=mode_pb, primary=agent_pb2.ReplicaPeer(host_id=primary, address=p.address),
            ), timeout=10)
        p.control().AssignRole(agent_pb2.AssignRoleRequest(
            service=service, kind=kind, role=common_pb2.ROLE_PRIMARY, epoch=epoch, mode=mode_pb,
            duplicas=[agent_pb2.ReplicaPeer(host_id=h, address=self.agents[h].address)
                      for h in duplicas],
            in_sync=in_sync,
        ), timeout=10)

    def wait_converged(self, service: str, hosts: list[str], timeout_s: float = 30.0) -> bytes:
        """Waits until every named replica applied the same index with the same digest."""

        def same() -> bytes | None:
            digests = [self.agents[h].digest(service) for h in hosts]
            first = digests[0]
            if first.applied_index and all(
                d.applied_index == first.applied_index and d.digest == first.digest
                for d in digests
            ):
                return first.digest
            return None

        return wait_for(same, timeout_s, f"{service} to converge on {hosts}", interval_s=0.05)
