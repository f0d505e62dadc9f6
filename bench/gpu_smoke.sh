#!/usr/bin/env bash
# The GPU smoke check: the CUDA tests (pytest -m cuda), then a short `lorakit train` of the default model
# (SmolLM2-135M-Instruct, embedded) on the device, printing its tokens/s and peak GPU memory.
#
#   bash bench/gpu_smoke.sh [STEPS]     (from the repository root; STEPS defaults to 30)
#
# Without a CUDA device the tests skip (saying why) and the training run is not attempted.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-30}"
out="${TMPDIR:-/tmp}/lorakit-gpu-smoke"

python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PY

python -m pytest -m cuda tests/cuda -q -rs

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: the training run is skipped"
  exit 0
fi

rm -rf "$out"
python -m lorakit train --device cuda --precision auto --steps "$steps" --max-eval 20 --no-progress \
  --output-dir "$out"
python - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"lorakit train on {s['device']}: {s['steps']} steps, {s['precision']} ({s['precision_reason']})")
print(f"tokens/s: {s['tokens_per_s']:.0f}   peak GPU memory: {s['peak_gpu_mib']:.0f} MiB   "
      f"exact match: {s['before'].get('exact_match')} -> {s['after'].get('exact_match')}")
PY
