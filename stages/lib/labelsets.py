"""The label sets a naive-recipe model can be trained on, read one way for the
pipeline's reference models and for the seed study.

* ``raw``: each training image's top-clicked breed, no thresholds
  (``filter_clicks``' ``raw_labels.tsv``): the paper's baseline, *naive
  training on the clicks*;
* ``naive``: the click filter's labels (``filter_clicks``' ``labels.tsv``):
  what the naive model trains on (only its linear probe is a reference: the
  naive recipe on them is the naive model itself);
* ``truth``: the true breeds of ``truth.tsv`` (the generated sample only; a
  real Clickture release has none): the ceiling.

Every set is restricted to the model's classes (``classes.json``) and to the
decoded training images, so all of them are trained and scored alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stages.lib import layout
from stages.lib.classifier import (
    ModelAtChanceError,
    ModelConfig,
    TrainConfig,
    chance_check,
    extract_features,
    initial_model,
    run_context,
)
from stages.lib.data import load_labels, split_train_val
from stages.lib.imagecache import DecodedImages
from stages.lib.params import Section
from stages.lib.probe import ProbeConfig, fit_probe
from stages.lib.tables import read_truth
from stages.lib.tracking import save_model

NAMES = ("raw", "naive", "truth")
PROBE = "probe_"  # probe_<label set>: a linear probe on that label set


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
    elif name == "naive":
        df = load_labels(filtered_dir / layout.LABELS)
    else:
        raise ValueError(f"unknown label set {name!r}: choose from {NAMES}")
    position = {c: i for i, c in enumerate(classes)}
    df = df[df["breed"].isin(position) & df["key"].isin(train_keys)]
    return df.assign(label=df["breed"].map(position))[["key", "label", "breed"]].reset_index(drop=True)


def train_keys(index: pd.DataFrame) -> set[str]:
    """Keys of the decoded training images."""
    return set(index.loc[index["split"] == "train", "key"])


def train_probes(probes: dict[str, pd.DataFrame], out_dir: Path, images_dir: Path, classes: list[str],
                 model_cfg: ModelConfig, train_cfg: TrainConfig, probe_cfg: ProbeConfig, index: pd.DataFrame,
                 cache: DecodedImages | None) -> dict[str, dict[str, Any]]:
    """Fit a linear probe on each label set of ``probes`` (``probe_<set>`` ->
    key, label) and save it to ``out_dir/<name>/model.pt``; their report
    entries (train_references' probe references; scripts/photo_study.py's
    probe of the label filter's kept set).

    One feature pass of the initial trunk over every image of the sets; each
    probe is fitted on the training split that the naive references train on
    (``train.val_fraction``, ``train.seed``) and checked above chance on its
    validation split, as they are."""
    start = time.time()
    model = initial_model(model_cfg, len(classes))
    keys = pd.DataFrame({"key": list(dict.fromkeys(k for labels in probes.values() for k in labels["key"]))})
    features = extract_features(model, keys, images_dir, image_size=model_cfg.image_size,
                                batch_size=train_cfg.batch_size, device=train_cfg.device, workers=train_cfg.workers,
                                index=index, cache=cache)
    features_s = round(time.time() - start, 1)
    row = pd.Series(range(len(keys)), index=keys["key"])
    device = run_context(train_cfg.device, "fp32").device.type
    out = {}
    for name, labels in probes.items():
        start = time.time()
        train, val = split_train_val(labels, train_cfg.val_fraction, train_cfg.seed)
        probe = fit_probe(features[row[train["key"]].to_numpy()], train["label"], len(classes), probe_cfg)
        val_pred = probe.probs(features[row[val["key"]].to_numpy()]).argmax(1)
        val_acc = float((val_pred == val["label"].to_numpy()).mean()) if len(val) else float("nan")
        above, bar = chance_check(val_acc, len(val), len(classes))
        if not above:
            raise ModelAtChanceError(
                f"reference {name}: validation top-1 {val_acc:.3f} on {len(val)} images is at chance (1/"
                f"{len(classes)} classes; above chance needs > {bar:.3f}): the frozen features of model.weights "
                f"{model_cfg.weights!r} do not tell the breeds apart. Check that the weights fit model.backbone "
                f"({model_cfg.backbone}) and model.image_size ({model_cfg.image_size}), or change reference.probe.C "
                f"({probe_cfg.C}).")
        info = {"images": len(train) + len(val), "train_images": len(train), "val_images": len(val),
                "val_acc": round(val_acc, 4), "above_chance": above, "device": device, "precision": "fp32",
                "C": probe_cfg.C, "lbfgs_iterations": probe.n_iter, "converged": probe.converged}
        save_model(out_dir / name / layout.MODEL, probe.into(model), backbone=model_cfg.backbone,
                   image_size=model_cfg.image_size, classes=classes, labels=name.removeprefix(PROBE),
                   kind="linear_probe", **info)
        out[name] = {**info, "features_s": features_s, "seconds": round(time.time() - start, 1)}
    return out


# ------------------------------------------------------------------ params
@dataclass(frozen=True)
class ReferenceConfig(Section):
    """params.yaml ``reference``: which reference models to train (``raw``,
    ``truth``: the naive recipe on that label set; ``probe_raw``,
    ``probe_naive``, ``probe_truth``: a linear probe on it) and the probes'
    regression."""

    labels: tuple[layout.ReferenceName, ...]
    probe: ProbeConfig

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {list(self.labels)}")
