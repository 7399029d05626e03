"""Seed study: which differences between models are more than seed noise.
Not part of `make repro`: it repeats the pipeline's training for every seed.

    python scripts/seed_study.py                      # after `make repro`; 3 seeds, every configuration
    python scripts/seed_study.py --seeds 0 --configs raw naive cleanlab
    python scripts/seed_study.py --summarize          # rewrite seed_study.md from seed_study.json

Each seed is one independent run of the pipeline's training, with the same
library functions the stages call and the same params (``train.seed``,
``pairs.seed`` and ``siamese.seed`` set to the seed); decoded images and
click-filtered labels are the pipeline's (``data/``), which do not depend on a
seed. Configurations:

  truth      the naive recipe on the true breeds (truth.tsv; sample only): the ceiling
  raw        the naive recipe on the raw click labels: the paper's baseline
  naive      the naive recipe on the click-filtered labels (train_naive)
  cleanlab   make_pairs + train_siamese with pairs.filter: cleanlab (the default):
             naive, fine-tuned on the pairs of the images confident learning keeps
             (siamese.contrastive: pairs, whatever params.yaml says: the paper's form)
  relabel    the same with pairs.filter: relabel
  threshold  the same with pairs.filter: threshold (the paper's p(label) >= min_prob)
  <filter>_ce  the same as <filter> with siamese.contrastive_weight 0: <filter> -
             <filter>_ce is the contrastive loss's own share
  naive_ema  naive with train.ema_half_life --ema-half-life: an average of the weights
  cleanlab_ema  cleanlab whose fine-tune has siamese.ema_half_life --ema-half-life (the
             same naive model and scorer as cleanlab: the difference is the average's)
  cleanlab_batch  cleanlab whose fine-tune has siamese.contrastive batch (pairs inside P breeds
             x K images batches: params.yaml's default since 2026-12-04); cleanlab_batch_ce the
             same with contrastive_weight 0
  cleanlab_batch_nobreed  cleanlab_batch whose filter also drops the images whose top breed
             has p < --min-top-prob (pairs.min_top_prob: likely non-dogs; params.yaml's default
             since 2026-12-04, so the pipeline's final model)
  cleanlab_batch_nobreed_clicks  cleanlab_batch_nobreed whose fine-tune draws each breed as often as
             its click-filtered labels, not its kept images (siamese.breed_share: clicks);
             _uniform: every breed equally often (breed_share: uniform); _clicks_ce: _clicks with
             siamese.contrastive_weight 0 (the contrastive term's share in the pipeline's fine-tune)
  <config>_cfN  a fine-tuned configuration whose scorer's cross-fitting models train for N epochs
             (pairs.crossfit_epochs N), e.g. cleanlab_batch_nobreed_clicks_cf30: <config>_cfN -
             <config> is the longer-trained scorer's share (every fine-tuned run records its
             crossfit_epochs, and its fine-tune's siamese.epochs as siamese_epochs)
  paper      the paper's recipe end to end: click-count filter min_clicks 2, min_share 0.7
             (the pipeline's defaults before this study), naive on those labels, the
             threshold filter, the siamese fine-tuning
The pipeline's final model is the configuration of params.yaml's pairs.filter, with _batch when
params.yaml's siamese.contrastive is batch and _nobreed when its pairs.min_top_prob is above 0
(every other configuration filters with min_top_prob 0, whatever params.yaml says).

Every naive-recipe model trains for the optimizer steps of train.epochs epochs
over the raw click-labelled split (stages.lib.classifier.budgeted). Writes
reports/seed_study.json (every run, with label precision / recall of each
filter, and its commit, date and machine) and reports/seed_study.md (mean +-
standard error over seeds and the differences paired by seed; a difference
counts when it exceeds two standard errors).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from stages.lib import layout
from stages.lib.classifier import (
    ModelConfig,
    TrainConfig,
    plan_run,
    reference_size,
    resolved_run,
    run_context,
    train_on_labels,
)
from stages.lib.clicklog import aggregate_clicks
from stages.lib.data import load_labels
from stages.lib.labelquality import table_quality
from stages.lib.labelsets import label_set, train_keys
from stages.lib.noise import filtered_table
from stages.lib.pairs import PairsConfig, build_pairs
from stages.lib.params import load_params, load_sections
from stages.lib.queries import BreedMatcher
from stages.lib.scoring import class_probs, score_crossfit
from stages.lib.shards import read_index
from stages.lib.siamese import SiameseConfig, fit_siamese, siamese_from_naive
from stages.lib.tables import read_breeds, read_train_keys, read_truth
from stages.lib.testset import evaluate_model, read_test_set
from stages.lib.tracking import save_model
from stages.lib.weaklabels import find_weak_labels

CONFIGS = ("truth", "raw", "naive", "naive_ema", "cleanlab", "cleanlab_ce", "cleanlab_ema", "cleanlab_batch",
           "cleanlab_batch_ce", "cleanlab_batch_nobreed", "cleanlab_batch_nobreed_clicks",
           "cleanlab_batch_nobreed_clicks_ce", "cleanlab_batch_nobreed_uniform", "relabel", "relabel_ce", "threshold",
           "threshold_ce", "paper")
# <filter><variant>: the same filter, another fine-tune (_batch_ce: both); _nobreed: pairs.min_top_prob
VARIANTS = ("_clicks", "_uniform", "_ce", "_ema", "_nobreed", "_batch")
REFERENCES = {"truth": "truth", "raw": "raw"}  # config -> label set
DEFAULT_CONFIGS = ("truth", "raw", "naive", "cleanlab", "relabel", "relabel_ce", "paper")
# the label filter of each fine-tuned configuration on the pipeline's click labels
def _filter_of(name: str) -> str:
    stripped = None
    while stripped != name:  # variants stack in any order (_batch_nobreed_clicks_ce)
        stripped = name
        for variant in VARIANTS:
            name = name.removesuffix(variant)
    return name


FILTERS = {name: _filter_of(name) for name in CONFIGS if _filter_of(name) in ("cleanlab", "relabel", "threshold")}
# <config>_cfN: the fine-tuned <config> with pairs.crossfit_epochs N
SCORER_EPOCHS = re.compile(r"(?P<base>.+)_cf(?P<epochs>[1-9][0-9]*)")


def config_name(name: str) -> str:
    """``--configs`` entry: one of CONFIGS, or a fine-tuned one with a scorer epochs suffix."""
    match = SCORER_EPOCHS.fullmatch(name)
    if name in CONFIGS or (match and match["base"] in FILTERS):
        return name
    raise argparse.ArgumentTypeError(f"unknown configuration {name!r}: choose from {', '.join(CONFIGS)}, or "
                                     f"<config>_cfN (N scorer epochs) for one of {', '.join(FILTERS)}")


def base_config(name: str) -> str:
    """The configuration ``name`` varies: itself, or the <config> of <config>_cfN."""
    match = SCORER_EPOCHS.fullmatch(name)
    return match["base"] if match else name


def scorer_epochs(name: str, default: int) -> int:
    """pairs.crossfit_epochs of a fine-tuned configuration: its _cfN, else params.yaml's."""
    match = SCORER_EPOCHS.fullmatch(name)
    return int(match["epochs"]) if match else default


