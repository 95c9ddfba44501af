#!/usr/bin/env bash
# A real MONAI Label server with the exported seg_downstream bundle, on the project's pins
# (MONAI 1.6.1, torch 2.13.0): monailabel 0.8.5, its stock monaibundle sample app unmodified,
# the thorax demo cohort's 8 held-out cases as studies (their labels as final labels). Checks
# /info/, /infer/ on every held-out image (shape, affine, label values, Dice vs the label files
# and vs the bundle's own `run evaluating` on the same grids) and /train/ for one epoch, stops
# the server and prints a summary (also OUT/summary.md). Everything on 127.0.0.1, no download
# once the environment is built.
#   make monailabel-check                  # or: benchmarks/monailabel_check.sh
# Its own environment, built once (about 6 GB, minutes): MONAILABEL_VENV, default
# outputs/monailabel_check/venv. Not part of `make test` for that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/monailabel_check}
VENV=${MONAILABEL_VENV:-$OUT/venv}
PORT=${PORT:-8765}
MODEL=seg_downstream
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# the bundle as a user gets it (configs, models, docs, common/, requirements.txt)
rm -rf "$OUT/export"
.venv/bin/medgen3d export "$MODEL" --out "$OUT/export" >/dev/null
BUNDLE=$OUT/export/$MODEL

if [ ! -f "$VENV/.installed" ]; then
  echo "building $VENV (monailabel 0.8.5, MONAI 1.6.1, torch 2.13.0)"
  python3 -m venv "$VENV"
  # The registry's packages only (no machine-local wheel folders or caps): monailabel imports
  # torchvision, and the registry's torchvision 0.28.0 loads only beside the registry's torch
  # 2.13.0 (a CUDA build; it runs on the CPU), not beside a CPU-only build.
  pip_() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" install -q "$@"; }
  pip_ torch==2.13.0 torchvision==0.28.0 setuptools wheel
  # sam2, a monailabel requirement (switched off below), built against that torch, no CUDA
  # kernels: its default isolated build would fetch another torch
  SAM2_BUILD_CUDA=0 pip_ --no-build-isolation sam2==1.1.0
  # pydicom-seg, a monailabel requirement, fails to import with pydicom 3
  pip_ monailabel==0.8.5 "pydicom<3" -r "$BUNDLE/requirements.txt"
  touch "$VENV/.installed"
fi
"$VENV/bin/python" -c "import monai, monailabel, torch, torchvision; \
print(f'monailabel {monailabel.__version__}, MONAI {monai.__version__}, torch {torch.__version__}')"

# the demo cohort: the shipped weights saw cases 0-15; 16-23 are held out
if [ ! -f "$OUT/cohort/heldout.json" ]; then
  .venv/bin/medgen3d demo-data --dataset thorax --cases 24 --seed 0 --out "$OUT/cohort" >/dev/null 2>&1
  .venv/bin/python -c "from common.data.splits import split_datalist as s; \
s('$OUT/cohort/datalist.json', 16, '$OUT/cohort/train.json', '$OUT/cohort/heldout.json')"
fi
rm -rf "$OUT/studies" "$OUT/app" "$OUT/eval"
mkdir -p "$OUT/studies/labels/final"
for i in $(seq 16 23); do
  cp "$OUT/cohort/imagesTr/thorax_0$i.nii.gz" "$OUT/studies/"
  cp "$OUT/cohort/labelsTr/thorax_0$i.nii.gz" "$OUT/studies/labels/final/"
done

# the bundle's own evaluation of the held-out cases, in the same environment
(cd "$BUNDLE" && "$VENV/bin/python" -m monai.bundle run evaluating \
  --config_file "['configs/train.yaml','configs/evaluate.yaml']" --bundle_root . \
  --datalist "$OUT/cohort/heldout.json" --eval_section training --eval_dir "$OUT/eval" \
  >"$OUT/evaluate.log" 2>&1) || { tail -20 "$OUT/evaluate.log"; exit 1; }

# the stock sample app, the bundle in its model directory
cp -r "$VENV/monailabel/sample-apps/monaibundle" "$OUT/app"
mkdir -p "$OUT/app/model"
cp -r "$BUNDLE" "$OUT/app/model/$MODEL"

# offline: bundles from the app's model directory (zoo_source other than monaihosting), no SAM2
PATH="$VENV/bin:$PATH" monailabel start_server --app "$OUT/app" --studies "$OUT/studies" \
  --host 127.0.0.1 --port "$PORT" \
  --conf models "$MODEL" --conf zoo_source github --conf sam2 false >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
status=0
"$VENV/bin/python" benchmarks/monailabel_check.py --url "http://127.0.0.1:$PORT" \
  --model "$MODEL" --datalist "$OUT/cohort/heldout.json" --evaluation "$OUT/eval/metrics.json" \
  --out "$OUT" || status=$?
[ "$status" -eq 0 ] || tail -40 "$OUT/server.log"
exit "$status"
