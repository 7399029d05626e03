"""The naive classifier recipe on top of the engine: used by train_naive, by
the reference models, by make_pairs' cross-fitting and by the seed study.

The training budget is counted in optimizer steps, not epochs, so that label
sets of different sizes are compared like with like: ``train.epochs`` means
epochs over the *raw click-labelled* training split, and a smaller (filtered)
set trains for more epochs to get the same number of steps
(:func:`budget_epochs`). A filter that removes 40% of the images would
otherwise also remove 40% of the training.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from stages.lib import engine, layout, runtime
from stages.lib.cli import StageFailure
from stages.lib.data import ShardDataset, split_train_val
from stages.lib.imagecache import DecodedImages
from stages.lib.models import Classifier, create_model
from stages.lib.params import ConfigError, Section, in_range
from stages.lib.presets import augment_on_device, build_transform
from stages.lib.probe import ABSENT_LOGIT, ProbeConfig, fit_probe

log = logging.getLogger("classifier")


# ------------------------------------------------------------------ params
@dataclass(frozen=True)
class ModelConfig(Section):
    """params.yaml ``model``: the backbone, its initial weights and input size."""

    backbone: str
    weights: str     # none | imagenet | a file under models/weights/ (layout.WEIGHTS_DIR)
    image_size: int

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        path = PurePosixPath(self.weights)
        if self.weights not in ("none", "imagenet") and (
                path.is_absolute() or ".." in path.parts or path.parts[:2] != tuple(layout.WEIGHTS_DIR.split("/"))
                or len(path.parts) < 3):
            # a dependency of every stage that loads the initial weights (dvc.yaml): replacing the file re-runs
            # them and dvc.lock records which weights trained the models. A path elsewhere would be invisible.
            raise ValueError(f"weights must be none, imagenet or a file under {layout.WEIGHTS_DIR}/ (relative to "
                             f"the repository root, a dependency of the stages that load it), got {self.weights!r}")

    @property
    def weights_file(self) -> Path | None:
        """The weights file under models/weights/, or None (none, imagenet)."""
        return None if self.weights in ("none", "imagenet") else Path(self.weights)

    @property
    def pretrained(self) -> bool:
        """Whether the trunk starts from trained weights (imagenet or a file), not at random: frozen
        features, the probes and ``train.head_init: probe`` mean something only then."""
        return self.weights != "none"


@dataclass(frozen=True)
class AugmentConfig(Section):
    """``train.augment`` / ``siamese.augment``: RandomResizedCrop scale, flip,
    brightness and contrast jitter (no hue: coat hue is a breed cue), and
    where they run (``presets.augment_on_device``)."""

    scale_min: float
    hflip: bool
    brightness: float
    contrast: float
    where: Literal["auto", "loader", "device"]

    def __post_init__(self) -> None:
        in_range("scale_min", self.scale_min, 1e-6, 1)
        in_range("brightness", self.brightness, 0, 1)
        in_range("contrast", self.contrast, 0, 1)


@dataclass(frozen=True)
class OptimConfig(Section):
    """What the training loop needs; shared by ``train`` and ``siamese``."""

    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adamw"]
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    clip_grad_norm: float
    # fine-tuning a pretrained trunk: its learning rate is lr x trunk_lr_scale (the new head's is lr), and
    # batchnorm: frozen keeps its BatchNorm layers' running statistics (their affine weights still train)
    trunk_lr_scale: float
    batchnorm: Literal["train", "frozen"]
    # an exponential moving average of the weights (engine.build_ema), its half-life in epochs; 0: none
    ema_half_life: float
    workers: int
    seed: int
    augment: AugmentConfig

    def __post_init__(self) -> None:
        in_range("trunk_lr_scale", self.trunk_lr_scale, 0.0, 1.0)
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0:  # 0 epochs would train on nothing
            raise ValueError(f"epochs must be >= 1, batch_size >= 1, workers >= 0; got {self.epochs}, "
                             f"{self.batch_size}, {self.workers}")
        if (self.lr <= 0 or self.weight_decay < 0 or self.clip_grad_norm < 0 or self.warmup_epochs < 0
                or self.ema_half_life < 0):
            raise ValueError("lr must be > 0; weight_decay, clip_grad_norm, warmup_epochs and ema_half_life >= 0")
        in_range("momentum", self.momentum, 0, 1)
        in_range("label_smoothing", self.label_smoothing, 0, 1)


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    """params.yaml ``train``: the naive recipe (also the references and the
    cross-fitting scorers). ``epochs`` counts epochs over the raw
    click-labelled split (see :func:`budgeted`)."""

    val_fraction: float
    early_epoch: int
    parallel_runs: int  # independent runs (references, cross-fitting folds) at once: stages.lib.parallel
    # random: a new head; probe: linear probe, then fine-tune (LP-FT, Kumar et al. 2022): the head starts as
    # a logistic regression on the frozen features of the training labels (train.probe), so the first steps
    # do not push a random head's gradients into the pretrained trunk. Needs pretrained weights.
    head_init: Literal["random", "probe"]
    probe: ProbeConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parallel_runs < 1:
            raise ValueError(f"parallel_runs must be >= 1, got {self.parallel_runs}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 1 <= self.early_epoch <= self.epochs:
            raise ValueError(f"early_epoch must be in 1..epochs, got {self.early_epoch}")


# ------------------------------------------------------------------ run set-up
def run_context(device: str, precision: str, clip_grad_norm: float = 0.0,
                batchnorm: str = "train") -> engine.RunContext:
    """Device and autocast dtype chosen on this machine (``device: auto`` is
    CUDA when present)."""
    dev = runtime.choose_device(device)
    return engine.RunContext(device=dev, amp_dtype=runtime.autocast_dtype(dev, precision),
                             clip_grad_norm=clip_grad_norm, frozen_batchnorm=batchnorm == "frozen")


def resolved_run(cfg: OptimConfig) -> dict[str, str]:
    """The device, precision and augmentation path ``cfg`` resolves to on this
    machine, for model files, metrics and checkpoints: ``precision: auto`` is
    bf16 on a CPU with AVX512_BF16 and fp32 on one without, and
    ``augment.where: auto`` is the device on CUDA and the loader on CPU; each
    pair trains different models."""
    ctx = run_context(cfg.device, cfg.precision)
    names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    augment = "device" if augment_on_device(cfg.augment.where, ctx.device) else "loader"
    return {"device": ctx.device.type, "precision": names[ctx.amp_dtype], "augment": augment}


def steps_per_epoch(n_train: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps of one epoch (the loader drops the last partial batch)."""
    return n_train // (batch_size * world_size)


