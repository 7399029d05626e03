"""The siamese fine-tuning of the naive model (the counterpart of
``classifier.py``): two weight-sharing branches see a pair of images; the loss
is softmax cross-entropy on both plus ``contrastive_weight`` x the contrastive
loss (Hadsell, Chopra & LeCun 2006) on their embeddings. With ``contrastive:
batch`` the pairs are formed inside P breeds x K images batches instead
(pytorch-metric-learning's contrastive loss on cosine similarity). Used by the
train_siamese stage and the seed study."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from stages.lib import engine, runtime
from stages.lib.classifier import (
    ModelConfig,
    OptimConfig,
    TrainConfig,
    eval_loader,
    initial_model,
    probe_head,
    run_context,
)
from stages.lib.data import BreedBatchSampler, ShardDataset
from stages.lib.imagecache import DecodedImages
from stages.lib.losses import ContrastiveLoss, InBatchContrastiveLoss, Reduction
from stages.lib.models import Classifier, build_model, load_model_file
from stages.lib.params import ConfigError
from stages.lib.presets import augment_on_device, build_transform

log = logging.getLogger("siamese")


class PairDataset(Dataset):
    """Items ``(img_a, img_b, label_a, label_b, same)`` over a pair list; images
    come from one ``ShardDataset`` over the clean set (augmentation seeded per
    pair and epoch)."""

    def __init__(self, images: ShardDataset, pairs: pd.DataFrame) -> None:
        pos = {k: i for i, k in enumerate(images.keys)}
        self.images = images
        self.a = pairs["key_a"].map(pos).to_numpy()
        self.b = pairs["key_b"].map(pos).to_numpy()
        if np.isnan(self.a.astype(float)).any() or np.isnan(self.b.astype(float)).any():
            raise KeyError("pair list names images that are not in the clean set")
        self.same = pairs["same"].to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.same)

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        # distinct seeds for the two images of one pair, and per pair, not per image
        xa, ya = self.images[(int(self.a[i]), 2 * (epoch * len(self) + i))]
        xb, yb = self.images[(int(self.b[i]), 2 * (epoch * len(self) + i) + 1)]
        return xa, xb, ya, yb, int(self.same[i])


def siamese_loss(*, contrastive_weight: float, margin: float, label_smoothing: float,
                 reduction: str = "active") -> engine.LossFn:
    """CE(a) + CE(b) (each the mean over the batch's images) + weight x the
    contrastive loss (averaged as ``reduction`` says, see ``ContrastiveLoss``).
    Logs ``ce`` (the mean of the two CE terms), ``contrastive`` and its parts."""
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    contrastive = ContrastiveLoss(margin, reduction=reduction)

    def loss_fn(model, batch, ctx: engine.RunContext):
        xa, xb, ya, yb, same = batch
        n = len(same)
        # one forward pass over both branches: the weights are shared by construction
        # each branch on the device (augmented there with augment.where: device); cat keeps channels_last
        images = torch.cat([engine.to_device(xa, ctx), engine.to_device(xb, ctx)])
        logits, emb = model(images, with_embedding=True)
        ya, yb, same = (t.to(ctx.device, non_blocking=True) for t in (ya, yb, same))
        ce_a, ce_b = ce(logits[:n].float(), ya), ce(logits[n:].float(), yb)
        terms = contrastive.terms(emb[:n], emb[n:], same)
        loss = ce_a + ce_b + contrastive_weight * terms["loss"]
        acc = (logits.argmax(1) == torch.cat([ya, yb])).float().mean()
        logs = {"loss": loss, "ce": (ce_a + ce_b) / 2, "contrastive": terms["loss"],
                "contrastive_pos": terms["positive"], "contrastive_neg": terms["negative"],
                "active_negatives": terms["active_negatives"], "acc": acc}
        return loss, {k: v.detach() for k, v in logs.items()}, n

    return loss_fn


def batch_loss(*, contrastive_weight: float, neg_margin: float, label_smoothing: float) -> engine.LossFn:
    """``contrastive: batch``: CE summed over the batch's images / half of them
    (the scale of pairs mode's CE(a) + CE(b) at the same images per step) +
    weight x :class:`InBatchContrastiveLoss` over every pair in the batch.
    Logs ``ce`` (the mean per image), ``contrastive`` and its two parts."""
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="sum")
    contrastive = InBatchContrastiveLoss(neg_margin)

    def loss_fn(model, batch, ctx: engine.RunContext):
        images, labels = batch
        logits, emb = model(engine.to_device(images, ctx), with_embedding=True)
        labels = labels.to(ctx.device, non_blocking=True)
        n = len(labels)
        ce_sum = ce(logits.float(), labels)
        terms = contrastive.terms(emb, labels)
        loss = ce_sum / (n / 2) + contrastive_weight * terms["loss"]
        acc = (logits.argmax(1) == labels).float().mean()
        logs = {"loss": loss, "ce": ce_sum / n, "contrastive": terms["loss"],
                "contrastive_pos": terms["positive"], "contrastive_neg": terms["negative"], "acc": acc}
        return loss, {k: v.detach() for k, v in logs.items()}, n // 2

    return loss_fn


@dataclass(frozen=True)
class SiameseConfig(OptimConfig):
    """params.yaml ``siamese``: the training loop's settings plus the
    contrastive term and the embedding it acts on. ``contrastive``: pairs
    (make_pairs' pairs, ``margin`` and ``reduction``) or batch (every pair
    inside P breeds x ``images_per_breed`` batches of ``2 x batch_size``
    images, ``neg_margin``; as many batches per epoch as pairs mode has).
    ``start``: naive (the naive model, the paper) or probe (the pretrained
    trunk, its head a linear probe of the clean labels: :func:`siamese_from_probe`).
    ``breed_share`` (batch only): how often a batch draws each breed: as its
    kept images, as its click-filtered labels (clicks: the label filter then
    picks which of a breed's images are seen, not how often the breed is), or
    uniform (:func:`breed_weights`)."""

    start: Literal["naive", "probe"]
    contrastive: Literal["pairs", "batch"]
    contrastive_weight: float
    margin: float
    reduction: Reduction
    images_per_breed: int
    breed_share: Literal["kept", "clicks", "uniform"]
    neg_margin: float
    embedding_dim: int
    normalize: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.contrastive_weight < 0 or self.margin <= 0 or self.embedding_dim < 0:
            raise ValueError("contrastive_weight and embedding_dim must be >= 0, margin > 0")
        if self.images_per_breed < 2 or (2 * self.batch_size) % self.images_per_breed:
            raise ValueError(f"images_per_breed must be >= 2 and divide the 2 x batch_size = {2 * self.batch_size} "
                             f"images of a batch, got {self.images_per_breed}")
        if not -1 < self.neg_margin < 1:
            raise ValueError(f"neg_margin is a cosine similarity in (-1, 1), got {self.neg_margin}")
        if self.breed_share != "kept" and self.contrastive != "batch":
            raise ValueError(f"breed_share {self.breed_share} sets how often contrastive: batch's batches draw each "
                             f"breed; contrastive: {self.contrastive} draws make_pairs' pairs: use breed_share: kept")


def siamese_from_naive(naive_path: Path, cfg: SiameseConfig) -> tuple[Classifier, dict[str, Any]]:
    """The naive model's trunk and head, plus a new projection head if asked."""
    runtime.seed_everything(cfg.seed)  # the projection head's initial weights (drawn after loading the model)
    naive, meta = load_model_file(naive_path)
    return _with_projection(naive, meta, cfg, f"{naive_path}"), meta


def _with_projection(start: Classifier, meta: dict[str, Any], cfg: SiameseConfig, source: str) -> Classifier:
    """``start``'s trunk and head in the siamese architecture (``meta``'s backbone, classes and
    preprocessing), plus a new projection head if ``embedding_dim`` asks (its initial weights: the
    caller seeds the generator)."""
    model = build_model(meta["backbone"], len(meta["classes"]), embedding_dim=cfg.embedding_dim,
                        normalize=cfg.normalize, mean=meta["mean"], std=meta["std"])
    missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
    if unexpected or any(not k.startswith("projection.") for k in missing):
        raise ValueError(f"{source} does not fit: missing {missing}, unexpected {unexpected}")
    return model


def check_start(cfg: SiameseConfig, model_cfg: ModelConfig) -> None:
    """``siamese.start: probe`` needs pretrained weights: refused on entry, before any work, with
    ``model.weights: none`` (a probe of random features is no head to start from)."""
    if cfg.start == "probe" and not model_cfg.pretrained:
        raise ConfigError("siamese.start: probe fits the head on the frozen features of the initial trunk, which "
                          "are random with model.weights: none: use siamese.start: naive, or pretrained weights")


def siamese_from_probe(naive_path: Path, clean: pd.DataFrame, cfg: SiameseConfig, *, model_cfg: ModelConfig,
                       train_cfg: TrainConfig, images_dir: Path, index: pd.DataFrame | None = None,
                       cache: DecodedImages | None = None) -> tuple[Classifier, dict[str, Any]]:
    """``siamese.start: probe``: the initial trunk (``model.weights``), its head a linear probe
    (``train.probe``) of ``clean``'s labels on that trunk's frozen features, plus a new projection
    head if asked: LP-FT on the label filter's kept set. With pretrained weights the naive model is a
    fine-tune on the noisy click labels, and what it learnt of their noise is where this fine-tune
    would otherwise start; the naive model's file still gives the classes and preprocessing (the
    trunk is ``model.backbone``, so both must name the same one)."""
    check_start(cfg, model_cfg)
    _, meta = load_model_file(naive_path)
    if meta["backbone"] != model_cfg.backbone:
        raise ConfigError(f"siamese.start: probe starts from model.backbone {model_cfg.backbone!r}, but the naive "
                          f"model {naive_path} is a {meta['backbone']!r}: re-run train_naive")
    start = probe_head(initial_model(model_cfg, len(meta["classes"])), clean, images_dir,
                       num_classes=len(meta["classes"]), model_cfg=model_cfg, train_cfg=train_cfg, index=index,
                       cache=cache)
    runtime.seed_everything(cfg.seed)  # the projection head's initial weights
    return _with_projection(start, meta, cfg, f"model.weights {model_cfg.weights!r}"), meta


def fit_siamese(model: Classifier, meta: dict[str, Any], clean: pd.DataFrame, pairs: pd.DataFrame,
                val: pd.DataFrame, *, images_dir: Path, index: pd.DataFrame, cfg: SiameseConfig,
                cache: DecodedImages | None = None, checkpoint: Path | None = None,
                args: dict[str, Any] | None = None, on_epoch=None,
                click_labels: pd.Series | None = None) -> list[dict[str, float]]:
    """Fine-tune ``model`` on ``pairs`` of ``clean`` images, validating on ``val``
    (images from ``cache`` when given, which must hold both sets' keys).
    ``click_labels``: the label of every click-filtered image, before the
    label filter (``breed_share: clicks`` draws breeds as they are there)."""
    runtime.seed_everything(cfg.seed)
    ctx = run_context(cfg.device, cfg.precision, cfg.clip_grad_norm, cfg.batchnorm)
    size = meta["image_size"]
    images = ShardDataset(images_dir, clean["key"].tolist(), clean["label"].tolist(),
                          build_transform(size, train=True, augment=cfg.augment,
                                          on_device=augment_on_device(cfg.augment.where, ctx.device)),
                          seed=cfg.seed, index=index, cache=cache)
    if len(pairs) < cfg.batch_size:  # no stage trains on nothing and exits 0
        raise ValueError(f"train_siamese: {len(pairs)} pairs give no full batch of siamese.batch_size "
                         f"{cfg.batch_size}: nothing to fine-tune on (see make_pairs' report.json)")
    if cfg.contrastive == "pairs":
        train_loader = engine.make_loader(PairDataset(images, pairs), batch_size=cfg.batch_size, train=True,
                                          seed=cfg.seed, workers=cfg.workers, device=ctx.device)
        loss_fn = siamese_loss(contrastive_weight=cfg.contrastive_weight, margin=cfg.margin,
                               label_smoothing=cfg.label_smoothing, reduction=cfg.reduction)
    else:
        train_loader = engine.make_loader(images, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
                                          workers=cfg.workers, device=ctx.device,
                                          batch_sampler=breed_batches(clean, val, pairs, cfg, len(meta["classes"]),
                                                                     click_labels))
        loss_fn = batch_loss(contrastive_weight=cfg.contrastive_weight, neg_margin=cfg.neg_margin,
                             label_smoothing=cfg.label_smoothing)
    if len(train_loader) == 0:
        raise ValueError(f"train_siamese: {len(pairs)} pairs give no batch of siamese.batch_size {cfg.batch_size} "
                         f"on each of {runtime.rank_and_world()[1]} processes")
    val_loader = eval_loader(images_dir, val, image_size=size, batch_size=2 * cfg.batch_size, workers=0,
                             device=ctx.device, index=index, cache=cache)
    log.info("%d clean images, %d pairs %s, %d validation images; contrastive: %s", len(clean), len(pairs),
             pairs["kind"].value_counts().to_dict(), len(val), cfg.contrastive)
    return engine.fit(model, loss_fn, train_loader, val_loader, cfg, ctx, checkpoint=checkpoint, args=args,
                      on_epoch=on_epoch)


def breed_weights(share: str, click_labels: pd.Series | None, num_classes: int) -> np.ndarray | None:
    """How often ``breed_share`` draws each label value (None: as its kept images).

    Why clicks: the label filter drops each breed's labels at its own rate, and
    the rates follow the scorer's confusions, not the breeds' frequencies. A
    scorer trained on one-sided look-alike clicks (a lesser-known breed's
    photos clicked under the best-known breed's name) flags many right labels
    of the lesser-known breed: on the sample the filter keeps 112 basset hounds
    against 255 beagles, and a fine-tune drawing breeds as kept learns that
    prior (basset recall 0.51 -> 0.26; docs/method.md)."""
    if share == "kept":
        return None
    if share == "uniform":
        return np.ones(num_classes)
    if click_labels is None:
        raise ValueError("siamese.breed_share: clicks needs the click-filtered labels (make_pairs' scores.tsv)")
    labels = click_labels.to_numpy(dtype=np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise ValueError(f"click-filtered labels must lie in 0..{num_classes - 1}")
    return np.bincount(labels, minlength=num_classes).astype(np.float64)


def breed_batches(clean: pd.DataFrame, val: pd.DataFrame, pairs: pd.DataFrame, cfg: SiameseConfig,
                  num_classes: int, click_labels: pd.Series | None = None) -> BreedBatchSampler:
    """``contrastive: batch``'s sampler over the clean images outside the
    validation split (those make_pairs pairs), with pairs mode's batches per
    epoch: the two modes differ in how a step's images are grouped, not in
    how many steps or images. Breeds are drawn as ``cfg.breed_share`` says."""
    rank, world = runtime.rank_and_world()
    outside_val = np.flatnonzero(~clean["key"].isin(set(val["key"])).to_numpy())
    weights = breed_weights(cfg.breed_share, click_labels, num_classes)  # its own errors name breed_share
    try:
        return BreedBatchSampler(clean["label"].to_numpy(), batch_images=2 * cfg.batch_size,
                                 per_breed=cfg.images_per_breed, batches=len(pairs) // cfg.batch_size,
                                 seed=cfg.seed, indices=outside_val, num_replicas=world, rank=rank,
                                 breed_weights=weights)
    except ValueError as err:
        raise ValueError(f"siamese.contrastive batch (siamese.images_per_breed {cfg.images_per_breed}, "
                         f"siamese.batch_size {cfg.batch_size}): {err}") from err
