"""evaluate stage: every model on the clean test set, and reports people can look at.

    python -m stages.evaluate data/raw data/test_images data/filtered data/pairs \
        models/naive models/siamese models/references reports

The models: naive, siamese, and each reference of ``models/references`` whose
model file exists (``layout.REFERENCES``: the raw-click baseline, the truth
ceiling, the linear probes of a pretrained trunk).

Reads params ``evaluate.*``; ``raw/test_labels.tsv`` (key, breed); the
decoded test images (decode's second output: its ``split == "test"`` rows are
the test images); each model's ``model.pt``; the filters' ``report.json``.
Nothing of the training images: re-validating a run pulls the test set and
the models, not the training set (the filter galleries are the galleries stage's).

Test breeds map to a model's classes by name; a test image whose breed is not
a class of the model is counted (``n_not_scored``), not scored. Writes to the
output folder, each file atomically:

* ``metrics.json``: a block per model (top1, top5, mean_class_accuracy,
  n_test, n_not_scored) and a ``data`` block (images left after each filter,
  label precision / recall after each filter where truth exists, test counts);
* ``per_class.tsv``: breed, support, per model precision and recall (= the
  breed's accuracy);
* ``live/plots/``: each model's confusion matrix (``sklearn/``) and per-class
  accuracy (``custom/``), logged through dvclive: ``dvc plots diff`` compares
  them across experiments;
* ``figures/``: confusion matrices and per-class accuracy (PNGs);
* ``ablation.md``: the filters and the models side by side.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from stages.lib import layout, reports
from stages.lib.atomic import atomic_file, exit_on_sigterm, refuse_overlapping_args, write_json
from stages.lib.cli import run_stage
from stages.lib.imagecache import CacheConfig, hold_decoded
from stages.lib.params import load_sections
from stages.lib.reports import EvaluateConfig
from stages.lib.shards import read_index
from stages.lib.testset import evaluate_model, read_test_set

log = logging.getLogger("evaluate")

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("raw", "images", "filtered", "pairs", "naive", "siamese", "references", "out"):
        parser.add_argument(name, type=Path)  # images: the decoded test images (data/test_images)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    refuse_overlapping_args(args, "out", "evaluate")  # replacing the output must not delete an input
    params = load_sections(args.params, evaluate=EvaluateConfig, cache=CacheConfig)
    cfg = params["evaluate"]

    index = read_index(args.images)
    test, test_counts = read_test_set(args.raw, index)
    log.info("test set: %s", test_counts)
    models = {"naive": args.naive / layout.MODEL, "siamese": args.siamese / layout.MODEL}
    for name in layout.REFERENCES:
        path = args.references / name / layout.MODEL
        if path.is_file():
            models[name] = path
        else:
            log.info("no %s reference model (%s): left out", name, path)
    cache = hold_decoded(args.images, index, test["key"], params["cache"])  # one decode for every model
    results = [evaluate_model(name, path, test, args.images, index, device=cfg.device, batch_size=cfg.batch_size,
                              cache=cache) for name, path in models.items()]
    empty = [r.name for r in results if not r.block["n_test"]]
    if empty:  # nothing written: a report of models that scored nothing would compare as missing numbers
        raise SystemExit(f"evaluate: model(s) {empty} scored no test image: no breed of "
                         f"{args.raw / layout.TEST_LABELS} is one of their classes (spelling against "
                         f"{layout.BREEDS}? filter.min_images_per_class?)")
    test_counts["digest"] = reports.digest_test_set(test)  # CI pins the test set to the base's
    filter_report = reports.read_json(args.filtered / layout.REPORT)
    pairs_report = reports.read_json(args.pairs / layout.REPORT)
    metrics = {r.name: r.block for r in results}
    metrics["comparison"] = reports.comparison_block(metrics)
    metrics["data"] = reports.data_block(filter_report, pairs_report, test_counts)
    log.info("comparison: %s", metrics["comparison"])

    args.out.mkdir(parents=True, exist_ok=True)
    table = reports.per_class_table(results, test)
    reports.write_tables(args.out, table)
    reports.log_plots(args.out, results, table)
    start = time.time()
    reports.write_figures(args.out, results, table)
    log.info("figures written in %.1f s", time.time() - start)
    with atomic_file(args.out / layout.ABLATION) as f:
        f.write(reports.ablation_markdown(metrics, results, filter_report, pairs_report))
    # last: metrics.json is what CI compares, so it appears only with the rest
    write_json(args.out / layout.METRICS, metrics)
    log.info("reports written to %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "evaluate"))
