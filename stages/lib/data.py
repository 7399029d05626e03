"""Torch datasets over the decode stage's shards, the epoch sampler, label tables and splits
(the transforms are in ``presets``).

Augmentation is seeded per (seed, epoch, sample), not by the worker processes'
RNG: the same epoch draws the same crops whatever the number of workers, and a
resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, DistributedSampler

from stages.lib.imagecache import DecodedImages
from stages.lib.shards import ShardReader, index_rows, read_index
from stages.lib.tables import read_table


class ShardDataset(Dataset):
    """Images of ``keys`` read by random access from the shards.

    Items are ``(uint8 CHW image, label)``; a sampler may pass ``(index, epoch)``
    instead of an index to seed the augmentation of that draw. With ``cache``
    (:class:`~stages.lib.imagecache.DecodedImages` holding every key), images
    come from memory instead: the same pixels, without decoding them again.
    """

    def __init__(self, images_dir: str | Path, keys: Sequence[str], labels: Sequence[int], transform, *,
                 seed: int = 0, index: pd.DataFrame | None = None, cache: DecodedImages | None = None) -> None:
        rows = index_rows(read_index(images_dir) if index is None else index, keys)
        self.locations = rows[["shard", "offset", "length"]].to_numpy(dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = list(keys)
        self.reader = ShardReader(images_dir)
        self.transform = transform
        self.seed = seed
        if cache is not None and any(k not in cache for k in self.keys):
            raise KeyError("the decoded-image cache does not hold every key of the dataset")
        self.cache = cache

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int) -> Image.Image:
        if self.cache is not None:
            return self.cache.image(self.keys[i])
        shard, offset, length = self.locations[i]
        return self.reader.open_image({"shard": shard, "offset": offset, "length": length})

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        rng = random.Random((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
        return self.transform(self.load(i), rng), int(self.labels[i])


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that yields ``(index, epoch)``
    so the dataset can seed each draw's augmentation."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, self.epoch) for i in super().__iter__())


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
