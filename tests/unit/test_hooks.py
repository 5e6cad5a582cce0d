"""Hooks (issue 17, item 5): named in `[hooks]` from the host's allowlist and checked at
config load; run in the background with the service, role and epoch, bounded in time and
output; their results recorded in history by the coordinator core, each once."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from failover import defaults
from failover.agent.config import AgentConfig
from failover.agent.hooks import HookRunner
from failover.agent.main import main
from failover.core.coordinator import CoordinatorCore, HookReport, HostInfo, Persist
from failover.errors import ConfigError, InvalidRequest

BASE = {"host_id": "h1", "listen": "127.0.0.1:7101", "data_dir": "/tmp/x"}


def _config(hooks: dict[str, Any], commands: dict[str, list[str]] | None = None) -> AgentConfig:
    return AgentConfig.from_mapping({
        **BASE, "patch": {"commands": commands if commands is not None else
                          {"notify": ["/bin/true"]}},
        "hooks": hooks})


def test_hooks_name_allowlist_entries_and_limits_load() -> None:
    config = _config({"on_failover": "notify", "on_role_change": ["notify"],
                      "timeout_ms": 500, "output_bytes_max": 100})
    assert config.hooks == {"on_failover": ("notify",), "on_role_change": ("notify",)}
    assert (config.hook_timeout_ms, config.hook_output_bytes_max) == (500, 100)


@pytest.mark.parametrize(("hooks", "message"), [
    ({"on_failover": ["rm -rf /"]}, r"'rm -rf /' is not in this host's allowlist "
                                    r"\[patch.commands\] \(it has: notify\)"),
    ({"on_failover": ["other"]}, "add other = "),
    ({"on_promote": ["notify"]}, "unknown key"),
    ({"on_failover": []}, "give 1 to"),
    ({"on_failover": ["notify"] * (defaults.HOOKS_PER_EVENT_MAX + 1)}, "give 1 to"),
    ({"timeout_ms": 0}, "timeout_ms must be"),
    ({"output_bytes_max": defaults.HOOK_OUTPUT_BYTES_MAX + 1}, "output_bytes_max must be"),
])
def test_a_hook_not_in_the_allowlist_is_refused_at_load(hooks: dict[str, Any],
                                                         message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(hooks)


def test_the_agent_refuses_such_a_config_with_exit_2_and_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('host_id = "h1"\nlisten = "127.0.0.1:7101"\n'
                    f'data_dir = "{tmp_path}"\n[hooks]\non_failover = ["page-me"]\n')
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(toml)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'page-me' is not in this host's allowlist" in err[0]


async def test_a_hook_runs_in_the_background_with_its_arguments_bounded() -> None:
    tasks: set[asyncio.Task[Any]] = set()
    script = ("import os, sys; print(' '.join(sys.argv[1:]), os.environ['FAILOVER_HOOK_EVENT']);"
              "print('x' * 5000)")
    runner = HookRunner(
        "h1", {"on_failover": ("say", "slow")},
        {"say": (sys.executable, "-c", script),
         "slow": (sys.executable, "-c", "import time; time.sleep(10)")},
        lambda coro: tasks.add(asyncio.ensure_future(coro)), timeout_ms=1500,
        output_bytes_max=64)
    loop = asyncio.get_running_loop()
    started = loop.time()
    runner.fire("on_failover", "kv", "primary", 7)
    assert loop.time() - started < 0.1  # starts them, waits for nothing
    assert runner.running == 2 and runner.pending() == []
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    results = {r.command: r for r in runner.pending()}
    assert results["say"].exit_code == 0 and len(results["say"].output.encode()) <= 64
    assert results["say"].output.endswith("x" * 20 + "\n")
    assert results["slow"].timed_out and results["slow"].exit_code == -1
    runner.delivered(runner.pending())
    assert runner.pending() == []


async def test_the_arguments_reach_the_hook() -> None:
    tasks: set[asyncio.Task[Any]] = set()
    script = "import os, sys; print(sys.argv[1:], os.environ['FAILOVER_HOOK_EVENT'])"
    runner = HookRunner("h1", {"on_role_change": ("say",)},
                        {"say": (sys.executable, "-c", script)},
                        lambda coro: tasks.add(asyncio.ensure_future(coro)))
    runner.fire("on_role_change", "kv", "duplica", 3)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert runner.pending()[0].output.strip() == "['kv', 'duplica', '3'] on_role_change"


def test_past_hooks_running_max_a_hook_is_skipped_and_says_so() -> None:
    started: list[Any] = []
    runner = HookRunner("h1", {"on_role_change": ("a",)}, {"a": ("/bin/true",)},
                        lambda coro: started.append(coro))
    for _ in range(defaults.HOOKS_RUNNING_MAX + 1):
        runner.fire("on_role_change", "kv", "primary", 1)
    for coro in started:
        coro.close()
    skipped = runner.pending()
    assert len(started) == defaults.HOOKS_RUNNING_MAX and len(skipped) == 1
    assert skipped[0].skipped and "hooks_running_max" in skipped[0].output


def _report(seq: int, **changes: Any) -> HookReport:
    fields: dict[str, Any] = {
        "seq": seq, "service": "kv", "event": "on_failover", "command": "notify",
        "role": "primary", "epoch": 2, "exit_code": 0, "output": "done\n",
        "duration_ms": 12}
    return HookReport(**{**fields, **changes})


def test_the_core_records_each_hook_once_in_history() -> None:
    core = CoordinatorCore()
    core.register(HostInfo("h1", "h1:1", "", started_at=1.0), 0, None)
    actions = core.record_hooks("h1", [_report(1), _report(2, timed_out=True, exit_code=-1)])
    assert len(actions) == 1 and isinstance(actions[0], Persist)
    events = actions[0].history
    assert [e[1] for e in events] == ["hook", "hook"]
    assert "on_failover hook notify on h1 (primary, epoch 2) exited 0" in events[0][2]
    assert "killed after 12 ms" in events[1][2]
    assert events[0][3]["output"] == "done\n" and events[0][3]["host_id"] == "h1"
    # Re-sent after a lost answer: not recorded again; a new agent process counts anew.
    assert core.record_hooks("h1", [_report(2), _report(3)])[0].history[0][3]["exit_code"] == 0
    assert core.record_hooks("h1", [_report(3)]) == []
    core.register(HostInfo("h1", "h1:1", "", started_at=2.0), 10, None)
    assert len(core.record_hooks("h1", [_report(1)])) == 1


@pytest.mark.parametrize("bad", [
    _report(1, service="../x"), _report(1, event="on_boot"), _report(1, command="rm -rf"),
    _report(1, role="king"), _report(1, output="x" * (defaults.HOOK_OUTPUT_BYTES_MAX + 1)),
])
def test_the_core_refuses_a_hook_report_no_agent_sends(bad: HookReport) -> None:
    core = CoordinatorCore()
    with pytest.raises(InvalidRequest):
        core.record_hooks("h1", [bad])
    with pytest.raises(InvalidRequest, match="hook_results_per_heartbeat_max"):
        core.record_hooks("h1", [_report(i) for i in
                                 range(defaults.HOOK_RESULTS_PER_HEARTBEAT_MAX + 1)])


async def test_a_hook_running_when_its_agent_stops_is_killed(tmp_path: Path) -> None:
    tasks: set[asyncio.Task[Any]] = set()
    marker = tmp_path / "pid"
    script = (f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid()));"
              "time.sleep(30)")
    runner = HookRunner("h1", {"on_failover": ("slow",)},
                        {"slow": (sys.executable, "-c", script)},
                        lambda coro: tasks.add(asyncio.ensure_future(coro)))
    runner.fire("on_failover", "kv", "primary", 2)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not marker.exists() or not marker.read_text():
        assert loop.time() < deadline, "the hook never started"
        await asyncio.sleep(0.02)
    pid = int(marker.read_text())
    for task in tasks:
        task.cancel()  # as Agent.stop cancels its tasks
    await asyncio.gather(*tasks, return_exceptions=True)
    deadline = loop.time() + 5
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert loop.time() < deadline, "the hook outlived its agent"
        await asyncio.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


async def test_a_hook_killed_by_a_signal_is_not_reported_as_timed_out() -> None:
    # asyncio gives -N for a process killed by signal N: SIGHUP's -1 is the deadline's code.
    # The hook restores SIGHUP's default first: under nohup it inherits it ignored, lives on
    # and exits 0.
    tasks: set[asyncio.Task[Any]] = set()
    runner = HookRunner("h1", {"on_failover": ("hup",)},
                        {"hup": (sys.executable, "-c",
                                 "import os, signal; signal.signal(signal.SIGHUP, signal.SIG_DFL);"
                                 " os.kill(os.getpid(), signal.SIGHUP)")},
                        lambda coro: tasks.add(asyncio.ensure_future(coro)), timeout_ms=10_000)
    runner.fire("on_failover", "kv", "primary", 7)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    result = runner.pending()[0]
    assert not result.timed_out
    assert result.exit_code == 128 + 1  # as a shell reports it
    assert result.output.endswith("was killed by SIGHUP")
