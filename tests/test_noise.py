"""Label-noise handling: the three filters on out-of-sample probabilities,
and the guards that stop a filter leaving too little to learn from."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stages.lib.noise import (
    KEPT,
    LABEL_ISSUE,
    LOW_PROBABILITY,
    NO_BREED,
    RELABELLED,
    check_enough_left,
    clean_labels,
    filtered_table,
)


def one_sided_noise(n_per_class: int = 200, seed: int = 0):
    """3 classes; 30% of class 1 and of class 2 are labelled 0 (the best-known
    breed absorbs its look-alikes). The scorer's probabilities lean to the
    true class (0.7 on average) with noise."""
    rng = np.random.default_rng(seed)
    true = np.repeat(np.arange(3), n_per_class)
    given = true.copy()
    flip = (true > 0) & (rng.random(len(true)) < 0.3)
    given[flip] = 0
    logits = rng.normal(0, 1.0, size=(len(true), 3))
    logits[np.arange(len(true)), true] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return true, given, probs


def cfg(method: str, **kw) -> dict:
    return {"method": method, "min_prob": 0.2, "filter_by": "prune_by_class", "relabel_min_prob": 0.6,
            "min_top_prob": 0.0, **kw}


def precision(true, labels, status) -> float:
    keep = np.isin(status, (KEPT, RELABELLED))
    return float((labels[keep] == true[keep]).mean())


def test_threshold_is_the_global_cut() -> None:
    labels = np.array([0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.85, 0.15], [0.3, 0.7]])
    new, status = clean_labels(labels, probs, **cfg("threshold"))
    assert status.tolist() == [KEPT, LOW_PROBABILITY, KEPT] and new.tolist() == [0, 1, 1]


def test_cleanlab_and_relabel_clean_one_sided_noise() -> None:
    true, given, probs = one_sided_noise()
    raw = float((given == true).mean())
    _, st_c = clean_labels(given, probs, **cfg("cleanlab"))
    new, st_r = clean_labels(given, probs, **cfg("relabel"))
    assert set(st_c) <= {KEPT, LABEL_ISSUE} and (st_c == LABEL_ISSUE).any()
    assert precision(true, given, st_c) > raw + 0.05
    # relabelling turns confidently contradicted labels into (mostly) right ones and keeps more images
    changed = st_r == RELABELLED
    assert changed.any() and (new[changed] == true[changed]).mean() > 0.8
    assert np.isin(st_r, (KEPT, RELABELLED)).sum() > (st_c == KEPT).sum()
    assert precision(true, new, st_r) > raw + 0.05


@pytest.mark.parametrize("method", ["threshold", "cleanlab", "relabel"])
def test_min_top_prob_drops_the_images_no_breed_claims(method: str) -> None:
    """pairs.min_top_prob: whatever the filter, an image whose top breed has p below it is dropped as
    no_breed (non-dogs spread their probability); an image the filter dropped keeps its reason; 0 is off."""
    true, given, probs = one_sided_noise()
    flat = np.arange(0, len(given), 10)  # every tenth image: no breed stands out
    probs = probs.copy()
    probs[flat] = [0.36, 0.33, 0.31]
    off_new, off = clean_labels(given, probs, **cfg(method))
    new, status = clean_labels(given, probs, **cfg(method, min_top_prob=0.4))
    assert (new == off_new).all()
    was_kept = np.isin(off, (KEPT, RELABELLED))
    assert (status[flat][was_kept[flat]] == NO_BREED).all() and was_kept[flat].any()
    assert (status[flat][~was_kept[flat]] == off[flat][~was_kept[flat]]).all()  # the filter's own reason stays
    others = np.setdiff1d(np.arange(len(given)), flat)
    confident = others[probs[others].max(1) >= 0.4]
    assert (status[confident] == off[confident]).all()
    assert not (off == NO_BREED).any()
    with pytest.raises(ValueError, match="pairs.min_top_prob"):
        clean_labels(given, probs, **cfg(method, min_top_prob=1.5))


def test_cleanlab_runs_in_this_process(monkeypatch) -> None:
    """cleanlab's default n_jobs forks a multiprocessing.Pool from a process that runs torch's threads:
    make test hung there for 20 minutes. No pool may start."""
    import multiprocessing.pool

    def no_pool(*args, **kwargs):
        raise AssertionError("cleanlab started a process pool")

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", no_pool)
    true, given, probs = one_sided_noise()
    for method in ("cleanlab", "relabel"):
        _, status = clean_labels(given, probs, **cfg(method))
        assert (status == LABEL_ISSUE).any() or (status == RELABELLED).any()


def test_bad_inputs_and_settings_are_refused() -> None:
    ok = np.array([[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="pairs.filter must"):
        clean_labels(np.array([0, 1]), ok, **cfg("median"))
    with pytest.raises(ValueError, match="pairs.filter_by"):
        clean_labels(np.array([0, 1]), ok, **cfg("cleanlab", filter_by="prune_by_luck"))
    with pytest.raises(ValueError, match="sum to 1"):
        clean_labels(np.array([0, 1]), np.array([[0.5, 0.6], [0.5, 0.5]]), **cfg("threshold"))
    with pytest.raises(ValueError, match="labels must lie"):
        clean_labels(np.array([0, 2]), ok, **cfg("threshold"))


def test_filtered_table_keeps_the_click_label_beside_the_new_one() -> None:
    labels = pd.DataFrame({"key": ["a", "b", "c"], "label": [0, 0, 1], "breed": ["x", "x", "y"]})
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.45, 0.55]])
    clean, status = filtered_table(labels, probs, ["x", "y"], **cfg("relabel", relabel_min_prob=0.8))
    assert status.tolist() == [KEPT, RELABELLED, KEPT]
    assert clean["breed"].tolist() == ["x", "y", "y"] and clean["click_breed"].tolist() == ["x", "x", "y"]
    assert clean["p_label"].round(2).tolist() == [0.9, 0.9, 0.55]


def test_a_filter_that_empties_a_class_stops_with_the_numbers() -> None:
    before = {"beagle": 100, "basset hound": 40, "rare": 3}
    check_enough_left(before, {"beagle": 90, "basset hound": 30, "rare": 0}, stage="s", min_per_class=20,
                      min_kept_share=0.5, params="p.x")  # "rare" never had enough: not the filter's doing
    with pytest.raises(ValueError, match=r"s: .*basset hound 12 of 40.*Loosen p\.x"):
        check_enough_left(before, {"beagle": 90, "basset hound": 12}, stage="s", min_per_class=20,
                          min_kept_share=0.5, params="p.x")
    with pytest.raises(ValueError, match=r"kept 50 of 143 images .*below min_kept_share 50%"):
        check_enough_left(before, {"beagle": 25, "basset hound": 25}, stage="s", min_per_class=20,
                          min_kept_share=0.5, params="p.x")
