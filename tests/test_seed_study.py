"""The seed study's summary: paired differences and the two-standard-error verdict."""
from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import load_script

seed_study = load_script("seed_study")


def _runs(top1: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"config": c, "seed": s, "top1": v, "top5": 1.0, "mean_class_accuracy": v}
                         for c, values in top1.items() for s, v in enumerate(values)])


def test_paired_differences_pair_by_seed_and_judge_by_two_standard_errors() -> None:
    runs = _runs({"naive": [0.70, 0.80, 0.75], "cleanlab": [0.74, 0.83, 0.80], "cleanlab_ce": [0.72, 0.85, 0.73],
                  "raw": [0.80, 0.70, 0.76]})
    table = seed_study.paired_differences(runs)
    d = np.array([0.04, 0.03, 0.05])  # cleanlab - naive, seed by seed: a steady gain
    assert f"| cleanlab − naive | 3 | {d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(3):.3f} | yes |" in table
    assert "| naive − raw | 3 | -0.003 ± 0.058 | no: within seed noise |" in table
    assert "| cleanlab − cleanlab_ce | 3 | +0.023 ± 0.026 | no: within seed noise |" in table
    assert "threshold" not in table  # configurations that did not run are left out


def test_gap_recovery_per_seed_and_one_seed_cannot_tell() -> None:
    table = seed_study.paired_differences(_runs({"raw": [0.7], "truth": [0.9], "cleanlab": [0.8]}))
    assert "| truth − raw | 1 | +0.200 | one seed: cannot tell |" in table
    assert "per seed: cleanlab: 0.50 (mean 0.500 (one seed))." in table
    summary = seed_study.summary_table(_runs({"naive": [0.70, 0.80]}))
    assert "| naive | 2 | 0.750 ± 0.050 |" in summary
