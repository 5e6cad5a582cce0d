"""The real migration source and target, in process: two agents, the target serving gRPC on
a free port. What the copy records as its epoch, and the cut's re-check of the source's role
and epoch (issue 11, item 9)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from failover.agent.config import AgentConfig
from failover.agent.host import Agent
from failover.agent.replica import Replica
from failover.errors import MigrationError
from failover.net import agent_servicers, channels
from failover.storage.snapshot import read_header
from failover.v1 import agent_pb2
from migration.source import MigrationSource

from .test_replica_agent import put

EPOCH = 3


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[tuple[Agent, Agent, str]]:
    """Agent a, agent b, and the address b's migration service listens on."""
    agents = []
    for host in ("a", "b"):
        agent = Agent(AgentConfig.from_mapping(
            {"host_id": host, "listen": "127.0.0.1:7999", "data_dir": str(tmp_path / host)}))
        await agent.start()
        agents.append(agent)
    server = channels.server()
    agent_servicers.add_to_server(server, agents[1])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield agents[0], agents[1], f"127.0.0.1:{port}"
    await server.stop(None)
    for agent in agents:
        await agent.stop()


async def source_primary(agent: Agent, writes: int = 20) -> Replica:
    """A kv primary at EPOCH with no duplicas (it commits alone), holding a few writes."""
    replica = await agent.assign_role("kv1", "kv", "primary", EPOCH, "sync", None, {}, set())
    for seq in range(1, writes + 1):
        await replica.execute(0, "c", seq, put(f"k{seq}"), 5.0)
    return replica


async def migrate(replica: Replica, target_address: str,
                  after_a_round: Callable[[], Awaitable[object]] | None = None) -> None:
    """Runs the real migration source to the end; `after_a_round` runs once, while the copy
    is between a pre-copy round and the cut."""
    request = agent_pb2.MigrateOutRequest(
        service=replica.service, epoch=replica.epoch, migration_id="kv1-test",
        target_host_id="b", target_address=target_address, method="precopy")
    async for progress in MigrationSource(replica, request, "a").run():
        if progress.phase == "round" and after_a_round is not None:
            await after_a_round()
            after_a_round = None


async def test_a_migrated_copy_keeps_the_source_epoch(
    hosts: tuple[Agent, Agent, str],
) -> None:
    # The target recorded epoch 0 for the copy (the cut's batch named none): any fenced
    # primary, at any epoch, could then ship to it.
    a, b, address = hosts
    source = await source_primary(a)
    await migrate(source, address)
    copy = b.replicas["kv1"]
    applied = copy.sm.applied_index
    assert applied == source.sm.applied_index > 0
    assert copy.role == "building" and copy.epoch == EPOCH
    assert Replica.load_meta(copy.root).epoch == EPOCH
    path = copy.snapshots.latest()
    assert path is not None
    header = read_header(path)
    assert (header.applied_index, header.epoch) == (applied, source.sm.applied_epoch)
    expected = [tuple(h) for h in source.wal.epoch_history if h[1] <= applied]
    assert [tuple(h) for h in copy.wal.epoch_history] == expected
    assert [list(h) for h in header.extra["history"]] == [list(h) for h in expected]
    # A primary fenced before the source's epoch is refused by the copy (invariant 2).
    answer = await copy.receive_probe(EPOCH - 1)
    assert (answer["status"], answer["epoch"]) == ("stale_epoch", EPOCH)


@pytest.mark.parametrize("change", ["step_down", "newer_epoch"])
async def test_the_cut_aborts_when_the_source_changed_role_or_epoch(
    hosts: tuple[Agent, Agent, str], change: str,
) -> None:
    # Between the start and the cut the source replica was stepped down, or moved to a newer
    # epoch: the copy must not be kept (the abort path), and the source serves on.
    a, b, address = hosts
    source = await source_primary(a)

    async def changed() -> object:
        if change == "step_down":
            return await a.step_down("kv1", EPOCH + 1)
        return await a.assign_role("kv1", "kv", "primary", EPOCH + 1, "sync", None, {}, set())

    with pytest.raises(MigrationError, match="at the cut this replica is"):
        await migrate(source, address, changed)
    assert a.replicas["kv1"] is source and source.epoch == EPOCH + 1
    assert not source.core.apply_held  # applying resumed
    assert "kv1" not in b.replicas and not b.replica_root("kv1").exists()
    if change == "newer_epoch":
        reply, _, epoch = await source.execute(0, "c", 100, put("after"), 5.0)
        assert epoch == EPOCH + 1 and reply.index > 0
