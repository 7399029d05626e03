"""Wall time of the sample pipeline, stage by stage, for one or more commits
(a benchmark, not a test).

    .venv/bin/python benchmarks/pipeline.py fe81773 HEAD [--rounds 2] [--out reports/benchmarks/pipeline.json]

Each commit is cloned into a scratch directory that shares this checkout's
``.venv`` (the project is installed editable, but ``python -m stages.x`` runs
the clone's code: the working directory comes first on ``sys.path``), and runs
one cold ``dvc repro`` (no run cache, nothing pulled). A stage's time runs
from DVC's "Running stage" line to the next stage's (DVC's own hashing in
between is counted in the stage before it). Run the commits one after
another on an idle machine: on 2 cores any other job halves the numbers.
Prints a markdown table and, for training stages of commits that log it,
images/s and the share of each epoch spent waiting for the loader.

``--rounds N`` runs the commits N times, alternating (A B A B ...), and
reports each stage's median with the range: on the shared 2-core machine the
same epoch took 5.1 to 8.7 s from one run to the next, so one run per commit
can be 15% off either way.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
# checkpoints whose history tells images/s and loader waits (newer commits log data_wait_s)
HISTORIES = {"train_naive": "models/naive/checkpoints/last.pt", "train_siamese": "models/siamese/checkpoints/last.pt"}


def repro(commit: str, workdir: Path) -> dict:
    clone = workdir / commit
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    sha = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], check=True,
                         capture_output=True, text=True).stdout.strip()
    (clone / ".venv").symlink_to(ROOT / ".venv")
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONHASHSEED="0",
               PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
    times: dict[str, float] = {}
    start = current = time.perf_counter()
    stage = None
    proc = subprocess.Popen(["dvc", "repro", "--no-run-cache"], cwd=clone, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    log = []
    for line in proc.stdout:
        log.append(line)
        m = STAGE_LINE.search(line)
        if m:
            now = time.perf_counter()
            if stage is not None:
                times[stage] = now - current
            stage, current = m.group(1), now
    if proc.wait() != 0:
        raise SystemExit(f"dvc repro failed for {commit}:\n{''.join(log[-40:])}")
    end = time.perf_counter()
    if stage is not None:
        times[stage] = end - current
    return {"commit": sha, "stages": times, "total_s": end - start, "training": training_stats(clone),
            "metrics": json.loads((clone / "reports" / "metrics.json").read_text())}


def training_stats(clone: Path) -> dict:
    out = {}
    for stage, path in HISTORIES.items():
        history = torch.load(clone / path, map_location="cpu", weights_only=True)["history"]
        secs = sum(h["epoch_s"] for h in history)
        stats = {"epochs": len(history), "epoch_s": round(secs, 1),
                 "images_per_s": round(sum(h["train_images_per_s"] for h in history) / len(history))}
        if all("train_data_wait_s" in h for h in history):
            stats["data_wait_share"] = round(sum(h["train_data_wait_s"] for h in history) / secs, 3)
        out[stage] = stats
    return out


def table(runs: list[dict]) -> str:
    """Per stage and commit: the median over the commit's runs (with the range when there are several);
    for two commits, the ratio of the medians."""
    commits = list(dict.fromkeys(r["commit"] for r in runs))
    stages = list(dict.fromkeys(s for r in runs for s in r["stages"]))
    head = "| stage | " + " | ".join(commits) + (" | new / old |" if len(commits) == 2 else " |")
    lines = [head, "|---" * (len(commits) + 1 + (len(commits) == 2)) + "|"]
    for s in stages + ["total"]:
        cells, medians = [], []
        for c in commits:
            vals = [r["total_s"] if s == "total" else r["stages"].get(s, float("nan")) for r in runs
                    if r["commit"] == c]
            medians.append(float(np.median(vals)))
            cells.append(f"{medians[-1]:.0f} s" + (f" ({min(vals):.0f}–{max(vals):.0f})" if len(vals) > 1 else ""))
        row = f"| {s} | " + " | ".join(cells)
        lines.append(row + (f" | {medians[1] / medians[0]:.2f} |" if len(commits) == 2 else " |"))
    for r in runs:
        for stage, st in r["training"].items():
            lines.append(f"\n{r['commit']} {stage}: {st}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commits", nargs="+")
    p.add_argument("--out", type=Path, default=None, help="also write the runs as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the scratch clones")
    p.add_argument("--rounds", type=int, default=1, help="run the commits this many times, alternating")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="clickdog-pipeline-"))
    try:
        runs = []
        for round_ in range(args.rounds):
            for c in args.commits:
                runs.append(repro(c, workdir / f"round{round_}"))
                print(f"{runs[-1]['commit']}: {runs[-1]['total_s']:.0f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(table(runs))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
