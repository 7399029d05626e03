#!/usr/bin/env bash
# GPU check: the sample's naive training with train.device: cuda; prints
# images/s per epoch and the wall time. Needs the sample's data/filtered
# (it runs `dvc repro filter_clicks` first when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1
PY=${PY:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"
[ -f data/filtered/labels.tsv ] || dvc repro filter_clicks
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
tmp=$(mktemp -d)
"$PY" - "$tmp/params.yaml" <<'PYEOF'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["train"].update(device="cuda", precision="auto")
yaml.safe_dump(p, open(sys.argv[1], "w"))
PYEOF
SECONDS=0
"$PY" -m stages.train_naive data/filtered data/images "$tmp/naive" --params "$tmp/params.yaml" 2>&1 \
  | grep -E "epoch [0-9]+/|validation top-1"
echo "wall time: ${SECONDS} s (train_naive on CUDA, sample data, including start-up)"
