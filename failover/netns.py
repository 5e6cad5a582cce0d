"""Test hosts in network namespaces on one private bridge, for real network partitions.

Each host gets a namespace with one veth whose other end is a port of a bridge in the root
namespace; the coordinator and clients reach the hosts through the bridge's address. The
namespaces have no default route, so an agent can reach nothing but the bridge's subnet. A
partition takes the host's bridge port down: its packets are dropped on this machine. The
bridge itself stays up, so the root namespace keeps its route to the subnet and nothing for
it ever follows the default route off the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

SUBNET_PREFIX = "10.231"  # /24s of 10.231.0.0/16; the third octet is drawn per cluster


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network partitions need root (ip netns); run as root"
    if shutil.which("ip") is None:
        return "network partitions need the `ip` command (Debian's iproute2)"
    probe = f"fop{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` fails here: {exc.stderr.strip() if exc.stderr else exc}"
    _ip("netns", "del", probe, check=False)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True,
                          timeout=10)


class HostNetwork:
    """The namespaces and bridge of one local cluster; `close` removes them all."""

    def __init__(self, hosts: list[str]) -> None:
        tag = secrets.token_hex(3)
        self.bridge = f"fob{tag}"
        self.octet = 10 + secrets.randbelow(240)
        self.gateway = f"{SUBNET_PREFIX}.{self.octet}.1"
        self.namespaces = {h: f"fo{tag}{h}" for h in hosts}
        self.ports = {h: f"fov{tag}{n}" for n, h in enumerate(hosts)}
        self.addresses = {h: f"{SUBNET_PREFIX}.{self.octet}.{10 + n}"
                          for n, h in enumerate(hosts)}
        self.partitioned: set[str] = set()
        self._up = False

    def setup(self) -> None:
        """Creates the bridge and one namespace per host (root only)."""
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            self._up = True
            for host, namespace in self.namespaces.items():
                port = self.ports[host]
                _ip("netns", "add", namespace)
                _ip("link", "add", port, "type", "veth", "peer", "name", f"{port}p")
                _ip("link", "set", f"{port}p", "netns", namespace)
                _ip("link", "set", port, "master", self.bridge)
                _ip("link", "set", port, "up")
                inside = ["netns", "exec", namespace, "ip"]
                _ip(*inside, "link", "set", f"{port}p", "name", "eth0")
                _ip(*inside, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
                _ip(*inside, "link", "set", "eth0", "up")
                _ip(*inside, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def command_prefix(self, host: str) -> list[str]:
        """Runs a command inside the host's namespace."""
        return ["ip", "netns", "exec", self.namespaces[host]]

    def partition(self, host: str) -> None:
        """Cuts the host off from every other host and from the coordinator."""
        _ip("link", "set", self.ports[host], "down")
        self.partitioned.add(host)

    def heal(self, host: str) -> None:
        _ip("link", "set", self.ports[host], "up")
        self.partitioned.discard(host)

    def close(self) -> None:
        """Removes every namespace, veth and the bridge (idempotent)."""
        for host, namespace in self.namespaces.items():
            _ip("link", "del", self.ports[host], check=False)
            _ip("netns", "del", namespace, check=False)
        if self._up:
            _ip("link", "del", self.bridge, check=False)
            self._up = False
