"""train_naive stage: the baseline softmax classifier on the click-filtered labels.

    python -m stages.train_naive data/filtered data/images models/naive
    torchrun --nproc_per_node 4 -m stages.train_naive data/filtered data/images models/naive

Writes ``model.pt`` (weights + classes + preprocessing), ``early.pt`` (the
model after ``train.early_epoch`` epochs, an out-of-sample scorer for
make_pairs), ``val_predictions.tsv`` (the validation split with the model's
predictions, for the confusion between breeds), ``live/`` (dvclive curves and
metrics) and ``checkpoints/last.pt`` (persisted by DVC: re-running after an
interruption resumes there).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from stages.lib import classifier, data, engine, layout, models
from stages.lib.atomic import atomic_file
from stages.lib.classifier import eval_loader, run_context, train_classifier
from stages.lib.data import load_labels, split_train_val
from stages.lib.params import load_params
from stages.lib.shards import read_index
from stages.lib.tracking import EpochLogger, code_digest, file_digest, save_model

log = logging.getLogger("train_naive")


def write_val_predictions(path: Path, model, val_df: pd.DataFrame, images_dir: Path, model_cfg, train_cfg,
                          index: pd.DataFrame) -> float:
    ctx = run_context(train_cfg)
    loader = eval_loader(images_dir, val_df, image_size=model_cfg["image_size"],
                         batch_size=train_cfg["batch_size"], workers=0, device=ctx.device, index=index)
    probs, labels = engine.predict(model, loader, ctx)
    out = val_df[["key", "label"]].copy()
    out["pred"] = probs.argmax(1)
    out["p_label"] = probs[np.arange(len(labels)), labels]
    with atomic_file(path) as f:
        out.to_csv(f, sep="\t", index=False)
    return float((out["pred"] == out["label"]).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filtered_dir", type=Path)
    parser.add_argument("images_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    params = load_params("model", "train", path=args.params)
    model_cfg, train_cfg = params["model"], params["train"]
    if not 1 <= train_cfg["early_epoch"] <= train_cfg["epochs"]:
        raise ValueError(f"train.early_epoch must be in 1..train.epochs, got {train_cfg['early_epoch']}")
    engine.init_distributed(train_cfg["device"])

    labels_path = args.filtered_dir / layout.LABELS
    classes = json.loads((args.filtered_dir / layout.CLASSES).read_text())
    labels = load_labels(labels_path)
    train_df, val_df = split_train_val(labels, train_cfg["val_fraction"], train_cfg["seed"])
    index = read_index(args.images_dir)
    log.info("%d training / %d validation images, %d classes", len(train_df), len(val_df), len(classes))

    out = args.out_dir
    checkpoints = out / layout.CHECKPOINTS
    model_meta = {"backbone": model_cfg["backbone"], "image_size": model_cfg["image_size"], "classes": classes}
    logger = None
    if engine.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        # early.pt lives with the persisted checkpoints until the end, so a run
        # resumed past the early epoch still has it
        logger = EpochLogger(out / layout.LIVE, snapshot_epoch=train_cfg["early_epoch"],
                             snapshot=lambda m: save_model(checkpoints / layout.EARLY_MODEL, m, **model_meta,
                                                           epochs=train_cfg["early_epoch"]))
    run_args = {"model": model_cfg, "train": train_cfg, "data": file_digest(labels_path, args.images_dir / layout.INDEX),
                "code": code_digest(sys.modules[__name__], classifier, engine, data, models)}
    model, history = train_classifier(train_df, val_df, images_dir=args.images_dir, num_classes=len(classes),
                                      model_cfg=model_cfg, train_cfg=train_cfg,
                                      checkpoint=checkpoints / "last.pt", args=run_args,
                                      index=index, on_epoch=logger)
    if engine.is_main_process():
        val_acc = write_val_predictions(out / layout.VAL_PREDICTIONS, model, val_df, args.images_dir,
                                        model_cfg, train_cfg, index)
        save_model(out / layout.MODEL, model, **model_meta, epochs=train_cfg["epochs"])
        with open(checkpoints / layout.EARLY_MODEL, "rb") as src, atomic_file(out / layout.EARLY_MODEL, "wb") as dst:
            shutil.copyfileobj(src, dst)
        logger.end()
        log.info("validation top-1 %.4f after %d epochs (%.0f s of training)", val_acc, len(history),
                 sum(h["epoch_s"] for h in history))


if __name__ == "__main__":
    main()
