"""train_references stage: the naive recipe on the reference label sets.

    python -m stages.train_references data/raw data/filtered data/images models/references

The paper's baseline is *naive training on the clicks*: ``raw`` trains the
naive recipe (params ``model``, ``train``) on each image's top-clicked breed
without any filter. Where ``truth.tsv`` exists (the generated sample),
``truth`` trains it on the true breeds: the ceiling. On real data the truth
reference is absent and logged as such. Every reference gets the step budget
of ``train.epochs`` epochs over the raw click-labelled split, as the naive
model does, so the three differ only in their labels.

Writes ``<name>/model.pt`` per reference and ``report.json`` (images, epochs,
steps, validation top-1 against each set's own labels, device, precision).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from stages.lib import layout
from stages.lib.atomic import atomic_dir, exit_on_sigterm, refuse_overlapping_args, write_json
from stages.lib.classifier import ModelConfig, TrainConfig, plan_run, reference_size, train_on_labels
from stages.lib.imagecache import CacheConfig, DecodedImages, hold_decoded
from stages.lib.labelsets import label_set, train_keys
from stages.lib.parallel import map_runs
from stages.lib.params import Section, load_sections
from stages.lib.shards import read_index
from stages.lib.tracking import save_model

log = logging.getLogger("train_references")


@dataclass(frozen=True)
class ReferenceConfig(Section):
    """params.yaml ``reference``: which reference label sets to train."""

    labels: tuple[Literal["raw", "truth"], ...]

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {list(self.labels)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("raw_dir", "filtered_dir", "images_dir", "out_dir"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    refuse_overlapping_args(args, "out_dir", "train_references")  # replacing the output must not delete an input
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    params = load_sections(args.params, model=ModelConfig, train=TrainConfig, reference=ReferenceConfig,
                           cache=CacheConfig)
    model_cfg, train_cfg, names = params["model"], params["train"], params["reference"].labels

    classes = json.loads((args.filtered_dir / layout.CLASSES).read_text())
    index = read_index(args.images_dir)
    keys = train_keys(index)
    sets = {name: label_set(name, raw_dir=args.raw_dir, filtered_dir=args.filtered_dir,
                            classes=classes, train_keys=keys) for name in names}
    raw = sets.get("raw")
    if raw is None:
        raw = label_set("raw", raw_dir=args.raw_dir, filtered_dir=args.filtered_dir,
                        classes=classes, train_keys=keys)
    reference_train = reference_size(raw, train_cfg)
    cache = hold_decoded(args.images_dir, index, (k for s in sets.values() if s is not None for k in s["key"]),
                         params["cache"])
    report: dict[str, dict | None] = dict.fromkeys(sets)  # in params order; None: skipped
    for name in (n for n, labels in sets.items() if labels is None):
        log.info("reference %s skipped: the data has no %s (only the generated sample does)", name, layout.TRUTH)
    todo = [name for name, labels in sets.items() if labels is not None]
    with atomic_dir(args.out_dir) as tmp:
        # the references are independent: side by side (train.parallel_runs)
        infos = map_runs(train_reference, [(name, sets[name], reference_train, tmp / name / layout.MODEL,
                                            args.images_dir, classes, model_cfg, train_cfg, index, cache)
                                           for name in todo], train_cfg.parallel_runs)
        for name, info in zip(todo, infos):
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
    raise SystemExit(main())
