"""The contrastive loss of Hadsell, Chopra & LeCun (2006), "Dimensionality
Reduction by Learning an Invariant Mapping"."""
from __future__ import annotations

import torch
from torch import nn


class ContrastiveLoss(nn.Module):
    """Mean over pairs of ``same * d**2 + (1 - same) * max(0, margin - d)**2``.

    ``d`` is the Euclidean distance between the two embeddings of a pair:
    same-breed pairs are pulled together, different-breed pairs pushed apart
    until they are ``margin`` away (and then left alone). The paper's 1/2
    factors are dropped; they only rescale ``contrastive_weight``.
    """

    def __init__(self, margin: float = 1.0, eps: float = 1e-9) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        self.margin = margin
        self.eps = eps

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        if emb_a.shape != emb_b.shape or emb_a.ndim != 2 or same.shape != emb_a.shape[:1]:
            raise ValueError(f"need (N, D), (N, D), (N,); got {tuple(emb_a.shape)}, "
                             f"{tuple(emb_b.shape)}, {tuple(same.shape)}")
        # at least fp32 under autocast; eps keeps sqrt's gradient finite for identical embeddings
        dtype = torch.promote_types(emb_a.dtype, torch.float32)
        d = torch.sqrt(((emb_a.to(dtype) - emb_b.to(dtype)) ** 2).sum(dim=1) + self.eps)
        same = same.to(dtype)
        return (same * d.pow(2) + (1 - same) * torch.clamp(self.margin - d, min=0).pow(2)).mean()
