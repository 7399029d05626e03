"""What the study scripts (scripts/photo_study.py, scripts/photo_zeroshot.py) share. No stage imports
this module, so changing it re-runs nothing in dvc.yaml."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_se(x: Sequence[float], signed: bool = True, digits: int = 3) -> str:
    """``mean ± s.e.`` of scores over seeds (the standard error of the mean, ddof 1), as the studies
    report them; ``signed`` puts a + on a positive mean (a paired difference). One value: the mean alone."""
    a = np.asarray(x, float)
    sign = "+" if signed else ""
    if len(a) < 2:
        return f"{a.mean():{sign}.{digits}f}" if len(a) else "n/a"
    return f"{a.mean():{sign}.{digits}f} ± {a.std(ddof=1) / np.sqrt(len(a)):.{digits}f}"
