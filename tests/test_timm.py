"""timm backbones (model.backbone: timm/<name>) beside torchvision's: the same
model-file contract, local weights loaded safely, clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("timm")  # an optional extra; requirements.lock installs it

from conftest import run_train_naive  # noqa: E402
from safetensors.torch import save_file  # noqa: E402 (after the skip)

from stages import predict  # noqa: E402
from stages.lib.models import create_model, load_model_file  # noqa: E402

BACKBONE = "timm/test_convnext"  # one of timm's tiny test models: random weights, no download


def test_a_timm_backbone_trains_and_predicts_through_the_model_file(tiny_pipeline: Path, capsys) -> None:
    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    params["model"]["backbone"] = BACKBONE
    params["train"]["epochs"] = 2
    params["train"]["early_epoch"] = 1
    (tiny_pipeline / "params.yaml").write_text(yaml.safe_dump(params))
    run_train_naive(tiny_pipeline)
    model, meta = load_model_file(tiny_pipeline / "models/naive/model.pt")
    assert meta["backbone"] == BACKBONE and type(model.trunk).__module__.startswith("timm.")
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 3)
    from PIL import Image
    Image.new("RGB", (40, 40), (220, 40, 40)).save(tiny_pipeline / "red.jpg")
    assert predict.main([str(tiny_pipeline / "models/naive/model.pt"), str(tiny_pipeline / "red.jpg")]) == 0
    assert "red.jpg" in capsys.readouterr().out


def test_timm_weights_from_a_local_safetensors_file_fill_the_trunk(tmp_path: Path) -> None:
    source = create_model(BACKBONE, 5)
    save_file({k: v.contiguous() for k, v in source.trunk.state_dict().items()}, tmp_path / "model.safetensors")
    model = create_model(BACKBONE, 3, weights=str(tmp_path / "model.safetensors"))
    got, want = model.trunk.state_dict(), source.trunk.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert model.head.out_features == 3  # the head stays new: its class count is ours
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable weights file"):
        create_model(BACKBONE, 3, weights=str(tmp_path / "bad.safetensors"))


def test_timm_backbones_refuse_downloads_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="imagenet is for torchvision backbones"):
        create_model(BACKBONE, 3, weights="imagenet")
    with pytest.raises(ValueError, match="timm/convnext_tinyy is not a timm model"):
        create_model("timm/convnext_tinyy", 3)
