"""Torch datasets over the decode stage's shards, transforms, and splits.

Augmentation is seeded per (seed, epoch, sample), not by the worker processes'
RNG: the same epoch draws the same crops whatever the number of workers, and a
resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms import v2 as T

from stages.lib.shards import ShardReader, read_index


def build_transform(image_size: int, mean: Sequence[float], std: Sequence[float], *,
                    train: bool, augment: dict[str, Any] | None = None) -> T.Compose:
    """Train: random resized crop, flip, brightness/contrast; eval: resize + centre crop."""
    tail = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    if not train:
        resize = image_size if image_size < 128 else int(math.ceil(image_size / 0.875))
        return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(image_size), *tail])
    augment = augment or {}
    ops: list[Any] = [T.RandomResizedCrop(image_size, scale=(augment.get("scale_min", 0.5), 1.0), antialias=True)]
    if augment.get("hflip", True):
        ops.append(T.RandomHorizontalFlip())
    if augment.get("brightness", 0) or augment.get("contrast", 0):
        ops.append(T.ColorJitter(brightness=augment.get("brightness", 0), contrast=augment.get("contrast", 0)))
    return T.Compose([*ops, *tail])


class ShardDataset(Dataset):
    """Images of ``keys`` read by random access from the shards.

    Items are ``(image_tensor, label)``; a sampler may pass ``(index, epoch)``
    instead of an index to seed the augmentation of that draw.
    """

    def __init__(self, images_dir: str | Path, keys: Sequence[str], labels: Sequence[int], transform, *,
                 seed: int = 0, index: pd.DataFrame | None = None) -> None:
        index = read_index(images_dir) if index is None else index
        rows = index.drop_duplicates("key").set_index("key")
        missing = [k for k in keys if k not in rows.index]
        if missing:
            raise KeyError(f"{len(missing)} keys have no decoded image, e.g. {missing[:3]}")
        rows = rows.loc[list(keys)]
        self.locations = rows[["shard", "offset", "length"]].to_numpy(dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = list(keys)
        self.reader = ShardReader(images_dir)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int) -> Image.Image:
        shard, offset, length = self.locations[i]
        return self.reader.open_image({"shard": shard, "offset": offset, "length": length})

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        img = self.load(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            x = self.transform(img)
        return x, int(self.labels[i])


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that yields ``(index, epoch)``
    so the dataset can seed each draw's augmentation."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, self.epoch) for i in super().__iter__())


def read_table(path: str | Path) -> pd.DataFrame:
    """A TSV table written by a stage (header line, no quoting); keys stay
    strings, and a key such as "NA" stays a key rather than a missing value."""
    return pd.read_csv(path, sep="\t", dtype={"key": str, "key_a": str, "key_b": str}, keep_default_na=False)


def load_labels(path: str | Path) -> pd.DataFrame:
    """A labels table (key, label, ...) as written by filter_clicks / make_pairs."""
    df = read_table(path)
    if not {"key", "label"} <= set(df.columns):
        raise ValueError(f"{path}: needs columns key and label, has {list(df.columns)}")
    return df


def split_train_val(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified validation split carved from the *training* labels; the test
    set is never used for model selection."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    counts = df["label"].value_counts()
    stratify = df["label"] if counts.min() >= 2 else None
    train, val = train_test_split(df, test_size=val_fraction, random_state=seed, stratify=stratify)
    return train.sort_index(), val.sort_index()
