"""The competition metric and its per-label diagnostics."""

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss

from ich_train.metrics import (
    LABEL_WEIGHTS,
    compute_metrics,
    label_prior,
    prior_baseline_loss,
    weighted_log_loss,
)


def _random(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 6)) < 0.3).astype(float), rng.random((n, 6))


def test_weighted_log_loss_matches_sklearn_with_sample_weights():
    """Per-image weighted mean then mean over images equals sklearn's weighted log loss."""
    y, p = _random()
    w = np.tile(LABEL_WEIGHTS, (len(y), 1))
    expected = log_loss(y.ravel(), p.ravel(), sample_weight=w.ravel(), labels=[0, 1])
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-12)


def test_any_counts_twice():
    """An error on 'any' costs twice an equal error on a subtype."""
    y = np.zeros((1, 6))
    p_any, p_sub = np.full((1, 6), 1e-9), np.full((1, 6), 1e-9)
    p_any[0, 0], p_sub[0, 1] = 0.5, 0.5
    base = weighted_log_loss(y, np.full((1, 6), 1e-9))
    assert weighted_log_loss(y, p_any) - base == pytest.approx(
        2 * (weighted_log_loss(y, p_sub) - base)
    )


def test_probabilities_are_clipped_to_1e15():
    """A confident wrong 0 or 1 costs -log(1e-15), not infinity."""
    y = np.ones((1, 6))
    assert weighted_log_loss(y, np.zeros((1, 6))) == pytest.approx(-math.log(1e-15), rel=1e-6)


def test_auc_is_nan_for_a_label_with_one_class_and_mean_skips_it():
    """A label with no positives gets AUC nan; auc_mean averages the others."""
    y, p = _random()
    y[:, 1] = 0
    m = compute_metrics(y, p)
    assert math.isnan(m["valid_auc_epidural"])
    others = [
        m[f"valid_auc_{k}"]
        for k in ("any", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
    ]
    assert m["valid_auc_mean"] == pytest.approx(np.mean(others))


def test_prior_baseline_is_the_loss_of_training_frequencies():
    """The baseline predicts each label's training frequency for every image."""
    y_train, _ = _random(seed=1)
    y_valid, _ = _random(seed=2)
    prior = label_prior(y_train)
    assert prior == pytest.approx(y_train.mean(0))
    assert prior_baseline_loss(y_train, y_valid) == pytest.approx(
        weighted_log_loss(y_valid, np.tile(prior, (200, 1)))
    )


def test_unlabelled_rows_are_refused():
    """NaN labels (a test build) raise instead of scoring silently."""
    y, p = _random()
    y[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        weighted_log_loss(y, p)
