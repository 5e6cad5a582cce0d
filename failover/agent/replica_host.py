"""What a replica (failover/agent/replica.py) uses of the agent that hosts it.

`failover.agent.host.Agent` is the one implementation; the replica names only this Protocol,
so that replica.py never imports host.py (tests/unit/test_layers.py: no cycles, not even
through annotations).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Protocol

from failover.agent.config import AgentConfig
from failover.core.replication import SendBatch
from failover.storage.snapshot import SnapshotHeader


class ReplicaHost(Protocol):
    """The host's I/O threads, tasks, links to peer hosts and the receive state."""

    @property
    def config(self) -> AgentConfig: ...

    @property
    def io(self) -> Executor: ...

    # Writes replicas' meta files (`failover.agent.meta_writer`).
    @property
    def meta_io(self) -> Executor: ...

    @property
    def replicas(self) -> Mapping[str, object]: ...

    # Told the seconds of each log fsync (the agent's metrics, issue 17); None: not measured.
    @property
    def wal_fsync_observer(self) -> Callable[[float], None] | None: ...

    # Ship messages received and not yet answered (appliers yield while there are any), and
    # an event set while there are none.
    @property
    def receiving(self) -> int: ...

    @property
    def receive_idle(self) -> asyncio.Event: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...

    def ensure_links(self, peers: dict[str, str]) -> None: ...

    def link_is_up(self, host_id: str) -> bool: ...

    def ship_probe(self, host_id: str, service: str, epoch: int) -> None: ...

    def ship_truncate(self, host_id: str, service: str, epoch: int, after_index: int) -> None: ...

    def ship_batch(self, host_id: str, service: str, epoch: int, action: SendBatch,
                   records: bytes, last_index: int) -> None: ...

    async def install_snapshot(self, host_id: str, service: str, epoch: int,
                               path: Path) -> tuple[SnapshotHeader, int]: ...
