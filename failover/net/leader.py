"""Following the leader among several coordinators (issue 15): which configured address to
call next.

Only the leader coordinator acts; a follower answers every call but the reads
(GetClusterStatus, GetHistory) with UNAVAILABLE and, when it knows the leader, trailing
metadata `LEADER_METADATA_KEY` naming it. A caller keeps one `LeaderFollower` over its
configured addresses: it calls `current`, reports `answered()` or `failed(exc)`, and waits the
seconds `failed` returns before calling `current` again. A hint naming one of the configured
addresses is followed at once; any other failure moves to the next address after a backoff
that doubles up to a bound, so callers never spin while no coordinator leads (an election, a
store outage). Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import grpc
import grpc.aio

from failover.errors import ConfigError
from failover.net.address import parse_address
from failover.net.channels import LEADER_METADATA_KEY


def leader_hint(exc: grpc.RpcError) -> str:
    """The leader a follower's UNAVAILABLE names (`LEADER_METADATA_KEY`), as HOST:PORT in the
    form `Address` prints; "" when the status is another, or names none, or a malformed one.
    `exc` is a call's error, blocking (`grpc.RpcError`) or asyncio (`grpc.aio.AioRpcError`)."""
    code = getattr(exc, "code", None)
    if code is None or code() != grpc.StatusCode.UNAVAILABLE:
        return ""
    for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == LEADER_METADATA_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            try:
                return str(parse_address(text[:256], what="leader hint"))
            except ConfigError:
                return ""
    return ""


class LeaderFollower:
    """Which of a caller's coordinators to call: the one that last answered as leader, the
    leader a follower named, else the next in the list.

    `backoff_min_ms`..`backoff_max_ms` bound the wait after a failure (doubling per failure in
    a row, reset by an answer). Redirects are followed without a wait, at most one per
    address in a row: more means leadership is moving, and the next one waits like a failure.
    """

    def __init__(self, addresses: Sequence[str], *, backoff_min_ms: float,
                 backoff_max_ms: float, shuffle: bool = False) -> None:
        if not addresses:
            raise ConfigError("no coordinator address: give at least one HOST:PORT")
        if not 0 <= backoff_min_ms <= backoff_max_ms:
            raise ConfigError(f"coordinator backoff {backoff_min_ms}..{backoff_max_ms} ms is not "
                              "a range of whole milliseconds, low first")
        self.addresses = [str(a) for a in addresses]
        self._backoff_min_ms = backoff_min_ms
        self._backoff_max_ms = backoff_max_ms
        self._backoff_ms = backoff_min_ms
        # A caller among many (clients, agents) starts at a random one, spreading the first
        # calls; the leader, once one answers, is remembered and called first from then on.
        self._index = random.randrange(len(self.addresses)) if shuffle else 0
        self._redirects = 0
        self.leader: str | None = None  # the address that last answered a leader-only call
        self.redirected = False  # the last `failed` moved to the leader a follower named

    @property
    def current(self) -> str:
        """The address to call now."""
        return self.addresses[self._index]

    def answered(self) -> None:
        """`current` answered (as the leader, for calls only a leader answers)."""
        self.leader = self.current
        self._redirects = 0
        self.redirected = False
        self._backoff_ms = self._backoff_min_ms

    def failed(self, exc: BaseException | None = None) -> float:
        """`current` did not answer (`exc`, the gRPC error if any): moves to the leader it
        named (at once) or to the next address; returns the seconds to wait before calling
        `current`."""
        failed_address = self.current
        if self.leader == failed_address:
            self.leader = None
        hint = leader_hint(exc) if isinstance(exc, grpc.RpcError) else ""
        self.redirected = bool(hint and hint != failed_address and hint in self.addresses
                               and self._redirects < len(self.addresses))
        if self.redirected:
            self._redirects += 1
            self._index = self.addresses.index(hint)
            return 0.0
        self._redirects = 0
        self._index = (self._index + 1) % len(self.addresses)
        wait_ms = self._backoff_ms
        self._backoff_ms = min(max(self._backoff_ms * 2, 1.0), self._backoff_max_ms)
        return wait_ms / 1000

    def describe(self) -> str:
        """The addresses for a message, the leader marked."""
        return ", ".join(f"{a} (leader)" if a == self.leader else a for a in self.addresses)
