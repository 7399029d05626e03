"""stages.revalidate: a committed run re-validated from a DVC remote without
retraining; it fails on hand-edited metrics (even within the seed tolerance),
on a regression against the base, on a frozen evaluate stage, on a base it
cannot read and on a remote that lacks the models."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command (make test's PATH)")

TRAIN = """import sys, yaml, pathlib
score = yaml.safe_load(open("params.yaml"))["train"]["score"]
pathlib.Path("models").mkdir(exist_ok=True)
pathlib.Path("models/model.txt").write_text(str(score))  # a 'model' whose test top-1 is its content
"""
EVALUATE = """import json, pathlib
top1 = float(pathlib.Path("models/model.txt").read_text())
pathlib.Path("reports").mkdir(exist_ok=True)
block = {"top1": top1, "top5": 1.0, "mean_class_accuracy": top1, "n_test": 100, "n_not_scored": 0}
pathlib.Path("reports/metrics.json").write_text(json.dumps({"siamese": block, "data": {"test": {"digest": "d"}}}))
"""
CHECK = {"tolerance": {"top1": 0.01, "top5": 0.01, "mean_class_accuracy": 0.01}, "reproduce": 0.0001}
DVC_YAML = {"stages": {
    "train": {"cmd": "python train.py", "deps": ["train.py"], "params": ["train"], "outs": ["models/model.txt"]},
    "evaluate": {"cmd": "python evaluate.py", "deps": ["evaluate.py", "models/model.txt"],
                 "metrics": [{"reports/metrics.json": {"cache": False}}]}}}


# an S3 API on 127.0.0.1 only (moto's server), with made-up credentials: nothing leaves the machine
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def sh(*cmd: str, cwd: Path) -> str:
    return conftest.sh(*cmd, cwd=cwd, env=S3_ENV)


def commit_run(repo: Path, score: float, message: str, push: bool = True) -> str:
    """Train with ``score``, evaluate, push to the remote, commit; the commit id."""
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"score": score}, "check": CHECK}))
    sh("dvc", "repro", "-q", cwd=repo)
    if push:
        sh("dvc", "push", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "--allow-empty", "-m", message, cwd=repo)
    return sh("git", "rev-parse", "HEAD", cwd=repo).strip()


def inflate_and_commit(repo: Path, by: float, message: str) -> None:
    """Raise the committed siamese top-1 by ``by``: a number claimed, not measured."""
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    metrics["siamese"]["top1"] += by
    (repo / "reports/metrics.json").write_text(json.dumps(metrics))
    sh("git", "commit", "-qam", message, cwd=repo)


def revalidate(repo: Path, tmp: Path, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    """A fresh clone of main (no models, as on CI; ``cache``: a warm DVC cache), then the re-validation."""
    clone = tmp / f"clone-{len(list(tmp.iterdir()))}"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp)
    assert not (clone / "models" / "model.txt").exists()
    if cache is not None:
        sh("dvc", "cache", "dir", "--local", str(cache), cwd=clone)
    env = {**os.environ, **S3_ENV, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.revalidate", *args], cwd=clone, env=env,
                          capture_output=True, text=True)


@pytest.fixture
def s3_endpoint() -> str:
    """moto's S3 server on 127.0.0.1 (the way dvc-s3's own tests run) with one bucket."""
    pytest.importorskip("dvc_s3")
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items()
                                                 if k.startswith("AWS_") and "KEY" in k},
                 region_name="us-east-1").create_bucket(Bucket="clickdog")
    yield endpoint
    server.stop()


@pytest.fixture(params=["local", "s3"])
def repo(request, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    if request.param == "local":  # a local-directory remote
        sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=repo)
    else:  # S3 through dvc-s3, against moto's server: the credentials come from the environment
        sh("dvc", "remote", "add", "-d", "store", "s3://clickdog/runs", cwd=repo)
        sh("dvc", "remote", "modify", "store", "endpointurl", request.getfixturevalue("s3_endpoint"), cwd=repo)
    (repo / "train.py").write_text(TRAIN)
    (repo / "evaluate.py").write_text(EVALUATE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    return repo


def test_a_committed_run_revalidates_from_the_remote(repo: Path, tmp_path: Path) -> None:
    first = commit_run(repo, 0.80, "baseline run")
    commit_run(repo, 0.82, "a better run")
    (tmp_path / "work").mkdir()
    proc = revalidate(repo, tmp_path / "work")  # the base: main's first parent
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[ok] base {first[:12]} (HEAD is on origin/main: its first parent)" in proc.stdout
    assert proc.stdout.count("[ok]") == 7 and "revalidate: ok (7 checks)" in proc.stdout
    assert "siamese.top1" in proc.stdout


@pytest.mark.parametrize("inflate", [0.15, 0.005])
def test_hand_edited_metrics_fail(repo: Path, tmp_path: Path, inflate: float) -> None:
    """+0.005 is inside the seed tolerance (0.01): today's check let it pass; re-scoring is deterministic."""
    commit_run(repo, 0.80, "baseline run")
    commit_run(repo, 0.80, "the same run again")
    inflate_and_commit(repo, inflate, "edited metrics")
    (tmp_path / "work").mkdir()
    proc = revalidate(repo, tmp_path / "work")
    assert proc.returncode == 1, proc.stdout
    assert "[FAILED] the committed metrics are what the committed models score (within 0.0001" in proc.stdout


