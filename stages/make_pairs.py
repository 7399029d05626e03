"""make_pairs stage: the label-noise filter and the siamese pair list.

    python -m stages.make_pairs data/raw data/filtered data/images models/naive data/pairs

1. Score every click-filtered training image *out of sample*.
   ``pairs.scorer: crossfit`` trains ``pairs.folds`` models with the naive
   recipe for ``pairs.crossfit_epochs`` epochs, each scoring the fold it did
   not see; ``early`` uses the naive run's early-epoch model (cheap, but it has
   seen the images for a few epochs; a model scoring its own training images
   has memorised their labels and flags almost nothing); ``features`` passes
   the images once through the initial trunk and fits ``pairs.folds``
   logistic regressions (``pairs.probe``) on its frozen features, each scoring
   the fold it did not see: the pretrained regime's cheap scorer, refused with
   ``model.weights: none`` (random features; and the naive model's trunk has
   learnt these very labels, so its features would vouch for them). The early
   scorer is always computed too, for comparison.
2. Judge each label by those probabilities (``pairs.filter``, see
   ``stages.lib.noise``): ``threshold`` (the paper: p(label) >=
   ``pairs.min_prob``), ``cleanlab`` (confident learning, per-class
   thresholds) or ``relabel`` (cleanlab, and confidently contradicted labels
   take the scorer's breed instead of being dropped). The stage stops when
   the filter empties a class or keeps less than ``pairs.min_kept_share``.
3. Pair every clean image (outside the naive validation split, which stays
   for comparing naive and siamese) with ``pairs.per_image`` partners:
   positives, hard negatives from the breeds the naive model confuses most on
   its validation split, and uniform negatives.

Writes ``clean.tsv`` (key, label, breed, clicks, share, p_label, click_breed),
``scores.tsv`` (every scored image: click label, p(label) under each scorer,
the scorer's top breed and its probability, status), ``pairs.tsv`` (key_a,
key_b, same, kind) and ``report.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.lib import layout
from stages.lib.atomic import atomic_dir, exit_on_sigterm, refuse_overlapping_args, write_json
from stages.lib.classifier import ModelConfig, TrainConfig, check_head_init
from stages.lib.cli import run_stage
from stages.lib.data import load_labels
from stages.lib.imagecache import CacheConfig, DecodedImages, hold_decoded
from stages.lib.labelquality import table_quality
from stages.lib.noise import RELABELLED, check_enough_left, class_counts, filtered_table
from stages.lib.pairs import PairsConfig, build_pairs
from stages.lib.params import ConfigError, load_sections
from stages.lib.scoring import score_crossfit, score_features, score_with_model
from stages.lib.shards import read_index
from stages.lib.tables import read_table, read_truth, write_table

log = logging.getLogger("make_pairs")
# what makes each scorer better, for the message of a filter that kept too little
SCORER_LEVER = {"crossfit": "train a better scorer (pairs.crossfit_epochs)",
                "features": "a better scorer (pairs.probe.C, or pretrained weights that tell these breeds apart)"}


def score(labels: pd.DataFrame, args: argparse.Namespace, p: PairsConfig, num_classes: int,
          model_cfg: ModelConfig, train_cfg: TrainConfig, index: pd.DataFrame, cache: DecodedImages | None):
    """(probabilities of the chosen scorer, scores table, seconds per scorer)."""
    scores = labels[["key", "label", "breed"]].copy()
    rows = np.arange(len(labels))
    y = labels["label"].to_numpy()
    probs, cost = {}, {}
    start = time.time()
    probs["early"] = score_with_model(args.naive_dir / layout.EARLY_MODEL, labels, args.images_dir, index, train_cfg,
                                      cache)
    cost["early_s"] = round(time.time() - start, 1)
    if p.scorer == "crossfit":
        start = time.time()
        probs["crossfit"] = score_crossfit(labels, folds=p.folds, epochs=p.crossfit_epochs, seed=p.seed,
                                           images=args.images_dir, index=index, num_classes=num_classes,
                                           model_cfg=model_cfg, train_cfg=train_cfg, cache=cache)
        cost["crossfit_s"] = round(time.time() - start, 1)
    if p.scorer == "features":
        start = time.time()
        probs["features"] = score_features(labels, folds=p.folds, seed=p.seed, probe=p.probe, images=args.images_dir,
                                           index=index, num_classes=num_classes, model_cfg=model_cfg,
                                           train_cfg=train_cfg, cache=cache)
        cost["features_s"] = round(time.time() - start, 1)
    for name, pr in probs.items():
        scores[f"p_{name}"] = pr[rows, y]
    return probs[p.scorer], scores, cost


def check_scorer(p: PairsConfig, model_cfg: ModelConfig) -> None:
    """``pairs.scorer: features`` needs a pretrained trunk: refused, before any work, with ``model.weights: none``."""
    if p.scorer == "features" and not model_cfg.pretrained:
        raise ConfigError(
            f"pairs.scorer: features fits probes on the frozen features of the initial trunk, and model.weights: "
            f"{model_cfg.weights} leaves that trunk random: its features say nothing about breeds. Set model.weights "
            f"(imagenet, or a weights file), or use pairs.scorer: crossfit (or early). The naive model's trunk is no "
            f"way out: it has learnt these images' click labels, so its features vouch for the wrong ones.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("raw_dir", "filtered_dir", "images_dir", "naive_dir", "out_dir"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    refuse_overlapping_args(args, "out_dir", "make_pairs")  # replacing the output must not delete an input
    params = load_sections(args.params, pairs=PairsConfig, model=ModelConfig, train=TrainConfig, cache=CacheConfig)
    p, model_cfg, train_cfg = params["pairs"], params["model"], params["train"]
    check_scorer(p, model_cfg)
    check_head_init(model_cfg, train_cfg)  # the crossfit scorer trains with the train section

    classes = json.loads((args.filtered_dir / layout.CLASSES).read_text())
    labels = load_labels(args.filtered_dir / layout.LABELS)
    index = read_index(args.images_dir)
    val_pred = read_table(args.naive_dir / layout.VAL_PREDICTIONS)
    cache = hold_decoded(args.images_dir, index, labels["key"], params["cache"])  # one decode for every fold
    probs, scores, cost = score(labels, args, p, len(classes), model_cfg, train_cfg, index, cache)

    clean, status = filtered_table(labels, probs, classes, **p.noise_settings())
    scores["top_breed"] = np.asarray(classes, dtype=object)[probs.argmax(1)]
    scores["p_top"] = probs.max(1)
    scores["status"] = status
    check_enough_left(class_counts(labels["label"], classes), class_counts(clean["label"], classes),
                      stage="make_pairs", min_per_class=p.min_images_per_class, min_kept_share=p.min_kept_share,
                      params=f"pairs.filter ({p.filter}), pairs.min_prob / pairs.relabel_min_prob, or "
                             f"{SCORER_LEVER.get(p.scorer, SCORER_LEVER['crossfit'])}")
    train_clean = clean[~clean["key"].isin(set(val_pred["key"]))].reset_index(drop=True)
    pairs, confusion, confusable = build_pairs(train_clean, val_pred, len(classes), p)
    if pairs.empty:
        raise ValueError(f"make_pairs: no pairs from {len(train_clean)} clean images outside the naive validation "
                         f"split (pairs.per_image {p.per_image}): nothing for train_siamese to learn from")

    report: dict[str, Any] = {
        "scorer": p.scorer, "filter": p.filter, "cost_s": cost, "min_prob": p.min_prob,
        "images": {"click_filtered": len(labels), "clean": len(clean), "dropped": len(labels) - len(clean),
                   "relabelled": int((status == RELABELLED).sum()), "clean_outside_val": len(train_clean),
                   "status": pd.Series(status).value_counts().sort_index().to_dict()},
        "pairs": {"total": len(pairs), **pairs["kind"].value_counts().sort_index().to_dict()},
        "confusable": {classes[i]: [classes[j] for j in js] for i, js in confusable.items() if js},
        "val_confusion": confusion.tolist(),
    }
    truth_path = args.raw_dir / layout.TRUTH
    if truth_path.exists():
        truth = read_truth(truth_path)
        raw = load_labels(args.filtered_dir / layout.RAW_LABELS)
        report["label_quality"] = {"raw_clicks": table_quality(raw, raw, truth),
                                   "click_filter": table_quality(labels, raw, truth),
                                   "label_filter": table_quality(clean, raw, truth)}
    with atomic_dir(args.out_dir) as tmp:
        write_table(clean, tmp / layout.CLEAN)
        write_table(scores, tmp / layout.SCORES)
        write_table(pairs, tmp / layout.PAIRS)
        write_json(tmp / layout.REPORT, report)
    log.info("kept %d of %d images (%s filter on the %s scorer; %d relabelled); %d pairs %s", len(clean),
             len(labels), p.filter, p.scorer, report["images"]["relabelled"], len(pairs), report["pairs"])
    if "label_quality" in report:
        log.info("label quality: %s", json.dumps(report["label_quality"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "make_pairs"))
