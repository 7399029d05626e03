"""Scores of a classifier on a cleanly labelled test set.

Plain functions over a probability matrix ``probs`` (images x classes) and
integer ``labels`` (index into the model's class list): top-k accuracy, mean
per-class accuracy, and per-class precision / recall (scikit-learn). The
evaluate stage calls them once per model; the tests check them against values
computed by hand.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

SUMMARY_METRICS = ("top1", "top5", "mean_class_accuracy")


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the ``k`` most probable.

    With fewer than ``k`` classes every image counts as a hit (top-5 of a
    3-class model is 1.0). Ties rank the lower class index first, as
    ``argmax`` does, so top-1 here equals ``argmax`` accuracy.
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    # stable sort of -p: equal probabilities keep class order (argmax's rule)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def per_class_scores(labels: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per class: breed, precision, recall, support.

    The recall of a class is its accuracy (the share of its test images
    predicted as it). Undefined values are NaN, not 0: a class with no test
    image has no recall, a class never predicted has no precision; a 0 would
    read as "always wrong" and pull averages down.
    """
    if len(labels) == 0:  # scikit-learn refuses empty input; nothing is defined
        nan = np.full(len(classes), np.nan)
        return pd.DataFrame({"breed": list(classes), "precision": nan, "recall": nan,
                             "support": np.zeros(len(classes), int)})
    precision, recall, _, support = precision_recall_fscore_support(
        labels, pred, labels=np.arange(len(classes)), zero_division=np.nan)
    return pd.DataFrame({"breed": list(classes), "precision": precision.astype(float),
                         "recall": recall.astype(float), "support": support.astype(int)})


def mean_class_accuracy(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean over the classes that have test images of their accuracy (recall).

    Unlike top-1 it weighs every breed equally, so a model that is good only
    on the frequent breeds scores lower here.
    """
    labels, pred = np.asarray(labels), np.asarray(pred)
    support = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[labels == pred], minlength=num_classes)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((hits[present] / support[present]).mean())


def summarize(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str],
              digits: int = 4) -> tuple[dict[str, float | int | None], pd.DataFrame]:
    """(metrics block, per-class table) of one model on the scored test images."""
    labels = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(probs).argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    block: dict[str, float | int | None] = {
        "top1": topk_accuracy(probs, labels, 1),
        "top5": topk_accuracy(probs, labels, 5),
        "mean_class_accuracy": mean_class_accuracy(labels, pred, len(classes)),
    }
    # JSON has no NaN: an undefined score (no test image) is null
    block = {k: round(v, digits) if np.isfinite(v) else None for k, v in block.items()}
    block["n_test"] = int(len(labels))
    return block, per_class_scores(labels, pred, classes)
