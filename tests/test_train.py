"""The naive training stage and the shared loop: tiny end-to-end training,
resume == uninterrupted, NaN guard, DDP with gloo, initial weights."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import run_train_naive

from stages.lib import atomic, engine, runtime
from stages.lib.atomic import TMP_TAG
from stages.lib.models import build_model, create_model, load_model_file

REPO = Path(__file__).resolve().parents[1]


def run_stage(workdir: Path, out: str = "models/naive") -> None:
    run_train_naive(workdir, out)


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_tiny_training_writes_a_usable_model(tiny_pipeline: Path) -> None:
    run_stage(tiny_pipeline)
    out = tiny_pipeline / "models" / "naive"
    for name in ("model.pt", "early.pt", "val_predictions.tsv", "checkpoints/last.pt", "live/metrics.json"):
        assert (out / name).exists(), name
    # the dvclive summary (what dvc exp show compares) has the model's numbers, not the timings of this
    # machine; those are in the per-epoch curves
    summary = json.loads((out / "live/metrics.json").read_text())
    assert set(summary) == {"train", "val", "step"} and set(summary["train"]) == {"loss", "acc"}
    curves = out / "live/plots/metrics"
    assert (curves / "train/images_per_s.tsv").is_file() and (curves / "epoch_s.tsv").is_file()
    model, meta = load_model_file(out / "model.pt")
    assert meta["classes"] == ["red dog", "green dog", "blue dog"]
    assert meta["image_size"] == 32 and meta["backbone"] == "resnet18"
    # three solid colours are easy: the validation split must be learnt
    val = (out / "val_predictions.tsv").read_text().splitlines()[1:]
    correct = sum(line.split("\t")[1] == line.split("\t")[2] for line in val)
    assert correct / len(val) >= 0.75
    # the early model is the snapshot after train.early_epoch, not the final one
    assert torch.load(out / "early.pt", weights_only=True)["epochs"] == 2
    early, final = state(out / "early.pt"), state(out / "model.pt")
    assert any(not torch.equal(a, b) for a, b in zip(early.values(), final.values()))


@pytest.mark.parametrize("ema_half_life", [0.0, 1.0])
def test_resume_after_interruption_equals_uninterrupted_run(tiny_pipeline: Path, monkeypatch,
                                                            ema_half_life: float) -> None:
    """With an average of the weights too: the checkpoint carries the average, or the resumed model
    would average only the epochs after the interruption."""
    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    params["train"]["ema_half_life"] = ema_half_life
    (tiny_pipeline / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage(tiny_pipeline, "models/straight")
    monkeypatch.setenv(engine.STOP_ENV, "2")
    with pytest.raises(engine.TrainingInterrupted):
        run_stage(tiny_pipeline, "models/resumed")
    assert not (tiny_pipeline / "models/resumed/model.pt").exists()
    assert torch.load(tiny_pipeline / "models/resumed/checkpoints/last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.delenv(engine.STOP_ENV)
    shutil.rmtree(tiny_pipeline / "models/resumed/live")  # DVC removes non-persistent outputs before a re-run
    run_stage(tiny_pipeline, "models/resumed")
    models = tiny_pipeline / "models"
    straight, resumed = state(models / "straight/model.pt"), state(models / "resumed/model.pt")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    early_a, early_b = state(models / "straight/early.pt"), state(models / "resumed/early.pt")
    assert all(torch.equal(early_a[k], early_b[k]) for k in early_a)


def test_checkpoint_of_other_settings_is_not_resumed(tiny_pipeline: Path, monkeypatch) -> None:
    monkeypatch.setenv(engine.STOP_ENV, "2")
    with pytest.raises(engine.TrainingInterrupted):
        run_stage(tiny_pipeline)
    monkeypatch.delenv(engine.STOP_ENV)
    params = (tiny_pipeline / "params.yaml").read_text().replace("lr: 0.05", "lr: 0.04")
    (tiny_pipeline / "params.yaml").write_text(params)
    run_stage(tiny_pipeline)
    ckpt = torch.load(tiny_pipeline / "models/naive/checkpoints/last.pt", weights_only=True)
    assert ckpt["args"]["train"]["lr"] == 0.04 and len(ckpt["history"]) == 4


def test_a_checkpoint_made_from_other_initial_weights_is_not_resumed(tiny_pipeline: Path, caplog,
                                                                    monkeypatch) -> None:
    """A weights file replaced under the same name (models/weights/): DVC re-runs the stage, and the
    interrupted run's checkpoint, trained from the old weights, must not be resumed."""
    weights = tiny_pipeline / "models/weights/start.pth"
    weights.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(build_model("resnet18", 10).trunk.state_dict(), weights)
    params = (tiny_pipeline / "params.yaml").read_text().replace("weights: none", "weights: models/weights/start.pth")
    (tiny_pipeline / "params.yaml").write_text(params)
    monkeypatch.setenv(engine.STOP_ENV, "2")
    with pytest.raises(engine.TrainingInterrupted):
        run_stage(tiny_pipeline)
    monkeypatch.delenv(engine.STOP_ENV)
    torch.manual_seed(2)
    torch.save(build_model("resnet18", 10).trunk.state_dict(), weights)
    with caplog.at_level("INFO", logger="engine"):
        run_stage(tiny_pipeline)
    assert "resumed from" not in caplog.text  # trained again from the new weights


