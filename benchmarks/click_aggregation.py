"""The core of filter_clicks' log aggregation, two ways, on the same blocks:

* ``custom``: the project's code (stages/lib/keyagg.py): image keys -> dense
  ids through 64-bit hashes in a sorted array (``KeyTable``), then sorted
  sums per packed (id, breed code) merged as blocks arrive (``Aggregate``);
* ``pyarrow``: ``Table.group_by(["key", "code"]).aggregate([("clicks", "sum")])``
  per block, the partial results concatenated and grouped again whenever they
  grow past half the merged part (the same merging rule), keys kept as strings.

    .venv/bin/python benchmarks/click_aggregation.py [--rows 5000000] [--keys 1000000] [--block 200000]

Each way runs in its own subprocess on the same blocks, made in memory before
the clock starts; the report gives the aggregation's wall seconds, the
child's peak RSS and what the aggregation added to it, and checks that both
give the same (key, code) -> clicks.
Query parsing is left out: both ways take the same per-line breed code.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def blocks(rows: int, keys: int, block: int, seed: int = 0):
    """Blocks of (key strings, breed codes, clicks): Clickture-like 24-character
    keys, each image on a few lines, heavy-tailed clicks."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", np.uint8)
    names = pa.array(rng.choice(alphabet, size=(keys, 24)).view("S24").ravel().astype(str).tolist(), pa.string())
    out = []
    for start in range(0, rows, block):
        n = min(block, rows - start)
        out.append((names.take(pa.array(rng.integers(0, keys, n))), rng.integers(-2, 120, n).astype(np.int64),
                    np.minimum(500, np.ceil(rng.pareto(1.3, n) * 2 + 1)).astype(np.int64)))
    return out  # made before the clock starts: both ways read the same blocks from memory


def run_custom(data):
    from stages.lib.keyagg import Aggregate, KeyTable

    keys, agg = KeyTable(), Aggregate()
    for key, code, clicks in data:
        agg.add(keys.encode(key), np.zeros(len(key), np.int64), code, clicks)
    kid, code, clicks, _ = agg.result()
    return lambda: dict(zip(zip(keys.keys.take(pa.array(kid)).to_pylist(), code.tolist()), clicks.tolist()))


def run_pyarrow(data):
    def group(table: pa.Table) -> pa.Table:
        out = table.group_by(["key", "code"]).aggregate([("clicks", "sum")])
        return out.rename_columns(["key", "code", "clicks"])

    merged, pending = group(pa.table({"key": pa.array([], pa.string()), "code": pa.array([], pa.int64()),
                                      "clicks": pa.array([], pa.int64())})), []
    for key, code, clicks in data:
        pending.append(group(pa.table({"key": key, "code": code, "clicks": clicks})))
        if sum(len(t) for t in pending) > max(len(merged) // 2, 1 << 20):
            merged, pending = group(pa.concat_tables([merged, *pending])), []
    merged = group(pa.concat_tables([merged, *pending]))
    return lambda: dict(zip(zip(merged["key"].to_pylist(), merged["code"].to_pylist()),
                            merged["clicks"].to_pylist()))


def child(args) -> None:
    data = blocks(args.rows, args.keys, args.block)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = (run_custom if args.way == "custom" else run_pyarrow)(data)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before the check's Python dict
    result = result()
    print(json.dumps({"way": args.way, "seconds": round(seconds, 2), "groups": len(result),
                      "digest": hash(frozenset(result.items())), "peak_rss_mb": round(peak / 1024),
                      "added_rss_mb": round((peak - rss_before) / 1024)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--block", type=int, default=200_000)
    p.add_argument("--way", choices=["custom", "pyarrow"])
    args = p.parse_args()
    if args.way:
        child(args)
        return
    results = []
    for way in ("custom", "pyarrow"):
        cmd = [sys.executable, __file__, "--way", way, "--rows", str(args.rows), "--keys", str(args.keys),
               "--block", str(args.block)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": "0", "PATH": ""}).stdout
        results.append(json.loads(out))
    print(f"{args.rows:,} rows, {args.keys:,} keys, blocks of {args.block:,} rows")
    print("| way | seconds | peak RSS MB | added by the aggregation MB | groups |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['way']} | {r['seconds']} | {r['peak_rss_mb']} | {r['added_rss_mb']} | {r['groups']:,} |")
    print("same result:", results[0]["digest"] == results[1]["digest"] and results[0]["groups"] == results[1]["groups"])


if __name__ == "__main__":
    main()
