"""Training augmentation on the training device, a batch at a time.

At 224 px the loader, not the GPU, set the pace of ResNet-50 on an H200: each
worker resized every thumbnail up to 224 px and jittered it with Pillow and
numpy, then shipped 150 KB of pixels per image. With ``augment.where: device``
the workers only decode and draw the augmentation's parameters (the same
seeded draws as :class:`~stages.lib.presets.TrainTransform`, so a run stays
deterministic and resumable); the crop, resize, flip and jitter of the whole
batch run as a few kernels on the device after the copy, which now moves the
decoded crops (with a one-pixel margin; at most ~27 KB an image on the sample)
instead of the 150 KB of each resized one.

The crop and resize is ``torchvision.ops.roi_align``: one bilinear sample per
output pixel when the crop is enlarged (as Pillow's bilinear resize), and the
mean of ``ceil(crop / output)`` samples per output pixel and axis when it is
shrunk (an antialiasing box filter where Pillow uses a wider triangle: on
pixel noise that differs by a few levels on average; on smooth or moderately
textured images it stays within rounding).
``tests/test_batchaug.py`` checks the result against the Pillow path.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info
from torchvision.ops import roi_align

GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale (both augmentation paths)
N_PARAMS = 7  # left, top, right, bottom (source pixels, Pillow's box), flip, brightness, contrast factors


class RawImage(NamedTuple):
    """A decoded image (uint8 HWC) and its drawn augmentation parameters."""

    pixels: np.ndarray
    params: np.ndarray  # float64 (N_PARAMS,)
    size: int  # output side in pixels


class RawBatch:
    """Images of different sizes in one uint8 canvas (B, Hmax, Wmax, 3), each
    padded by repeating its last row and column (so interpolation at its edge
    sees its own pixels, as Pillow's clamped filter does), with their
    parameters (B, N_PARAMS)."""

    def __init__(self, pixels: torch.Tensor, params: torch.Tensor, size: int) -> None:
        self.pixels, self.params, self.size = pixels, params, size

    @classmethod
    def of(cls, items: Sequence[RawImage]) -> RawBatch:
        sizes = {item.size for item in items}
        if len(sizes) != 1:
            raise ValueError(f"one batch must have one output size, got {sorted(sizes)}")
        height = max(item.pixels.shape[0] for item in items)
        width = max(item.pixels.shape[1] for item in items)
        pixels = torch.empty((len(items), height, width, 3), dtype=torch.uint8)
        if get_worker_info() is not None:
            # in a loader worker, straight into shared memory, as default_collate does: sending the batch
            # to the training process would otherwise copy it there first
            pixels.share_memory_()
        canvas = pixels.numpy()
        for slot, item in zip(canvas, items):
            h, w = item.pixels.shape[:2]
            slot[:h, :w] = item.pixels
            slot[:h, w:] = item.pixels[:, w - 1:w]
            slot[h:] = slot[h - 1:h]
        params = np.stack([item.params for item in items]).astype(np.float32)
        return cls(pixels, torch.from_numpy(params), sizes.pop())

    def __len__(self) -> int:
        return len(self.pixels)

    def pin_memory(self) -> RawBatch:
        # DataLoader(pin_memory=True) calls this on the batches of its pinning thread
        return RawBatch(self.pixels.pin_memory(), self.params.pin_memory(), self.size)

    def augment(self, device: torch.device, *, channels_last: bool = True) -> torch.Tensor:
        """The augmented batch on ``device``: uint8 (B, 3, size, size)."""
        pixels = self.pixels.to(device, non_blocking=True)
        params = self.params.to(device, non_blocking=True)
        return augment_batch(pixels, params, self.size, channels_last=channels_last)


def augment_batch(pixels: torch.Tensor, params: torch.Tensor, size: int, *,
                  channels_last: bool = True) -> torch.Tensor:
    """Crop each image to its box and resize it to ``size`` (``roi_align``,
    bilinear), flip where asked, then brightness and contrast jitter as
    ``TrainTransform.jitter``: uint8 (B, 3, size, size), rounded as the Pillow
    path rounds."""
    n = len(pixels)
    x = pixels.permute(0, 3, 1, 2).float().contiguous()  # roi_align works on NCHW
    boxes = torch.cat([torch.arange(n, device=x.device, dtype=torch.float32)[:, None], params[:, :4]], dim=1)
    # aligned=True: a box edge at 0 is the left edge of pixel 0, as Pillow's box; sampling_ratio=-1: per box
    # ceil(crop / size) samples per output pixel and axis, one when enlarging
    x = roi_align(x, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    x = x.round_()  # the Pillow path's resized image is uint8
    flip = params[:, 4].bool()[:, None, None, None]
    x = torch.where(flip, x.flip(-1), x)
    b, c = params[:, 5], params[:, 6]
    # the luma weights as Python scalars: a tensor made from them on CUDA would be a blocking copy, stalling the
    # CPU on every batch until the stream drains
    mean_grey = (x[:, 0] * GREY[0] + x[:, 1] * GREY[1] + x[:, 2] * GREY[2]).mean((1, 2)) * b
    # c * (b * x) + (1 - c) * mean grey of (b * x), + 0.5 to round when truncating to uint8
    x = x * (b * c).view(-1, 1, 1, 1) + ((1 - c) * mean_grey + 0.5).view(-1, 1, 1, 1)
    out = x.clamp_(0, 255).to(torch.uint8)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


def _holds_raw(x: Any) -> bool:
    if isinstance(x, RawImage):
        return True
    if isinstance(x, dict):
        return any(_holds_raw(v) for v in x.values())
    return isinstance(x, (tuple, list)) and any(_holds_raw(v) for v in x)


def collate(items: Sequence[Any]) -> Any:
    """``default_collate``, except that :class:`RawImage` items, wherever they
    sit in the items' tuples, lists or dicts, become one :class:`RawBatch`
    (they differ in size, so they cannot be stacked)."""
    first = items[0]
    if isinstance(first, RawImage):
        return RawBatch.of(items)
    if not _holds_raw(first):
        return default_collate(items)
    if isinstance(first, dict):
        return {k: collate([item[k] for item in items]) for k in first}
    return [collate([item[i] for item in items]) for i in range(len(first))]


def to_device(x: torch.Tensor | RawBatch, device: torch.device, *, channels_last: bool) -> torch.Tensor:
    """A batch of images on ``device``: a :class:`RawBatch` is augmented there."""
    if isinstance(x, RawBatch):
        return x.augment(device, channels_last=channels_last)
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _move(batch: Any, device: torch.device, channels_last: bool) -> Any:
    """Every image batch and tensor of a collated batch on ``device``."""
    if isinstance(batch, (list, tuple)):
        return [_move(x, device, channels_last) for x in batch]
    if isinstance(batch, (torch.Tensor, RawBatch)):
        return to_device(batch, device, channels_last=channels_last)
    return batch


def _record(batch: Any, stream: torch.cuda.Stream) -> None:
    # tensors made on the side stream and used on another: the allocator must not reuse their memory
    # before that stream is done with them
    if isinstance(batch, list):
        for x in batch:
            _record(x, stream)
    elif isinstance(batch, torch.Tensor):
        batch.record_stream(stream)


def prefetch(batches: Any, device: torch.device, *, channels_last: bool):
    """The batches of ``batches`` on ``device``, each copied (and augmented,
    for a :class:`RawBatch`) on a side CUDA stream one step ahead: the copy and
    the augmentation kernels of batch i+1 overlap step i instead of running
    between the two steps (apex's ``data_prefetcher``). On CPU, the batches as
    they come."""
    if device.type != "cuda":
        yield from batches
        return
    side = torch.cuda.Stream(device)
    it = iter(batches)

    def load():
        batch = next(it, None)
        if batch is None:
            return None
        with torch.cuda.stream(side):
            moved = _move(batch, device, channels_last)
            done = torch.cuda.Event()
            done.record(side)
        return moved, done

    main = torch.cuda.current_stream(device)
    ahead = load()
    while ahead is not None:
        batch, done = ahead
        main.wait_event(done)
        _record(batch, main)
        ahead = load()
        yield batch
