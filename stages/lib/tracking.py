"""What the training stages write besides checkpoints: dvclive curves, model
files, and the input fingerprint that decides whether a checkpoint resumes."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stages.lib.atomic import atomic_file, sha256_file
from stages.lib.deps import ROOT, stage_files
from stages.lib.models import Classifier, model_file


def file_digest(*paths: Path) -> str:
    """Fingerprint of the inputs: a checkpoint made from other data is not resumed."""
    return sha256_file(*paths)[:16]


def stage_code_digest(module: str) -> str:
    """Fingerprint of the code a stage runs: ``module`` and every ``stages.*``
    module it imports, transitively (the files its ``dvc.yaml`` deps list). DVC
    re-runs a stage when any of them changes, and the persisted checkpoint of
    the old code must not be resumed (it could hold a finished run of a
    since-fixed loop)."""
    return file_digest(*(ROOT / f for f in stage_files(module)))


# settings that cannot change a run's result: a checkpoint stays resumable across them
NOT_IN_FINGERPRINT = ("workers",)


def run_fingerprint(stage: str, *, data: str, resolved: dict[str, str], world_size: int,
                    **sections: Any) -> dict[str, Any]:
    """What decides whether a persisted checkpoint may resume: exactly what
    changes the result. The params sections (``sections``: name -> dataclass
    with ``as_dict``) less :data:`NOT_IN_FINGERPRINT`, the input data digest,
    the stage's code (:func:`stage_code_digest`), the device and precision
    they resolve to on this machine (``precision: auto`` differs between CPUs)
    and the number of processes (it changes the batches and the schedule)."""
    params = {name: {k: v for k, v in cfg.as_dict().items() if k not in NOT_IN_FINGERPRINT}
              for name, cfg in sections.items()}
    return {**params, "data": data, "code": stage_code_digest(stage), "resolved": dict(resolved),
            "world_size": int(world_size)}


def save_model(path: Path, model: Classifier, *, backbone: str, image_size: int, classes: list[str],
               **extra: Any) -> None:
    """Atomically write the model file (see ``stages.lib.models.model_file``)."""
    state = model_file(model, backbone=backbone, classes=classes, image_size=image_size, extra=extra)
    with atomic_file(path, "wb") as f:
        torch.save(state, f)


# per-epoch diagnostics: plotted, but kept out of live/metrics.json, whose values
# `dvc exp show` and `dvc metrics diff` compare: these differ on every run (timings)
# or say nothing about the model (the last epoch's learning rate is 0)
NOT_IN_SUMMARY = ("train/images_per_s", "train/data_wait_s", "epoch_s", "train/lr")


class EpochLogger:
    """Per-epoch dvclive logging (rank 0), plus an optional model snapshot
    after epoch ``snapshot_epoch`` (1-based) through ``snapshot(model)``."""

    def __init__(self, live_dir: Path, *, snapshot_epoch: int = 0,
                 snapshot: Callable[[Classifier], None] | None = None) -> None:
        from dvclive import Live

        self.live = Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        self.snapshot_epoch, self.snapshot = snapshot_epoch, snapshot

    def __call__(self, epoch: int, metrics: dict[str, float], model: Classifier | None) -> None:
        for name, value in metrics.items():
            if name.startswith(("train_", "val_")):
                name = name.replace("_", "/", 1)  # train_loss -> train/loss: dvclive nests on "/"
            self.live.log_metric(name, value)
        for name in NOT_IN_SUMMARY:  # dvclive documents Live.summary as open to changes
            *parents, leaf = name.split("/")
            node = self.live.summary
            for part in parents:
                node = node.get(part, {})
            node.pop(leaf, None)
        self.live.next_step()  # writes the summary
        if model is not None and self.snapshot is not None and epoch + 1 == self.snapshot_epoch:
            self.snapshot(model)

    def end(self) -> None:
        self.live.end()
