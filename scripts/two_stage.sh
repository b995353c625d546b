#!/usr/bin/env bash
# The two-stage recipe over every fold, with ich-train alone (docs/training.md, "Series context"):
#   1. one CNN per validation fold k          ich-train fit --valid-fold k
#   2. embeddings, as PROTOCOL says:
#      per-cnn (default): each CNN k's of every fold   ich-train embed --checkpoint cnn<k>/best.pt
#      pooled: out of fold, one file           ich-train embed --oof (fold k by the CNN validated on k)
#   3. one sequence model per fold k          ich-train seq fit --valid-fold k --protocol PROTOCOL,
#                                             seq evaluate --fold k (fold k by CNN k either way)
#   4. with a test build: the stage-2 CSV      ich-train predict --seq ... --checkpoint ...
#      (pooled: every sequence model over every CNN; per-cnn: each over its own CNN)
# and a table: per fold and pooled over the folds (the cross-validation score), the CNN's and the
# sequence model's weighted log loss and AUC any.
#
#   scripts/two_stage.sh TRAIN_BUILD OUT [TEST_BUILD]
#   FOLDS="0 1 2 3 4" FIT_ARGS="--model efficientnet_b0 --epochs 10 ..." SEQ_ARGS="--epochs 30" \
#       PROTOCOL=per-cnn scripts/two_stage.sh shards/train runs/two_stage shards/test
#
# CNN_DIR=DIR takes the fold CNNs DIR/cnn<k>/best.pt of an earlier run instead of training them
# (FIT_ARGS unused), so one set of CNNs serves several PROTOCOL and SEQ_ARGS runs.
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
PROTOCOL=${PROTOCOL:-per-cnn}  # the default: it won on held-out folds (docs/training.md)
CNN_DIR=${CNN_DIR:-$OUT}

# the builds readable, FOLDS two or more distinct folds of the training build: before any work
# shellcheck disable=SC2086 # FOLDS is a list of fold numbers
"$BIN/python" - "$TRAIN" "$TEST" "$PROTOCOL" "$CNN_DIR" "$OUT" $FOLDS <<'EOF'
import os, sys
from ich_prep.errors import UserError
from ich_prep.manifest import open_build
from ich_train.embed_format import PROTOCOLS  # no torch: this runs before anything trains
train, test, protocol, cnn_dir, out, folds = *sys.argv[1:6], sys.argv[6:]
if protocol not in PROTOCOLS:
    sys.exit(f"two_stage.sh: PROTOCOL={protocol!r}: use one of {', '.join(PROTOCOLS)}")
missing = [f"{cnn_dir}/cnn{k}/best.pt" for k in folds if not os.path.isfile(f"{cnn_dir}/cnn{k}/best.pt")]
if cnn_dir != out and missing:
    sys.exit(f"two_stage.sh: CNN_DIR={cnn_dir!r} lacks {missing[0]}; give the OUT of an earlier run, or leave CNN_DIR unset to train the CNNs")
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

# run_folds PREFIX COMMAND...: COMMAND --valid-fold k --out $OUT/PREFIXk for every fold k (@K@ in
# COMMAND becomes k), with --resume for a fold stopped part-way; a finished fold is skipped
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
            "${@//@K@/$k}" --valid-fold "$k" --out "$OUT/$prefix$k" "${resume[@]}"
        fi
        i=$((i + 1))
    done
}

if [ "$CNN_DIR" = "$OUT" ]; then
    # shellcheck disable=SC2086 # FIT_ARGS is a list of flags
    run_folds cnn "$BIN/ich-train" fit --shards "$TRAIN" $FIT_ARGS
fi
cnns=()
for k in $FOLDS; do cnns+=("$CNN_DIR/cnn$k/best.pt"); done

# the features of fold k's sequence model: $OUT/oof.parquet (pooled) or $OUT/emb<k>.parquet
if [ "$PROTOCOL" = per-cnn ]; then
    for k in $FOLDS; do
        # shellcheck disable=SC2086 # FOLDS is a list of fold numbers
        "$BIN/ich-train" embed --checkpoint "$CNN_DIR/cnn$k/best.pt" --shards "$TRAIN" --folds $FOLDS \
            --out "$OUT/emb$k.parquet"
    done
    features="$OUT/emb@K@.parquet"
else
    # shellcheck disable=SC2086 # FOLDS is a list of fold numbers
    "$BIN/ich-train" embed --checkpoint "${cnns[@]}" --shards "$TRAIN" --oof --folds $FOLDS \
        --out "$OUT/oof.parquet"
    features="$OUT/oof.parquet"
fi

# shellcheck disable=SC2086 # SEQ_ARGS is a list of flags
run_folds seq "$BIN/ich-train" seq fit --features "$features" --protocol "$PROTOCOL" $SEQ_ARGS
seqs=()
for k in $FOLDS; do
    "$BIN/ich-train" seq evaluate --checkpoint "$OUT/seq$k/best.pt" --features "${features//@K@/$k}" \
        --fold "$k" > "$OUT/seq$k/evaluate.json"
    seqs+=("$OUT/seq$k/best.pt")
done

# shellcheck disable=SC2086 # FOLDS is a list of fold numbers
"$BIN/python" - "$OUT" "$features" $FOLDS <<'EOF'
import json, sys
out, features, folds = sys.argv[1], sys.argv[2], sys.argv[3:]
def num(v, spec):
    return "n/a" if v is None else format(v, spec)
def row(name, cnn_loss, loss, cnn_auc, auc):
    print(f"{name:>6}  {num(cnn_loss, '9.4f'):>9}  {num(loss, '10.4f'):>10}  {loss / cnn_loss - 1:+7.1%}  "
          f"{num(cnn_auc, '11.3f'):>11}  {num(auc, '13.3f'):>13}")
print(f"{'fold':>6}  {'CNN loss':>9}  {'+ seq loss':>10}  {'change':>7}  {'CNN AUC any':>11}  {'+ seq AUC any':>13}")
cnn, seq = [], []
for k in folds:
    m = json.load(open(f"{out}/seq{k}/evaluate.json"))
    row(k, m["cnn_loss"], m["valid_loss"], m["cnn_auc_any"], m["valid_auc_any"])
    seq.append(m.get("predictions"))
if None in seq:  # no out-of-fold predictions to pool
    sys.exit(0)
import numpy as np, pandas as pd
from ich_prep import LABELS
from ich_train.metrics import safe_auc, weighted_log_loss
from ich_train.seq_data import read_embeddings
for k in folds:
    for s in read_embeddings(features.replace("@K@", k))[0]:  # fold k: by CNN k (seq evaluate checked)
        if s.fold == int(k):
            cnn.append(pd.DataFrame(1 / (1 + np.exp(-s.logits)), index=s.ids, columns=LABELS))
seq = pd.concat(map(pd.read_parquet, seq)).set_index("image_id")
p_cnn = pd.concat(cnn).loc[seq.index].to_numpy()
y, p = seq[list(LABELS)].to_numpy(), seq[[f"pred_{lab}" for lab in LABELS]].to_numpy()
row("pooled", weighted_log_loss(y, p_cnn), weighted_log_loss(y, p), safe_auc(y[:, 0], p_cnn[:, 0]), safe_auc(y[:, 0], p[:, 0]))
EOF

if [ -n "$TEST" ]; then
    "$BIN/ich-train" predict --checkpoint "${cnns[@]}" --seq "${seqs[@]}" --shards "$TEST" \
        --out "$OUT/submission_stage2.csv"
fi