def test_non_finite_loss_stops_with_a_clear_error(tiny_pipeline: Path) -> None:
    params = (tiny_pipeline / "params.yaml").read_text()
    params = params.replace("lr: 0.05", "lr: 1.0e+30").replace("clip_grad_norm: 5.0", "clip_grad_norm: 0.0")
    (tiny_pipeline / "params.yaml").write_text(params)
    with pytest.raises(engine.NonFiniteLossError, match="loss is"):
        run_stage(tiny_pipeline)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over loopback")
def test_ddp_with_two_gloo_processes(tiny_pipeline: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "stages.train_naive", "data/filtered", "data/images", "models/ddp"],
        cwd=tiny_pipeline, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, meta = load_model_file(tiny_pipeline / "models/ddp/model.pt")
    assert meta["classes"] == ["red dog", "green dog", "blue dog"]
    ckpt = torch.load(tiny_pipeline / "models/ddp/checkpoints/last.pt", weights_only=True)
    assert len(ckpt["history"]) == 4
    # 48 training images sharded over 2 ranks: each rank's epoch is one batch of 16 (drop_last)
    assert all(h["train_images_per_s"] > 0 for h in ckpt["history"])
    assert len((tiny_pipeline / "models/ddp/live/plots/metrics/train/loss.tsv").read_text().splitlines()) == 5


DYING_RANK = """
import os, sys, time
from stages import train_naive
from stages.lib import engine
real = engine.train_one_epoch
def one_epoch(*args, **kwargs):
    if os.environ["RANK"] == "1" and args[-1] == 1:  # rank 1, second epoch
        if sys.argv[1] == "exit":
            os._exit(3)  # killed: out of memory, a lost node
        time.sleep(600)  # hangs: the other rank waits in its next collective
    return real(*args, **kwargs)
engine.train_one_epoch = one_epoch
train_naive.main(["data/filtered", "data/images", "models/ddp"])
"""


@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_dying_or_hanging_ddp_rank_ends_the_run_with_an_error(tiny_pipeline: Path, fault: str) -> None:
    (tiny_pipeline / "run.py").write_text(DYING_RANK)
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", runtime.DDP_TIMEOUT_ENV: "15"}
    start = time.monotonic()
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "run.py", fault], cwd=tiny_pipeline, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - start < 150  # gloo's default would wait 30 minutes for the hanging rank
    assert not (tiny_pipeline / "models/ddp/model.pt").exists()


def test_weights_from_a_local_file_fill_the_trunk_and_keep_a_new_head(tmp_path: Path) -> None:
    donor = build_model("resnet18", 10)
    path = tmp_path / "resnet18.pth"
    torch.save({f"{k}": v for k, v in donor.trunk.state_dict().items()} | {"fc.weight": torch.zeros(1000, 512)}, path)
    model = create_model("resnet18", 3, str(path))
    for k, v in donor.trunk.state_dict().items():
        assert torch.equal(model.trunk.state_dict()[k], v), k
    assert model.head.out_features == 3


def test_bad_weights_files_give_clear_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="corrupt.pt"):
        create_model("resnet18", 3, str(corrupt))
    other = tmp_path / "other.pt"
    torch.save(build_model("shufflenet_v2_x0_5", 3).trunk.state_dict(), other)
    with pytest.raises(ValueError, match="does not fit"):
        create_model("resnet18", 3, str(other))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_model("resnet18", 3, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="not a torchvision"):
        create_model("resnet9000", 3)


