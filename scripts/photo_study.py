"""The pretrained-regime study (issue 21): the pipeline on photo releases with profiles/photos-cpu.yaml,
several release seeds, paired differences.

    python scripts/photo_study.py --photos ../shared/dog_photos [--seeds 0 1 2] [--set SECTION.KEY=VALUE ...]
    python scripts/photo_study.py --report     # rewrite reports/photo_study.md from reports/photo_study.json

For each seed S:

1. ``scripts/make_release.py PHOTOS /tmp/photo_release_S --seed S`` (made once): a different test split
   and simulated click log per seed;
2. a fresh ``git worktree`` of HEAD in /tmp/photo_study_S; ``scripts/apply_profile.py`` applies
   profiles/photos-cpu.yaml, the release's data block and the ``--set`` overrides to its params.yaml;
3. ``final``: ``dvc repro train_naive``, then ``dvc repro make_pairs`` (timed alone: the scorer's wall
   time), then ``dvc repro``: every model of metrics.json (truth, raw, probe_truth, probe_raw, probe_naive,
   naive, siamese = the final model) and its data block (label precision / recall); and ``probe_kept``, a
   linear probe (``reference.probe``, as the pipeline's probes) on the label filter's kept set
   (``data/pairs/clean.tsv``), the labels the final model fine-tunes on: its own floor;
Then each of ``--variants`` (default all), on top of the final run's params (put back after it):

4. ``contrastive``: the other contrastive weight (0 where the profile has one, else 1);
5. ``crossfit``: ``pairs.scorer: crossfit`` with ``pairs.crossfit_epochs`` = ``train.epochs``;
6. ``start``: the other ``siamese.start`` (probe: LP-FT on the kept labels from the initial trunk, where
   the profile fine-tunes the naive model);
7. ``filter``: cleanlab's other filter of the same scores: ``pairs.filter_by: predicted_neq_given`` (an
   image is kept where the scorer's top breed is its click label) where the profile has another, else
   ``prune_by_class``;
8. ``breed``: the other ``siamese.breed_share`` (clicks where the profile has kept, else kept): how often
   the fine-tune's batches draw each breed.

Each variant runs ``dvc repro make_pairs`` (timed alone), then ``dvc repro`` (only what its params reach).

Every run is appended to OUT/photo_study.json as it ends (a killed study keeps what it measured; a seed
already there is skipped), and OUT/photo_study.md is regenerated from it. The photos never enter the
project: the releases and worktrees live under /tmp and are removed (worktrees) at the end of each seed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from stages.lib import layout
from stages.lib.classifier import ModelConfig, TrainConfig
from stages.lib.labelsets import ReferenceConfig, train_probes
from stages.lib.params import load_sections
from stages.lib.shards import read_index
from stages.lib.studies import mean_se
from stages.lib.testset import evaluate_model, read_test_set

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/photos-cpu.yaml"
MODELS = ("truth", "raw", "probe_truth", "probe_raw", "probe_naive", "naive", "siamese")


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONHASHSEED": "0",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run ``cmd`` in ``cwd``, appending its output to ``log``; the seconds it took. Fails loudly."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"photo_study: {' '.join(cmd)} failed in {cwd} (exit {proc.returncode}); see {log}")
    return round(time.time() - start, 1)


def _apply(tree: Path, profile: dict | Path, log: Path) -> None:
    """scripts/apply_profile.py in ``tree`` (a profile file, or a dict written to one): every key checked
    against params.yaml and validated."""
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(profile, dict):
            (path := Path(tmp) / "overrides.yaml").write_text(yaml.safe_dump(profile))
            profile = path
        _run([sys.executable, "scripts/apply_profile.py", str(profile)], tree, log)


def _overrides(sets: list[str]) -> dict:
    out: dict = {}
    for item in sets:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return out


def probe_kept(tree: Path) -> float:
    """Test top-1 of a linear probe on the label filter's kept set in ``tree`` (a finished run): the
    pipeline's own probe code (``labelsets.train_probes``: reference.probe, the naive split) and evaluate's
    scoring; the probe is not kept."""
    params = load_sections(tree / "params.yaml", model=ModelConfig, train=TrainConfig, reference=ReferenceConfig)
    classes = json.loads((tree / "data/filtered" / layout.CLASSES).read_text())
    images = tree / "data/images"
    index = read_index(images)
    kept = pd.read_csv(tree / "data/pairs" / layout.CLEAN, sep="\t")[["key", "label"]]
    test_images = tree / "data/test_images"  # decode writes the test images apart (evaluate reads them there)
    test_index = read_index(test_images)
    test, _ = read_test_set(tree / "data/raw", test_index)
    with tempfile.TemporaryDirectory() as tmp:
        train_probes({"probe_kept": kept}, Path(tmp), images, classes, params["model"], params["train"],
                     params["reference"].probe, index, None)
        result = evaluate_model("probe_kept", Path(tmp) / "probe_kept" / layout.MODEL, test, test_images,
                                test_index, device="cpu", batch_size=256)
    if result.block["top1"] is None:
        raise SystemExit(f"photo_study: probe_kept scored no test image in {test_images}")
    return float(result.block["top1"])


def _measure(tree: Path, variant: str, seed: int, kept_top1: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One run's record; ``kept_top1`` (clean.tsv's digest -> probe_kept's top-1) fits probe_kept once per
    kept set: only the variants that re-run the label filter's scorer change it."""
    digest = hashlib.sha256((tree / "data/pairs" / layout.CLEAN).read_bytes()).hexdigest()
    if digest not in kept_top1:
        kept_top1[digest] = probe_kept(tree)
    metrics = json.loads((tree / "reports/metrics.json").read_text())
    pairs = json.loads((tree / "data/pairs/report.json").read_text())
    params = yaml.safe_load((tree / "params.yaml").read_text())
    siamese = params["siamese"]
    data = metrics["data"]
    top1 = {m: metrics[m]["top1"] for m in MODELS if isinstance(metrics.get(m), dict)}
    return {"seed": seed, "variant": variant, **extra, "top1": {**top1, "probe_kept": kept_top1[digest]},
            "label_filter": {k: data["prob_filter"][k] for k in ("images", "precision", "recall")},
            "raw_clicks": {k: data["raw_clicks"][k] for k in ("images", "precision", "recall")},
            "scorer": pairs["scorer"], "scorer_cost_s": pairs["cost_s"], "test_images": data["test"]["labelled"],
            "contrastive": siamese["contrastive"], "contrastive_weight": float(siamese["contrastive_weight"]),
            "start": siamese["start"], "filter_by": params["pairs"]["filter_by"], "breed_share": siamese["breed_share"]}


