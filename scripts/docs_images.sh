#!/usr/bin/env bash
# Redraw every picture in docs/img (`make docs-images`) with the commands README.md and
# docs/sharing.md show beside them, and print the numbers those texts quote, so both can be
# checked against each other:
#   the README's synthetic build   ich-prep synth --out data --patients 40 --slices 8
#                                  ich-prep build ... --out shards/train --shard-size 64
#   docs/img/preview.png           ich-prep preview shards/train --n 12 --out preview.png
#   docs/img/series.png            ich-prep preview shards/train --series ID --panel 80 (the series
#                                  with the longest bleed: most slices positive for one subtype)
#   docs/img/report.png            the ROC figure of the report that ich-train fit writes for its
#                                  validation fold (roc.png), the demo's FIT_ARGS on fold 0
# CPU only, a few minutes on 2 cores, one torch thread (OMP_NUM_THREADS=1: the fit's numbers are
# those of that thread count). Works in a new temporary folder, removed at the end.
set -euo pipefail
export OMP_NUM_THREADS=1
BIN=$(cd "${BIN:-.venv/bin}" && pwd)
IMG=$(cd "$(dirname "$0")/../docs/img" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/docs-images.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
say() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

say "the README's synthetic build"
"$BIN/ich-prep" synth --out data --patients 40 --slices 8
"$BIN/ich-prep" build --dicom-dir data/stage_2_train --labels data/stage_2_train.csv \
    --out shards/train --shard-size 64

say "docs/img/preview.png"
"$BIN/ich-prep" preview shards/train --n 12 --out preview.png
cp preview.png "$IMG/preview.png"

say "docs/img/series.png"
SERIES=$("$BIN/python" - <<'EOF'
import pandas as pd
from ich_prep import LABELS
ok = pd.read_parquet("shards/train/index.parquet").query("status == 'ok'")
longest = ok.groupby("series_id")[list(LABELS[1:])].sum().max(axis=1)
print(longest[longest == longest.max()].sort_index().index[0])
EOF
)
"$BIN/ich-prep" preview shards/train --series "$SERIES" --panel 80 --out series.png
cp series.png "$IMG/series.png"
echo "series $SERIES, its labels in slice order:"
"$BIN/python" - "$SERIES" <<'EOF'
import sys
import pandas as pd
from ich_prep import LABELS
ok = pd.read_parquet("shards/train/index.parquet").query("status == 'ok'")
rows = ok[ok["series_id"] == sys.argv[1]].sort_values("slice_rank")
for _, r in rows.iterrows():
    pos = [k for k in LABELS[1:] if r[k] == 1]
    print(f"  slice {int(r['slice_rank'])}: {', '.join(pos) or 'negative'}")
EOF

say "docs/img/report.png"
"$BIN/ich-train" fit --shards shards/train --valid-fold 0 --out runs/f0 --model resnet18 \
    --image-size 64 --epochs 12 --batch-size 32 --lr 1e-3 --workers 0 --no-progress
cp runs/f0/report_fold0/roc.png "$IMG/report.png"
"$BIN/python" - <<'EOF'
import pandas as pd
m = pd.read_csv("runs/f0/report_fold0/metrics.csv")
cols = ["fold", "label", "n", "positives", "log_loss", "roc_auc"]
print(m[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
EOF
echo
echo "redrawn: $IMG/preview.png $IMG/series.png $IMG/report.png"
