"""Check the pipeline wiring after a full `dvc repro`: nothing is left to run,
and changing one param would re-run exactly the stages that read it and their
dependants. Run by .ci/run; edits params.yaml in place and always restores it.

    python scripts/check_wiring.py
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ORDER = ["download", "decode", "filter_clicks", "train_naive", "train_references", "make_pairs", "train_siamese",
         "evaluate"]
# param (section, key, new value) -> the stages `dvc repro --dry` must plan to run (in any order)
CASES = [
    (("siamese", "margin", 0.77), ["train_siamese", "evaluate"]),
    (("decode", "jpeg_quality", 77), ORDER[1:]),
    (("filter", "min_clicks", 7), ORDER[2:]),
    (("pairs", "relabel_min_prob", 0.77), ["make_pairs", "train_siamese", "evaluate"]),
    (("reference", "labels", ["raw"]), ["train_references", "evaluate"]),
    (("evaluate", "gallery_per_reason", 7), ["evaluate"]),
]


def planned_stages() -> list[str]:
    """Stages a `dvc repro` would run. Plain `--dry` lists only the stages whose
    own inputs changed (it cannot know whether their outputs will change);
    `--force-downstream` adds everything that depends on them."""
    out = subprocess.run(["dvc", "repro", "--dry", "--force-downstream"], capture_output=True, text=True,
                         check=True).stdout
    return re.findall(r"Running stage '([\w-]+)'", out)


def main() -> int:
    params_path = Path("params.yaml")
    original = params_path.read_text()
    failures = []
    stale = planned_stages()
    print(f"after repro: would run {stale or 'nothing'}")
    if stale:
        failures.append(f"a second dvc repro would run {stale}")
    try:
        for (section, key, value), expected in CASES:
            params = yaml.safe_load(original)
            params[section][key] = value
            params_path.write_text(yaml.safe_dump(params, sort_keys=False))
            got = planned_stages()
            verdict = "ok" if sorted(got) == sorted(expected) else "WRONG"
            print(f"{section}.{key}={value}: would run {got} [{verdict}]")
            if verdict != "ok":
                failures.append(f"{section}.{key}: expected {expected}, got {got}")
    finally:
        params_path.write_text(original)
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