def scorer_runs(names: list[str], default: int) -> dict[int, list[str]]:
    """The fine-tuned configurations each scorer serves, by pairs.crossfit_epochs: one
    cross-fitting per distinct epochs, shared by every configuration that names them."""
    runs: dict[int, list[str]] = {}
    for name in names:
        runs.setdefault(scorer_epochs(name, default), []).append(name)
    return dict(sorted(runs.items()))


def config_order(names: set[str]) -> list[str]:
    """The configurations in ``names`` in CONFIGS order, each <config>_cfN after its <config>."""
    def key(name: str) -> tuple[int, int]:
        return CONFIGS.index(base_config(name)), scorer_epochs(name, 0)
    return sorted((n for n in names if base_config(n) in CONFIGS), key=key)


# the paper's click-count filter (the defaults before the relabelling filter): see `paper`
PAPER_CLICK_FILTER = {"min_clicks": 2, "min_share": 0.7}
# differences reported, paired by seed: (minuend, subtrahend)
DIFFERENCES = (("cleanlab", "raw"), ("cleanlab", "naive"), ("relabel", "raw"), ("relabel", "naive"),
               ("paper", "raw"), ("threshold", "raw"), ("cleanlab", "relabel"), ("cleanlab", "paper"),
               ("relabel", "paper"), ("cleanlab", "cleanlab_ce"), ("relabel", "relabel_ce"),
               ("threshold", "threshold_ce"), ("cleanlab_ema", "cleanlab"), ("naive_ema", "naive"),
               ("cleanlab_ema", "raw"), ("cleanlab_batch", "raw"), ("cleanlab_batch", "naive"),
               ("cleanlab_batch", "cleanlab"), ("cleanlab_batch", "cleanlab_batch_ce"),
               ("cleanlab_batch_ce", "cleanlab_ce"), ("cleanlab_batch_nobreed", "cleanlab_batch"),
               ("cleanlab_batch_nobreed", "raw"), ("cleanlab_batch_nobreed", "naive"),
               ("cleanlab_batch_nobreed_clicks", "cleanlab_batch_nobreed"),
               ("cleanlab_batch_nobreed_uniform", "cleanlab_batch_nobreed"),
               ("cleanlab_batch_nobreed_clicks", "raw"), ("cleanlab_batch_nobreed_clicks", "naive"),
               ("cleanlab_batch_nobreed_clicks", "cleanlab_batch_nobreed_clicks_ce"), ("naive", "raw"),
               ("truth", "raw"))
