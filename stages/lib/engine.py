"""The training loop shared by the naive and siamese stages (and cross-fitting).

In the spirit of torchvision's ``references/classification/train.py``: plain
functions (``train_one_epoch``, ``evaluate``, ``fit``), explicit errors for bad
choices, checkpoints as a dict of model / optimizer / scheduler / epoch / args,
and resume. The loss is a callable ``loss_fn(model, batch, ctx) ->
(loss, {name: value}, batch_size)`` so the siamese stage extends the loop
instead of copying it (``ctx``: a :class:`RunContext`).

The device, the autocast dtype and the DDP process group come from ``runtime``
(CUDA with fp16/bf16 autocast and channels_last; on CPU, bf16 autocast only
where the CPU has native bf16). Several processes: ``torchrun`` +
DistributedDataParallel (gloo on CPU, nccl on CUDA); only rank 0 writes.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from stages.lib import batchaug
from stages.lib.atomic import atomic_file, remove_stale_temporaries
from stages.lib.cli import StageFailure
from stages.lib.data import EpochSampler
from stages.lib.runtime import is_main_process, rank_and_world

log = logging.getLogger("engine")

# (model, batch, ctx) -> (loss, logs, images): logs are detached 0-dim tensors on the training device (as
# pytorch-metric-learning's losses return them), summed there; train_one_epoch reads them back once per
# epoch, not with one host synchronisation per value and step
LossFn = Callable[[nn.Module, Any, "RunContext"], tuple[torch.Tensor, dict[str, torch.Tensor], int]]
STOP_ENV = "CLICKDOG_STOP_AFTER_EPOCH"  # simulates an interruption (tests of resume)


class NonFiniteLossError(StageFailure):
    """The loss became NaN or inf: the run stops instead of training on garbage."""


class TrainingInterrupted(RuntimeError):
    """Raised after the checkpoint of the epoch named by ``CLICKDOG_STOP_AFTER_EPOCH``."""


# ---------------------------------------------------------------- optimisation
def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW; no weight decay on norms and biases. With ``cfg.trunk_lr_scale``
    below 1 the trunk's parameters learn at ``lr x trunk_lr_scale`` and the rest (the new head, the
    projection) at ``lr``: a pretrained trunk keeps its features while the head catches up (the
    scheduler scales every group alike)."""
    trunk = getattr(getattr(model, "module", model), "trunk", None)  # DDP wraps the model in .module
    in_trunk = {id(p) for p in trunk.parameters()} if trunk is not None and cfg.trunk_lr_scale != 1 else set()
    params = [p for p in model.parameters() if p.requires_grad]
    parts = [(1.0, [p for p in params if id(p) not in in_trunk])]
    if in_trunk:
        parts.append((cfg.trunk_lr_scale, [p for p in params if id(p) in in_trunk]))
    groups = []
    for scale, members in parts:
        groups += [{"params": [p for p in members if p.ndim > 1], "weight_decay": cfg.weight_decay,
                    "lr": cfg.lr * scale},
                   {"params": [p for p in members if p.ndim <= 1], "weight_decay": 0.0, "lr": cfg.lr * scale}]
    name = cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"optimizer must be sgd or adamw, got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to zero, stepped every batch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ema_decay(half_life_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay of an exponential moving average whose weight on a step halves every
    ``half_life_epochs`` epochs: declared in epochs, the average spans the same share of a run on the
    sample's 30 steps an epoch and on the real data's thousands."""
    if half_life_epochs <= 0 or steps_per_epoch < 1:
        raise ValueError(f"ema_half_life must be > 0 and an epoch at least one step, got {half_life_epochs}, "
                         f"{steps_per_epoch}")
    return 0.5 ** (1.0 / (half_life_epochs * steps_per_epoch))


def build_ema(model: nn.Module, cfg: Any, steps_per_epoch: int) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights (``cfg.ema_half_life`` epochs; 0: none),
    updated after every optimizer step: torch's ``AveragedModel``, BatchNorm statistics averaged too
    (``use_buffers``). Under label noise the late steps memorise wrong labels; the average lags them."""
    if cfg.ema_half_life == 0:
        return None
    decay = ema_decay(cfg.ema_half_life, steps_per_epoch)
    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


# ---------------------------------------------------------------- loops
@dataclass
class RunContext:
    """What the loops need besides the model and data."""

    device: torch.device
    amp_dtype: torch.dtype | None
    clip_grad_norm: float = 0.0
    channels_last: bool = True
    frozen_batchnorm: bool = False  # BatchNorm layers stay in eval mode while training (OptimConfig.batchnorm)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def to_device(x: torch.Tensor | batchaug.RawBatch, ctx: RunContext) -> torch.Tensor:
    """A batch's images on the run's device (augmented there when the loader
    deferred it: ``augment.where``)."""
    return batchaug.to_device(x, ctx.device, channels_last=ctx.channels_last)