def test_imagenet_weights_offline_fail_at_once_with_advice(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    with pytest.raises(RuntimeError, match="set model.weights to its path"):
        create_model("resnet18", 3, "imagenet")


def test_bad_choices_are_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        runtime.autocast_dtype(torch.device("cpu"), "fp8")
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        runtime.autocast_dtype(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="optimizer"):
        engine.build_optimizer(torch.nn.Linear(2, 2),
                               SimpleNamespace(optimizer="rmsprop", lr=0.1, momentum=0.9, weight_decay=0.0))
    with pytest.raises(ValueError, match="device"):
        runtime.choose_device("tpu")


def _ema_run(half_life: float, seen: list[torch.Tensor] | None = None) -> torch.Tensor:
    """fit() on a linear regression of 4 steps an epoch for 3 epochs; ``seen`` collects the weights
    each step starts from."""
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])

    class Rows(torch.utils.data.Dataset):  # indexed by the training sampler's (index, epoch)
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, item: tuple[int, int]):
            return x[item[0]], y[item[0]]

    data = Rows()
    loader = engine.make_loader(data, batch_size=16, train=True, seed=0, workers=0, device=torch.device("cpu"))
    model = torch.nn.Linear(3, 1, bias=False)

    def loss_fn(model, batch, ctx):
        if seen is not None:
            seen.append(model.weight.detach().clone())
        inputs, targets = batch
        loss = ((model(inputs).squeeze(1) - targets) ** 2).mean()
        return loss, {"loss": loss.detach()}, len(targets)

    cfg = SimpleNamespace(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0, trunk_lr_scale=1.0,
                          warmup_epochs=0, ema_half_life=half_life)
    ctx = engine.RunContext(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    engine.fit(model, loss_fn, loader, None, cfg, ctx)
    return model.weight.detach().clone()


def test_the_returned_model_is_the_moving_average_of_every_steps_weights() -> None:
    """train.ema_half_life: the model fit() returns is the exponential moving average of the weights
    after each of its 12 steps, with a step's weight halving every half-life (in epochs: 4 steps here)."""
    seen: list[torch.Tensor] = []
    last = _ema_run(0.0, seen)  # the plain run: the EMA does not change the training itself
    after_steps = seen[1:] + [last]  # the weights after steps 1..12
    decay = 0.5 ** (1 / (0.5 * 4))
    assert engine.ema_decay(0.5, 4) == pytest.approx(decay)
    expected = after_steps[0]  # torch's AveragedModel starts from the first update's weights
    for weights in after_steps[1:]:
        expected = decay * expected + (1 - decay) * weights
    averaged = _ema_run(0.5)
    assert torch.allclose(averaged, expected, atol=1e-6)
    assert not torch.allclose(averaged, last, atol=1e-3)
    with pytest.raises(ValueError, match="ema_half_life"):
        engine.ema_decay(0.0, 4)


def test_step_budget_gives_smaller_sets_more_epochs() -> None:
    from stages.lib.classifier import budget_epochs, budgeted

    # 3600 raw training images, batch 128: 28 steps an epoch, 15 epochs = 420 steps
    assert budget_epochs(3600, reference_train=3600, epochs=15, batch_size=128) == 15
    assert budget_epochs(2400, reference_train=3600, epochs=15, batch_size=128) == 23  # 18 steps an epoch
    assert budget_epochs(5000, reference_train=3600, epochs=15, batch_size=128) == 15  # never cut short
    import yaml

    from stages.lib.classifier import TrainConfig

    train = {**yaml.safe_load((REPO / "params.yaml").read_text())["train"], "epochs": 15, "early_epoch": 3,
             "batch_size": 128}
    cfg = budgeted(TrainConfig.from_params(train, "train"), 2400, 3600)
    assert cfg.epochs == 23 and cfg.early_epoch == 5 and cfg.lr == train["lr"]
    with pytest.raises(ValueError, match="no full batch"):
        budget_epochs(100, reference_train=3600, epochs=15, batch_size=128)


def test_training_at_chance_stops_the_stage_with_a_message(tiny_pipeline: Path) -> None:
    """Labels that have nothing to do with the images: the model cannot beat
    chance, and the stage must say so instead of writing a useless model."""
    import numpy as np
    import pandas as pd

    from stages.lib.classifier import ModelAtChanceError

    labels_path = tiny_pipeline / "data/filtered/labels.tsv"
    labels = pd.read_csv(labels_path, sep="\t")
    labels["label"] = np.random.default_rng(0).permutation(labels["label"].to_numpy())
    labels.to_csv(labels_path, sep="\t", index=False)
    with pytest.raises(ModelAtChanceError, match=r"train_naive: validation top-1 .* at chance .*train\.lr"):
        run_stage(tiny_pipeline)
    assert not (tiny_pipeline / "models/naive/model.pt").exists()


def test_default_recipe_on_a_few_hundred_photos_learns_or_says_why(tmp_path: Path) -> None:
    """params.yaml's model and train sections on 300 photo-sized images of 10
    classes (the case that once ended at chance and exited 0): the stage must
    train above chance or stop with ModelAtChanceError, never write a model at
    chance."""
    import io
    import json

    import numpy as np
    import pandas as pd
    import yaml
    from PIL import Image

    from stages.lib import layout
    from stages.lib.classifier import ModelAtChanceError, chance_check
    from stages.lib.shards import IndexWriter, ShardWriter

    rng = np.random.default_rng(0)
    images = tmp_path / "data/images"
    images.mkdir(parents=True)
    rows = []
    hues = np.linspace(0, 255, 10, endpoint=False)
    with ShardWriter(images, 1 << 24) as shards, IndexWriter(images / layout.INDEX) as index:
        for i in range(300):
            c = i % 10
            arr = rng.normal(120, 40, size=(240, 320, 3))
            arr[60:180, 80:240] = [hues[c], 255 - hues[c], (hues[c] * 3) % 255]  # the "dog": a coloured block
            buf = io.BytesIO()
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
            shard, offset = shards.write(buf.getvalue())
            index.add(f"k{i}", "train", shard, offset, buf.tell(), 320, 240)
            rows.append((f"k{i}", c, f"breed {c}", 3, 1.0))
    filtered = tmp_path / "data/filtered"
    filtered.mkdir(parents=True)
    table = pd.DataFrame(rows, columns=["key", "label", "breed", "clicks", "share"])
    table.to_csv(filtered / layout.LABELS, sep="\t", index=False)
    table.to_csv(filtered / layout.RAW_LABELS, sep="\t", index=False)
    (filtered / layout.CLASSES).write_text(json.dumps([f"breed {c}" for c in range(10)]))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["workers"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({k: params[k] for k in ("model", "train", "cache")}))
    try:
        run_stage(tmp_path)
    except ModelAtChanceError as err:
        assert "model.weights" in str(err)
        return
    val = pd.read_csv(tmp_path / "models/naive/val_predictions.tsv", sep="\t")
    assert chance_check(float((val["pred"] == val["label"]).mean()), len(val), 10)[0]


def test_a_finished_run_is_trained_again_not_resumed(tiny_pipeline: Path, caplog) -> None:
    """dvc repro -f used to print "resumed ... at epoch 4" and re-save the old
    model in a second: a checkpoint resumes only an interrupted run."""
    import logging

    run_stage(tiny_pipeline)
    ckpt = tiny_pipeline / "models/naive/checkpoints/last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert engine.load_checkpoint(ckpt, state["args"], epochs=state["epoch"] + 1) is None  # finished
    assert engine.load_checkpoint(ckpt, state["args"], epochs=state["epoch"] + 2) is not None  # interrupted
    first = state["model"]
    with caplog.at_level(logging.INFO, logger="engine"):
        run_stage(tiny_pipeline)
    assert "holds a finished run" in caplog.text and "resumed" not in caplog.text
    again = torch.load(ckpt, weights_only=True)
    assert again["epoch"] == state["epoch"] and all(torch.equal(first[k], again["model"][k]) for k in first)


@pytest.mark.parametrize("content", ["a list", "no model", "garbage"])
def test_odd_checkpoints_are_ignored_with_a_warning(tmp_path: Path, content: str, caplog) -> None:
    path = tmp_path / "last.pt"
    if content == "a list":
        torch.save([1, 2, 3], path)
    elif content == "no model":
        torch.save({"epoch": 1, "args": {}}, path)
    else:
        path.write_bytes(b"\x00not a checkpoint")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process that is gone: the torn write of a crashed run
    torn = tmp_path / f".last.pt{TMP_TAG}{atomic._host()}-{dead.pid}-abc"
    torn.write_bytes(b"torn")
    with caplog.at_level("WARNING", logger="engine"):
        assert engine.load_checkpoint(path, {}, epochs=4) is None
    assert "ignoring" in caplog.text
    assert not torn.exists()


def test_imagenet_weights_load_safely_with_their_hash_checked(monkeypatch) -> None:
    """torch's download helper unpickled the file and skipped the hash check."""
    import torchvision

    seen = {}

    def fake_download(url, *args, **kwargs):
        seen.update(kwargs, url=url)
        return {}

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: type("C", (), {"close": lambda self: None})())
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    with pytest.raises(ValueError):  # an empty state dict does not fit: what matters is how it was fetched
        create_model("resnet18", 3, "imagenet")
    assert seen["weights_only"] is True and seen["check_hash"] is True and seen["url"].endswith(".pth")


