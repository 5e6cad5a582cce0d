"""A call that saw a newer epoch than its replica holds waits (bounded) for that epoch's
assignment rather than being redirected at once (issue 14's storm).

After a host death, the coordinator commits the failovers, pushes routes and sends the
promotions; clients often reach a new primary before its AssignRole does. The duplica used
to refuse them with a redirect to the primary it had (the dead one), and clients retried on
their backoff: services became writable again up to 800 ms after their new primary was."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest

from failover import defaults
from failover.agent.host import Agent
from failover.core.roles import DUPLICA, PRIMARY
from failover.core.state_machine import SESSION_OPEN_PAYLOAD
from failover.errors import NotPrimaryError
from tests.unit.inprocess import UNREACHABLE, agent_config


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """Agent "a" holding kv as a duplica of "p" (nowhere) at epoch 1."""
    agent = Agent(agent_config(tmp_path / "data"))
    await agent.start()
    await agent.assign_role("kv", "kv", DUPLICA, 1, "sync", ("p", UNREACHABLE), {}, set())
    try:
        yield agent
    finally:
        await agent.stop()


def put(key: str) -> bytes:
    return msgpack.packb({"op": "put", "key": key, "value": "v"})


async def promote_after(agent: Agent, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    await agent.assign_role("kv", "kv", PRIMARY, 2, "sync", None, {}, set())


async def test_a_call_from_the_new_epoch_waits_for_the_promotion_and_is_served(
        agent: Agent) -> None:
    replica = agent.replicas["kv"]
    promotion = asyncio.ensure_future(promote_after(agent, 0.1))
    # The client's route already says: kv's primary is this host, at epoch 2.
    reply, _duplicate, epoch = await replica.execute(2, "c", 1, SESSION_OPEN_PAYLOAD, 5.0)
    await promotion
    assert epoch == 2 and reply.index >= 1
    reply, _duplicate, epoch = await replica.execute(2, "c", 2, put("k"), 5.0, False)
    assert epoch == 2


async def test_a_read_from_the_new_epoch_waits_for_the_promotion_too(agent: Agent) -> None:
    replica = agent.replicas["kv"]
    promotion = asyncio.ensure_future(promote_after(agent, 0.1))
    reply = await replica.query(msgpack.packb({"op": "get", "key": "k"}), 2)
    await promotion
    assert replica.epoch == 2 and reply is not None


async def test_an_assignment_that_never_comes_is_waited_for_a_bounded_time(
        agent: Agent) -> None:
    replica = agent.replicas["kv"]
    started = time.monotonic()
    with pytest.raises(NotPrimaryError):
        await replica.execute(2, "c", 1, put("k"), 5.0)
    waited_ms = (time.monotonic() - started) * 1000
    assert defaults.NEWER_EPOCH_WAIT_MS * 0.9 <= waited_ms < defaults.NEWER_EPOCH_WAIT_MS + 300
    # A call at the epoch it holds (or older) is answered at once, as before.
    started = time.monotonic()
    with pytest.raises(NotPrimaryError):
        await replica.execute(1, "c", 1, put("k"), 5.0)
    assert time.monotonic() - started < 0.1


async def test_a_step_down_to_the_epoch_seen_ends_the_wait_with_a_redirect(
        agent: Agent) -> None:
    """Another host was promoted: this replica hears of epoch 2 as a duplica of it, and the
    call is redirected there, not held until the bound."""
    replica = agent.replicas["kv"]

    async def reassign() -> None:
        await asyncio.sleep(0.05)
        await agent.assign_role("kv", "kv", DUPLICA, 2, "sync", ("q", "127.0.0.1:2"), {}, set())

    task = asyncio.ensure_future(reassign())
    started = time.monotonic()
    with pytest.raises(NotPrimaryError) as refused:
        await replica.execute(2, "c", 1, put("k"), 5.0)
    await task
    assert time.monotonic() - started < defaults.NEWER_EPOCH_WAIT_MS / 2000
    assert refused.value.primary_address == "127.0.0.1:2"


async def test_stream_calls_from_the_new_epoch_are_handed_back_to_run_one_by_one(
        agent: Agent) -> None:
    """`execute_many` takes no call of a newer epoch at once (it would refuse it): it hands
    it back for `execute`, which waits."""
    replica = agent.replicas["kv"]
    answered: list[object] = []
    rest = replica.execute_many([(0, 2, "c", 1, put("k"), True)],
                                lambda call, outcome: answered.append(outcome))
    assert answered == [] and [c[0] for c in rest] == [0]