def test_a_regressed_model_fails_against_the_baseline(repo: Path, tmp_path: Path) -> None:
    first = commit_run(repo, 0.80, "baseline run")
    commit_run(repo, 0.70, "a worse model, its metrics honestly committed")
    (tmp_path / "work").mkdir()
    proc = revalidate(repo, tmp_path / "work", "--base", first)
    assert proc.returncode == 1, proc.stdout
    assert "[FAILED] no regression beyond the seed tolerance" in proc.stdout
    assert "REGRESSION" in proc.stdout


@pytest.mark.parametrize("repo", ["local"], indirect=True)
def test_a_frozen_evaluate_with_inflated_metrics_fails(repo: Path, tmp_path: Path) -> None:
    """Today: frozen: true made dvc repro --force skip evaluate, and revalidate compared the committed
    metrics with themselves and printed ok."""
    commit_run(repo, 0.80, "baseline run")
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    spec["stages"]["evaluate"]["frozen"] = True
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    inflate_and_commit(repo, 0.05, "frozen evaluate, better numbers")
    (tmp_path / "work").mkdir()
    proc = revalidate(repo, tmp_path / "work")
    assert proc.returncode == 1, proc.stdout
    assert "[FAILED] evaluate stage not frozen, as the base defines it" in proc.stdout
    assert "revalidate: ok" not in proc.stdout


@pytest.mark.parametrize("repo", ["local"], indirect=True)
def test_a_remote_without_the_models_fails_even_with_a_warm_cache(repo: Path, tmp_path: Path) -> None:
    commit_run(repo, 0.80, "baseline run")
    commit_run(repo, 0.81, "trained, never pushed", push=False)
    (tmp_path / "work").mkdir()
    proc = revalidate(repo, tmp_path / "work", cache=repo / ".dvc" / "cache")  # the models sit in the cache
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[FAILED] the remote holds every cached input of evaluate" in proc.stdout


@pytest.mark.parametrize("repo", ["local"], indirect=True)
@pytest.mark.parametrize("args", [("--base", "no-such-ref"), ("--protected", "origin/nope")])
def test_a_base_that_cannot_be_read_fails(repo: Path, tmp_path: Path, args: tuple[str, ...]) -> None:
    """Today a failing git show meant 'no regression check' and a pass."""
    commit_run(repo, 0.80, "baseline run")
    commit_run(repo, 0.81, "next run")
    (tmp_path / "work").mkdir()
    proc = revalidate(repo, tmp_path / "work", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "revalidate: FAILED" in proc.stdout


PREPARE = """import pathlib
for d in ("data/raw", "data/images", "data/test_images"):
    pathlib.Path(d).mkdir(parents=True, exist_ok=True)
pathlib.Path("data/raw/test_labels.tsv").write_text("t0\\tpug\\n")
pathlib.Path("data/raw/train_images.tsv").write_bytes(b"x" * 100_000)   # the raw training set
pathlib.Path("data/images/shard-00000.bin").write_bytes(b"y" * 100_000)  # the decoded training set
pathlib.Path("data/test_images/shard-00000.bin").write_bytes(b"z" * 1_000)
"""


@pytest.mark.parametrize("repo", ["local"], indirect=True)
def test_revalidation_pulls_only_what_evaluate_reads(repo: Path, tmp_path: Path) -> None:
    """evaluate depends on one file of a cached folder (data/raw/test_labels.tsv) and on the test images, a
    cached folder of their own: the re-validation pulls those and the model, never the training set (today
    evaluate depended on all of data/raw and data/images, and CI pulled every training shard of a real run)."""
    (repo / "prepare.py").write_text(PREPARE)
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    spec["stages"] = {"prepare": {"cmd": "python prepare.py", "deps": ["prepare.py"],
                                  "outs": ["data/raw", "data/images", "data/test_images"]},
                      **spec["stages"]}
    spec["stages"]["evaluate"]["deps"] += ["data/raw/test_labels.tsv", "data/test_images"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    commit_run(repo, 0.80, "baseline run")
    commit_run(repo, 0.81, "next run")
    work = tmp_path / "work"
    work.mkdir()
    proc = revalidate(repo, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the remote holds every cached input of evaluate (3 outputs" in proc.stdout
    clone = work / "clone-0"
    assert (clone / "data/raw/test_labels.tsv").read_text() == "t0\tpug\n"
    assert (clone / "data/test_images/shard-00000.bin").stat().st_size == 1_000
    assert not (clone / "data/raw/train_images.tsv").exists() and not (clone / "data/images").exists()
