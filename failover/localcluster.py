"""A cluster of real agent processes on 127.0.0.1, for tests, demos, benchmarks and chaos runs.

Each agent is its own process in its own session (so a signal reaches it alone), with a free
port and a data dir under one root. Waits poll a condition under a deadline.

Mutual TLS is on by default (issue 13): at its creation the cluster makes a CA and the
certificates of every identity in ``ROOT/pki`` (`ClusterPki`), starts every daemon with its
own, and calls each daemon with a certificate of the role that call needs. ``tls=False`` keeps
the plaintext path (loopback only, or ``--insecure`` in network namespaces).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from failover.core.permissions import ADMIN, AGENT, CLIENT, COORDINATOR, OPERATOR
from failover.errors import FailoverError
from failover.net import certs, channels
from failover.net.tls import TlsFiles
from failover.netns import HostNetwork
from failover.processes import READY_TIMEOUT_S as READY_TIMEOUT_S
from failover.processes import ManagedProcess as ManagedProcess
from failover.processes import free_port as free_port
from failover.processes import sync_channel as sync_channel
from failover.processes import tls_flags as tls_flags
from failover.processes import wait_for as wait_for
from failover.smalldisk import SmallDisk
from failover.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc

T = TypeVar("T")



# The identities `ClusterPki` issues beside one per agent (by its host id) and the coordinator.
ADMIN_NAME, OPERATOR_NAME, CLIENT_NAME = "admin", "operator", "client"
COORDINATOR_NAME = "coordinator"
# The harness drives agents directly in tests that form replica sets without a coordinator
# (AssignRole, Compact): only the coordinator role may, so it holds a coordinator certificate
# of its own name.
HARNESS_NAME = "harness"


class ClusterPki:
    """A CA and one certificate per identity of a local cluster, in `directory` (0700, keys
    0600): an agent certificate per host id with its address as IP subject alternative name,
    the coordinator's, and ``admin``, ``operator``, ``client`` and ``harness`` (a coordinator
    role, for driving agents directly)."""

    def __init__(self, directory: Path, agents: dict[str, str], coordinator_ip: str) -> None:
        """`agents`: host id -> the IP it listens on."""
        self.directory = directory
        certs.init_ca(directory)
        for host_id, ip in agents.items():
            certs.issue_to_dir(directory, AGENT, host_id, sans=[ip])
        certs.issue_to_dir(directory, COORDINATOR, COORDINATOR_NAME, sans=[coordinator_ip])
        certs.issue_to_dir(directory, COORDINATOR, HARNESS_NAME)
        for role, name in ((ADMIN, ADMIN_NAME), (OPERATOR, OPERATOR_NAME),
                           (CLIENT, CLIENT_NAME)):
            certs.issue_to_dir(directory, role, name)

    def issue(self, role: str, name: str, sans: Sequence[str] = ()) -> TlsFiles:
        """One more identity's certificate (e.g. a test's foreign or extra caller)."""
        certs.issue_to_dir(self.directory, role, name, sans=sans)
        return self.files(name)

    def files(self, name: str) -> TlsFiles:
        return TlsFiles(self.directory / certs.CA_CERT, self.directory / f"{name}.crt",
                        self.directory / f"{name}.key")


def tls_env(files: TlsFiles | None) -> dict[str, str]:
    """The FAILOVER_TLS_* environment of failoverctl for `files` (empty without TLS)."""
    if files is None:
        return {}
    return {"FAILOVER_TLS_CA": str(files.ca), "FAILOVER_TLS_CERT": str(files.cert),
            "FAILOVER_TLS_KEY": str(files.key)}


class AgentProcess(ManagedProcess):
    """One `failover-agent`: its supervisor (`proc`, the process started, leader of its own
    process group) and the supervisor's child that does the work (`child_pid`).

    Which pids each fault hits: `kill`, `pause`, `resume` and `stop` signal the whole
    process group, supervisor and child alike ("the agent", a host lost or hung);
    `kill_child` SIGKILLs the child alone, the supervisor alive ("the agent process
    crashed": the crash fast path). With `supervised=False` the agent runs with
    --no-supervisor and is one process."""

    def __init__(self, root: Path, host_id: str, *, fsync_policy: str = "batch",
                 extra: dict[str, Any] | None = None, ip: str = "127.0.0.1",
                 prefix: list[str] | None = None, tls: TlsFiles | None = None,
                 caller_tls: TlsFiles | None = None, insecure: bool = False) -> None:
        super().__init__(f"{ip}:{free_port()}", root / f"{host_id}.log", tls=tls,
                         caller_tls=caller_tls, insecure=insecure)
        self.prefix = list(prefix or [])  # e.g. `ip netns exec NS` for a partitionable host
        self.what = f"agent {host_id}"
        self.host_id = host_id
        self.data_dir = root / host_id
        self.fsync_policy = fsync_policy
        self.extra = dict(extra or {})
        self.supervised = True

    def command(self) -> list[str]:
        cmd = [*self.prefix, sys.executable, "-m", "failover.agent", "--host-id", self.host_id,
               "--listen", self.address, "--data-dir", str(self.data_dir),
               "--fsync-policy", self.fsync_policy]
        for key, value in self.extra.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        if not self.supervised:
            cmd.append("--no-supervisor")
        return cmd + self.tls_command()

    def signal(self, sig: int) -> None:
        """To the process group: the supervisor and its child (`failover.agent.supervisor`
        keeps the child in its group)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def child_pid(self) -> int | None:
        """The pid of the supervisor's child (None: none runs now, or no supervisor)."""
        if not self.supervised or self.proc is None or self.proc.poll() is not None:
            return None
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def work_pid(self) -> int:
        """The pid doing the agent's work (for CPU accounting and profilers): the
        supervisor's child, or the one process without a supervisor."""
        assert self.proc is not None
        return self.child_pid() or self.proc.pid

    def kill_child(self, timeout_s: float = READY_TIMEOUT_S) -> int:
        """SIGKILL of the supervisor's child alone (a crash of the agent's process); returns
        the pid killed. The supervisor reports the exit and starts a new child."""
        pid = wait_for(self.child_pid, timeout_s, f"{self.what}'s child process")
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill(self) -> None:
        """SIGKILL of supervisor and child, and wait for both to be gone."""
        child = self.child_pid()
        super().kill()
        if child is not None:
            wait_for(lambda: not _running(child), 10.0, f"{self.what}'s child {child} to exit")

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def probe(self) -> None:
        status = self.control().GetStatus(agent_pb2.GetStatusRequest(), timeout=0.5)
        if status.host_id != self.host_id:
            raise FailoverError(f"{self.address} answers as agent {status.host_id!r}, not "
                                f"{self.host_id!r}: another process listens on its port")

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


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class CoordinatorProcess(ManagedProcess):
    """One `failover-coordinator` process with its data dir (the SQLite store) under root;
    `name` tells several apart (their logs and data dirs). `store_args` name a shared store
    (``--store etcd://... --cluster ...``): it then advertises its listen address."""

    what = "the coordinator"

    def __init__(self, root: Path, ip: str = "127.0.0.1",
                 args: Sequence[str] = (), *, tls: TlsFiles | None = None,
                 caller_tls: TlsFiles | None = None, insecure: bool = False,
                 name: str = "coordinator", store_args: Sequence[str] = ()) -> None:
        super().__init__(f"{ip}:{free_port()}", root / f"{name}.log", tls=tls,
                         caller_tls=caller_tls, insecure=insecure)
        self.name = name
        if name != "coordinator":
            self.what = f"coordinator {name}"
        self.data_dir = root / name
        self.args = list(args)
        self.store_args = list(store_args)

    def command(self) -> list[str]:
        advertise = ["--advertise", self.address] if self.store_args else []
        return [sys.executable, "-m", "failover.coordinator", "--listen", self.address,
                "--data-dir", str(self.data_dir), *self.store_args, *advertise, *self.args,
                *self.tls_command()]

    def leads(self, timeout_s: float = 1.0) -> bool:
        """Whether this coordinator says it leads (its own entry in its status)."""
        status = self.stub().GetClusterStatus(coordinator_pb2.ClusterStatusRequest(),
                                              timeout=timeout_s)
        return any(c.leader and c.address == self.address for c in status.coordinators)

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
                 disk_bytes: int = 0, tls: bool = True,
                 env: dict[str, str] | None = None, coordinators: int = 1,
                 store: str = "sqlite", etcd_members: int = 1,
                 leader_ttl_ms: int | None = None) -> None:
        """With `netns`, every agent runs in its own network namespace (root only; see
        `failover.netns`), so that `partition(host)` can cut it off for real. With
        `disk_bytes`, every agent's data dir is a tmpfs of that size (root only; see
        `failover.smalldisk`), so that `disks[host].fill()` fills it for real.
        `coordinator_args` are extra flags of `failover-coordinator` (--host-dead-ms ...).

        With `tls` (the default) the certificates go to ``ROOT/pki`` (`pki`): every daemon
        serves and dials mutual TLS, the harness calls the coordinator as `tls_admin` and the
        agents as a coordinator identity (`tls_harness`), and `tls_client`, `tls_operator`
        and `tls_admin` are for the Clients and failoverctl of tests, demos and benchmarks
        (None each without TLS). `env` is added to every daemon's environment (e.g. a
        PYTHONPATH holding a kind only this cluster registers).

        Several coordinators (issue 15): ``coordinators=N`` (implies `coordinator`) needs
        ``store="etcd"``: the cluster starts `etcd_members` etcd members
        (`failover.etcd_local.EtcdCluster`, as `etcd`) and N coordinators on it, each
        advertising its own address (with `leader_ttl_ms` when given); agents and
        `cli_args` get the comma list of them. `leader` finds the one leading;
        `coordinator` stays the first, for what any coordinator answers (status, history).
        """
        if coordinators < 1:
            raise ValueError(f"coordinators={coordinators}: at least one")
        if store not in ("sqlite", "etcd"):
            raise ValueError(f"store={store!r}: sqlite or etcd")
        if coordinators > 1 and store != "etcd":
            raise ValueError("several coordinators share an etcd store: pass store='etcd'")
        coordinator = coordinator or coordinators > 1 or store == "etcd"
        self.root = root
        host_ids = [f"host{i}" for i in range(1, hosts + 1)]
        self.net = HostNetwork(host_ids) if netns else None
        if self.net is not None:
            self.net.setup()
        gateway = self.net.gateway if self.net is not None else "127.0.0.1"
        ips = {h: self.net.addresses[h] if self.net is not None else "127.0.0.1"
               for h in host_ids}
        self.pki = ClusterPki(root / "pki", ips, gateway) if tls else None
        pki = self.pki
        self.tls_admin = pki.files(ADMIN_NAME) if pki else None
        self.tls_operator = pki.files(OPERATOR_NAME) if pki else None
        self.tls_client = pki.files(CLIENT_NAME) if pki else None
        self.tls_harness = pki.files(HARNESS_NAME) if pki else None
        insecure = not tls and netns  # namespaced daemons listen beyond loopback
        self.etcd: Any = None  # an EtcdCluster with store="etcd"
        store_args: list[str] = []
        if store == "etcd":
            from failover.etcd_local import EtcdCluster  # it imports this module

            self.etcd = EtcdCluster(root / "etcd", etcd_members)
            # One etcd per cluster here; the cluster name only has to be a valid one.
            name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in root.name)
            store_args = ["--store", self.etcd.url, "--cluster", name[-64:] or "default"]
            if leader_ttl_ms is not None:
                store_args += ["--leader-ttl-ms", str(leader_ttl_ms)]
        self.coordinators = [CoordinatorProcess(
            root, gateway, coordinator_args, tls=pki.files(COORDINATOR_NAME) if pki else None,
            caller_tls=self.tls_admin, insecure=insecure, store_args=store_args,
            name="coordinator" if coordinators == 1 else f"coordinator{i}")
            for i in range(1, coordinators + 1)] if coordinator else []
        self.coordinator = self.coordinators[0] if self.coordinators else None
        if self.coordinator is not None:
            extra = {**(extra or {}), "coordinator": self.coordinator_addresses}
        self.agents = {
            h: AgentProcess(
                root, h, fsync_policy=fsync_policy, extra=extra, ip=ips[h],
                prefix=self.net.command_prefix(h) if self.net is not None else None,
                tls=pki.files(h) if pki else None, caller_tls=self.tls_harness,
                insecure=insecure)
            for h in host_ids
        }
        self.disks = {h: SmallDisk(a.data_dir, disk_bytes)
                      for h, a in self.agents.items()} if disk_bytes else {}
        for process in [*self.agents.values(), *self.coordinators]:
            process.env = dict(env or {})

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        for disk in self.disks.values():
            if not disk.mounted:
                disk.mount()
        if self.etcd is not None:
            self.etcd.start()
        for process in self.coordinators:
            process.start(wait=False)
        for agent in self.agents.values():
            agent.start(wait=False)
        for process in self.coordinators:
            process.wait_ready()
        for agent in self.agents.values():
            agent.wait_ready()
        if self.coordinator is not None:
            try:
                wait_for(lambda: sum(h.alive for h in self.lead().status().hosts)
                         == len(self.agents), READY_TIMEOUT_S, "every agent to register")
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}\n{self._registration_report()}") from None

    def _registration_report(self) -> str:
        """Why agents did not register: who the coordinators see alive, and the log tails of
        the coordinators and of every agent not seen alive (a failure in CI keeps no files)."""
        alive: set[str] = set()
        lines: list[str] = []
        try:
            hosts = self.lead().status().hosts
            alive = {h.host_id for h in hosts if h.alive}
            lines.append("hosts the coordinator knows: " + (", ".join(
                f"{h.host_id} alive={h.alive}" for h in hosts) or "none"))
        except Exception as exc:  # a report of a failure must not fail itself
            lines.append(f"no status from the coordinator: {exc}")
        for process in [*self.coordinators,
                        *(a for h, a in self.agents.items() if h not in alive)]:
            lines.append(f"--- {process.log_path.name}, last lines:\n{process.log_tail(40)}")
        return "\n".join(lines)

    def close(self) -> None:
        for process in self.coordinators:
            with contextlib.suppress(Exception):
                process.kill()
            process.close()
        if self.etcd is not None:
            self.etcd.close()
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
        self.lead().stub().CreateService(coordinator_pb2.CreateServiceRequest(
            name=service, kind=kind, replicas=replicas,
            mode=(common_pb2.REPLICATION_MODE_ASYNC if mode == "async"
                  else common_pb2.REPLICATION_MODE_SYNC)), timeout=10)
        wait_for(lambda: self.primary_of(service) is not None, READY_TIMEOUT_S,
                 f"{service} to have a serving primary")

    def create_many(self, services: Sequence[str], kind: str, replicas: int = 2,
                    mode: str = "sync", timeout_s: float = 120.0, batch: int = 25) -> None:
        """Creates services one after another through the coordinator, then waits once until
        every one has a serving primary (`create` waits per service, reading every status
        again each time: quadratic for hundreds). A `batch` at a time: before the next one,
        the batch serves and every agent is alive at the coordinator (an agent opening many
        replicas at once on a loaded machine misses heartbeats, and placement refuses a
        host that missed them)."""
        assert self.coordinator is not None, "create_many needs a coordinator"
        lead = self.lead()
        stub = lead.stub()
        mode_pb = (common_pb2.REPLICATION_MODE_ASYNC if mode == "async"
                   else common_pb2.REPLICATION_MODE_SYNC)
        for start in range(0, len(services), batch):
            wait_for(lambda: all(h.alive for h in lead.status().hosts), timeout_s,
                     "every agent to be alive at the coordinator", interval_s=0.05)
            for service in services[start:start + batch]:
                stub.CreateService(coordinator_pb2.CreateServiceRequest(
                    name=service, kind=kind, replicas=replicas, mode=mode_pb), timeout=10)
            wanted = set(services[:start + batch])
            wait_for(lambda wanted=wanted: wanted <= set(self.primaries()), timeout_s,
                     f"{len(wanted)} services to have a serving primary", interval_s=0.1)

    def primaries(self) -> dict[str, str]:
        """Service -> the host whose replica serves as primary at the coordinator's epoch (as
        `primary_of`, for every service at once: one status per daemon)."""
        assert self.coordinator is not None
        status = self.lead().status()
        reports: dict[str, dict[str, agent_pb2.ReplicaStatus]] = {}
        out: dict[str, str] = {}
        for view in status.services:
            for replica in view.replicas:
                if replica.role != common_pb2.ROLE_PRIMARY:
                    continue
                agent = self.agents[replica.host_id]
                if not agent.alive:
                    continue
                if replica.host_id not in reports:
                    with contextlib.suppress(grpc.RpcError):
                        reports[replica.host_id] = {
                            r.service: r for r in agent.status().replicas}
                report = reports.get(replica.host_id, {}).get(view.name)
                if (report is not None and report.role == common_pb2.ROLE_PRIMARY
                        and report.epoch == view.epoch):
                    out[view.name] = replica.host_id
        return out

    def primary_of(self, service: str) -> str | None:
        """The host whose replica of `service` is primary at the coordinator's epoch."""
        assert self.coordinator is not None
        status = self.lead().status()
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

    # --- several coordinators (issue 15) -----------------------------------------------------

    @property
    def coordinator_addresses(self) -> str:
        """Every coordinator's address, a comma list (what agents and failoverctl get)."""
        return ",".join(c.address for c in self.coordinators)

    def find_leader(self, timeout_s: float = 1.0) -> CoordinatorProcess | None:
        """The running, unpaused coordinator that leads as the store says (asked of each
        such coordinator in turn), or None while none does."""
        by_address = {c.address: c for c in self.coordinators}
        for process in self.coordinators:
            if not process.alive or process.paused:
                continue
            try:
                status = process.stub().GetClusterStatus(
                    coordinator_pb2.ClusterStatusRequest(), timeout=timeout_s)
            except grpc.RpcError:
                continue
            for entry in status.coordinators:
                found = by_address.get(entry.address)
                if entry.leader and found is not None and found.alive and not found.paused:
                    return found
        return None

    def leader(self, timeout_s: float = READY_TIMEOUT_S,
               other_than: CoordinatorProcess | None = None) -> CoordinatorProcess:
        """Waits until a coordinator (not `other_than`) leads and serves as leader (its own
        status says so), and returns it."""
        def found() -> CoordinatorProcess | None:
            process = self.find_leader()
            if process is None or process is other_than or not process.leads():
                return None
            return process

        return wait_for(found, timeout_s, "a coordinator to lead"
                        + (f" other than {other_than.address}" if other_than else ""),
                        interval_s=0.05)

    def lead(self) -> CoordinatorProcess:
        """The coordinator to send what only the leader does: the only one, or `leader()`."""
        assert self.coordinator is not None, "no coordinator in this cluster"
        return self.coordinator if len(self.coordinators) == 1 else self.leader()

    def kill_leader(self) -> CoordinatorProcess:
        """SIGKILLs the leading coordinator; returns it (`start` runs it again)."""
        process = self.leader()
        process.kill()
        return process

    def pause_leader(self) -> CoordinatorProcess:
        """SIGSTOPs the leading coordinator; returns it (`resume` wakes it)."""
        process = self.leader()
        process.pause()
        return process

    def __iter__(self) -> Iterator[AgentProcess]:
        return iter(self.agents.values())

    def __getitem__(self, host_id: str) -> AgentProcess:
        return self.agents[host_id]

    @property
    def addresses(self) -> str:
        return ",".join(a.address for a in self.agents.values())

    @property
    def tls(self) -> bool:
        return self.pki is not None

    def agent_tls(self, host_id: str) -> TlsFiles | None:
        """The certificate of agent `host_id` (to call as that agent), None without TLS."""
        return self.pki.files(host_id) if self.pki is not None else None

    def aio_channel(self, address: str, identity: TlsFiles | None = None) -> grpc.aio.Channel:
        """An asyncio channel to a daemon of this cluster, presenting `identity` (default
        `tls_client`) when the cluster has TLS, in the clear when it has not."""
        files = identity or self.tls_client
        return channels.channel(address, files.load() if files is not None else None)

    def cli_args(self, identity: TlsFiles | None = None) -> list[str]:
        """failoverctl's leading flags for this cluster: --coordinator and the TLS flags of
        `identity` (default `tls_admin`)."""
        assert self.coordinator is not None
        return ["--coordinator", self.coordinator_addresses,
                *tls_flags(identity or self.tls_admin)]

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

    def in_sync_duplicas(self, service: str) -> list[str]:
        """The hosts whose replica of `service` the coordinator records as in-sync duplicas."""
        assert self.coordinator is not None
        view = next((s for s in self.lead().status().services if s.name == service), None)
        if view is None:
            return []
        return [r.host_id for r in view.replicas
                if r.role == common_pb2.ROLE_DUPLICA and r.in_sync]

    def wait_in_sync(self, service: str, host: str, timeout_s: float = 30.0) -> None:
        """Waits until the coordinator records `host`'s replica of `service` as an in-sync
        duplica: it holds every acknowledged write. Unlike `wait_converged` this holds under
        a steady load, where the replicas' applied indexes are rarely equal at one moment."""
        wait_for(lambda: host in self.in_sync_duplicas(service), timeout_s,
                 f"{host}'s replica of {service} to be an in-sync duplica", interval_s=0.05)

    def wait_converged(self, service: str, hosts: list[str], timeout_s: float = 30.0) -> bytes:
        """Waits until every named replica applied the same index with the same digest. Under
        writes the replicas seldom stand at one index when asked one after another: wait
        for the writes to stop first (or use `wait_in_sync`)."""

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
