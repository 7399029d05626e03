"""evaluate: the scores against hand-computed values, and the stage end to end
on a tiny pipeline tree (shards, index, filter reports, two model files)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_image
from PIL import Image

from stages import evaluate
from stages import galleries as stage_galleries
from stages.lib import galleries, layout, reports
from stages.lib.metrics import mean_class_accuracy, per_class_scores, summarize, topk_accuracy
from stages.lib.models import build_model
from stages.lib.shards import IndexWriter, ShardWriter
from stages.lib.tracking import save_model

# 5 images, 4 classes; the rank of the true class is 1, 2, 4, 1, 1
PROBS = np.array([[0.7, 0.1, 0.1, 0.1],
                  [0.4, 0.3, 0.2, 0.1],
                  [0.1, 0.2, 0.3, 0.4],
                  [0.2, 0.5, 0.2, 0.1],
                  [0.3, 0.1, 0.4, 0.2]])
LABELS = np.array([0, 1, 0, 1, 2])
CLASSES = ["a", "b", "c", "d"]


def test_topk_by_hand():
    assert topk_accuracy(PROBS, LABELS, 1) == pytest.approx(3 / 5)
    assert topk_accuracy(PROBS, LABELS, 2) == pytest.approx(4 / 5)
    assert topk_accuracy(PROBS, LABELS, 3) == pytest.approx(4 / 5)
    assert topk_accuracy(PROBS, LABELS, 5) == 1.0  # fewer classes than k: every image is a hit


def test_topk_ties_follow_argmax():
    probs = np.array([[0.5, 0.5]])
    assert topk_accuracy(probs, np.array([1]), 1) == 0.0  # argmax picks class 0
    assert topk_accuracy(probs, np.array([0]), 1) == 1.0


def test_mean_class_accuracy_and_per_class_by_hand():
    pred = PROBS.argmax(1)  # [0, 0, 3, 1, 2]
    # class a: 1 of 2, b: 1 of 2, c: 1 of 1, d: no test image (left out of the mean)
    assert mean_class_accuracy(LABELS, pred, 4) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    table = per_class_scores(LABELS, pred, CLASSES).set_index("breed")
    assert table["support"].tolist() == [2, 2, 1, 0]
    assert table["recall"].iloc[:3].tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert math.isnan(table.loc["d", "recall"])
    # a predicted for images 0, 1 (one right); d predicted once, wrongly
    assert table["precision"].tolist() == pytest.approx([0.5, 1.0, 1.0, 0.0])


def test_summarize_block():
    block, table = summarize(PROBS, LABELS, CLASSES)
    assert block == {"top1": 0.6, "top5": 1.0, "mean_class_accuracy": 0.6667, "n_test": 5}
    assert list(table.columns) == ["breed", "precision", "recall", "support"]
    empty, _ = summarize(np.zeros((0, 4)), np.zeros(0, np.int64), CLASSES)
    assert empty["top1"] is None and empty["n_test"] == 0  # JSON null, never NaN


# ------------------------------------------------------------------ a tiny pipeline tree
BREEDS = ["red dog", "green dog", "blue dog", "yellow dog"]  # yellow: a test breed no model knows


def _tsv(path: Path, rows: list[tuple], columns: list[str] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=columns).to_csv(path, sep="\t", index=False, header=columns is not None)


def _write_images(images: Path, rows: list[tuple[str, str, int]]) -> None:
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with ShardWriter(images, 1 << 20) as shards, IndexWriter(images / layout.INDEX) as index:
        for key, split, colour in rows:
            data = tiny_image(colour, rng)
            shard, offset = shards.write(data)
            index.add(key, split, shard, offset, len(data), 32, 32)


def _write_model(path: Path, embedding_dim: int = 0, seed: int = 0) -> None:
    import torch
    torch.manual_seed(seed)
    model = build_model("shufflenet_v2_x0_5", 3, embedding_dim=embedding_dim, normalize=embedding_dim > 0)
    save_model(path, model, backbone="shufflenet_v2_x0_5", image_size=32, classes=BREEDS[:3], device="cpu",
               precision="fp32")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    train = [(f"k{c}_{i}", "train", c) for c in range(3) for i in range(4)] + [("d0", "train", 0), ("d1", "train", 2)]
    test = [(f"t{c}_{i}", "test", c) for c in range(4) for i in range(2)]
    _write_images(tmp_path / "data/images", train)  # decode's two outputs
    _write_images(tmp_path / "data/test_images", test)
    raw = tmp_path / "data/raw"
    _tsv(raw / layout.TEST_LABELS, [(k, BREEDS[c]) for k, _, c in test] + [("never_decoded", "red dog")], None)
    _tsv(raw / layout.TRUTH, [(k, BREEDS[c]) for k, _, c in train], None)
    labels = [(k, c, BREEDS[c], 3, 1.0) for k, _, c in train[:12]]
    labels[0] = ("k0_0", 1, "green dog", 2, 0.8)  # a wrong click label: red caption in the gallery
    filtered = tmp_path / "data/filtered"
    _tsv(filtered / layout.LABELS, labels, ["key", "label", "breed", "clicks", "share"])
    dropped = [("d0", "too_few_clicks", "red dog", 1, 1.0), ("d1", "ambiguous", "blue dog", 2, 0.5),
               ("gone", "no_decoded_image", "red dog", 4, 1.0)]  # "gone" has no image: not in the gallery
    _tsv(filtered / layout.DROPPED, dropped, ["key", "reason", "breed", "clicks", "share"])
    (filtered / layout.REPORT).write_text(json.dumps({
        "images": {"decoded_train": 14, "raw_labelled": 14, "kept": 12,
                   "dropped": {"too_few_clicks": 1, "ambiguous": 1, "no_decoded_image": 1}},
        "quality": {"raw": {"precision": 0.857, "recall": 1.0},
                    "filtered": {"precision": 0.917, "recall": 0.9, "distractors": 2}}}))
    pairs = tmp_path / "data/pairs"
    clean = [row + (0.9,) for row in labels[2:]]
    _tsv(pairs / "clean.tsv", clean, ["key", "label", "breed", "clicks", "share", "p_label"])
    _tsv(pairs / "scores.tsv", [(k, lab, b, 0.1 if i < 2 else 0.9) for i, (k, lab, b, _, _) in enumerate(labels)],
         ["key", "label", "breed", "p_early"])
    (pairs / layout.REPORT).write_text(json.dumps({
        "scorer": "early", "filter": "relabel", "min_prob": 0.2,
        "images": {"click_filtered": 12, "clean": 10, "dropped": 2, "relabelled": 1,
                   "status": {"kept": 9, "relabelled": 1, "label_issue": 2}},
        "label_quality": {"label_filter": {"images": 10, "precision": 1.0, "recall": 0.9, "distractors": 0}}}))
    _write_model(tmp_path / "models/naive/model.pt")
    _write_model(tmp_path / "models/siamese/model.pt", embedding_dim=8)
    # the raw and truth references are the same weights: no gap to recover, on every machine (the formula
    # is tested on numbers of its own: test_gap_recovery_is_the_share_of_the_gap_undone)
    _write_model(tmp_path / "models/references/raw/model.pt", seed=2)
    _write_model(tmp_path / "models/references/truth/model.pt", seed=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"evaluate": {"device": "cpu", "batch_size": 16}, "galleries": {"per_reason": 2}, "cache": {"max_mb": 64}}))
    return tmp_path


def _run(tree: Path) -> Path:
    d = tree / "data"
    evaluate.main([str(d / "raw"), str(d / "test_images"), str(d / "filtered"), str(d / "pairs"),
                   str(tree / "models/naive"), str(tree / "models/siamese"), str(tree / "models/references"),
                   str(tree / "reports"),
                   "--params", str(tree / "params.yaml")])
    return tree / "reports"


def _galleries(tree: Path) -> Path:
    d = tree / "data"
    stage_galleries.main([str(d / "raw"), str(d / "filtered"), str(d / "pairs"), str(d / "images"),
                          str(tree / "reports/galleries"), "--params", str(tree / "params.yaml")])
    return tree / "reports/galleries"


def test_evaluate_end_to_end(tree: Path):
    # evaluate reads what dvc.yaml declares it reads, and nothing of the training set: re-validating a run
    # pulls no training image (the galleries, which show training images, are a stage of their own)
    for path in ("data/images", "data/filtered/labels.tsv", "data/filtered/dropped.tsv", "data/pairs/clean.tsv",
                 "data/pairs/scores.tsv", "data/raw/truth.tsv"):
        shutil.rmtree(tree / path) if (tree / path).is_dir() else (tree / path).unlink()
    out = _run(tree)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"naive", "siamese", "raw", "truth", "comparison", "data"}
    for name in ("naive", "siamese", "raw", "truth"):
        block = metrics[name]
        assert set(block) == {"top1", "top5", "mean_class_accuracy", "n_test", "n_not_scored", "above_chance",
                              "trained_device", "trained_precision"}
        assert block["n_test"] == 6 and block["n_not_scored"] == 2  # the yellow dogs
        assert block["top5"] == 1.0  # 3 classes
        assert block["trained_precision"] == "fp32"
    table = pd.read_csv(out / "per_class.tsv", sep="\t")
    live = out / "live" / "plots"  # dvclive's plots, declared in dvc.yaml for dvc plots diff
    assert sorted(p.relative_to(out / "live").as_posix() for p in (out / "live").rglob("*") if p.is_file()) == sorted(
        [f"plots/sklearn/confusion_{m}.json" for m in ("naive", "siamese", "raw", "truth")]
        + [f"plots/custom/per_class_accuracy_{m}.json" for m in ("naive", "siamese", "raw", "truth")])
    for name in ("naive", "siamese", "raw", "truth"):
        confusion = pd.DataFrame(json.loads((live / "sklearn" / f"confusion_{name}.json").read_text()))
        assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 6
        assert set(confusion["actual"]) == set(BREEDS[:3])  # breed names, not class numbers
        assert metrics[name]["top1"] == pytest.approx((confusion["actual"] == confusion["predicted"]).mean(),
                                                      abs=1e-4)
        per_class = json.loads((live / "custom" / f"per_class_accuracy_{name}.json").read_text())
        assert per_class == [{"breed": b, "accuracy": a} for b, a in zip(table["breed"], table[f"{name}_recall"])]
    comp = metrics["comparison"]
    top1 = {k: metrics[k]["top1"] for k in ("siamese", "naive", "raw", "truth")}
    assert comp["final"] == "siamese"
    assert comp["final_minus_raw"]["top1"] == pytest.approx(top1["siamese"] - top1["raw"], abs=1e-4)
    assert comp["final_minus_naive"]["top1"] == pytest.approx(top1["siamese"] - top1["naive"], abs=1e-4)
    assert top1["truth"] == top1["raw"]  # the same weights
    assert comp["gap_recovery"] == {"top1": None, "mean_class_accuracy": None}  # undefined, not a division by 0
    data = metrics["data"]
    # the non-dogs still labelled after each filter (none is a number: 0 kept)
    assert data["click_filter"] == {"images": 12, "precision": 0.917, "recall": 0.9, "distractors": 2}
    assert data["prob_filter"] == {"images": 10, "relabelled": 1, "precision": 1.0, "recall": 0.9, "distractors": 0}
    assert data["test"]["labelled"] == 9 and data["test"]["not_decoded"] == 1
    assert list(table.columns) == ["breed", "support"] + [f"{m}_{c}" for m in ("naive", "siamese", "raw", "truth")
                                                          for c in ("precision", "recall")]
    assert table["breed"].tolist() == BREEDS[:3] and table["support"].tolist() == [2, 2, 2]
    pngs = sorted(p.name for p in (out / "figures").iterdir())
    assert pngs == ["confusion_naive.png", "confusion_raw.png", "confusion_siamese.png", "confusion_truth.png",
                    "per_class_accuracy.png"]
    for png in pngs:
        with Image.open(out / "figures" / png) as img:
            assert img.format == "PNG" and img.size[0] > 100
    ablation = (out / "ablation.md").read_text()
    assert "| click filter | 12 | 0.917 | 0.900 | 2 |" in ablation
    assert "| label filter (relabel, early scorer) | label_issue | 2 |" in ablation
    assert "| label filter (relabel, early scorer) | relabelled | 1 |" in ablation
    assert "| siamese − raw |" in ablation and "| siamese − naive |" in ablation


def test_comparison_block_gap_recovery() -> None:
    block = lambda t: {"top1": t, "top5": 1.0, "mean_class_accuracy": t}  # noqa: E731
    comp = reports.comparison_block({"siamese": block(0.85), "naive": block(0.80), "raw": block(0.78),
                                      "truth": block(0.90)})
    assert comp["gap_recovery"]["top1"] == pytest.approx((0.85 - 0.78) / (0.90 - 0.78), abs=1e-4)
    assert comp["final_minus_raw"]["top1"] == pytest.approx(0.07)
    # real data: no truth reference, so no gap recovery, but final - raw all the same
    comp = reports.comparison_block({"siamese": block(0.85), "raw": block(0.78)})
    assert comp["gap_recovery"] == {"top1": None, "mean_class_accuracy": None}
    assert comp["final_minus_raw"]["top1"] == pytest.approx(0.07) and comp["final_minus_naive"]["top1"] is None


def test_evaluate_without_truth(tree: Path):
    """Real data has no truth.tsv, and so no truth reference model."""
    (tree / "data/raw" / layout.TRUTH).unlink()
    shutil.rmtree(tree / "models/references/truth")
    filt = tree / "data/filtered" / layout.REPORT
    filt.write_text(json.dumps({**json.loads(filt.read_text()), "quality": None}))
    out = _run(tree)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "truth" not in metrics and metrics["comparison"]["gap_recovery"]["top1"] is None
    data = metrics["data"]
    assert data["click_filter"] == {"images": 12}
    assert sorted(p.name for p in _galleries(tree).iterdir()) == ["gallery_click_filter.png",
                                                                  "gallery_prob_filter.png"]


def test_the_galleries_stage_draws_both_filters(tree: Path):
    out = _galleries(tree)
    assert sorted(p.name for p in out.iterdir()) == ["gallery_click_filter.png", "gallery_prob_filter.png"]
    for png in out.iterdir():
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 100
    params = yaml.safe_load((tree / "params.yaml").read_text())
    params["galleries"]["per_reason"] = 0
    (tree / "params.yaml").write_text(yaml.safe_dump(params))
    assert list(_galleries(tree).iterdir()) == []  # none asked for: the old ones are gone too


def test_gallery_sample_does_not_depend_on_chunking(tree: Path, monkeypatch):
    path = tree / "data/filtered" / layout.LABELS
    big, sizes = galleries.sample_by_group(path, 3, lambda d: d["breed"])
    monkeypatch.setattr(galleries, "CHUNK_ROWS", 2)
    small, sizes_small = galleries.sample_by_group(path, 3, lambda d: d["breed"])
    assert sorted(big["key"]) == sorted(small["key"])
    assert sizes.to_dict() == sizes_small.to_dict() == {"green dog": 5, "red dog": 3, "blue dog": 4}


def test_gallery_counts_rows_it_cannot_show(tree: Path):
    """A dropped image without a decoded image is counted in its reason's row, not drawn."""
    decoded = {f"k{c}_{i}" for c in range(3) for i in range(4)} | {"d0", "d1"}
    rows, sizes = galleries.sample_by_group(tree / "data/filtered" / layout.DROPPED, 2, lambda d: d["reason"],
                                           showable=lambda d: d["key"].isin(decoded))
    assert sizes.to_dict() == {"too_few_clicks": 1, "ambiguous": 1, "no_decoded_image": 1}
    assert sorted(rows["key"]) == ["d0", "d1"]


