"""A release with the weak labels in its image file and no click log
(``decode.columns: [breed, key, image]``, a header line): the whole pipeline,
through ``dvc repro``, on a file of that layout made from a small generated
sample; then the run pushed to a local DVC remote, pulled into a fresh clone
and re-validated there without retraining."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import sh

from stages.lib import layout
from stages.lib.sample import generate_sample
from stages.lib.tables import read_headerless, read_table

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command (make test's PATH)")


def release_with_labels_in_images(sample: Path, out: Path) -> dict[str, dict[str, str]]:
    """The sample's raw files rewritten as such a release: ``breed<TAB>key<TAB>image``
    with a header; a training image's breed cell is its most-clicked query,
    written as a thumbnail file might ("Golden_Retriever"; a query naming
    no breed stays as it is), an image nobody clicked has an empty cell. No
    clicks.tsv and no truth.tsv. Returns ``data.files`` for ``source: path``."""
    out.mkdir()
    clicks = read_headerless(sample / layout.CLICKS, ["key", "query", "clicks"])
    clicks["clicks"] = clicks["clicks"].astype(int)
    top = clicks.sort_values(["key", "clicks"], ascending=[True, False], kind="stable").drop_duplicates("key")
    cell = dict(zip(top["key"], top["query"].str.title().str.replace(" ", "_")))
    test_breed = dict(read_headerless(sample / layout.TEST_LABELS, ["key", "breed"]).itertuples(index=False))
    for name, breed_of in ((layout.TRAIN_IMAGES, cell), (layout.TEST_IMAGES, test_breed)):
        with open(sample / name, encoding="utf-8") as src, open(out / name, "w", encoding="utf-8") as dst:
            dst.write("breed\tkey\timage\n")
            for line in src:
                key, image = line.rstrip("\n").split("\t")
                dst.write(f"{breed_of.get(key, '')}\t{key}\t{image}\n")
    for name in (layout.TEST_LABELS, layout.BREEDS):
        shutil.copy(sample / name, out / name)
    return {name.removesuffix(".tsv"): {"path": str(out / name)}
            for name in (layout.TRAIN_IMAGES, layout.TEST_IMAGES, layout.TEST_LABELS, layout.BREEDS)}


def small_params(files: dict[str, dict[str, str]]) -> dict:
    """params.yaml of the project with the release as input and a few minutes of training cut to seconds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="path", files=files)
    params["decode"].update(columns=["breed", "key", "image"], header=True, workers=1)
    params["filter"]["min_images_per_class"] = 5
    params["model"]["image_size"] = 32
    params["train"].update(epochs=8, early_epoch=7, batch_size=32, lr=0.05, parallel_runs=1)
    # seconds of training learn little: a lenient label filter, so that the run is about the layout
    params["pairs"].update(scorer="early", filter="threshold", min_prob=0.02, min_images_per_class=5)
    params["siamese"].update(epochs=2, batch_size=32)
    params["galleries"]["per_reason"] = 2
    return params


@pytest.fixture(scope="module")
def release_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A project checkout whose whole pipeline ran on the release and was
    pushed to a local remote and committed; (repo, remote, dvc repro's log)."""
    tmp = tmp_path_factory.mktemp("release")
    generate_sample(tmp / "sample", seed=1, n_train=700, test_per_breed=4, min_side=32, max_side=40,
                    lookalike_share=0.4, lookalike_only_share=0.6, best_known_share=0.8, distractor_share=0.1,
                    no_breed_query_share=0.05)
    files = release_with_labels_in_images(tmp / "sample", tmp / "release")
    repo = tmp / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / layout.WEIGHTS_DIR, repo / layout.WEIGHTS_DIR)  # a dependency of the training stages
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    (repo / "params.yaml").write_text(yaml.safe_dump(small_params(files), sort_keys=False))
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "remote", "add", "-d", "store", str(tmp / "remote"), cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "the project, set up for the release", cwd=repo)  # dvclive needs a commit
    log = sh("dvc", "repro", cwd=repo)
    sh("dvc", "push", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "a run on the release", cwd=repo)
    return repo, tmp / "remote", log


def test_the_pipeline_runs_on_labels_in_the_image_file(release_run: tuple[Path, Path, str]) -> None:
    repo, _, log = release_run
    raw = repo / "data" / "raw"
    assert not (raw / layout.CLICKS).exists()
    assert "the weak labels are the breed column" in log and "only make_pairs' probability" in log
    report = json.loads((repo / "data/filtered" / layout.REPORT).read_text())
    assert report["labels_from"] == "image_file"
    images = report["images"]
    # every decoded training image with a breed cell naming one breed is labelled, whatever its clicks were
    assert images["raw_labelled"] > 0.8 * images["decoded_train"]
    assert images["dropped"]["unknown_breed"] > 0  # cells made of queries that name no breed
    labels = read_table(repo / "data/filtered" / layout.LABELS)
    breeds = set(read_headerless(raw / layout.BREEDS, ["breed", "label"])["breed"])
    assert set(labels["breed"]) <= breeds  # "Golden_Retriever" became "golden retriever"
    assert labels["clicks"].eq("").all()  # click counts are unknown, not made up
    pairs = json.loads((repo / "data/pairs" / layout.REPORT).read_text())
    assert 0 < pairs["images"]["clean"] <= images["kept"]  # the probability filter judged them
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for name in ("naive", "siamese", "raw"):
        assert metrics[name]["n_test"] > 0 and 0 <= metrics[name]["top1"] <= 1
    assert "truth" not in metrics  # no truth.tsv in a release: no ceiling model


def test_the_run_revalidates_from_the_remote_in_a_fresh_clone(release_run: tuple[Path, Path, str],
                                                               tmp_path: Path) -> None:
    repo, _, _ = release_run
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "models/siamese/model.pt").exists()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(clone)}
    proc = subprocess.run([sys.executable, "-m", "stages.revalidate", "--base", "HEAD"], cwd=clone, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "revalidate: ok" in proc.stdout
    fresh = json.loads((clone / "reports/metrics.json").read_text())
    committed = json.loads((repo / "reports/metrics.json").read_text())
    assert fresh["siamese"] == committed["siamese"]
    # what CI pulled: the test images, the test labels and the models, no training image
    assert (clone / "data/test_images" / layout.INDEX).is_file() and (clone / "data/raw" / layout.TEST_LABELS).is_file()
    assert not (clone / "data/images").exists() and not (clone / "data/raw" / layout.TRAIN_IMAGES).exists()


def test_without_click_log_or_breed_column_the_filter_names_both(tmp_path: Path) -> None:
    from conftest import write_images

    from stages import filter_clicks

    write_images(tmp_path / "images", [(f"k{i}", "train", i % 3) for i in range(6)])
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / layout.BREEDS).write_text("red dog\t0\ngreen dog\t1\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit, match=r"no click log .*clicks\.tsv.*no breed column.*decode\.columns"):
        filter_clicks.main([str(tmp_path / "raw"), str(tmp_path / "images"), str(tmp_path / "out"),
                            "--params", str(tmp_path / "params.yaml")])
    assert not (tmp_path / "out").exists()
