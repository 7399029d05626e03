"""Contrastive losses, reporting their parts: the pair loss of Hadsell, Chopra
& LeCun (2006), "Dimensionality Reduction by Learning an Invariant Mapping",
on make_pairs' pairs, and pytorch-metric-learning's on the pairs inside a batch."""
from __future__ import annotations

from typing import Literal, get_args

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import ContrastiveLoss as PMLContrastiveLoss
from torch import nn

Reduction = Literal["active", "all"]  # declared once: SiameseConfig.reduction takes this type
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


class ContrastiveLoss(nn.Module):
    """``same * d**2`` for a same-breed pair and ``max(0, margin - d)**2`` for a
    different-breed pair, where ``d`` is the Euclidean distance between the two
    embeddings: same-breed pairs are pulled together, different-breed pairs
    pushed apart until they are ``margin`` away (and then left alone). The
    paper's 1/2 factors are dropped; they only rescale the loss weight.

    How it averages (``reduction``):

    * ``active`` (default): the positive term is averaged over the positive
      pairs, the negative term over the *active* negative pairs (those still
      inside the margin), and the loss is their sum, as
      pytorch-metric-learning's ``ContrastiveLoss`` with ``AvgNonZeroReducer``.
      Averaging a negative term over every negative pair would shrink its
      gradient as training pushes pairs out of the margin, until the term
      does nothing while the hard pairs are still inside it;
    * ``all``: the mean of the per-pair losses over every pair (the paper's
      form).

    L2-normalised embeddings lie within distance 2 of each other, so a margin
    of at most 2 is reachable; a larger one keeps every negative active.
    """

    def __init__(self, margin: float = 1.0, *, reduction: str = "active", eps: float = 1e-9) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.margin, self.reduction, self.eps = margin, reduction, eps

    def terms(self, emb_a: torch.Tensor, emb_b: torch.Tensor, same: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss`` and its parts: ``positive`` and ``negative`` terms (as they
        enter the loss), ``active_negatives`` (share of negative pairs inside
        the margin), ``pos_distance`` and ``neg_distance`` (mean distances)."""
        if emb_a.shape != emb_b.shape or emb_a.ndim != 2 or same.shape != emb_a.shape[:1]:
            raise ValueError(f"need (N, D), (N, D), (N,); got {tuple(emb_a.shape)}, "
                             f"{tuple(emb_b.shape)}, {tuple(same.shape)}")
        # at least fp32 under autocast; eps keeps sqrt's gradient finite for identical embeddings
        dtype = torch.promote_types(emb_a.dtype, torch.float32)
        d = torch.sqrt(((emb_a.to(dtype) - emb_b.to(dtype)) ** 2).sum(dim=1) + self.eps)
        # masks as weights, not boolean indexing: no data-dependent shape, so no host synchronisation on a
        # GPU; a mean over no pair is 0 (a count clamped at 1), and the graph is kept
        pos = same.to(dtype)
        neg = 1 - pos
        gap = torch.clamp(self.margin - d, min=0)
        active = (gap > 0).to(dtype) * neg

        def mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return (values * weights).sum() / weights.sum().clamp(min=1)

        if self.reduction == "active":
            positive, negative = mean(d.pow(2), pos), mean(gap.pow(2), active)
        else:
            n = max(1, len(d))
            positive, negative = (d.pow(2) * pos).sum() / n, (gap.pow(2) * neg).sum() / n
        return {"loss": positive + negative, "positive": positive.detach(), "negative": negative.detach(),
                "active_negatives": mean(active, neg).detach(),
                "pos_distance": mean(d, pos).detach(), "neg_distance": mean(d, neg).detach()}

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        return self.terms(emb_a, emb_b, same)["loss"]


class InBatchContrastiveLoss(nn.Module):
    """Every two images of a batch are a pair: same breed positive, different
    breed negative (so a P breeds x K images batch gives each image K - 1
    positives). pytorch-metric-learning's ``ContrastiveLoss`` on cosine
    similarity ``s``: a positive pair costs ``1 - s``, a negative pair
    ``max(0, s - neg_margin)`` (different breeds are pushed apart only while
    more similar than ``neg_margin``). How it averages: each term over its
    pairs with a non-zero loss (``AvgNonZeroReducer``, as ``active`` above),
    and the loss is their sum.
    """

    def __init__(self, neg_margin: float) -> None:
        super().__init__()
        if not -1 < neg_margin < 1:
            raise ValueError(f"neg_margin is a cosine similarity in (-1, 1), got {neg_margin}")
        self.loss = PMLContrastiveLoss(pos_margin=1.0, neg_margin=neg_margin, distance=CosineSimilarity())

    def terms(self, emb: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss`` and its ``positive`` and ``negative`` terms (each reduced by
        the loss's own reducer, as its forward would)."""
        if emb.ndim != 2 or labels.shape != emb.shape[:1]:
            raise ValueError(f"need (N, D), (N,); got {tuple(emb.shape)}, {tuple(labels.shape)}")
        emb = emb.to(torch.promote_types(emb.dtype, torch.float32))
        # ref = the batch itself (the same objects: pml then leaves out each image paired with itself)
        parts = self.loss.compute_loss(emb, labels, None, emb, labels)
        reducers = self.loss.reducer.reducers
        positive = reducers["pos_loss"]({"pos_loss": parts["pos_loss"]}, emb, labels)
        negative = reducers["neg_loss"]({"neg_loss": parts["neg_loss"]}, emb, labels)
        return {"loss": positive + negative, "positive": positive.detach(), "negative": negative.detach()}

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.terms(emb, labels)["loss"]
