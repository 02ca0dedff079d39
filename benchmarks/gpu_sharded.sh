#!/usr/bin/env bash
# QLAB under every strategy it runs under on the GPUs of this machine, bf16-mixed: one GPU, DDP and
# FSDP2 (lightning_qlab.strategies.FSDP2Strategy), the same model and steps (FSDP1 is refused).
# About 2 minutes on one H200. Prints one JSON line per strategy, then checks that every run
# finished with a finite loss and that the other runs' losses are within 5% of DDP's (every run
# reads the same samples in the same order; bf16 rounding differs with the order of the sums, and
# a wrong global sum would be far off).
#
#   bash benchmarks/gpu_sharded.sh [output file, default benchmarks/results/gpu_sharded.jsonl]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-benchmarks/results/gpu_sharded.jsonl}
mkdir -p "$(dirname "$out")"
python - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_sharded.sh: no CUDA device is visible; run it on a GPU machine")
print("GPUs:", torch.cuda.device_count(), torch.cuda.get_device_name(0))
PY
: > "$out"
for strategy in single ddp fsdp2; do
    PYTHONUNBUFFERED=1 timeout 150 python benchmarks/sharded_check.py --strategy "$strategy" 2>&1 \
        | tee /dev/stderr | grep '^{"strategy"' >> "$out" || echo "{\"strategy\": \"$strategy\", \"failed\": true}" >> "$out"
done
python - "$out" <<'PY'
import json, math, sys
runs = {r["strategy"]: r for r in map(json.loads, open(sys.argv[1]))}
failed = [name for name, r in runs.items() if r.get("failed") or not math.isfinite(r["loss_last_50"])]
reference = runs.get("ddp", {}).get("loss_last_50")
for name, r in runs.items():
    if "loss_last_50" in r and reference:
        print(f"{name:7s} processes {r['processes']}  loss {r['loss_last_50']:.4f} ({r['loss_last_50'] / reference:.3f} x DDP)"
              f"  step {r['step_ms']:.2f} ms  held step {r['held_step']:.3g}  events {r['events']}")
far = [name for name in ("single", "fsdp2") if name in runs and reference and not failed
       and abs(runs[name]["loss_last_50"] / reference - 1) > 0.05]
if failed or far:
    sys.exit(f"gpu_sharded.sh: failed {failed}, loss off DDP's by more than 5% {far}")
print("gpu_sharded.sh: every strategy trained alike")
PY
