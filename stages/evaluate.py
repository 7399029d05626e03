"""evaluate stage: both models on the clean test set, and reports people can look at.

    python -m stages.evaluate data/raw data/images data/filtered data/pairs \
        models/naive models/siamese reports

Reads params ``evaluate.*``; ``raw/test_labels.tsv`` (key, breed) and the
decode index (``split == "test"`` rows are the test images); each model's
``model.pt`` and dvclive curves (``live/plots/metrics``); the filters'
``report.json`` and label tables; ``raw/truth.tsv`` where it exists (sample
data: captions of the gallery say whether a label is right).

Test breeds map to a model's classes by name; a test image whose breed is not
a class of the model is counted (``n_not_scored``), not scored. Writes to the
output folder, each file atomically:

* ``metrics.json``: a block per model (top1, top5, mean_class_accuracy,
  n_test, n_not_scored) and a ``data`` block (images left after each filter,
  label precision / recall after each filter where truth exists, test counts);
* ``per_class.tsv``: breed, support, per model precision and recall (= the
  breed's accuracy);
* ``confusion_<model>.csv``: actual,predicted per scored test image (dvc plots'
  confusion template);
* ``figures/``: confusion matrices, per-class accuracy, training curves, and a
  gallery of what each filter dropped and kept;
* ``ablation.md``: the filters and the models side by side.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from stages.lib import figures, layout
from stages.lib.atomic import atomic_dir, atomic_file, exit_on_sigterm, write_json
from stages.lib.galleries import click_gallery, lookup, prob_gallery
from stages.lib.imagecache import CacheConfig, hold_decoded
from stages.lib.metrics import SUMMARY_METRICS
from stages.lib.params import Section, load_sections
from stages.lib.shards import ShardReader, read_index
from stages.lib.testset import ModelResult, evaluate_model, read_test_set

log = logging.getLogger("evaluate")

@dataclass(frozen=True)
class EvaluateConfig(Section):
    """params.yaml ``evaluate``."""

    device: Literal["auto", "cpu", "cuda"]
    batch_size: int
    gallery_per_reason: int


REFERENCES = ("raw", "truth")  # models/references/<name>/model.pt (train_references)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        log.warning("%s not found: its numbers are left out of the reports", path)
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def data_block(filter_report: dict[str, Any], pairs_report: dict[str, Any],
               test_counts: dict[str, int]) -> dict[str, Any]:
    """Images left after each filter and, where the reports have it (truth.tsv
    exists), label precision and recall after each filter."""
    images = filter_report.get("images", {})
    quality = filter_report.get("quality") or {}
    steps: dict[str, dict[str, Any]] = {
        "decoded_train": {"images": images.get("decoded_train")},
        "raw_clicks": {"images": images.get("raw_labelled"), **_precision_recall(quality.get("raw"))},
        "click_filter": {"images": images.get("kept"), **_precision_recall(quality.get("filtered"))},
    }
    prob_quality = (pairs_report.get("label_quality") or {}).get("label_filter")
    steps["prob_filter"] = {"images": pairs_report.get("images", {}).get("clean"),
                            "relabelled": pairs_report.get("images", {}).get("relabelled"),
                            **_precision_recall(prob_quality)}
    out = {k: {m: v for m, v in step.items() if v is not None} for k, step in steps.items()}
    return {**{k: v for k, v in out.items() if v}, "test": test_counts}


def _precision_recall(quality: dict[str, Any] | None) -> dict[str, Any]:
    quality = quality or {}
    return {"precision": quality.get("precision"), "recall": quality.get("recall")}


def comparison_block(metrics: dict[str, Any], final: str = "siamese") -> dict[str, Any]:
    """What the method buys: the final model minus the paper's baseline (naive
    training on the raw clicks) and minus the pipeline's naive model, and
    ``gap_recovery = (final - raw) / (truth - raw)`` where a truth reference
    exists (the sample): the share of the damage done by click noise that the
    method undoes. Absent models give nulls, not errors."""
    def diff(a: str, b: str) -> dict[str, float | None]:
        return {m: (round(metrics[a][m] - metrics[b][m], 4) if a in metrics and b in metrics else None)
                for m in SUMMARY_METRICS}

    gap = {}
    for m in ("top1", "mean_class_accuracy"):
        ok = all(k in metrics for k in (final, "raw", "truth"))
        den = metrics["truth"][m] - metrics["raw"][m] if ok else 0.0
        gap[m] = round((metrics[final][m] - metrics["raw"][m]) / den, 4) if ok and den > 0 else None
    return {"final": final, "final_minus_raw": diff(final, "raw"), "final_minus_naive": diff(final, "naive"),
            "gap_recovery": gap}


# ------------------------------------------------------------------ curves
def read_curves(live_dir: Path) -> dict[str, pd.DataFrame]:
    """dvclive's per-epoch TSVs (``plots/metrics/train/loss.tsv``: step, loss)
    as {"train/loss": table of (step, value)}."""
    root = live_dir / "plots" / "metrics"
    if not root.is_dir():
        log.warning("no training curves in %s", root)
        return {}
    curves = {}
    for path in sorted(root.rglob("*.tsv")):
        df = pd.read_csv(path, sep="\t")
        if "step" in df and len(df.columns) == 2:
            name = path.relative_to(root).with_suffix("").as_posix()
            curves[name] = df.set_axis(["step", "value"], axis=1)
    return curves


# ------------------------------------------------------------------ outputs
def per_class_table(results: list[ModelResult], test: pd.DataFrame) -> pd.DataFrame:
    """breed, support, then each model's precision and recall; a breed that is
    not a class of a model has empty cells for it."""
    breeds = list(dict.fromkeys(b for r in results for b in r.classes))
    table = pd.DataFrame({"breed": breeds})
    table["support"] = table["breed"].map(test["breed"].value_counts()).fillna(0).astype(int)
    for r in results:
        scores = r.per_class.set_index("breed")
        for col in ("precision", "recall"):
            table[f"{r.name}_{col}"] = table["breed"].map(scores[col]).round(4)
    return table


def write_tables(out: Path, results: list[ModelResult], table: pd.DataFrame) -> None:
    """per_class.tsv and the confusion CSVs that dvc plots reads."""
    with atomic_file(out / "per_class.tsv") as f:
        table.to_csv(f, sep="\t", index=False, na_rep="", lineterminator="\n")
    for r in results:
        if r.name in REFERENCES:
            continue  # dvc.yaml declares the pipeline models' CSVs; references have PNGs only
        with atomic_file(out / f"confusion_{r.name}.csv") as f:
            pd.DataFrame({"actual": r.actual, "predicted": r.predicted}).to_csv(f, index=False, lineterminator="\n")


def _fmt(value: Any, fmt: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, fmt)


def ablation_markdown(metrics: dict[str, Any], results: list[ModelResult], filter_report: dict[str, Any],
                      pairs_report: dict[str, Any]) -> str:
    """ablation.md: images and label quality after each filter, what each
    filter removed, and the models on the test set."""
    data = metrics["data"]
    names = {"decoded_train": "decoded training images", "raw_clicks": "raw click labels (top-clicked breed)",
             "click_filter": "click filter", "prob_filter": "click + label filter"}
    lines = ["# Ablation", "", "Generated by `stages/evaluate.py` from the reports of this run; do not edit.", "",
             "## Training data after each filter", "",
             "| step | images | label precision | label recall |", "|---|---:|---:|---:|"]
    for key, name in names.items():
        step = data.get(key, {})
        lines.append(f"| {name} | {_fmt(step.get('images'), 'd')} | {_fmt(step.get('precision'))} "
                     f"| {_fmt(step.get('recall'))} |")
    lines += ["", "Precision: share of the labelled images whose label is their true breed; recall: share of the "
              "correctly clicked images that keep their label. Both need `truth.tsv` (sample data only): "
              "– where it is absent.", "", "## What each filter removed", "",
              "| filter | reason | images |", "|---|---|---:|"]
    for reason, count in sorted((filter_report.get("images", {}).get("dropped") or {}).items()):
        lines.append(f"| click filter | {reason} | {count} |")
    for status, count in sorted((pairs_report.get("images", {}).get("status") or {}).items()):
        if status != "kept":
            lines.append(f"| label filter ({pairs_report.get('filter')}, {pairs_report.get('scorer')} scorer) "
                         f"| {status} | {count} |")
    lines += ["", "## Test set", "", "| model | top-1 | top-5 | mean per-class accuracy | scored images |",
              "|---|---:|---:|---:|---:|"]
    for r in results:
        b = r.block
        lines.append(f"| {r.name} | {_fmt(b['top1'])} | {_fmt(b['top5'])} | {_fmt(b['mean_class_accuracy'])} "
                     f"| {b['n_test']} |")
    comp = metrics.get("comparison", {})
    for other in ("raw", "naive"):
        d = comp.get(f"final_minus_{other}") or {}
        if any(v is not None for v in d.values()):
            lines.append(f"| {comp['final']} − {other} | " + " | ".join(
                _fmt(d.get(m), "+.3f") for m in ("top1", "top5", "mean_class_accuracy")) + " | |")
    gap = comp.get("gap_recovery") or {}
    if gap.get("top1") is not None:
        lines += ["", f"Gap recovery (final − raw) / (truth − raw): top-1 {_fmt(gap['top1'], '.2f')}, "
                  f"mean per-class accuracy {_fmt(gap.get('mean_class_accuracy'), '.2f')}."]
    test = data["test"]
    lines += ["", f"{test['labelled']} labelled test images, {test['not_decoded']} without a decoded image; "
              + "; ".join(f"{r.name}: {r.block['n_not_scored']} of breeds outside its classes (not scored)"
                          for r in results) + ".",
              "One training run (one seed) per model: differences of a few points can be seed noise "
              "(see the seed study).", ""]
    return "\n".join(lines)


def write_figures(out: Path, dirs: dict[str, Path], results: list[ModelResult], table: pd.DataFrame,
                  index: pd.DataFrame, pairs_report: dict[str, Any], gallery_n: int) -> None:
    """All PNGs, into ``figures/`` (replaced as a whole)."""
    truth_path = dirs["raw"] / layout.TRUTH

    def truth(keys: set[str]) -> dict[str, str] | None:
        return lookup(truth_path, keys, "breed", ["key", "breed"]) if truth_path.is_file() and keys else None

    with atomic_dir(out / "figures") as tmp:
        for r in results:
            figures.confusion_figure(r.actual, r.predicted, r.classes, f"{r.name}: confusion on the test set",
                                     tmp / f"confusion_{r.name}.png")
        figures.per_class_accuracy_figure(table, [r.name for r in results], tmp / "per_class_accuracy.png")
        figures.training_curves_figure({r.name: read_curves(dirs[r.name] / layout.LIVE) for r in results
                                        if r.name not in REFERENCES},
                                       tmp / "training_curves.png")
        if gallery_n <= 0:
            log.info("evaluate.gallery_per_reason is 0: no galleries")
            return
        locations = index.drop_duplicates("key").set_index("key")
        with ShardReader(dirs["images"]) as reader:
            click_gallery(dirs["filtered"], reader, locations, truth, gallery_n, tmp / "gallery_click_filter.png")
            prob_gallery(dirs["filtered"], dirs["pairs"], pairs_report, reader, locations, truth, gallery_n,
                         tmp / "gallery_prob_filter.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("raw", "images", "filtered", "pairs", "naive", "siamese", "references", "out"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    params = load_sections(args.params, evaluate=EvaluateConfig, cache=CacheConfig)
    cfg = params["evaluate"]
    dirs = {k: getattr(args, k) for k in ("raw", "images", "filtered", "pairs", "naive", "siamese")}

    index = read_index(args.images)
    test, test_counts = read_test_set(args.raw, index)
    log.info("test set: %s", test_counts)
    models = {name: dirs[name] / layout.MODEL for name in ("naive", "siamese")}
    for name in REFERENCES:  # the raw-click baseline, and the truth ceiling where truth.tsv exists
        path = args.references / name / layout.MODEL
        if path.is_file():
            models[name] = path
        else:
            log.info("no %s reference model (%s): left out", name, path)
    cache = hold_decoded(args.images, index, test["key"], params["cache"])  # one decode for every model
    results = [evaluate_model(name, path, test, args.images, index, device=cfg.device, batch_size=cfg.batch_size,
                              cache=cache) for name, path in models.items()]
    filter_report = _read_json(args.filtered / layout.REPORT)
    pairs_report = _read_json(args.pairs / layout.REPORT)
    metrics = {r.name: r.block for r in results}
    metrics["comparison"] = comparison_block(metrics)
    metrics["data"] = data_block(filter_report, pairs_report, test_counts)
    log.info("comparison: %s", metrics["comparison"])

    args.out.mkdir(parents=True, exist_ok=True)
    table = per_class_table(results, test)
    write_tables(args.out, results, table)
    start = time.time()
    write_figures(args.out, dirs, results, table, index, pairs_report, cfg.gallery_per_reason)
    log.info("figures written in %.1f s", time.time() - start)
    with atomic_file(args.out / "ablation.md") as f:
        f.write(ablation_markdown(metrics, results, filter_report, pairs_report))
    # last: metrics.json is what CI compares, so it appears only with the rest
    write_json(args.out / "metrics.json", metrics)
    log.info("reports written to %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
