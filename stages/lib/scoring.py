"""Out-of-sample class probabilities for every weakly labelled image: the
evidence the label-noise filter (``noise.py``) judges labels by."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from stages.lib import engine
from stages.lib.classifier import (
    ModelConfig,
    TrainConfig,
    eval_loader,
    extract_features,
    initial_model,
    run_context,
    train_classifier,
)
from stages.lib.imagecache import DecodedImages
from stages.lib.models import load_model_file
from stages.lib.parallel import map_runs
from stages.lib.probe import ProbeConfig, crossfit_probs

log = logging.getLogger("scoring")


def class_probs(model, df: pd.DataFrame, images: Path, index: pd.DataFrame, ctx: engine.RunContext, *,
                image_size: int, batch_size: int, cache: DecodedImages | None = None) -> np.ndarray:
    """The model's class probabilities for each row (eval transforms, no gradients)."""
    loader = eval_loader(images, df, image_size=image_size, batch_size=batch_size, workers=0, device=ctx.device,
                         index=index, cache=cache)
    return engine.predict(model, loader, ctx)[0]


def score_with_model(model_path: Path, df: pd.DataFrame, images: Path, index: pd.DataFrame,
                     train_cfg: TrainConfig, cache: DecodedImages | None = None) -> np.ndarray:
    """Class probabilities of each row of ``df`` under a saved model."""
    ctx = run_context(train_cfg.device, train_cfg.precision)
    model, meta = load_model_file(model_path, ctx.device)
    return class_probs(model, df, images, index, ctx, image_size=meta["image_size"],
                       batch_size=train_cfg.batch_size, cache=cache)


def fold_splits(df: pd.DataFrame, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, scored rows) of each cross-fitting fold: stratified by label, seeded (``pairs.seed``)."""
    if folds < 2:
        raise ValueError(f"pairs.folds must be >= 2 for cross-fitting, got {folds}")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(df, df["label"]))


def score_features(df: pd.DataFrame, *, folds: int, seed: int, probe: ProbeConfig, images: Path,
                   index: pd.DataFrame, num_classes: int, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   cache: DecodedImages | None = None) -> np.ndarray:
    """Out-of-fold class probabilities from frozen features: one pass of the
    initial (pretrained) trunk over the images, then ``folds`` linear probes,
    each fitted on the other folds' features and labels and scoring the fold
    it did not see (the same folds as :func:`score_crossfit`). Minutes of
    fine-tuning become one forward pass and a few regressions."""
    model = initial_model(model_cfg, num_classes)
    features = extract_features(model, df, images, image_size=model_cfg.image_size, batch_size=train_cfg.batch_size,
                                device=train_cfg.device, workers=train_cfg.workers, index=index, cache=cache)
    return crossfit_probs(features, df["label"].to_numpy(), num_classes, fold_splits(df, folds, seed), probe)


def score_crossfit(df: pd.DataFrame, *, folds: int, epochs: int, seed: int, images: Path, index: pd.DataFrame,
                   num_classes: int, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   cache: DecodedImages | None = None) -> np.ndarray:
    """Out-of-fold class probabilities: ``folds`` models, each trained on the
    other folds for ``epochs`` epochs, each scoring the fold it did not see
    (all folds read the one ``cache`` of decoded images when given)."""
    cfg = train_cfg.replace(epochs=epochs, early_epoch=1)
    p = np.full((len(df), num_classes), np.nan)
    splits = fold_splits(df, folds, seed)
    # the folds are independent: side by side (train.parallel_runs)
    calls = [(k, folds, df.iloc[fit_idx], df.iloc[score_idx], images, index, num_classes, model_cfg,
              cfg.replace(seed=cfg.seed + k), cache) for k, (fit_idx, score_idx) in enumerate(splits)]
    for (_, score_idx), probs in zip(splits, map_runs(_fit_and_score, calls, cfg.parallel_runs)):
        p[score_idx] = probs
    return p


def _fit_and_score(k: int, folds: int, fit: pd.DataFrame, held_out: pd.DataFrame, images: Path,
                   index: pd.DataFrame, num_classes: int, model_cfg: ModelConfig, cfg: TrainConfig,
                   cache: DecodedImages | None) -> np.ndarray:
    """One cross-fitting fold: train on ``fit``, return class probabilities of ``held_out``."""
    log.info("cross-fit fold %d/%d: train on %d, score %d", k + 1, folds, len(fit), len(held_out))
    model, _ = train_classifier(fit, None, images_dir=images, num_classes=num_classes, model_cfg=model_cfg,
                                train_cfg=cfg, index=index, cache=cache)
    ctx = run_context(cfg.device, cfg.precision)
    return class_probs(model, held_out, images, index, ctx, image_size=model_cfg.image_size,
                       batch_size=cfg.batch_size, cache=cache)
