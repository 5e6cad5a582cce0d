"""Every process of this package runs gRPC with the experiments `defaults.GRPC_EXPERIMENTS`
turns off (set by `failover/__init__.py` before gRPC is imported), unless the process set
GRPC_EXPERIMENTS itself: then its own value stands, even an empty one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from failover import defaults

ROOT = Path(__file__).resolve().parents[2]
SHOW = ("import failover.client, os, sys; "
        "sys.stdout.write(repr(os.environ.get('GRPC_EXPERIMENTS')))")


def run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    env["PYTHONPATH"] = str(ROOT)
    if env_value is not None:
        env["GRPC_EXPERIMENTS"] = env_value
    return subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True,
                          text=True, check=True, timeout=60).stdout


def test_a_process_that_did_not_choose_gets_the_packages_choice() -> None:
    assert run(None) == repr(defaults.GRPC_EXPERIMENTS)
    assert "-event_engine_listener" in defaults.GRPC_EXPERIMENTS


def test_a_process_that_chose_keeps_its_own_even_empty() -> None:
    assert run("") == repr("")
    assert run("event_engine_client") == repr("event_engine_client")
