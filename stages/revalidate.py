"""Re-validate a committed run without retraining: what CI runs for a commit
made on the real data (on a GPU server, which CI does not have).

    python -m stages.revalidate [--baseline REV] [--remote NAME] [--stage evaluate]
    make revalidate BASELINE=REV

1. ``dvc pull`` of what the committed ``dvc.lock`` names for the evaluate
   stage's inputs that live in DVC's cache (the final models, the decoded
   images and the label tables), from the default remote or ``--remote``;
2. ``dvc repro --force --single-item evaluate``: only the evaluation runs;
3. the fresh ``reports/metrics.json`` must equal the committed one within
   ``check.tolerance`` both ways (a hand-edited metrics file, or models that
   are not the ones measured, fail) and must not be worse than the
   ``--baseline`` commit's metrics by more than the tolerance.

Prints both comparisons as tables; exit 0 when both pass, 1 otherwise, 2 when
an input cannot be read.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from stages.lib.metriccheck import BETTER, MISSING, WORSE, check_tolerances, compare, format_table
from stages.lib.params import load_params, read_yaml

METRICS = "reports/metrics.json"


def cached_inputs(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The deps of ``stage`` that another stage writes into DVC's cache: what a pull must fetch (code and
    git-tracked outputs, ``cache: false``, come with the checkout)."""
    stages = read_yaml(dvc_yaml)["stages"]
    if stage not in stages:
        raise SystemExit(f"revalidate: dvc.yaml has no stage {stage!r}")
    cached = set()
    for spec in stages.values():
        for out in spec.get("outs", []):
            name, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if opts.get("cache", True):
                cached.add(name)
    return [d for d in stages[stage].get("deps", []) if d in cached]


def committed_metrics(rev: str) -> dict | None:
    """``reports/metrics.json`` as committed at ``rev``; None when it has none."""
    shown = subprocess.run(["git", "show", f"{rev}:{METRICS}"], capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD~1", help="commit whose metrics must not be beaten (HEAD~1)")
    parser.add_argument("--remote", default=None, help="DVC remote to pull from (default: the default remote)")
    parser.add_argument("--stage", default="evaluate")
    args = parser.parse_args(argv)
    tolerance = check_tolerances(load_params("check")["tolerance"])
    committed = committed_metrics("HEAD")
    if committed is None:
        print(f"revalidate: HEAD has no {METRICS} to re-validate", file=sys.stderr)
        return 2
    try:
        run(["dvc", "pull", *(["-r", args.remote] if args.remote else []), *cached_inputs(args.stage)])
        run(["dvc", "repro", "--force", "--single-item", args.stage])
    except subprocess.CalledProcessError as err:
        print(f"revalidate: {' '.join(err.cmd)} failed with exit code {err.returncode}", file=sys.stderr)
        return 2
    fresh = json.loads(Path(METRICS).read_text(encoding="utf-8"))
    failed = False
    rows = compare(committed, fresh, tolerance)
    print(f"\nfresh evaluation (current) against the committed {METRICS} (baseline):\n{format_table(rows)}")
    if not rows or any(r.verdict in (WORSE, BETTER, MISSING) for r in rows):
        print("revalidate: FAILED: the committed metrics are not what the committed models score", file=sys.stderr)
        failed = True
    baseline = committed_metrics(args.baseline)
    if baseline is None:
        print(f"\nnote: {args.baseline} has no {METRICS}: no regression check")
    else:
        rows = compare(baseline, fresh, tolerance)
        print(f"\nfresh evaluation (current) against {args.baseline} (baseline):\n{format_table(rows)}")
        if any(r.verdict in (WORSE, MISSING) for r in rows):
            print(f"revalidate: FAILED: worse than {args.baseline} by more than check.tolerance", file=sys.stderr)
            failed = True
    if not failed:
        print("revalidate: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
