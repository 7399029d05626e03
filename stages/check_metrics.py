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
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.lib.params import load_params

OK, BETTER, WORSE, MISSING = "ok", "better", "REGRESSION", "MISSING"


@dataclass
class Row:
    """One checked metric of one model."""

    metric: str              # "naive.top1"
    baseline: float | None
    current: float | None
    tolerance: float
    verdict: str

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline


def read_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json as a dict; a clear message instead of a traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"check_metrics: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"check_metrics: {path} holds no JSON object")
    return data


def check_tolerances(tolerance: Any) -> dict[str, float]:
    """``check.tolerance`` as {metric: allowed drop >= 0}."""
    if not isinstance(tolerance, dict) or not tolerance:
        raise SystemExit("params.yaml: check.tolerance must map metric names to allowed drops")
    out = {}
    for name, value in tolerance.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise SystemExit(f"params.yaml: check.tolerance.{name} must be a number >= 0, got {value!r}")
        out[str(name)] = float(value)
    return out


def _number(value: Any) -> float | None:
    """A finite number, or None (absent, null, NaN, text): all count as missing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def compare(baseline: dict[str, Any], current: dict[str, Any], tolerance: dict[str, float]) -> list[Row]:
    """One row per (model block of the baseline, metric of the tolerances)."""
    models = [name for name, block in baseline.items() if isinstance(block, dict) and set(block) & set(tolerance)]
    rows = []
    for model in models:
        block = current.get(model) if isinstance(current.get(model), dict) else {}
        for metric, tol in tolerance.items():
            base, cur = _number(baseline[model].get(metric)), _number(block.get(metric))
            if base is None or cur is None:
                verdict = MISSING
            elif cur < base - tol - 1e-12:  # 1e-12: a drop of exactly the tolerance passes
                verdict = WORSE
            elif cur > base + tol + 1e-12:
                verdict = BETTER
            else:
                verdict = OK
            rows.append(Row(f"{model}.{metric}", base, cur, tol, verdict))
    return rows


def format_table(rows: list[Row]) -> str:
    """A fixed-width table that reads in a CI log."""
    def num(v: float | None, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    header = ("metric", "baseline", "current", "delta", "tolerance", "verdict")
    body = [(r.metric, num(r.baseline), num(r.current), num(r.delta, "+.4f"), num(r.tolerance), r.verdict)
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


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
