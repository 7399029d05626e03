"""Pair mining for the siamese stage: confusable breeds from the naive model's
validation confusion, and seeded positive / negative / hard-negative pairs."""
from __future__ import annotations

import numpy as np
import pandas as pd

POSITIVE, NEGATIVE, HARD_NEGATIVE = "positive", "negative", "hard_negative"


def confusion_counts(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = validation images of class i predicted as j."""
    c = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(c, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return c


def confusable_classes(confusion: np.ndarray, k: int) -> dict[int, list[int]]:
    """For each class, the ``k`` other classes it is most confused with, in
    either direction (``C[i, j] + C[j, i]``); classes never confused are left
    out, so a breed with no confusion gets only uniform negatives."""
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be square, got {confusion.shape}")
    sym = confusion + confusion.T
    np.fill_diagonal(sym, 0)
    out: dict[int, list[int]] = {}
    for i in range(len(sym)):
        order = np.argsort(-sym[i], kind="stable")  # stable: ties go to the lower label
        out[i] = [int(j) for j in order[:k] if sym[i, j] > 0]
    return out


def _stochastic_round(x: float, rng: np.random.Generator) -> int:
    low = int(np.floor(x))
    return low + int(rng.random() < x - low)


def make_pairs(labels: np.ndarray, *, per_image: int, pos_fraction: float, hard_fraction: float,
               confusable: dict[int, list[int]], seed: int) -> pd.DataFrame:
    """Partners for every anchor image ``i`` (an index into ``labels``).

    Each anchor gets ``per_image * pos_fraction`` positives (another image of
    its label) and, of the remaining negatives, a ``hard_fraction`` share of
    hard ones (an image of a class in ``confusable[label]``), the rest uniform
    over the other classes. Fractional counts are rounded up or down at random
    per anchor, so the proportions hold on average even for ``per_image: 2``. No self-pairs. A hard negative falls back to a
    uniform one when its class has no confusable class; a positive is skipped
    when its class has a single image. Returns columns a, b, same, kind.
    """
    if per_image < 1 or not 0 <= pos_fraction <= 1 or not 0 <= hard_fraction <= 1:
        raise ValueError("need per_image >= 1 and fractions in [0, 1]")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    members = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    others = {c: np.flatnonzero(labels != c) for c in members}
    rows: list[tuple[int, int, int, str]] = []
    for a, c in enumerate(labels):
        n_pos = _stochastic_round(per_image * pos_fraction, rng)
        n_hard = _stochastic_round((per_image - n_pos) * hard_fraction, rng)
        n_uni = per_image - n_pos - n_hard
        same = members[c]
        if len(same) > 1:
            # draw from the class without the anchor: no self-pairs
            picks = rng.integers(0, len(same) - 1, size=n_pos)
            picks = same[np.where(picks >= np.searchsorted(same, a), picks + 1, picks)]
            rows.extend((a, int(b), 1, POSITIVE) for b in picks)
        hard_classes = [h for h in confusable.get(int(c), []) if h in members]
        for _ in range(n_hard):
            if hard_classes:
                pool = members[hard_classes[rng.integers(0, len(hard_classes))]]
                rows.append((a, int(pool[rng.integers(0, len(pool))]), 0, HARD_NEGATIVE))
            elif len(others[c]):
                rows.append((a, int(others[c][rng.integers(0, len(others[c]))]), 0, NEGATIVE))
        if len(others[c]):
            rows.extend((a, int(b), 0, NEGATIVE) for b in others[c][rng.integers(0, len(others[c]), size=n_uni)])
    return pd.DataFrame(rows, columns=["a", "b", "same", "kind"])
