#!/usr/bin/env bash
# The CIFAR-10 ResNet-18 panel on one GPU, sized to finish within 8 minutes on an H200:
# every contender of benchmarks/compare.py, 2 epochs each, bf16-mixed, 8 loader workers.
#
#   bash benchmarks/gpu.sh /path/to/cifar10-jpeg [output folder]
#
# The first argument is the CIFAR-10 ImageFolder root (train/<class>/, test/<class>/), e.g. the
# offline copy unzipped (unzip ../shared/data/cifar10-jpeg.zip). Tables and plots are written to
# the output folder (default benchmarks/results/cifar10-resnet18-gpu).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data=${1:?usage: bash benchmarks/gpu.sh CIFAR10_IMAGEFOLDER_ROOT [OUT]}
out=${2:-benchmarks/results/cifar10-resnet18-gpu}
python - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device is visible; run it on a GPU machine")
print("GPU:", torch.cuda.get_device_name(0))
PY
PYTHONUNBUFFERED=1 timeout 470 python benchmarks/compare.py cifar10-resnet18 \
    --data-dir "$data" --out "$out" --num-workers 8 --val-check-interval 0.5 \
    -- --trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed
