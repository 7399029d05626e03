"""Frozen features and linear probes: the probe saved as a plain model file
gives the regression's probabilities, the probe references of
train_references (skipped without pretrained weights; probe_naive is the
naive model's LP-FT start), and the ``features``
label scorer of make_pairs (out of fold by construction)."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import run_train_naive, write_images
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stages import make_pairs, train_references
from stages.lib import engine, layout, scoring
from stages.lib.classifier import eval_loader, extract_features, probe_head, run_context
from stages.lib.models import build_model, create_model, load_model_file
from stages.lib.params import ConfigError
from stages.lib.probe import ABSENT_LOGIT, ProbeConfig, crossfit_probs, fit_probe
from stages.lib.shards import read_index
from stages.lib.testset import evaluate_model
from stages.lib.tracking import save_model

PROBE = {"C": 1.0, "max_iter": 500}
CLASSES = ["red dog", "green dog", "blue dog"]


def _images(tmp_path: Path, per_class: int = 10, classes: int = 3) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    rows = [(f"k{c}_{i}", "train", c) for c in range(classes) for i in range(per_class)]
    write_images(tmp_path / "images", rows)
    df = pd.DataFrame(rows, columns=["key", "split", "label"])
    return tmp_path / "images", df, read_index(tmp_path / "images")


@pytest.mark.parametrize("labels", ["three classes", "two of three"])
def test_the_probe_as_a_model_file_gives_the_regression_probabilities(tmp_path: Path, labels: str) -> None:
    """softmax(head(trunk(x))) of the saved file is sklearn's predict_proba of
    scaler + regression: the scaler is folded into the head exactly. With two
    of three classes (binary: sklearn keeps one logit) the absent class gets p 0."""
    images, df, index = _images(tmp_path)
    if labels == "two of three":
        df = df[df["label"] != 1].reset_index(drop=True)
    torch.manual_seed(0)
    model = build_model("shufflenet_v2_x0_5", 3)
    feats = extract_features(model, df, images, image_size=32, batch_size=8, device="cpu", index=index)
    assert feats.shape == (len(df), model.feature_dim) and feats.dtype == np.float32
    probe = fit_probe(feats, df["label"], 3, ProbeConfig(**PROBE))
    x64 = feats.astype(np.float64)  # as fit_probe computes (a float32 input keeps the scaler in float32)
    reference = make_pipeline(StandardScaler(), LogisticRegression(**PROBE)).fit(x64, df["label"])
    want = np.zeros((len(df), 3))
    want[:, reference.classes_] = reference.predict_proba(x64)
    assert np.abs(probe.probs(feats) - want).max() < 1e-8

    path = tmp_path / "probe.pt"
    save_model(path, probe.into(model), backbone="shufflenet_v2_x0_5", image_size=32, classes=CLASSES)
    loaded, meta = load_model_file(path)
    assert meta["embedding_dim"] == 0 and not meta["normalize"]
    ctx = run_context("cpu", "fp32")
    got, _ = engine.predict(loaded, eval_loader(images, df, image_size=32, batch_size=8, workers=0,
                                                device=ctx.device, index=index), ctx)
    assert np.abs(got - want).max() < 1e-4
    if labels == "two of three":
        assert probe.bias[1] == ABSENT_LOGIT and got[:, 1].max() < 1e-12
    # the trunk is the one the features came from, untouched
    assert all(torch.equal(v, loaded.trunk.state_dict()[k]) for k, v in model.trunk.state_dict().items())


def test_crossfit_probs_score_each_row_with_a_probe_that_did_not_see_it(monkeypatch) -> None:
    """By construction: column 0 of the features is the row's number; the fake
    probe answers class 1 for a row it was fitted on, class 0 otherwise."""
    n = 12
    x = np.column_stack([np.arange(n), np.zeros(n)]).astype(np.float32)
    y = np.arange(n) % 3
    fitted_on: list[set[int]] = []

    class Seen:
        def __init__(self, rows: np.ndarray) -> None:
            self.rows, self.n_iter = {int(r) for r in rows[:, 0]}, 1
            fitted_on.append(self.rows)

        def probs(self, rows: np.ndarray) -> np.ndarray:
            seen = np.array([int(r) in self.rows for r in rows[:, 0]])
            return np.column_stack([~seen, seen, np.zeros(len(rows))]).astype(float)

    monkeypatch.setattr("stages.lib.probe.fit_probe", lambda x, y, k, cfg: Seen(x))
    splits = [(np.array([i for i in range(n) if i % 3 != f]), np.array([i for i in range(n) if i % 3 == f]))
              for f in range(3)]
    p = crossfit_probs(x, y, 3, splits, ProbeConfig(**PROBE))
    assert (p[:, 0] == 1).all()  # no row scored by a probe that saw it
    assert len(fitted_on) == 3 and all(len(s) == 8 for s in fitted_on)
    with pytest.raises(ValueError, match="unscored"):
        crossfit_probs(x, y, 3, splits[:2], ProbeConfig(**PROBE))


def test_out_of_fold_probes_doubt_the_wrong_labels_that_an_in_sample_probe_memorises() -> None:
    """Features: the class signal plus a one-hot of the image (what lets a model
    memorise it). Fitted on all rows, a weakly regularised probe vouches for
    three wrong labels; out of fold it cannot, and doubts them."""
    rng = np.random.default_rng(0)
    n, k = 60, 3
    true = np.arange(n) % k
    x = np.hstack([np.eye(k)[true] * 2 + rng.normal(0, 0.5, (n, k)), np.eye(n) * 3])
    given = true.copy()
    wrong = np.array([0, 1, 2])
    given[wrong] = (true[wrong] + 1) % k
    cfg = ProbeConfig(C=100.0, max_iter=2000)
    in_sample = fit_probe(x, given, k, cfg).probs(x)[np.arange(n), given]
    fold = np.arange(n) // k % 3  # every fold holds every class
    splits = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(3)]
    out_of_fold = crossfit_probs(x, given, k, splits, cfg)[np.arange(n), given]
    assert in_sample[wrong].min() > 0.5
    assert out_of_fold[wrong].max() < 0.2
    right = np.setdiff1d(np.arange(n), wrong)
    assert np.median(out_of_fold[right]) > 0.6


# ------------------------------------------------------------------ the stages
def _donor_weights(tiny: Path) -> str:
    """A local weights file for the tiny pipeline's backbone: a 'pretrained' trunk."""
    torch.manual_seed(1)
    path = tiny / "models/weights/donor.pth"  # model.weights must be under models/weights/
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model("resnet18", 10).trunk.state_dict(), path)
    return "models/weights/donor.pth"  # relative: the stages run in the work tree