# gap recovery (x - raw) / (truth - raw)
GAP_CONFIGS = ("cleanlab", "cleanlab_ema", "cleanlab_batch", "cleanlab_batch_nobreed", "cleanlab_batch_nobreed_clicks",
               "cleanlab_batch_nobreed_clicks_ce", "cleanlab_batch_nobreed_uniform", "relabel", "paper",
               "threshold")
log = logging.getLogger("seed_study")


def provenance(run: dict[str, str], cwd: Path = Path(".")) -> dict[str, str]:
    """Where a study's runs ran, recorded in each row, since one run moves by 2-3 points between
    machines: the commit (``+dirty`` when tracked files differ from it, such as a params.yaml
    edited for the study), the date, and the machine: CPU model (or GPU), cores and the precision
    ``run`` (classifier.resolved_run) resolves to."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    if run["device"] == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        hardware = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                         if line.startswith("model name")), "unknown CPU")
    return {"commit": commit, "date": datetime.date.today().isoformat(),
            "machine": f"{hardware}, {os.cpu_count()} cores, {run['precision']}"}


class Study:
    """The pipeline's inputs and params, shared by every seed."""

    def __init__(self, data: Path, params: dict[str, Any], tmp: Path, ema_half_life: float,
                 min_top_prob: float) -> None:
        self.data, self.params, self.tmp = data, params, tmp
        self.ema_half_life = ema_half_life  # of the *_ema configurations
        self.min_top_prob = min_top_prob  # of the *_nobreed configurations
        self.images = data / "images"
        self.index = read_index(self.images)
        self.keys = train_keys(self.index)
        self.classes = json.loads((data / "filtered" / layout.CLASSES).read_text())
        self.test_images = data / "test_images"  # decode's second output
        self.test_index = read_index(self.test_images)
        self.test, _ = read_test_set(data / "raw", self.test_index)
        truth_path = data / "raw" / layout.TRUTH
        self.truth = read_truth(truth_path) if truth_path.is_file() else None
        self.raw_labels = self.labels("raw")
        self.provenance = provenance(resolved_run(params["train"]))

    def paper_click_labels(self) -> pd.DataFrame:
        """The click labels of the paper's click-count filter (PAPER_CLICK_FILTER),
        computed as filter_clicks does, whatever params.yaml's filter says."""
        breeds = read_breeds(self.data / "raw" / layout.BREEDS)
        aliases = {a: b for a, b in load_params("filter")["aliases"].items() if b in set(breeds)}
        clicks, _ = aggregate_clicks(self.data / "raw" / layout.CLICKS, BreedMatcher(breeds, aliases))
        weak = find_weak_labels(clicks, breeds, train_keys=read_train_keys(self.images / layout.INDEX),
                                min_images_per_class=1, **PAPER_CLICK_FILTER)
        position = {c: i for i, c in enumerate(self.classes)}
        kept = weak.kept[weak.kept["breed"].isin(position)]
        return kept.assign(label=kept["breed"].map(position)).reset_index(drop=True)

    def labels(self, name: str) -> pd.DataFrame | None:
        return label_set(name, raw_dir=self.data / "raw", filtered_dir=self.data / "filtered",
                         classes=self.classes, train_keys=self.keys)

    def score(self, name: str, path: Path, seed: int, start: float, **extra: Any) -> dict[str, Any]:
        result = evaluate_model(name, path, self.test, self.test_images, self.test_index, device="cpu",
                                batch_size=256)
        row = {"config": name, "seed": seed, **{k: result.block[k] for k in ("top1", "top5", "mean_class_accuracy")},
               "seconds": round(time.time() - start, 1), **extra, **self.provenance}
        log.info("seed %d %s: %s", seed, name, row)
        return row

    def naive_recipe(self, name: str, labels: pd.DataFrame, train_cfg: TrainConfig):
        plan = plan_run(labels, train_cfg, reference_size(self.raw_labels, train_cfg))
        model, info = train_on_labels(plan, name=name, images_dir=self.images, num_classes=len(self.classes),
                                      model_cfg=self.params["model"], index=self.index)
        path = self.tmp / f"{name}-{train_cfg.seed}.pt"
        save_model(path, model, backbone=self.params["model"].backbone,
                   image_size=self.params["model"].image_size, classes=self.classes)
        return path, model, plan, info


