"""scripts/plots_offline.py: `dvc plots show` whose page needs no network."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vl_convert")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command (make test puts .venv/bin on PATH)")
def test_the_plots_page_has_no_external_scripts(tmp_path: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "loss.tsv").write_text("step\tloss\n0\t2.0\n1\t1.5\n2\t1.1\n")
    (tmp_path / "dvc.yaml").write_text("plots:\n- loss.tsv:\n    x: step\n    y: loss\n")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "plots_offline.py"), "--out", "plots"], cwd=tmp_path,
                   check=True, env=env, capture_output=True)
    page = (tmp_path / "plots" / "index.html").read_text(encoding="utf-8")
    assert "vegaEmbed('#" in page and "window.vegaEmbed=" in page  # the plot, and the library inlined
    assert not re.search(r"<script[^>]*\bsrc=", page)  # nothing loaded from elsewhere
    assert "cdn.jsdelivr" not in page