def _set_params(tiny: Path, **sections) -> None:
    params = yaml.safe_load((tiny / "params.yaml").read_text())
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    (tiny / "params.yaml").write_text(yaml.safe_dump(params))


def _write_truth(tiny: Path) -> None:
    raw = tiny / "data" / "raw"
    raw.mkdir(exist_ok=True)
    labels = pd.read_csv(tiny / "data/filtered" / layout.RAW_LABELS, sep="\t")
    labels[["key", "breed"]].to_csv(raw / layout.TRUTH, sep="\t", index=False, header=False)


def _train_references(tiny: Path, monkeypatch) -> dict:
    monkeypatch.chdir(tiny)
    train_references.main(["data/raw", "data/filtered", "data/images", "models/references"])
    return json.loads((tiny / "models/references" / layout.REPORT).read_text())


def test_probe_references_are_skipped_without_pretrained_weights(tiny_pipeline: Path, monkeypatch, caplog) -> None:
    _write_truth(tiny_pipeline)
    _set_params(tiny_pipeline, reference={"labels": ["raw", "probe_raw", "probe_truth"], "probe": PROBE})
    with caplog.at_level(logging.INFO, logger="train_references"):
        report = _train_references(tiny_pipeline, monkeypatch)
    assert set(report) == {"raw", "probe_raw", "probe_truth"}
    assert report["raw"]["val_acc"] is not None and report["probe_raw"] is None and report["probe_truth"] is None
    assert sorted(p.name for p in (tiny_pipeline / "models/references").iterdir()) == ["raw", "report.json"]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and all("model.weights is 'none'" in m for m in skipped)


def test_probe_references_with_pretrained_weights_are_models_evaluate_scores(tiny_pipeline: Path,
                                                                             monkeypatch) -> None:
    _write_truth(tiny_pipeline)
    weights = _donor_weights(tiny_pipeline)
    _set_params(tiny_pipeline, model={"weights": weights},
                reference={"labels": ["probe_raw", "probe_truth"], "probe": PROBE})
    report = _train_references(tiny_pipeline, monkeypatch)
    assert set(report) == {"probe_raw", "probe_truth"}
    for name in report:
        info = report[name]
        assert info["above_chance"] and info["train_images"] == 48 and info["val_images"] == 12
        assert info["precision"] == "fp32" and info["C"] == 1.0
        path = tiny_pipeline / "models/references" / name / layout.MODEL
        model, meta = load_model_file(path)
        assert meta["kind"] == "linear_probe" and meta["labels"] == name.removeprefix("probe_")
        # the trunk is the initial one: the weights file's, untouched by any training
        start = create_model("resnet18", 3, str(tiny_pipeline / weights))
        assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in start.trunk.state_dict().items())
        # evaluate's own scoring, no special case: the test images of the tiny pipeline
        index = read_index(tiny_pipeline / "data/images")
        test = index.loc[index["split"] == "test", ["key"]].reset_index(drop=True)
        test["breed"] = [CLASSES[int(k[1])] for k in test["key"]]
        result = evaluate_model(name, path, test, tiny_pipeline / "data/images", index, device="cpu", batch_size=16)
        assert result.block["n_test"] == 15 and result.block["top1"] > 0.9
        assert result.block["trained_precision"] == "fp32"


def test_probe_naive_is_the_probe_of_the_click_filters_labels_and_the_naive_models_lp_ft_start(
        tiny_pipeline: Path, monkeypatch) -> None:
    """probe_naive fits the click filter's labels (labels.tsv), not the raw clicks; with head_init: probe
    and train.probe as reference.probe it is the very head the naive model's fine-tuning starts from, so
    naive - probe_naive is what the fine-tuning did."""
    weights = _donor_weights(tiny_pipeline)
    _set_params(tiny_pipeline, model={"weights": weights}, train={"head_init": "probe", "probe": PROBE},
                reference={"labels": ["probe_raw", "probe_naive"], "probe": PROBE})
    filtered = tiny_pipeline / "data/filtered"
    labels = pd.read_csv(filtered / layout.LABELS, sep="\t")
    kept = labels.groupby("label").tail(16)  # the click filter dropped 4 images of each breed
    kept.to_csv(filtered / layout.LABELS, sep="\t", index=False)
    report = _train_references(tiny_pipeline, monkeypatch)
    assert report["probe_raw"]["images"] == len(labels) == 60
    assert report["probe_naive"]["images"] == len(kept) == 48
    probe_naive, meta = load_model_file(tiny_pipeline / "models/references/probe_naive" / layout.MODEL)
    assert meta["labels"] == "naive" and meta["kind"] == "linear_probe"

    class Started(Exception):
        pass

    started = []
    monkeypatch.setattr(engine, "fit", lambda model, *a, **k: started.append(copy.deepcopy(model)) or _raise(Started))
    with pytest.raises(Started):
        run_train_naive(tiny_pipeline)
    start, = started
    assert torch.allclose(start.head.weight, probe_naive.head.weight, atol=1e-4)
    assert torch.allclose(start.head.bias, probe_naive.head.bias, atol=1e-4)
    probe_raw, _ = load_model_file(tiny_pipeline / "models/references/probe_raw" / layout.MODEL)
    assert not torch.allclose(start.head.weight, probe_raw.head.weight, atol=1e-4)


def _siamese_params(tiny: Path, start: str) -> dict:
    params = yaml.safe_load((tiny / "params.yaml").read_text())
    naive_only = ("val_fraction", "early_epoch", "parallel_runs", "head_init", "probe")
    return {**{k: v for k, v in params["train"].items() if k not in naive_only}, "start": start,
            "contrastive": "batch", "contrastive_weight": 0.0, "margin": 1.0, "reduction": "active",
            "images_per_breed": 4, "neg_margin": 0.4, "embedding_dim": 8, "normalize": True, "breed_share": "kept"}


