"""The evaluate stage's reports: the metrics blocks, the per-class table,
ablation.md, the PNG figures and the dvclive plots that ``dvc plots diff``
compares across experiments (``stages/evaluate.py`` reads params, scores
the models with :mod:`stages.lib.testset` and calls these)."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from stages.lib import figures, layout
from stages.lib.atomic import atomic_dir, atomic_file
from stages.lib.metrics import SUMMARY_METRICS
from stages.lib.params import Section
from stages.lib.testset import ModelResult

log = logging.getLogger("evaluate")

LIVE = "live"  # dvclive's folder in the reports folder: plots/sklearn/confusion_<model>.json, plots/custom/...


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        log.warning("%s not found: its numbers are left out of the reports", path)
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def data_block(filter_report: dict[str, Any], pairs_report: dict[str, Any],
               test_counts: dict[str, int]) -> dict[str, Any]:
    """Images left after each filter and, where the reports have it (truth.tsv
    exists), label precision, recall and the distractors (non-dogs) still
    labelled after each filter."""
    images = filter_report.get("images", {})
    quality = filter_report.get("quality") or {}
    steps: dict[str, dict[str, Any]] = {
        "decoded_train": {"images": images.get("decoded_train")},
        "raw_clicks": {"images": images.get("raw_labelled"), **_label_numbers(quality.get("raw"))},
        "click_filter": {"images": images.get("kept"), **_label_numbers(quality.get("filtered"))},
    }
    prob_quality = (pairs_report.get("label_quality") or {}).get("label_filter")
    steps["prob_filter"] = {"images": pairs_report.get("images", {}).get("clean"),
                            "relabelled": pairs_report.get("images", {}).get("relabelled"),
                            **_label_numbers(prob_quality)}
    out = {k: {m: v for m, v in step.items() if v is not None} for k, step in steps.items()}
    return {**{k: v for k, v in out.items() if v}, "test": test_counts}


def _label_numbers(quality: dict[str, Any] | None) -> dict[str, Any]:
    quality = quality or {}
    return {k: quality.get(k) for k in ("precision", "recall", "distractors")}


def digest_test_set(test: pd.DataFrame) -> str:
    """SHA-256 of the scored test set's ``key<TAB>breed`` lines in key order: CI compares it with the
    base's, so a commit cannot make its numbers on another (easier, smaller) test set."""
    lines = sorted(f"{k}\t{b}\n" for k, b in zip(test["key"], test["breed"]))
    return "sha256:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def comparison_block(metrics: dict[str, Any], final: str = "siamese") -> dict[str, Any]:
    """What the method buys: the final model minus the paper's baseline (naive
    training on the raw clicks) and minus the pipeline's naive model, and
    ``gap_recovery = (final - raw) / (truth - raw)`` where a truth reference
    exists (the sample): the share of the damage done by click noise that the
    method undoes. Absent models give nulls, not errors."""
    def value(model: str, m: str) -> float | None:
        return metrics[model][m] if model in metrics else None

    def diff(a: str, b: str) -> dict[str, float | None]:
        return {m: (round(value(a, m) - value(b, m), 4) if None not in (value(a, m), value(b, m)) else None)
                for m in SUMMARY_METRICS}

    gap = {}
    for m in ("top1", "mean_class_accuracy"):
        ok = all(value(k, m) is not None for k in (final, "raw", "truth"))
        den = metrics["truth"][m] - metrics["raw"][m] if ok else 0.0
        gap[m] = round((metrics[final][m] - metrics["raw"][m]) / den, 4) if ok and den > 0 else None
    return {"final": final, "final_minus_raw": diff(final, "raw"), "final_minus_naive": diff(final, "naive"),
            "gap_recovery": gap}


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
             "| step | images | label precision | label recall | distractors |", "|---|---:|---:|---:|---:|"]
    for key, name in names.items():
        step = data.get(key, {})
        lines.append(f"| {name} | {_fmt(step.get('images'), 'd')} | {_fmt(step.get('precision'))} "
                     f"| {_fmt(step.get('recall'))} | {_fmt(step.get('distractors'), 'd')} |")
    lines += ["", "Precision: share of the labelled images whose label is their true breed; recall: share of the "
              "correctly clicked images that keep their label; distractors: labelled images that are not dogs. "
              "All need `truth.tsv` (sample data only): – where it is absent.", "", "## What each filter removed", "",
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


def write_figures(out: Path, results: list[ModelResult], table: pd.DataFrame) -> None:
    """The test-set PNGs, into ``figures/`` (replaced as a whole): each model's
    confusion matrix and the per-class accuracy. The training curves are DVC
    plots of the training stages' dvclive logs (``dvc plots show``, ``make
    plots``), not PNGs here: reading them would make evaluate depend on both
    plots folders, which ``dvc exp show`` lists as hash columns. The filter
    galleries show training images and are the galleries stage's
    (stages.lib.galleries): here they would make evaluate depend on the
    decoded training set."""
    with atomic_dir(out / "figures") as tmp:
        for r in results:
            figures.confusion_figure(r.actual, r.predicted, r.classes, f"{r.name}: confusion on the test set",
                                     tmp / f"confusion_{r.name}.png")
        figures.per_class_accuracy_figure(table, [r.name for r in results], tmp / "per_class_accuracy.png")


def write_tables(out: Path, table: pd.DataFrame) -> None:
    """per_class.tsv."""
    with atomic_file(out / layout.PER_CLASS) as f:
        table.to_csv(f, sep="\t", index=False, na_rep="", lineterminator="\n")


def log_plots(out: Path, results: list[ModelResult], table: pd.DataFrame) -> None:
    """Through dvclive, into ``live/`` (replaced as a whole): each model's
    confusion matrix (``log_sklearn_plot("confusion_matrix")``: one record of
    actual and predicted breed per scored test image) and its per-class
    accuracy (``log_plot``, a horizontal bar per breed), for ``dvc plots
    diff`` across experiments. No dvclive metrics: reports/metrics.json, the
    file CI compares, stays the one metrics file (a second copy would double
    each column of ``dvc exp show``); dvc.yaml declares the plots."""
    from dvclive import Live

    with atomic_dir(out / LIVE) as tmp:
        live = Live(dir=str(tmp), dvcyaml=False, save_dvc_exp=False, report=None)
        for r in results:
            live.log_sklearn_plot("confusion_matrix", r.actual, r.predicted, name=f"confusion_{r.name}.json",
                                  title=f"{r.name}: confusion on the test set", x_label="actual breed",
                                  y_label="predicted breed")
            accuracy = table[["breed", f"{r.name}_recall"]].dropna().rename(columns={f"{r.name}_recall": "accuracy"})
            live.log_plot(f"per_class_accuracy_{r.name}", accuracy.to_dict("records"), x="accuracy", y="breed",
                          template="bar_horizontal", title=f"{r.name}: test accuracy per breed",
                          x_label="accuracy (recall)", y_label="breed")


# ------------------------------------------------------------------ params
@dataclass(frozen=True)
class EvaluateConfig(Section):
    """params.yaml ``evaluate``."""

    device: Literal["auto", "cpu", "cuda"]
    batch_size: int
