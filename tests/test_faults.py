"""Process faults: a killed stage leaves nothing partial behind."""
from __future__ import annotations

import ast
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.lib import atomic
from stages.lib.atomic import TMP_TAG, atomic_dir, atomic_file, remove_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]

WRITER = """
import sys, time
from pathlib import Path
from stages.lib.atomic import atomic_dir, exit_on_sigterm
if sys.argv[2] == "handled":
    exit_on_sigterm()
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "part").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
"""


def _start_writer(target: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), mode], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"  # inside the atomic write now
    return proc


def test_sigterm_mid_write_leaves_nothing_partial(tmp_path: Path) -> None:
    """SIGTERM (timeout, schedulers, kill) used to leave the temporary folder
    for ever (52 MB in data/.images.* on the sample; hundreds of GB on real data)."""
    target = tmp_path / "images"
    proc = _start_writer(target, "handled")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_killed_runs_are_removed_by_the_next_run(tmp_path: Path) -> None:
    """SIGKILL cannot be handled: the next write to the same target removes
    what the dead process left, and nothing of a live one."""
    target = tmp_path / "images"
    proc = _start_writer(target, "unhandled")
    proc.kill()
    proc.wait(timeout=30)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(f".images{TMP_TAG}")]
    assert len(left) == 1
    live = tmp_path / f".images{TMP_TAG}{atomic._host()}-{os.getpid()}-abc"  # this process: alive, kept
    live.mkdir()
    # another host's writer, whose PID means nothing here (a checkout shared by two hosts): kept
    other_host = tmp_path / f".images{TMP_TAG}{atomic._host()}x-{left[0].name.split('-')[-2]}-abc"
    other_host.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "done").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["images", live.name, other_host.name])
    assert (target / "done").read_text() == "ok"
    with atomic_file(tmp_path / "x.json") as f:  # files get the same treatment
        f.write("{}")
    assert remove_stale_temporaries(target) == []


def test_every_stage_turns_sigterm_into_a_clean_exit() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split()[2]
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        calls = {c.func.id for c in ast.walk(main) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        assert "exit_on_sigterm" in calls, f"{name}: main() does not call exit_on_sigterm()"


def test_a_sigterm_stops_a_real_stage_cleanly(tmp_path: Path) -> None:
    """The decode stage in its own process, terminated while it works."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
    line = base64.b64encode(buf.getvalue()).decode()
    with open(raw / "train_images.tsv", "w") as f:
        f.writelines(f"k{i}\t{line}\n" for i in range(3000))  # PNG: re-encoded, so it takes a while
    (raw / "test_images.tsv").write_text(f"t0\t{line}\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"decode": {**params["decode"], "workers": 1}}))
    proc = subprocess.Popen([sys.executable, "-m", "stages.decode", "data/raw", "data/images"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline and not any(p.name.startswith(".images") for p in (tmp_path / "data").iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


@pytest.mark.parametrize("stage, argv", [
    ("decode", ["data/raw", "data/raw"]),
    ("decode", ["data/raw", "data"]),
    ("decode", ["data/raw", "data/images", "data/raw/test"]),  # the test images' folder, too
    ("filter_clicks", ["data/raw", "data/images", "data/raw/filtered"]),
    ("train_naive", ["data/filtered", "data/images", "data/filtered"]),
    ("train_references", ["data/raw", "data/filtered", "data/images", "data"]),
    ("make_pairs", ["data/raw", "data/filtered", "data/images", "models/naive", "models"]),
    ("train_siamese", ["data/pairs", "data/images", "models/naive", "models/naive"]),
    ("evaluate", ["data/raw", "data/images", "data/filtered", "data/pairs", "models/naive", "models/siamese",
                  "models/references", "data/images"]),
    ("galleries", ["data/raw", "data/filtered", "data/pairs", "data/images", "data/raw/galleries"]),
])
def test_a_stage_refuses_an_output_that_is_or_holds_an_input(tmp_path: Path, monkeypatch, stage: str,
                                                              argv: list[str]) -> None:
    """`python -m stages.decode data/raw data/raw` deleted the raw files: atomic_dir replaced the folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/train_images.tsv").write_text("k\tx\n")
    module = importlib.import_module(f"stages.{stage}")
    with pytest.raises(SystemExit, match=rf"{stage}: the output folder \S+ (is|contains|lies inside) the input"):
        module.main(argv)
    assert (tmp_path / "data/raw/train_images.tsv").read_text() == "k\tx\n"


def test_every_atomic_file_write_reaches_the_disk_before_its_rename(tmp_path: Path, monkeypatch) -> None:
    """One atomic writer for every single file (tables, JSON, model files, checkpoints): its data is
    fsynced before the rename, so a crash leaves the old file or the new one, whole. Only the checkpoint
    writer, a second implementation, did so before. (Output folders, atomic_dir, are renamed whole
    without an fsync of each file: a crash can leave a folder whose last files are empty.)"""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    with atomic_file(tmp_path / "labels.tsv") as f:
        f.write("key\tlabel\n")
    import torch

    from stages.lib import engine
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.save_checkpoint(tmp_path / "last.pt", model=model, optimizer=optimizer,
                           scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), scaler=None,
                           epoch=0, args={}, history=[])
    assert events == ["fsync", "replace", "fsync", "replace"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tsv", "last.pt"]
