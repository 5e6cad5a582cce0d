"""Fixtures shared by the unit tests (a module's own fixture of the same name wins)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from failover.agent.host import Agent
from tests.unit.inprocess import agent_config


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """A started agent (host "a", default settings, no coordinator) on a fresh data dir."""
    agent = Agent(agent_config(tmp_path))
    await agent.start()
    yield agent
    await agent.stop()
