"""train_siamese stage: fine-tune the naive model as a siamese network.

    python -m stages.train_siamese data/pairs data/images models/naive models/siamese
    torchrun --nproc_per_node 4 -m stages.train_siamese data/pairs data/images models/naive models/siamese

Two weight-sharing branches (one network run on both images of each pair)
start from the naive model. Loss = CE(a) + CE(b) + ``contrastive_weight`` x
contrastive(d(emb_a, emb_b), same) with the margin loss of Hadsell, Chopra &
LeCun (2006). The training loop is the naive stage's (``stages.lib.engine``);
validation is on the naive run's validation split, so the two are compared on
the same images. Output layout as the naive stage: ``model.pt``, ``live/``,
``checkpoints/last.pt`` (persisted, resumable).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from stages.lib import data, engine, layout, losses, models
from stages.lib.classifier import eval_loader, run_context
from stages.lib.data import ShardDataset, build_transform, load_labels, read_table
from stages.lib.losses import ContrastiveLoss
from stages.lib.models import Classifier, build_model, load_model_file
from stages.lib.params import load_params
from stages.lib.shards import read_index
from stages.lib.tracking import EpochLogger, code_digest, file_digest, save_model

log = logging.getLogger("train_siamese")


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


def siamese_loss(*, contrastive_weight: float, margin: float, label_smoothing: float) -> engine.LossFn:
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    contrastive = ContrastiveLoss(margin)

    def loss_fn(model, batch, ctx: engine.RunContext):
        xa, xb, ya, yb, same = batch
        n = len(same)
        # one forward pass over both branches: the weights are shared by construction
        logits, emb = model(engine.to_device(torch.cat([xa, xb]), ctx), with_embedding=True)
        ya, yb, same = (t.to(ctx.device, non_blocking=True) for t in (ya, yb, same))
        ce_a, ce_b = ce(logits[:n].float(), ya), ce(logits[n:].float(), yb)
        con = contrastive(emb[:n], emb[n:], same)
        loss = ce_a + ce_b + contrastive_weight * con
        acc = (logits.argmax(1) == torch.cat([ya, yb])).float().mean().item()
        return loss, {"loss": loss.item(), "ce": (ce_a + ce_b).item() / 2, "contrastive": con.item(), "acc": acc}, n

    return loss_fn


def siamese_from_naive(naive_path: Path, cfg: dict[str, Any]) -> tuple[Classifier, dict[str, Any]]:
    """The naive model's trunk and head, plus a new projection head if asked."""
    engine.seed_everything(cfg["seed"])  # the projection head's initial weights
    naive, meta = load_model_file(naive_path)
    model = build_model(meta["backbone"], len(meta["classes"]), embedding_dim=cfg["embedding_dim"],
                        normalize=cfg["normalize"], mean=meta["mean"], std=meta["std"])
    missing, unexpected = model.load_state_dict(naive.state_dict(), strict=False)
    if unexpected or any(not k.startswith("projection.") for k in missing):
        raise ValueError(f"{naive_path} does not fit: missing {missing}, unexpected {unexpected}")
    model.backbone_name = meta["backbone"]
    return model, meta


def fit_siamese(model: Classifier, meta: dict[str, Any], clean: pd.DataFrame, pairs: pd.DataFrame,
                val: pd.DataFrame, *, images_dir: Path, index: pd.DataFrame, cfg: dict[str, Any],
                checkpoint: Path | None = None, args: dict[str, Any] | None = None,
                on_epoch=None) -> list[dict[str, float]]:
    """Fine-tune ``model`` on ``pairs`` of ``clean`` images, validating on ``val``."""
    engine.seed_everything(cfg["seed"])
    ctx = run_context(cfg)
    size = meta["image_size"]
    images = ShardDataset(images_dir, clean["key"].tolist(), clean["label"].tolist(),
                          build_transform(size, train=True, augment=cfg["augment"]),
                          seed=cfg["seed"], index=index)
    train_loader = engine.make_loader(PairDataset(images, pairs), batch_size=cfg["batch_size"], train=True,
                                      seed=cfg["seed"], workers=cfg["workers"], device=ctx.device)
    val_loader = eval_loader(images_dir, val, image_size=size, batch_size=2 * cfg["batch_size"], workers=0,
                             device=ctx.device, index=index)
    log.info("%d clean images, %d pairs %s, %d validation images", len(clean), len(pairs),
             pairs["kind"].value_counts().to_dict(), len(val))
    loss_fn = siamese_loss(contrastive_weight=cfg["contrastive_weight"], margin=cfg["margin"],
                           label_smoothing=cfg["label_smoothing"])
    return engine.fit(model, loss_fn, train_loader, val_loader, cfg, ctx, checkpoint=checkpoint, args=args,
                      on_epoch=on_epoch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("pairs_dir", "images_dir", "naive_dir", "out_dir"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_params("siamese", path=args.params)
    engine.init_distributed(cfg["device"])

    model, meta = siamese_from_naive(args.naive_dir / layout.MODEL, cfg)
    clean = load_labels(args.pairs_dir / layout.CLEAN)
    pairs = read_table(args.pairs_dir / layout.PAIRS)
    val = read_table(args.naive_dir / layout.VAL_PREDICTIONS)
    out = args.out_dir
    logger = None
    if engine.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        logger = EpochLogger(out / layout.LIVE)
    run_args = {"siamese": cfg, "data": file_digest(args.pairs_dir / layout.PAIRS, args.naive_dir / layout.MODEL),
                "code": code_digest(sys.modules[__name__], losses, engine, data, models)}
    history = fit_siamese(model, meta, clean, pairs, val, images_dir=args.images_dir,
                          index=read_index(args.images_dir), cfg=cfg, checkpoint=out / layout.CHECKPOINTS / "last.pt",
                          args=run_args, on_epoch=logger)
    if engine.is_main_process():
        save_model(out / layout.MODEL, model, backbone=meta["backbone"], image_size=meta["image_size"],
                   classes=meta["classes"], epochs=cfg["epochs"])
        logger.end()
        log.info("validation top-1 %.4f after %d epochs", history[-1]["val_acc"], len(history))


if __name__ == "__main__":
    main()
