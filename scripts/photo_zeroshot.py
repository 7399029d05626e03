"""How much of a photo release the ImageNet weights already know, before any training (issue 21).

    python scripts/photo_zeroshot.py --photos ../shared/dog_photos [--seeds 3 4 5] [--sizes 128 224]
    python scripts/photo_zeroshot.py --report     # rewrite reports/photo_zeroshot.md from its JSON

The pretrained-regime study compares each fine-tuned model with a linear probe of the same frozen
ImageNet features. The photos of ``../shared/dog_photos`` are Stanford Dogs, which was cut out of
ImageNet, and all of its breeds are ImageNet-1k classes. This script measures what that means: the whole
converted EfficientNet-Lite0 (``stages.lib.pretrained``, its 1000-class classifier included, as in
tests/test_pretrained.py) scores each release's clean test split with no training on the release at
all, its logits read only at the release breeds' ImageNet classes (``timm.data.ImageNetInfo``: a breed
matches a class whose description names it). The test images are the release's own re-encoded JPEGs
(``scripts/make_release.py --seed S``, made under /tmp once per seed, as photo_study.py makes them) and
go through the pipeline's eval transform at each size.

Writes reports/photo_zeroshot.{json,md}; the markdown puts each seed beside reports/photo_study.json's
truth, probe_truth and probe_raw of the same release seed. The photos never enter the project.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo

from stages.lib import pretrained
from stages.lib.images import to_rgb
from stages.lib.presets import build_transform
from stages.lib.studies import mean_se

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "tf_efficientnet_lite0"


def imagenet_classes(breeds: list[str]) -> list[int]:
    """Each breed's ImageNet-1k class: the one whose description lists the breed's name (case aside)."""
    info = ImageNetInfo()
    names = {i: [n.strip().lower() for n in info.index_to_description(i).split(",")]
             for i in range(info.num_classes())}
    out = []
    for breed in breeds:
        hits = [i for i, n in names.items() if breed.lower() in n]
        if len(hits) != 1:
            raise SystemExit(f"photo_zeroshot: breed {breed!r} names {len(hits)} ImageNet classes, not one")
        out.append(hits[0])
    return out


def read_test(release: Path) -> tuple[list[Image.Image], list[str]]:
    """The release's labelled test images (its re-encoded JPEGs) and their breeds, in test_labels order."""
    labels = pd.read_csv(release / "test_labels.tsv", sep="\t", header=None, names=["key", "breed"])
    images = {}
    with open(release / "test_images.tsv", encoding="ascii") as f:
        for line in f:
            key, data = line.rstrip("\n").split("\t")
            images[key] = to_rgb(Image.open(io.BytesIO(base64.b64decode(data))))  # decode's one rule
    return [images[k] for k in labels["key"]], labels["breed"].tolist()


def zero_shot(model: torch.nn.Module, images: list[Image.Image], breeds: list[str], size: int) -> dict:
    classes = sorted(set(breeds))
    idx = torch.tensor(imagenet_classes(classes))
    y = torch.tensor([classes.index(b) for b in breeds])
    transform = build_transform(size, train=False)
    logits = []
    with torch.inference_mode():
        for start in range(0, len(images), 64):
            x = torch.stack([transform(im) for im in images[start:start + 64]])
            x = x.float().div(255) if x.dtype == torch.uint8 else x
            logits.append(model((x - 0.5) / 0.5))  # the TF-ported weights' [-1, 1] input
    logits = torch.cat(logits)
    return {"size": size, "test_images": len(breeds),
            "top1_breeds": round(float((logits[:, idx].argmax(1) == y).float().mean()), 4),
            "top1_imagenet": round(float((logits.argmax(1) == idx[y]).float().mean()), 4)}


def measure(photos: Path, seeds: list[int], sizes: list[int]) -> list[dict]:
    model = timm.create_model(BACKBONE, pretrained=False)
    result = model.load_state_dict(pretrained.imagenet_state_dict(BACKBONE), strict=False)
    if result.unexpected_keys or not all(k.endswith(pretrained.COUNTER) for k in result.missing_keys):
        raise SystemExit(f"photo_zeroshot: the converted weights do not fit {BACKBONE}: {result}")
    model.eval()
    runs = []
    for seed in seeds:
        release = Path(f"/tmp/photo_release_{seed}")
        if not release.exists():
            subprocess.run([sys.executable, "scripts/make_release.py", str(photos), str(release), "--seed",
                            str(seed)], cwd=ROOT, check=True, capture_output=True)
        images, breeds = read_test(release)
        for size in sizes:
            runs.append({"seed": seed, **zero_shot(model, images, breeds, size)})
            print(runs[-1], flush=True)
    return runs


def report(runs: list[dict], study: list[dict]) -> str:
    final = {r["seed"]: r["top1"] for r in study if r["variant"] == "final"}
    refs = ("truth", "probe_truth", "probe_raw", "probe_naive", "naive")
    lines = [
        "# What the ImageNet weights know of the photo releases before any training",
        "",
        "Generated by `scripts/photo_zeroshot.py` from `reports/photo_zeroshot.json` (do not edit by hand). The "
        "converted EfficientNet-Lite0 with its own 1000-class ImageNet classifier, no training on the release, "
        "scores each release's clean test split; `zero-shot` reads its logits at the release breeds' ImageNet "
        "classes only, `zero-shot, 1000 classes` needs the breed's class to win over all 1000. The other "
        "columns are reports/photo_study.json's runs of the same release seed at 128 px (trained models and "
        "linear probes of the frozen features).",
        "",
        "| seed | px | zero-shot | zero-shot, 1000 classes | " + " | ".join(refs) + " |",
        "|---|---|---|---|" + "---|" * len(refs),
    ]
    for r in runs:
        ref = final.get(r["seed"], {})
        cells = [f"{ref[k]:.3f}" if k in ref and r["size"] == 128 else "" for k in refs]
        lines.append(f"| {r['seed']} | {r['size']} | {r['top1_breeds']:.3f} | {r['top1_imagenet']:.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| mean ± s.e. over the seeds | value |", "|---|---|"]
    for size in sorted({r["size"] for r in runs}):
        at = [r for r in runs if r["size"] == size]
        lines.append(f"| zero-shot at {size} px | {mean_se([r['top1_breeds'] for r in at], signed=False)} |")
        paired = [r for r in at if r["seed"] in final]
        if size == 128 and paired:
            for k in ("probe_raw", "probe_naive", "probe_truth"):
                diff = [r["top1_breeds"] - final[r["seed"]][k] for r in paired]
                lines.append(f"| zero-shot − {k} at 128 px | {mean_se(diff, signed=False)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, help="a breed-per-folder photo tree (../shared/dog_photos)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    args = parser.parse_args(argv)
    out_json = args.out / "photo_zeroshot.json"
    if args.report:
        runs = json.loads(out_json.read_text())
    else:
        if args.photos is None:
            parser.error("--photos is needed to measure (or --report)")
        runs = measure(args.photos, args.seeds, args.sizes)
        out_json.write_text(json.dumps(runs, indent=1) + "\n")
    study = json.loads((ROOT / "reports/photo_study.json").read_text())
    (args.out / "photo_zeroshot.md").write_text(report(runs, study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
