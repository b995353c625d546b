"""The demo's table: each recipe scored on every held-out fold pooled (the cross-validation score).

    python scripts/cv_table.py RUNS FOLD...

RUNS holds the runs of scripts/two_stage.sh for 2D (RUNS/2d) and 2.5D (RUNS/2.5d) CNNs: per fold k,
cnn<k>/oof_fold<k>.parquet (fit's best.pt) and seq<k>/seq_oof_fold<k>.parquet (seq evaluate).
The prior row predicts each fold's training frequencies; the competition metric is a mean over
images, so its pooled value is the image-weighted mean of the folds' prior losses (metrics.csv).
"vs 2D" is each row's loss relative to the 2D CNN's (-5.0%: 5% lower, better).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from ich_prep import LABELS
from ich_train.metrics import safe_auc, weighted_log_loss
from ich_train.report import PRED, read_predictions

ROWS = [
    ("2D CNN", "2d/cnn{k}/oof_fold{k}.parquet"),
    ("2.5D (--context 1)", "2.5d/cnn{k}/oof_fold{k}.parquet"),
    ("2D + sequence (bi-GRU)", "2d/seq{k}/seq_oof_fold{k}.parquet"),
    ("2.5D + sequence", "2.5d/seq{k}/seq_oof_fold{k}.parquet"),
]


def pooled(runs: str, pattern: str, folds: list[str]) -> pd.DataFrame:
    frames = [read_predictions(f"{runs}/{pattern.format(k=k)}")[0] for k in folds]
    frame = pd.concat(frames, ignore_index=True)
    if frame["image_id"].duplicated().any():
        sys.exit(f"cv_table.py: {pattern}: an image appears in two folds")
    return frame


def prior_loss(runs: str, folds: list[str]) -> tuple[float, int]:
    losses, sizes = [], []
    for k in folds:
        m = pd.read_csv(f"{runs}/2d/cnn{k}/metrics.csv")
        losses.append(float(m["prior_loss"].iloc[0]))
        sizes.append(len(read_predictions(f"{runs}/2d/cnn{k}/oof_fold{k}.parquet")[0]))
    return float(np.average(losses, weights=sizes)), int(sum(sizes))


def main(argv: list[str]) -> None:
    runs, folds = argv[0], argv[1:]
    loss, n = prior_loss(runs, folds)
    print(f"held-out folds {', '.join(folds)} pooled ({n} images; the cross-validation score):")
    print(f"  {'model':30s} {'weighted log loss':>17s} {'vs 2D':>7s} {'AUC any':>8s}")
    print(f"  {'prior (training frequencies)':30s} {loss:17.4f}")
    base = None
    for name, pattern in ROWS:
        f = pooled(runs, pattern, folds)
        y, p = f[list(LABELS)].to_numpy(), f[PRED].to_numpy()
        wll = weighted_log_loss(y, p)
        base = wll if base is None else base
        change = "" if wll is base else f"{wll / base - 1:+.1%}"
        print(f"  {name:30s} {wll:17.4f} {change:>7s} {safe_auc(y[:, 0], p[:, 0]):8.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
