"""Linear probes: a logistic regression on frozen features, as one linear layer.

Three callers fit probes on the features of ``classifier.extract_features``:
the probe reference models of ``train_references`` (``probe_raw``,
``probe_truth``: the floor every fine-tuned model must clear in the
pretrained regime), the ``features`` label scorer of ``make_pairs``
(cross-fitted probes, each scoring the fold it did not see, :func:`crossfit_probs`)
and ``train.head_init: probe`` (linear probe, then fine-tune: the new head
starts as the probe of the training labels, ``classifier.probe_head``).

A probe is a multinomial logistic regression (scikit-learn, L2 penalty
``C``) on standardised features. Standardising and the regression are both
affine, so together they are one linear layer: :class:`LinearProbe` holds it
with the scaler folded in, and :meth:`LinearProbe.into` writes it into a
``Classifier``'s own head. A probe is therefore saved as an ordinary model file
(the initial trunk, this head) that ``evaluate`` and ``predict`` use like any
other: ``softmax(head(trunk(x)))`` is the regression's ``predict_proba``.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from stages.lib.params import Section

log = logging.getLogger("probe")

# the logit of a class the probe never saw (absent from its training labels): probability 0 after the
# softmax, yet finite (a float32 head, and no NaN from inf - inf)
ABSENT_LOGIT = -1e4


@dataclass(frozen=True)
class ProbeConfig(Section):
    """``reference.probe`` / ``pairs.probe`` / ``train.probe``: the logistic regression on frozen
    features (scikit-learn's ``LogisticRegression``, lbfgs, multinomial, on
    standardised features)."""

    C: float        # inverse L2 strength
    max_iter: int   # lbfgs iterations; a run that stops short logs how far it got

    def __post_init__(self) -> None:
        if not self.C > 0 or self.max_iter < 1:
            raise ValueError(f"C must be > 0 and max_iter >= 1, got {self.C}, {self.max_iter}")


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe as one linear layer on raw features: ``logits = features @ weight.T + bias``."""

    weight: np.ndarray  # (classes, feature_dim), float64
    bias: np.ndarray    # (classes,)
    n_iter: int         # lbfgs iterations it took
    converged: bool

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weight.T + self.bias

    def probs(self, features: np.ndarray) -> np.ndarray:
        """Softmax of :meth:`logits`: the regression's ``predict_proba`` over every class."""
        z = self.logits(features)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def into(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` whose head is this probe."""
        if self.weight.shape != tuple(model.head.weight.shape):
            raise ValueError(f"a probe of shape {self.weight.shape} does not fit the head "
                             f"{tuple(model.head.weight.shape)}")
        out = copy.deepcopy(model).cpu()
        with torch.no_grad():
            out.head.weight.copy_(torch.from_numpy(self.weight))
            out.head.bias.copy_(torch.from_numpy(self.bias))
        return out


def fit_probe(features: np.ndarray, labels: Sequence[int], num_classes: int, cfg: ProbeConfig) -> LinearProbe:
    """Multinomial logistic regression (L2, ``cfg.C``) on standardised
    ``features``, returned as one linear layer on the raw features (the
    scaler folded in). A class without a training image gets logit
    ``ABSENT_LOGIT``: probability 0. Deterministic (lbfgs draws nothing)."""
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"a probe needs labels of 2 classes or more, got {present.tolist()} on {len(y)} images")
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        lr.fit(scaler.transform(x), y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    n_iter = int(np.max(lr.n_iter_))
    if not converged:
        log.warning("probe: lbfgs stopped at max_iter %d before converging (C %g, %d images, %d dims): the "
                    "probabilities are usable; raise max_iter of the probe in use (reference.probe, pairs.probe "
                    "or train.probe) to finish",
                    cfg.max_iter, cfg.C, len(y), x.shape[1])
    coef, intercept = lr.coef_, lr.intercept_
    if len(lr.classes_) == 2:  # binary: one logit for classes_[1]; as a softmax, logits (0, z) give the same p
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = np.zeros((num_classes, x.shape[1]))
    bias = np.full(num_classes, ABSENT_LOGIT)
    # w . (x - mean) / scale + b = (w / scale) . x + (b - w . mean / scale)
    weight[lr.classes_] = coef / scaler.scale_
    bias[lr.classes_] = intercept - (coef / scaler.scale_) @ scaler.mean_
    return LinearProbe(weight, bias, n_iter, converged)


def crossfit_probs(features: np.ndarray, labels: Sequence[int], num_classes: int,
                   splits: Sequence[tuple[np.ndarray, np.ndarray]], cfg: ProbeConfig) -> np.ndarray:
    """Out-of-fold class probabilities: for each ``(fit, score)`` index pair
    of ``splits``, a probe fitted on the ``fit`` rows scores the ``score``
    rows (every row must be scored exactly once)."""
    y = np.asarray(labels, np.int64)
    p = np.full((len(y), num_classes), np.nan)
    for k, (fit_idx, score_idx) in enumerate(splits):
        start = time.time()
        probe = fit_probe(features[fit_idx], y[fit_idx], num_classes, cfg)
        p[score_idx] = probe.probs(features[score_idx])
        log.info("probe fold %d/%d: fit on %d, scored %d (%d lbfgs iterations, %.1f s)", k + 1, len(splits),
                 len(fit_idx), len(score_idx), probe.n_iter, time.time() - start)
    if np.isnan(p).any():
        raise ValueError("the splits left rows unscored: each row must be in exactly one scored fold")
    return p
