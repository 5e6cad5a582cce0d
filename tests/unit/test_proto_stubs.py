"""The committed stubs must be exactly what `make proto` generates from the .proto files."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_a_fresh_regeneration(tmp_path: Path) -> None:
    protos = sorted((ROOT / "proto" / "failover" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
        f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        *map(str, protos),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    fresh_dir = tmp_path / "failover" / "v1"
    committed_dir = ROOT / "failover" / "v1"
    fresh = sorted(p.name for p in fresh_dir.iterdir())
    committed = sorted(p.name for p in committed_dir.iterdir() if p.name != "__init__.py"
                       and p.suffix in (".py", ".pyi"))
    assert fresh == committed, "stub files differ from the .proto files: run `make proto`"
    stale = [n for n in fresh if not filecmp.cmp(fresh_dir / n, committed_dir / n, shallow=False)]
    assert not stale, f"committed stubs are stale: {stale}; run `make proto` and commit"
