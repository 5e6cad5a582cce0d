"""Real local etcd members for tests, benchmarks and LocalCluster (issue 15).

`ensure_etcd` finds the ``etcd`` binary, installing Debian's ``etcd-server`` package when it is
missing and we run as root; `EtcdCluster` runs one or three members on 127.0.0.1 free ports,
each in its own session with its data dir under a root dir, started with the flags the etcd
store needs (docs/etcd.md): ``--max-txn-ops`` and ``--max-request-bytes`` at least the store's
limits, and a short heartbeat and election timeout so that etcd's minimum lease TTL is one
second (etcd raises every lease to 1.5 election timeouts, rounded up to whole seconds).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

from failover import defaults
from failover.errors import ConfigError
from failover.processes import ManagedProcess, free_port, wait_for
from failover.storage.etcd_store import EtcdTls
from failover.storage.modes import write_private_file

__all__ = ["ETCD_SEARCH_PATHS", "EtcdCluster", "EtcdMember", "ensure_etcd"]

ETCD_SEARCH_PATHS = ("/usr/bin/etcd", "/usr/local/bin/etcd", "/usr/sbin/etcd")
_APT_TIMEOUT_S = 600  # apt-get update or install of one package on a slow mirror
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "failover-etcd-install.lock"
_HEALTH_TIMEOUT_S = 1.0
# A heartbeat of 50 ms and an election timeout of 500 ms: etcd's minimum lease TTL is then
# ceil(1.5 * 0.5 s) = 1 s, so a store may use leader_ttl_ms = 1000 in tests (etcd's defaults,
# 100 ms and 1 s, give 2 s). Loopback members answer heartbeats in well under 50 ms.
HEARTBEAT_MS = 50
ELECTION_TIMEOUT_MS = 500
READY_TIMEOUT_S = 30.0

_found: Path | str | None = None
_found_lock = threading.Lock()


def _which_etcd() -> Path | None:
    found = shutil.which("etcd")
    if found:
        return Path(found)
    for candidate in ETCD_SEARCH_PATHS:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env,
                          timeout=_APT_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)


def _install_etcd() -> str | None:
    """Installs Debian's etcd-server; None when done, else why not."""
    if shutil.which("apt-get") is None:
        return "etcd is not installed and there is no apt-get to install it (etcd-server)"
    with open(_INSTALL_LOCK, "a") as lock:  # pytest processes started at once install once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _which_etcd() is not None:
            return None
        result = _apt("install", "-y", "--no-install-recommends", "etcd-server")
        if result.returncode != 0:
            # A fresh image has no package lists: "Unable to locate package".
            update = _apt("update")
            if update.returncode != 0:
                return f"apt-get update failed: {update.stderr.strip()[-300:]}"
            result = _apt("install", "-y", "--no-install-recommends", "etcd-server")
        if result.returncode != 0:
            return f"apt-get install etcd-server failed: {result.stderr.strip()[-300:]}"
    return None if _which_etcd() is not None else (
        "apt-get installed etcd-server but no etcd binary is on the PATH")


def ensure_etcd() -> Path | str:
    """The etcd binary's path; when it is missing and we run as root, installs Debian's
    ``etcd-server`` first. Returns a reason string (for pytest.skip) when etcd cannot be had.
    The answer is remembered for the process."""
    global _found
    with _found_lock:
        if _found is None or isinstance(_found, str):
            path = _which_etcd()
            if path is None:
                if os.geteuid() != 0:
                    _found = ("etcd is not installed and installing Debian's etcd-server needs "
                              "root: run `apt-get install etcd-server` as root")
                else:
                    try:
                        reason = _install_etcd()
                    except (OSError, subprocess.SubprocessError) as exc:
                        reason = f"installing etcd-server failed: {exc}"
                    path = _which_etcd()
                    _found = path if path is not None else (reason or "etcd not found")
            else:
                _found = path
        return _found


def _etcd_binary() -> Path:
    found = ensure_etcd()
    if isinstance(found, str):
        raise ConfigError(f"no etcd to run: {found}")
    return found