def run_seed(study: Study, seed: int, configs: list[str]) -> list[dict[str, Any]]:
    train_cfg = study.params["train"].replace(seed=seed)
    rows = []
    for name in [c for c in configs if c in ("truth", "raw")]:
        start = time.time()
        labels = study.labels(REFERENCES[name])
        if labels is None:
            log.info("no %s labels: %s skipped", name, name)
            continue
        path, *_ = study.naive_recipe(name, labels, train_cfg)
        rows.append(study.score(name, path, seed, start))
    pipeline = {c: FILTERS[base_config(c)] for c in configs if base_config(c) in FILTERS}
    click = load_labels(study.data / "filtered" / layout.LABELS)
    if "naive" in configs or pipeline:
        rows += naive_and_fine_tuned("naive", click, seed, pipeline, study, train_cfg, "naive" in configs)
    if "naive_ema" in configs:
        start = time.time()
        path, *_ = study.naive_recipe("naive_ema", click[click["label"] >= 0],
                                      train_cfg.replace(ema_half_life=study.ema_half_life))
        rows.append(study.score("naive_ema", path, seed, start, ema_half_life=study.ema_half_life))
    if "paper" in configs:
        rows += naive_and_fine_tuned("paper_naive", study.paper_click_labels(), seed, {"paper": "threshold"},
                                     study, train_cfg, False)
    return rows


def fine_tune_config(name: str, cfg: SiameseConfig, ema_half_life: float) -> SiameseConfig:
    """params.yaml's fine-tune as configuration ``name`` (or its <config>_cfN) names it."""
    name = base_config(name)  # the fine-tune's variants are the base configuration's
    if name.endswith("_ce"):
        cfg = cfg.replace(contrastive_weight=0.0)
    if name.endswith("_ema"):
        cfg = cfg.replace(ema_half_life=ema_half_life)
    # each configuration names its fine-tune's pairs, whatever params.yaml's default
    cfg = cfg.replace(contrastive="batch" if "_batch" in name else "pairs")
    # ... and how often its batches draw each breed (_clicks, _uniform; else as kept)
    share = next((x for x in ("clicks", "uniform") if f"_{x}" in name), "kept")
    return cfg.replace(breed_share=share)


