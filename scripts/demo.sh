#!/usr/bin/env bash
# End-to-end demo on a synthetic RSNA-like set (CPU): synth -> build -> the two-stage recipe
# (scripts/two_stage.sh) twice over folds 0-2, once with 2D resnet18 CNNs and once with 2.5D
# ones (--context 1): a CNN per fold, out-of-fold embeddings, a sequence model per fold ->
# a table pooled over every held-out fold: prior, 2D, 2.5D, 2D + sequence, 2.5D + sequence ->
# the stage-2 submission of the 2.5D + sequence recipe, and where the evaluation report is.
set -euo pipefail
DEMO=${1:-demo}
BIN=${BIN:-.venv/bin}
# the set: PATIENTS x SLICES, SEED (the larger set of docs/training.md: PATIENTS=150 SLICES=12 SEED=1)
PATIENTS=${PATIENTS:-60} SLICES=${SLICES:-8} SEED=${SEED:-0}
rm -rf "$DEMO"
say() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }
say "synthetic DICOMs"
"$BIN/ich-prep" synth --out "$DEMO/data" --patients "$PATIENTS" --slices "$SLICES" --seed "$SEED" > "$DEMO.synth.json"
mv "$DEMO.synth.json" "$DEMO/data/synth.json"
say "compile the training and test DICOMs into shards"
"$BIN/ich-prep" build --dicom-dir "$DEMO/data/stage_2_train" --labels "$DEMO/data/stage_2_train.csv" \
    --out "$DEMO/shards/train" --size 96 --shard-size 64 --folds 3
"$BIN/ich-prep" build --dicom-dir "$DEMO/data/stage_2_test" --out "$DEMO/shards/test" --size 96 --shard-size 64

# resnet18 from scratch: efficientnet_b0 from scratch stays at the prior on this little data
# (docs/training.md, "Learning on small data"); pretrained weights are the real recipe
FIT_ARGS=${FIT_ARGS:-"--model resnet18 --image-size 64 --epochs 12 --batch-size 32 --lr 1e-3 --workers 0"}
SEQ_ARGS=${SEQ_ARGS:-"--epochs 20 --hidden 64"}
# 2D, then 2.5D (each slice with its neighbours as channels): one CNN per fold (each ends with its
# out-of-fold predictions and report), out-of-fold embeddings, one sequence model per fold
say "2D: a CNN per fold, then a sequence model per fold"
FOLDS="0 1 2" FIT_ARGS="$FIT_ARGS" SEQ_ARGS="$SEQ_ARGS" BIN="$BIN" \
    bash "$(dirname "$0")/two_stage.sh" "$DEMO/shards/train" "$DEMO/runs/2d" | tee "$DEMO/2d.log"
say "2.5D (--context 1): a CNN per fold, then a sequence model per fold, and the stage-2 submission"
FOLDS="0 1 2" FIT_ARGS="$FIT_ARGS --context 1" SEQ_ARGS="$SEQ_ARGS" BIN="$BIN" \
    bash "$(dirname "$0")/two_stage.sh" "$DEMO/shards/train" "$DEMO/runs/2.5d" "$DEMO/shards/test" \
    | tee "$DEMO/2.5d.log"

echo
"$BIN/python" "$(dirname "$0")/cv_table.py" "$DEMO/runs" 0 1 2
echo "report of the 2.5D CNN on fold 2: $DEMO/runs/2.5d/cnn2/report_fold2/report.html (metrics.csv and PNGs beside it)"
echo "stage-2 submission: $DEMO/runs/2.5d/submission_stage2.csv (3 fold 2.5D CNNs x 3 sequence models)"
