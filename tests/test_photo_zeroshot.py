"""scripts/photo_zeroshot.py: the breeds' ImageNet classes, the zero-shot scoring of a release's test split
and the report's pairing with the photo study, on images and a model the tests make."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

pytest.importorskip("timm")  # an optional extra the script needs; requirements.lock installs it
zeroshot = load_script("photo_zeroshot")

# the ImageNet-1k classes of ../shared/dog_photos' breeds (timm's ImageNetInfo, checked by hand)
SHARED = {"beagle": 162, "siberian husky": 250, "toy poodle": 265, "maltese": 153, "saint bernard": 247,
          "german shepherd": 235, "golden retriever": 207}


def test_each_breed_maps_to_its_one_imagenet_class() -> None:
    assert zeroshot.imagenet_classes(list(SHARED)) == list(SHARED.values())
    for name in ("labradoodle", "retriever"):  # no class; only part of several class names
        with pytest.raises(SystemExit, match=f"breed '{name}' names 0 ImageNet classes"):
            zeroshot.imagenet_classes([name])


def _release(tmp_path: Path) -> Path:
    """A two-breed test split: red beagles, blue maltese, as make_release writes it."""
    colours = {"beagle": (200, 40, 40), "maltese": (40, 40, 200)}
    with open(tmp_path / "test_images.tsv", "w") as fi, open(tmp_path / "test_labels.tsv", "w") as fl:
        for i, breed in enumerate(["beagle", "maltese", "beagle", "maltese", "beagle"]):
            buf = io.BytesIO()
            Image.fromarray(np.full((40, 50, 3), colours[breed], np.uint8)).save(buf, "JPEG")
            fi.write(f"k{i}\t{base64.b64encode(buf.getvalue()).decode('ascii')}\n")
            fl.write(f"k{i}\t{breed}\n")
    return tmp_path


class RedIsBeagle(torch.nn.Module):
    """1000 logits: beagle (162) high for red images, maltese (153) for blue ones, and 'bluetick' (164) higher
    still for red ones, so a red beagle is right among the breeds but wrong among all 1000 classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and -1.01 <= x.min() and x.max() <= 1.01  # the [-1, 1] input
        red, blue = x[:, 0].mean((1, 2)), x[:, 2].mean((1, 2))
        logits = torch.zeros(len(x), 1000)
        logits[:, 162], logits[:, 153], logits[:, 164] = red, blue, red + 0.1
        return logits


def test_zero_shot_reads_the_breeds_classes_and_all_1000_apart(tmp_path: Path) -> None:
    images, breeds = zeroshot.read_test(_release(tmp_path))
    assert breeds == ["beagle", "maltese", "beagle", "maltese", "beagle"] and images[0].size == (50, 40)
    result = zeroshot.zero_shot(RedIsBeagle(), images, breeds, 32)
    assert result == {"size": 32, "test_images": 5, "top1_breeds": 1.0, "top1_imagenet": 0.4}


def test_the_report_pairs_each_seed_with_the_photo_studys_probes() -> None:
    runs = [{"seed": s, "size": size, "test_images": 100, "top1_breeds": acc, "top1_imagenet": 0.8}
            for s, acc in ((3, 0.95), (4, 0.97)) for size in (128, 224)]
    top1 = {"truth": 0.9, "probe_truth": 0.9, "probe_raw": 0.85, "probe_naive": 0.86, "naive": 0.84}
    study = [{"seed": 3, "variant": "final", "top1": top1}, {"seed": 4, "variant": "final", "top1": top1},
             {"seed": 4, "variant": "start", "top1": {**top1, "probe_raw": 0.1}}]
    text = zeroshot.report(runs, study)
    assert "| 3 | 128 | 0.950 | 0.800 | 0.900 | 0.900 | 0.850 | 0.860 | 0.840 |" in text
    assert "| 3 | 224 | 0.950 | 0.800 |  |  |  |  |  |" in text  # the study ran at 128 px only
    assert "| zero-shot − probe_raw at 128 px | 0.110 ± 0.010 |" in text  # (0.10, 0.12): the final runs only