VARIANTS = ("contrastive", "crossfit", "start", "filter", "breed")


def _variant(name: str, params: dict) -> dict:
    """The params a variant changes, against the final run's ``params``: ``contrastive`` the other
    contrastive weight (0 where the profile has one, else 1); ``crossfit`` the crossfit scorer with folds of
    ``train.epochs`` epochs; ``start`` the other ``siamese.start`` (probe where the profile has naive);
    ``filter`` the other of cleanlab's prune_by_class and predicted_neq_given; ``breed`` the other of
    siamese.breed_share kept and clicks."""
    if name == "contrastive":
        return {"siamese": {"contrastive_weight": 0.0 if params["siamese"]["contrastive_weight"] else 1.0}}
    if name == "start":
        return {"siamese": {"start": "naive" if params["siamese"]["start"] == "probe" else "probe"}}
    if name == "filter":
        other = "prune_by_class" if params["pairs"]["filter_by"] == "predicted_neq_given" else "predicted_neq_given"
        return {"pairs": {"filter_by": other}}
    if name == "breed":
        return {"siamese": {"breed_share": "kept" if params["siamese"]["breed_share"] == "clicks" else "clicks"}}
    if name == "crossfit":
        return {"pairs": {"scorer": "crossfit", "crossfit_epochs": params["train"]["epochs"]}}
    raise ValueError(f"unknown variant {name!r}: one of {VARIANTS}")


