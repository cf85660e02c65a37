#!/usr/bin/env bash
# The GPU check: speed, memory and a short real run of the improved recipe on one GPU, from
# the source tree (no installation: PYTHONPATH=src), in under 8 minutes. Without CUDA it
# runs the same steps at toy sizes on the CPU in under 3 minutes, so it can be tried anywhere.
#
#   bash tools/gpu_check.sh [OUT_DIR]        (default OUT_DIR: runs/gpu_check)
#
# Writes OUT_DIR/summary.md (the tables and the timings) next to each step's own output.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${1:-runs/gpu_check}
rm -rf "$OUT" && mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DEVICE=cuda PRESET=improved SIZE=64 BATCH=128 STEPS=300 SAMPLES=64 PRECISION=bf16 BACKEND=nccl
    TRAIN=(--preset improved --image-size 64 --toy-count 8192 --batch-size 128)
else  # the same steps, at sizes a CPU does in seconds
    DEVICE=cpu PRESET=tiny SIZE=16 BATCH=8 STEPS=10 SAMPLES=4 PRECISION=fp32 BACKEND=gloo
    TRAIN=(--preset tiny --toy-count 256 --batch-size 16 --num-sample-images 4)
fi

source tools/step.sh
check() { step "$@" || true; }  # a failed check is noted in the summary, and the others still run

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    "$PY" -c 'import torch; print("torch", torch.__version__, "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
    echo
} | tee "$SUMMARY"

BENCH=(-m ddpm_cars bench --presets "$PRESET" --precisions "$PRECISION" --image-size "$SIZE" --batch-size "$BATCH"
       --repeats 5 --warmup 3 --sample-steps 5 --device "$DEVICE")
export DDPM_CARS_CACHE="$OUT/cache"  # the data cache starts empty: the first training run builds it
check "bench, eager, and the whole training loop" "$PY" "${BENCH[@]}" --loop --json "$OUT/bench.json"
if [ "$DEVICE" = cuda ]; then
    check "bench, compiled" "$PY" "${BENCH[@]}" --compile --json "$OUT/bench_compiled.json"
else
    echo "== bench, compiled: skipped on the CPU (compiling takes minutes there)" | tee -a "$SUMMARY"
fi
check "bench, activation checkpointing (peak memory)" "$PY" "${BENCH[@]}" --activation-checkpointing --json "$OUT/bench_checkpointing.json"
check "train $STEPS steps on toy cars" "$PY" -m ddpm_cars train "${TRAIN[@]}" --steps "$STEPS" --checkpoint-every "$STEPS" \
    --sample-every 1000 --sample-steps 50 --device "$DEVICE" --out "$OUT/train"
tail -n 1 "$OUT/train/loss.csv" | sed 's/^/last loss row (step,loss): /' | tee -a "$SUMMARY"
check "$SAMPLES samples, DPM-Solver++ 20 steps" "$PY" -m ddpm_cars sample --checkpoint "$OUT/train" --sampler dpm++ --steps 20 \
    --num-images "$SAMPLES" --batch-size "$SAMPLES" --device "$DEVICE" --out "$OUT/samples"
check "one-process torchrun ($BACKEND)" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m ddpm_cars train \
    --preset tiny --toy-count 256 --steps 5 --num-sample-images 4 --no-compile --device "$DEVICE" --out "$OUT/torchrun"
echo "done: $SUMMARY"
