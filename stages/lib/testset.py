"""Scoring models on the cleanly labelled test set: used by the evaluate
stage and by the seed study."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.lib import engine, layout
from stages.lib.classifier import chance_check, eval_loader, run_context
from stages.lib.imagecache import DecodedImages
from stages.lib.metrics import summarize
from stages.lib.models import load_model_file
from stages.lib.tables import check_breed_column, read_headerless

log = logging.getLogger("testset")


@dataclass
class ModelResult:
    """One model's scores on the test set."""

    name: str
    classes: list[str]
    block: dict[str, Any]
    per_class: pd.DataFrame
    actual: list[str]
    predicted: list[str]


def read_test_set(raw_dir: Path, index: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """The labelled test images that decode kept (key, breed), and counts of
    what was lost on the way (labels without a decoded image, test images
    without a label)."""
    path = raw_dir / layout.TEST_LABELS
    labels = read_headerless(path, ["key", "breed"])
    check_breed_column(labels, "breed", path)  # they name rows of the per-class table and the confusion plot
    duplicates = int(labels["key"].duplicated().sum())
    labels = labels.drop_duplicates("key")
    test_keys = set(index.loc[index["split"] == "test", "key"])
    decoded = labels[labels["key"].isin(test_keys)].reset_index(drop=True)
    counts = {"labelled": len(labels), "decoded": len(decoded), "not_decoded": len(labels) - len(decoded),
              "unlabelled_images": len(test_keys - set(labels["key"])), "duplicate_labels": duplicates,
              "breeds": int(decoded["breed"].nunique())}
    if counts["not_decoded"]:
        log.warning("%d labelled test images have no decoded image (see decode's rejects.tsv)",
                    counts["not_decoded"])
    return decoded, counts


def evaluate_model(name: str, path: Path, test: pd.DataFrame, images_dir: Path, index: pd.DataFrame,
                   *, device: str, batch_size: int, cache: DecodedImages | None = None) -> ModelResult:
    """Score one model file on the test images whose breed is one of its classes."""
    # fp32: reported numbers must not depend on whether this CPU has bf16
    ctx = run_context(device, "fp32")
    model, meta = load_model_file(path, ctx.device)
    classes = list(meta["classes"])
    position = {c: i for i, c in enumerate(classes)}
    known = test["breed"].isin(position).to_numpy()
    scored = test[known].assign(label=lambda d: d["breed"].map(position)).reset_index(drop=True)
    unknown = test.loc[~known, "breed"].value_counts()
    if len(unknown):
        log.warning("%s: %d test images of %d breeds that are not model classes are not scored: %s", name,
                    int(unknown.sum()), len(unknown), {b: int(n) for b, n in unknown.head(10).items()})
    start = time.time()
    if len(scored):
        loader = eval_loader(images_dir, scored, image_size=meta["image_size"], batch_size=batch_size,
                             workers=0, device=ctx.device, index=index, cache=cache)
        probs, labels = engine.predict(model, loader, ctx)
    else:
        probs, labels = np.zeros((0, len(classes)), np.float32), np.zeros(0, np.int64)
    block, per_class = summarize(probs, labels, classes)
    block["n_not_scored"] = int((~known).sum())
    if len(labels):
        block["above_chance"] = bool(chance_check(block["top1"], len(labels), len(classes))[0])
    # what the model was trained with: precision auto trains other models on other CPUs
    block.update({f"trained_{k}": meta[k] for k in ("device", "precision") if k in meta})
    predicted = [classes[i] for i in probs.argmax(axis=1)] if len(labels) else []
    log.info("%s: %s (%.1f s)", name, block, time.time() - start)
    return ModelResult(name, classes, block, per_class, scored["breed"].tolist(), predicted)
