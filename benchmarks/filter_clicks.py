"""Benchmark of the filter_clicks stage on a generated 10-million-line click log.

    .venv/bin/python benchmarks/filter_clicks.py [--lines 10000000] [--images 1000000] [--keep DIR]

Generates (vectorised numpy/pyarrow, a few seconds) a Clickture-like log:
120 breed names, query variants (plurals, filler words, misspellings, sizes,
years, aliases), a long tail of distinct queries, queries naming no breed or
two breeds, duplicate lines and ~0.2 % malformed lines; then runs
``python -m stages.filter_clicks`` end to end in a subprocess and reports its
wall time and peak RSS (the child's ``ru_maxrss``). Aim: under a minute, memory
bounded by the per-(image, breed) aggregate, not by the log's size.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.lib import layout  # noqa: E402

ADJECTIVES = ("golden", "black", "giant", "miniature", "toy", "english", "french", "german", "irish",
              "scottish")
NOUNS = ("retriever", "terrier", "spaniel", "hound", "setter", "pointer", "shepherd", "mastiff", "collie",
         "poodle", "schnauzer", "pinscher")
BREEDS = [f"{a} {n}" for a in ADJECTIVES for n in NOUNS]
TEMPLATES = ("{b}", "{b}", "{b}", "{B}", "{b}s", "{b} puppies", "{b} dog", "{b} dog pictures", "{b} picures",
             "{b} pictues", "{b} imagenes", "{b} 1920x1080", "{b} wallpaper 2016", "cute {b} puppy",
             "{b} photos", "black and white {b}", "{b} images", "{b} 2012", "{B} 4k")
NO_BREED = ("cute puppy wallpaper", "funny dogs", "dog pictures", "puppies 1920x1080", "happy dog")
ALPHABET = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", np.uint8)


def make_queries(rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Distinct query strings and each one's intended breed (-1 none, -2 two)."""
    queries, breed = [], []
    for i, b in enumerate(BREEDS):
        for t in TEMPLATES:
            queries.append(t.format(b=b, B=b.title()))
            breed.append(i)
        for j in rng.choice(len(BREEDS), 3, replace=False):  # two breeds
            queries.append(f"{b} vs {BREEDS[j]}")
            breed.append(-2)
    queries += NO_BREED
    breed += [-1] * len(NO_BREED)
    return queries, np.array(breed)


def make_keys(rng: np.random.Generator, n: int) -> pa.Array:
    """n random 24-character keys, as in Clickture."""
    raw = ALPHABET[rng.integers(0, len(ALPHABET), size=(n, 24))]
    return pa.array(raw.view("S24").ravel()).cast(pa.string())


def write_log(path: Path, lines: int, n_images: int, seed: int, chunk: int = 1_000_000) -> pa.Array:
    """Write the click log (and breeds.tsv) in chunks of ``chunk`` lines; return the image keys."""
    rng = np.random.default_rng(seed)
    keys = make_keys(rng, n_images)
    queries, qbreed = make_queries(rng)
    qarr = pa.array(queries)
    home = rng.integers(0, len(BREEDS), n_images)  # each image's true breed
    first = np.array([np.flatnonzero(qbreed == b)[0] for b in range(len(BREEDS))])  # breed's 1st query
    with open(path, "wb") as f:
        for start in range(0, lines, chunk):
            n = min(chunk, lines - start)
            img = np.minimum(rng.zipf(1.3, n) - 1, n_images - 1)  # heavy tail: some images clicked a lot
            img = (img * 2654435761 + rng.integers(0, n_images, n) * (rng.random(n) < 0.7)) % n_images
            b = home[img]
            other = rng.random(n) < 0.15  # a look-alike / random breed
            b = np.where(other, rng.integers(0, len(BREEDS), n), b)
            qi = first[b] + rng.integers(0, len(TEMPLATES), n)
            two = rng.random(n) < 0.01  # "<breed> vs <breed>": the 3 queries after the templates
            qi = np.where(two, first[b] + len(TEMPLATES) + rng.integers(0, 3, n), qi)
            qi = np.where(rng.random(n) < 0.03, rng.integers(0, len(queries), n), qi)  # any query
            q = qarr.take(pa.array(qi))
            # a long tail of distinct queries: "<query> <number>" (numbers are filler)
            tail = rng.random(n) < 0.02
            q = pc.if_else(pa.array(tail), pc.binary_join_element_wise(
                q, pa.array(rng.integers(0, 10**6, n).astype(str)), " "), q)
            clicks = np.ceil(rng.pareto(1.3, n) * 2 + rng.random(n) * 1.5).astype(np.int64).clip(1, 500)
            c = pa.array(clicks.astype(str))
            bad = rng.random(n)
            c = pc.if_else(pa.array(bad < 0.0005), pa.scalar("x"), c)              # non-integer clicks
            c = pc.if_else(pa.array((bad >= 0.0005) & (bad < 0.001)), pa.scalar("0"), c)
            k = keys.take(pa.array(img))
            k = pc.if_else(pa.array((bad >= 0.001) & (bad < 0.0015)), pa.scalar(""), k)  # empty key
            line = pc.binary_join_element_wise(k, q, c, "\t")
            line = pc.binary_join_element_wise(line, pa.scalar(""), "\n").cast(pa.binary())
            for part in line.chunks if isinstance(line, pa.ChunkedArray) else [line]:
                # the values buffer of a string array is its strings back to back: the lines
                offsets = np.frombuffer(part.buffers()[1], np.int32)[part.offset:part.offset + len(part) + 1]
                f.write(memoryview(part.buffers()[2])[offsets[0]:offsets[-1]])
            f.write(b"wrong column count line\n" * 3)
            f.write(b"key\xff\xfe\tgolden retriever\t3\n")                                 # non-UTF-8
    names = pd.DataFrame({"breed": BREEDS, "label": range(len(BREEDS))})
    names.to_csv(path.parent / layout.BREEDS, sep="\t", header=False, index=False)
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=10_000_000)
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp dir)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_filter_clicks."))
    raw, images, out = work / "data/raw", work / "data/images", work / "data/filtered"
    raw.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    keys = write_log(raw / layout.CLICKS, args.lines, args.images, args.seed)
    split = np.where(np.random.default_rng(args.seed + 1).random(len(keys)) < 0.9, "train", "test")
    pd.DataFrame({"key": keys.to_pandas(), "split": split}).to_parquet(images / layout.INDEX)
    del keys
    size = (raw / layout.CLICKS).stat().st_size
    print(f"generated {args.lines:,} lines ({size / 2**20:.0f} MiB), {args.images:,} images "
          f"in {time.perf_counter() - t0:.1f} s")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump({"filter": params["filter"]}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages.filter_clicks", "data/raw", "data/images",
                           "data/filtered"], cwd=work, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10  # KiB -> MiB on Linux
    if proc.returncode:
        sys.exit(f"stage failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / layout.REPORT).read_text())
    print("\n".join(ln for ln in proc.stderr.splitlines() if " INFO " in ln))
    print(json.dumps({"lines": report["lines"]["total"], "log_mib": round(size / 2**20), "wall_s": round(wall, 1),
                      "lines_per_s": round(args.lines / wall), "peak_rss_mib": round(peak),
                      "valid": report["lines"]["valid"], "malformed": report["lines"]["malformed"],
                      "duplicates_summed": report["lines"]["duplicates_summed"],
                      "distinct_queries": report["queries"]["distinct"], "kept": report["images"]["kept"],
                      "dropped": report["images"]["dropped"]}, indent=1))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