def test_evaluate_scores_the_probe_references(tree: Path):
    """The linear probes of train_references (pretrained weights) are plain model
    files under models/references: scored like the other references."""
    _write_model(tree / "models/references/probe_raw/model.pt", seed=3)
    _write_model(tree / "models/references/probe_truth/model.pt", seed=4)
    metrics = json.loads((_run(tree) / "metrics.json").read_text())
    assert {"naive", "siamese", "raw", "truth", "probe_raw", "probe_truth"} <= set(metrics)
    for name in ("probe_raw", "probe_truth"):
        assert metrics[name]["n_test"] == 6 and metrics[name]["top5"] == 1.0
    assert (tree / "reports/figures/confusion_probe_raw.png").is_file()


def test_gap_recovery_is_the_share_of_the_gap_undone():
    from stages.lib.reports import comparison_block

    def block(top1: float) -> dict:
        return {"top1": top1, "top5": 1.0, "mean_class_accuracy": top1}

    metrics = {"siamese": block(0.8), "naive": block(0.75), "raw": block(0.7), "truth": block(0.9)}
    comp = comparison_block(metrics)
    assert comp["gap_recovery"]["top1"] == pytest.approx(0.5)
    assert comp["final_minus_raw"]["top1"] == pytest.approx(0.1)
    metrics["truth"] = block(0.65)  # truth below raw: no gap to recover
    assert comparison_block(metrics)["gap_recovery"]["top1"] is None
    metrics["raw"] = {"top1": None, "top5": None, "mean_class_accuracy": None}  # a model that scored nothing
    assert comparison_block(metrics)["final_minus_raw"] == {"top1": None, "top5": None, "mean_class_accuracy": None}
