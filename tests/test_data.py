"""The training transforms, the shard dataset's seeding, and the model-side
normalisation that lets loaders ship uint8 images."""
from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import gradient_image

from stages.lib.data import BreedBatchSampler, ShardDataset, split_train_val
from stages.lib.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from stages.lib.presets import EvalTransform, TrainTransform, build_transform
from stages.lib.shards import INDEX, IndexWriter, ShardWriter


def test_crop_boxes_follow_random_resized_crop_bounds() -> None:
    t = TrainTransform(32, scale=(0.3, 1.0))
    rng = random.Random(0)
    for width, height in [(80, 60), (64, 64), (50, 120), (300, 20)]:
        for _ in range(200):
            left, top, right, bottom = t.crop_box(width, height, rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            w, h = right - left, bottom - top
            if (w, h) != (width, height) and not (width / height > 4 / 3 or width / height < 3 / 4):
                assert 0.3 * width * height * 0.9 <= w * h <= width * height
                assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_train_transform_is_uint8_chw_and_seeded() -> None:
    t = TrainTransform(32, brightness=0.3, contrast=0.3)
    img = gradient_image(70, 50)
    a, b = t(img, random.Random(7)), t(img, random.Random(7))
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, t(img, random.Random(8)))


def test_jitter_matches_torchvision_brightness_then_contrast() -> None:
    t = TrainTransform(32, brightness=0.4, contrast=0.4)
    a = np.asarray(gradient_image(32, 32, seed=3))
    for seed in range(5):
        rng = random.Random(seed)
        b = rng.uniform(0.6, 1.4)
        c = rng.uniform(0.6, 1.4)
        got = t.jitter(a, b, c)
        x = torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1)
        x = TF.adjust_brightness(x, b)
        x = TF.adjust_contrast(x, c)
        want = (x * 255).permute(1, 2, 0).numpy()
        unsaturated = (a.astype(np.float32) * b < 255).all(axis=-1)  # torchvision clips between the two steps
        assert np.abs(got.astype(np.float32) - want)[unsaturated].max() <= 1.0