def budget_epochs(n_train: int, *, reference_train: int, epochs: int, batch_size: int) -> int:
    """Epochs on ``n_train`` images that give the optimizer steps of
    ``epochs`` epochs over ``reference_train`` images (to within half an
    epoch); at least ``epochs``: a larger set is not cut short."""
    per_epoch = steps_per_epoch(n_train, batch_size)
    if per_epoch == 0:
        raise ValueError(f"{n_train} training images give no full batch of {batch_size} (train.batch_size)")
    target = epochs * steps_per_epoch(reference_train, batch_size)
    return max(epochs, round(target / per_epoch))


def budgeted(train_cfg: TrainConfig, n_train: int, reference_train: int) -> TrainConfig:
    """``train_cfg`` with ``epochs`` (and ``early_epoch``, in proportion) set by
    :func:`budget_epochs`."""
    epochs = budget_epochs(n_train, reference_train=reference_train, epochs=train_cfg.epochs,
                           batch_size=train_cfg.batch_size)
    early = max(1, round(train_cfg.early_epoch * epochs / max(1, train_cfg.epochs)))
    return train_cfg.replace(epochs=epochs, early_epoch=min(early, epochs))


def chance_check(val_acc: float, n_val: int, num_classes: int) -> tuple[bool, float]:
    """(above chance?, the accuracy that counts as above chance): validation
    top-1 must exceed 1/classes by two binomial standard errors. A model that
    predicts one class for everything sits at chance on a balanced split."""
    chance = 1.0 / num_classes
    bar = chance + 2 * (chance * (1 - chance) / max(1, n_val)) ** 0.5
    return val_acc > bar, bar


def eval_loader(images_dir: Path, df: pd.DataFrame, *, image_size: int, batch_size: int, workers: int,
                device: torch.device, index: pd.DataFrame | None = None,
                cache: DecodedImages | None = None) -> torch.utils.data.DataLoader:
    """Deterministic loader (eval transforms) over ``df``'s keys and labels."""
    labels = df["label"] if "label" in df else [0] * len(df)
    ds = ShardDataset(images_dir, df["key"].tolist(), list(labels),
                      build_transform(image_size, train=False), index=index, cache=cache)
    return engine.make_loader(ds, batch_size=batch_size, train=False, seed=0, workers=workers, device=device)


