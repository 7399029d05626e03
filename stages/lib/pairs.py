"""Pair mining for the siamese stage: confusable breeds from the naive model's
validation confusion, and seeded positive / negative / hard-negative pairs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from stages.lib.noise import CleanlabFilter, FilterMethod
from stages.lib.params import Section, in_range
from stages.lib.probe import ProbeConfig

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
    per anchor, so the proportions hold on average even for ``per_image: 2``.
    No self-pairs. A hard negative falls back to a uniform one when its class
    has no confusable class; a positive is skipped
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


@dataclass(frozen=True)
class PairsConfig(Section):
    """params.yaml ``pairs``: the out-of-sample scorer, the label filter
    (``stages.lib.noise``), the guards, and the pair mix."""

    scorer: Literal["crossfit", "early", "features"]
    folds: int
    crossfit_epochs: int
    probe: ProbeConfig  # scorer features: the regression on the frozen features
    filter: FilterMethod
    min_prob: float
    filter_by: CleanlabFilter
    relabel_min_prob: float
    min_top_prob: float  # 0: off; else drop an image whose scorer's top breed has a smaller p (noise.NO_BREED)
    min_images_per_class: int
    min_kept_share: float
    per_image: int
    pos_fraction: float
    hard_fraction: float
    confusable_breeds: int
    seed: int

    def __post_init__(self) -> None:
        if self.folds < 2 or self.crossfit_epochs < 1 or self.per_image < 1 or self.confusable_breeds < 0:
            raise ValueError("folds must be >= 2, crossfit_epochs and per_image >= 1, confusable_breeds >= 0")
        if self.min_images_per_class < 1:
            raise ValueError(f"min_images_per_class must be >= 1, got {self.min_images_per_class}")
        for name in ("min_prob", "relabel_min_prob", "min_top_prob", "min_kept_share", "pos_fraction",
                     "hard_fraction"):
            in_range(name, getattr(self, name), 0, 1)

    def noise_settings(self, method: str | None = None) -> dict[str, object]:
        """The keyword arguments of ``noise.clean_labels`` (``method``
        overrides ``filter``: the seed study compares the filters)."""
        return {"method": method or self.filter, "min_prob": self.min_prob, "filter_by": self.filter_by,
                "relabel_min_prob": self.relabel_min_prob, "min_top_prob": self.min_top_prob}


def build_pairs(clean: pd.DataFrame, val_pred: pd.DataFrame, num_classes: int, p: PairsConfig):
    """Pairs among ``clean`` rows, hard negatives from the validation confusion."""
    confusion = confusion_counts(val_pred["label"].to_numpy(), val_pred["pred"].to_numpy(), num_classes)
    confusable = confusable_classes(confusion, p.confusable_breeds)
    idx = make_pairs(clean["label"].to_numpy(), per_image=p.per_image, pos_fraction=p.pos_fraction,
                     hard_fraction=p.hard_fraction, confusable=confusable, seed=p.seed)
    keys = clean["key"].to_numpy()
    pairs = pd.DataFrame({"key_a": keys[idx["a"]], "key_b": keys[idx["b"]], "same": idx["same"], "kind": idx["kind"]})
    return pairs, confusion, confusable
