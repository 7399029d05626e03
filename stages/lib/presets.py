"""Image transforms, as torchvision's references keep them in ``presets.py``: the training
augmentation in the loader (:class:`TrainTransform`, Pillow + numpy, tested against torchvision) or
split with the device (:class:`DeviceTrainTransform`: the loader only decodes, ``batchaug`` augments
the batch), and the eval transform (resize, centre crop). No pandas, no scikit-learn: ``predict``
imports this to classify one photo."""
from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from PIL import Image

from stages.lib import batchaug
from stages.lib.batchaug import RawImage

GREY = np.array(batchaug.GREY, dtype=np.float32)  # the device path's luma weights, for a matrix product


def _chw_tensor(a: np.ndarray) -> torch.Tensor:
    """An HWC uint8 array as the CHW tensor the model takes."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


class TrainTransform:
    """Random resized crop, horizontal flip, brightness/contrast jitter, as
    torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` +
    ``ColorJitter`` (fixed order: brightness, then contrast).

    Returns a uint8 CHW tensor: the model normalises (``Classifier``), so the
    loader moves a quarter of the bytes of float images and does no float work
    per image beyond the jitter. The crop and the resize are one Pillow call
    (``resize(box=...)``). Draws come from the ``random.Random`` passed in,
    which the dataset seeds per (seed, epoch, sample).
    """

    def __init__(self, image_size: int, *, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                 brightness: float = 0.0, contrast: float = 0.0) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"augment.scale_min must be in (0, 1], got {scale[0]}")
        if brightness < 0 or contrast < 0:
            raise ValueError(f"augment brightness/contrast must be >= 0, got {brightness}/{contrast}")
        self.size, self.scale, self.hflip = image_size, scale, hflip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.brightness, self.contrast = brightness, contrast

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """torchvision's ``RandomResizedCrop.get_params``: (left, top, right, bottom)."""
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return left, top, left + w, top + h
        in_ratio = width / height  # fallback: the central crop of the nearest allowed ratio
        lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        w, h = (width, round(width / lo)) if in_ratio < lo else (round(height * hi), height) if in_ratio > hi \
            else (width, height)
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def draw(self, width: int, height: int, rng: random.Random) -> tuple[tuple[int, int, int, int], bool,
                                                                        float, float]:
        """The random parameters of one image: crop box, flip, brightness and
        contrast factors (1.0 when off), drawn in this order."""
        box = self.crop_box(width, height, rng)
        flip = self.hflip and rng.random() < 0.5
        b = rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness) if self.brightness else 1.0
        c = rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast) if self.contrast else 1.0
        return box, flip, b, c

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        box, flip, b, c = self.draw(*img.size, rng or random.Random())
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        a = np.asarray(img)
        if self.brightness or self.contrast:
            a = self.jitter(a, b, c)
        return _chw_tensor(a)

    def jitter(self, a: np.ndarray, b: float, c: float) -> np.ndarray:
        # brightness then contrast as one affine map: c * (b * x) + (1 - c) * mean grey of (b * x).
        # torchvision clips in between; only pixels that brightening saturates differ.
        x = a.astype(np.float32)
        grey = float((x.reshape(-1, 3) @ GREY).sum()) / (x.size // 3) * b  # a matrix product: fast on HWC
        x *= b * c
        x += (1 - c) * grey + 0.5  # + 0.5: round, not truncate, below
        np.clip(x, 0, 255, out=x)
        return x.astype(np.uint8)


class DeviceTrainTransform(TrainTransform):
    """``TrainTransform``'s draws, applied later to the whole batch on the
    training device (``augment.where: device``, :mod:`stages.lib.batchaug`): the
    loader only decodes, and returns the crop with a margin of one pixel (all
    that bilinear sampling inside the crop reads) and the parameters, the box
    in the margin's coordinates. Cropping here bounds the batch's canvas by
    the crops, whose aspect ratio the draw limits, rather than by its tallest
    and its widest image."""

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> RawImage:
        box, flip, b, c = self.draw(*img.size, rng or random.Random())
        left, top, right, bottom = box
        x0, y0 = max(0, left - 1), max(0, top - 1)
        x1, y1 = min(img.width, right + 1), min(img.height, bottom + 1)
        pixels = np.asarray(img.crop((x0, y0, x1, y1)))
        params = np.array([left - x0, top - y0, right - x0, bottom - y0, flip, b, c], dtype=np.float64)
        return RawImage(pixels, params, self.size)


class EvalTransform:
    """Resize the short side, centre crop (the 0.875 crop ratio from 128 px up),
    in one Pillow call; a uint8 CHW tensor, as ``TrainTransform``."""

    def __init__(self, image_size: int) -> None:
        self.size = image_size
        self.resize = image_size if image_size < 128 else int(math.ceil(image_size / 0.875))

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        width, height = img.size
        side = min(width, height) * self.size / self.resize  # the crop, in source pixels
        left, top = (width - side) / 2, (height - side) / 2
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        return _chw_tensor(np.asarray(img))


def build_transform(image_size: int, *, train: bool, augment: Any = None,
                    on_device: bool = False) -> TrainTransform | EvalTransform:
    """Train: random resized crop, flip, brightness/contrast (``augment``: an
    ``AugmentConfig``, params ``train.augment``), in the loader or, with
    ``on_device``, on the training device (see ``augment_on_device``);
    eval: resize + centre crop. Both give uint8 CHW tensors."""
    if not train:
        return EvalTransform(image_size)
    cls = DeviceTrainTransform if on_device else TrainTransform
    if augment is None:  # TrainTransform's own defaults (tests)
        return cls(image_size)
    return cls(image_size, scale=(augment.scale_min, 1.0), hflip=augment.hflip,
               brightness=augment.brightness, contrast=augment.contrast)


def augment_on_device(where: str, device: torch.device) -> bool:
    """Whether ``augment.where`` (auto | loader | device) puts the augmentation on
    ``device``: auto does on CUDA, where the loader would set the pace, and
    keeps it in the loader on CPU, where both would share the same cores."""
    if where not in ("auto", "loader", "device"):
        raise ValueError(f"augment.where must be auto, loader or device, got {where!r}")
    return where == "device" or (where == "auto" and device.type == "cuda")
