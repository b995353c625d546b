#!/usr/bin/env bash
# One command, one run, on whatever GPU the machine has (within 8 minutes on an H100, by design:
# the table stops starting rows at TABLE_BUDGET seconds):
#   1. synthetic DICOMs -> a series-aware training build and a test build (256 px, npy.gz)
#   2. the table (python -m ich_train.gpu_table): efficientnet_b0 and b2, fp32 / fp16 / bf16 (where
#      native), eager and --compile, 2D and --context 1: training img/s with the batch resident on
#      the GPU (the ceiling) and fed by the shard pipeline, inference and embed img/s, peak memory
#   3. ich-train bench with the DICOM-reading baseline (b/c), then ich-train fit on the GPU (--precision auto as the device resolves it, fused AdamW, pinned
#      memory, EMA, mid-epoch checkpoints, --average-last 2) and predict with avg.pt
#   4. one epoch under torch.cuda.set_sync_debug_mode("warn"): where the host waits for the GPU
#   5. with 2+ GPUs: the same fit through torchrun (NCCL), in fp16
#   6. the sequence stage, timed: a second fold's CNN, out-of-fold embed, seq fit, predict --seq
# It ends by printing the table (device name first) and the stage timings, ready to paste into
# docs/benchmarks.md; everything printed is in OUT/gpu_check.log, the tables in OUT/table.md.
# SMOKE=1: a CPU smoke run of the same steps at toy sizes (resnet10t, 32 px, no --compile, no test
# build), which CI runs (tests/test_gpu_check.py).
set -euo pipefail
OUT=${1:-gpu-check}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ "${SMOKE:-0}" = 1 ]; then
    PATIENTS=${PATIENTS:-10} SLICES=${SLICES:-3} SIZE=${SIZE:-32} BATCH=${BATCH:-4} STEPS=${STEPS:-1}
    WARMUP=${WARMUP:-1} MODELS=${MODELS:-resnet10t} EPOCHS=2 WORKERS=${WORKERS:-0}
fi
PATIENTS=${PATIENTS:-120} SLICES=${SLICES:-24} SIZE=${SIZE:-256} BATCH=${BATCH:-128}
STEPS=${STEPS:-20} WARMUP=${WARMUP:-5} MODELS=${MODELS:-efficientnet_b0 efficientnet_b2}
EPOCHS=${EPOCHS:-2} TABLE_BUDGET=${TABLE_BUDGET:-200}
CORES=$("$PY" -c 'import os; print(os.cpu_count())')
WORKERS=${WORKERS:-$((CORES > 1 ? CORES - 1 : 1))}
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
MODEL=${MODELS%% *}

mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "gpu_check: $CORES cores, $GPUS GPU(s), torch $("$PY" -c 'import torch; print(torch.__version__)')"
[ "$GPUS" -gt 0 ] && { nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader || true; }
STAGES="$OUT/stages.md"
printf '| stage | seconds |\n|---|---|\n' > "$STAGES"
timed() {  # timed NAME command...: run it, and add its wall time to the stage table
    local name=$1 t0 t1
    shift
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "| %s | %.1f |\n", n, b - a }' >> "$STAGES"
}

timed "synth $PATIENTS patients x $SLICES slices" \
    "$PY" -m ich_prep synth --out "$OUT/data" --patients "$PATIENTS" --slices "$SLICES"
timed "build $SIZE px ($CORES jobs)" "$PY" -m ich_prep build --dicom-dir "$OUT/data/stage_2_train" \
    --labels "$OUT/data/stage_2_train.csv" --out "$OUT/shards/train" --size "$SIZE" --jobs "$CORES" --quiet
TEST="$OUT/shards/train"  # smoke: predict on the training build (it warns and writes anyway)
if [ "${SMOKE:-0}" != 1 ]; then
    TEST="$OUT/shards/test"
    "$PY" -m ich_prep build --dicom-dir "$OUT/data/stage_2_test" --out "$TEST" --size "$SIZE" \
        --jobs "$CORES" --quiet
fi

