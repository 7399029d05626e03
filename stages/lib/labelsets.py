"""The label sets a naive-recipe model can be trained on, read one way for the
pipeline's reference models and for the seed study.

* ``raw``: each training image's top-clicked breed, no thresholds
  (``filter_clicks``' ``raw_labels.tsv``): the paper's baseline, *naive
  training on the clicks*;
* ``truth``: the true breeds of ``truth.tsv`` (the generated sample only; a
  real Clickture release has none): the ceiling.

Every set is restricted to the model's classes (``classes.json``) and to the
decoded training images, so all of them are trained and scored alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stages.lib import layout
from stages.lib.data import load_labels
from stages.lib.params import Section
from stages.lib.probe import ProbeConfig
from stages.lib.tables import read_truth

NAMES = ("raw", "truth")


def label_set(name: str, *, raw_dir: Path, filtered_dir: Path, classes: list[str],
              train_keys: set[str]) -> pd.DataFrame | None:
    """(key, label, breed) of label set ``name``; None for ``truth`` when the
    data has no ``truth.tsv``. Rows whose breed is not a class (a
    ``distractor`` in truth.tsv, label -1 in raw_labels.tsv) are left out."""
    if name == "truth":
        path = raw_dir / layout.TRUTH
        if not path.is_file():
            return None
        df = read_truth(path).reset_index()
    elif name == "raw":
        df = load_labels(filtered_dir / layout.RAW_LABELS)
    else:
        raise ValueError(f"unknown label set {name!r}: choose from {NAMES}")
    position = {c: i for i, c in enumerate(classes)}
    df = df[df["breed"].isin(position) & df["key"].isin(train_keys)]
    return df.assign(label=df["breed"].map(position))[["key", "label", "breed"]].reset_index(drop=True)


def train_keys(index: pd.DataFrame) -> set[str]:
    """Keys of the decoded training images."""
    return set(index.loc[index["split"] == "train", "key"])


# ------------------------------------------------------------------ params
@dataclass(frozen=True)
class ReferenceConfig(Section):
    """params.yaml ``reference``: which reference models to train (``raw``,
    ``truth``: the naive recipe on that label set; ``probe_raw``,
    ``probe_truth``: a linear probe on it) and the probes' regression."""

    labels: tuple[layout.ReferenceName, ...]
    probe: ProbeConfig

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {list(self.labels)}")