def run_seed(seed: int, photos: Path, sets: list[str], variants: list[str], log: Path) -> list[dict[str, Any]]:
    release, tree = Path(f"/tmp/photo_release_{seed}"), Path(f"/tmp/photo_study_{seed}")
    if not release.exists():
        _run([sys.executable, "scripts/make_release.py", str(photos), str(release), "--seed", str(seed)], ROOT, log)
    if tree.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["git", "worktree", "add", "-f", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        _apply(tree, PROFILE, log)
        _apply(tree, release / "params_data.yaml", log)
        if sets:
            _apply(tree, _overrides(sets), log)
        params = yaml.safe_load((tree / "params.yaml").read_text())
        runs = []
        _run(["dvc", "repro", "train_naive"], tree, log)
        pairs_s = _run(["dvc", "repro", "make_pairs"], tree, log)
        total = _run(["dvc", "repro"], tree, log)
        kept_top1: dict[str, float] = {}
        runs.append(_measure(tree, "final", seed, kept_top1, make_pairs_s=pairs_s, seconds=total))
        for variant in variants:  # each on top of the final run's params, which are put back after it
            change = _variant(variant, params)
            _apply(tree, change, log)
            pairs_s = _run(["dvc", "repro", "make_pairs"], tree, log)
            runs.append(_measure(tree, variant, seed, kept_top1, make_pairs_s=pairs_s,
                                 seconds=pairs_s + _run(["dvc", "repro"], tree, log)))
            _apply(tree, {section: {k: params[section][k] for k in keys} for section, keys in change.items()}, log)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                                check=True).stdout.strip()
        for r in runs:
            r["sets"], r["commit"] = sets, commit
        return runs
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)


# ------------------------------------------------------------------ report
def _gap_recovery(top1: float, t: dict[str, float]) -> float:
    """(model − raw) / (truth − raw) of one release's top-1s ``t``; nan where truth and raw tie."""
    return (top1 - t["raw"]) / (t["truth"] - t["raw"]) if t["truth"] != t["raw"] else float("nan")


def _by(runs: list[dict], variant: str) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if r["variant"] == variant}


def _with_and_without(run: dict, other: dict, key: str, value: str) -> tuple[dict, dict]:
    """The two runs of one seed ordered as (the one whose ``key`` is ``value``, the other), whichever of
    them the profile's final run is."""
    return (run, other) if run[key] == value else (other, run)


