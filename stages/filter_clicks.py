"""filter_clicks stage: noisy click logs -> weak breed labels for training.

    python -m stages.filter_clicks data/raw data/images data/filtered
    python -m stages.filter_clicks data/raw data/images --sweep reports/sweep   (make sweep)

Reads params ``filter.*``, ``raw/clicks.tsv``, ``raw/breeds.tsv``,
``images/index.parquet`` (only ``split == "train"`` keys are training images)
and, where present, ``raw/truth.tsv`` (reports only). Writes the files of
``stages.lib.layout`` for data/filtered/, atomically. The rules and their
notation are in :mod:`stages.lib.weaklabels`.

A release without a click log (no ``raw/clicks.tsv``) whose image file has
a breed column (``decode.columns: [breed, key, image]``) gets its weak labels
from that column: click counts are unknown, so the click thresholds do not
apply and only make_pairs' probability filter judges the labels.

``--sweep DIR`` applies a grid of ``min_clicks`` x ``min_share`` instead, and
writes ``filter_sweep.{csv,md,png}`` (precision against kept images) to DIR;
it needs ``truth.tsv``.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.lib import layout
from stages.lib.atomic import atomic_dir, atomic_file, exit_on_sigterm, refuse_overlapping_args, write_json
from stages.lib.cli import run_stage
from stages.lib.clicklog import ClickLogSummary, aggregate_clicks
from stages.lib.labelquality import label_quality, sweep_thresholds
from stages.lib.noise import check_enough_left
from stages.lib.params import load_sections
from stages.lib.queries import BreedMatcher
from stages.lib.tables import read_breeds, read_train_keys, read_truth, write_table
from stages.lib.weaklabels import (
    COLUMN_DROP_REASONS,
    DROP_REASONS,
    UNKNOWN_BREED,
    FilterConfig,
    WeakLabels,
    find_weak_labels,
    labels_from_column,
)

log = logging.getLogger("filter_clicks")


def read_vocabulary(raw: Path, params: FilterConfig) -> tuple[list[str], BreedMatcher]:
    """The breeds of breeds.tsv and the matcher of queries (or breed cells) to them."""
    aliases = params.aliases
    breeds = read_breeds(raw / layout.BREEDS)
    # One params.yaml serves the sample and the real data: an alias of a breed
    # this vocabulary lacks is skipped, not an error.
    unknown = {a: b for a, b in aliases.items() if b not in set(breeds)}
    if unknown:
        log.warning("aliases of breeds not in %s skipped: %s", layout.BREEDS, unknown)
        aliases = {a: b for a, b in aliases.items() if a not in unknown}
    try:
        matcher = BreedMatcher(breeds, aliases)
    except ValueError as err:
        raise SystemExit(f"filter.aliases / {layout.BREEDS}: {err}") from err
    return breeds, matcher


def load_inputs(raw: Path, images: Path, breeds: list[str], matcher: BreedMatcher, params: FilterConfig
                ) -> tuple[pa.Array, pd.DataFrame, ClickLogSummary]:
    """Read the training keys and the click log (streamed)."""
    train_keys = read_train_keys(images / layout.INDEX)
    t0 = time.perf_counter()
    clicks, summary = aggregate_clicks(raw / layout.CLICKS, matcher, max_clicks=params.max_clicks_per_line,
                                       max_line_bytes=params.max_line_bytes,
                                       block_size=max(4 << 20, 2 * params.max_line_bytes), progress=True)
    dt = time.perf_counter() - t0
    log.info("click log: %d lines (%d valid, %d malformed, %d duplicates summed) in %.1f s (%.0f lines/s); "
             "%d distinct queries", summary.lines, summary.valid_lines, sum(summary.malformed.values()),
             summary.duplicate_lines, dt, summary.lines / max(dt, 1e-9), summary.queries["distinct"])
    return train_keys, clicks, summary


def labels_from_image_file(raw: Path, images: Path, breeds: list[str], matcher: BreedMatcher,
                           truth: pd.Series | None, params: FilterConfig) -> tuple[WeakLabels, dict[str, Any]]:
    """The weak labels of a release without a click log: the breed column
    that decode kept in the index. A clear error when there is none."""
    index = pq.read_table(images / layout.INDEX)
    if "breed" not in index.column_names:
        raise SystemExit(
            f"filter_clicks: there is no click log ({raw / layout.CLICKS}) and {images / layout.INDEX} has no breed "
            f"column: give the click log (data.files.clicks), or, for a release whose image file carries the weak "
            f"labels, name that column in decode.columns (e.g. [breed, key, image])")
    log.warning("no click log (%s): the weak labels are the breed column of %s (decode.columns). Click counts are "
                "unknown, so filter.min_clicks and filter.min_share do not apply; only make_pairs' probability "
                "filter (pairs.filter) judges these labels", raw / layout.CLICKS, layout.TRAIN_IMAGES)
    train = index.filter(pc.equal(index["split"], "train")).select(["key", "breed"]).to_pandas()
    weak = labels_from_column(train["key"], train["breed"], breeds, matcher.classify,
                              min_images_per_class=params.min_images_per_class)
    reasons = weak.dropped["reason"].value_counts()
    unmatched = weak.evidence.loc[weak.evidence["reason"] == UNKNOWN_BREED, "text"].value_counts()
    report = {
        "labels_from": "image_file",
        "params": {"min_images_per_class": params.min_images_per_class},
        "images": {"decoded_train": len(train), "raw_labelled": len(weak.raw), "kept": len(weak.kept),
                   "dropped": {r: int(reasons.get(r, 0)) for r in COLUMN_DROP_REASONS}},
        "breed_cells": {"distinct": int(train["breed"].nunique()),
                        "unknown": {t: int(n) for t, n in unmatched.head(20).items()}},
        **class_report(weak),
        "quality": label_quality(weak, truth) if truth is not None else None,
    }
    if len(unmatched):
        log.warning("%d training images have a breed cell that names no breed of %s (or several): %s", unmatched.sum(),
                    layout.BREEDS, {t: int(n) for t, n in unmatched.head(5).items()})
    return weak, report


def class_report(weak: WeakLabels) -> dict[str, Any]:
    return {"classes": {"kept": weak.classes,
                        "dropped": [b for b in weak.per_class["breed"] if b not in set(weak.classes)]},
            "per_class": {r.breed: {"raw": int(r.raw), "passed": int(r.passed), "kept": int(r.kept)}
                          for r in weak.per_class.itertuples()}}


def check_rejects(summary: ClickLogSummary, max_fraction: float) -> None:
    """Fail with the counts and examples when too many click lines are malformed."""
    if summary.malformed_fraction > max_fraction:
        bad = {k: v for k, v in summary.malformed.items() if v}
        raise SystemExit(
            f"filter_clicks: {sum(bad.values())} of {summary.lines} click lines are malformed "
            f"({summary.malformed_fraction:.2%} > filter.max_reject_fraction {max_fraction:.2%}): {bad}; "
            f"examples: {summary.malformed_examples}")


def build_report(weak: WeakLabels, summary: ClickLogSummary, truth: pd.Series | None,
                 params: FilterConfig) -> dict[str, Any]:
    """report.json: what was read, what was dropped and why, and label quality."""
    reasons = weak.dropped["reason"].value_counts()
    ev = weak.evidence
    return {
        "params": {k: getattr(params, k) for k in ("min_clicks", "min_share", "min_images_per_class")},
        "lines": {"total": summary.lines, "valid": summary.valid_lines,
                  "duplicates_summed": summary.duplicate_lines,
                  "malformed": summary.malformed, "malformed_fraction": round(summary.malformed_fraction, 6),
                  "malformed_examples": summary.malformed_examples},
        "queries": summary.queries,
        "images": {"clicked": int((ev["breed_clicks"] + ev["other_clicks"] > 0).sum()),
                   "decoded_train": int(ev["decoded"].sum()), "raw_labelled": len(weak.raw),
                   "kept": len(weak.kept), "dropped": {r: int(reasons.get(r, 0)) for r in DROP_REASONS}},
        **class_report(weak),
        "quality": label_quality(weak, truth) if truth is not None else None,
    }


def write_outputs(out: Path, weak: WeakLabels, report: dict[str, Any]) -> None:
    with atomic_dir(out) as tmp:
        write_table(weak.kept, tmp / layout.LABELS)
        write_table(weak.raw, tmp / layout.RAW_LABELS)
        write_table(weak.dropped, tmp / layout.DROPPED)
        write_json(tmp / layout.CLASSES, weak.classes)
        write_json(tmp / layout.REPORT, report)


def write_sweep(out: Path, table: pd.DataFrame, params: FilterConfig) -> None:
    """filter_sweep.csv, .md and .png (precision against kept images)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "filter_sweep.csv") as f:
        table.to_csv(f, index=False, lineterminator="\n")
    cols = list(table.columns)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |"
           for row in table.itertuples(index=False)]
    with atomic_file(out / "filter_sweep.md") as f:
        f.write("\n".join(md) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    raw, grid = table.iloc[0], table.iloc[1:]
    for mc, g in grid.groupby("min_clicks"):
        ax.plot(g["kept"], g["precision"], "o-", ms=4, label=f"min_clicks={mc}")
    ax.plot(raw["kept"], raw["precision"], "k*", ms=12, label="raw click labels")
    cur = grid[(grid["min_clicks"] == params.min_clicks) & (grid["min_share"] - params.min_share).abs().lt(1e-9)]
    if len(cur):
        ax.plot(cur["kept"], cur["precision"], "rs", ms=10, mfc="none", label="params.yaml")
    ax.set_xlabel("kept training images")
    ax.set_ylabel("label precision")
    ax.set_title("filter_clicks: min_clicks x min_share (points: min_share 0.5 -> 1.0)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out / "filter_sweep.png", "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def run_sweep(out: Path, clicks: pd.DataFrame, breeds: list[str], train_keys: pa.Array,
              truth: pd.Series | None, params: FilterConfig) -> None:
    """Print and write the min_clicks x min_share trade-off."""
    if truth is None:
        raise SystemExit(f"--sweep needs {layout.TRUTH} (true breeds) to measure precision")
    table = sweep_thresholds(clicks, breeds, truth, train_keys=train_keys,
                             min_images_per_class=params.min_images_per_class)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    write_sweep(out, table, params)
    log.info("sweep written to %s", out)


def check_and_write(out: Path, weak: WeakLabels, report: dict[str, Any], params: FilterConfig) -> None:
    """Stop when too little is left, else write data/filtered/."""
    if not weak.classes:
        raise SystemExit("filter_clicks: no class keeps filter.min_images_per_class images; "
                         "lower filter.min_clicks / min_share / min_images_per_class")
    # a breed with too few raw-clicked images is left out (the data's doing); one
    # that had enough and lost it to the thresholds stops the stage (the filter's)
    per_class = weak.per_class
    try:
        check_enough_left(dict(zip(per_class["breed"], per_class["raw"].astype(int))),
                          dict(zip(per_class["breed"], per_class["kept"].astype(int))),
                          stage="filter_clicks", min_per_class=params.min_images_per_class,
                          min_kept_share=params.min_kept_share, params="filter.min_clicks / filter.min_share")
    except ValueError as err:
        raise SystemExit(str(err)) from err
    write_outputs(out, weak, report)
    log.info("kept %d of %d decoded training images in %d classes; dropped: %s", len(weak.kept),
             report["images"]["decoded_train"], len(weak.classes),
             {k: v for k, v in report["images"]["dropped"].items() if v})
    if report["quality"]:
        q = report["quality"]
        log.info("label precision %s -> %s, recall %s -> %s (truth.tsv)", q["raw"]["precision"],
                 q["filtered"]["precision"], q["raw"]["recall"], q["filtered"]["recall"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", type=Path, help="data/raw: clicks.tsv, breeds.tsv[, truth.tsv]")
    ap.add_argument("images", type=Path, help="data/images: index.parquet")
    ap.add_argument("out", type=Path, nargs="?", help="output folder (data/filtered)")
    ap.add_argument("--sweep", type=Path, metavar="DIR", help="sweep thresholds, write tables and plot to DIR")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    refuse_overlapping_args(args, "out", "filter_clicks")  # replacing the output must not delete an input
    if (args.out is None) == (args.sweep is None):
        ap.error("give either OUT or --sweep DIR")
    try:
        params = load_sections(args.params, filter=FilterConfig)["filter"]
    except ValueError as err:  # ConfigError, or a threshold out of range
        raise SystemExit(f"filter_clicks: {err}") from err
    breeds, matcher = read_vocabulary(args.raw, params)
    truth = read_truth(args.raw / layout.TRUTH) if (args.raw / layout.TRUTH).exists() else None  # reports only
    if not (args.raw / layout.CLICKS).exists():  # a release with the weak labels in its image file
        if args.sweep is not None:
            raise SystemExit(f"--sweep sweeps click thresholds: it needs {args.raw / layout.CLICKS}")
        weak, report = labels_from_image_file(args.raw, args.images, breeds, matcher, truth, params)
        check_and_write(args.out, weak, report, params)
        return 0
    train_keys, clicks, summary = load_inputs(args.raw, args.images, breeds, matcher, params)
    check_rejects(summary, params.max_reject_fraction)
    if args.sweep is not None:
        run_sweep(args.sweep, clicks, breeds, train_keys, truth, params)
        return 0
    weak = find_weak_labels(clicks, breeds, train_keys=train_keys, min_clicks=params.min_clicks,
                            min_share=params.min_share, min_images_per_class=params.min_images_per_class)
    check_and_write(args.out, weak, build_report(weak, summary, truth, params), params)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "filter_clicks"))
