"""Metrics against metrics, within ``check.tolerance``: the comparison behind
``stages.check_metrics`` (a fresh sample run against the committed metrics)
and ``stages.revalidate`` (a committed real-data run re-evaluated)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        raise SystemExit(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"{path} holds no JSON object")
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
