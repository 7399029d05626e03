"""check_metrics: pass, regression, missing model / metric, improvement note."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from stages import check_metrics

BASELINE = {
    "naive": {"top1": 0.80, "top5": 0.95, "mean_class_accuracy": 0.78, "n_test": 400},
    "siamese": {"top1": 0.82, "top5": 0.96, "mean_class_accuracy": 0.80, "n_test": 400},
    "data": {"click_filter": {"images": 3000, "precision": 0.9}},
}
TOLERANCE = {"top1": 0.03, "top5": 0.02, "mean_class_accuracy": 0.03}


@pytest.fixture
def run(tmp_path: Path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"check": {"tolerance": TOLERANCE}}))
    (tmp_path / "baseline.json").write_text(json.dumps(BASELINE))

    def _run(current: dict) -> tuple[int, str, str]:
        (tmp_path / "current.json").write_text(json.dumps(current))
        code = check_metrics.main([str(tmp_path / "baseline.json"), str(tmp_path / "current.json"),
                                   "--params", str(tmp_path / "params.yaml")])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def test_within_tolerance_passes(run):
    current = copy.deepcopy(BASELINE)
    current["naive"]["top1"] = 0.77  # a drop of exactly the tolerance
    current["siamese"]["top5"] = 0.97
    current["data"]["click_filter"]["precision"] = 0.1  # the data block is not checked
    code, out, _ = run(current)
    assert code == 0
    assert out.splitlines()[0].split() == ["metric", "baseline", "current", "delta", "tolerance", "verdict"]
    assert len([line for line in out.splitlines() if line.startswith(("naive.", "siamese."))]) == 6
    assert "naive.top1" in out and "-0.0300" in out and "note:" not in out


def test_regression_fails_with_table(run):
    current = copy.deepcopy(BASELINE)
    current["siamese"]["mean_class_accuracy"] = 0.70
    code, out, err = run(current)
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("siamese.mean_class_accuracy"))
    assert row.split() == ["siamese.mean_class_accuracy", "0.8000", "0.7000", "-0.1000", "0.0300", "REGRESSION"]
    assert "1 regression(s)" in err


@pytest.mark.parametrize("drop", ["model", "metric", "null"])
def test_missing_fails(run, drop):
    current = copy.deepcopy(BASELINE)
    if drop == "model":
        del current["siamese"]
    elif drop == "metric":
        del current["naive"]["top5"]
    else:
        current["naive"]["top5"] = None
    code, out, err = run(current)
    assert code == 1
    assert "MISSING" in out and "missing" in err


def test_improvement_is_a_note(run):
    current = copy.deepcopy(BASELINE)
    current["naive"]["top1"] = 0.90
    code, out, _ = run(current)
    assert code == 0
    assert "better" in out and "note: naive.top1 improved" in out and "may need updating" in out


def test_unreadable_file_is_exit_2(run, tmp_path: Path, capsys):
    code = check_metrics.main([str(tmp_path / "baseline.json"), str(tmp_path / "nope.json"),
                               "--params", str(tmp_path / "params.yaml")])
    assert code == 2 and "cannot read" in capsys.readouterr().err