def classification_loss(label_smoothing: float = 0.0) -> LossFn:
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss_fn(model, batch, ctx: RunContext):
        images, labels = batch
        images, labels = to_device(images, ctx), labels.to(ctx.device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits.float(), labels)
        acc = (logits.argmax(1) == labels).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}, len(labels)

    return loss_fn


def train_one_epoch(model: nn.Module, loss_fn: LossFn, loader: DataLoader, optimizer, scheduler,
                    scaler: torch.amp.GradScaler | None, ctx: RunContext, epoch: int,
                    ema: AveragedModel | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns the sample-weighted mean of each logged value,
    images/s, and ``data_wait_s``: the seconds the step waited for its batches
    (with loader workers, only what their prefetching did not hide). On CUDA
    each batch is copied (and augmented) one step ahead on a side stream
    (``batchaug.prefetch``), so there ``data_wait_s`` is the time spent taking
    the *next* batch from the loader and queueing its copy before each step.
    ``ema``, when given, takes the weights after every optimizer step."""
    model.train()
    if ctx.frozen_batchnorm:  # a pretrained trunk's running statistics, not those of small noisy batches
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    sums: dict[str, torch.Tensor] = {}  # on the device: no host synchronisation per logged value
    seen, start = 0, time.time()
    batches, wait = batchaug.prefetch(loader, ctx.device, channels_last=ctx.channels_last), 0.0
    for step in itertools.count():
        t = time.perf_counter()
        batch = next(batches, None)  # a DataLoader never yields None
        wait += time.perf_counter() - t
        if batch is None:
            break
        with ctx.autocast():
            loss, logs, n = loss_fn(model, batch, ctx)
        if not torch.isfinite(loss):  # the one host synchronisation of a step: never step on a NaN
            raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch} step {step}: lower the learning "
                                     f"rate, raise warm-up, or set clip_grad_norm")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if ctx.clip_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), ctx.clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        for k, v in logs.items():
            # float64 as the Python floats the sums were before (no MPS support: CPU and CUDA only)
            sums[k] = sums.get(k, 0.0) + v.detach().double() * n
        seen += n
    out = {k: v.item() / max(1, seen) for k, v in sums.items()}
    out["images_per_s"] = seen / max(1e-9, time.time() - start)
    out["data_wait_s"] = wait
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, ctx: RunContext) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over ``loader`` (batches of (images, labels))."""
    model.eval()
    probs, labels = [], []
    for images, y in loader:
        with ctx.autocast():
            logits = model(to_device(images, ctx))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(np.asarray(y))
    if not probs:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(probs), np.concatenate(labels)


def evaluate(model: nn.Module, loader: DataLoader, ctx: RunContext) -> dict[str, float]:
    """Top-1 accuracy and mean negative log-likelihood."""
    probs, labels = predict(model, loader, ctx)
    if len(labels) == 0:
        return {"acc": float("nan"), "nll": float("nan")}
    p_true = probs[np.arange(len(labels)), labels]
    return {"acc": float((probs.argmax(1) == labels).mean()), "nll": float(-np.log(np.maximum(p_true, 1e-12)).mean())}


# ---------------------------------------------------------------- data loaders
def make_loader(dataset: Dataset, *, batch_size: int, train: bool, seed: int, workers: int,
                device: torch.device, pin_memory: bool | None = None, batch_sampler: Any = None) -> DataLoader:
    """Training loaders shard across DDP ranks through ``EpochSampler``, or
    draw their batches from ``batch_sampler`` (one with ``set_epoch`` that
    shards itself, e.g. ``BreedBatchSampler``; ``batch_size`` then unused);
    evaluation loaders see everything on every rank (small, and simpler than
    gathering)."""
    pin = device.type == "cuda" if pin_memory is None else pin_memory  # None: pinned for CUDA
    kwargs: dict[str, Any] = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin,
                                  persistent_workers=workers > 0, collate_fn=batchaug.collate,
                                  # its own generator: drawing worker seeds must not move the global
                                  # RNG (dropout), or a resumed run would diverge from a straight one
                                  generator=torch.Generator().manual_seed(seed))
    if workers > 0:
        kwargs["prefetch_factor"] = 4
    if batch_sampler is not None:
        del kwargs["batch_size"]
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    if train:
        rank, world = rank_and_world()
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(dataset, sampler=sampler, drop_last=True, **kwargs)
    return DataLoader(dataset, shuffle=False, **kwargs)


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, *, model: nn.Module, optimizer, scheduler, scaler, epoch: int,
                    args: dict[str, Any], history: list[dict[str, float]],
                    ema: AveragedModel | None = None) -> None:
    """Atomically write a resumable checkpoint (loadable with weights_only=True)."""
    state = {
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "args": args,
        "history": history,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_file(path, "wb") as f:  # fsynced before the rename: after a crash, the old file or the new one
        torch.save(state, f)


CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "args", "history", "rng_cpu",
                   "rng_cuda")


