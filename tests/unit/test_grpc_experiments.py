"""Every process of this package runs gRPC with the experiments `defaults.GRPC_EXPERIMENTS`
turns off (`failover.net.grpc_experiments`, imported before gRPC), unless the process set
GRPC_EXPERIMENTS itself: then its own value stands, even an empty one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from failover import defaults

ROOT = Path(__file__).resolve().parents[2]
# What a process sees once it imported `module` (what a daemon or an application imports
# first), and whether gRPC was imported after the variable was set (it reads it on import).
SHOW = ("import os, sys; import {module}; import grpc; "
        "sys.stdout.write(repr(os.environ.get('GRPC_EXPERIMENTS')))")
STARTS = ("failover.client", "failover.agent.main", "failover.coordinator.main",
          "failover.cli.main")


def run(env_value: str | None, module: str = "failover.client") -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    env["PYTHONPATH"] = str(ROOT)
    if env_value is not None:
        env["GRPC_EXPERIMENTS"] = env_value
    return subprocess.run([sys.executable, "-c", SHOW.format(module=module)], env=env,
                          capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.mark.parametrize("module", STARTS)
def test_a_process_that_did_not_choose_gets_the_packages_choice(module: str) -> None:
    assert run(None, module) == repr(defaults.GRPC_EXPERIMENTS)
    assert "-event_engine_listener" in defaults.GRPC_EXPERIMENTS


def test_the_package_sets_it_before_grpc_is_imported() -> None:
    """gRPC reads the variable when it is imported: set after, it changed nothing."""
    probe = ("import sys; import {module}; "
             "sys.stdout.write(str(sorted(m for m in sys.modules if m == 'grpc')))")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    env["PYTHONPATH"] = str(ROOT)
    for module in STARTS:
        order = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", probe.format(module=module)], env=env,
            capture_output=True, text=True, check=True, timeout=60).stderr
        # -X importtime lists each module as its import ends, its own imports before it.
        names = [line.rsplit("|", 1)[-1].strip() for line in order.splitlines()]
        assert "failover.net.grpc_experiments" in names, module
        grpc_first = min((i for i, n in enumerate(names) if n.split(".")[0] == "grpc"),
                         default=len(names))
        assert names.index("failover.net.grpc_experiments") < grpc_first, module


def test_a_process_that_chose_keeps_its_own_even_empty() -> None:
    assert run("") == repr("")
    assert run("event_engine_client") == repr("event_engine_client")
