"""Compare fresh metrics with the committed ones, within tolerances (CI).

    python -m stages.check_metrics BASELINE CURRENT [--params params.yaml]

BASELINE is the committed ``reports/metrics.json`` (e.g. ``git show
HEAD:reports/metrics.json > /tmp/baseline.json``), CURRENT the one a fresh
``dvc repro`` wrote. ``check.tolerance`` in params maps a metric name to the
drop it may show; it applies to every model block of the baseline (a
top-level block holding any of those metrics; the ``data`` block holds
none).

Exit 1, after printing a table (metric, baseline, current, delta, tolerance,
verdict), when a current metric is below baseline - tolerance or a model block
or metric of the baseline is missing from CURRENT; exit 0 otherwise, printing
the same table. A metric above baseline + tolerance is a note, not a failure:
the committed metrics may need updating. Exit 2 when a file cannot be read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.lib.metriccheck import BETTER, MISSING, WORSE, check_tolerances, compare, format_table, read_metrics
from stages.lib.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path, help="committed metrics.json")
    parser.add_argument("current", type=Path, help="metrics.json of a fresh run")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        try:
            tolerance = check_tolerances(load_params("check", path=args.params)["tolerance"])
        except (OSError, KeyError, ValueError) as exc:
            raise SystemExit(f"check_metrics: {exc}") from exc
        baseline, current = read_metrics(args.baseline), read_metrics(args.current)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    rows = compare(baseline, current, tolerance)
    if not rows:
        print(f"check_metrics: {args.baseline} has no model block with any of {sorted(tolerance)}", file=sys.stderr)
        return 1
    print(format_table(rows))
    extra = sorted(k for k, v in current.items() if isinstance(v, dict) and set(v) & set(tolerance)
                   and k not in baseline)
    if extra:
        print(f"note: model block(s) {extra} are new in {args.current} and not checked")
    better = [r.metric for r in rows if r.verdict == BETTER]
    if better:
        print(f"note: {', '.join(better)} improved by more than the tolerance: "
              f"the committed {args.baseline.name} may need updating (commit the fresh one)")
    failed = [r for r in rows if r.verdict in (WORSE, MISSING)]
    if failed:
        print(f"check_metrics: FAILED: {sum(r.verdict == WORSE for r in failed)} regression(s), "
              f"{sum(r.verdict == MISSING for r in failed)} missing, against {args.baseline}", file=sys.stderr)
        return 1
    print(f"check_metrics: ok ({len(rows)} metrics within tolerance of {args.baseline})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
