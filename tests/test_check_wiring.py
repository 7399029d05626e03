"""scripts/check_wiring.py changes params in a scratch copy, never in place."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command (make test puts .venv/bin on PATH)")
def test_scratch_copy_leaves_the_real_params_alone(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    (root / "params.yaml").write_text("a: 1\n")
    (root / "data").mkdir()
    (root / "data" / "x.bin").write_bytes(b"123")
    (root / ".venv").mkdir()
    (root / ".dvc" / "tmp").mkdir(exist_ok=True)
    (root / ".dvc" / "tmp" / "state").write_text("DVC's state database: per work tree")
    copy = load_script("check_wiring").scratch_copy(root)
    try:
        assert copy.parent == root and copy.name.startswith(".check_wiring.tmp-")
        assert (copy / "data" / "x.bin").stat().st_ino == (root / "data" / "x.bin").stat().st_ino  # linked
        assert not (copy / ".venv").exists() and not (copy / ".dvc" / "tmp" / "state").exists()
        cache = subprocess.run(["dvc", "cache", "dir"], cwd=copy, capture_output=True, text=True, check=True)
        assert Path(cache.stdout.strip()) == root / ".dvc" / "cache"  # outputs are looked up where they are
        # what main() does to each case's params
        (copy / "params.yaml").unlink()
        (copy / "params.yaml").write_text("a: 2\n")
        assert (root / "params.yaml").read_text() == "a: 1\n"
        assert not (root / ".dvc" / "config.local").exists()
    finally:
        shutil.rmtree(copy)
