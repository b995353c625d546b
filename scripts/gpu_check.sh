#!/usr/bin/env bash
# What this project has not yet run on a GPU, in one command, for a machine with one or more GPUs:
#   1. synthetic DICOMs -> shards (256 px, npy.gz)
#   2. ich-train bench, eager and compiled: (a) resident, (b) shards, (c) DICOM loader, b/a, b/c
#   3. ich-train fit on the GPU: bf16 autocast, fused CUDA AdamW, pinned memory, EMA, mid-epoch
#      checkpoints; then predict
#   4. one epoch under torch.cuda.set_sync_debug_mode("warn"): where the host waits for the GPU
#   5. with 2+ GPUs: the same fit through torchrun (NCCL)
#   6. series context: a 2.5D fit (--context 1, 9 channels), out-of-fold embeddings of two fold
#      CNNs (embed --oof), a sequence model on the GPU (seq fit / evaluate) and the stage-2 predict
# Every printed line goes to OUT/gpu_check.log. Sizes come from the environment; the defaults suit a
# 16-core H100 machine. On a CPU, for a smoke run: PATIENTS=6 SLICES=4 BATCH=8 STEPS=2 SIZE=64.
set -euo pipefail
OUT=${1:-gpu-check}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PATIENTS=${PATIENTS:-300} SLICES=${SLICES:-30} SIZE=${SIZE:-256}
BATCH=${BATCH:-256} STEPS=${STEPS:-50} WARMUP=${WARMUP:-10} MODEL=${MODEL:-efficientnet_b0}
CORES=$("$PY" -c 'import os; print(os.cpu_count())')
WORKERS=${WORKERS:-$((CORES > 1 ? CORES - 1 : 1))}
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "gpu_check: $CORES cores, $GPUS GPU(s), $("$PY" -c 'import torch; print(torch.__version__)')"
[ "$GPUS" -gt 0 ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

"$PY" -m ich_prep synth --out "$OUT/data" --patients "$PATIENTS" --slices "$SLICES"
"$PY" -m ich_prep build --dicom-dir "$OUT/data/stage_2_train" --labels "$OUT/data/stage_2_train.csv" \
    --out "$OUT/shards/train" --size "$SIZE" --jobs "$CORES" --quiet
"$PY" -m ich_prep build --dicom-dir "$OUT/data/stage_2_test" --out "$OUT/shards/test" --size "$SIZE" \
    --jobs "$CORES" --quiet

for compiled in "" --compile; do
    "$PY" -m ich_train bench --shards "$OUT/shards/train" --model "$MODEL" --batch-size "$BATCH" \
        --steps "$STEPS" --warmup "$WARMUP" --workers "$WORKERS" --dicom-dir "$OUT/data/stage_2_train" \
        --no-progress $compiled
done

FIT=(--shards "$OUT/shards/train" --valid-fold 4 --model "$MODEL" --epochs 2 --batch-size "$BATCH"
     --lr 1e-3 --ema 0.99 --checkpoint-every 5 --workers "$WORKERS" --no-progress)
"$PY" -m ich_train fit "${FIT[@]}" --out "$OUT/runs/single"
"$PY" -m ich_train predict --checkpoint "$OUT/runs/single/best.pt" --shards "$OUT/shards/test" \
    --out "$OUT/submission.csv" --tta hflip --workers "$WORKERS" --no-progress
if [ "$GPUS" -gt 0 ]; then
    # Host-device syncs: torch warns at each one. Expected: one per 10 steps (the loss shown on the
    # bar), a few per epoch (metrics, checkpoints); one per batch would starve the GPU.
    "$PY" - fit "${FIT[@]}" --epochs 1 --out "$OUT/runs/syncs" 2>&1 <<'PY' | tail -n 3
import sys, warnings, torch
from ich_train.cli import main
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    main(sys.argv[1:])
where = {}
for w in caught:
    if "synchroniz" in str(w.message):
        where[f"{w.filename}:{w.lineno}"] = where.get(f"{w.filename}:{w.lineno}", 0) + 1
print("host-device syncs during one epoch, by line:", where)
PY
fi
if [ "$GPUS" -ge 2 ]; then
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m ich_train fit "${FIT[@]}" \
        --workers $((WORKERS / GPUS > 0 ? WORKERS / GPUS : 1)) --out "$OUT/runs/ddp"
fi
# series context: 2.5D, embed, sequence stage (timed: the docs' cost table comes from these)
"$PY" -m ich_train fit "${FIT[@]}" --epochs 1 --context 1 --out "$OUT/runs/context1"
"$PY" -m ich_train fit "${FIT[@]}" --epochs 1 --valid-fold 3 --out "$OUT/runs/fold3"
CNNS=("$OUT/runs/fold3/best.pt" "$OUT/runs/single/best.pt")
time "$PY" -m ich_train embed --checkpoint "${CNNS[@]}" --oof --folds 3 4 --shards "$OUT/shards/train" \
    --out "$OUT/oof.parquet" --workers "$WORKERS" --no-progress
time "$PY" -m ich_train seq fit --features "$OUT/oof.parquet" --valid-fold 4 --epochs 10 --out "$OUT/runs/seq4"
"$PY" -m ich_train seq evaluate --checkpoint "$OUT/runs/seq4/best.pt" --features "$OUT/oof.parquet" --fold 4
time "$PY" -m ich_train predict --checkpoint "${CNNS[@]}" --seq "$OUT/runs/seq4/best.pt" \
    --shards "$OUT/shards/test" --out "$OUT/submission_stage2.csv" --workers "$WORKERS" --no-progress
echo "gpu_check: done; the log is $OUT/gpu_check.log"
