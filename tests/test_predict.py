"""predict: top-k from the model file alone; bad inputs are reported, the rest predicted."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages import predict
from stages.lib.models import ModelFileError, build_model, load_model_file
from stages.lib.presets import build_transform
from stages.lib.tracking import save_model

CLASSES = ["beagle", "pug", "poodle"]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_model(path, build_model("shufflenet_v2_x0_5", len(CLASSES)), backbone="shufflenet_v2_x0_5",
               image_size=32, classes=CLASSES)
    return path


def _images(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    jpg, png = tmp_path / "dog.jpg", tmp_path / "dog.png"
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(jpg, quality=90)
    rgba = rng.integers(0, 255, (36, 36, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(png)
    return jpg, png


def test_predict_reports_bad_inputs_and_predicts_the_rest(tmp_path: Path, model_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the model file must be enough
    jpg, png = _images(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not a dog\n")
    missing = tmp_path / "missing.jpg"
    code = predict.main([str(model_path), str(jpg), str(missing), str(text), str(png), "--top", "5"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"error: {missing}: no such file" in err
    assert f"error: {text}: not an image" in err
    assert "2 of 4 images could not be read" in err
    lines = out.splitlines()
    assert lines[0] == str(jpg) and lines[4] == str(png)
    assert len(lines) == 8  # 3 classes: top-5 prints all three
    for block in (lines[1:4], lines[5:8]):
        probs = [float(line.split()[0]) for line in block]
        names = [line.split(None, 1)[1] for line in block]
        assert sorted(names) == sorted(CLASSES)
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)


def test_predict_uses_the_eval_preprocessing(tmp_path: Path, model_path: Path, capsys):
    jpg, _ = _images(tmp_path)
    assert predict.main([str(model_path), str(jpg), "--top", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    model, meta = load_model_file(model_path)
    x = build_transform(32, train=False)(Image.open(jpg).convert("RGB"))
    with torch.inference_mode():
        probs = torch.softmax(model(x[None]), dim=1)[0]
    p, i = probs.max(0)
    assert out[1].split() == [f"{p.item():.4f}", CLASSES[i.item()]]


def test_unreadable_model_file_is_exit_2(tmp_path: Path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    jpg, _ = _images(tmp_path)
    assert predict.main([str(bad), str(jpg)]) == 2
    assert "not a readable clickdog model file" in capsys.readouterr().err


def test_predict_refuses_formats_outside_the_allow_list(tmp_path: Path, model_path: Path, capsys) -> None:
    """predict is the command for untrusted images: an EPS file (which Pillow
    would hand to Ghostscript) is refused by format, like decode refuses it."""
    eps = tmp_path / "photo.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    assert Image.open(eps).format == "EPS"  # Pillow itself would open it
    assert predict.main([str(model_path), str(eps)]) == 1
    assert f"error: {eps}: not an image of an accepted format" in capsys.readouterr().err


def test_predict_refuses_an_image_over_the_pixel_limit(tmp_path: Path, model_path: Path, capsys,
                                                      monkeypatch) -> None:
    jpg, _ = _images(tmp_path)
    monkeypatch.setattr(predict, "DEFAULT_MAX_PIXELS", 40 * 50 - 1)
    assert predict.main([str(model_path), str(jpg)]) == 1
    assert "50x40 pixels is more than the limit of 1999" in capsys.readouterr().err


# ------------------------------------------------------- hostile model files
def _edit(obj: dict, key: str, value) -> None:
    obj[key] = value


def _edit_state(obj: dict, key: str, value) -> None:
    state = obj["state_dict"]
    if value is None:
        del state[key]
    else:
        state[key] = value


# (what is wrong, the edit, what the one-line error says)
HOSTILE_MODEL_FILES = [
    ("no format", lambda o: o.pop("format"), "not a clickdog model file"),
    ("no classes", lambda o: o.pop("classes"), "lacks 'classes'"),
    ("classes a string", lambda o: _edit(o, "classes", "pug"), "'classes' must be a list"),
    ("classes not strings", lambda o: _edit(o, "classes", [1, 2, 3]), r"classes\[0\]"),
    ("markup in a class", lambda o: _edit(o, "classes", ["beagle", "</script><script>alert(1)</script>", "poodle"]),
     r"classes\[1\]: breed name"),
    ("mathtext in a class", lambda o: _edit(o, "classes", ["beagle", "$\\foo$", "poodle"]),
     r"classes\[1\]: breed name"),
    ("a class twice", lambda o: _edit(o, "classes", ["beagle", "pug", "beagle"]), "'beagle' twice"),
    ("no classes at all", lambda o: _edit(o, "classes", []), "1 to 100000 classes"),
    ("too many classes", lambda o: _edit(o, "classes", [f"b{i}" for i in range(100_001)]), "1 to 100000 classes"),
    ("huge image size", lambda o: _edit(o, "image_size", 10**9), "'image_size' must be in 8..4096"),
    ("tiny image size", lambda o: _edit(o, "image_size", 0), "'image_size' must be in 8..4096"),
    ("image size text", lambda o: _edit(o, "image_size", "32"), "'image_size' must be an int"),
    ("image size bool", lambda o: _edit(o, "image_size", True), "'image_size' must be an int"),
    ("no backbone", lambda o: o.pop("backbone"), "lacks 'backbone'"),
    ("unknown backbone", lambda o: _edit(o, "backbone", "nonet"), "'nonet' is not a torchvision"),
    ("two-channel mean", lambda o: _edit(o, "mean", [0.5, 0.5]), "'mean' must be 3 finite numbers"),
    ("zero std", lambda o: _edit(o, "std", [0.2, 0.0, 0.2]), "'std' must be 3 finite numbers > 0"),
    ("normalize text", lambda o: _edit(o, "normalize", "yes"), "'normalize' must be a bool"),
    ("negative embedding", lambda o: _edit(o, "embedding_dim", -1), "'embedding_dim' must be >= 0"),
    ("embedding without weights", lambda o: _edit(o, "embedding_dim", 8), "projection"),
    ("state dict a list", lambda o: _edit(o, "state_dict", []), "'state_dict' must be a dict"),
    ("a tensor missing", lambda o: _edit_state(o, "trunk.conv1.0.weight", None), "1 missing"),
    ("an unexpected tensor", lambda o: _edit_state(o, "extra.weight", torch.zeros(2)), "1 unexpected"),
    ("a trunk tensor of the wrong shape", lambda o: _edit_state(o, "trunk.conv1.0.weight", torch.zeros(2, 2)),
     r"trunk\.conv1\.0\.weight"),
    ("more classes than the head", lambda o: _edit(o, "classes", [*CLASSES, "collie"]), "head.weight"),
    ("a head of another width", lambda o: _edit_state(o, "head.weight", torch.zeros(3, 7)), "head.weight"),
    ("not a tensor", lambda o: _edit_state(o, "head.bias", [0.0, 0.0, 0.0]), "head.bias"),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in HOSTILE_MODEL_FILES], ids=[c[0] for c in HOSTILE_MODEL_FILES])
def test_a_hostile_model_file_is_one_line_and_exit_2(tmp_path: Path, model_path: Path, capsys, edit,
                                                     message: str) -> None:
    """A file with keys missing, values of the wrong type or out of bounds,
    names that reports cannot show, or weights that do not fit the model:
    one line naming the file, exit 2, no traceback and no model built from
    it (a bound checked after building would come too late)."""
    obj = torch.load(model_path, weights_only=True)
    edit(obj)
    bad = tmp_path / "hostile.pt"
    torch.save(obj, bad)
    missing = tmp_path / "missing.jpg"  # no image is read: a bad size must not reach a resize
    assert predict.main([str(bad), str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    with pytest.raises(ModelFileError, match=message):
        load_model_file(bad)


def test_a_missing_model_file_is_exit_2(tmp_path: Path, capsys) -> None:
    jpg, _ = _images(tmp_path)
    assert predict.main([str(tmp_path / "nope.pt"), str(jpg)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.pt'}: no such model file\n"


def test_predict_imports_no_training_machinery() -> None:
    """Classifying one photo needs the model file, the eval transform and a device: not scikit-learn,
    cleanlab, dvclive or the training loop (a fresh interpreter: this test process has them all)."""
    import subprocess
    import sys

    heavy = ["sklearn", "cleanlab", "dvclive", "stages.lib.engine", "stages.lib.data", "stages.lib.classifier"]
    code = f"import sys, stages.predict; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
