"""Augmentation on the training device (``augment.where: device``): the same draws
as the Pillow path, pixels within rounding of it, and batches that do not
depend on the loader's workers."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import gradient_image
from PIL import Image

from stages.lib import batchaug, engine
from stages.lib.data import ShardDataset
from stages.lib.presets import DeviceTrainTransform, TrainTransform, augment_on_device, build_transform
from stages.lib.shards import INDEX, IndexWriter, ShardWriter


def _image(width: int, height: int, seed: int) -> Image.Image:
    return gradient_image(width, height, seed, ripple=True)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    """Independent pixels: the worst case for comparing resampling filters."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _both_paths(size: int, dims: list[tuple[int, int]], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    pillow, device = TrainTransform(size, **kwargs), DeviceTrainTransform(size, **kwargs)
    images = [_image(*dims[i % len(dims)], seed=i) for i in range(24)]
    want = torch.stack([pillow(img, random.Random(i)) for i, img in enumerate(images)])
    raw = batchaug.collate([device(img, random.Random(i)) for i, img in enumerate(images)])
    return raw.augment(torch.device("cpu")), want


@pytest.mark.parametrize(("size", "dims", "mean_diff"), [
    (64, [(64, 80), (96, 72), (70, 90)], 0.3),  # the sample: crops enlarged
    (224, [(64, 80), (96, 96)], 0.3),  # ResNet-50's input from thumbnails
    (64, [(300, 240), (200, 260)], 0.8),  # crops shrunk: a box filter where Pillow has a triangle
])
@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_device_path_matches_the_pillow_path(size, dims, mean_diff, jitter) -> None:
    got, want = _both_paths(size, dims, brightness=jitter, contrast=jitter)
    assert got.dtype == torch.uint8 and got.shape == want.shape == (24, 3, size, size)
    assert got.is_contiguous(memory_format=torch.channels_last)
    diff = (got.float() - want.float()).abs()
    # a flip, crop or jitter applied to the wrong image or mirrored would be tens of levels off
    assert diff.mean() < mean_diff and diff.max() <= 3


@pytest.mark.parametrize(("size", "dims", "mean_diff"), [
    (224, [(64, 80), (96, 96)], 0.3),  # enlarged: bilinear either way, even on noise
    (224, [(256, 340), (384, 256)], 5.0),  # shrunk: box-averaged samples against Pillow's wider triangle
])
def test_on_pixel_noise_the_device_path_differs_only_where_it_shrinks(size, dims, mean_diff) -> None:
    pillow, device = TrainTransform(size), DeviceTrainTransform(size)
    images = [_noise(*dims[i % len(dims)], seed=i) for i in range(16)]
    want = torch.stack([pillow(img, random.Random(i)) for i, img in enumerate(images)]).float()
    got = batchaug.collate([device(img, random.Random(i)) for i, img in enumerate(images)])
    assert (got.augment(torch.device("cpu")).float() - want).abs().mean() < mean_diff


def test_device_transform_draws_what_the_pillow_transform_draws() -> None:
    pillow = TrainTransform(48, brightness=0.2, contrast=0.1)
    device = DeviceTrainTransform(48, brightness=0.2, contrast=0.1)
    for seed in range(20):
        img = _image(70, 50, seed)
        raw = device(img, random.Random(seed))
        (left, top, right, bottom), flip, b, c = pillow.draw(70, 50, random.Random(seed))
        assert raw.params[4:].tolist() == [float(flip), b, c] and raw.size == 48
        # the crop with a one-pixel margin where the image has one, the box in its coordinates
        x0, y0 = max(0, left - 1), max(0, top - 1)
        assert raw.params[:4].tolist() == [left - x0, top - y0, right - x0, bottom - y0]
        assert np.array_equal(raw.pixels, np.asarray(img)[y0:min(50, bottom + 1), x0:min(70, right + 1)])


def test_cropping_in_the_loader_gives_the_pixels_of_the_whole_image() -> None:
    device = DeviceTrainTransform(40, brightness=0.2, contrast=0.2)
    images = [_noise(90 + 7 * i, 60 + 5 * i, seed=i) for i in range(12)]
    cropped = [device(img, random.Random(i)) for i, img in enumerate(images)]
    whole = []
    for i, img in enumerate(images):  # the same draws on the uncropped image
        (left, top, right, bottom), flip, b, c = device.draw(*img.size, random.Random(i))
        whole.append(batchaug.RawImage(np.asarray(img), np.array([left, top, right, bottom, flip, b, c]), 40))
    got = batchaug.collate(cropped).augment(torch.device("cpu")).float()
    want = batchaug.collate(whole).augment(torch.device("cpu")).float()
    assert (got - want).abs().max() <= 2 and (got != want).float().mean() < 0.001
    # the canvas is bounded by the crops, not by the largest image
    assert batchaug.collate(cropped).pixels.shape[1] < max(img.height for img in images)