def naive_and_fine_tuned(naive_name: str, labels: pd.DataFrame, seed: int, fine: dict[str, str], study: Study,
                         train_cfg: TrainConfig, score_naive: bool) -> list[dict[str, Any]]:
    """train_naive on ``labels``, then make_pairs (out-of-fold probabilities
    once per scorer epochs, then each configuration's filter) and train_siamese,
    as the stages do."""
    params, rows = study.params, []
    start = time.time()
    naive_path, naive, plan, _ = study.naive_recipe(naive_name, labels[labels["label"] >= 0], train_cfg)
    if score_naive:
        rows.append(study.score(naive_name, naive_path, seed, start))
    if not fine:
        return rows
    p = params["pairs"].replace(seed=seed)
    ctx = run_context(train_cfg.device, train_cfg.precision)
    val_probs = class_probs(naive, plan.val, study.images, study.index, ctx,
                            image_size=params["model"].image_size, batch_size=train_cfg.batch_size)
    val_pred = plan.val.assign(pred=val_probs.argmax(1))
    probs, crossfit_s = {}, {}
    served = scorer_runs(list(fine), p.crossfit_epochs)
    for epochs in served:
        start = time.time()
        probs[epochs] = score_crossfit(labels, folds=p.folds, epochs=epochs, seed=seed, images=study.images,
                                       index=study.index, num_classes=len(study.classes),
                                       model_cfg=params["model"], train_cfg=train_cfg)
        crossfit_s[epochs] = time.time() - start
    raw = load_labels(study.data / "filtered" / layout.RAW_LABELS)
    for name, method in fine.items():
        epochs = scorer_epochs(name, p.crossfit_epochs)
        start = time.time() - crossfit_s[epochs] / len(served[epochs])  # each model carries its scorer's share
        # each configuration names its filter's min_top_prob, whatever params.yaml's default
        pc = p.replace(min_top_prob=study.min_top_prob if "_nobreed" in name else 0.0)
        clean, _ = filtered_table(labels, probs[epochs], study.classes, **pc.noise_settings(method))
        quality = table_quality(clean, raw, study.truth) if study.truth is not None else {}
        train_clean = clean[~clean["key"].isin(set(plan.val["key"]))].reset_index(drop=True)
        pairs, _, _ = build_pairs(train_clean, val_pred, len(study.classes), p)
        cfg = fine_tune_config(name, params["siamese"].replace(seed=seed), study.ema_half_life)
        model, meta = siamese_from_naive(naive_path, cfg)
        fit_siamese(model, meta, clean, pairs, plan.val, images_dir=study.images, index=study.index, cfg=cfg,
                    click_labels=labels.loc[labels["label"] >= 0, "label"])
        path = study.tmp / f"{name}-{seed}.pt"
        save_model(path, model, backbone=meta["backbone"], image_size=meta["image_size"], classes=study.classes)
        rows.append(study.score(name, path, seed, start, filter=method, clean_images=len(clean),
                                label_precision=quality.get("precision"), label_recall=quality.get("recall"),
                                distractors=quality.get("distractors"), crossfit_epochs=epochs,
                                siamese_epochs=cfg.epochs, siamese_lr=cfg.lr))
    return rows


def _mean_se(x: pd.Series) -> str:
    if len(x) < 2:
        return f"{x.mean():.3f} (one seed)"
    return f"{x.mean():.3f} ± {x.std(ddof=1) / np.sqrt(len(x)):.3f}"


def summary_table(runs: pd.DataFrame) -> str:
    """Mean +- standard error over seeds per configuration, then the paired differences."""
    lines = ["| model | seeds | test top-1 | mean per-class acc | top-5 | label precision / recall |",
             "|---|---|---|---|---|---|"]
    for name in config_order(set(runs["config"])):
        r = runs[runs["config"] == name]
        quality = "–"
        if "label_precision" in r and r["label_precision"].notna().any():
            quality = f"{r['label_precision'].mean():.3f} / {r['label_recall'].mean():.3f}"
            if "distractors" in r and r["distractors"].notna().any():  # non-dogs still labelled (runs since 12-04)
                quality += f" ({r['distractors'].mean():.0f} distractors)"
        lines.append(f"| {name} | {len(r)} | {_mean_se(r['top1'])} | {_mean_se(r['mean_class_accuracy'])} "
                     f"| {_mean_se(r['top5'])} | {quality} |")
    return "\n".join(lines) + "\n\n" + paired_differences(runs)


def paired_differences(runs: pd.DataFrame) -> str:
    """Test top-1 differences paired by seed; a difference counts only when it
    exceeds two standard errors of the paired differences."""
    top1 = runs.pivot_table(index="seed", columns="config", values="top1")
    lines = ["| difference in test top-1 (paired by seed) | seeds | mean ± s.e. | beyond 2 s.e.? |",
             "|---|---|---|---|"]
    longer = [c for c in config_order(set(top1)) if base_config(c) != c]  # <config>_cfN - <config>, - raw, - naive
    for a, b in [*DIFFERENCES, *((c, x) for c in longer for x in (base_config(c), "raw", "naive"))]:
        if a not in top1 or b not in top1:
            continue
        d = (top1[a] - top1[b]).dropna()
        if len(d) < 2:
            lines.append(f"| {a} − {b} | {len(d)} | {d.mean():+.3f} | one seed: cannot tell |")
            continue
        se = d.std(ddof=1) / np.sqrt(len(d))
        verdict = "yes" if abs(d.mean()) > 2 * se else "no: within seed noise"
        lines.append(f"| {a} − {b} | {len(d)} | {d.mean():+.3f} ± {se:.3f} | {verdict} |")
    gaps = []
    gap_names = [c for c in set(top1) if base_config(c) in GAP_CONFIGS] if {"raw", "truth"} <= set(top1) else []
    for name in sorted(gap_names, key=lambda c: (GAP_CONFIGS.index(base_config(c)), scorer_epochs(c, 0))):
        g = ((top1[name] - top1["raw"]) / (top1["truth"] - top1["raw"])).dropna()
        if len(g):
            gaps.append(f"{name}: " + ", ".join(f"{v:.2f}" for v in g) + f" (mean {_mean_se(g)})")
    if gaps:
        lines += ["", "Gap recovery (model − raw) / (truth − raw), per seed: " + "; ".join(gaps) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", type=config_name, default=list(DEFAULT_CONFIGS), metavar="CONFIG",
                   help=f"{' '.join(CONFIGS)}, or a fine-tuned one with _cfN (N scorer epochs); "
                        f"default: {' '.join(DEFAULT_CONFIGS)} (the committed study)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--ema-half-life", type=float, default=1.0,
                   help="train/siamese.ema_half_life (epochs) of the *_ema configurations")
    p.add_argument("--min-top-prob", type=float, default=0.2,
                   help="pairs.min_top_prob of the *_nobreed configurations")
    p.add_argument("--summarize", action="store_true", help="only rewrite seed_study.md from seed_study.json")
    args = p.parse_args()
    if args.summarize:
        runs_df = pd.DataFrame(json.loads((args.out / "seed_study.json").read_text()))
        (args.out / "seed_study.md").write_text(summary_table(runs_df))
        print(summary_table(runs_df))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    params = load_sections(model=ModelConfig, train=TrainConfig, pairs=PairsConfig, siamese=SiameseConfig)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        study = Study(args.data, params, Path(tmp), args.ema_half_life, args.min_top_prob)
        for seed in args.seeds:
            runs += run_seed(study, seed, args.configs)
            args.out.mkdir(parents=True, exist_ok=True)  # after every seed: a long study can be read early
            (args.out / "seed_study.json").write_text(json.dumps(runs, indent=2))
            (args.out / "seed_study.md").write_text(summary_table(pd.DataFrame(runs)))
    print(summary_table(pd.DataFrame(runs)))


if __name__ == "__main__":
    main()
