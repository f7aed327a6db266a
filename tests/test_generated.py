"""The committed gRPC/protobuf code is what scripts/generate_protos.py makes from proto/ today."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes  # every test here starts OS processes

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "the generator wrote nothing"
    stale = [
        str(p)
        for p in fresh
        if not filecmp.cmp(tmp_path / p, ROOT / "splitlearning" / p.relative_to("splitlearning"), shallow=False)
    ]
    assert not stale, f"generated files differ from proto/: {stale}; run python scripts/generate_protos.py"
    committed = {p.relative_to(ROOT) for p in (ROOT / "splitlearning" / "v1").glob("*_pb2*")}
    assert committed == set(fresh), f"committed {sorted(map(str, committed))} vs generated {sorted(map(str, fresh))}"