def test_siamese_start_probe_is_the_initial_trunk_with_the_probe_of_the_clean_labels(tiny_pipeline: Path,
                                                                                    monkeypatch) -> None:
    """LP-FT on the kept labels: the naive model's fine-tuned trunk is not used, only its classes and
    preprocessing; the head is the probe (train.probe) of the clean set on the initial trunk's features."""
    from stages.lib.classifier import ModelConfig, TrainConfig
    from stages.lib.siamese import SiameseConfig, siamese_from_probe

    weights = _donor_weights(tiny_pipeline)
    _set_params(tiny_pipeline, model={"weights": weights})
    run_train_naive(tiny_pipeline)
    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    cfg = SiameseConfig.from_params(_siamese_params(tiny_pipeline, "probe"), "siamese")
    model_cfg = ModelConfig.from_params(params["model"], "model")
    train_cfg = TrainConfig.from_params(params["train"], "train")
    labels = pd.read_csv(tiny_pipeline / "data/filtered" / layout.LABELS, sep="\t")
    clean = labels.groupby("label").head(12)[["key", "label"]].reset_index(drop=True)  # the filter's kept set
    images = tiny_pipeline / "data/images"
    monkeypatch.chdir(tiny_pipeline)
    model, meta = siamese_from_probe(tiny_pipeline / "models/naive" / layout.MODEL, clean, cfg, model_cfg=model_cfg,
                                     train_cfg=train_cfg, images_dir=images, index=read_index(images))
    assert meta["classes"] == CLASSES and model.projection is not None
    start = create_model("resnet18", 3, str(tiny_pipeline / weights))
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in start.trunk.state_dict().items())
    naive, _ = load_model_file(tiny_pipeline / "models/naive" / layout.MODEL)  # fine-tuned: a different trunk
    assert not all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in naive.trunk.state_dict().items())
    feats = extract_features(start, clean, images, image_size=32, batch_size=16, device="cpu",
                             index=read_index(images))
    want = fit_probe(feats, clean["label"], 3, train_cfg.probe)
    assert torch.allclose(model.head.weight.double(), torch.from_numpy(want.weight), atol=1e-6)
    assert torch.allclose(model.head.bias.double(), torch.from_numpy(want.bias), atol=1e-6)


def test_siamese_start_probe_without_pretrained_weights_is_refused_before_any_work(tiny_pipeline: Path,
                                                                                   monkeypatch) -> None:
    from stages import train_siamese

    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    params["siamese"] = _siamese_params(tiny_pipeline, "probe")
    (tiny_pipeline / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tiny_pipeline)  # no pairs, no naive model: the refusal comes first
    with pytest.raises(ConfigError, match=r"siamese\.start: probe .* model\.weights: none"):
        train_siamese.main(["data/pairs", "data/images", "models/naive", "models/siamese"])
    assert not (tiny_pipeline / "models/siamese").exists()


def _raise(error: type[Exception]) -> None:
    raise error


def _pairs_params(scorer: str) -> dict:
    return {"scorer": scorer, "folds": 3, "crossfit_epochs": 1, "probe": PROBE, "filter": "threshold",
            "min_prob": 0.05, "filter_by": "prune_by_class", "relabel_min_prob": 0.6, "min_top_prob": 0.0,
            "min_images_per_class": 5, "min_kept_share": 0.3, "per_image": 2, "pos_fraction": 0.5, "hard_fraction": 0.5,
            "confusable_breeds": 1, "seed": 0}


def test_make_pairs_refuses_the_features_scorer_without_pretrained_weights(tiny_pipeline: Path,
                                                                           monkeypatch) -> None:
    _set_params(tiny_pipeline, pairs=_pairs_params("features"))
    monkeypatch.chdir(tiny_pipeline)  # no naive model: the refusal comes before any work
    with pytest.raises(ConfigError, match=r"pairs\.scorer: features .* model\.weights: none"):
        make_pairs.main(["data/raw", "data/filtered", "data/images", "models/naive", "data/pairs"])
    assert not (tiny_pipeline / "data/pairs").exists()


def test_make_pairs_with_the_features_scorer(tiny_pipeline: Path, monkeypatch) -> None:
    weights = _donor_weights(tiny_pipeline)
    _set_params(tiny_pipeline, model={"weights": weights}, pairs=_pairs_params("features"))
    (tiny_pipeline / "data/raw").mkdir()
    run_train_naive(tiny_pipeline)
    calls = []
    real = scoring.crossfit_probs
    monkeypatch.setattr(scoring, "crossfit_probs", lambda *a: calls.append(a) or real(*a))
    monkeypatch.chdir(tiny_pipeline)
    make_pairs.main(["data/raw", "data/filtered", "data/images", "models/naive", "data/pairs"])
    report = json.loads((tiny_pipeline / "data/pairs" / layout.REPORT).read_text())
    assert report["scorer"] == "features" and set(report["cost_s"]) == {"early_s", "features_s"}
    scores = pd.read_csv(tiny_pipeline / "data/pairs" / layout.SCORES, sep="\t")
    assert len(scores) == 60 and scores["p_features"].between(0, 1).all()
    assert scores["p_features"].median() > 0.5  # correct labels of colour classes: confident
    # the folds: stratified, seeded by pairs.seed, each image scored once
    (_, labels, _, splits, _), = calls
    assert sorted(np.concatenate([s for _, s in splits]).tolist()) == list(range(60))
    assert all(not set(f) & set(s) for f, s in splits)


