"""Seed study: how much of a difference between label sets / models is more
than seed noise. Not part of `make repro` (it trains 5 x len(seeds) models).

    python scripts/seed_study.py --seeds 0 1 2            # after `make repro`
    python scripts/seed_study.py --configs truth raw --seeds 0
    python scripts/seed_study.py --truth-seeds 0           # the truth ceiling once, the rest over 3 seeds

Configurations (all with the naive recipe of params.yaml unless noted):
  truth     true breeds from truth.tsv (sample only): the calibration ceiling
  raw       top-clicked breed, no filter (data/filtered/raw_labels.tsv)
  click     click-filtered labels (data/filtered/labels.tsv) = the naive stage
  clickprob click + probability filtered (data/pairs/clean.tsv)
  siamese   the `click` model of the same seed fine-tuned by train_siamese on
            data/pairs/pairs.tsv (the pipeline's pair list, fixed across seeds)
  siamese_ce  the same fine-tuning with siamese.contrastive_weight 0: the
            extra epochs on the clean pairs without the contrastive loss, so
            siamese - siamese_ce is the contrastive loss's own share
With --equal-steps every naive run trains for the optimizer steps that the
raw label set gets in train.epochs (more epochs for the smaller, filtered
sets), which separates cleaner labels from fewer steps.
Each run's test top-1 and mean per-class accuracy go to
reports/seed_study.json; the table (mean +- standard error over seeds) to
reports/seed_study.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages import evaluate
from stages.lib import layout
from stages.lib.classifier import train_classifier
from stages.lib.data import load_labels, read_table, split_train_val
from stages.lib.params import load_params
from stages.lib.shards import read_index
from stages.lib.tracking import save_model
from stages.train_siamese import fit_siamese, siamese_from_naive

CONFIGS = ("truth", "raw", "click", "clickprob", "siamese", "siamese_ce")
FINE_TUNED = ("siamese", "siamese_ce")
log = logging.getLogger("seed_study")


def label_set(name: str, data: Path, classes: list[str]) -> pd.DataFrame:
    position = {c: i for i, c in enumerate(classes)}
    if name == "truth":
        df = pd.read_csv(data / "raw" / layout.TRUTH, sep="\t", names=["key", "breed"], dtype=str,
                         keep_default_na=False)
    else:
        path = {"raw": data / "filtered" / layout.RAW_LABELS, "click": data / "filtered" / layout.LABELS,
                "clickprob": data / "pairs" / layout.CLEAN}[name]
        df = load_labels(path)
    decoded = set(read_index(data / "images").query("split == 'train'")["key"])
    df = df[df["breed"].isin(position) & df["key"].isin(decoded)].copy()
    df["label"] = df["breed"].map(position)
    return df.reset_index(drop=True)


def run_seed(seed: int, configs: list[str], data: Path, params: dict, tmp: Path, *,
             equal_steps: bool = False) -> list[dict]:
    images = data / "images"
    index = read_index(images)
    classes = json.loads((data / "filtered" / layout.CLASSES).read_text())
    test, _ = evaluate.read_test_set(data / "raw", index)
    model_cfg, train_cfg = params["model"], {**params["train"], "seed": seed}
    eval_cfg = {"device": train_cfg["device"], "batch_size": 256}
    results, click_model = [], None
    raw_steps = None
    if equal_steps:
        raw_train, _ = split_train_val(label_set("raw", data, classes), train_cfg["val_fraction"], seed)
        raw_steps = len(raw_train) // train_cfg["batch_size"] * train_cfg["epochs"]  # the loader drops partial batches
    for name in [c for c in configs if c not in FINE_TUNED] + [c for c in FINE_TUNED if c in configs]:
        start = time.time()
        if name in FINE_TUNED:
            if click_model is None:
                click_model = train_naive_on("click", seed, data, classes, model_cfg, train_cfg, index, tmp,
                                             raw_steps)
            cfg = {**params["siamese"], "seed": seed}
            if name == "siamese_ce":
                cfg["contrastive_weight"] = 0.0
            model, meta = siamese_from_naive(click_model, cfg)
            clean = load_labels(data / "pairs" / layout.CLEAN)
            pairs = read_table(data / "pairs" / layout.PAIRS)
            _, val = split_train_val(label_set("click", data, classes), train_cfg["val_fraction"], seed)
            fit_siamese(model, meta, clean, pairs, val, images_dir=images, index=index, cfg=cfg)
            path = tmp / f"{name}-{seed}.pt"
            save_model(path, model, backbone=meta["backbone"], image_size=meta["image_size"], classes=classes)
        else:
            path = train_naive_on(name, seed, data, classes, model_cfg, train_cfg, index, tmp, raw_steps)
            if name == "click":
                click_model = path
        result = evaluate.evaluate_model(name, path, test, images, index, eval_cfg)
        results.append({"config": name, "seed": seed, **result.block, "seconds": round(time.time() - start, 1)})
        log.info("seed %d %s: %s", seed, name, results[-1])
    return results


def train_naive_on(name, seed, data, classes, model_cfg, train_cfg, index, tmp: Path,
                   total_steps: int | None = None) -> Path:
    train_df, val_df = split_train_val(label_set(name, data, classes), train_cfg["val_fraction"], seed)
    if total_steps is not None:
        epochs = max(1, round(total_steps / (len(train_df) // train_cfg["batch_size"])))
        log.info("%s: %d epochs for ~%d steps", name, epochs, total_steps)
        train_cfg = {**train_cfg, "epochs": epochs, "early_epoch": min(train_cfg["early_epoch"], epochs)}
    model, _ = train_classifier(train_df, val_df, images_dir=data / "images", num_classes=len(classes),
                                model_cfg=model_cfg, train_cfg=train_cfg, index=index)
    path = tmp / f"{name}-{seed}.pt"
    save_model(path, model, backbone=model_cfg["backbone"], image_size=model_cfg["image_size"], classes=classes)
    return path


def summary_table(runs: pd.DataFrame) -> str:
    """Mean +- standard error over seeds, per configuration."""
    lines = ["| labels / model | seeds | test top-1 | mean per-class acc | top-5 |", "|---|---|---|---|---|"]
    for name in [c for c in CONFIGS if c in set(runs["config"])]:
        r = runs[runs["config"] == name]

        def cell(col: str) -> str:
            if len(r) < 2:
                return f"{r[col].mean():.3f} (one seed)"
            return f"{r[col].mean():.3f} ± {r[col].std(ddof=1) / np.sqrt(len(r)):.3f}"

        lines.append(f"| {name} | {len(r)} | {cell('top1')} | {cell('mean_class_accuracy')} | {cell('top5')} |")
    return "\n".join(lines) + "\n\n" + paired_differences(runs)


def paired_differences(runs: pd.DataFrame, baseline: str = "click") -> str:
    """Test top-1 of each configuration minus the pipeline's naive model (and
    siamese minus siamese_ce), paired by seed; a difference counts only when it
    exceeds two standard errors."""
    top1 = runs.pivot_table(index="seed", columns="config", values="top1")
    if baseline not in top1:
        return ""
    pairs = [(name, baseline) for name in CONFIGS if name in top1 and name != baseline]
    if {"siamese", "siamese_ce"} <= set(top1):
        pairs.append(("siamese", "siamese_ce"))
    lines = ["| difference in test top-1 (paired by seed) | seeds | mean ± s.e. | beyond 2 s.e.? |", "|---|---|---|---|"]
    for name, other in pairs:
        d = (top1[name] - top1[other]).dropna()
        if len(d) < 2:
            lines.append(f"| {name} − {other} | {len(d)} | {d.mean():+.3f} | one seed: cannot tell |")
            continue
        se = d.std(ddof=1) / np.sqrt(len(d))
        verdict = "yes" if abs(d.mean()) > 2 * se else "no: within seed noise"
        lines.append(f"| {name} − {other} | {len(d)} | {d.mean():+.3f} ± {se:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--truth-seeds", nargs="*", type=int,
                   help="run the truth configuration only for these seeds (default: all seeds)")
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--equal-steps", action="store_true",
                   help="train each naive run for the raw label set's number of optimizer steps")
    p.add_argument("--summarize", action="store_true", help="only rewrite seed_study.md from seed_study.json")
    args = p.parse_args()
    if args.summarize:
        runs_df = pd.DataFrame(json.loads((args.out / "seed_study.json").read_text()))
        (args.out / "seed_study.md").write_text(summary_table(runs_df))
        print(summary_table(runs_df))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    params = load_params("model", "train", "siamese")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            configs = [c for c in args.configs
                       if c != "truth" or args.truth_seeds is None or seed in args.truth_seeds]
            runs += run_seed(seed, configs, args.data, params, Path(tmp), equal_steps=args.equal_steps)
            args.out.mkdir(parents=True, exist_ok=True)  # after every seed: a long study can be read early
            (args.out / "seed_study.json").write_text(json.dumps(runs, indent=2))
            (args.out / "seed_study.md").write_text(summary_table(pd.DataFrame(runs)))
    print(summary_table(pd.DataFrame(runs)))


if __name__ == "__main__":
    main()
