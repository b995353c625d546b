#!/usr/bin/env bash
# End-to-end demo on a synthetic RSNA-like set: synth -> build -> fit -> evaluate -> predict (CPU, ~2 min).
set -euo pipefail
DEMO=${1:-demo}
BIN=${BIN:-.venv/bin}
rm -rf "$DEMO"
"$BIN/ich-prep" synth --out "$DEMO/data" --patients 40 --slices 8
"$BIN/ich-prep" build --dicom-dir "$DEMO/data/stage_2_train" --labels "$DEMO/data/stage_2_train.csv" \
    --out "$DEMO/shards/train" --size 128 --shard-size 64 --folds 5
"$BIN/ich-prep" build --dicom-dir "$DEMO/data/stage_2_test" --out "$DEMO/shards/test" --size 128 --shard-size 64
"$BIN/ich-train" fit --shards "$DEMO/shards/train" --valid-fold 4 --model resnet18 --image-size 96 \
    --epochs 6 --batch-size 32 --lr 2e-3 --out "$DEMO/runs/demo" | tee "$DEMO/fit.log"
"$BIN/ich-train" evaluate --checkpoint "$DEMO/runs/demo/best.pt" --shards "$DEMO/shards/train" --fold 4 \
    --out "$DEMO/runs/demo/oof-fold4.parquet"
"$BIN/ich-train" predict --checkpoint "$DEMO/runs/demo/best.pt" --shards "$DEMO/shards/test" \
    --out "$DEMO/submission.csv" --tta hflip
echo
grep '^done:' "$DEMO/fit.log"
echo "report: $DEMO/runs/demo/report-fold4/report.html (metrics.csv and the PNGs beside it)"
echo "submission: $DEMO/submission.csv"