def test_head_init_probe_starts_the_fine_tuning_from_the_probe_of_the_training_labels(tiny_pipeline: Path,
                                                                                     monkeypatch) -> None:
    """LP-FT: the model handed to the training loop has the initial trunk and, as its head, the linear
    probe (train.probe) of the training split's labels on that trunk's frozen features."""
    from stages.lib import classifier

    weights = _donor_weights(tiny_pipeline)
    _set_params(tiny_pipeline, model={"weights": weights}, train={"head_init": "probe"})
    started = []

    class Started(Exception):
        pass

    def fit(model, *args, **kwargs):
        started.append(copy.deepcopy(model))
        raise Started

    monkeypatch.setattr(engine, "fit", fit)
    with pytest.raises(Started):
        run_train_naive(tiny_pipeline)
    model, = started
    # the same probe, fitted here from the stage's own split
    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    labels = pd.read_csv(tiny_pipeline / "data/filtered" / layout.LABELS, sep="\t")
    cfg = classifier.TrainConfig.from_params(params["train"], "train")
    model_cfg = classifier.ModelConfig.from_params(params["model"], "model")
    train_df = classifier.plan_run(labels, cfg, len(labels)).train
    images = tiny_pipeline / "data/images"
    start = create_model("resnet18", 3, str(tiny_pipeline / weights))
    feats = extract_features(start, train_df, images, image_size=32, batch_size=16, device="cpu",
                             index=read_index(images))
    want = fit_probe(feats, train_df["label"], 3, cfg.probe)
    assert torch.allclose(model.head.weight.double(), torch.from_numpy(want.weight), atol=1e-6)
    assert torch.allclose(model.head.bias.double(), torch.from_numpy(want.bias), atol=1e-6)
    assert all(torch.equal(v, start.trunk.state_dict()[k]) for k, v in model.trunk.state_dict().items())
    assert model_cfg.pretrained


def test_head_init_probe_without_pretrained_weights_is_refused_before_training(tiny_pipeline: Path,
                                                                               monkeypatch) -> None:
    _set_params(tiny_pipeline, train={"head_init": "probe"})
    monkeypatch.setattr(engine, "fit", lambda *a, **k: pytest.fail("trained with a probe of random features"))
    with pytest.raises(ConfigError, match=r"train\.head_init: probe .* model\.weights: none"):
        run_train_naive(tiny_pipeline)
    assert not (tiny_pipeline / "models").exists()  # refused on entry: no output folder, no decoded cache


def test_a_class_absent_from_the_training_split_starts_neutral_not_at_probability_zero(tmp_path: Path) -> None:
    """The probe gives an unseen class logit -1e4; as a starting head that class could never recover
    (label smoothing would add 0.1/K x 1e4 to every step's loss). probe_head starts it at the lowest
    bias of the seen classes, weights zero."""
    from stages.lib import classifier

    images, df, index = _images(tmp_path)
    seen = df[df["label"] != 2].reset_index(drop=True)
    model = build_model("shufflenet_v2_x0_5", 3)
    model_cfg = classifier.ModelConfig(backbone="shufflenet_v2_x0_5", weights="models/weights/x.pth", image_size=32)
    train = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["train"]
    cfg = classifier.TrainConfig.from_params({**train, "device": "cpu", "batch_size": 8, "head_init": "probe"}, "train")
    head = probe_head(model, seen, images, num_classes=3, model_cfg=model_cfg, train_cfg=cfg, index=index).head
    assert head.bias[2].item() == pytest.approx(min(head.bias[0].item(), head.bias[1].item()))
    assert torch.count_nonzero(head.weight[2]) == 0 and head.bias[2].item() > ABSENT_LOGIT / 2
