#!/usr/bin/env bash
# GPU check: the sample's naive training with train.device: cuda; prints
# images/s per epoch and the wall time. Needs the sample's data/filtered
# (it runs `dvc repro filter_clicks` first when missing).
#
#   scripts/gpu_check.sh                                   # the sample settings
#   scripts/gpu_check.sh model.backbone=resnet50 model.image_size=224 train.workers=12
#
# Arguments are SECTION.KEY=VALUE overrides of params.yaml (values parsed as YAML).
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1
PY=${PY:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"
[ -f data/filtered/labels.tsv ] || dvc repro filter_clicks
tmp=$(mktemp -d)
"$PY" - "$tmp/params.yaml" "$@" <<'PYEOF'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["train"].update(device="cuda", precision="auto")
for item in sys.argv[2:]:
    key, sep, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = p
    for name in parents:
        node = node[name]
    if not sep or leaf not in node:
        sys.exit(f"gpu_check: {item!r} is not SECTION.KEY=VALUE for a key in params.yaml")
    node[leaf] = yaml.safe_load(value)
    print(f"override {key} = {node[leaf]!r}")
yaml.safe_dump(p, open(sys.argv[1], "w"))
PYEOF
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
SECONDS=0
if ! "$PY" -m stages.train_naive data/filtered data/images "$tmp/naive" --params "$tmp/params.yaml" \
    >"$tmp/train.log" 2>&1; then
  tail -n 40 "$tmp/train.log"
  exit 1
fi
grep -E "epoch [0-9]+/|validation top-1" "$tmp/train.log"
echo "wall time: ${SECONDS} s (train_naive on CUDA, sample data, including start-up)"
