"""Calibrate the sample: train the naive recipe on one kind of labels and
report top-1 on the clean test set.

    python scripts/calibrate_sample.py --labels truth      # true breeds (truth.tsv)
    python scripts/calibrate_sample.py --labels raw        # top-clicked breed, no filter
    python scripts/calibrate_sample.py --labels filtered   # click-filtered labels

Uses params.yaml's model/train sections (override with --epochs/--seed) and the
pipeline's data/ folders; it is a development tool, not a stage.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib import engine, layout
from stages.lib.classifier import eval_loader, run_context, train_classifier
from stages.lib.data import split_train_val
from stages.lib.params import load_params
from stages.lib.shards import read_index


def labels_for(kind: str, raw: Path, filtered: Path, classes: list[str]) -> pd.DataFrame:
    if kind == "truth":
        df = pd.read_csv(raw / layout.TRUTH, sep="\t", names=["key", "breed"], dtype=str, keep_default_na=False)
        df = df[df["breed"].isin(classes)]
    else:
        name = layout.RAW_LABELS if kind == "raw" else layout.LABELS
        df = pd.read_csv(filtered / name, sep="\t", dtype={"key": str}, keep_default_na=False)
        df = df[df["breed"].isin(classes)]
    df = df[["key", "breed"]].copy()
    df["label"] = df["breed"].map({c: i for i, c in enumerate(classes)})
    return df.reset_index(drop=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", choices=["truth", "raw", "filtered"], default="truth")
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--backbone")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    params = load_params("model", "train")
    model_cfg, train_cfg = params["model"], dict(params["train"])
    if args.epochs:
        train_cfg["epochs"] = args.epochs
    if args.seed is not None:
        train_cfg["seed"] = args.seed
    if args.backbone:
        model_cfg = {**model_cfg, "backbone": args.backbone}
    raw, images = args.data / "raw", args.data / "images"
    classes = pd.read_csv(raw / layout.BREEDS, sep="\t", names=["breed", "label"])["breed"].tolist()
    df = labels_for(args.labels, raw, args.data / "filtered", classes)
    train_df, val_df = split_train_val(df, train_cfg["val_fraction"], train_cfg["seed"])
    index = read_index(images)
    start = time.time()
    model, history = train_classifier(train_df, val_df, images_dir=images, num_classes=len(classes),
                                      model_cfg=model_cfg, train_cfg=train_cfg, index=index)
    test = pd.read_csv(raw / layout.TEST_LABELS, sep="\t", names=["key", "breed"], dtype=str)
    test["label"] = test["breed"].map({c: i for i, c in enumerate(classes)})
    ctx = run_context(train_cfg)
    probs, labels = engine.predict(model, eval_loader(images, test, image_size=model_cfg["image_size"],
                                                      batch_size=256, workers=0, device=ctx.device,
                                                      index=index), ctx)
    pred = probs.argmax(1)
    fam = {c: i // 3 for i, c in enumerate(classes)}  # the sample's families are consecutive triples
    fam_acc = float(np.mean([fam[classes[a]] == fam[classes[b]] for a, b in zip(pred, labels)]))
    print(json.dumps({"labels": args.labels, "train_images": len(train_df), "epochs": train_cfg["epochs"],
                      "backbone": model_cfg["backbone"], "seed": train_cfg["seed"],
                      "val_top1": history[-1].get("val_acc"), "test_top1": float((pred == labels).mean()),
                      "test_family_acc": fam_acc, "train_s": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
