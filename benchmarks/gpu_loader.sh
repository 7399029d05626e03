#!/usr/bin/env bash
# The GPU checks of the loader work, in one short call on a lent GPU machine
# (a few minutes). Needs the sample's data/filtered and data/images (`make
# repro` here, then carry them). Writes logs under $OUT (default /tmp/gpu-out):
#   1. tests/test_batchaug.py, whose CUDA test runs only where there is a GPU;
#   2. the sample's naive recipe (library code of train_naive) on CUDA for
#      3 epochs with augment.where loader and device: images/s and val top-1;
#   3. benchmarks/train_loader.py: in-memory against the real loaders,
#      shufflenet 64 px and ResNet-50 224 px, bf16, channels_last.
#
#   PY=python3 OUT=/tmp/gpu-out bash benchmarks/gpu_loader.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu-out}
PY=${PY:-python3}
WORKERS=${WORKERS:-4 8 14}
MODELS=${MODELS:-resnet50:224:256 shufflenet_v2_x1_0:64:128}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import os, torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cpus', os.cpu_count(), torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

echo "== 1. tests/test_batchaug.py"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_batchaug.py 2>&1 | tail -n 25 | tee "$OUT/tests.txt"

echo "== 2. the naive recipe on CUDA, 3 epochs, augment.where loader / device"
timeout 180 "$PY" - <<'PYEOF' 2>&1 | grep -v "^INFO" | tee "$OUT/recipe.txt"
import json, os, time
from pathlib import Path
from stages.lib import layout
from stages.lib.classifier import ModelConfig, TrainConfig, plan_run, reference_size, train_classifier
from stages.lib.data import load_labels
from stages.lib.params import load_sections
from stages.lib.shards import read_index

p = load_sections(model=ModelConfig, train=TrainConfig)
labels = load_labels(Path("data/filtered") / layout.LABELS)
classes = json.loads((Path("data/filtered") / layout.CLASSES).read_text())
for where in ("loader", "device"):
    cfg = p["train"].replace(device=os.environ.get("DEVICE", "cuda"), precision=os.environ.get("PRECISION", "bf16"),
                             epochs=int(os.environ.get("EPOCHS", 3)), early_epoch=1, workers=8,
                             augment=p["train"].augment.replace(where=where))
    plan = plan_run(labels, cfg, reference_size(labels, cfg))
    start = time.perf_counter()
    model, history = train_classifier(plan.train, plan.val, images_dir=Path("data/images"),
                                      num_classes=len(classes), model_cfg=p["model"], train_cfg=plan.cfg,
                                      index=read_index("data/images"))
    for e, m in enumerate(history):
        print(f"  {where} epoch {e + 1}: " + ", ".join(
            f"{k} {m[k]:.4g}" for k in ("train_images_per_s", "train_data_wait_s", "epoch_s", "val_acc")))
    print(f"augment.where {where}: {plan.cfg.epochs} epochs in {time.perf_counter() - start:.1f} s")
PYEOF

echo "== 3. benchmarks/train_loader.py"
# shellcheck disable=SC2086
timeout 330 "$PY" benchmarks/train_loader.py --device cuda --precision bf16 --steps 30 --workers $WORKERS \
  --models $MODELS --json "$OUT/train_loader.json" 2>&1 \
  | tee "$OUT/train_loader.txt"
