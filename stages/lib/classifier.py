"""The naive classifier recipe on top of the engine: used by train_naive, by
make_pairs' cross-fitting and by the seed study."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from stages.lib import engine
from stages.lib.data import ShardDataset, build_transform
from stages.lib.models import Classifier, create_model


def run_context(cfg: dict[str, Any]) -> engine.RunContext:
    device = engine.choose_device(cfg["device"])
    return engine.RunContext(device=device, amp_dtype=engine.autocast_dtype(device, cfg["precision"]),
                             clip_grad_norm=cfg.get("clip_grad_norm", 0.0))


def eval_loader(images_dir: Path, df: pd.DataFrame, *, image_size: int, batch_size: int, workers: int,
                device: torch.device, index: pd.DataFrame | None = None) -> torch.utils.data.DataLoader:
    """Deterministic loader (eval transforms) over ``df``'s keys and labels."""
    labels = df["label"] if "label" in df else [0] * len(df)
    ds = ShardDataset(images_dir, df["key"].tolist(), list(labels),
                      build_transform(image_size, train=False), index=index)
    return engine.make_loader(ds, batch_size=batch_size, train=False, seed=0, workers=workers, device=device)


def train_classifier(train_df: pd.DataFrame, val_df: pd.DataFrame | None, *, images_dir: Path, num_classes: int,
                     model_cfg: dict[str, Any], train_cfg: dict[str, Any], checkpoint: Path | None = None,
                     args: dict[str, Any] | None = None, index: pd.DataFrame | None = None,
                     on_epoch: Callable | None = None) -> tuple[Classifier, list[dict[str, float]]]:
    """Train a softmax classifier on ``train_df`` (key, label), validating on
    ``val_df``; returns the trained model (unwrapped) and the history."""
    engine.seed_everything(train_cfg["seed"])
    ctx = run_context(train_cfg)
    size = model_cfg["image_size"]
    train_ds = ShardDataset(images_dir, train_df["key"].tolist(), train_df["label"].tolist(),
                            build_transform(size, train=True, augment=train_cfg.get("augment")),
                            seed=train_cfg["seed"], index=index)
    train_loader = engine.make_loader(train_ds, batch_size=train_cfg["batch_size"], train=True,
                                      seed=train_cfg["seed"], workers=train_cfg["workers"], device=ctx.device)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_ds)} training images give no full batch of {train_cfg['batch_size']}")
    val_loader = None
    if val_df is not None and len(val_df):
        val_loader = eval_loader(images_dir, val_df, image_size=size, batch_size=train_cfg["batch_size"],
                                 workers=0, device=ctx.device, index=index)
    model = create_model(model_cfg["backbone"], num_classes, model_cfg.get("weights", "none"))
    loss_fn = engine.classification_loss(train_cfg.get("label_smoothing", 0.0))
    history = engine.fit(model, loss_fn, train_loader, val_loader, train_cfg, ctx,
                         checkpoint=checkpoint, args=args, on_epoch=on_epoch)
    return model, history
