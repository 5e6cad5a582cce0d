"""`make demo` runs `failoverctl demo`: it must pass and leave no process behind."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest


@pytest.mark.timeout(120)
def test_demo_passes_and_leaves_no_process() -> None:
    done = subprocess.run([sys.executable, "-m", "failover.cli", "--format", "json", "demo"],
                          capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["lost_acked_writes"] == 0 and report["failed_requests"] == 0
    assert report["bank_total"] == 10_000
    assert report["switchover"]["failed_requests"] == 0
    assert report["failover"]["promoted"] != report["failover"]["killed"]
    assert report["seconds"] < 60
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and "failover-demo-" in " ".join(p.info["cmdline"])]
    assert not leftovers, leftovers
