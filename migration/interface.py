"""What the migration engine uses of the replica it copies and of the host that keeps a copy.

The agent hands these in (failover/net/agent_servicers.py passes its `Replica` to
`MigrationSource` and its `Agent` to `MigrationTarget`); the engine names only these
Protocols, never the agent's classes, so that it does not import the agent
(tests/unit/test_layers.py). Each lists exactly what source.py or target.py touches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Protocol

from failover.core.state_machine import ReplicatedStateMachine
from failover.service import ServiceKind


class ReplicaTable(Protocol):
    """The replicas a host holds, by service."""

    @property
    def replicas(self) -> Mapping[str, object]: ...


class KindAndMode(Protocol):
    """The part of a replica's meta a migration carries to the target."""

    @property
    def kind(self) -> str: ...

    @property
    def mode(self) -> str: ...


class EpochHistory(Protocol):
    """The replica's log, as far as the cut needs it: where each epoch began."""

    @property
    def epoch_history(self) -> list[tuple[int, int]]: ...


class SourceReplica(Protocol):
    """The replica a migration copies while it keeps serving (migration/source.py).

    Its kind keeps a paged arena (`sm.kind.paged`); the source throttles writes with
    `write_throttle_ms`, holds applying around the cut and checks at the cut that the host
    (`agent`) still holds this replica at the role and epoch the copy began from.
    """

    write_throttle_ms: float

    @property
    def service(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def epoch(self) -> int: ...

    @property
    def sm(self) -> ReplicatedStateMachine: ...

    @property
    def meta(self) -> KindAndMode: ...

    @property
    def kind_cls(self) -> type[ServiceKind]: ...

    @property
    def wal(self) -> EpochHistory: ...

    @property
    def agent(self) -> ReplicaTable: ...

    def hold_apply(self) -> None: ...

    def release_apply(self) -> None: ...


class FsyncPolicy(Protocol):
    @property
    def fsync_policy(self) -> str: ...


class TargetHost(ReplicaTable, Protocol):
    """The host a migrated copy lands on (migration/target.py): it refuses a service it
    holds already, serializes the write of the copy with its other changes to that service,
    names the copy's directory, lends its I/O threads and its fsync policy, and finally keeps
    the copy, written to disk, as a `building` replica."""

    @property
    def io(self) -> Executor: ...

    @property
    def config(self) -> FsyncPolicy: ...

    def lock(self, service: str) -> asyncio.Lock: ...

    def replica_root(self, service: str) -> Path: ...

    def keep_migrated_copy(
        self, root: Path, service: str, kind: str, epoch: int, mode: str,
        state: ReplicatedStateMachine,
    ) -> None: ...
