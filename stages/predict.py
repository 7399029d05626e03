"""Top-5 dog breeds of images, with a trained model file.

    python -m stages.predict models/siamese/model.pt dog1.jpg dog2.png ...

Needs only the model file (weights, class names, backbone, image size,
normalisation), not params.yaml or the pipeline's data. Images get the
evaluation preprocessing the model was validated with (resize, centre crop,
normalise). A missing file or a non-image is reported on stderr and skipped;
the other images are still predicted, and the exit status is 1 at the end.
A model file that is missing, unreadable or not a valid clickdog model
(keys missing, values out of bounds, weights that do not fit) is one line
on stderr and exit status 2.
Runs on CUDA when present, else on the CPU.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from stages.lib.images import DEFAULT_MAX_PIXELS, TooManyPixels, open_image, to_rgb
from stages.lib.models import ModelFileError, load_model_file
from stages.lib.presets import build_transform
from stages.lib.runtime import choose_device

BATCH = 32


class ImageError(ValueError):
    """An input that is not a readable image; the message says why."""


def load_image(path: Path) -> Image.Image:
    """Open and fully decode one image, or raise :class:`ImageError`."""
    if not path.exists():
        raise ImageError("no such file")
    if path.is_dir():
        raise ImageError("is a directory, not an image")
    try:
        with open_image(path, max_pixels=DEFAULT_MAX_PIXELS) as img:
            img.load()  # decode now: a truncated file fails here, not in the model
            return to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError("not an image of an accepted format (JPEG, PNG, GIF, BMP, WebP)") from None
    except TooManyPixels as exc:
        raise ImageError(str(exc)) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"damaged or unreadable image: {exc}") from None


def batches(paths: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield list(paths[start:start + size])


@torch.inference_mode()
def top_k(model: torch.nn.Module, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, class indices) of the ``k`` most probable classes, per image."""
    probs = torch.softmax(model(images).float(), dim=1)
    return probs.topk(min(k, probs.shape[1]), dim=1)


def format_prediction(path: Path, probs: Sequence[float], names: Sequence[str]) -> str:
    """The image's path, then one line per breed: probability and name."""
    return "\n".join([str(path), *(f"  {p:.4f}  {name}" for p, name in zip(probs, names))])


def predict_paths(model_path: Path, paths: Sequence[Path], k: int = 5) -> int:
    """Print the top-``k`` breeds of each image; return the number of failures."""
    device = choose_device("auto")
    model, meta = load_model_file(model_path, device)
    transform = build_transform(meta["image_size"], train=False)
    classes = meta["classes"]
    failures = 0
    for group in batches(paths, BATCH):
        loaded = []
        for path in group:
            try:
                loaded.append((path, transform(load_image(path))))
            except ImageError as exc:
                print(f"error: {path}: {exc}", file=sys.stderr)
                failures += 1
        if not loaded:
            continue
        probs, idx = top_k(model, torch.stack([x for _, x in loaded]).to(device), k)
        for (path, _), p, i in zip(loaded, probs.tolist(), idx.tolist()):
            print(format_prediction(path, p, [classes[j] for j in i]), flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a model file (models/naive/model.pt, models/siamese/model.pt)")
    parser.add_argument("images", type=Path, nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--top", type=int, default=5, help="how many breeds to print (default 5)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be >= 1")
    try:
        failures = predict_paths(args.model, args.images, args.top)
    except ModelFileError as exc:  # the model file itself (one line naming it): nothing can be predicted
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if failures:
        print(f"{failures} of {len(args.images)} images could not be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