COMPILE=()
[ "$GPUS" -gt 0 ] && COMPILE=(--compile)
# shellcheck disable=SC2086 # MODELS is a list of names
"$PY" -m ich_train.gpu_table --shards "$OUT/shards/train" --models $MODELS --batch "$BATCH" \
    --steps "$STEPS" --warmup "$WARMUP" --workers "$WORKERS" --budget-s "$TABLE_BUDGET" \
    "${COMPILE[@]}" --out "$OUT/table.md"

# the earlier targets b/a >= 0.95 and b/c >= 3: shard pipeline against the DICOM-reading baseline
timed "bench $MODEL with the DICOM baseline" "$PY" -m ich_train bench --shards "$OUT/shards/train" \
    --model "$MODEL" --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --workers "$WORKERS" \
    --loader-steps 20 --dicom-dir "$OUT/data/stage_2_train" --no-progress

FIT=(--shards "$OUT/shards/train" --valid-fold 4 --model "$MODEL" --batch-size "$BATCH"
     --lr 1e-3 --ema 0.99 --checkpoint-every 5 --workers "$WORKERS" --no-progress --no-report)
timed "fit $MODEL, $EPOCHS epochs (--average-last 2: + avg.pt)" "$PY" -m ich_train fit "${FIT[@]}" \
    --epochs "$EPOCHS" --average-last "$((EPOCHS > 1 ? 2 : 0))" --out "$OUT/runs/single"
CNN="$OUT/runs/single/best.pt"
[ -f "$OUT/runs/single/avg.pt" ] && CNN="$OUT/runs/single/avg.pt"
timed "predict (test build, hflip TTA)" "$PY" -m ich_train predict --checkpoint "$CNN" \
    --shards "$TEST" --out "$OUT/submission.csv" --tta hflip --workers "$WORKERS" --no-progress
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
    timed "fit through torchrun, $GPUS GPUs, fp16, 1 epoch" "$PY" -m torch.distributed.run --standalone \
        --nproc-per-node "$GPUS" -m ich_train fit "${FIT[@]}" --epochs 1 --precision fp16 \
        --workers $((WORKERS / GPUS > 0 ? WORKERS / GPUS : 1)) --out "$OUT/runs/ddp"
fi
# the sequence stage: a second fold's CNN, out-of-fold embeddings of both, a sequence model
# (smoke: the one CNN embeds both folds, not out of fold; 2 sequence epochs)
CNNS=("$OUT/runs/single/best.pt") OOF=() SEQ_EPOCHS=2 PROTOCOL=per-cnn
if [ "${SMOKE:-0}" != 1 ]; then
    timed "fit $MODEL fold 3, 1 epoch" "$PY" -m ich_train fit "${FIT[@]}" --epochs 1 --valid-fold 3 \
        --out "$OUT/runs/fold3"
    CNNS=("$OUT/runs/fold3/best.pt" "$OUT/runs/single/best.pt") OOF=(--oof) SEQ_EPOCHS=10 PROTOCOL=pooled
fi
timed "embed ${OOF[*]:-(in fold)}, folds 3 and 4" "$PY" -m ich_train embed --checkpoint "${CNNS[@]}" \
    "${OOF[@]}" --folds 3 4 --shards "$OUT/shards/train" --out "$OUT/oof.parquet" \
    --workers "$WORKERS" --no-progress
timed "seq fit, $SEQ_EPOCHS epochs" "$PY" -m ich_train seq fit --features "$OUT/oof.parquet" \
    --valid-fold 4 --epochs "$SEQ_EPOCHS" --protocol "$PROTOCOL" --out "$OUT/runs/seq4"
"$PY" -m ich_train seq evaluate --checkpoint "$OUT/runs/seq4/best.pt" --features "$OUT/oof.parquet" --fold 4
timed "predict --seq (embed the test build + sequence model)" "$PY" -m ich_train predict \
    --checkpoint "${CNNS[@]}" --seq "$OUT/runs/seq4/best.pt" --shards "$TEST" \
    --out "$OUT/submission_stage2.csv" --workers "$WORKERS" --no-progress
echo
printf '\n' >> "$OUT/table.md"
cat "$STAGES" >> "$OUT/table.md"
echo "gpu_check: the tables for docs/benchmarks.md ($OUT/table.md):"
echo
cat "$OUT/table.md"
