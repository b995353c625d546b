#!/usr/bin/env bash
# End-to-end demo on a synthetic RSNA-like set (CPU): synth -> build -> the two-stage recipe
# (scripts/two_stage.sh) over folds 0-2 twice, side by side (half the cores each): with 2D
# resnet18 CNNs and with 2.5D ones (--context 1): a CNN per fold, out-of-fold embeddings, a
# sequence model per fold -> a table pooled over every held-out fold: prior, 2D, 2.5D,
# 2D + sequence, 2.5D + sequence -> the stage-2 submission of the 2.5D + sequence recipe, and
# where the evaluation report is. Each stage ends with its wall and CPU time.
set -euo pipefail
DEMO=${1:-demo}
BIN=${BIN:-.venv/bin}
# the set: PATIENTS x SLICES, SEED (the larger set of docs/training.md: PATIENTS=150 SLICES=12 SEED=1)
PATIENTS=${PATIENTS:-60} SLICES=${SLICES:-8} SEED=${SEED:-0}
# resnet10t from scratch, batch 16: on a CPU a small model's step costs about the same at 48-64 px
# and most of it is per step, so the most updates per CPU second (docs/training.md, "2.5D on the
# synthetic set"); pretrained weights are the real recipe
FIT_ARGS=${FIT_ARGS:-"--model resnet10t --image-size 64 --epochs 12 --batch-size 16 --lr 1e-3 --workers 0"}
SEQ_ARGS=${SEQ_ARGS:-"--epochs 20 --hidden 64"}
# the two recipes train at once, each on half the cores (one each on 2 cores)
CORES=$(nproc 2> /dev/null || echo 2)
THREADS=${OMP_NUM_THREADS:-$(((CORES + 1) / 2))}
TIMEFORMAT="   took %0R s wall, %0U s user + %0S s sys CPU"
rm -rf "$DEMO"
say() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }
time {
    say "synthetic DICOMs: $PATIENTS patients x $SLICES slices, seed $SEED"
    time {
        "$BIN/ich-prep" synth --out "$DEMO/data" --patients "$PATIENTS" --slices "$SLICES" \
            --seed "$SEED"
    }
    say "compile the training and test DICOMs into shards"
    time {
        "$BIN/ich-prep" build --dicom-dir "$DEMO/data/stage_2_train" \
            --labels "$DEMO/data/stage_2_train.csv" --out "$DEMO/shards/train" --size 96 \
            --shard-size 64 --folds 3
        "$BIN/ich-prep" build --dicom-dir "$DEMO/data/stage_2_test" --out "$DEMO/shards/test" \
            --size 96 --shard-size 64
    }
    # 2D, and 2.5D (each slice with its neighbours as channels): one CNN per fold (each ends with
    # its out-of-fold predictions and report), out-of-fold embeddings, one sequence model per fold
    say "2D and 2.5D (--context 1) at once, $THREADS thread(s) each: a CNN per fold, then a sequence model per fold (follow: tail -f $DEMO/2d.log $DEMO/2.5d.log)"
    time {
        { time OMP_NUM_THREADS=$THREADS FOLDS="0 1 2" FIT_ARGS="$FIT_ARGS" SEQ_ARGS="$SEQ_ARGS" \
            BIN="$BIN" bash "$(dirname "$0")/two_stage.sh" "$DEMO/shards/train" "$DEMO/runs/2d"; } \
            > "$DEMO/2d.log" 2>&1 &
        p2d=$!
        { time OMP_NUM_THREADS=$THREADS FOLDS="0 1 2" FIT_ARGS="$FIT_ARGS --context 1" \
            SEQ_ARGS="$SEQ_ARGS" BIN="$BIN" bash "$(dirname "$0")/two_stage.sh" \
            "$DEMO/shards/train" "$DEMO/runs/2.5d" "$DEMO/shards/test"; } > "$DEMO/2.5d.log" 2>&1 &
        p25d=$!
        failed=""
        wait "$p2d" || failed="$failed $DEMO/2d.log"
        wait "$p25d" || failed="$failed $DEMO/2.5d.log"
        if [ -n "$failed" ]; then
            echo "demo.sh: a recipe failed; its log:$failed" >&2
            exit 1
        fi
    }
    for run in 2d 2.5d; do
        say "$run: per held-out fold, the CNN and the sequence model over its embeddings ($DEMO/$run.log)"
        grep -A4 '^ *fold  ' "$DEMO/$run.log"
        tail -n 1 "$DEMO/$run.log"
    done
    say "the recipes on every held-out fold pooled"
    "$BIN/python" "$(dirname "$0")/cv_table.py" "$DEMO/runs" 0 1 2
    echo "report of the 2.5D CNN on fold 2: $DEMO/runs/2.5d/cnn2/report_fold2/report.html (metrics.csv and PNGs beside it)"
    echo "stage-2 submission: $DEMO/runs/2.5d/submission_stage2.csv (each of the 3 fold 2.5D CNNs with its own sequence model)"
    printf '\n== the whole demo\n'
}
