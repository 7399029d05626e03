"""train_siamese stage: fine-tune the naive model as a siamese network.

    python -m stages.train_siamese data/pairs data/images models/naive models/siamese
    torchrun --nproc_per_node 4 -m stages.train_siamese data/pairs data/images models/naive models/siamese

Two weight-sharing branches (one network run on both images of each pair)
start from the naive model (``siamese.start: naive``, the paper) or, with
pretrained weights, from the initial trunk with a linear probe of the clean
labels as its head (``start: probe``: LP-FT on the label filter's kept set).
Loss = CE(a) + CE(b) + ``contrastive_weight`` x
contrastive(d(emb_a, emb_b), same) with the margin loss of Hadsell, Chopra &
LeCun (2006); with ``siamese.contrastive: batch`` the pairs are every two
images of P breeds x K images batches of the clean set instead
(``stages.lib.siamese.batch_loss``). The training loop is the naive stage's (``stages.lib.engine``);
validation is on the naive run's validation split, so the two are compared on
the same images. Output layout as the naive stage: ``model.pt``, ``live/``,
``checkpoints/last.pt`` (persisted, resumable).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib import layout, runtime
from stages.lib.atomic import exit_on_sigterm, refuse_overlapping_args
from stages.lib.classifier import ModelConfig, TrainConfig, resolved_run
from stages.lib.cli import run_stage
from stages.lib.data import load_labels
from stages.lib.imagecache import CacheConfig, hold_decoded
from stages.lib.params import load_sections
from stages.lib.shards import read_index
from stages.lib.siamese import SiameseConfig, check_start, fit_siamese, siamese_from_naive, siamese_from_probe
from stages.lib.tables import read_table
from stages.lib.tracking import EpochLogger, file_digest, run_fingerprint, save_model

log = logging.getLogger("train_siamese")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("pairs_dir", "images_dir", "naive_dir", "out_dir"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a killed stage removes its partial outputs
    refuse_overlapping_args(args, "out_dir", "train_siamese")  # replacing the output must not delete an input
    params = load_sections(args.params, siamese=SiameseConfig, cache=CacheConfig, model=ModelConfig,
                           train=TrainConfig)
    cfg = params["siamese"]
    check_start(cfg, params["model"])
    _, world = runtime.init_distributed(cfg.device)

    clean = load_labels(args.pairs_dir / layout.CLEAN)
    pairs = read_table(args.pairs_dir / layout.PAIRS)
    # every click-filtered image's label, before the label filter: read only where breed_share: clicks draws by it
    click_labels = read_table(args.pairs_dir / layout.SCORES)["label"] if cfg.breed_share == "clicks" else None
    val = read_table(args.naive_dir / layout.VAL_PREDICTIONS)
    index = read_index(args.images_dir)
    cache = hold_decoded(args.images_dir, index, [*clean["key"], *val["key"]], params["cache"])
    if cfg.start == "probe":
        model, meta = siamese_from_probe(args.naive_dir / layout.MODEL, clean, cfg, model_cfg=params["model"],
                                         train_cfg=params["train"], images_dir=args.images_dir, index=index,
                                         cache=cache)
    else:
        model, meta = siamese_from_naive(args.naive_dir / layout.MODEL, cfg)
    out = args.out_dir
    logger = None
    if runtime.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        logger = EpochLogger(out / layout.LIVE)
    run_args = run_fingerprint("stages.train_siamese", siamese=cfg, resolved=resolved_run(cfg), world_size=world,
                               data=file_digest(args.pairs_dir / layout.PAIRS, args.naive_dir / layout.MODEL))
    history = fit_siamese(model, meta, clean, pairs, val, images_dir=args.images_dir, index=index, cfg=cfg,
                          cache=cache, checkpoint=out / layout.CHECKPOINTS / layout.LAST_CHECKPOINT, args=run_args,
                          on_epoch=logger, click_labels=click_labels)
    if runtime.is_main_process():
        save_model(out / layout.MODEL, model, backbone=meta["backbone"], image_size=meta["image_size"],
                   classes=meta["classes"], epochs=cfg.epochs, **resolved_run(cfg))
        logger.end()
        log.info("validation top-1 %.4f after %d epochs", history[-1]["val_acc"], len(history))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main, "train_siamese"))