def test_no_jitter_keeps_the_resized_crop() -> None:
    img = gradient_image(40, 40)
    t = TrainTransform(40, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    assert np.array_equal(t(img, random.Random(0)).permute(1, 2, 0).numpy(), np.asarray(img))


def test_eval_transform_matches_resize_then_centre_crop() -> None:
    for size, (w, h) in [(32, (48, 64)), (160, (300, 200))]:
        img = gradient_image(w, h)
        got = EvalTransform(size)(img).float()
        resize = size if size < 128 else math.ceil(size / 0.875)
        want = TF.center_crop(TF.pil_to_tensor(TF.resize(img, resize, antialias=True)), [size, size]).float()
        assert got.shape == want.shape == (3, size, size)
        assert (got - want).abs().mean() < 2.0


def test_bad_augment_settings_are_refused() -> None:
    from stages.lib.classifier import AugmentConfig

    ok = {"scale_min": 0.5, "hflip": True, "brightness": 0.2, "contrast": 0.2, "where": "auto"}
    with pytest.raises(ValueError, match="scale_min"):
        AugmentConfig.from_params({**ok, "scale_min": 0}, "train.augment")
    with pytest.raises(ValueError, match="brightness"):
        AugmentConfig.from_params({**ok, "brightness": -0.1}, "train.augment")
    with pytest.raises(ValueError, match="scale_min"):  # the transform checks too, for direct callers
        TrainTransform(32, scale=(0.0, 1.0))
    t = build_transform(32, train=True, augment=AugmentConfig.from_params(ok, "train.augment"))
    assert t.scale == (0.5, 1.0) and t.hflip is True


def test_model_normalises_uint8_like_the_float_pipeline() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = model.head(model.trunk((x.float() / 255 - mean) / std))
        assert torch.allclose(model(x), want, atol=1e-5)
        assert torch.allclose(model(x.float() / 255), want, atol=1e-5)
    assert "mean" not in model.state_dict()  # kept out of checkpoints and weights files


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    with ShardWriter(tmp_path, max_bytes=4000) as writer, IndexWriter(tmp_path / INDEX) as index:
        for i in range(12):
            buf = io.BytesIO()
            gradient_image(40 + i, 36, seed=i).save(buf, format="JPEG", quality=90)
            shard, offset = writer.write(buf.getvalue())
            index.add(f"k{i}", "train", shard, offset, len(buf.getvalue()), 40 + i, 36)
    return tmp_path


def test_shard_dataset_seeds_each_draw_by_seed_epoch_and_index(shards: Path) -> None:
    keys = [f"k{i}" for i in range(12)]
    ds = ShardDataset(shards, keys, list(range(12)), build_transform(24, train=True), seed=3)
    x0, y0 = ds[(5, 0)]
    assert y0 == 5 and x0.shape == (3, 24, 24)
    assert torch.equal(x0, ds[(5, 0)][0])  # the same draw whatever came before
    assert not torch.equal(x0, ds[(5, 1)][0])  # a new epoch draws a new crop
    other = ShardDataset(shards, keys, list(range(12)), build_transform(24, train=True), seed=4)
    assert not torch.equal(x0, other[(5, 0)][0])


def test_shard_dataset_names_missing_keys(shards: Path) -> None:
    with pytest.raises(KeyError, match="no decoded image"):
        ShardDataset(shards, ["k1", "nope"], [0, 1], build_transform(24, train=False))


def test_validation_split_is_seeded_and_disjoint() -> None:
    df = pd.DataFrame({"key": [f"k{i}" for i in range(200)], "label": [i % 4 for i in range(200)]})
    train, val = split_train_val(df, 0.1, seed=0)
    again, _ = split_train_val(df, 0.1, seed=0)
    assert len(val) == 20 and not set(train["key"]) & set(val["key"])
    assert train["key"].tolist() == again["key"].tolist()


def _breed_batches(sampler: BreedBatchSampler, epoch: int) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_breed_batches_hold_k_images_of_p_breeds_and_are_seeded_per_epoch() -> None:
    labels = np.repeat(np.arange(6), [40, 30, 20, 10, 5, 3])
    sampler = BreedBatchSampler(labels, batch_images=16, per_breed=4, batches=20, seed=3)
    batches = _breed_batches(sampler, 0)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        breeds = labels[[i for i, _ in batch]]
        assert len(batch) == 16 and sorted(np.unique(breeds, return_counts=True)[1]) == [4, 4, 4, 4]
    draws = [d for batch in batches for _, d in batch]
    assert len(set(draws)) == len(draws)  # every draw its own augmentation seed
    assert batches == _breed_batches(sampler, 0)  # the same epoch draws the same batches (a resumed run)
    assert batches != _breed_batches(sampler, 1)
    later = {d for batch in _breed_batches(sampler, 1) for _, d in batch}
    assert not later & set(draws)  # and other epochs other seeds


def test_breed_batches_cycle_through_each_breeds_images() -> None:
    """Each breed's images come from a shuffled queue: within a breed, no image is drawn a second
    time before every image of it was drawn once."""
    labels = np.repeat(np.arange(4), 12)
    sampler = BreedBatchSampler(labels, batch_images=8, per_breed=4, batches=30, seed=0)
    seen: dict[int, list[int]] = {b: [] for b in range(4)}
    for batch in _breed_batches(sampler, 0):
        for i, _ in batch:
            seen[int(labels[i])].append(i)
    for breed, drawn in seen.items():
        for start in range(0, len(drawn) - 11, 12):
            assert len(set(drawn[start:start + 12])) == 12, breed


def test_breed_batches_are_shared_between_ranks_and_keep_to_their_indices() -> None:
    labels = np.repeat(np.arange(5), 20)
    indices = np.flatnonzero(np.arange(100) % 10 != 0)  # the validation split stays out
    one = BreedBatchSampler(labels, batch_images=8, per_breed=2, batches=11, seed=1, indices=indices)
    ranks = [BreedBatchSampler(labels, batch_images=8, per_breed=2, batches=11, seed=1, indices=indices,
                               num_replicas=2, rank=r) for r in (0, 1)]
    assert len(one) == 11 and [len(r) for r in ranks] == [5, 5]  # a batch no rank can pair is left out
    single = _breed_batches(BreedBatchSampler(labels, batch_images=8, per_breed=2, batches=10, seed=1,
                                              indices=indices), 2)
    shared = [_breed_batches(r, 2) for r in ranks]
    assert shared[0] == single[0::2] and shared[1] == single[1::2]
    assert {i for batch in _breed_batches(one, 0) for i, _ in batch} <= set(indices.tolist())


def test_breed_batches_draw_breeds_by_their_weights_when_given() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    drawn = {}
    for weights in (None, [1.0, 1.0], [0.5, 4.5]):
        sampler = BreedBatchSampler(labels, batch_images=2, per_breed=2, batches=2000, seed=0, breed_weights=weights)
        drawn[str(weights)] = np.mean([labels[i] == 1 for batch in _breed_batches(sampler, 0) for i, _ in batch])
    assert 0.08 < drawn["None"] < 0.12  # as the images: 10 of 100
    assert 0.45 < drawn["[1.0, 1.0]"] < 0.55 and 0.87 < drawn["[0.5, 4.5]"] < 0.93
    with pytest.raises(ValueError, match="must be > 0 for every breed"):
        BreedBatchSampler(labels, batch_images=2, per_breed=2, batches=5, seed=0, breed_weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="must be > 0 for every breed"):
        BreedBatchSampler(labels, batch_images=2, per_breed=2, batches=5, seed=0, breed_weights=[1.0])


def test_breed_batches_refuse_settings_that_cannot_fill_a_batch() -> None:
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(ValueError, match="needs 4 breeds; the images have 3"):
        BreedBatchSampler(labels, batch_images=16, per_breed=4, batches=5, seed=0)
    with pytest.raises(ValueError, match="divide"):
        BreedBatchSampler(labels, batch_images=16, per_breed=3, batches=5, seed=0)
    with pytest.raises(ValueError, match="shared by 2 ranks"):
        BreedBatchSampler(labels, batch_images=8, per_breed=4, batches=1, seed=0, num_replicas=2)
