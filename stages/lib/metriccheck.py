"""What CI trusts and how it compares: the checks behind ``stages.check_metrics``
(a fresh sample run against the committed metrics) and ``stages.revalidate``
(a committed real-data run re-evaluated from the DVC remote).

Trust comes from the *base*, never from the commit under test: the tolerances,
the metrics every model block must carry, the evaluate stage's definition and
the baseline metrics are read with ``git show`` from the protected branch's
merge-base with HEAD (or its first parent when HEAD is on the protected branch,
as in CI's clone of main). A commit can therefore not loosen its own check,
freeze or redirect its evaluation, or narrow the test set. Every check fails
closed: a base that cannot be read, yields no rows or lacks the test-set digest
is a failure, unless ``--no-baseline`` says so explicitly.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.lib import layout
from stages.lib.metrics import SUMMARY_METRICS
from stages.lib.params import ConfigError, Section, in_range, load_sections, parse_yaml

OK, BETTER, WORSE, MISSING = "ok", "better", "REGRESSION", "MISSING"
PROTECTED = "origin/main"     # the protected branch whose merge-base is the base (--protected)
METRICS = f"reports/{layout.METRICS}"  # the path git and dvc.yaml know
MAX_TOLERANCE = 0.1           # a seed tolerance above 10 points would pass anything worth catching
MAX_REPRODUCE = 1e-3          # re-scoring the same files is deterministic up to float kernels


@dataclass(frozen=True)
class CheckConfig(Section):
    """params.yaml ``check``, read from the base commit (never the one under test)."""

    tolerance: dict[str, float]  # seed-to-seed drop a retrained model may show, per metric
    reproduce: float             # committed vs re-scored metrics of the same model files

    def __post_init__(self) -> None:
        missing = [m for m in SUMMARY_METRICS if m not in self.tolerance]
        unknown = [m for m in self.tolerance if m not in SUMMARY_METRICS]
        if missing or unknown:
            raise ValueError(f"tolerance must name exactly {list(SUMMARY_METRICS)} "
                             f"(missing {missing}, unknown {unknown})")
        for metric, value in self.tolerance.items():
            in_range(f"tolerance.{metric}", value, 0.0, MAX_TOLERANCE)
        in_range("reproduce", self.reproduce, 0.0, MAX_REPRODUCE)


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


class CheckError(RuntimeError):
    """An input of a check cannot be had (a git revision, a file): the check fails closed."""


def read_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json as a dict; CheckError instead of a traceback."""
    try:
        return parse_metrics(path.read_text(encoding="utf-8"), str(path))
    except OSError as exc:
        raise CheckError(f"cannot read {path}: {exc}") from exc


