"""Re-validate a committed run without retraining: what CI runs for a commit
made on the real data (on a GPU server, which CI does not have).

    python -m stages.revalidate [--base REV | --no-baseline] [--protected origin/main] [--remote NAME]
    make revalidate BASE=REV

Everything the check trusts comes from the base (``stages.lib.metriccheck``:
the protected branch's merge-base with HEAD, or ``--base``), never from the
commit under test. Checks, each printed as it ends:

1. the base can be read: its ``check`` params (tolerances), metrics with rows,
   ``dvc.yaml``;
2. the evaluate stage is defined as in the base and is not frozen;
3. ``dvc pull`` of evaluate's cached inputs as the committed ``dvc.lock``
   names them, then ``dvc status --cloud``: the remote itself holds every one
   (a warm local cache must not stand in for it);
4. the committed ``reports/metrics.json`` is removed and ``dvc repro --force
   --single-item evaluate`` must write a fresh one, from the inputs the
   committed ``dvc.lock`` records, with outputs that match the new lock;
5. the fresh metrics equal the committed ones within ``check.reproduce`` both
   ways (re-scoring the same files is deterministic up to float kernels);
6. the test set is the base's (digest, count) and every image is scored;
7. the fresh metrics are not worse than the base's by more than the seed
   tolerance ``check.tolerance``.

Exit 0 when every check passed, 1 when one failed, 2 when an input cannot be
had (no base, no committed metrics, a failed dvc command).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from stages.lib.metriccheck import (
    METRICS,
    CheckError,
    Checks,
    add_base_arguments,
    against_base,
    compare,
    dvc,
    parse_metrics,
    read_metrics,
    report_rows,
    show,
    stage_problems,
    trusted,
)
from stages.lib.params import ConfigError, read_yaml

STAGE = "evaluate"


def cached_inputs(stage: str, stages: dict) -> list[str]:
    """The deps of ``stage`` that another stage writes into DVC's cache: what a pull must fetch (code and
    git-tracked outputs, ``cache: false``, come with the checkout). A dep may be one file of a cached
    folder (evaluate's ``data/raw/test_labels.tsv``): DVC pulls that file alone."""
    cached = set()
    for spec in stages.values():
        for out in spec.get("outs", []):
            name, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if opts.get("cache", True):
                cached.add(name.rstrip("/"))
    return [d for d in stages[stage].get("deps", [])
            if any(d == out or d.startswith(out + "/") for out in cached)]


def lock_deps(lock_text: str, stage: str) -> dict[str, str | None]:
    """{dep path: hash} of ``stage`` in a dvc.lock."""
    spec = (yaml.safe_load(lock_text).get("stages") or {}).get(stage) or {}
    return {d["path"]: d.get("md5") for d in spec.get("deps", [])}


def not_in_remote(targets: list[str], remote: list[str]) -> list[str]:
    """What ``dvc status --cloud`` says the remote lacks: 'new' (only in the local cache) or 'missing'."""
    status = json.loads(dvc("status", "--cloud", "--json", *remote, *targets) or "{}")
    return [f"{path}: {state}" for path, state in status.items() if state != "deleted"]


def evaluate_fresh(stage: str, remote: list[str], stages: dict, checks: Checks) -> dict | None:
    """Checks 3 and 4; the fresh metrics, or None when evaluate produced none."""
    targets = cached_inputs(stage, stages)
    dvc("pull", *remote, *targets)
    checks.report(f"the remote holds every cached input of {stage} ({len(targets)} outputs, dvc status --cloud)",
                  not_in_remote(targets, remote))
    Path(METRICS).unlink(missing_ok=True)  # a run that writes nothing must not leave the committed file
    dvc("repro", "--force", "--single-item", stage)
    problems = [] if Path(METRICS).is_file() else [f"{stage} wrote no {METRICS}"]
    committed, fresh = lock_deps(show("HEAD", "dvc.lock"), stage), lock_deps(Path("dvc.lock").read_text(), stage)
    problems += [f"dep {path}: ran on {fresh.get(path)}, dvc.lock records {md5}"
                 for path, md5 in committed.items() if fresh.get(path) != md5]
    status = json.loads(dvc("status", "--json", stage) or "{}")
    problems += [f"after the run dvc status says {status}"] if status else []
    checks.report(f"{stage} ran: a fresh {METRICS}, from the committed inputs, outputs as dvc.lock records",
                  problems)
    return read_metrics(Path(METRICS)) if Path(METRICS).is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_arguments(parser)
    parser.add_argument("--remote", default=None, help="DVC remote to pull from (default: the default remote)")
    args = parser.parse_args(argv)
    remote = ["-r", args.remote] if args.remote else []
    checks = Checks("revalidate")
    try:
        head_stages = read_yaml("dvc.yaml").get("stages") or {}
        committed = parse_metrics(show("HEAD", METRICS), f"HEAD:{METRICS}")
        base, check = trusted(args, checks)
        checks.report(f"{STAGE} stage not frozen" + ("" if base is None else ", as the base defines it"),
                      stage_problems(head_stages if base is None else base.stages, head_stages, STAGE))
        if checks.failed:
            return checks.close()
        fresh = evaluate_fresh(STAGE, remote, head_stages, checks)
    except (CheckError, ConfigError) as exc:
        print(f"revalidate: {exc}", file=sys.stderr)
        checks.failed += 1
        checks.close()
        return 2
    if fresh is None:
        return checks.close()
    report_rows(checks, f"the committed metrics are what the committed models score (within {check.reproduce:g})",
                compare(committed, fresh, dict.fromkeys(check.tolerance, check.reproduce), both_ways=True),
                f"the committed {METRICS}")
    against_base(checks, base, fresh)
    return checks.close()


if __name__ == "__main__":
    raise SystemExit(main())