class EtcdMember(ManagedProcess):
    """One etcd member: client and peer URLs on 127.0.0.1, its data dir under `root`.

    `kill` is SIGKILL; `pause`/`resume` (ManagedProcess) are SIGSTOP/SIGCONT: a member that
    stops answering but keeps its connections open, as a hung host does; `start` runs it again
    on the same data dir and ports."""

    what = "etcd member"

    def __init__(self, name: str, root: Path, client_port: int, peer_port: int, *,
                 txn_ops_max: int = defaults.ETCD_TXN_OPS_MAX,
                 request_bytes_max: int = defaults.ETCD_REQUEST_BYTES_MAX,
                 server_tls: EtcdTls | None = None, client_tls: EtcdTls | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(f"127.0.0.1:{client_port}", root / f"{name}.log")
        self.name = name
        self.data_dir = root / f"{name}.data"
        self.server_tls = server_tls  # serves clients over TLS, asking for their certificate
        self.client_tls = client_tls  # what the readiness probe presents
        scheme = "https" if server_tls is not None else "http"
        self.client_url = f"{scheme}://127.0.0.1:{client_port}"
        self.peer_url = f"http://127.0.0.1:{peer_port}"
        self.initial_cluster = f"{name}={self.peer_url}"
        self.cluster_token = "failover-test"
        self.txn_ops_max = txn_ops_max
        self.request_bytes_max = request_bytes_max

    def command(self) -> list[str]:
        return [
            str(_etcd_binary()),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-token", self.cluster_token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_TIMEOUT_MS),
            # The limits the etcd store checks at open (docs/etcd.md, "etcd flags").
            "--max-txn-ops", str(self.txn_ops_max),
            "--max-request-bytes", str(self.request_bytes_max),
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
            *self._tls_flags(),
        ]

    def _tls_flags(self) -> list[str]:
        tls = self.server_tls
        if tls is None:
            return []
        return ["--cert-file", str(tls.cert), "--key-file", str(tls.key),
                "--client-cert-auth", "--trusted-ca-file", str(tls.ca)]

    def prepare(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)

    def probe(self) -> None:
        """Raises until this member serves (its /health needs a quorum: start every member of a
        cluster before waiting on any)."""
        context = None
        if self.client_tls is not None:
            context = ssl.create_default_context(cafile=str(self.client_tls.ca))
            context.load_cert_chain(str(self.client_tls.cert), str(self.client_tls.key))
        with urllib.request.urlopen(f"{self.client_url}/health", timeout=_HEALTH_TIMEOUT_S,
                                    context=context) as reply:
            body = reply.read()
        if b'"true"' not in body:
            raise ConnectionError(f"etcd {self.name} not healthy yet: {body[:200]!r}")


def make_etcd_pki(directory: Path) -> tuple[EtcdTls, EtcdTls]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files under
    `directory`: (what the members serve with, what a client presents)."""
    from failover.core.permissions import COORDINATOR, Identity
    from failover.net.certs import cert_pem, issue, key_pem, make_ca

    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(common_name="etcd test CA")
    write_private_file(directory / "ca.pem", cert_pem(ca_cert))
    pairs = {}
    for stem, name in (("server", "etcd"), ("client", "coordinator")):
        cert, key = issue(ca_cert, ca_key, Identity(COORDINATOR, name), sans=["127.0.0.1"])
        write_private_file(directory / f"{stem}.pem", cert_pem(cert))
        write_private_file(directory / f"{stem}.key", key_pem(key))
        pairs[stem] = EtcdTls(directory / "ca.pem", directory / f"{stem}.pem",
                              directory / f"{stem}.key")
    return pairs["server"], pairs["client"]


class EtcdCluster:
    """`members` (1 or 3) etcd members on 127.0.0.1 free ports, data and logs under `root`.

    Use as a context manager, or `start()` ... `close()`; `url` is the ``etcd://`` store URL
    naming every member. `txn_ops_max` and `request_bytes_max` are etcd's limits (tests give
    smaller ones to see the store refuse such an etcd). With `tls`, the members serve clients
    over mutual TLS from a PKI made under root (`client_tls` is what a store presents)."""

    def __init__(self, root: str | os.PathLike[str], members: int = 1, *,
                 txn_ops_max: int = defaults.ETCD_TXN_OPS_MAX,
                 request_bytes_max: int = defaults.ETCD_REQUEST_BYTES_MAX,
                 tls: bool = False) -> None:
        if members not in (1, 3):
            raise ConfigError(f"an etcd cluster here has 1 or 3 members, not {members}")
        self.root = Path(root)
        self.members: list[EtcdMember] = []
        self.client_tls: EtcdTls | None = None
        server_tls = None
        if tls:
            server_tls, self.client_tls = make_etcd_pki(self.root / "pki")
        for i in range(members):
            member = EtcdMember(f"etcd{i}", self.root, free_port(), free_port(),
                                txn_ops_max=txn_ops_max, request_bytes_max=request_bytes_max,
                                server_tls=server_tls, client_tls=self.client_tls)
            self.members.append(member)
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial
            member.cluster_token = f"failover-{os.getpid()}-{id(self)}"

    @property
    def url(self) -> str:
        """``etcd://127.0.0.1:P1,127.0.0.1:P2,...``"""
        return "etcd://" + ",".join(m.address for m in self.members)

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Starts every member, then waits until each serves (with a quorum)."""
        for member in self.members:
            if not member.alive:
                member.start(wait=False)
        for member in self.members:
            member.wait_ready(timeout_s)

    def wait_healthy(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Waits until every running, unpaused member serves with a quorum."""
        def healthy() -> bool:
            for member in self.members:
                if member.alive and not member.paused:
                    member.probe()
            return True

        wait_for(healthy, timeout_s, "the etcd cluster to be healthy")

    def close(self) -> None:
        """Kills every member (their data dirs stay under root for a look afterwards)."""
        for member in self.members:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                member.kill()
            member.close()

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
