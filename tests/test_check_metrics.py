"""check_metrics (the sample's CI check) and the trust rules of stages.lib.metriccheck: the tolerances,
the evaluate stage, the test set and the baseline come from the base commit, never from the commit
under test, and every check fails closed."""
from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from stages import check_metrics
from stages.lib import metriccheck
from stages.lib.metriccheck import CheckConfig
from stages.lib.params import ConfigError


def _block(top1: float) -> dict:
    return {"top1": top1, "top5": 0.95, "mean_class_accuracy": top1 - 0.02, "n_test": 400, "n_not_scored": 0}


BASELINE = {"naive": _block(0.80), "siamese": _block(0.82),
            "data": {"click_filter": {"images": 3000, "precision": 0.9}, "test": {"digest": "sha256:abc"}}}
CHECK = {"tolerance": {"top1": 0.03, "top5": 0.02, "mean_class_accuracy": 0.03}, "reproduce": 0.0001}
STAGES = {"evaluate": {"cmd": "python evaluate.py", "deps": ["evaluate.py", "stages/lib/metrics.py", "models/m.pt"],
                       "metrics": [{"reports/metrics.json": {"cache": False}}]},
          "train": {"cmd": "python train.py", "outs": ["model.txt"]}}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def commit(repo: Path, *, check: dict = CHECK, metrics: dict = BASELINE, stages: dict = STAGES,
           message: str = "run") -> str:
    (repo / "params.yaml").write_text(yaml.safe_dump({"check": check}))
    (repo / "reports").mkdir(exist_ok=True)
    (repo / "reports/metrics.json").write_text(json.dumps(metrics))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """A git repository whose main branch holds a trusted run (the base), checked out on main."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit(repo, message="base")
    monkeypatch.chdir(repo)
    return repo


def run(repo: Path, fresh: dict, *extra: str, capsys) -> tuple[int, str, str]:
    """check_metrics of the checked-out commit's metrics (the committed ones) against ``fresh``."""
    (repo.parent / "fresh.json").write_text(json.dumps(fresh))
    code = check_metrics.main(["reports/metrics.json", str(repo.parent / "fresh.json"), "--protected", "main",
                               *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_commit_within_tolerance_passes_and_lists_its_checks(repo, capsys):
    commit(repo, message="under test")  # HEAD is on main: the base is its first parent
    current = copy.deepcopy(BASELINE)
    current["naive"]["top1"] = 0.77  # a drop of exactly the tolerance
    current["data"]["click_filter"]["precision"] = 0.1  # the data block is not compared
    code, out, err = run(repo, current, capsys=capsys)
    assert code == 0, out + err
    assert "HEAD is on main: its first parent" in out
    assert out.count("[ok]") == 5 and "check_metrics: ok (5 checks)" in out
    assert "naive.top1" in out and "-0.0300" in out


def test_a_commit_cannot_loosen_its_own_tolerance(repo, capsys):
    """Today's check read check.tolerance from the commit: top1: .inf passed a drop from 0.82 to 0.01."""
    loose = {"tolerance": {"top1": float("inf"), "top5": 1.0, "mean_class_accuracy": 1.0}, "reproduce": 1.0}
    crashed = copy.deepcopy(BASELINE)
    crashed["siamese"]["top1"] = 0.01
    commit(repo, check=loose, metrics=crashed, message="claims a crash is fine")
    code, out, _ = run(repo, crashed, capsys=capsys)
    assert code == 1
    assert "siamese.top1: REGRESSION" in out  # against the base, with the base's 0.03
    assert "0.03" in next(line for line in out.splitlines() if line.startswith("siamese.top1"))


@pytest.mark.parametrize("tolerance, reproduce, message", [
    ({"top1": float("inf"), "top5": 0.01, "mean_class_accuracy": 0.03}, 1e-4, "tolerance.top1 must be in"),
    ({"top1": 0.5, "top5": 0.01, "mean_class_accuracy": 0.03}, 1e-4, "tolerance.top1 must be in"),
    ({"n_test": 0.03}, 1e-4, "missing ['top1', 'top5', 'mean_class_accuracy'], unknown ['n_test']"),
    ({"top1": 0.03, "top5": 0.01}, 1e-4, "missing ['mean_class_accuracy']"),
    ({"top1": 0.03, "top5": 0.01, "mean_class_accuracy": 0.03}, 0.03, "reproduce must be in"),
])
def test_check_params_are_typed_and_bounded(tolerance, reproduce, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CheckConfig.from_params({"tolerance": tolerance, "reproduce": reproduce}, "check")


def test_a_base_with_loose_params_is_refused(repo, capsys):
    commit(repo, check={"tolerance": {"top1": float("inf")}, "reproduce": 0.0}, message="loose base")
    commit(repo, message="under test")
    code, _, err = run(repo, BASELINE, capsys=capsys)
    assert code == 2 and "check: tolerance must name exactly" in err


@pytest.mark.parametrize("change", ["frozen", "outs elsewhere", "a data dep less", "another command",
                                    "frozen train"])
def test_a_frozen_or_redefined_stage_fails(repo, capsys, change):
    stages = copy.deepcopy(STAGES)
    if change == "frozen":
        stages["evaluate"]["frozen"] = True
    elif change == "outs elsewhere":
        stages["evaluate"]["metrics"] = [{"elsewhere/metrics.json": {"cache": False}}]
    elif change == "a data dep less":
        stages["evaluate"]["deps"] = ["evaluate.py"]
    elif change == "another command":
        stages["evaluate"]["cmd"] = "python evaluate.py --easy"
    else:
        stages["train"]["frozen"] = True  # the sample is re-run whole: no stage may be skipped
    commit(repo, stages=stages, message="under test")
    code, out, _ = run(repo, BASELINE, capsys=capsys)
    assert code == 1
    assert "[FAILED] dvc.yaml: no frozen stage, evaluate as the base defines it" in out


@pytest.mark.parametrize("how", ["mistyped --base", "no protected branch", "base without metrics",
                                 "base without model rows", "shallow: no parent"])
def test_the_base_fails_closed(repo, capsys, how):
    extra: tuple[str, ...] = ()
    if how == "mistyped --base":
        extra = ("--base", "no-such-ref")
    elif how == "no protected branch":
        git(repo, "checkout", "-qb", "topic")
        git(repo, "branch", "-qD", "main")
    elif how == "base without metrics":
        (repo / "reports/metrics.json").unlink()
        git(repo, "commit", "-qam", "no metrics")
    elif how == "base without model rows":
        commit(repo, metrics={"data": {}}, message="empty metrics")
    commit(repo, message="under test")
    if how == "shallow: no parent":
        git(repo, "reset", "-q", "--soft", git(repo, "commit-tree", "HEAD^{tree}", "-m", "root"))
    code, out, err = run(repo, BASELINE, *extra, capsys=capsys)
    assert code == 2, out + err
    assert "check_metrics: " in err and "ok" not in out.splitlines()[-1:]


def test_a_code_dep_more_is_not_a_redefinition(repo, capsys):
    """A commit that makes evaluate import one more module lists it in dvc.yaml (stages/lib/deps.py)."""
    stages = copy.deepcopy(STAGES)
    stages["evaluate"]["deps"].insert(1, "stages/lib/new_module.py")
    commit(repo, stages=stages, message="under test")
    code, out, _ = run(repo, BASELINE, capsys=capsys)
    assert code == 0, out


def test_no_baseline_is_explicit_and_says_so(repo, capsys):
    git(repo, "checkout", "-qb", "topic")
    git(repo, "branch", "-qD", "main")
    commit(repo, message="under test")
    code, out, _ = run(repo, BASELINE, "--no-baseline", capsys=capsys)
    assert code == 0
    assert "[skipped] base: --no-baseline" in out


def test_the_base_is_the_merge_base_on_a_branch(repo, capsys):
    first = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-qb", "topic")
    better = copy.deepcopy(BASELINE)
    better["siamese"]["top1"] = 0.95
    commit(repo, metrics=better, message="topic 1")
    commit(repo, metrics=better, message="topic 2")  # HEAD~1 would be a commit of the branch itself
    code, out, _ = run(repo, better, capsys=capsys)
    assert code == 0
    assert f"base {first[:12]} (merge-base of HEAD and main)" in out


@pytest.mark.parametrize("how", ["digest", "n_test", "not scored"])
def test_the_test_set_is_pinned_to_the_base(repo, capsys, how):
    """Today n_test and n_not_scored were never compared: leaving the hard breeds out raised top-1 and passed."""
    current = copy.deepcopy(BASELINE)
    if how == "digest":
        current["data"]["test"]["digest"] = "sha256:other"
    elif how == "n_test":
        current["naive"]["n_test"] = 300
    else:
        current["siamese"]["n_not_scored"] = 100
    commit(repo, metrics=current, message="under test")
    code, out, _ = run(repo, current, capsys=capsys)
    assert code == 1
    assert "[FAILED] test set: the base's digest and count, every image scored" in out


@pytest.mark.parametrize("drop", ["model", "metric", "null"])
def test_missing_fails(repo, capsys, drop):
    commit(repo, message="under test")
    current = copy.deepcopy(BASELINE)
    if drop == "model":
        del current["siamese"]
    elif drop == "metric":
        del current["naive"]["top5"]
    else:
        current["naive"]["top5"] = None
    code, out, _ = run(repo, current, capsys=capsys)
    assert code == 1
    assert "MISSING" in out


def test_improvement_is_a_note(repo, capsys):
    commit(repo, message="under test")
    current = copy.deepcopy(BASELINE)
    current["naive"]["top1"] = 0.90
    code, out, _ = run(repo, current, capsys=capsys)
    assert code == 0
    assert "note: naive.top1 improved" in out and "may need updating" in out


def test_unreadable_file_is_exit_2(repo, capsys):
    code = check_metrics.main(["reports/metrics.json", "nope.json", "--protected", "main"])
    assert code == 2 and "cannot read" in capsys.readouterr().err


def test_both_ways_fails_an_inflated_number():
    inflated = copy.deepcopy(BASELINE)
    inflated["siamese"]["top1"] += 0.03
    rows = metriccheck.compare(inflated, BASELINE, dict.fromkeys(CHECK["tolerance"], 1e-4), both_ways=True)
    assert [r.metric for r in metriccheck.failed_rows(rows)] == ["siamese.top1"]
