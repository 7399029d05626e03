"""Benchmark the decode stage against the plain approach (a script, not a test).

    .venv/bin/python benchmarks/decode.py [--images 20000] [--workdir /tmp/clickdog-bench]

Generates (once, reused) a Clickture-format image TSV of noisy 256x256 JPEGs
of about 30 KB each, then runs every measurement in its own subprocess and
prints a markdown table of images/s, MB/s (of TSV input), images per
CPU-second (all processes; the per-core rate, and the fair one on a shared
machine where wall time depends on the neighbours) and peak RSS:

- stage, copy: ``decode_dataset`` with max_short_side 0 (validate and copy);
- stage, resize: max_short_side 128 (draft-decode, resize, re-encode);
- plain: ``pandas.read_csv`` of the whole file, then b64decode + PIL
  open/convert/save per row.

Peak RSS is measured two ways: the largest single process (getrusage, the
stage's main process or a pool worker) and the sum over the process tree
(psutil, sampled every 100 ms; shared pages are counted in every process, so
this overstates the real footprint). The small file shows whether memory
depends on the file size. The TSV is read from the page cache.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DISTINCT = 512  # distinct images, cycled under unique keys: generation stays fast


def make_jpeg(rng: np.random.Generator, side: int = 256) -> bytes:
    """A noisy 256x256 JPEG of about 30 KB (a smooth colour field plus noise)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    base = c0 + np.multiply.outer(x, c1 - c0) + np.multiply.outer(y, c2 - c0)
    arr = np.clip(base + rng.normal(0, 28, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def generate(path: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` lines ``key<TAB>base64 JPEG`` to ``path`` unless it exists."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    pool = [base64.b64encode(make_jpeg(rng)) for _ in range(DISTINCT)]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb", buffering=1 << 20) as f:
        for i in range(n):
            f.write(b"img%08d\t%s\n" % (i, pool[i % DISTINCT]))
    os.replace(tmp, path)


def stage_params(workers: int, max_short_side: int) -> dict:
    return {"columns": ["key", "image"], "header": False, "max_short_side": max_short_side,
            "max_pixels": 40_000_000, "max_line_bytes": 16 << 20, "jpeg_quality": 90,
            "shard_mb": 256, "workers": workers, "block_lines": 256, "max_reject_fraction": 0.05}


def run_stage(tsv: Path, out: Path, workers: int, max_short_side: int) -> int:
    """Measured body: the decode stage on ``tsv`` (test split: a 1-line file)."""
    sys.path.insert(0, str(REPO))
    from stages.lib import layout
    from stages.lib.decoding import decode_dataset

    raw = out / "raw"
    raw.mkdir(parents=True)
    os.symlink(tsv, raw / layout.TRAIN_IMAGES)
    with open(tsv, "rb") as f:
        (raw / layout.TEST_IMAGES).write_bytes(b"test0\t" + f.readline().split(b"\t", 1)[1])
    stats = decode_dataset(raw, out / "images", stage_params(workers, max_short_side))
    return stats["images"]


def run_plain(tsv: Path, out: Path) -> int:
    """Measured body: what one would write first: load it all, loop over rows."""
    import pandas as pd

    df = pd.read_csv(tsv, sep="\t", header=None, names=["key", "image"], dtype=str,
                     quoting=csv.QUOTE_NONE, engine="c")
    out.mkdir(parents=True)
    n = 0
    with open(out / "images.bin", "wb") as f:
        for b64 in df["image"]:
            img = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            f.write(buf.getvalue())
            n += 1
    return n


def child_main(args: argparse.Namespace) -> None:
    # Clocks start after the interpreter's start-up and the imports: they are not decoding.
    sys.path.insert(0, str(REPO))
    import stages.lib.decoding  # noqa: F401
    start, own0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if args.run == "plain":
        images = run_plain(args.tsv, args.out)
    else:
        images = run_stage(args.tsv, args.out, args.workers, args.max_short_side)
    seconds = time.perf_counter() - start
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "cpu_s": (own.ru_utime + own.ru_stime - own0.ru_utime - own0.ru_stime
                  + kids.ru_utime + kids.ru_stime),
        "images": images, "seconds": seconds,
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def measure(kind: str, tsv: Path, workdir: Path, workers: int = 1, max_short_side: int = 0) -> dict:
    """Run one measurement in a fresh subprocess, sampling its tree's RSS."""
    import psutil

    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--run", kind, "--tsv", str(tsv), "--out", str(out),
           "--workers", str(workers), "--max-short-side", str(max_short_side)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                total = 0
                for q in [p, *p.children(recursive=True)]:
                    try:
                        total += q.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
                # every 0.1 s: at 0.02 s this sampler took enough of a 2-core machine to cut the 2-worker
                # rate by a fifth (RSS changes slowly here; the largest process's peak is exact anyway)
                time.sleep(0.1)
        except psutil.Error:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    mb = tsv.stat().st_size / 1e6
    result.update(
        tree_peak_mb=peak[0] / 2**20, mb=mb,
        images_per_s=result["images"] / result["seconds"], mb_per_s=mb / result["seconds"],
        largest_mb=max(result["self_maxrss_mb"], result["children_maxrss_mb"]),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=5_000, help="second, smaller file (RSS vs size)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clickdog-bench"))
    parser.add_argument("--skip-plain", action="store_true")
    # internal: one measured run
    parser.add_argument("--run", choices=["stage", "plain"])
    parser.add_argument("--tsv", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-short-side", type=int, default=0)
    args = parser.parse_args()
    if args.run:
        child_main(args)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    big = args.workdir / f"images-{args.images}.tsv"
    small = args.workdir / f"images-{args.small}.tsv"
    t = time.perf_counter()
    generate(big, args.images)
    generate(small, args.small)
    print(f"TSVs ready in {time.perf_counter() - t:.0f} s: {big} ({big.stat().st_size / 1e6:.0f} MB), "
          f"{small} ({small.stat().st_size / 1e6:.0f} MB); {os.cpu_count()} CPUs, "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)

    runs = [
        ("stage, copy, 1 worker", "stage", big, 1, 0),
        ("stage, copy, 2 workers", "stage", big, 2, 0),
        ("stage, copy, 2 workers", "stage", small, 2, 0),
        ("stage, resize to 128, 2 workers", "stage", big, 2, 128),
    ]
    if not args.skip_plain:
        runs += [("plain (read_csv + loop)", "plain", small, 1, 0),
                 ("plain (read_csv + loop)", "plain", big, 1, 0)]
    rows = []
    for label, kind, tsv, workers, side in runs:
        r = measure(kind, tsv, args.workdir, workers, side)
        rows.append(f"| {label} | {r['images']:,} | {r['mb']:.0f} | {r['seconds']:.1f} | "
                    f"{r['images_per_s']:,.0f} | {r['images'] / r['cpu_s']:,.0f} | "
                    f"{r['mb_per_s']:.0f} | {r['largest_mb']:.0f} | {r['tree_peak_mb']:.0f} |")
        print(rows[-1], flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print("| run | images | TSV MB | wall s | images/s | images per CPU-second | MB/s "
          "| peak RSS, largest process (MB) | peak RSS, sum over processes (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
