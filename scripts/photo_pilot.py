"""One pipeline run on a photo release, in a git worktree of HEAD: a pilot for the pretrained-regime
study (issue 21), not the study itself.

    python scripts/photo_pilot.py NAME SEED [SECTION.KEY=VALUE ...] --photos ../shared/dog_photos

1. ``scripts/make_release.py PHOTOS /tmp/pilot_release_SEED --seed SEED`` (a different test split and
   click log per seed; made once per seed);
2. ``git worktree add /tmp/pilot_NAME HEAD``; its params.yaml gets the release's data block, the base
   settings below (EfficientNet-Lite0 with the offline ImageNet weights at 128 px, 8 epochs of batch 32
   at lr 0.01, siamese lr 0.002, the features scorer) and the KEY=VALUE overrides (YAML values);
3. ``dvc repro`` there; writes OUT/NAME.json (the overrides, the seconds, every model's top-1 and the
   data block of metrics.json) and OUT/NAME.log.

The photos never enter the project: the release and the worktree live under /tmp.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model.backbone": "timm/tf_efficientnet_lite0", "model.weights": "imagenet", "model.image_size": 128,
        "train.epochs": 8, "train.batch_size": 32, "train.lr": 0.01, "train.parallel_runs": 1,
        "train.early_epoch": 2, "siamese.lr": 0.002, "siamese.batch_size": 32, "pairs.scorer": "features",
        "decode.max_short_side": 0}


def set_key(params: dict, dotted: str, value: object) -> None:
    *path, last = dotted.split(".")
    node = params
    for key in path:
        node = node[key]
    if last not in node:
        raise SystemExit(f"photo_pilot: {dotted} is not a key of params.yaml")
    node[last] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("seed", type=int)
    parser.add_argument("sets", nargs="*", metavar="SECTION.KEY=VALUE")
    parser.add_argument("--photos", type=Path, required=True, help="a breed-per-folder tree of photos")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pilot_results"))
    args = parser.parse_args(argv)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONHASHSEED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    release, tree = Path(f"/tmp/pilot_release_{args.seed}"), Path(f"/tmp/pilot_{args.name}")
    if not release.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/make_release.py"), str(args.photos), str(release),
                        "--seed", str(args.seed)], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "-f", "--detach", str(tree), "HEAD"], check=True, cwd=ROOT)
    params = yaml.safe_load((tree / "params.yaml").read_text())
    params["data"].update(yaml.safe_load((release / "params_data.yaml").read_text())["data"])
    overrides = {**BASE, **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)}}
    for key, value in overrides.items():
        set_key(params, key, value)
    (tree / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.time()
    proc = subprocess.run(["dvc", "repro"], cwd=tree, env=env, capture_output=True, text=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
    result = {"name": args.name, "seed": args.seed, "sets": args.sets, "rc": proc.returncode,
              "seconds": round(time.time() - start)}
    metrics = tree / "reports/metrics.json"
    if proc.returncode == 0 and metrics.is_file():
        m = json.loads(metrics.read_text())
        result["top1"] = {k: v["top1"] for k, v in m.items() if isinstance(v, dict) and "top1" in v}
        result["data"] = m.get("data")
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result.get("top1")), proc.returncode, result["seconds"])
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
