#!/usr/bin/env bash
# The sampler study of docs/benchmarks/samplers.md ("Drawing the sampler study again"), from the source tree (no
# installation: PYTHONPATH=src): the demo recipe trained for 3,000 steps with eps prediction,
# with v prediction, and with v prediction on a zero-terminal-SNR schedule; then, for each
# model, SWD (3 groups of 500) of every sampler at 10, 20, 35, 50 and 100 network calls and of
# 1,000 ancestral steps. On one GPU a model takes minutes; without CUDA the same steps run at
# toy sizes (the tiny preset, 16x16, 3 groups of 8) in a few minutes, so it can be tried anywhere.
#
#   bash tools/sampler_study.sh [OUT_DIR [MODEL...]]   (default: runs/sampler_study eps v v-ztsnr)
#
# Each model's run, pictures and tables go to OUT_DIR/MODEL; the tables are also appended to
# OUT_DIR/summary.md as each step ends, so an interrupted study keeps what it finished. A
# model whose run is already there is resumed, not trained again, and a step stopped halfway
# draws only what its run's record (sampler_scores.jsonl) does not hold yet. The pixel precision/recall
# needs torch-fidelity; where Python lacks it, a copy in OUT_DIR/vendor is used (copy the
# installed package's folder there: it is pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/sampler_study}
MODELS=(eps v v-ztsnr)
[ $# -gt 1 ] && MODELS=("${@:2}")
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$OUT/vendor" ] && export PYTHONPATH="$PYTHONPATH:$PWD/$OUT/vendor"
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DEVICE=cuda NUM=500 BATCH=500 ALL=1000
    TRAIN=(--preset demo --channels 64,128,128 --steps 3000 --eval-every 1000)  # the demo network until d73292a
else  # the same steps, at sizes a CPU does in minutes
    DEVICE=cpu NUM=8 BATCH=24 ALL=100  # the tiny preset has 100 steps
    TRAIN=(--preset tiny --steps 40 --eval-every 20 --num-sample-images 4)
fi
"$PY" -c 'import torch_fidelity' 2>/dev/null || { echo "torch-fidelity is missing: pip install torch-fidelity, or copy it to $OUT/vendor" >&2; exit 1; }

source tools/step.sh  # a failed step stops the study: run it again to go on from there

"$PY" -c 'import torch; print("#", "sampler study", "| torch", torch.__version__, "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' | tee -a "$SUMMARY"
date -u +%Y-%m-%dT%H:%M:%SZ | tee -a "$SUMMARY"
QUALITY=(-m studies.sampler_quality --num "$NUM" --groups 3 --batch-size "$BATCH" --device "$DEVICE")
for model in "${MODELS[@]}"; do
    case $model in
        eps) options=(--prediction eps --min-snr-gamma 0) ;;
        v) options=(--prediction v --min-snr-gamma 0) ;;
        v-ztsnr) options=(--prediction v --min-snr-gamma 0 --zero-terminal-snr) ;;
        *) echo "unknown model '$model': eps, v or v-ztsnr" >&2; exit 2 ;;
    esac
    run="$OUT/$model"
    resume=()
    [ -f "$run/config.json" ] && resume=(--resume)  # a finished run stays as it is; a broken one goes on
    step "$model: train" "$PY" -m ddpm_cars train "${TRAIN[@]}" "${options[@]}" "${resume[@]}" --device "$DEVICE" --out "$run"
    step "$model: every sampler at 10-100 calls" "$PY" "${QUALITY[@]}" --run "$run" --nfe 10,20,35,50,100 \
        --samplers ddpm,ddim:eta=1,ddim,dpm++:karras,dpm++3m:logsnr,dpm++sde:karras,heun:karras,heun:karras:churn=20 --out "$run/grid.png"
    step "$model: ancestral sampling on all $ALL steps" "$PY" "${QUALITY[@]}" --run "$run" --settings "ddpm:$ALL" --out "$run/ddpm_all.png"
done
echo "done: $SUMMARY"