def report(runs: list[dict], pilot: list[dict]) -> str:
    """reports/photo_study.md from the runs, and the pilot's ``lpft`` rows (reports/photo_pilot.json: the
    same releases, a random head, lr 0.01 with the trunk at 0.1x, BatchNorm frozen) for the recipe's
    paired difference."""
    final, cf, st, fb = _by(runs, "final"), _by(runs, "crossfit"), _by(runs, "start"), _by(runs, "filter")
    br = _by(runs, "breed")
    # the final fine-tune with the other contrastive weight ("contrastive0" in the first study's runs)
    other = _by(runs, "contrastive") | _by(runs, "contrastive0")
    seeds = sorted(final)
    rows = ["| seed | truth | raw | naive | final | probe_truth | probe_raw | probe_naive | probe_kept | "
            "final, other contrastive weight | final, other siamese.start | final, crossfit scorer | "
            "final, other filter_by (its P / R) | gap recovery | label filter P / R (features) | P / R (crossfit) | "
            "make_pairs s (features / crossfit) |",
            "|" + "---|" * 17]
    diffs: dict[str, list[float]] = {}
    levels: set[str] = set()  # rows that are levels, not differences: written without a sign

    def add(name: str, value: float, level: bool = False) -> None:
        diffs.setdefault(name, []).append(value)
        if level:
            levels.add(name)

    for s in seeds:
        t = final[s]["top1"]
        gap = _gap_recovery(t["siamese"], t)
        lf, lc = final[s]["label_filter"], cf[s]["label_filter"] if s in cf else None
        cells = [str(s), *(f"{t[m]:.3f}" if m in t else "n/a"  # probe_naive, probe_kept: since 2026-12-05
                           for m in ("truth", "raw", "naive", "siamese", "probe_truth", "probe_raw", "probe_naive",
                                     "probe_kept")),
                 f"{other[s]['top1']['siamese']:.3f} (weight {other[s]['contrastive_weight']:g})"
                 if s in other else "n/a",
                 f"{st[s]['top1']['siamese']:.3f} (start {st[s]['start']})" if s in st else "n/a",
                 f"{cf[s]['top1']['siamese']:.3f}" if s in cf else "n/a",
                 f"{fb[s]['top1']['siamese']:.3f} ({fb[s]['filter_by']}: {fb[s]['label_filter']['precision']:.3f} / "
                 f"{fb[s]['label_filter']['recall']:.3f})" if s in fb else "n/a", f"{gap:.2f}",
                 f"{lf['precision']:.3f} / {lf['recall']:.3f}",
                 f"{lc['precision']:.3f} / {lc['recall']:.3f}" if lc else "n/a",
                 f"{final[s]['make_pairs_s']:.0f} / " + (f"{cf[s]['make_pairs_s']:.0f}" if s in cf else "n/a")]
        rows.append("| " + " | ".join(cells) + " |")
        add("final − raw", t["siamese"] - t["raw"])
        add("final − naive", t["siamese"] - t["naive"])
        add("naive − raw", t["naive"] - t["raw"])
        add("truth − probe_truth", t["truth"] - t["probe_truth"])
        add("raw − probe_raw", t["raw"] - t["probe_raw"])
        if "probe_naive" in t:  # the probe on the naive model's own labels (and, LP-FT, its start)
            add("naive − probe_naive", t["naive"] - t["probe_naive"])
        add("naive − probe_raw", t["naive"] - t["probe_raw"])
        if "probe_kept" in t:  # the probe on the final model's own labels
            add("final − probe_kept", t["siamese"] - t["probe_kept"])
        add("final − probe_raw", t["siamese"] - t["probe_raw"])
        add("gap recovery", gap, level=True)
        add("label precision (features)", lf["precision"], level=True)
        add("label recall (features)", lf["recall"], level=True)
        if s in other:  # with the term minus without, whichever of the two the profile has
            with_term, without = ((final[s], other[s]) if final[s]["contrastive_weight"] else (other[s], final[s]))
            add(f"contrastive weight {with_term['contrastive_weight']:g} − 0",
                with_term["top1"]["siamese"] - without["top1"]["siamese"])
        if s in st:  # LP-FT on the kept labels (start probe) minus the naive model's fine-tune (start naive)
            probe_start, naive_start = _with_and_without(st[s], final[s], "start", "probe")
            add("siamese.start probe − naive", probe_start["top1"]["siamese"] - naive_start["top1"]["siamese"])
            add("final with start probe − probe_kept", probe_start["top1"]["siamese"] - t["probe_kept"])
        if s in fb:  # predicted_neq_given minus prune_by_class, whichever the profile has
            argmax, by_class = _with_and_without(fb[s], final[s], "filter_by", "predicted_neq_given")
            add("filter_by predicted_neq_given − prune_by_class",
                argmax["top1"]["siamese"] - by_class["top1"]["siamese"])
            add("label precision, predicted_neq_given − prune_by_class",
                argmax["label_filter"]["precision"] - by_class["label_filter"]["precision"])
            add("label recall, predicted_neq_given − prune_by_class",
                argmax["label_filter"]["recall"] - by_class["label_filter"]["recall"])
            # the other filter's model against the probe of its own kept labels, and its gap recovery
            other_t = fb[s]["top1"]
            add(f"final with {fb[s]['filter_by']} − its probe_kept", other_t["siamese"] - other_t["probe_kept"])
            add(f"gap recovery with {fb[s]['filter_by']}", _gap_recovery(other_t["siamese"], t), level=True)
        if s in br:  # breed_share clicks minus kept, whichever the profile has (runs before it: kept)
            clicks, kept = _with_and_without(br[s], final[s], "breed_share", "clicks")
            add("siamese.breed_share clicks − kept", clicks["top1"]["siamese"] - kept["top1"]["siamese"])
            add("gap recovery with breed_share clicks", _gap_recovery(clicks["top1"]["siamese"], t), level=True)
        if s in cf:
            add("final − final with the crossfit scorer", t["siamese"] - cf[s]["top1"]["siamese"])
            add("label precision, features − crossfit", lf["precision"] - lc["precision"])
            add("label recall, features − crossfit", lf["recall"] - lc["recall"])
            add("make_pairs time, features / crossfit", final[s]["make_pairs_s"] / cf[s]["make_pairs_s"], level=True)
    lpft = {int(p["seed"]): p["top1"] for p in pilot if p["name"].startswith("lpft") and p.get("top1")}
    for s in seeds:
        if s in lpft:
            for m in ("truth", "raw", "naive", "siamese"):
                add(f"{m}: this recipe − the pilot's lpft recipe", final[s]["top1"][m] - lpft[s][m])
    n_test = sorted({final[s]["test_images"] for s in seeds})
    weights = ", ".join(f"{w:g}" for w in sorted({final[s]["contrastive_weight"] for s in seeds}))
    # runs before siamese.contrastive existed (e4c109e) fine-tuned on make_pairs' pairs
    modes = ", ".join(sorted({final[s].get("contrastive", "pairs") for s in seeds}))
    lines = ["| paired over seeds " + ", ".join(map(str, seeds)) + " | mean ± s.e. | per seed |", "|---|---|---|"]
    for k, v in diffs.items():
        signed = k not in levels
        lines.append(f"| {k} | {mean_se(v, signed)} | {', '.join(f'{x:+.3f}' if signed else f'{x:.3f}' for x in v)} |")
    return "\n".join([
        "# Photo study: the pretrained regime on real dog photos",
        "",
        "Generated by `scripts/photo_study.py` from `reports/photo_study.json` (do not edit by hand). Each seed is "
        "its own release of the photos (`scripts/make_release.py --seed S`: a different test split and simulated "
        "click log), run through the real `dvc.yaml` with `profiles/photos-cpu.yaml` "
        f"({', '.join(sorted(set(x for r in runs for x in r.get('sets', [])))) or 'no overrides'}; code at "
        f"{', '.join(sorted(set(r.get('commit', '?') for r in runs)))}). "
        f"Test top-1 on each seed's clean test split ({', '.join(map(str, n_test))} photos: one accuracy has a "
        "standard error near 0.02-0.03, so read the paired differences). The photos come from ImageNet, which "
        "the weights were trained on: read differences, not absolute accuracy.",
        "",
        "`final` is the siamese fine-tune (pairs.filter cleanlab on the features scorer's out-of-fold "
        f"probabilities; siamese.contrastive {modes}, contrastive_weight {weights}); `other contrastive weight` "
        "the same fine-tune with the other `siamese.contrastive_weight` (1 where the profile has 0, else 0); `crossfit "
        "scorer` the final pipeline with `pairs.scorer: crossfit` (3 fine-tuned folds of `train.epochs` epochs); "
        "`other filter_by` the final pipeline with cleanlab's other filter of the same out-of-fold probabilities "
        "(`predicted_neq_given`, kept where the top breed is the click label, against `prune_by_class`). "
        "`make_pairs s` is the stage's wall time alone on 2 CPU cores. Gap recovery: (final − raw) / (truth − raw). "
        "The probes are logistic regressions on the frozen ImageNet features (`reference.probe`), each on one "
        "label set: `probe_raw` the raw clicks, `probe_naive` the click filter's labels (the naive model's, and "
        "its LP-FT start), `probe_kept` the label filter's kept set (the final model's), `probe_truth` the true "
        "breeds: each fine-tuned model's floor is the probe on its own labels.",
        "",
        *rows,
        "",
        *lines,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, help="a breed-per-folder tree of photos (../shared/dog_photos)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS),
                        help="runs besides the final one, each a paired comparison (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    parser.add_argument("--report", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args(argv)
    path = args.out / "photo_study.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    pilot_path = ROOT / "reports/photo_pilot.json"
    pilot = json.loads(pilot_path.read_text()) if pilot_path.exists() else []
    if not args.report:
        if args.photos is None:
            parser.error("--photos is required to run the study")
        args.out.mkdir(parents=True, exist_ok=True)  # before an hour of runs, not after the first seed's
        log = Path(f"/tmp/photo_study_{os.getpid()}.log")
        for seed in args.seeds:
            if any(r["seed"] == seed for r in runs):
                print(f"seed {seed}: already in {path}, skipped")
                continue
            runs += run_seed(seed, args.photos.resolve(), args.sets, args.variants, log)
            path.write_text(json.dumps(runs, indent=1) + "\n")
            print(f"seed {seed}: done ({log})", flush=True)
    (args.out / "photo_study.md").write_text(report(runs, pilot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
