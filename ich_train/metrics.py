"""The RSNA 2019 competition metric and per-label diagnostics."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import roc_auc_score

from ich_prep import LABELS
from ich_prep.errors import UserError

# Competition weights: 'any' counts twice, each subtype once.
LABEL_WEIGHTS = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
EPS = 1e-15


class DivergedError(UserError, FloatingPointError):
    """Training became NaN or infinite: the learning rate or warmup is the usual cause."""


def check_diverged(probs: np.ndarray) -> None:
    """DivergedError when a model's validation predictions are not all finite: its weights became
    NaN or infinite in training (fit and seq fit, an --lr or --weight-decay far too large)."""
    if not np.isfinite(np.asarray(probs, dtype=np.float64)).all():
        raise DivergedError(
            "training diverged: the model's validation predictions became NaN or infinite; lower "
            "--lr or --weight-decay and start a new --out"
        )


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(LABELS):
        raise ValueError(
            f"labels {y.shape} and probabilities {p.shape} must both be (N, {len(LABELS)})"
        )
    if len(y) == 0:
        raise ValueError("no images to score")
    if np.isnan(y).any():
        raise ValueError("labels contain NaN (unlabelled images); score a labelled fold")
    return y, np.clip(p, EPS, 1 - EPS)


def label_log_loss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(N, 6) elementwise binary log loss with probabilities clipped to [1e-15, 1 - 1e-15]."""
    y, p = _check(y, p)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def weighted_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Per image sum(w_j * logloss_j) / sum(w), averaged over images (w = 2 for any, 1 otherwise)."""
    ll = label_log_loss(y, p)
    return float((ll @ LABEL_WEIGHTS / LABEL_WEIGHTS.sum()).mean())


def safe_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC, or nan when only one class is present."""
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def compute_metrics(y: np.ndarray, p: np.ndarray, prefix: str = "valid_") -> dict[str, float]:
    """Competition loss, per-label log loss and AUC, and the mean AUC over labels that have both classes."""
    ll = label_log_loss(y, p)
    y = np.asarray(y, dtype=np.float64)
    out = {f"{prefix}loss": float((ll @ LABEL_WEIGHTS / LABEL_WEIGHTS.sum()).mean())}
    aucs = []
    for j, name in enumerate(LABELS):
        out[f"{prefix}logloss_{name}"] = float(ll[:, j].mean())
        aucs.append(safe_auc(y[:, j], np.asarray(p)[:, j]))
        out[f"{prefix}auc_{name}"] = aucs[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan mean
        out[f"{prefix}auc_mean"] = float(np.nanmean(aucs))
    return out


def label_prior(y_train: np.ndarray) -> np.ndarray:
    """Each label's frequency in the training labels: the constant-prediction baseline."""
    y = np.asarray(y_train, dtype=np.float64)
    if len(y) == 0:
        raise ValueError("no training labels to compute a prior from")
    return y.mean(axis=0)


def prior_baseline_loss(y_train: np.ndarray, y_valid: np.ndarray) -> float:
    """Weighted log loss on y_valid of predicting the training frequency of every label."""
    prior = label_prior(y_train)
    return weighted_log_loss(y_valid, np.broadcast_to(prior, np.shape(y_valid)))
