"""make_pairs and train_siamese: the contrastive loss against brute force, pair
mining, and a tiny siamese run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from stages import make_pairs as make_pairs_stage
from stages import train_naive, train_siamese
from stages.lib import engine
from stages.lib.losses import ContrastiveLoss, InBatchContrastiveLoss
from stages.lib.models import load_model_file
from stages.lib.pairs import HARD_NEGATIVE, NEGATIVE, POSITIVE, confusable_classes, confusion_counts, make_pairs


def brute_force_contrastive(a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, margin: float,
                            reduction: str) -> tuple[float, float, float, float]:
    """(loss, positive term, negative term, share of active negatives), pair by pair."""
    pos, neg, n_active, n_neg = [], [], 0, 0
    for i in range(len(a)):
        d = float(np.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a[i], b[i]))))
        if same[i]:
            pos.append(d ** 2)
        else:
            n_neg += 1
            n_active += d < margin
            neg.append(max(0.0, margin - d) ** 2)
    if reduction == "all":
        p, q = sum(pos) / len(a), sum(neg) / len(a)
    else:  # each term over its own pairs with a non-zero loss (pytorch-metric-learning's AvgNonZeroReducer)
        active = [v for v in neg if v > 0]
        p, q = sum(pos) / max(1, len(pos)), sum(active) / max(1, len(active))
    return p + q, p, q, n_active / max(1, n_neg)


@pytest.mark.parametrize("margin", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", ["active", "all"])
def test_contrastive_loss_and_its_parts_match_brute_force(margin: float, reduction: str) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g) * 0.3
    same = torch.randint(0, 2, (16,), generator=g)
    terms = ContrastiveLoss(margin, reduction=reduction, eps=0.0).terms(a, b, same)
    loss, pos, neg, active = brute_force_contrastive(a, b, same, margin, reduction)
    assert terms["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert terms["positive"].item() == pytest.approx(pos, rel=1e-5)
    assert terms["negative"].item() == pytest.approx(neg, rel=1e-5)
    assert terms["active_negatives"].item() == pytest.approx(active)


def brute_force_in_batch(emb: torch.Tensor, labels: torch.Tensor, neg_margin: float) -> tuple[float, float]:
    """(positive term, negative term) over every ordered pair i != j of the batch, each averaged
    over its pairs with a non-zero loss."""
    unit = [np.asarray(e, dtype=np.float64) / np.linalg.norm(np.asarray(e, dtype=np.float64)) for e in emb.tolist()]
    pos, neg = [], []
    for i in range(len(unit)):
        for j in range(len(unit)):
            if i == j:
                continue
            s = float(unit[i] @ unit[j])
            if labels[i] == labels[j]:
                pos.append(1 - s)
            else:
                neg.append(max(0.0, s - neg_margin))
    def mean_nonzero(values: list[float]) -> float:
        active = [v for v in values if v > 1e-12]
        return sum(active) / len(active) if active else 0.0
    return mean_nonzero(pos), mean_nonzero(neg)


@pytest.mark.parametrize("neg_margin", [0.0, 0.4, 0.9])
def test_in_batch_contrastive_parts_match_brute_force_and_the_library(neg_margin: float) -> None:
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import ContrastiveLoss as PML

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 6, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    terms = InBatchContrastiveLoss(neg_margin).terms(emb, labels)
    pos, neg = brute_force_in_batch(emb, labels, neg_margin)
    assert terms["positive"].item() == pytest.approx(pos, rel=1e-5)
    assert terms["negative"].item() == pytest.approx(neg, rel=1e-5)
    library = PML(pos_margin=1.0, neg_margin=neg_margin, distance=CosineSimilarity())(emb, labels)
    assert terms["loss"].item() == pytest.approx(library.item(), rel=1e-6)  # the parts add up to its forward


def test_in_batch_contrastive_without_positives_and_bad_margins() -> None:
    emb = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    terms = InBatchContrastiveLoss(0.4).terms(emb, torch.arange(4))  # one image per breed: no positive pair
    assert terms["positive"].item() == 0.0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    for bad in (1.0, -1.0, 2.0):
        with pytest.raises(ValueError, match="cosine similarity"):
            InBatchContrastiveLoss(bad)


def test_batch_mode_ce_has_the_scale_of_pairs_mode() -> None:
    """With the contrastive weight at 0 the two modes' losses are the same on the same images:
    batch mode's CE over 2n images / n equals pairs mode's CE(a) + CE(b) over n pairs."""
    from stages.lib.models import build_model
    from stages.lib.siamese import batch_loss, siamese_loss

    torch.manual_seed(0)
    model = build_model("resnet18", 3, embedding_dim=8, normalize=True).eval()
    g = torch.Generator().manual_seed(2)
    xa, xb = (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2))
    ya, yb = torch.randint(0, 3, (4,), generator=g), torch.randint(0, 3, (4,), generator=g)
    ctx = engine.RunContext(device=torch.device("cpu"), amp_dtype=None)
    pairs_loss, _, n_pairs = siamese_loss(contrastive_weight=0.0, margin=1.0, label_smoothing=0.1)(
        model, (xa, xb, ya, yb, (ya == yb).long()), ctx)
    batch, logs, n_batch = batch_loss(contrastive_weight=0.0, neg_margin=0.4, label_smoothing=0.1)(
        model, (torch.cat([xa, xb]), torch.cat([ya, yb])), ctx)
    assert batch.item() == pytest.approx(pairs_loss.item(), rel=1e-5) and n_batch == n_pairs == 4
    assert {"ce", "contrastive", "contrastive_pos", "contrastive_neg", "acc"} <= set(logs)


def test_siamese_config_refuses_batch_settings_that_cannot_work() -> None:
    from stages.lib.params import ConfigError, load_params
    from stages.lib.siamese import SiameseConfig

    base = load_params("siamese")
    assert SiameseConfig.from_params(base, "siamese").contrastive == base["contrastive"] == "batch"
    for change, message in (({"images_per_breed": 5}, "images_per_breed"),
                            ({"images_per_breed": 1}, "images_per_breed"), ({"neg_margin": 1.0}, "neg_margin"),
                            ({"contrastive": "triplet"}, "siamese.contrastive"),
                            ({"breed_share": "rare"}, "siamese.breed_share"),
                            ({"contrastive": "pairs", "breed_share": "clicks"}, "breed_share clicks")):
        with pytest.raises(ConfigError, match=message):
            SiameseConfig.from_params({**base, **change}, "siamese")


def test_active_reduction_keeps_the_negative_gradient_when_most_negatives_are_out() -> None:
    """One negative still inside the margin among nine far ones: averaged over
    all pairs its pull shrinks tenfold; over the active ones it does not."""
    a = torch.zeros(10, 2, requires_grad=True)
    b = torch.tensor([[0.5, 0.0]] + [[5.0, 0.0]] * 9)
    same = torch.zeros(10, dtype=torch.long)
    ContrastiveLoss(1.0, reduction="active")(a, b, same).backward()
    g_active = a.grad[0].norm().item()
    a.grad = None
    ContrastiveLoss(1.0, reduction="all")(a, b, same).backward()
    assert g_active == pytest.approx(10 * a.grad[0].norm().item(), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        ContrastiveLoss(1.0, reduction="sum")


def test_contrastive_loss_gradient_and_its_two_sides() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    same = torch.tensor([1, 0, 1, 0, 1, 0])
    assert torch.autograd.gradcheck(lambda x, y: ContrastiveLoss(3.0)(x, y, same).double(), (a, b))
    # far-apart negatives cost nothing; identical positives cost nothing and keep a finite gradient
    far = torch.tensor([[0.0, 0.0]]), torch.tensor([[5.0, 0.0]])
    assert ContrastiveLoss(1.0)(*far, torch.tensor([0])).item() == 0.0
    x = torch.zeros(1, 2, requires_grad=True)
    ContrastiveLoss(1.0)(x, torch.zeros(1, 2), torch.tensor([1])).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):
        ContrastiveLoss(0.0)


def test_confusable_classes_come_from_both_directions() -> None:
    c = confusion_counts(np.array([0, 0, 0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 1, 0, 2, 2, 1]), 3)
    assert c.tolist() == [[1, 1, 1], [1, 1, 0], [0, 1, 2]]
    assert confusable_classes(c, 1) == {0: [1], 1: [0], 2: [0]}  # 1 and 2 tie at 1 -> lower label
    assert confusable_classes(np.eye(3, dtype=int), 2) == {0: [], 1: [], 2: []}


def test_pairs_proportions_no_self_pairs_and_hard_negatives() -> None:
    labels = np.repeat(np.arange(4), 25)
    confusable = {0: [1], 1: [0], 2: [3], 3: [2]}
    pairs = make_pairs(labels, per_image=8, pos_fraction=0.5, hard_fraction=0.5, confusable=confusable, seed=0)
    assert len(pairs) == 8 * len(labels)
    assert (pairs["a"] != pairs["b"]).all()
    kinds = pairs["kind"].value_counts().to_dict()
    assert kinds == {POSITIVE: 400, HARD_NEGATIVE: 200, NEGATIVE: 200}
    la, lb = labels[pairs["a"]], labels[pairs["b"]]
    assert ((la == lb) == (pairs["same"] == 1)).all()
    hard = pairs["kind"] == HARD_NEGATIVE
    assert all(lb[i] in confusable[la[i]] for i in np.flatnonzero(hard))
    assert (la[pairs["kind"] == NEGATIVE] != lb[pairs["kind"] == NEGATIVE]).all()
    again = make_pairs(labels, per_image=8, pos_fraction=0.5, hard_fraction=0.5, confusable=confusable, seed=0)
    assert again.equals(pairs)


def test_fractional_counts_keep_their_proportions_on_average() -> None:
    labels = np.repeat(np.arange(4), 250)
    confusable = {0: [1], 1: [0], 2: [3], 3: [2]}
    pairs = make_pairs(labels, per_image=2, pos_fraction=0.5, hard_fraction=0.5, confusable=confusable, seed=0)
    kinds = pairs["kind"].value_counts()
    assert len(pairs) == 2000 and kinds[POSITIVE] == 1000
    assert 0.45 < kinds[HARD_NEGATIVE] / 1000 < 0.55


def test_hard_negatives_fall_back_to_uniform_without_confusion() -> None:
    labels = np.array([0, 0, 1, 1])
    pairs = make_pairs(labels, per_image=2, pos_fraction=0.5, hard_fraction=1.0, confusable={}, seed=0)
    assert set(pairs["kind"]) == {POSITIVE, NEGATIVE}


@pytest.mark.parametrize("contrastive", ["pairs", "batch"])
def test_tiny_siamese_run_lowers_the_contrastive_loss(tiny_pipeline: Path, monkeypatch, contrastive: str) -> None:
    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    params["train"]["epochs"] = 3
    params["pairs"] = {"scorer": "early", "folds": 2, "crossfit_epochs": 1, "probe": {"C": 1.0, "max_iter": 100},
                       "filter": "threshold", "min_prob": 0.05,
                       "filter_by": "prune_by_class", "relabel_min_prob": 0.6, "min_top_prob": 0.0,
                       "min_images_per_class": 5, "min_kept_share": 0.3, "per_image": 4, "pos_fraction": 0.5,
                       "hard_fraction": 0.5,
                       "confusable_breeds": 1, "seed": 0}
    naive_only = ("val_fraction", "early_epoch", "parallel_runs", "head_init", "probe")
    params["siamese"] = {**{k: v for k, v in params["train"].items() if k not in naive_only},
                         "epochs": 4, "lr": 0.02, "warmup_epochs": 0, "batch_size": 16,
                         "start": "naive", "contrastive": contrastive, "contrastive_weight": 1.0, "margin": 1.0,
                         "reduction": "active", "images_per_breed": 16, "neg_margin": 0.4, "embedding_dim": 16,
                         "normalize": True,
                         # batch mode draws breeds as the click-filtered labels (scores.tsv): the stage reads them
                         "breed_share": "clicks" if contrastive == "batch" else "kept"}
    (tiny_pipeline / "params.yaml").write_text(yaml.safe_dump(params))
    raw = tiny_pipeline / "data" / "raw"
    raw.mkdir()
    monkeypatch.chdir(tiny_pipeline)
    train_naive.main(["data/filtered", "data/images", "models/naive"])
    make_pairs_stage.main(["data/raw", "data/filtered", "data/images", "models/naive", "data/pairs"])
    pairs = pd.read_csv(tiny_pipeline / "data/pairs/pairs.tsv", sep="\t")
    val_keys = set(pd.read_csv(tiny_pipeline / "models/naive/val_predictions.tsv", sep="\t")["key"])
    assert not (set(pairs["key_a"]) | set(pairs["key_b"])) & val_keys  # validation stays out of training
    train_siamese.main(["data/pairs", "data/images", "models/naive", "models/siamese"])
    ckpt = torch.load(tiny_pipeline / "models/siamese/checkpoints/last.pt", weights_only=True)
    con = [h["train_contrastive"] for h in ckpt["history"]]
    assert con[-1] < con[0]
    model, meta = load_model_file(tiny_pipeline / "models/siamese/model.pt")
    assert meta["embedding_dim"] == 16 and meta["classes"] == ["red dog", "green dog", "blue dog"]
    logits, emb = model(torch.zeros(2, 3, 32, 32), with_embedding=True)
    assert logits.shape == (2, 3) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-4)

    # resume works as in the naive stage
    straight = torch.load(tiny_pipeline / "models/siamese/model.pt", weights_only=True)["state_dict"]
    monkeypatch.setenv(engine.STOP_ENV, "2")
    with pytest.raises(engine.TrainingInterrupted):
        train_siamese.main(["data/pairs", "data/images", "models/naive", "models/resumed"])
    monkeypatch.delenv(engine.STOP_ENV)
    train_siamese.main(["data/pairs", "data/images", "models/naive", "models/resumed"])
    resumed = torch.load(tiny_pipeline / "models/resumed/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_training_step_reads_no_logged_value_back_to_the_host(monkeypatch) -> None:
    """The loss returns its parts as tensors and the epoch sums them on the device: on a GPU every
    .item() is a synchronisation, and the siamese step once made seven of them (the loss, its five parts
    and the accuracy) per step. Now the values are read once per epoch, whatever the number of steps."""
    from stages.lib.models import build_model
    from stages.lib.siamese import siamese_loss

    torch.manual_seed(0)
    model = build_model("resnet18", 3, embedding_dim=8, normalize=True)
    loss_fn = siamese_loss(contrastive_weight=1.0, margin=1.0, label_smoothing=0.1)
    steps, n = 5, 4
    batches = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8),
                torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8),
                torch.randint(0, 3, (n,)), torch.randint(0, 3, (n,)), torch.tensor([1, 0, 1, 0]))
               for _ in range(steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ctx = engine.RunContext(device=torch.device("cpu"), amp_dtype=None)
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    logs = engine.train_one_epoch(model, loss_fn, batches, optimizer, scheduler, None, ctx, epoch=0)
    logged = {"loss", "ce", "contrastive", "contrastive_pos", "contrastive_neg", "active_negatives", "acc"}
    assert logged <= set(logs) and all(np.isfinite(logs[k]) for k in logged)
    assert len(reads) == len(logged)  # once per value per epoch (before: 7 per step, 35 here)


def test_breed_weights_follow_breed_share() -> None:
    from stages.lib.siamese import breed_weights

    clicks = pd.Series([0, 0, 0, 1, 2, 2])
    assert breed_weights("kept", clicks, 4) is None  # the sampler then draws as the kept images
    np.testing.assert_array_equal(breed_weights("uniform", None, 3), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(breed_weights("clicks", clicks, 4), [3.0, 1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="needs the click-filtered labels"):
        breed_weights("clicks", None, 3)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.2"):
        breed_weights("clicks", pd.Series([0, 3]), 3)


def test_breed_share_clicks_restores_the_breeds_share_the_label_filter_took() -> None:
    """The filter kept 10 of breed 1's 100 click labels and 100 of breed 0's:
    drawn as kept, breed 1 fills a tenth of the batches; drawn as the clicks,
    half (each of its images is then seen ten times as often)."""
    from stages.lib.params import load_params
    from stages.lib.siamese import SiameseConfig, breed_batches

    cfg = SiameseConfig.from_params({**load_params("siamese"), "batch_size": 2, "images_per_breed": 4}, "siamese")
    clean = pd.DataFrame({"key": [f"k{i}" for i in range(110)], "label": [0] * 100 + [1] * 10})
    val = pd.DataFrame({"key": ["k0"]})
    pairs = pd.DataFrame({"a": range(4000)})  # 2000 batches of one breed x 4 images
    clicks = pd.Series([0] * 100 + [1] * 100)
    shares = {}
    for share in ("kept", "clicks"):
        sampler = breed_batches(clean, val, pairs, cfg.replace(breed_share=share), 2, clicks)
        drawn = np.array([clean["label"][i] for batch in sampler for i, _ in batch])
        shares[share] = (drawn == 1).mean()
    assert 0.07 < shares["kept"] < 0.13 and 0.45 < shares["clicks"] < 0.55
