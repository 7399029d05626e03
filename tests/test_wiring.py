"""dvc.yaml against the code: every stage's code deps are exactly the files it
imports (the same list the checkpoint fingerprint hashes), and every param
key it lists exists."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.lib.deps import stage_files

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module(cmd: str) -> str:
    words = cmd.split()
    return words[words.index("-m") + 1]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_equal_the_stage_imports(name: str) -> None:
    stage = STAGES[name]
    listed = sorted(d for d in stage["deps"] if d.endswith(".py"))
    assert listed == stage_files(_module(stage["cmd"])), (
        f"dvc.yaml stage {name}: code deps differ from its imports; "
        f"missing {sorted(set(stage_files(_module(stage['cmd']))) - set(listed))}, "
        f"extra {sorted(set(listed) - set(stage_files(_module(stage['cmd']))))}")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_listed_params_exist(name: str) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in STAGES[name].get("params", []):
        node = params
        for part in str(key).split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml stage {name} lists {key}: not in params.yaml"
            node = node[part]


def test_stage_modules_import_no_stage() -> None:
    """Stages import only from stages/lib: nothing imports a stage module."""
    for path in [*ROOT.glob("stages/*.py"), *ROOT.glob("stages/lib/*.py"), *ROOT.glob("scripts/*.py")]:
        module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        others = [f for f in stage_files(module) if f.count("/") == 1 and f != path.relative_to(ROOT).as_posix()]
        assert not others, f"{path.relative_to(ROOT)} imports stage module(s) {others}"


def test_checkpoint_fingerprint_covers_every_imported_file(monkeypatch) -> None:
    """train_siamese imports classifier.py (run_context, eval_loader) but its
    fingerprint once hashed only losses/engine/data/models: after a change to
    classifier.py DVC re-ran the stage and it resumed the old checkpoint."""
    from stages.lib import tracking

    seen: list[Path] = []
    monkeypatch.setattr(tracking, "file_digest", lambda *paths: seen.extend(paths) or "x")
    tracking.stage_code_digest("stages.train_siamese")
    hashed = sorted(p.relative_to(ROOT).as_posix() for p in seen)
    assert "stages/lib/classifier.py" in hashed
    assert hashed == stage_files("stages.train_siamese") == sorted(
        d for d in STAGES["train_siamese"]["deps"] if d.endswith(".py"))


def test_every_stage_that_reads_the_model_params_depends_on_the_weights_folder() -> None:
    """model.weights may name a file (under models/weights/): replacing it must re-run every stage that
    loads initial weights, and dvc.lock must record which file trained the models."""
    from stages.lib.layout import WEIGHTS_DIR

    readers = sorted(n for n, s in STAGES.items() if "model" in s.get("params", []))
    assert readers == ["make_pairs", "train_naive", "train_references", "train_siamese"]  # siamese.start: probe
    assert [n for n in readers if WEIGHTS_DIR not in STAGES[n]["deps"]] == []
    assert (ROOT / WEIGHTS_DIR).is_dir()  # in git (its README): the dependency exists on a fresh clone
