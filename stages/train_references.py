"""train_references stage: the reference models every other is judged against.

    python -m stages.train_references data/raw data/filtered data/images models/references

The paper's baseline is *naive training on the clicks*: ``raw`` trains the
naive recipe (params ``model``, ``train``) on each image's top-clicked breed
without any filter. Where ``truth.tsv`` exists (the generated sample),
``truth`` trains it on the true breeds: the ceiling. On real data the truth
reference is absent and logged as such. Every reference gets the step budget
of ``train.epochs`` epochs over the raw click-labelled split, as the naive
model does, so the three differ only in their labels.

``probe_raw``, ``probe_naive`` and ``probe_truth`` are linear probes: a
logistic regression (``reference.probe``, ``stages.lib.probe``) on the frozen
features of the initial trunk, fitted on the same training split of the raw
click labels, of the click filter's labels (the naive model's) and of the
true breeds. In the pretrained regime they are the floor: a fine-tuned model
below the probe of its own labels has destroyed what it started from (with
``train.head_init: probe`` and ``train.probe`` as ``reference.probe``,
``probe_naive`` is the naive model's starting point). Each is saved as an
ordinary model file (the initial trunk, the regression as its head), so
``evaluate`` scores it like the others. With ``model.weights: none`` the
frozen features are random and mean nothing: the probes are skipped, with a
log line.

Writes ``<name>/model.pt`` per reference and ``report.json`` (images, epochs,
steps, validation top-1 against each set's own labels, device, precision;
null for a skipped reference).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from stages.lib import layout
from stages.lib.atomic import atomic_dir, exit_on_sigterm, refuse_overlapping_args, write_json
from stages.lib.classifier import (
    ModelConfig,
    TrainConfig,
    check_head_init,
    plan_run,
    reference_size,
    train_on_labels,
)
from stages.lib.cli import run_stage
from stages.lib.imagecache import CacheConfig, DecodedImages, hold_decoded
from stages.lib.labelsets import PROBE, ReferenceConfig, label_set, train_keys, train_probes
from stages.lib.parallel import map_runs
from stages.lib.params import load_sections
from stages.lib.shards import read_index
from stages.lib.tracking import save_model

log = logging.getLogger("train_references")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("raw_dir", "filtered_dir", "images_dir", "out_dir"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    refuse_overlapping_args(args, "out_dir", "train_references")  # replacing the output must not delete an input
    params = load_sections(args.params, model=ModelConfig, train=TrainConfig, reference=ReferenceConfig,
                           cache=CacheConfig)
    model_cfg, train_cfg, ref = params["model"], params["train"], params["reference"]
    check_head_init(model_cfg, train_cfg)

    classes = json.loads((args.filtered_dir / layout.CLASSES).read_text())
    index = read_index(args.images_dir)
    keys = train_keys(index)
    report: dict[str, dict | None] = dict.fromkeys(ref.labels)  # in params order; None: skipped
    wanted = list(ref.labels)
    if not model_cfg.pretrained:
        for name in (n for n in ref.labels if n.startswith(PROBE)):
            log.info("reference %s skipped: model.weights is %r, and the frozen features of a random trunk make no "
                     "floor (a linear probe needs pretrained weights: imagenet or a weights file)", name,
                     model_cfg.weights)
            wanted.remove(name)
    # the label sets the wanted references train on, each read once
    sets = {s: label_set(s, raw_dir=args.raw_dir, filtered_dir=args.filtered_dir, classes=classes, train_keys=keys)
            for s in dict.fromkeys(n.removeprefix(PROBE) for n in wanted)}
    raw = sets.get("raw")
    if raw is None:
        raw = label_set("raw", raw_dir=args.raw_dir, filtered_dir=args.filtered_dir,
                        classes=classes, train_keys=keys)
    reference_train = reference_size(raw, train_cfg)
    cache = hold_decoded(args.images_dir, index, (k for s in sets.values() if s is not None for k in s["key"]),
                         params["cache"])
    for name in (n for n in wanted if sets[n.removeprefix(PROBE)] is None):
        log.info("reference %s skipped: the data has no %s (only the generated sample does)", name, layout.TRUTH)
    todo = [name for name in wanted if sets[name.removeprefix(PROBE)] is not None]
    naive = [name for name in todo if not name.startswith(PROBE)]
    probes = {name: sets[name.removeprefix(PROBE)] for name in todo if name.startswith(PROBE)}
    with atomic_dir(args.out_dir) as tmp:
        # the references are independent: side by side (train.parallel_runs)
        infos = map_runs(train_reference, [(name, sets[name], reference_train, tmp / name / layout.MODEL,
                                            args.images_dir, classes, model_cfg, train_cfg, index, cache)
                                           for name in naive], train_cfg.parallel_runs)
        for name, info in zip(naive, infos):
            report[name] = info
            log.info("reference %s: %s", name, info)
        if probes:
            for name, info in train_probes(probes, tmp, args.images_dir, classes, model_cfg, train_cfg, ref.probe,
                                           index, cache).items():
                report[name] = info
                log.info("reference %s: %s", name, info)
        write_json(tmp / layout.REPORT, report)
    return 0


def train_reference(name: str, labels: pd.DataFrame, reference_train: int, path: Path, images_dir: Path,
                    classes: list[str], model_cfg: ModelConfig, train_cfg: TrainConfig, index: pd.DataFrame,
                    cache: DecodedImages | None) -> dict[str, Any]:
    """Train one reference (the naive recipe on its labels) and save it to ``path``; its report entry."""
    start = time.time()
    plan = plan_run(labels, train_cfg, reference_train)
    model, info = train_on_labels(plan, name=f"reference {name}", images_dir=images_dir, num_classes=len(classes),
                                  model_cfg=model_cfg, index=index, cache=cache)
    save_model(path, model, backbone=model_cfg.backbone, image_size=model_cfg.image_size, classes=classes,
               labels=name, **info)
    return {**info, "seconds": round(time.time() - start, 1)}


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "train_references"))
