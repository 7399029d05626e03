"""params.yaml is declared once, as typed sections: typos, wrong types and
repeated keys stop a stage with the key's dotted name."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from stages.download import DataConfig
from stages.evaluate import EvaluateConfig
from stages.filter_clicks import FilterConfig
from stages.lib.classifier import ModelConfig, TrainConfig
from stages.lib.decoding import DecodeConfig, DecodeError
from stages.lib.galleries import GalleriesConfig
from stages.lib.imagecache import CacheConfig
from stages.lib.metriccheck import CheckConfig
from stages.lib.pairs import PairsConfig
from stages.lib.params import ConfigError, load_sections, read_yaml
from stages.lib.siamese import SiameseConfig
from stages.train_references import ReferenceConfig

ROOT = Path(__file__).resolve().parents[1]
DECLARED = {"data": DataConfig, "decode": DecodeConfig, "filter": FilterConfig, "model": ModelConfig,
            "train": TrainConfig, "pairs": PairsConfig, "siamese": SiameseConfig, "reference": ReferenceConfig,
            "evaluate": EvaluateConfig, "galleries": GalleriesConfig, "cache": CacheConfig, "check": CheckConfig}


def committed() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_committed_params_match_their_declarations() -> None:
    params = committed()
    assert set(DECLARED) == set(params)
    for name, cls in DECLARED.items():
        cls.from_params(params[name], name)


@pytest.mark.parametrize("section, change, message", [
    ("train", {"augment": {"scale_mn": 0.9}}, r"train\.augment\.scale_mn: unknown key"),
    ("train", {"augment": {"hflip": "false"}}, r"train\.augment\.hflip: must be true or false, got 'false'"),
    ("train", {"epochs": 15.5}, r"train\.epochs: must be an integer"),
    ("train", {"epochs": True}, r"train\.epochs: must be an integer"),
    ("train", {"precision": "bf32"}, r"train\.precision: must be one of"),
    ("train", {"lr": -1}, r"train: lr must be > 0"),
    ("siamese", {"margn": 1.0}, r"siamese\.margn: unknown key"),
    ("pairs", {"filter": "median"}, r"pairs\.filter: must be one of \['threshold', 'cleanlab', 'relabel'\]"),
    ("model", {"image_size": "64"}, r"model\.image_size: must be an integer"),
    ("reference", {"labels": ["raw", "clean"]}, r"reference\.labels\[1\]: must be one of"),
    ("filter", {"min_share": 1.5}, r"filter: min_share"),
    ("train", {"head_init": "linear"}, r"train\.head_init: must be one of \['random', 'probe'\]"),
    ("train", {"probe": {"C": 0}}, r"train\.probe: C must be > 0"),
    # a weights file outside models/weights/ would be no dependency of the stages that load it
    ("model", {"weights": "/data/resnet50.pth"}, r"model: weights must be none, imagenet or a file under models/"),
    ("model", {"weights": "weights/resnet50.pth"}, r"under models/weights/"),
    ("model", {"weights": "models/weights/../naive/model.pt"}, r"under models/weights/"),
    ("model", {"weights": "models/weights"}, r"under models/weights/"),
    ("model", {"weights": ""}, r"under models/weights/"),
])
def test_typos_and_wrong_types_are_named(section: str, change: dict, message: str) -> None:
    data = committed()[section]
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=message):
        DECLARED[section].from_params(data, section)


def test_a_missing_key_is_named_and_a_float_takes_an_int() -> None:
    data = committed()["train"]
    del data["augment"]["contrast"]
    with pytest.raises(ConfigError, match=r"train\.augment\.contrast: missing"):
        TrainConfig.from_params(data, "train")
    cfg = TrainConfig.from_params({**committed()["train"], "lr": 1}, "train")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.augment.hflip is True


def test_decode_header_as_a_string_is_refused() -> None:
    """``header: "false"`` is a truthy string: it used to skip the first data line."""
    with pytest.raises(DecodeError, match=r"decode\.header: must be true or false"):
        DecodeConfig.from_params({**committed()["decode"], "header": "false"})


def test_a_repeated_key_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  backbone: resnet18\n  weights: none\n  image_size: 64\n  image_size: 32\n")
    with pytest.raises(ConfigError, match=r"line 5: key 'image_size' is given twice"):
        read_yaml(path)
    path.write_text("model: {backbone: resnet18, weights: none, image_size: 64}\n")
    assert load_sections(path, model=ModelConfig)["model"] == ModelConfig("resnet18", "none", 64)
    with pytest.raises(ConfigError, match="missing section 'train'"):
        load_sections(path, train=TrainConfig)
    path.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):  # safe: no Python objects from params
        read_yaml(path)


def test_a_stage_stops_on_a_typo_before_any_work(tiny_pipeline: Path, monkeypatch) -> None:
    from stages import train_naive

    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    params["train"]["augment"]["brightnes"] = 0.5
    (tiny_pipeline / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tiny_pipeline)
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.augment\.brightnes: unknown key"):
        train_naive.main(["data/filtered", "data/images", "models/naive"])
    assert not (tiny_pipeline / "models").exists()


@pytest.mark.parametrize("stage, args, message", [
    # a ConfigError raised in main
    ("train_naive", ["data/filtered", "data/images", "models/naive"], r"train\.augment\.brightnes: unknown key"),
    # a SystemExit(message) of the stage itself (the tiny pipeline's params.yaml has no filter section)
    ("filter_clicks", ["data/raw", "data/images", "data/filtered2"],
     r"filter_clicks: params\.yaml: missing section 'filter'$"),
])
def test_a_stage_fails_in_one_log_line_without_a_traceback(tiny_pipeline: Path, stage: str, args: list[str],
                                                               message: str) -> None:
    """stages.lib.cli.run_stage: the same format and exit code for every foreseen failure (a stage used to
    end with a ConfigError traceback, another with a bare SystemExit message, a third with its own log line)."""
    import subprocess
    import sys

    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    params["train"]["augment"]["brightnes"] = 0.5
    (tiny_pipeline / "params.yaml").write_text(yaml.safe_dump(params))
    (tiny_pipeline / "data/raw").mkdir()
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=tiny_pipeline, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if f" {stage} ERROR " in line]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr
