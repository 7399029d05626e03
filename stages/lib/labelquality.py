"""Label quality against the sample's ``truth.tsv``: precision, recall and
coverage of click labels, for filter_clicks' report and its threshold sweep."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stages.lib.weaklabels import WeakLabels, apply_thresholds, check_inputs, check_thresholds, image_evidence

DISTRACTOR = "distractor"  # truth.tsv's name for a non-dog image


def _ratio(num: float, den: float) -> float | None:
    """num / den rounded for the report; None (JSON null) when undefined."""
    return round(float(num) / float(den), 4) if den else None


def _truth_codes(evidence: pd.DataFrame, truth: pd.Series, breeds: Sequence[str]) -> np.ndarray:
    """Per evidence row: the true breed's code, -1 distractor, -2 no truth entry,
    -3 a true breed outside the vocabulary."""
    pos = pc.index_in(pa.array(evidence["key"], pa.string()),
                      value_set=pa.array(truth.index, pa.string())).to_numpy(zero_copy_only=False)
    code_of = {b: i for i, b in enumerate(breeds)}
    names = truth.astype(str).to_numpy(dtype=object)
    codes = np.array([code_of.get(b, -1 if b == DISTRACTOR else -3) for b in names] + [-2], np.int64)
    return codes[np.where(np.isnan(pos), -1, np.nan_to_num(pos)).astype(np.int64)]


def _quality(evidence: pd.DataFrame, true: np.ndarray) -> dict[str, dict[str, float | int | None]]:
    breed = evidence["breed"].to_numpy()
    decoded = evidence["decoded"].to_numpy()
    has_truth = true != -2
    correct = (breed >= 0) & (breed == true)
    raw = decoded & (breed >= 0)
    correctly_clicked = raw & correct  # a real dog whose top click is its breed
    dogs = int((decoded & (true >= 0)).sum())
    out = {}
    for name, sel in (("raw", raw), ("filtered", (evidence["reason"] == "").to_numpy())):
        n, n_correct = int((sel & has_truth).sum()), int((sel & correct).sum())
        out[name] = {"labelled": n, "correct": n_correct, "distractors": int((sel & (true == -1)).sum()),
                     "precision": _ratio(n_correct, n),
                     "recall": _ratio((sel & correctly_clicked).sum(), correctly_clicked.sum()),
                     "coverage": _ratio(n_correct, dogs)}
    return out


def label_quality(weak: WeakLabels, truth: pd.Series) -> dict[str, dict[str, float | int | None]]:
    """Precision, recall and coverage of the raw (``"raw"``) and the kept
    (``"filtered"``) labels, given ``truth``: the true breed per key
    ("distractor" for a non-dog image). Over decoded training images:

    * precision = share of the labelled images with a truth entry whose label
      is the true breed;
    * recall = among the *correctly clicked* images (raw click label == true
      breed: a dog whose top-clicked breed is right), the share that keeps its
      label; 1.0 for the raw labels by definition, lower when the filter
      throws correct evidence away;
    * coverage = correctly labelled images / decoded training images whose
      true breed is in the vocabulary (the clean data the labels reach).

    Also ``labelled``, ``correct`` and ``distractors`` (labelled non-dogs).
    Ratios are None when undefined.
    """
    return _quality(weak.evidence, _truth_codes(weak.evidence, truth, weak.per_class["breed"].tolist()))


def table_quality(kept: pd.DataFrame, raw: pd.DataFrame, truth: pd.Series) -> dict[str, float | int | None]:
    """:func:`label_quality`'s precision and recall for a label table (key,
    breed) that is not a filter_clicks result, e.g. make_pairs' clean set,
    whose labels may have been changed: precision = share of ``kept`` images
    whose label is the true breed; recall = among correctly clicked images
    (``raw``'s top-clicked breed == true breed), the share that is kept;
    ``distractors``: kept images that are not dogs."""
    kept_true = kept["key"].map(truth)
    correct_raw = set(raw.loc[raw["breed"].to_numpy() == raw["key"].map(truth).to_numpy(), "key"])
    n_correct = int((kept["breed"].to_numpy() == kept_true.to_numpy()).sum())
    n_known = int(kept_true.notna().sum())  # images without a truth entry do not count
    kept_keys = set(kept["key"])
    return {"images": len(kept), "correct": n_correct, "distractors": int((kept_true == DISTRACTOR).sum()),
            "precision": _ratio(n_correct, n_known),
            "recall": _ratio(len(correct_raw & kept_keys), len(correct_raw))}


def sweep_thresholds(
    clicks: pd.DataFrame,
    breeds: Sequence[str],
    truth: pd.Series,
    *,
    train_keys: Iterable[str] | pa.Array | None = None,
    min_clicks_grid: Sequence[int] = (1, 2, 3, 4, 6, 10),
    min_share_grid: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    min_images_per_class: int = 1,
) -> pd.DataFrame:
    """Label quality over a grid of (min_clicks, min_share), evidence built once.

    Returns one row per grid point: min_clicks, min_share, kept, classes,
    precision, recall, coverage (see :func:`label_quality`); the first row is
    the raw labels (min_clicks 0, min_share 0: no filter).
    """
    for mc in min_clicks_grid:
        for ms in min_share_grid:
            check_thresholds(min_clicks=mc, min_share=ms, min_images_per_class=min_images_per_class)
    check_inputs(clicks, breeds)
    ev = image_evidence(clicks, train_keys)
    true = _truth_codes(ev, truth, breeds)
    rows = []
    for mc in min_clicks_grid:
        for ms in min_share_grid:
            weak = apply_thresholds(ev, breeds, mc, ms, min_images_per_class)
            q = _quality(weak.evidence, true)
            if not rows:
                rows.append({"min_clicks": 0, "min_share": 0.0, "kept": len(weak.raw), "classes": len(breeds),
                             **{k: q["raw"][k] for k in ("precision", "recall", "coverage")}})
            rows.append({"min_clicks": mc, "min_share": ms, "kept": len(weak.kept), "classes": len(weak.classes),
                         **{k: q["filtered"][k] for k in ("precision", "recall", "coverage")}})
    return pd.DataFrame(rows)