def test_the_checkpoint_fingerprint_holds_exactly_what_changes_the_result() -> None:
    """train.workers cannot change the result (draws are seeded per sample)
    but threw the checkpoint away; another world size or resolved precision
    changes the schedule or the numbers but resumed silently."""
    import yaml

    from stages.lib.classifier import TrainConfig
    from stages.lib.tracking import run_fingerprint

    train = TrainConfig.from_params(yaml.safe_load((REPO / "params.yaml").read_text())["train"], "train")
    fp32 = {"device": "cpu", "precision": "fp32"}

    def fingerprint(cfg, resolved=fp32, world=1):
        return run_fingerprint("stages.train_naive", train=cfg, resolved=resolved, world_size=world, data="d")

    base = fingerprint(train)
    assert fingerprint(train.replace(workers=train.workers + 3)) == base
    assert fingerprint(train, world=2) != base
    assert fingerprint(train, resolved={"device": "cpu", "precision": "bf16"}) != base
    assert fingerprint(train.replace(lr=train.lr / 2)) != base


def test_zero_epochs_are_refused_at_entry() -> None:
    import yaml

    from stages.lib.classifier import TrainConfig
    from stages.lib.params import ConfigError

    train = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    with pytest.raises(ConfigError, match=r"train: epochs must be >= 1"):  # it would train on nothing
        TrainConfig.from_params({**train, "epochs": 0}, "train")


