"""The decoded-image cache: the same pixels as the shards, the same models,
and off above its size limit."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_train_naive
from PIL import Image

from stages.lib.data import ShardDataset
from stages.lib.imagecache import CacheConfig, DecodedImages, decoded_bytes, hold_decoded
from stages.lib.layout import INDEX
from stages.lib.params import ConfigError
from stages.lib.presets import build_transform
from stages.lib.shards import IndexWriter, ShardReader, ShardWriter, read_index

KEYS = [f"k{i}" for i in range(12)]


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """12 noisy JPEGs of 40..51 x 36 px in 3 shards."""
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path, max_bytes=8000) as writer, IndexWriter(tmp_path / INDEX) as index:
        for i, key in enumerate(KEYS):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (36, 40 + i, 3), dtype=np.uint8)).save(buf, format="JPEG")
            shard, offset = writer.write(buf.getvalue())
            index.add(key, "train", shard, offset, len(buf.getvalue()), 40 + i, 36)
    return tmp_path


def run_stage(workdir: Path, out: str) -> dict[str, torch.Tensor]:
    run_train_naive(workdir, out)
    return torch.load(workdir / out / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def test_cache_holds_the_pixels_the_shards_decode_to(shards: Path) -> None:
    index = read_index(shards)
    cache = DecodedImages.decode(shards, index, KEYS + ["k3"])  # a repeated key is held once
    assert len(cache) == 12 and cache.nbytes == decoded_bytes(index, KEYS) == sum((40 + i) * 36 * 3 for i in range(12))
    with ShardReader(shards) as reader:
        for row in index.itertuples():
            want = np.asarray(reader.open_image(row))
            got = cache.image(row.key)
            assert got.mode == "RGB" and got.size == (row.width, row.height)
            assert np.array_equal(np.asarray(got), want), row.key


def test_dataset_items_from_the_cache_equal_those_from_the_shards(shards: Path) -> None:
    cache = DecodedImages.decode(shards, read_index(shards), KEYS)
    for train in (True, False):
        plain = ShardDataset(shards, KEYS, list(range(12)), build_transform(24, train=train), seed=3)
        cached = ShardDataset(shards, KEYS, list(range(12)), build_transform(24, train=train), seed=3, cache=cache)
        for i in range(12):
            for epoch in (0, 1):
                assert torch.equal(plain[(i, epoch)][0], cached[(i, epoch)][0])


def test_a_cache_without_every_key_is_refused(shards: Path) -> None:
    cache = DecodedImages.decode(shards, read_index(shards), KEYS[:5])
    with pytest.raises(KeyError, match="does not hold every key"):
        ShardDataset(shards, KEYS, list(range(12)), build_transform(24, train=False), cache=cache)
    with pytest.raises(KeyError, match="no decoded image"):
        DecodedImages.decode(shards, read_index(shards), ["k1", "nope"])


def test_cache_is_off_above_its_limit_and_at_zero(shards: Path) -> None:
    index = read_index(shards)
    assert hold_decoded(shards, index, KEYS, CacheConfig(max_mb=1)) is not None  # ~55 KB
    assert hold_decoded(shards, index, KEYS, CacheConfig(max_mb=0)) is None
    with pytest.raises(ConfigError, match=r"cache: max_mb must be >= 0"):
        CacheConfig.from_params({"max_mb": -1}, "cache")


def test_index_and_shards_that_disagree_on_a_size_are_an_error(shards: Path) -> None:
    index = read_index(shards)
    index.loc[index["key"] == "k2", "width"] = 99
    with pytest.raises(ValueError, match="'k2' decodes to 42x36, the index says 99x36"):
        DecodedImages.decode(shards, index, KEYS)


def test_training_from_the_cache_gives_the_model_the_shards_give(tiny_pipeline: Path, caplog) -> None:
    caplog.set_level("INFO")
    cached = run_stage(tiny_pipeline, "models/cached")
    assert "holding 60 decoded images in memory" in caplog.text
    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    (tiny_pipeline / "params.yaml").write_text(yaml.safe_dump({**params, "cache": {"max_mb": 0}}))
    plain = run_stage(tiny_pipeline, "models/shards")
    assert "not holding 60 decoded images" in caplog.text
    assert cached.keys() == plain.keys()
    assert all(torch.equal(cached[k], plain[k]) for k in cached)
