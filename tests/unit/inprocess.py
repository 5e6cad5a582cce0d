"""An agent in this process, for tests of the real `Agent` and `Replica` without gRPC
servers of their own: its config, an address where no peer answers, and a polled wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from failover.agent.config import AgentConfig

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: a duplica there never acks


def agent_config(data_dir: Path, **extra: Any) -> AgentConfig:
    """Host "a" with its data in `data_dir`; `extra` sets other keys of the agent's TOML."""
    return AgentConfig.from_mapping(
        {"host_id": "a", "listen": "127.0.0.1:7999", "data_dir": str(data_dir), **extra})


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Polls `condition` on the loop until it holds; fails the test after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
