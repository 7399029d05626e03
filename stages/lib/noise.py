"""Label-noise handling on out-of-sample probabilities: which weak labels to
keep, drop or change.

``probs`` (images x classes) must be *out of sample* (cross-fitting): a model
scoring its own training images has memorised their labels. Three methods:

* ``threshold``: the paper's rule, keep an image when p(its label) >=
  ``min_prob``: one global cut;
* ``cleanlab``: confident learning (Northcutt et al. 2021) through
  ``cleanlab.filter.find_label_issues``: per-class thresholds (each class's
  mean self-confidence) estimate the joint of noisy and true labels and prune
  the images most likely mislabelled. It sees class-dependent noise, such as
  look-alikes clicked under the best-known breed's name, that one global cut
  cannot;
* ``relabel``: as ``cleanlab``, but an image whose out-of-sample argmax has
  p >= ``relabel_min_prob`` takes that breed as its label instead of being
  dropped (or kept with a contradicted label): a look-alike clicked under the
  wrong name is still a good example of its own breed.

With ``min_top_prob`` > 0, any of them also drops an image whose top breed
has p < ``min_top_prob`` (``no_breed``): the max-softmax out-of-distribution
baseline (Hendrycks & Gimpel 2017). A non-dog clicked under a random breed
looks like no breed the scorer knows and spreads its probability; a dog,
even a mislabelled one, puts it on its own breed or its look-alike.

Returns a table the stage writes as it is: the label kept, whether it was
changed, and a reason for every image dropped.
"""
from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

# declared once: PairsConfig's fields take these types, the checks here their values
FilterMethod = Literal["threshold", "cleanlab", "relabel"]
CleanlabFilter = Literal["prune_by_class", "prune_by_noise_rate", "both", "confident_learning", "predicted_neq_given"]
METHODS: tuple[str, ...] = get_args(FilterMethod)
CLEANLAB_FILTERS: tuple[str, ...] = get_args(CleanlabFilter)
KEPT, RELABELLED, LOW_PROBABILITY, LABEL_ISSUE = "kept", "relabelled", "low_probability", "label_issue"
NO_BREED = "no_breed"  # the scorer's top breed is below min_top_prob: likely no dog of any class


def assert_valid_inputs(labels: np.ndarray, probs: np.ndarray) -> None:
    """Labels are integers in [0, classes); probs a finite, row-stochastic matrix of one row per label."""
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"need probs of shape (images, classes) for {len(labels)} labels, got {probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    if not np.isfinite(probs).all() or not np.allclose(probs.sum(1), 1, atol=1e-3):
        raise ValueError("probs must be finite and each row must sum to 1 (out-of-sample softmax outputs)")


def clean_labels(labels: np.ndarray, probs: np.ndarray, *, method: str, min_prob: float, filter_by: str,
                 relabel_min_prob: float, min_top_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """(new label per image, status per image): status is ``kept``,
    ``relabelled`` or the reason it was dropped (``low_probability``,
    ``label_issue``, ``no_breed``); dropped images keep their old label in the
    first array. The settings are params ``pairs.filter``, ``pairs.min_prob``,
    ``pairs.filter_by``, ``pairs.relabel_min_prob`` and ``pairs.min_top_prob``."""
    # every setting and input checked, and converted, once on entry: before the filter's work
    if method not in METHODS:
        raise ValueError(f"pairs.filter must be one of {METHODS}, got {method!r}")
    if filter_by not in CLEANLAB_FILTERS:
        raise ValueError(f"pairs.filter_by must be one of {CLEANLAB_FILTERS}, got {filter_by!r}")
    if not 0 <= min_top_prob <= 1:
        raise ValueError(f"pairs.min_top_prob must be in [0, 1], got {min_top_prob}")
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    assert_valid_inputs(labels, probs)
    new, status = _filter_labels(labels, probs, method=method, min_prob=min_prob, filter_by=filter_by,
                                 relabel_min_prob=relabel_min_prob)
    # an image the filter already dropped keeps that reason
    status[np.isin(status, (KEPT, RELABELLED)) & (probs.max(1) < min_top_prob)] = NO_BREED
    return new, status


def _filter_labels(labels: np.ndarray, probs: np.ndarray, *, method: str, min_prob: float, filter_by: str,
                   relabel_min_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`clean_labels` without ``min_top_prob``, on its checked arrays: the filter ``method`` alone."""
    status = np.full(len(labels), KEPT, dtype=object)
    new = labels.copy()
    if method == "threshold":
        status[probs[np.arange(len(labels)), labels] < min_prob] = LOW_PROBABILITY
        return new, status
    from cleanlab.filter import find_label_issues  # imported here: the threshold rule does not need it

    # n_jobs=1: cleanlab's default starts a multiprocessing.Pool by fork from this process, which already
    # runs torch's and BLAS's threads; a forked worker can then wait for ever on a lock copied in its held
    # state, and a Pool never recovers from a dead worker (seen hanging make test). One process sorts the
    # per-class thresholds in seconds even for the real data (90k images x 100 breeds)
    status[find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1)] = LABEL_ISSUE
    if method == "relabel":
        top, p_top = probs.argmax(1), probs.max(1)
        change = (p_top >= relabel_min_prob) & (top != labels)
        new[change] = top[change]
        status[change] = RELABELLED
        # an issue whose own label the scorer confidently confirms is kept
        status[(status == LABEL_ISSUE) & (top == labels) & (p_top >= relabel_min_prob)] = KEPT
    return new, status


def filtered_table(labels: pd.DataFrame, probs: np.ndarray, classes: list[str], **settings: Any
                   ) -> tuple[pd.DataFrame, np.ndarray]:
    """(the kept rows of ``labels`` with their possibly new label and breed,
    p_label under the scorer and the click label as ``click_breed``; the
    status of every row). ``settings``: those of :func:`clean_labels`."""
    new_label, status = clean_labels(labels["label"].to_numpy(), probs, **settings)
    keep = np.isin(status, (KEPT, RELABELLED))
    names = np.asarray(classes, dtype=object)
    clean = labels.assign(label=new_label, breed=names[new_label],
                          p_label=np.asarray(probs)[np.arange(len(labels)), new_label],
                          click_breed=labels["breed"])[keep].reset_index(drop=True)
    return clean, status


def class_counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    """Images per class name."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts)}


def check_enough_left(before: dict[str, int], after: dict[str, int], *, stage: str, min_per_class: int,
                      min_kept_share: float, params: str) -> None:
    """Stop when a filter emptied a class (below ``min_per_class`` images
    after it, though it had enough before) or kept too small a share of the
    images: nothing downstream should train on what is left. ``params`` names
    the settings that decide the filter, for the message."""
    emptied = {c: (before[c], after.get(c, 0)) for c in before
               if before[c] >= min_per_class and after.get(c, 0) < min_per_class}
    n_before, n_after = sum(before.values()), sum(after.values())
    problems = []
    if emptied:
        problems.append(f"it left {len(emptied)} class(es) below {min_per_class} images "
                        f"(min_images_per_class): " + ", ".join(f"{c} {a} of {b}" for c, (b, a) in emptied.items()))
    if n_before and n_after < min_kept_share * n_before:
        problems.append(f"it kept {n_after} of {n_before} images ({n_after / n_before:.1%}), below "
                        f"min_kept_share {min_kept_share:.0%}")
    if problems:
        raise ValueError(f"{stage}: the filter leaves too little to learn from: {'; '.join(problems)}. "
                         f"Loosen {params}, or lower the limits if this is intended.")