def test_collate_pads_each_image_with_its_own_edge() -> None:
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    b = np.full((4, 2, 3), 200, dtype=np.uint8)
    params = np.zeros(batchaug.N_PARAMS)
    batch = batchaug.collate([(batchaug.RawImage(a, params, 8), 1), (batchaug.RawImage(b, params, 8), 2)])
    raw, labels = batch
    assert raw.pixels.shape == (2, 4, 3, 3) and labels.tolist() == [1, 2]
    assert np.array_equal(raw.pixels[0, :2].numpy(), a)
    assert np.array_equal(raw.pixels[0, 2].numpy(), a[1]) and np.array_equal(raw.pixels[0, 3].numpy(), a[1])
    assert (raw.pixels[1] == 200).all()
    nested = batchaug.collate([{"x": (batchaug.RawImage(a, params, 8), 1)},
                               {"x": (batchaug.RawImage(b, params, 8), 2)}])
    assert isinstance(nested["x"][0], batchaug.RawBatch) and nested["x"][1].tolist() == [1, 2]
    # tensors alone still collate as DataLoader's default does
    plain = batchaug.collate([(torch.zeros(3, 2, 2, dtype=torch.uint8), 0)] * 2)
    assert plain[0].shape == (2, 3, 2, 2) and plain[1].tolist() == [0, 0]


def test_a_batch_of_several_output_sizes_is_refused() -> None:
    params = np.zeros(batchaug.N_PARAMS)
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="one output size"):
        batchaug.collate([batchaug.RawImage(pixels, params, 8), batchaug.RawImage(pixels, params, 16)])


def test_the_augmentation_path_is_recorded_with_the_run() -> None:
    import yaml

    from stages.lib.classifier import TrainConfig, resolved_run

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    train = TrainConfig.from_params(yaml.safe_load(params.read_text())["train"], "train")
    cpu = train.replace(device="cpu")
    assert resolved_run(cpu)["augment"] == "loader"  # auto on CPU
    assert resolved_run(cpu.replace(augment=cpu.augment.replace(where="device")))["augment"] == "device"


def test_augment_on_auto_is_device_on_cuda_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not augment_on_device("auto", cpu) and augment_on_device("auto", cuda)
    assert augment_on_device("device", cpu) and not augment_on_device("loader", cuda)
    with pytest.raises(ValueError, match="augment.where"):
        augment_on_device("gpu", cpu)
    assert isinstance(build_transform(32, train=True, on_device=True), DeviceTrainTransform)
    assert type(build_transform(32, train=True, on_device=False)) is TrainTransform


def _shards(tmp_path, n: int = 24) -> list[str]:
    keys = [f"k{i}" for i in range(n)]
    with ShardWriter(tmp_path, max_bytes=1 << 20) as shards, IndexWriter(tmp_path / INDEX) as index:
        for i, key in enumerate(keys):
            img = _image(40 + i % 5 * 8, 56 - i % 3 * 6, seed=i)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            shard, offset = shards.write(buf.getvalue())
            index.add(key, "train", shard, offset, len(buf.getvalue()), img.width, img.height)
    return keys


def test_device_batches_do_not_depend_on_the_loader_workers(tmp_path) -> None:
    keys = _shards(tmp_path)
    transform = DeviceTrainTransform(32, brightness=0.2, contrast=0.2)
    ds = ShardDataset(tmp_path, keys, list(range(len(keys))), transform, seed=3)
    ctx = engine.RunContext(device=torch.device("cpu"), amp_dtype=None)
    epochs = {}
    for workers in (0, 2):
        loader = engine.make_loader(ds, batch_size=8, train=True, seed=3, workers=workers, device=ctx.device)
        seen = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            seen.append([(engine.to_device(x, ctx), y) for x, y in loader])
        epochs[workers] = seen
    for (x0, y0), (x2, y2) in zip(sum(epochs[0], []), sum(epochs[2], []), strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    first, second = (torch.cat([x for x, _ in e]) for e in epochs[0])
    assert not torch.equal(first, second)  # each epoch draws anew


def test_training_runs_with_the_augmentation_on_the_device(tmp_path) -> None:
    from stages.lib.classifier import AugmentConfig, ModelConfig, TrainConfig, train_classifier
    from stages.lib.probe import ProbeConfig

    keys = _shards(tmp_path, n=32)
    df = pd.DataFrame({"key": keys, "label": [i % 2 for i in range(len(keys))]})
    augment = AugmentConfig(scale_min=0.5, hflip=True, brightness=0.2, contrast=0.2, where="device")
    cfg = TrainConfig(device="cpu", precision="fp32", epochs=1, batch_size=8, optimizer="sgd", lr=0.01,
                      momentum=0.9, weight_decay=0.0, warmup_epochs=0, label_smoothing=0.0, clip_grad_norm=0.0,
                      trunk_lr_scale=1.0, batchnorm="train", ema_half_life=0.0, workers=0, seed=0, augment=augment,
                      val_fraction=0.2, early_epoch=1, parallel_runs=1,
                      head_init="random", probe=ProbeConfig(C=1.0, max_iter=100))
    model, history = train_classifier(df, df[:8], images_dir=tmp_path, num_classes=2,
                                      model_cfg=ModelConfig(backbone="resnet18", weights="none", image_size=32),
                                      train_cfg=cfg)
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_loader.sh runs it)")
def test_cuda_gives_the_pixels_of_the_cpu_device_path() -> None:
    device = DeviceTrainTransform(224, brightness=0.3, contrast=0.3)
    raw = batchaug.collate([device(_image(60 + i, 90 - i, seed=i), random.Random(i)) for i in range(16)])
    on_cpu = raw.augment(torch.device("cpu"))
    on_cuda = raw.pin_memory().augment(torch.device("cuda")).cpu()
    diff = (on_cuda.float() - on_cpu.float()).abs()
    # float rounding at .5 may differ by one level, which the jitter's factor (up to 1.69) can make two
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.01, (diff.max(), (diff > 0).float().mean())


def test_prefetch_on_cpu_passes_the_batches_through() -> None:
    batches = [(torch.full((2, 3, 4, 4), i, dtype=torch.uint8), torch.tensor([i, i])) for i in range(3)]
    got = list(batchaug.prefetch(batches, torch.device("cpu"), channels_last=True))
    assert [b[1].tolist() for b in got] == [[0, 0], [1, 1], [2, 2]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_loader.sh runs it)")
def test_prefetch_gives_every_batch_in_order_on_the_device() -> None:
    device = DeviceTrainTransform(32, brightness=0.2, contrast=0.2)
    batches = []
    for i in range(5):
        raw = batchaug.collate([device(_image(40 + j, 50, seed=10 * i + j), random.Random(j)) for j in range(8)])
        batches.append([raw.pin_memory(), torch.arange(8) + i])
    want = [(raw.augment(torch.device("cpu")), y) for raw, y in batches]
    got = list(batchaug.prefetch(iter(batches), torch.device("cuda"), channels_last=True))
    assert len(got) == len(want)
    for (x, y), (wx, wy) in zip(got, want):
        assert x.device.type == "cuda" and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y.cpu(), wy) and (x.cpu().float() - wx.float()).abs().max() <= 2


def test_siamese_pairs_are_augmented_on_the_device(tmp_path) -> None:
    from stages.lib.models import build_model
    from stages.lib.siamese import PairDataset, siamese_loss

    keys = _shards(tmp_path, n=12)
    images = ShardDataset(tmp_path, keys, [i % 3 for i in range(12)],
                          DeviceTrainTransform(32, brightness=0.2, contrast=0.2), seed=1)
    pairs = pd.DataFrame({"key_a": keys[:6], "key_b": keys[6:], "same": [1, 0, 1, 0, 1, 0]})
    loader = engine.make_loader(PairDataset(images, pairs), batch_size=6, train=True, seed=1, workers=0,
                                device=torch.device("cpu"))
    xa, xb, ya, yb, same = batch = next(iter(loader))
    assert isinstance(xa, batchaug.RawBatch) and isinstance(xb, batchaug.RawBatch) and same.tolist()
    torch.manual_seed(0)
    model = build_model("resnet18", 3, embedding_dim=8, normalize=True)
    ctx = engine.RunContext(device=torch.device("cpu"), amp_dtype=None)
    loss, logs, n = siamese_loss(contrastive_weight=1.0, margin=0.5, label_smoothing=0.0)(model, batch, ctx)
    assert n == 6 and torch.isfinite(loss) and logs["contrastive"] >= 0
