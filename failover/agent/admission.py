"""Bounds on what peers may open on an agent at once (issue 13, item 6): concurrent inbound
streams of each kind, per peer and in all. Past a bound the call is refused at once with
`Overloaded` (RESOURCE_EXHAUSTED), never queued behind legitimate work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from failover.errors import Overloaded


class StreamAdmission:
    """Counts the open streams of one kind (`what`) per peer and in all."""

    def __init__(self, what: str, per_peer_max: int, total_max: int) -> None:
        self.what = what
        self.per_peer_max = per_peer_max
        self.total_max = total_max
        self.open: dict[str, int] = {}
        self.total = 0

    @contextmanager
    def admit(self, peer: str) -> Iterator[None]:
        """Holds one stream of `peer` open for the block; raises Overloaded past a bound."""
        if self.total >= self.total_max:
            raise Overloaded(f"Overloaded: this agent has {self.total} {self.what} streams open, "
                             f"its bound ({self.total_max}); retry later")
        if self.open.get(peer, 0) >= self.per_peer_max:
            raise Overloaded(f"Overloaded: {peer} has {self.per_peer_max} {self.what} streams "
                             "open on this agent, its bound per peer; retry later")
        self.open[peer] = self.open.get(peer, 0) + 1
        self.total += 1
        try:
            yield
        finally:
            self.total -= 1
            self.open[peer] -= 1
            if not self.open[peer]:
                del self.open[peer]