def initial_model(model_cfg: ModelConfig, num_classes: int) -> Classifier:
    """The model every training run starts from: ``model.weights`` in the trunk, a new head."""
    return create_model(model_cfg.backbone, num_classes, model_cfg.weights)


def extract_features(model: Classifier, df: pd.DataFrame, images_dir: Path, *, image_size: int, batch_size: int,
                     device: str, workers: int = 0, index: pd.DataFrame | None = None,
                     cache: DecodedImages | None = None) -> np.ndarray:
    """The trunk's pooled features (what the head sees) of each row of ``df``
    (its ``key`` column), in order, as float32 (rows, feature_dim): one pass
    in eval mode with the eval transform (resize, centre crop), no
    augmentation. In fp32 whatever ``train.precision`` says: a probe's head is
    exact for the fp32 model evaluate scores. Leaves ``model`` on that device, in eval mode."""
    ctx = run_context(device, "fp32")
    loader = eval_loader(images_dir, df, image_size=image_size, batch_size=batch_size, workers=workers,
                         device=ctx.device, index=index, cache=cache)
    # moved outside inference mode: its parameters stay ordinary tensors (a probe's head is written into a copy)
    model.to(ctx.device).eval()
    head, model.head = model.head, nn.Identity()  # the model's own forward (normalisation, trunk), without its head
    out, start = [], time.time()
    try:
        with torch.inference_mode():
            for images, _ in tqdm(loader, desc="features", unit="batch", leave=False, mininterval=5):
                out.append(model(engine.to_device(images, ctx)).float().cpu().numpy())
    finally:
        model.head = head
    features = np.concatenate(out) if out else np.zeros((0, model.feature_dim), np.float32)
    log.info("features of %d images (%d dims) in %.1f s on %s", len(features), features.shape[1],
             time.time() - start, ctx.device.type)
    return features


def check_head_init(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """``train.head_init: probe`` needs pretrained weights: refused on entry, before any work, with
    ``model.weights: none`` (a probe of random features is no head to start from)."""
    if train_cfg.head_init == "probe" and not model_cfg.pretrained:
        raise ConfigError("train.head_init: probe fits the head on frozen features, which are random with "
                          "model.weights: none: use head_init: random, or start from pretrained weights")


def probe_head(model: Classifier, train_df: pd.DataFrame, images_dir: Path, *, num_classes: int,
               model_cfg: ModelConfig, train_cfg: TrainConfig, index: pd.DataFrame | None = None,
               cache: DecodedImages | None = None) -> Classifier:
    """``model`` with its head replaced by a linear probe (``train.probe``) of
    ``train_df``'s labels on the frozen features of its trunk: the first half
    of LP-FT. The features come from the eval transform in fp32 (one pass,
    like the probe references); the fine-tuning that follows sees augmented
    images, which moves the features a little, not the head's meaning."""
    check_head_init(model_cfg, train_cfg)
    start = time.time()
    features = extract_features(model, train_df, images_dir, image_size=model_cfg.image_size,
                                batch_size=train_cfg.batch_size, device=train_cfg.device, workers=train_cfg.workers,
                                index=index, cache=cache)
    probe = fit_probe(features, train_df["label"], num_classes, train_cfg.probe)
    absent = probe.bias == ABSENT_LOGIT
    if absent.any():  # a class without a training image here (a small class in a fold): a neutral start that
        # can still learn, not the probe's -1e4 (probability 0), which label smoothing would punish for ever
        probe.bias[absent] = probe.bias[~absent].min()
    log.info("head_init probe: a linear probe of %d images (%d lbfgs iterations, C %g) is the head; %.1f s",
             len(train_df), probe.n_iter, train_cfg.probe.C, time.time() - start)
    return probe.into(model)


def train_classifier(train_df: pd.DataFrame, val_df: pd.DataFrame | None, *, images_dir: Path, num_classes: int,
                     model_cfg: ModelConfig, train_cfg: TrainConfig, checkpoint: Path | None = None,
                     args: dict[str, Any] | None = None, index: pd.DataFrame | None = None,
                     cache: DecodedImages | None = None, on_epoch: Callable | None = None,
                     ) -> tuple[Classifier, list[dict[str, float]]]:
    """Train a softmax classifier on ``train_df`` (key, label), validating on
    ``val_df``; returns the trained model (unwrapped) and the history. Images
    come from ``cache`` when given (it must hold every key), else the shards."""
    runtime.seed_everything(train_cfg.seed)
    ctx = run_context(train_cfg.device, train_cfg.precision, train_cfg.clip_grad_norm, train_cfg.batchnorm)
    size = model_cfg.image_size
    on_device = augment_on_device(train_cfg.augment.where, ctx.device)
    train_ds = ShardDataset(images_dir, train_df["key"].tolist(), train_df["label"].tolist(),
                            build_transform(size, train=True, augment=train_cfg.augment, on_device=on_device),
                            seed=train_cfg.seed, index=index, cache=cache)
    train_loader = engine.make_loader(train_ds, batch_size=train_cfg.batch_size, train=True,
                                      seed=train_cfg.seed, workers=train_cfg.workers, device=ctx.device)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_ds)} training images give no full batch of {train_cfg.batch_size}")
    val_loader = None
    if val_df is not None and len(val_df):
        val_loader = eval_loader(images_dir, val_df, image_size=size, batch_size=train_cfg.batch_size,
                                 workers=0, device=ctx.device, index=index, cache=cache)
    model = initial_model(model_cfg, num_classes)
    if train_cfg.head_init == "probe":  # also before a resume: the checkpoint then replaces it, unused
        model = probe_head(model, train_df, images_dir, num_classes=num_classes, model_cfg=model_cfg,
                           train_cfg=train_cfg, index=index, cache=cache)
    loss_fn = engine.classification_loss(train_cfg.label_smoothing)
    history = engine.fit(model, loss_fn, train_loader, val_loader, train_cfg, ctx,
                         checkpoint=checkpoint, args=args, on_epoch=on_epoch)
    return model, history


