"""Independent runs side by side (train.parallel_runs): the same result as one
after another with the same torch threads, and errors that reach the caller."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages.lib.classifier import ModelConfig, TrainConfig
from stages.lib.data import load_labels
from stages.lib.parallel import map_runs
from stages.lib.scoring import score_crossfit
from stages.lib.shards import read_index


def _fail(x: int) -> int:
    if x == 2:
        raise ValueError(f"run {x} failed")
    return x * 10


def test_runs_come_back_in_order_and_an_error_reaches_the_caller() -> None:
    assert map_runs(_fail, [(1,), (3,), (4,)], parallel_runs=2) == [10, 30, 40]
    with pytest.raises(ValueError, match="run 2 failed"):
        map_runs(_fail, [(1,), (2,), (3,)], parallel_runs=3)


def test_cross_fitting_side_by_side_equals_one_fold_after_another(tiny_pipeline: Path) -> None:
    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    model_cfg = ModelConfig.from_params(params["model"], "model")
    train_cfg = TrainConfig.from_params({**params["train"], "epochs": 2}, "train")
    labels = load_labels(tiny_pipeline / "data/filtered/labels.tsv")
    images = tiny_pipeline / "data/images"
    kwargs = dict(folds=3, epochs=2, seed=0, images=images, index=read_index(images), num_classes=3,
                  model_cfg=model_cfg)
    threads = torch.get_num_threads()
    try:  # one thread for each run either way, whatever this machine's core count
        torch.set_num_threads(1)
        one_by_one = score_crossfit(labels, train_cfg=train_cfg.replace(parallel_runs=1), **kwargs)
        torch.set_num_threads(2)  # 2 runs side by side: each spawned run gets 2 // 2 = 1 thread
        side_by_side = score_crossfit(labels, train_cfg=train_cfg.replace(parallel_runs=2), **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert side_by_side.shape == (60, 3) and not np.isnan(side_by_side).any()
    assert np.array_equal(one_by_one, side_by_side)
