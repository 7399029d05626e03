"""Loader efficiency of the naive training step (a benchmark, not a test).

Images/s of the real pipeline (shard reads, JPEG decode, augmentation in
DataLoader workers, forward/backward/step; and the same from the decoded-image
cache, ``cache.max_mb``) against the same step on
in-memory random tensors of the same shape. Ratio = real / in-memory; 1.0
means the loader costs nothing. Run after `make repro` (needs data/filtered
and data/images):

    python benchmarks/train_loader.py --steps 30 --workers 0 1 2
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from stages.lib import engine, layout
from stages.lib.classifier import ModelConfig, TrainConfig, run_context
from stages.lib.data import ShardDataset, build_transform, load_labels
from stages.lib.imagecache import DecodedImages
from stages.lib.models import create_model
from stages.lib.params import load_sections
from stages.lib.shards import read_index


def sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without this the clock stops before the GPU does
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, loss_fn, batches, optimizer, ctx, steps: int, warmup: int = 3) -> float:
    model.train()
    it = iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            sync(ctx.device)
            start = time.perf_counter()
        batch = next(it)
        with ctx.autocast():
            loss, _, n = loss_fn(model, batch, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(ctx.device)
    return steps * n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=Path("data"))
    args = p.parse_args()
    params = load_sections(model=ModelConfig, train=TrainConfig)
    model_cfg, cfg = params["model"], params["train"]
    ctx = run_context(cfg.device, cfg.precision)
    labels = load_labels(args.data / "filtered" / layout.LABELS)
    classes = json.loads((args.data / "filtered" / layout.CLASSES).read_text())
    size, bs = model_cfg.image_size, cfg.batch_size
    ds = ShardDataset(args.data / "images", labels["key"].tolist(), labels["label"].tolist(),
                      build_transform(size, train=True, augment=cfg.augment))
    model = create_model(model_cfg.backbone, len(classes)).to(ctx.device, memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model, cfg)
    loss_fn = engine.classification_loss(cfg.label_smoothing)
    g = torch.Generator().manual_seed(0)
    fake = [(torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, generator=g),
             torch.randint(0, len(classes), (bs,), generator=g))
            for _ in range(4)]
    # a long warm-up: the first steps of a fresh model run slow (allocator, thread pool)
    ideal = time_steps(model, loss_fn, (fake[i % 4] for i in range(10**9)), optimizer, ctx, args.steps, warmup=15)
    print(f"backbone {model_cfg.backbone}, {size}px, batch {bs}, precision {ctx.amp_dtype or 'fp32'}, "
          f"{torch.get_num_threads()} threads")
    print("| loader | images/s | ratio to in-memory |\n|---|---|---|")
    print(f"| in-memory random tensors | {ideal:.0f} | 1.00 |")
    cached = ShardDataset(args.data / "images", labels["key"].tolist(), labels["label"].tolist(),
                          build_transform(size, train=True, augment=cfg.augment),
                          cache=DecodedImages.decode(args.data / "images", read_index(args.data / "images"),
                                                     labels["key"]))
    for (name, data), workers in itertools.product([("shards", ds), ("decoded cache", cached)], args.workers):
        loader = engine.make_loader(data, batch_size=bs, train=True, seed=0, workers=workers, device=ctx.device)

        def forever(loader=loader):
            epoch = 0
            while True:
                loader.sampler.set_epoch(epoch)
                yield from loader
                epoch += 1

        batches = forever()
        real = time_steps(model, loss_fn, batches, optimizer, ctx, args.steps)
        print(f"| {name}, {workers} workers | {real:.0f} | {real / ideal:.2f} |", flush=True)
        # stop this loader's persistent workers before the next row: idle workers left alive slowed every
        # later row's training step by ~40% on 2 cores, whatever loader it used
        batches.close()
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()
        del loader, batches
    again = time_steps(model, loss_fn, (fake[i % 4] for i in range(10**9)), optimizer, ctx, args.steps)
    print(f"| in-memory random tensors, again | {again:.0f} | {again / ideal:.2f} |")


if __name__ == "__main__":
    main()