def parse_metrics(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CheckError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckError(f"{where} holds no JSON object")
    return data


def _number(value: Any) -> float | None:
    """A finite number, or None (absent, null, NaN, text): all count as missing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def model_blocks(metrics: dict[str, Any]) -> list[str]:
    """The top-level blocks that hold any summary metric (the ``data`` and ``comparison`` blocks hold none)."""
    return [name for name, block in metrics.items() if isinstance(block, dict) and set(block) & set(SUMMARY_METRICS)]


def compare(baseline: dict[str, Any], current: dict[str, Any], tolerance: dict[str, float], *,
            both_ways: bool = False) -> list[Row]:
    """One row per (model block of ``baseline``, metric of ``tolerance``): below baseline - tolerance is
    WORSE; above baseline + tolerance is BETTER (a failure where ``both_ways``); absent is MISSING."""
    rows = []
    for model in model_blocks(baseline):
        block = current.get(model) if isinstance(current.get(model), dict) else {}
        for metric, tol in tolerance.items():
            base, cur = _number(baseline[model].get(metric)), _number(block.get(metric))
            if base is None or cur is None:
                verdict = MISSING
            elif cur < base - tol - 1e-12:  # 1e-12: a drop of exactly the tolerance passes
                verdict = WORSE
            elif cur > base + tol + 1e-12:
                verdict = WORSE if both_ways else BETTER
            else:
                verdict = OK
            rows.append(Row(f"{model}.{metric}", base, cur, tol, verdict))
    return rows


def failed_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.verdict in (WORSE, MISSING)]


def format_table(rows: list[Row]) -> str:
    """A fixed-width table that reads in a CI log."""
    def num(v: float | None, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    header = ("metric", "baseline", "current", "delta", "tolerance", "verdict")
    body = [(r.metric, num(r.baseline), num(r.current), num(r.delta, "+.4f"), format(r.tolerance, "g"), r.verdict)
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


# ------------------------------------------------------------------ the test set
def pin_problems(base: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The test set must be the base's (same keys and labels: ``data.test.digest``), and every model must
    score every test image: a model that leaves breeds out (a filter that drops hard classes, a spelling
    difference between breeds.tsv and test_labels.tsv) would otherwise score higher on an easier set."""
    def digest(m: dict[str, Any]) -> Any:
        return ((m.get("data") or {}).get("test") or {}).get("digest")

    problems = []
    if not digest(base):
        problems.append("the base's metrics have no data.test.digest: an unverified baseline")
    elif digest(current) != digest(base):
        problems.append(f"test set differs from the base's: data.test.digest {digest(current)} != {digest(base)}")
    for model in model_blocks(base):
        block = current.get(model) if isinstance(current.get(model), dict) else {}
        if block.get("n_test") != base[model].get("n_test"):
            problems.append(f"{model}.n_test {block.get('n_test')} != the base's {base[model].get('n_test')}")
    return problems + unscored(current)


def unscored(metrics: dict[str, Any]) -> list[str]:
    """Every model must score every test image (its breed must be one of the model's classes)."""
    return [f"{model}.n_not_scored is {metrics[model].get('n_not_scored')}: every test image must be scored "
            "(its breed must be a class of the model)"
            for model in model_blocks(metrics) if metrics[model].get("n_not_scored") != 0]


# ------------------------------------------------------------------ the base
@dataclass(frozen=True)
class Base:
    """What CI trusts, read from one commit."""

    rev: str                      # the commit id
    how: str                      # how it was chosen, for the log
    check: CheckConfig
    metrics: dict[str, Any]
    stages: dict[str, Any] = field(repr=False)   # dvc.yaml's stages


def git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckError(f"git {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def dvc(*args: str) -> str:
    """Run dvc, echo the command and the tail of its output; a failure is a :class:`CheckError`."""
    print("+ dvc", " ".join(args), flush=True)
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        raise CheckError(f"dvc {' '.join(args)} failed with exit code {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def stale_lock(status: dict[str, Any]) -> list[str]:
    """What ``dvc status --json`` says of a fresh clone that makes its dvc.lock stale: a dependency the
    commit holds (code, params.yaml's keys) that is not as dvc.lock records it, an output the commit
    holds (git-tracked: ``cache: false`` metrics and plots) that differs from it, a changed command, a
    stage without a lock entry. Then the committed files came from another run than the one dvc.lock
    records, and ``dvc repro`` silently re-runs the stage. What a clone lacks is not stale: data and
    models live in the DVC cache and remote (state ``deleted`` / ``not in cache``)."""
    problems = []
    for stage, entries in status.items():
        for entry in entries:
            if entry == "always changed":  # always_changed: true runs every time by design, whatever the lock says
                continue
            if not isinstance(entry, dict):  # "changed command", "changed checksum"
                problems.append(f"{stage}: {entry}")
                continue
            for path, state in entry.get("changed deps", {}).items():
                if isinstance(state, dict):  # params.yaml: {key: modified | new | deleted}
                    problems += [f"{stage}: {path} {key} {s}" for key, s in state.items()]
                elif state != "deleted":
                    problems.append(f"{stage}: {path} {state}")
            problems += [f"{stage}: output {path} {state}" for path, state in entry.get("changed outs", {}).items()
                         if state not in ("deleted", "not in cache")]
    return problems


def show(rev: str, path: str, cwd: Path | None = None) -> str:
    """A file as committed at ``rev``."""
    return git("show", f"{rev}:{path}", cwd=cwd)


def resolve_base(base: str | None, protected: str = PROTECTED, cwd: Path | None = None) -> tuple[str, str]:
    """(commit id, how it was found): ``base`` when given; else the merge-base of HEAD and ``protected``,
    or HEAD's first parent when HEAD is already on ``protected`` (CI testing the branch itself)."""
    if base:
        return git("rev-parse", "--verify", f"{base}^{{commit}}", cwd=cwd).strip(), f"--base {base}"
    head = git("rev-parse", "HEAD", cwd=cwd).strip()
    try:
        merge_base = git("merge-base", "HEAD", protected, cwd=cwd).strip()
    except CheckError as exc:
        raise CheckError(f"{exc}\nno base: {protected} is not known here (fetch it, name another with "
                         "--protected, pass --base REV, or --no-baseline to skip the regression check)") from exc
    if merge_base != head:
        return merge_base, f"merge-base of HEAD and {protected}"
    try:
        parent = git("rev-parse", "--verify", "HEAD^1^{commit}", cwd=cwd).strip()
    except CheckError as exc:
        raise CheckError(f"{exc}\nno base: HEAD is {protected} and its parent is not in this clone "
                         "(a shallow clone? git fetch --deepen 1)") from exc
    return parent, f"HEAD is on {protected}: its first parent"


def load_base(rev: str, how: str, cwd: Path | None = None) -> Base:
    """The base's check params, metrics and dvc.yaml stages; CheckError when any is missing or unusable."""
    try:
        params = parse_yaml(show(rev, "params.yaml", cwd), f"{rev[:12]}:params.yaml")
        check = CheckConfig.from_params(params.get("check"), "check")
    except ConfigError as exc:
        raise CheckError(f"base {rev[:12]}: {exc}") from exc
    metrics = parse_metrics(show(rev, METRICS, cwd), f"{rev[:12]}:{METRICS}")
    if not model_blocks(metrics):
        raise CheckError(f"base {rev[:12]}: {METRICS} has no model block with {list(SUMMARY_METRICS)}")
    stages = yaml.safe_load(show(rev, "dvc.yaml", cwd)).get("stages") or {}
    return Base(rev, how, check, metrics, stages)


def _definition(spec: dict[str, Any]) -> dict[str, Any]:
    """A stage's dvc.yaml entry without its code deps: a commit may import one more module (its deps list
    follows its imports: stages/lib/deps.py), but not change what the stage runs, reads or writes."""
    deps = [d for d in spec.get("deps", []) if not (str(d).startswith("stages/") and str(d).endswith(".py"))]
    return {**spec, "deps": deps}


def stage_problems(base_stages: dict[str, Any], head_stages: dict[str, Any], stage: str = "evaluate") -> list[str]:
    """``stage`` must run as the base defines it: not frozen (``dvc repro`` would skip it and a check would
    compare the committed metrics with themselves), the same command, params, data deps and outputs
    (outputs written elsewhere leave the committed file in place); its code deps may differ."""
    spec = head_stages.get(stage)
    if spec is None:
        return [f"dvc.yaml has no stage {stage!r}"]
    problems = [f"dvc.yaml: stage {stage!r} is frozen"] if spec.get("frozen") else []
    base = base_stages.get(stage)
    if base is None or _definition(spec) != _definition(base):
        changed = sorted(k for k in set(spec) | set(base or {})
                         if _definition(spec).get(k) != _definition(base or {}).get(k))
        problems.append(f"dvc.yaml: stage {stage!r} differs from the base's definition in {changed} (change it "
                        "on the protected branch first, where the sample pipeline re-runs it)")
    return problems


class Checks:
    """The checks a command ran, printed one a line as they end: CI's log says what was checked."""

    def __init__(self, name: str) -> None:
        self.name, self.failed, self.ran = name, 0, 0

    def report(self, what: str, problems: list[str] | None = None, *, skipped: str = "") -> bool:
        if skipped:
            print(f"[skipped] {what}: {skipped}", flush=True)
            return True
        self.ran += 1
        self.failed += bool(problems)
        print(f"[{'FAILED' if problems else 'ok'}] {what}", flush=True)
        for p in problems or []:
            print(f"          {p}", flush=True)
        return not problems

    def close(self) -> int:
        verdict = f"FAILED ({self.failed} of {self.ran} checks)" if self.failed else f"ok ({self.ran} checks)"
        print(f"{self.name}: {verdict}", flush=True)
        return 1 if self.failed else 0


def add_base_arguments(parser: Any) -> None:
    """The base's command-line options, the same for check_metrics and revalidate."""
    parser.add_argument("--base", default=None, help="the trusted commit (default: merge-base with --protected)")
    parser.add_argument("--protected", default=PROTECTED, help=f"the protected branch ({PROTECTED})")
    parser.add_argument("--no-baseline", action="store_true",
                        help="no base: tolerances from this commit, no regression check (printed as skipped)")


def trusted(args: Any, checks: Checks, params: Path = Path("params.yaml")) -> tuple[Base | None, CheckConfig]:
    """The base and its check params, per ``--base`` / ``--protected`` / ``--no-baseline``."""
    if args.no_baseline:
        checks.report("base", skipped="--no-baseline: tolerances from this commit's params.yaml, "
                                      "no regression check")
        return None, load_sections(params, check=CheckConfig)["check"]
    base = load_base(*resolve_base(args.base, args.protected))
    checks.report(f"base {base.rev[:12]} ({base.how}): tolerances, test set, evaluate stage, metrics")
    return base, base.check


def report_rows(checks: Checks, what: str, rows: list[Row], against: str) -> None:
    """Print the table of ``rows`` and report them as one check (no rows fails: nothing was compared)."""
    print(f"\n{what}: fresh (current) against {against} (baseline):\n{format_table(rows)}\n", flush=True)
    checks.report(f"{what} ({len(rows)} metrics)",
                  [f"{r.metric}: {r.verdict}" for r in failed_rows(rows)] or ([] if rows else ["no rows"]))


def against_base(checks: Checks, base: Base | None, fresh: dict[str, Any]) -> None:
    """The checks against the base: the test set is its, and no model regressed beyond the seed tolerance."""
    if base is None:
        checks.report("test set: every image scored", unscored(fresh))
        return
    checks.report("test set: the base's digest and count, every image scored", pin_problems(base.metrics, fresh))
    report_rows(checks, "no regression beyond the seed tolerance", compare(base.metrics, fresh, base.check.tolerance),
                f"the base {base.rev[:12]}")
