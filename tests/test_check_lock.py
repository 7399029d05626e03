"""stages.check_lock: CI fails when the committed dvc.lock does not record the commit's code and params
(the models and metrics a commit carries came from other code than its own), and passes on a fresh
clone that merely lacks the data and models."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import yaml

from stages.lib.metriccheck import stale_lock

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """import yaml, pathlib
score = yaml.safe_load(open("params.yaml"))["train"]["score"]
pathlib.Path("models").mkdir(exist_ok=True)
pathlib.Path("models/model.txt").write_text(str(score))
"""
EVALUATE = """import pathlib
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("reports/top1.txt").write_text(pathlib.Path("models/model.txt").read_text())
"""
DVC_YAML = {"stages": {
    "train": {"cmd": "python train.py", "deps": ["train.py"], "params": ["train.score"],
              "outs": ["models/model.txt"]},
    "evaluate": {"cmd": "python evaluate.py", "deps": ["evaluate.py", "models/model.txt"],
                 "outs": [{"reports/top1.txt": {"cache": False}}]}}}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed run: dvc.lock current, models in the cache only (a clone has none)."""
    if shutil.which("dvc") is None:
        pytest.skip("needs the dvc command (make test's PATH)")
    repo = tmp_path / "repo"
    repo.mkdir()
    conftest.sh("git", "init", "-q", "-b", "main", cwd=repo)
    conftest.sh("dvc", "init", "-q", cwd=repo)
    (repo / "train.py").write_text(TRAIN)
    (repo / "evaluate.py").write_text(EVALUATE)
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"score": 0.8, "unused": 1}}))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    conftest.sh("dvc", "repro", "-q", cwd=repo)
    conftest.sh("git", "add", "-A", cwd=repo)
    conftest.sh("git", "commit", "-qm", "a run", cwd=repo)
    return repo


def check_clone(repo: Path, tmp: Path) -> subprocess.CompletedProcess:
    clone = tmp / f"clone-{len(list(tmp.iterdir()))}"
    conftest.sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp)
    assert not (clone / "models" / "model.txt").exists()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.check_lock"], cwd=clone, env=env,
                          capture_output=True, text=True)


def commit(repo: Path, message: str) -> None:
    conftest.sh("git", "commit", "-qam", message, cwd=repo)


def test_a_current_lock_passes_on_a_clone_without_data(repo: Path, tmp_path: Path) -> None:
    result = check_clone(repo, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok] dvc.lock records" in result.stdout
    # a params key no stage reads changes nothing dvc tracks
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"score": 0.8, "unused": 2}}))
    commit(repo, "an unread key")
    assert check_clone(repo, tmp_path).returncode == 0


@pytest.mark.parametrize("change, named", [
    ("code", "train: train.py modified"),
    ("params", "train: params.yaml train.score modified"),
    ("command", "train: changed command"),
    ("output", "evaluate: output reports/top1.txt modified"),
])
def test_a_commit_without_its_run_fails(repo: Path, tmp_path: Path, change: str, named: str) -> None:
    if change == "code":
        (repo / "train.py").write_text(TRAIN.replace("str(score)", "str(score + 0.1)"))
    elif change == "params":
        (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"score": 0.9, "unused": 1}}))
    elif change == "output":  # a git-tracked output edited by hand (or another run's, uncommitted to dvc.lock)
        (repo / "reports/top1.txt").write_text("0.99")
    else:
        stages = yaml.safe_load((repo / "dvc.yaml").read_text())
        stages["stages"]["train"]["cmd"] = "python -B train.py"
        (repo / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    commit(repo, f"{change} changed, dvc.lock not updated")
    result = check_clone(repo, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[FAILED] dvc.lock records" in result.stdout and named in result.stdout


def test_stale_lock_reads_dvc_status() -> None:
    status = {
        "decode": [{"changed deps": {"data/raw": "deleted"}}, {"changed outs": {"data/images": "not in cache"}}],
        "train": [{"changed deps": {"stages/lib/engine.py": "modified", "params.yaml": {"train.lr": "modified",
                                                                                        "train.ema": "new"}}}],
        "evaluate": ["changed command"],
        "report": [{"changed outs": {"reports/plots": "modified", "models/model.pt": "not in cache"}}],
        "download": ["always changed"],  # always_changed: true, by design
    }
    assert stale_lock(status) == ["train: stages/lib/engine.py modified", "train: params.yaml train.lr modified",
                                  "train: params.yaml train.ema new", "evaluate: changed command",
                                  "report: output reports/plots modified"]
    assert stale_lock({}) == []
