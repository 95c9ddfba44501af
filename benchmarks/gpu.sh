#!/usr/bin/env bash
# One paired volume with the paper preset on a GPU: seconds and peak GPU memory per stage
# (MC-DPM DDPM-1000, fast sampler single/batched/bf16, sequence generator, refiner fp32/bf16).
#   benchmarks/gpu.sh                       # options pass through to benchmarks/gpu.py
#   benchmarks/gpu.sh --mask-sampler ddpm:200 --batch-volumes 4   # a shorter run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" -m benchmarks.gpu "$@"
