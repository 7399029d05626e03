"""profiles/*.yaml: each applies to the committed params.yaml and passes every section's declaration;
scripts/apply_profile.py refuses a key params.yaml does not have and keeps params.yaml's comments."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
apply_profile = load_script("apply_profile")
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def test_there_is_a_gpu_profile() -> None:
    assert ROOT / "profiles" / "gpu.yaml" in PROFILES


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_profile_applies_and_validates(profile: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    assert apply_profile.main([str(profile), "--params", str(params)]) == 0
    merged = yaml.safe_load(params.read_text())
    for key_path, value in _leaves(yaml.safe_load(profile.read_text())):
        node = merged
        for key in key_path:
            node = node[key]
        assert node == value, key_path
    assert "# One section per stage" in params.read_text()  # params.yaml's comments stay


def test_the_committed_params_validate() -> None:
    apply_profile.validate(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.mark.parametrize("profile, message", [
    ({"train": {"lrr": 0.1}}, r"train\.lrr: not a key of params\.yaml"),
    ({"tain": {"lr": 0.1}}, r"tain: not a key"),
    ({"train": {"batchnorm": "frozn"}}, r"train\.batchnorm: must be one of"),
    ({"check": {"tolerance": {"top1": 0.5, "top5": 0.01, "mean_class_accuracy": 0.03}}}, r"tolerance\.top1"),
])
def test_a_bad_profile_is_refused_and_nothing_written(profile: dict, message: str, tmp_path: Path, capsys) -> None:
    params, path = tmp_path / "params.yaml", tmp_path / "bad.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    path.write_text(yaml.safe_dump(profile))
    assert apply_profile.main([str(path), "--params", str(params)]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert params.read_text() == (ROOT / "params.yaml").read_text()


def test_free_mappings_take_new_keys(tmp_path: Path) -> None:
    params, path = tmp_path / "params.yaml", tmp_path / "release.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    path.write_text(yaml.safe_dump({"data": {"source": "path", "files": {
        role: {"path": f"/data/{role}.tsv"} for role in ("train_images", "test_images", "test_labels", "breeds")}},
        "filter": {"aliases": {"goldie": "golden retriever"}}}))
    assert apply_profile.main([str(path), "--params", str(params), "--check"]) == 0
    assert params.read_text() == (ROOT / "params.yaml").read_text()  # --check writes nothing


def _leaves(tree: dict, path: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, path + (key,))
        else:
            yield path + (key,), value
