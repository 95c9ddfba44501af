#!/usr/bin/env bash
# The paper preset on a GPU (issue #16), in three parts, everything under OUT (runs/gpu):
#  1. benchmarks/paper_memory.py at the preset's default batches on CUDA: per stage a training
#     step (fp32, bf16, with activation checkpointing and/or flash attention) and a sampling
#     forward, with torch.cuda.max_memory_allocated, FLOPs and seconds -> OUT/paper_memory.*;
#  2. a short paper-preset training of every stage (EPOCHS epochs on the thorax demo cohort,
#     bf16 + flash attention, the paper preset's savers) and one generated pair from those weights
#     (MC-DPM DDIM-50 in bf16, the refiner as configured) -> OUT/train, OUT/generated;
#  3. benchmarks/gpu.py: seconds and peak memory of one paired volume per stage.
# Without a GPU it says so and runs nothing.
#   benchmarks/gpu.sh                 # OUT=runs/gpu EPOCHS=2
#   SCALE=tiny DEVICE=cpu benchmarks/gpu.sh   # the same steps at the test preset, on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu}
EPOCHS=${EPOCHS:-2}
SCALE=${SCALE:-paper}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "benchmarks/gpu.sh: no GPU (torch.cuda.is_available() is False on $(hostname));" \
        "nothing was run. The CPU measurements and projections are in benchmarks/results.md" \
        "(python -m benchmarks.paper_memory)."
    exit 0
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
mkdir -p "$OUT"

echo "== 1. memory, FLOPs and seconds per stage at the preset's batches"
"$PY" -m benchmarks.paper_memory --device "$DEVICE" --samples default --scale "$SCALE" \
    --limit-gib 64 --json "$OUT/paper_memory.json" | tee "$OUT/paper_memory.md"

echo "== 2. a short training of every stage, then one pair from those weights"
savers=(--bf16 True --flash_attention True --device "$DEVICE")
train() { "$PY" -m medgen3d.cli train "$@" --scale "$SCALE" "${savers[@]}"; }
train masks --out "$OUT/train/masks" --max_epochs "$EPOCHS" --val_interval "$EPOCHS"
train generator --out "$OUT/train/images" --gen_max_epochs "$EPOCHS" --gen_val_interval "$EPOCHS"
for view in axial coronal sagittal; do
    train refiner --view "$view" --out "$OUT/train/images" \
        --sdm_max_epochs "$EPOCHS" --sdm_val_interval "$EPOCHS"
done
train seg --out "$OUT/train/seg" --max_epochs "$EPOCHS" --val_interval "$EPOCHS"
bundle() {  # bundle NAME STAGE-FILES... -- overrides: `monai.bundle run inference` at SCALE
    local name=$1 files="" key
    shift
    while [ "$1" != -- ]; do files+="'bundles/$name/configs/$1.yaml',"; shift; done
    shift
    "$PY" -m monai.bundle run inference --bundle_root "bundles/$name" --device "$DEVICE" \
        --config_file "[${files}'bundles/$name/configs/$SCALE.yaml','bundles/$name/configs/thorax.yaml']" "$@"
}
time bundle mask_diffusion inference -- --ckpt_path "$OUT/train/masks/models/model.pt" \
    --output_dir "$OUT/generated/masks" --num_cases 1 --batch_size 1 \
    --steps 50 --sample_bf16 True  # the preset's sampler (rflow at standard, else DDPM/DDIM)
time bundle image_synthesis inference -- --ckpt_dir "$OUT/train/images/models" \
    --mask_datalist "$OUT/generated/masks/datalist.json" --output_dir "$OUT/generated/images" \
    --sdm_bf16 True

echo "== 3. one paired volume per stage: seconds and peak GPU memory"
"$PY" -m benchmarks.gpu --scale "$SCALE" --device "$DEVICE"
