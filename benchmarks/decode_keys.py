"""Memory of decode's duplicate-key check (a benchmark, not a test).

    .venv/bin/python benchmarks/decode_keys.py [--keys 2000000]

Adds ``--keys`` Clickture-like keys (40 hex characters) to a Python set of
strings (the check before) and to ``decoding.KeySet`` (8-byte digests), each
in its own process, and prints the growth of peak RSS and the seconds taken.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def child(kind: str, n: int) -> None:
    sys.path.insert(0, ".")
    from stages.lib.decoding import KeySet
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seen = set() if kind == "set" else KeySet()
    start = time.perf_counter()
    for i in range(n):
        seen.add(f"{i * 2654435761 % 2**160:040x}")  # the set keeps each string; KeySet a digest
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"| {kind} | {n:,} | {grown:.0f} MB | {grown * 2**20 / n:.0f} B | {seconds:.1f} s |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=2_000_000)
    p.add_argument("--child", choices=["set", "keyset"])
    args = p.parse_args()
    if args.child:
        child(args.child, args.keys)
        return
    print("| structure | keys | peak RSS growth | per key | time |\n|---|---:|---:|---:|---:|", flush=True)
    for kind in ("set", "keyset"):
        subprocess.run([sys.executable, __file__, "--child", kind, "--keys", str(args.keys)], check=True)


if __name__ == "__main__":
    main()