def load_checkpoint(path: Path, args: dict[str, Any], epochs: int) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it holds an *interrupted* run (fewer than
    ``epochs`` epochs done) made with the same ``args``; otherwise None, and
    the run starts from scratch. A finished run's checkpoint is not resumed:
    a forced re-run (``dvc repro -f``, after a library upgrade, to check
    determinism) must train, not re-save the old model. A checkpoint of other
    settings, or an unreadable or foreign file, is ignored with a log line."""
    remove_stale_temporaries(path)  # a write that a crash cut short (its process is gone)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: start over rather than crash
        log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        log.warning("ignoring %s: not a training checkpoint of this project", path)
        return None
    if state["args"] != args:
        log.info("checkpoint %s was made with other settings: starting from scratch", path)
        return None
    if state["epoch"] + 1 >= epochs:
        log.info("checkpoint %s holds a finished run (%d epochs): training again", path, state["epoch"] + 1)
        return None
    return state


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- the whole run
def fit(model: nn.Module, loss_fn: LossFn, train_loader: DataLoader, val_loader: DataLoader | None,
        cfg: Any, ctx: RunContext, *, checkpoint: Path | None = None, args: dict[str, Any] | None = None,
        on_epoch: Callable[[int, dict[str, float], nn.Module], None] | None = None) -> list[dict[str, float]]:
    """Train ``model`` for ``cfg.epochs`` epochs (``cfg``: an ``OptimConfig``), resuming from ``checkpoint``
    when it holds an interrupted run with the same ``args``; returns the per-epoch history.

    ``on_epoch(epoch, metrics, model)`` runs on rank 0 after each epoch, also for
    the epochs replayed from a checkpoint (so loggers see the whole run).

    With ``cfg.ema_half_life`` > 0 the run keeps an exponential moving average of the weights: validation,
    ``on_epoch`` and the returned ``model`` (its weights replaced at the end) are the average's; the
    checkpoint holds both, so a resumed run is the uninterrupted one.
    """
    model.to(ctx.device)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if ctx.amp_dtype == torch.float16 else None
    ema = build_ema(model, cfg, len(train_loader))
    args = args if args is not None else {}
    history: list[dict[str, float]] = []
    start_epoch = 0
    state = load_checkpoint(checkpoint, args, cfg.epochs) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        history, start_epoch = list(state["history"]), state["epoch"] + 1
        log.info("resumed from %s at epoch %d", checkpoint, start_epoch)
        if on_epoch is not None and is_main_process():
            for e, metrics in enumerate(history):
                on_epoch(e, metrics, None)
    train_model = model
    if dist.is_initialized():
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    scored = ema.module if ema is not None else model  # the weights validation and on_epoch see
    stop_after = int(os.environ.get(STOP_ENV, "0"))
    for epoch in range(start_epoch, cfg.epochs):
        # the sampler seeds each epoch's order (and, with a batch sampler, its batches)
        (train_loader.batch_sampler if hasattr(train_loader.batch_sampler, "set_epoch")
         else train_loader.sampler).set_epoch(epoch)
        start = time.time()
        metrics = {f"train_{k}": v for k, v in train_one_epoch(
            train_model, loss_fn, train_loader, optimizer, scheduler, scaler, ctx, epoch, ema=ema).items()}
        if val_loader is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(scored, val_loader, ctx).items()})
        metrics["epoch_s"] = time.time() - start
        history.append(metrics)
        log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if is_main_process():
            if on_epoch is not None:
                on_epoch(epoch, metrics, scored)
            if checkpoint is not None:
                save_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                epoch=epoch, args=args, history=history, ema=ema)
        if dist.is_initialized():
            dist.barrier()
        if stop_after and epoch + 1 == stop_after and epoch + 1 < cfg.epochs:
            raise TrainingInterrupted(f"stopped after epoch {epoch + 1} as {STOP_ENV} asks")
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return history