class ModelAtChanceError(StageFailure):
    """A training run ended at chance: it learnt nothing, and nothing after it
    should build on it."""


@dataclass(frozen=True)
class RunPlan:
    """One naive-recipe run on a label set: its seeded validation split
    (``train.val_fraction``) and ``train`` with the step budget applied."""

    train: pd.DataFrame
    val: pd.DataFrame
    cfg: TrainConfig

    @property
    def steps(self) -> int:
        return self.cfg.epochs * steps_per_epoch(len(self.train), self.cfg.batch_size)


def plan_run(labels: pd.DataFrame, train_cfg: TrainConfig, reference_train: int) -> RunPlan:
    """Split ``labels`` (key, label) and budget the run (:func:`budgeted`)."""
    train_df, val_df = split_train_val(labels, train_cfg.val_fraction, train_cfg.seed)
    return RunPlan(train_df, val_df, budgeted(train_cfg, len(train_df), reference_train))


def reference_size(raw_labels: pd.DataFrame, train_cfg: TrainConfig) -> int:
    """Training images of the raw click-labelled split: the budget's unit."""
    return len(split_train_val(raw_labels, train_cfg.val_fraction, train_cfg.seed)[0])


def train_on_labels(plan: RunPlan, *, name: str, images_dir: Path, num_classes: int, model_cfg: ModelConfig,
                    index: pd.DataFrame | None = None, cache: DecodedImages | None = None,
                    checkpoint: Path | None = None, args: dict[str, Any] | None = None,
                    on_epoch: Callable | None = None) -> tuple[Classifier, dict[str, Any]]:
    """The naive recipe on a planned run, and a check that validation top-1 is
    above chance (:class:`ModelAtChanceError` otherwise, naming the params to
    change). Returns the model and a summary (images, epochs, steps, val_acc,
    the resolved device and precision)."""
    cfg = plan.cfg
    model, history = train_classifier(plan.train, plan.val, images_dir=images_dir, num_classes=num_classes,
                                      model_cfg=model_cfg, train_cfg=cfg, checkpoint=checkpoint, args=args,
                                      index=index, cache=cache, on_epoch=on_epoch)
    val_acc = history[-1]["val_acc"] if history else float("nan")
    above, bar = chance_check(val_acc, len(plan.val), num_classes)
    info = {"images": len(plan.train) + len(plan.val), "train_images": len(plan.train),
            "val_images": len(plan.val), "epochs": cfg.epochs, "steps": plan.steps,
            "val_acc": round(float(val_acc), 4), "above_chance": above, **resolved_run(cfg)}
    if not above:
        raise ModelAtChanceError(
            f"{name}: validation top-1 {val_acc:.3f} on {len(plan.val)} images is at chance (1/{num_classes} "
            f"classes; above chance needs > {bar:.3f}) after {plan.steps} optimizer steps ({cfg.epochs} epochs "
            f"of {len(plan.train)} images): the model learnt nothing. With few images, start from pretrained "
            f"weights (model.weights: {model_cfg.weights!r}), lower train.lr ({cfg.lr}) or "
            f"train.batch_size ({cfg.batch_size}), or raise train.epochs.")
    return model, info
