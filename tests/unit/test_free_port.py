"""`free_port` never hands out one port twice in a process: a cluster draws all its daemons'
ports before any binds, and two agents given the same one left a cluster waiting out its
registration deadline in CI (one agent's child failed to bind, again and again, while the
other answered the readiness probe on that port)."""

from __future__ import annotations

import socket

from failover import processes
from failover.processes import free_port


def test_ports_drawn_in_one_process_are_all_different() -> None:
    # 3,000 draws from the ~22,000 ports below the ephemeral range repeat about 200 times
    # when each draw forgets the others.
    ports = [free_port() for _ in range(3_000)]
    assert len(set(ports)) == len(ports)


def test_a_port_given_is_free_when_given() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_the_ports_remembered_are_bounded_and_the_oldest_forgotten_first() -> None:
    first = free_port()
    for _ in range(processes._PORTS_GIVEN_MAX):
        free_port()
    assert len(processes._ports_given) == processes._PORTS_GIVEN_MAX
    assert first not in processes._ports_given