def test_a_run_past_the_early_epoch_without_its_early_model_trains_again(tiny_pipeline: Path, monkeypatch,
                                                                          caplog) -> None:
    run_stage(tiny_pipeline, "models/straight")
    monkeypatch.setenv(engine.STOP_ENV, "3")  # early_epoch is 2
    with pytest.raises(engine.TrainingInterrupted):
        run_stage(tiny_pipeline, "models/resumed")
    monkeypatch.delenv(engine.STOP_ENV)
    (tiny_pipeline / "models/resumed/checkpoints/early.pt").unlink()  # resuming could never write early.pt
    shutil.rmtree(tiny_pipeline / "models/resumed/live")
    caplog.set_level("WARNING")
    run_stage(tiny_pipeline, "models/resumed")
    assert "cannot be resumed; training from scratch" in caplog.text
    models = tiny_pipeline / "models"
    for name in ("model.pt", "early.pt"):
        a, b = state(models / "straight" / name), state(models / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def _optim_cfg(**changes) -> SimpleNamespace:
    return SimpleNamespace(**{"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                              "trunk_lr_scale": 1.0, **changes})


def test_the_trunk_learns_at_its_own_rate_and_one_rate_keeps_two_groups() -> None:
    model = build_model("resnet18", 3)
    trunk = {id(p) for p in model.trunk.parameters()}
    same = engine.build_optimizer(model, _optim_cfg())
    assert [g["lr"] for g in same.param_groups] == [0.1, 0.1]  # as before the setting existed
    slow = engine.build_optimizer(model, _optim_cfg(trunk_lr_scale=0.1))
    for group in slow.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= trunk if group["lr"] == pytest.approx(0.01) else not ids & trunk
    assert sum(len(g["params"]) for g in slow.param_groups) == len(list(model.parameters()))
    assert {id(p) for g in slow.param_groups if g["lr"] == 0.1 for p in g["params"]} == {
        id(p) for p in model.head.parameters()}


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_frozen_batchnorm_keeps_the_running_statistics(batchnorm: str) -> None:
    """Small batches' statistics destroyed a pretrained trunk's (issue: LP-FT at 0.67 with BatchNorm
    updating, 0.90 with it in eval mode); frozen keeps them while the affine weights still learn."""
    from stages.lib.classifier import run_context

    torch.manual_seed(0)
    model = build_model("resnet18", 2)
    bn = model.trunk.bn1
    before_mean, before_weight = bn.running_mean.clone(), bn.weight.detach().clone()
    batches = [(torch.randn(4, 3, 32, 32) * 3 + 1, torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    ctx = run_context("cpu", "fp32", batchnorm=batchnorm)
    optimizer = engine.build_optimizer(model, _optim_cfg(lr=0.01))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine.train_one_epoch(model, engine.classification_loss(), batches, optimizer, scheduler, None, ctx, 0)
    assert torch.equal(bn.running_mean, before_mean) == (batchnorm == "frozen")
    assert not torch.equal(bn.weight.detach(), before_weight)  # the affine weights learn either way
