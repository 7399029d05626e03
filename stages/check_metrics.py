"""CI for the sample: a fresh ``dvc repro`` against the committed metrics and the base.

    python -m stages.check_metrics COMMITTED FRESH [--base REV | --no-baseline] [--protected origin/main]

COMMITTED is the ``reports/metrics.json`` the commit under test claims (``git
show HEAD:reports/metrics.json > /tmp/committed.json``, taken before the run),
FRESH the one the run wrote. Everything the check trusts comes from the base
(``stages.lib.metriccheck``: the protected branch's merge-base with HEAD, or
``--base``), never from the commit: ``check.tolerance``, the evaluate stage's
definition, the test set and the baseline metrics. Checks, each printed as it
ends:

1. the base can be read (tolerances, metrics with rows, dvc.yaml);
2. ``dvc.yaml``: no stage is frozen (the sample is re-run whole) and evaluate
   is defined as in the base;
3. FRESH within the base's seed tolerance of COMMITTED (the pipeline was
   retrained: seeds and CPU kernels move a run); better is a note;
4. the test set is the base's (digest, count) and every image is scored;
5. FRESH not worse than the base's metrics by more than the seed tolerance.

Exit 0 when every check passed, 1 when one failed, 2 when an input cannot be
read. ``--no-baseline`` skips 2's comparison, 4's and 5 and takes the
tolerances from this commit's params.yaml, saying so.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.lib.metriccheck import (
    BETTER,
    CheckError,
    Checks,
    add_base_arguments,
    against_base,
    compare,
    read_metrics,
    report_rows,
    stage_problems,
    trusted,
)
from stages.lib.params import ConfigError, read_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("committed", type=Path, help="the metrics.json the commit claims")
    parser.add_argument("fresh", type=Path, help="metrics.json of a fresh run")
    add_base_arguments(parser)
    args = parser.parse_args(argv)
    checks = Checks("check_metrics")
    try:
        committed, fresh = read_metrics(args.committed), read_metrics(args.fresh)
        base, check = trusted(args, checks)
        head_stages = read_yaml("dvc.yaml").get("stages") or {}
    except (CheckError, ConfigError) as exc:
        print(f"check_metrics: {exc}", file=sys.stderr)
        return 2
    problems = [f"dvc.yaml: stage {name!r} is frozen: the sample is re-run whole"
                for name, spec in head_stages.items() if spec.get("frozen")]
    if base is not None:
        problems += [p for p in stage_problems(base.stages, head_stages) if "frozen" not in p]
    checks.report("dvc.yaml: no frozen stage, evaluate as the base defines it", problems)

    rows = compare(committed, fresh, check.tolerance)
    report_rows(checks, "the committed metrics within the seed tolerance", rows, str(args.committed))
    better = [r.metric for r in rows if r.verdict == BETTER]
    if better:
        print(f"note: {', '.join(better)} improved by more than the tolerance: the committed metrics may need "
              "updating (commit the fresh reports/metrics.json)")
    against_base(checks, base, fresh)
    return checks.close()


if __name__ == "__main__":
    raise SystemExit(main())
