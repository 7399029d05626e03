"""The seed study's summary: paired differences and the two-standard-error verdict."""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
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


def test_scorer_epochs_configurations_parse_and_refuse_what_they_cannot_run() -> None:
    assert seed_study.config_name("cleanlab_batch_nobreed_clicks_cf30") == "cleanlab_batch_nobreed_clicks_cf30"
    assert seed_study.base_config("cleanlab_batch_nobreed_clicks_cf30") == "cleanlab_batch_nobreed_clicks"
    assert seed_study.scorer_epochs("cleanlab_cf45", 15) == 45
    assert seed_study.scorer_epochs("cleanlab", 15) == 15  # no suffix: params.yaml's pairs.crossfit_epochs
    for bad in ("naive_cf30", "cleanlab_cf0", "cleanlab_cf", "cleanlab_batch_cf30_ce", "nothing"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"unknown configuration '{bad}'"):
            seed_study.config_name(bad)


def test_one_scorer_per_epochs_shared_by_the_configurations_that_name_them() -> None:
    served = seed_study.scorer_runs(["cleanlab_cf30", "cleanlab", "cleanlab_ce", "cleanlab_ce_cf30",
                                     "relabel_cf45"], 15)
    assert served == {15: ["cleanlab", "cleanlab_ce"], 30: ["cleanlab_cf30", "cleanlab_ce_cf30"],
                      45: ["relabel_cf45"]}


def test_a_longer_trained_scorer_pairs_with_its_configuration_and_has_a_gap_recovery() -> None:
    runs = _runs({"raw": [0.70, 0.80, 0.75], "truth": [0.90, 1.00, 0.95], "naive": [0.72, 0.82, 0.77],
                  "cleanlab": [0.78, 0.86, 0.83], "cleanlab_cf30": [0.80, 0.88, 0.86]})
    table = seed_study.paired_differences(runs)
    d = np.array([0.02, 0.02, 0.03])  # cleanlab_cf30 - cleanlab, seed by seed
    assert f"| cleanlab_cf30 − cleanlab | 3 | {d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(3):.3f} | yes |" in table
    assert "| cleanlab_cf30 − raw | 3 | +0.097 ± 0.009 | yes |" in table
    assert "| cleanlab_cf30 − naive | 3 |" in table
    assert ("cleanlab: 0.40, 0.30, 0.40 (mean 0.367 ± 0.033); "
            "cleanlab_cf30: 0.50, 0.40, 0.55 (mean 0.483 ± 0.044).") in table
    models = [line.split(" | ")[0] for line in seed_study.summary_table(runs).splitlines()[2:7]]
    assert models == ["| truth", "| raw", "| naive", "| cleanlab", "| cleanlab_cf30"]  # each after its base


def test_each_run_records_its_commit_a_dirty_tree_and_its_machine(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # whatever repository holds tmp_path
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()
    outside = seed_study.provenance({"device": "cpu", "precision": "fp32"}, cwd=tmp_path)
    assert outside["commit"] == "unknown (not a git checkout)"
    git("init", "-q")
    (tmp_path / "params.yaml").write_text("pairs: {crossfit_epochs: 15}\n")
    git("add", "params.yaml")
    git("commit", "-q", "-m", "params")
    clean = seed_study.provenance({"device": "cpu", "precision": "bf16"}, cwd=tmp_path)
    assert clean["commit"] == git("rev-parse", "--short", "HEAD")
    assert clean["machine"].endswith(f", {os.cpu_count()} cores, bf16")
    assert clean["date"] == datetime.date.today().isoformat()
    (tmp_path / "params.yaml").write_text("pairs: {crossfit_epochs: 45}\n")  # the study's edited params
    assert seed_study.provenance({"device": "cpu", "precision": "fp32"}, cwd=tmp_path)["commit"] == \
        clean["commit"] + "+dirty"


def test_each_configuration_names_its_fine_tune_whatever_the_order_of_its_variants() -> None:
    from pathlib import Path

    from stages.lib.params import load_sections
    from stages.lib.siamese import SiameseConfig

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    base = load_sections(params, siamese=SiameseConfig)["siamese"].replace(
        contrastive="pairs", breed_share="kept", contrastive_weight=1.0, ema_half_life=0.0)
    clicks_ce = seed_study.fine_tune_config("cleanlab_batch_nobreed_clicks_ce_cf30", base, 1.0)
    assert (clicks_ce.contrastive, clicks_ce.breed_share, clicks_ce.contrastive_weight) == ("batch", "clicks", 0.0)
    assert seed_study.FILTERS["cleanlab_batch_nobreed_clicks_ce"] == "cleanlab"
    uniform = seed_study.fine_tune_config("cleanlab_batch_nobreed_uniform", base, 1.0)
    assert (uniform.breed_share, uniform.contrastive_weight) == ("uniform", 1.0)
    paper_pairs = seed_study.fine_tune_config("cleanlab_ema", base.replace(contrastive="batch"), 2.0)
    assert (paper_pairs.contrastive, paper_pairs.breed_share, paper_pairs.ema_half_life) == ("pairs", "kept", 2.0)
