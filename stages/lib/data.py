"""Torch datasets over the decode stage's shards, the epoch and breed-batch samplers, label tables and splits
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


class BreedBatchSampler:
    """Batches of P breeds x K images (``per_breed`` = K, P = ``batch_images`` / K),
    for a loss that forms its pairs inside the batch: every batch holds K
    images of each of its breeds, so each image has K - 1 positives there.

    A batch's breeds are drawn without replacement with probability
    proportional to their images (batches see the breeds as the data does), or
    to ``breed_weights`` (one per label value: how often each breed should be
    seen, whatever its number of images here);
    each breed's images come from its own shuffled queue, refilled when it
    runs out, so an epoch draws every image about equally often. ``batches``
    counts the batches of an epoch over all ranks (each rank takes every
    ``num_replicas``-th). Seeded per (seed, epoch) like :class:`EpochSampler`,
    and yields ``(index, draw)`` items so that each draw's augmentation is
    seeded too (a resumed run sees the batches of an uninterrupted one).

    Not pytorch-metric-learning's ``MPerClassSampler``: it draws from the
    global NumPy RNG and has neither ``set_epoch`` nor rank sharding.
    """

    def __init__(self, labels: Sequence[int], *, batch_images: int, per_breed: int, batches: int, seed: int,
                 indices: Sequence[int] | None = None, num_replicas: int = 1, rank: int = 0,
                 breed_weights: Sequence[float] | None = None) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        indices = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        if per_breed < 2 or batch_images % per_breed:
            raise ValueError(f"images per breed must be >= 2 and divide the {batch_images} images of a batch, "
                             f"got {per_breed}")
        self.breeds, counts = np.unique(labels[indices], return_counts=True)
        self.per_batch = batch_images // per_breed
        if self.per_batch > len(self.breeds):
            raise ValueError(f"a batch of {batch_images} images at {per_breed} per breed needs {self.per_batch} "
                             f"breeds; the images have {len(self.breeds)}: raise the images per breed")
        if batches < num_replicas:
            raise ValueError(f"{batches} batches per epoch cannot be shared by {num_replicas} ranks")
        self.members = {int(b): indices[labels[indices] == b] for b in self.breeds}
        if breed_weights is not None:
            breed_weights = np.asarray(breed_weights, dtype=np.float64)
            if len(breed_weights) <= self.breeds.max() or not (breed_weights[self.breeds] > 0).all():
                raise ValueError(f"breed weights must be > 0 for every breed of the images (labels "
                                 f"{self.breeds.tolist()}), got {breed_weights.tolist()}")
            counts = breed_weights[self.breeds]
        self.weights = counts / counts.sum()
        self.per_breed, self.batch_images, self.seed = per_breed, batch_images, seed
        self.rank, self.num_replicas = rank, num_replicas
        self.batches = batches // num_replicas * num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches // self.num_replicas

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues: dict[int, list[int]] = {b: [] for b in self.members}
        for n in range(self.batches):  # every rank draws every batch, so all agree on them
            breeds = rng.choice(self.breeds, size=self.per_batch, replace=False, p=self.weights)
            batch = []
            for b in breeds.tolist():
                for _ in range(self.per_breed):
                    if not queues[b]:
                        queues[b] = rng.permutation(self.members[b]).tolist()
                    batch.append(queues[b].pop())
            if n % self.num_replicas == self.rank:
                first = (self.epoch * self.batches + n) * self.batch_images  # a distinct draw per image
                yield [(i, first + j) for j, i in enumerate(batch)]


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
