#!/usr/bin/env bash
# The two-stage recipe over every fold, with ich-train alone (docs/training.md, "Series context"):
#   1. one CNN per validation fold k          ich-train fit --valid-fold k
#   2. out-of-fold embeddings                 ich-train embed --oof (fold k by the CNN validated on k)
#   3. one sequence model per fold k          ich-train seq fit --valid-fold k, seq evaluate --fold k
#   4. with a test build: the stage-2 CSV      ich-train predict --seq ... --checkpoint ...
# and a table: per fold, the CNN's and the sequence model's weighted log loss and AUC any.
#
#   scripts/two_stage.sh TRAIN_BUILD OUT [TEST_BUILD]
#   FOLDS="0 1 2 3 4" FIT_ARGS="--model efficientnet_b0 --epochs 10 ..." SEQ_ARGS="--epochs 30" \
#       scripts/two_stage.sh shards/train runs/two_stage shards/test
#
# The builds and FOLDS are checked before anything trains. A fold whose CNN (cnn<k>/last.pt) or
# sequence model (seq<k>/last.pt) has all its epochs is not trained again, one stopped part-way is
# continued (--resume), so a stopped run is continued by running the same command.
set -euo pipefail
TRAIN=${1:?usage: two_stage.sh TRAIN_BUILD OUT [TEST_BUILD]}
OUT=${2:?usage: two_stage.sh TRAIN_BUILD OUT [TEST_BUILD]}
TEST=${3:-}
BIN=${BIN:-.venv/bin}
FOLDS=${FOLDS:-0 1 2 3 4}
FIT_ARGS=${FIT_ARGS:-}
SEQ_ARGS=${SEQ_ARGS:-}

# the builds readable, FOLDS two or more distinct folds of the training build: before any work
# shellcheck disable=SC2086 # FOLDS is a list of fold numbers
"$BIN/python" - "$TRAIN" "$TEST" $FOLDS <<'EOF'
import sys
from ich_prep.errors import UserError
from ich_prep.manifest import open_build
train, test, folds = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    have = sorted({s.fold for s in open_build(train).shards if s.samples > 0 and s.fold >= 0})
    if test:
        open_build(test)
except UserError as e:
    sys.exit(f"two_stage.sh: {e}")
if len(folds) < 2 or len(set(folds)) != len(folds) or any(f not in map(str, have) for f in folds):
    sys.exit(f"two_stage.sh: FOLDS={' '.join(folds)!r}: give two or more distinct folds of {train}, whose folds are {have}")
EOF
mkdir -p "$OUT"

# new | partial | done per fold of run folders $OUT/<prefix><k>, from their last.pt: done when it
# holds the run's last epoch (ich-train fit: and no progress inside an epoch)
states() {
    "$BIN/python" - "$@" <<'EOF'
import os, sys, torch
out, prefix, folds = sys.argv[1], sys.argv[2], sys.argv[3:]
def state(path):
    if not os.path.lexists(path):
        return "new"
    if not os.path.isfile(path):  # a FIFO would hang the read: --resume refuses it in one line
        return "partial"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        done = ck["epoch"] + 1 >= ck["config"]["epochs"] and "epoch_progress" not in ck
    except Exception:  # not readable here: --resume says what is wrong in one line
        return "partial"
    return "done" if done else "partial"
print(" ".join(state(os.path.join(out, f"{prefix}{k}", "last.pt")) for k in folds))
EOF
}

# run_folds PREFIX COMMAND...: COMMAND --valid-fold k --out $OUT/PREFIXk for every fold k, with
# --resume for a fold stopped part-way; a finished fold is skipped
run_folds() {
    local prefix=$1 st k i=0
    shift
    # shellcheck disable=SC2086 # FOLDS is a list of fold numbers
    st=$(states "$OUT" "$prefix" $FOLDS)
    local -a state resume
    read -r -a state <<< "$st"
    for k in $FOLDS; do
        resume=()
        [ "${state[i]}" = partial ] && resume=(--resume)
        if [ "${state[i]}" != done ]; then
            "$@" --valid-fold "$k" --out "$OUT/$prefix$k" "${resume[@]}"
        fi
        i=$((i + 1))
    done
}

# shellcheck disable=SC2086 # FIT_ARGS is a list of flags
run_folds cnn "$BIN/ich-train" fit --shards "$TRAIN" $FIT_ARGS
cnns=()
for k in $FOLDS; do cnns+=("$OUT/cnn$k/best.pt"); done

# shellcheck disable=SC2086 # FOLDS is a list of fold numbers
"$BIN/ich-train" embed --checkpoint "${cnns[@]}" --shards "$TRAIN" --oof --folds $FOLDS \
    --out "$OUT/oof.parquet"

# shellcheck disable=SC2086 # SEQ_ARGS is a list of flags
run_folds seq "$BIN/ich-train" seq fit --features "$OUT/oof.parquet" $SEQ_ARGS
seqs=()
for k in $FOLDS; do
    "$BIN/ich-train" seq evaluate --checkpoint "$OUT/seq$k/best.pt" --features "$OUT/oof.parquet" \
        --fold "$k" > "$OUT/seq$k/evaluate.json"
    seqs+=("$OUT/seq$k/best.pt")
done

"$BIN/python" - "$OUT" $FOLDS <<'EOF'
import json, sys
out, folds = sys.argv[1], sys.argv[2:]
def num(v, spec):
    return "n/a" if v is None else format(v, spec)
print(f"{'fold':>4}  {'CNN loss':>9}  {'+ seq loss':>10}  {'change':>7}  {'CNN AUC any':>11}  {'+ seq AUC any':>13}")
for k in folds:
    m = json.load(open(f"{out}/seq{k}/evaluate.json"))
    change = m["valid_loss"] / m["cnn_loss"] - 1
    print(f"{k:>4}  {num(m['cnn_loss'], '9.4f'):>9}  {num(m['valid_loss'], '10.4f'):>10}  {change:+7.1%}  "
          f"{num(m['cnn_auc_any'], '11.3f'):>11}  {num(m['valid_auc_any'], '13.3f'):>13}")
EOF

if [ -n "$TEST" ]; then
    "$BIN/ich-train" predict --checkpoint "${cnns[@]}" --seq "${seqs[@]}" --shards "$TEST" \
        --out "$OUT/submission_stage2.csv"
fi
