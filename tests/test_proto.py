"""The generated modules under client/rnnstream_client/_proto match proto/."""

from __future__ import annotations

import filecmp
import shutil
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    subprocess.run(["bash", str(copy / "scripts" / "generate-protos.sh")], check=True, cwd=copy, env={**os.environ, "PYTHON": sys.executable})
    generated = copy / "client" / "rnnstream_client" / "_proto"
    committed = ROOT / "client" / "rnnstream_client" / "_proto"
    for path in generated.rglob("*.py*"):
        relative = path.relative_to(generated)
        assert filecmp.cmp(path, committed / relative, shallow=False), (
            f"{relative} is stale; run scripts/generate-protos.sh"
        )
