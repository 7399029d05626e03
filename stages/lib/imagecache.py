"""Decoded images held in memory, when they fit: decode once per stage, not
once per epoch.

A stage that trains for 15 epochs over 4,000 images decodes each JPEG 15
times from the shards; on the sample (64-96 px, ~100 MB of pixels) the
decoding costs about a third of the training step on 2 cores. Holding the
decoded pixels is what FFCV and DALI's caches do for the same reason. The
pixels sit in one uint8 buffer: DataLoader workers started by fork share it
without copying (one object, so reference counts do not touch its pages).

The images are those :class:`~stages.lib.shards.ShardReader` decodes, so a
model trained from the cache is the model trained from the shards, bit for
bit. Above ``cache.max_mb`` (the real data: millions of images) the cache is
off and the loaders read the shards as before.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.lib.params import Section
from stages.lib.shards import ShardReader, index_rows

log = logging.getLogger("imagecache")


@dataclass(frozen=True)
class CacheConfig(Section):
    """params.yaml ``cache``."""

    max_mb: int  # decoded pixels held in memory up to this size; 0: never

    def __post_init__(self) -> None:
        if self.max_mb < 0:
            raise ValueError(f"max_mb must be >= 0 (0 turns the cache off), got {self.max_mb}")


class DecodedImages:
    """RGB pixels of a set of keys in one buffer; ``image(key)`` as a PIL image."""

    def __init__(self, pixels: np.ndarray, slots: dict[str, tuple[int, int, int]]) -> None:
        self.pixels = pixels  # uint8, every image's HWC bytes one after another
        self.slots = slots  # key -> (offset, height, width)

    @classmethod
    def decode(cls, images_dir: str | Path, index: pd.DataFrame, keys: Iterable[str]) -> DecodedImages:
        return cls.from_rows(images_dir, _rows(index, keys))

    @classmethod
    def from_rows(cls, images_dir: str | Path, rows: pd.DataFrame) -> DecodedImages:
        """Decode the images of index ``rows`` (indexed by key, distinct)."""
        offsets = np.concatenate([[0], np.cumsum(_sizes(rows))])
        pixels = np.empty(int(offsets[-1]), dtype=np.uint8)
        slots = {}
        with ShardReader(images_dir) as reader:
            for i, row in enumerate(rows.itertuples()):
                a = np.asarray(reader.open_image(row))
                if a.shape != (row.height, row.width, 3):
                    raise ValueError(f"{images_dir}: image {row.Index!r} decodes to {a.shape[1]}x{a.shape[0]}, "
                                     f"the index says {row.width}x{row.height}: index and shards disagree")
                pixels[offsets[i]:offsets[i + 1]] = a.reshape(-1)
                slots[row.Index] = (int(offsets[i]), int(row.height), int(row.width))
        return cls(pixels, slots)

    def __contains__(self, key: str) -> bool:
        return key in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def image(self, key: str) -> Image.Image:
        offset, height, width = self.slots[key]
        # fromarray copies (Pillow keeps RGB as 4 bytes a pixel): the buffer is never written
        return Image.fromarray(self.pixels[offset:offset + height * width * 3].reshape(height, width, 3), "RGB")


def _rows(index: pd.DataFrame, keys: Iterable[str]) -> pd.DataFrame:
    """Index rows of the distinct ``keys``, in first-seen order."""
    return index_rows(index, list(dict.fromkeys(keys)))


def _sizes(rows: pd.DataFrame) -> np.ndarray:
    """Bytes of each row's decoded RGB pixels (from the index's sizes)."""
    return rows["width"].to_numpy(np.int64) * rows["height"].to_numpy(np.int64) * 3


def decoded_bytes(index: pd.DataFrame, keys: Iterable[str]) -> int:
    """Bytes the decoded RGB pixels of ``keys`` take."""
    return int(_sizes(_rows(index, keys)).sum())


def hold_decoded(images_dir: str | Path, index: pd.DataFrame, keys: Iterable[str],
                 cfg: CacheConfig) -> DecodedImages | None:
    """The decoded images of ``keys`` when they fit in ``cache.max_mb``, else
    None (the loaders then decode from the shards every epoch)."""
    rows = _rows(index, keys)
    size = int(_sizes(rows).sum())
    if size > cfg.max_mb * 2**20:
        log.info("not holding %d decoded images in memory: %.0f MB > cache.max_mb %d", len(rows), size / 2**20,
                 cfg.max_mb)
        return None
    start = time.perf_counter()
    cache = DecodedImages.from_rows(images_dir, rows)
    log.info("holding %d decoded images in memory (%.0f MB, decoded in %.1f s)", len(cache), cache.nbytes / 2**20,
             time.perf_counter() - start)
    return cache
