#!/usr/bin/env bash
# End-to-end demo on a synthetic RSNA-like set (CPU, 4 min on 2 quiet cores): synth -> build ->
# efficientnet_b0 per fold (2D) -> out-of-fold embeddings -> sequence model per fold -> 2.5D
# (--context 1) -> a table on the held-out fold 2: prior, 2D, 2.5D, 2D + sequence -> the stage-2
# submission, and where the evaluation report is.
set -euo pipefail
DEMO=${1:-demo}
BIN=${BIN:-.venv/bin}
rm -rf "$DEMO"
"$BIN/ich-prep" synth --out "$DEMO/data" --patients 60 --slices 8
"$BIN/ich-prep" build --dicom-dir "$DEMO/data/stage_2_train" --labels "$DEMO/data/stage_2_train.csv" \
    --out "$DEMO/shards/train" --size 96 --shard-size 64 --folds 3
"$BIN/ich-prep" build --dicom-dir "$DEMO/data/stage_2_test" --out "$DEMO/shards/test" --size 96 --shard-size 64

FIT_ARGS="--model efficientnet_b0 --image-size 96 --epochs 6 --batch-size 32 --lr 1e-3 --workers 1 --no-progress"
# 2D: one efficientnet_b0 per fold (each ends with its report); 2D + sequence: the two-stage
# recipe over folds 0-2 (scripts/two_stage.sh), with the stage-2 submission for the test build
FOLDS="0 1 2" FIT_ARGS="$FIT_ARGS" SEQ_ARGS="--epochs 20 --hidden 64" BIN="$BIN" \
    bash "$(dirname "$0")/two_stage.sh" "$DEMO/shards/train" "$DEMO/runs" "$DEMO/shards/test" | tee "$DEMO/two_stage.log"
# 2.5D: the same model and fold with each slice's neighbours as channels
# shellcheck disable=SC2086 # FIT_ARGS is a list of flags
"$BIN/ich-train" fit --shards "$DEMO/shards/train" --valid-fold 2 --context 1 $FIT_ARGS --no-report \
    --out "$DEMO/runs/context1" | tee "$DEMO/context1.log"

echo
"$BIN/python" - "$DEMO" <<'PY'
import json, sys
import pandas as pd
demo = sys.argv[1]
def best(run):  # best.pt's epoch: the lowest validation loss in the run's metrics.csv
    m = pd.read_csv(f"{demo}/runs/{run}/metrics.csv")
    return m.loc[m["valid_loss"].idxmin()]
d2, d25 = best("cnn2"), best("context1")
seq = json.load(open(f"{demo}/runs/seq2/evaluate.json"))
rows = [("prior (training frequencies)", d2["prior_loss"], None),
        ("2D efficientnet_b0", d2["valid_loss"], d2["valid_auc_any"]),
        ("2.5D (--context 1)", d25["valid_loss"], d25["valid_auc_any"]),
        ("2D + sequence (bi-GRU)", seq["valid_loss"], seq["valid_auc_any"])]
print(f"held-out fold 2 ({seq['images']} images, {seq['series']} series):")
print(f"  {'model':30s} {'weighted log loss':>17s} {'AUC any':>8s}")
for name, loss, auc in rows:
    shown = "" if auc is None or auc != auc else format(auc, ".3f")
    print(f"  {name:30s} {loss:17.4f} {shown:>8s}")
PY
echo "report of the 2D model on fold 2: $DEMO/runs/cnn2/report_fold2/report.html (metrics.csv and PNGs beside it)"
echo "stage-2 submission: $DEMO/runs/submission_stage2.csv (3 fold CNNs x 3 sequence models)"
