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
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib import engine, layout, runtime
from stages.lib.atomic import atomic_file, exit_on_sigterm, refuse_overlapping_args
from stages.lib.classifier import (
    ModelConfig,
    TrainConfig,
    check_head_init,
    eval_loader,
    plan_run,
    reference_size,
    resolved_run,
    run_context,
    train_on_labels,
)
from stages.lib.cli import run_stage
from stages.lib.data import load_labels
from stages.lib.imagecache import CacheConfig, DecodedImages, hold_decoded
from stages.lib.params import load_sections
from stages.lib.shards import read_index
from stages.lib.tables import write_table
from stages.lib.tracking import EpochLogger, file_digest, run_fingerprint, save_model

log = logging.getLogger("train_naive")


def write_val_predictions(path: Path, model, val_df: pd.DataFrame, images_dir: Path, model_cfg: ModelConfig,
                          train_cfg: TrainConfig, index: pd.DataFrame, cache: DecodedImages | None) -> float:
    ctx = run_context(train_cfg.device, train_cfg.precision)
    loader = eval_loader(images_dir, val_df, image_size=model_cfg.image_size,
                         batch_size=train_cfg.batch_size, workers=0, device=ctx.device, index=index, cache=cache)
    probs, labels = engine.predict(model, loader, ctx)
    out = val_df[["key", "label"]].copy()
    out["pred"] = probs.argmax(1)
    out["p_label"] = probs[np.arange(len(labels)), labels]
    with atomic_file(path, "wb") as f:
        write_table(out, f)
    return float((out["pred"] == out["label"]).mean())


def drop_resume_without_early(checkpoints: Path, run_args: dict, cfg: TrainConfig) -> None:
    """An interrupted run past ``early_epoch`` whose early model is gone cannot
    give early.pt (make_pairs' early scorer) when resumed: train from scratch."""
    last = checkpoints / layout.LAST_CHECKPOINT
    if (checkpoints / layout.EARLY_MODEL).exists() or not last.exists():
        return
    state = engine.load_checkpoint(last, run_args, cfg.epochs)  # every rank decides alike
    runtime.barrier()  # ... before rank 0 removes the file
    if state is not None and state["epoch"] + 1 >= cfg.early_epoch and runtime.is_main_process():
        log.warning("%s is missing: the run in %s is past epoch %d and cannot be resumed; training from scratch",
                    checkpoints / layout.EARLY_MODEL, last, cfg.early_epoch)
        last.unlink()
    runtime.barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filtered_dir", type=Path)
    parser.add_argument("images_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    refuse_overlapping_args(args, "out_dir", "train_naive")  # replacing the output must not delete an input
    params = load_sections(args.params, model=ModelConfig, train=TrainConfig, cache=CacheConfig)
    model_cfg, train_cfg = params["model"], params["train"]
    check_head_init(model_cfg, train_cfg)
    _, world = runtime.init_distributed(train_cfg.device)

    labels_path = args.filtered_dir / layout.LABELS
    classes = json.loads((args.filtered_dir / layout.CLASSES).read_text())
    labels = load_labels(labels_path)
    raw = load_labels(args.filtered_dir / layout.RAW_LABELS)
    plan = plan_run(labels, train_cfg, reference_size(raw[raw["label"] >= 0], train_cfg))
    cfg = plan.cfg
    index = read_index(args.images_dir)
    cache = hold_decoded(args.images_dir, index, labels["key"], params["cache"])
    log.info("%d training / %d validation images, %d classes; %d epochs = %d optimizer steps (the budget of "
             "train.epochs %d over the raw click-labelled set)", len(plan.train), len(plan.val), len(classes),
             cfg.epochs, plan.steps, train_cfg.epochs)

    out = args.out_dir
    checkpoints = out / layout.CHECKPOINTS
    model_meta = {"backbone": model_cfg.backbone, "image_size": model_cfg.image_size, "classes": classes,
                  **resolved_run(cfg)}
    logger = None
    if runtime.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        # early.pt lives with the persisted checkpoints until the end, so a run
        # resumed past the early epoch still has it
        logger = EpochLogger(out / layout.LIVE, snapshot_epoch=cfg.early_epoch,
                             snapshot=lambda m: save_model(checkpoints / layout.EARLY_MODEL, m, **model_meta,
                                                           epochs=cfg.early_epoch))
    inputs = [labels_path, args.images_dir / layout.INDEX]
    if model_cfg.weights_file:  # its content, not only its name: a file replaced in place is other weights
        inputs.append(model_cfg.weights_file)
    run_args = run_fingerprint("stages.train_naive", model=model_cfg, train=cfg, resolved=resolved_run(cfg),
                               world_size=world, data=file_digest(*inputs))
    drop_resume_without_early(checkpoints, run_args, cfg)
    model, info = train_on_labels(plan, name="train_naive", images_dir=args.images_dir, num_classes=len(classes),
                                  model_cfg=model_cfg, checkpoint=checkpoints / layout.LAST_CHECKPOINT, args=run_args,
                                  index=index, cache=cache, on_epoch=logger)
    if runtime.is_main_process():
        val_acc = write_val_predictions(out / layout.VAL_PREDICTIONS, model, plan.val, args.images_dir,
                                        model_cfg, cfg, index, cache)
        save_model(out / layout.MODEL, model, **model_meta, epochs=cfg.epochs, steps=plan.steps)
        with open(checkpoints / layout.EARLY_MODEL, "rb") as src, atomic_file(out / layout.EARLY_MODEL, "wb") as dst:
            shutil.copyfileobj(src, dst)
        logger.end()
        log.info("validation top-1 %.4f after %d epochs (%s)", val_acc, cfg.epochs, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "train_naive"))
