"""Loader efficiency of the naive training step (a benchmark, not a test).

Images/s of the real pipeline (shard reads or the decoded-image cache,
``cache.max_mb``; augmentation in the loader, ``augment.where: loader``, or
on the training device, ``where: device``; forward/backward/step) against
the same step fed from memory: uint8 batches of the same shape already on
the training device. Ratio = real / in-memory; 1.0 means the loader costs
nothing. Each model is a BACKBONE:SIZE:BATCH; the default is the sample's
model and ResNet-50 at 224 px. Run after `make repro` (needs data/filtered
and data/images):

    python benchmarks/train_loader.py --steps 30 --workers 0 1 2
    python benchmarks/train_loader.py --models resnet50:224:256 --device cuda --precision bf16 --workers 8 14
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch

from stages.lib import batchaug, engine, layout
from stages.lib.classifier import ModelConfig, TrainConfig, run_context
from stages.lib.data import ShardDataset, load_labels
from stages.lib.imagecache import DecodedImages
from stages.lib.models import create_model
from stages.lib.params import load_sections
from stages.lib.presets import build_transform
from stages.lib.shards import read_index


def sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without this the clock stops before the GPU does
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, loss_fn, batches, optimizer, ctx, steps: int, warmup: int = 3, prefetch: bool = False) -> float:
    """Images/s of ``steps`` training steps; ``prefetch``: each batch copied (and augmented) on a side CUDA
    stream one step ahead, as ``engine.train_one_epoch`` does on CUDA."""
    model.train()
    it = iter(batchaug.prefetch(batches, ctx.device, channels_last=ctx.channels_last) if prefetch else batches)
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


def endless(loader):
    """The loader's batches epoch after epoch (the sample has few batches an epoch)."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def bench_model(backbone: str, size: int, batch: int, *, cfg, ctx, data: Path, labels, caches, workers_list,
                steps: int, wheres=("loader", "device"), pin: bool | None = None):
    """Rows (loader, images/s, ratio) for one model."""
    classes = json.loads((data / "filtered" / layout.CLASSES).read_text())
    keys, ys = labels["key"].tolist(), labels["label"].tolist()
    model = create_model(backbone, len(classes)).to(ctx.device, memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model, cfg)
    loss_fn = engine.classification_loss(cfg.label_smoothing)
    g = torch.Generator().manual_seed(0)
    fake = [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
             torch.randint(0, len(classes), (batch,), generator=g)) for _ in range(4)]
    fake = [(engine.to_device(x, ctx), y.to(ctx.device)) for x, y in fake]  # fed from memory: already there
    # a long warm-up: the first steps of a fresh model run slow (allocator, thread pool, cuDNN's choices)
    ideal = time_steps(model, loss_fn, (fake[i % 4] for i in itertools.count()), optimizer, ctx, steps, warmup=15)
    rows = [("in-memory batches on the device", ideal)]
    prefetching = (False, True) if ctx.device.type == "cuda" else (False,)
    # the device augmentation's own cost: its input batches made once and held (pinned) in memory
    device_ds = ShardDataset(data / "images", keys, ys, build_transform(size, train=True, augment=cfg.augment,
                                                                        on_device=True))
    raw = [batchaug.collate([device_ds[(i * batch + j) % len(device_ds)] for j in range(batch)]) for i in range(4)]
    raw = [(x.pin_memory() if ctx.device.type == "cuda" else x, y) for x, y in raw]
    for prefetch in prefetching:
        rate = time_steps(model, loss_fn, (raw[i % 4] for i in itertools.count()), optimizer, ctx, steps,
                          prefetch=prefetch)
        rows.append((f"in-memory host batches, augment on device{', prefetch' if prefetch else ''}", rate))
    for (source, cache), where, workers, prefetch in itertools.product(caches, wheres, workers_list,
                                                                       prefetching):
        ds = ShardDataset(data / "images", keys, ys, build_transform(size, train=True, augment=cfg.augment,
                                                                     on_device=where == "device"), cache=cache)
        loader = engine.make_loader(ds, batch_size=batch, train=True, seed=0, workers=workers, device=ctx.device,
                                    pin_memory=pin)
        batches = endless(loader)
        real = time_steps(model, loss_fn, batches, optimizer, ctx, steps, warmup=5, prefetch=prefetch)
        rows.append((f"{source}, augment on {where}, {workers} workers{', prefetch' if prefetch else ''}", real))
        print(f"  {backbone} {size}px: {rows[-1][0]}: {real:.0f} images/s ({real / ideal:.2f})", flush=True)
        # stop this loader's persistent workers before the next row: idle workers left alive slowed every
        # later row's training step by ~40% on 2 cores, whatever loader it used
        batches.close()
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()
        del loader, batches
    again = time_steps(model, loss_fn, (fake[i % 4] for i in itertools.count()), optimizer, ctx, steps)
    rows.append(("in-memory batches on the device, again", again))
    return rows, ideal


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=None,
                   help="BACKBONE:SIZE:BATCH (default: the params' model and resnet50:224:256)")
    p.add_argument("--device", default=None, help="default: params train.device")
    p.add_argument("--precision", default=None, help="default: params train.precision")
    p.add_argument("--sources", nargs="+", choices=["shards", "cache"], default=["shards", "cache"])
    p.add_argument("--where", nargs="+", choices=["loader", "device"], default=["loader", "device"])
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training process")
    p.add_argument("--no-pin", action="store_true", help="loaders without pinned memory")
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = p.parse_args()
    params = load_sections(model=ModelConfig, train=TrainConfig)
    model_cfg, cfg = params["model"], params["train"]
    ctx = run_context(args.device or cfg.device, args.precision or cfg.precision)
    torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or [f"{model_cfg.backbone}:{model_cfg.image_size}:{cfg.batch_size}", "resnet50:224:256"]
    labels = load_labels(args.data / "filtered" / layout.LABELS)
    caches = []
    for source in args.sources:
        cache = None
        if source == "cache":
            cache = DecodedImages.decode(args.data / "images", read_index(args.data / "images"), labels["key"])
        caches.append(("decoded cache" if cache is not None else "shards", cache))
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or "cpu"
    header = (f"device {ctx.device.type} ({device}), {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch "
              f"threads, torch {torch.__version__}, precision {ctx.amp_dtype or 'fp32'}, channels_last, "
              f"{args.steps} timed steps{', unpinned loaders' if args.no_pin else ''}")
    print(header, flush=True)
    table, record = [], {"header": header, "rows": []}
    for spec in models:
        backbone, size, batch = spec.split(":")
        rows, ideal = bench_model(backbone, int(size), int(batch), cfg=cfg, ctx=ctx, data=args.data, labels=labels,
                                  caches=caches, workers_list=args.workers, steps=args.steps, wheres=args.where,
                                  pin=False if args.no_pin else None)
        for name, rate in rows:
            table.append(f"| {backbone}, {size} px, batch {batch} | {name} | {rate:.0f} | {rate / ideal:.2f} |")
            record["rows"].append({"model": spec, "loader": name, "images_per_s": rate, "ratio": rate / ideal})
    print(header)
    print("| model | loader | images/s | ratio to in-memory |\n|---|---|---:|---:|")
    print("\n".join(table))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
