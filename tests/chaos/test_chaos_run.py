"""The 60-second chaos run of `make test`: kill and pause faults in sync mode, on two hot keys
(12 kv workers, short deadlines, cas that swap, readers after every kill), must pass, and the
saved history must give the same verdict when re-checked offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from failover.chaos.history import load_ops


@pytest.mark.timeout(240)
def test_sixty_second_chaos_run_passes(tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "failover.cli", "--format", "json", "chaos", "--duration", "60",
         "--seed", "7", "--faults", "kill,pause", "--mode", "sync", "--keys", "2",
         "--workers", "12", "--op-deadline-ms", "300", "--report", str(report_dir)],
        capture_output=True, text=True, timeout=230)
    assert done.stdout.strip(), done.stderr[-3000:]  # the run itself failed: say why
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, (report.get("violations"), done.stderr[-3000:])
    assert report["passed"] is True
    assert report["linearizable"] is True and report["bank_invariant"] is True
    assert report["exactly_once"] is True and report["lost_acked_writes"] == 0
    assert report["violations"] == []
    # Both hot keys were decided, not left "unknown" by a search out of budget.
    assert report["keys_checked"] == 2 and report["keys_decided"] == 2
    assert report["ops_ok"] > 5_000
    assert sum(report["faults"].values()) >= 10, report["faults"]
    assert report["failovers"] >= 1
    assert report["after_fault_reads"] > 100
    # Deadlines shorter than a failover leave some outcomes unknown (251 in one run here);
    # the checker explained them either way, and still decided both keys.
    assert report["ops_unknown"] > 0
    # The report dir holds what is needed to re-check the run offline.
    ops = load_ops((report_dir / "history.jsonl").read_text())
    assert len(ops) == report["ops_ok"] + report["ops_failed"] + report["ops_unknown"]
    # The workload called on the streaming data path (issue 16).
    assert any('"client_path": "stream"' in line or '"client_path":"stream"' in line
               for line in (report_dir / "history.jsonl").read_text().splitlines())
    swapped = [o for o in ops if o.kind == "cas" and o.result and o.result["swapped"]]
    assert len(swapped) > 20  # the cas read the value first, so some do swap
    assert sum(1 for o in ops if o.kind == "get" and o.args.get("final")) == 2
    assert sum(1 for o in ops if o.kind == "read_all" and "snapshot" in o.args) >= 2
    assert json.loads((report_dir / "report.json").read_text())["seed"] == 7
    assert (report_dir / "timeline.png").stat().st_size > 10_000
    again = subprocess.run(
        [sys.executable, "-m", "failover.cli", "--format", "json", "chaos", "check",
         str(report_dir)], capture_output=True, text=True, timeout=120)
    offline = json.loads(again.stdout)
    assert again.returncode == 0 and offline["passed"] is True
    assert offline["keys_decided"] == 2 and offline["violations"] == []


@pytest.mark.timeout(240)
def test_chaos_run_with_migrations_and_patches_passes(tmp_path: Path) -> None:
    """Live migrations and rolling restarts under load, among kills: no violation, and the
    planned moves themselves fail no request outcome the checkers can see."""
    # 40 s: seed 1 schedules its migrations after four kills and a patch, and each of those
    # heals in 3-5 s under load; at 30 s a loaded CI machine reached only one migration.
    done = subprocess.run(
        [sys.executable, "-m", "failover.cli", "--format", "json", "chaos", "--duration", "40",
         "--seed", "1", "--faults", "kill,migrate,patch", "--mode", "sync",
         "--report", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=230)
    assert done.stdout.strip(), done.stderr[-3000:]  # the run itself failed: say why
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, (report.get("violations"), done.stderr[-3000:])
    assert report["violations"] == [] and report["passed"] is True
    assert report["lost_acked_writes"] == 0 and report["exactly_once"] is True
    assert report["faults"].get("migrate", 0) >= 2 and report["faults"].get("patch", 0) >= 1
    assert not report["faults_skipped"], report["faults_skipped"]
