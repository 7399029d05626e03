"""make_pairs stage: the probability filter and the siamese pair list.

    python -m stages.make_pairs data/raw data/filtered data/images models/naive data/pairs

1. Score every click-filtered training image *out of sample* and drop those
   whose probability for their own click label is below ``pairs.min_prob``.
   ``pairs.scorer: crossfit`` trains ``pairs.folds`` models with the naive
   recipe, each scoring the fold it did not see; ``early`` uses the naive run's
   early-epoch model (cheap, but it has seen the images for a few epochs). A
   model scoring its own training images has memorised their labels and flags
   almost nothing. The early scorer is always computed too, for comparison.
2. Pair every clean image (outside the naive validation split, which stays
   for comparing naive and siamese) with ``pairs.per_image`` partners:
   positives, hard negatives from the breeds the naive model confuses most on
   its validation split, and uniform negatives.

Writes ``clean.tsv`` (key, label, breed, clicks, share, p_label), ``scores.tsv``
(every scored image with p_label from each scorer), ``pairs.tsv`` (key_a,
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
from sklearn.model_selection import StratifiedKFold

from stages.lib import engine, layout
from stages.lib.atomic import atomic_dir, write_json
from stages.lib.classifier import eval_loader, run_context, train_classifier
from stages.lib.data import load_labels, read_table
from stages.lib.models import load_model_file
from stages.lib.pairs import confusable_classes, confusion_counts, make_pairs
from stages.lib.params import load_params
from stages.lib.shards import read_index

log = logging.getLogger("make_pairs")


def p_label(model, df: pd.DataFrame, images: Path, index: pd.DataFrame, ctx: engine.RunContext, *,
            image_size: int, batch_size: int) -> np.ndarray:
    """The model's probability for each row's own label (eval transforms, no gradients)."""
    loader = eval_loader(images, df, image_size=image_size, batch_size=batch_size, workers=0, device=ctx.device,
                         index=index)
    probs, labels = engine.predict(model, loader, ctx)
    return probs[np.arange(len(labels)), labels]


def score_with_model(model_path: Path, df: pd.DataFrame, images: Path, index: pd.DataFrame,
                     train_cfg: dict[str, Any]) -> np.ndarray:
    """p(label) of each row of ``df`` under a saved model."""
    ctx = run_context(train_cfg)
    model, meta = load_model_file(model_path, ctx.device)
    return p_label(model, df, images, index, ctx, image_size=meta["image_size"], batch_size=train_cfg["batch_size"])


def score_crossfit(df: pd.DataFrame, *, folds: int, epochs: int, seed: int, images: Path, index: pd.DataFrame,
                   num_classes: int, model_cfg: dict[str, Any], train_cfg: dict[str, Any]) -> np.ndarray:
    """Out-of-fold p(label): ``folds`` models, each trained on the other folds."""
    if folds < 2:
        raise ValueError(f"pairs.folds must be >= 2 for cross-fitting, got {folds}")
    cfg = {**train_cfg, "epochs": epochs}
    ctx = run_context(cfg)
    p = np.full(len(df), np.nan)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (fit_idx, score_idx) in enumerate(splitter.split(df, df["label"])):
        log.info("cross-fit fold %d/%d: train on %d, score %d", k + 1, folds, len(fit_idx), len(score_idx))
        model, _ = train_classifier(df.iloc[fit_idx], None, images_dir=images, num_classes=num_classes,
                                    model_cfg=model_cfg, train_cfg={**cfg, "seed": cfg["seed"] + k}, index=index)
        p[score_idx] = p_label(model, df.iloc[score_idx], images, index, ctx, image_size=model_cfg["image_size"],
                               batch_size=cfg["batch_size"])
    return p


def label_quality(kept: pd.DataFrame, raw: pd.DataFrame, truth: pd.Series) -> dict[str, float | int | None]:
    """Precision and recall with filter_clicks' definitions: precision = share of
    kept images whose label is the true breed; recall = among correctly clicked
    images (raw top-clicked breed == true breed), the share that is kept."""
    kept_true = kept["key"].map(truth)
    correct_raw = set(raw.loc[raw["breed"].to_numpy() == raw["key"].map(truth).to_numpy(), "key"])
    n_correct = int((kept["breed"].to_numpy() == kept_true.to_numpy()).sum())
    n_known = int(kept_true.notna().sum())  # images without a truth entry do not count
    kept_keys = set(kept["key"])
    return {"images": len(kept), "correct": n_correct,
            "precision": n_correct / n_known if n_known else None,
            "recall": len(correct_raw & kept_keys) / len(correct_raw) if correct_raw else None}


def build_pairs(clean: pd.DataFrame, val_pred: pd.DataFrame, num_classes: int, p: dict[str, Any]):
    """Pairs among ``clean`` rows, hard negatives from the validation confusion."""
    confusion = confusion_counts(val_pred["label"].to_numpy(), val_pred["pred"].to_numpy(), num_classes)
    confusable = confusable_classes(confusion, p["confusable_breeds"])
    idx = make_pairs(clean["label"].to_numpy(), per_image=p["per_image"], pos_fraction=p["pos_fraction"],
                     hard_fraction=p["hard_fraction"], confusable=confusable, seed=p["seed"])
    keys = clean["key"].to_numpy()
    pairs = pd.DataFrame({"key_a": keys[idx["a"]], "key_b": keys[idx["b"]], "same": idx["same"], "kind": idx["kind"]})
    return pairs, confusion, confusable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("raw_dir", "filtered_dir", "images_dir", "naive_dir", "out_dir"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    params = load_params("pairs", "model", "train", path=args.params)
    p, model_cfg, train_cfg = params["pairs"], params["model"], params["train"]
    if p["scorer"] not in ("crossfit", "early"):
        raise ValueError(f"pairs.scorer must be crossfit or early, got {p['scorer']!r}")

    classes = json.loads((args.filtered_dir / layout.CLASSES).read_text())
    labels = load_labels(args.filtered_dir / layout.LABELS)
    index = read_index(args.images_dir)
    val_pred = read_table(args.naive_dir / layout.VAL_PREDICTIONS)

    scores = labels[["key", "label", "breed"]].copy()
    cost: dict[str, float] = {}
    start = time.time()
    scores["p_early"] = score_with_model(args.naive_dir / layout.EARLY_MODEL, labels, args.images_dir, index, train_cfg)
    cost["early_s"] = round(time.time() - start, 1)
    if p["scorer"] == "crossfit":
        start = time.time()
        scores["p_crossfit"] = score_crossfit(labels, folds=p["folds"], epochs=p["crossfit_epochs"], seed=p["seed"],
                                              images=args.images_dir, index=index, num_classes=len(classes),
                                              model_cfg=model_cfg, train_cfg=train_cfg)
        cost["crossfit_s"] = round(time.time() - start, 1)
    labels["p_label"] = scores[f"p_{p['scorer']}"].to_numpy()
    clean = labels[labels["p_label"] >= p["min_prob"]]
    train_clean = clean[~clean["key"].isin(set(val_pred["key"]))].reset_index(drop=True)
    pairs, confusion, confusable = build_pairs(train_clean, val_pred, len(classes), p)

    report: dict[str, Any] = {
        "scorer": p["scorer"], "cost_s": cost, "min_prob": p["min_prob"],
        "images": {"click_filtered": len(labels), "clean": len(clean), "dropped": len(labels) - len(clean),
                   "clean_outside_val": len(train_clean)},
        "pairs": {"total": len(pairs), **pairs["kind"].value_counts().sort_index().to_dict()},
        "confusable": {classes[i]: [classes[j] for j in js] for i, js in confusable.items() if js},
        "val_confusion": confusion.tolist(),
    }
    truth_path = args.raw_dir / layout.TRUTH
    if truth_path.exists():
        truth = pd.read_csv(truth_path, sep="\t", names=["key", "breed"], dtype=str,
                            keep_default_na=False).set_index("key")["breed"]
        raw = pd.read_csv(args.filtered_dir / layout.RAW_LABELS, sep="\t", dtype={"key": str}, keep_default_na=False)
        report["label_quality"] = {"raw_clicks": label_quality(raw, raw, truth),
                                   "click_filter": label_quality(labels, raw, truth)}
        for name in [c for c in scores if c.startswith("p_")]:
            kept = labels[scores[name].to_numpy() >= p["min_prob"]]
            report["label_quality"][f"click+prob_filter ({name[2:]})"] = label_quality(kept, raw, truth)
    with atomic_dir(args.out_dir) as tmp:
        clean.to_csv(tmp / layout.CLEAN, sep="\t", index=False)
        scores.to_csv(tmp / layout.SCORES, sep="\t", index=False)
        pairs.to_csv(tmp / layout.PAIRS, sep="\t", index=False)
        write_json(tmp / layout.REPORT, report)
    log.info("kept %d of %d images (min_prob %.2f, %s scorer); %d pairs %s", len(clean), len(labels), p["min_prob"],
             p["scorer"], len(pairs), report["pairs"])
    if "label_quality" in report:
        log.info("label quality: %s", json.dumps(report["label_quality"]))


if __name__ == "__main__":
    main()
