"""Small data the tests make themselves: a decoded-image folder (shards +
index) of solid-colour-plus-noise images, one colour per class, the label
files the training stages read (written by the stages' own writer), test
images with detail, ``sh`` for the tests that drive git and dvc, and ``load_script`` for the
tests of scripts/."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages.lib import layout
from stages.lib.shards import IndexWriter, ShardWriter
from stages.lib.tables import write_table

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is no package: the scripts run as files)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 210, 40)]


def gradient_image(width: int, height: int, seed: int = 0, *, ripple: bool = False) -> Image.Image:
    """Smooth colour gradients (bilinear resampling differences stay small); ``ripple`` adds a ripple
    of period ~19 pixels: detail, so a misplaced sample shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 200 / width, y * 200 / height, (x + y) * 100 / (width + height)], axis=-1)
    base = base + rng.uniform(0, 40, 3)
    if ripple:
        base += 20 * np.sin(x / 3.0)[..., None]
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def sh(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` in ``cwd`` (git with an identity, DVC without analytics); its stdout and stderr. A
    failure fails the test with the output's tail."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def tiny_image(label: int, rng: np.random.Generator, size: int = 32) -> bytes:
    base = np.array(COLOURS[label], dtype=np.float32)
    arr = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_images(images_dir: Path, rows: list[tuple[str, str, int]], seed: int = 0) -> None:
    """rows: (key, split, label) -> shards + index.parquet in ``images_dir``."""
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with ShardWriter(images_dir, 1 << 20) as shards, IndexWriter(images_dir / layout.INDEX) as index:
        for key, split, label in rows:
            data = tiny_image(label, rng)
            shard, offset = shards.write(data)
            index.add(key, split, shard, offset, len(data), 32, 32)


def run_train_naive(workdir: Path, out: str = "models/naive") -> None:
    """The train_naive stage, in-process, in ``workdir`` (which holds params.yaml and data/)."""
    from stages import train_naive

    old = Path.cwd()
    os.chdir(workdir)
    try:
        train_naive.main(["data/filtered", "data/images", out])
    finally:
        os.chdir(old)


@pytest.fixture
def tiny_pipeline(tmp_path: Path) -> Path:
    """A work tree with data/images, data/filtered and a params.yaml for
    fast training (3 classes, 20 training images each)."""
    classes = ["red dog", "green dog", "blue dog"]
    rows = [(f"k{c}_{i}", "train", c) for c in range(3) for i in range(20)]
    rows += [(f"t{c}_{i}", "test", c) for c in range(3) for i in range(5)]
    write_images(tmp_path / "data" / "images", rows)
    filtered = tmp_path / "data" / "filtered"
    filtered.mkdir(parents=True)
    train = pd.DataFrame([(k, lab, classes[lab], 3, 1.0) for k, s, lab in rows if s == "train"],
                         columns=["key", "label", "breed", "clicks", "share"])
    write_table(train, filtered / layout.LABELS)
    write_table(train, filtered / layout.RAW_LABELS)
    (filtered / layout.CLASSES).write_text(json.dumps(classes))
    params = {
        "cache": {"max_mb": 64},
        "model": {"backbone": "resnet18", "weights": "none", "image_size": 32},
        "train": {"device": "cpu", "precision": "fp32", "epochs": 4, "batch_size": 16, "optimizer": "sgd",
                  "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005, "warmup_epochs": 1, "label_smoothing": 0.1,
                  "clip_grad_norm": 5.0, "trunk_lr_scale": 1.0, "batchnorm": "train", "ema_half_life": 0.0,
                  "val_fraction": 0.2, "early_epoch": 2, "workers": 0, "seed": 0,
                  "parallel_runs": 1, "head_init": "random", "probe": {"C": 1.0, "max_iter": 500},
                  "augment": {"scale_min": 0.6, "hflip": True, "brightness": 0.1, "contrast": 0.1, "where": "auto"}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


@pytest.fixture(autouse=True)
def _restore_pillow_pixel_limit():
    """decode and predict set Pillow's process-wide pixel limit from their
    params, as a stage process should; in-process tests must not leak it."""
    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit
