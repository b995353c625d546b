"""Which training samples an epoch draws.

`natural` (the default): every pass of a loader is a permutation of all training samples, so an
epoch sees the data at its natural prevalence. `balanced` (--sampler balanced --pos-fraction F):
each epoch is a multiset of exactly `n` sample indices, round(F x n) of them positive for `any`,
the rest negative, decided from the index's labels alone and the (seed, epoch): the same on
every rank, every loader worker and after a resume. A pool smaller than its share is drawn in
whole seeded permutations back to back (oversampling: each positive floor(k/P) or ceil(k/P) times), a
larger one as a seeded subset without replacement (undersampling, another subset every epoch).
Pure numpy (an epoch it cannot draw is a ConfigError naming the flags): the span loader
(ich_train.data.SpanStream) reads the drawn samples in this order.
"""

from __future__ import annotations

import numpy as np

from ich_train.config import ConfigError

_SALT = 0xBA1A  # keeps the balanced draw's stream apart from the loaders' other seeded generators
# draws in one balanced epoch: every loader process holds the epoch's indices (~32 bytes a draw
# while drawing, 0.5 GB here); RSNA's training folds hold about 600,000 images
MAX_DRAWS = 2**24


def draw(pool: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """`k` items of `pool` as evenly as possible: seeded permutations of the whole pool back to
    back, the last one cut short. k <= len(pool) is a subset without replacement; more repeats
    every item floor(k/len) or ceil(k/len) times."""
    if k == 0:
        return pool[:0]
    if len(pool) == 0:
        raise ValueError(f"cannot draw {k} items from an empty pool")
    whole = -(-k // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(whole)])[:k]


def balanced_epoch(
    positive: np.ndarray, n: int, pos_fraction: float, seed: int, epoch: int
) -> np.ndarray:
    """Indices into `positive` (one bool per training sample: its `any` label) of one epoch's `n`
    draws in training order: round(pos_fraction x n) positives and the rest negatives (see
    `draw`), shuffled together. A function of its arguments only."""
    positive = np.asarray(positive, dtype=bool)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    k = positives_drawn(n, pos_fraction)
    rng = np.random.default_rng([seed, epoch, _SALT])
    chosen = np.concatenate([draw(pos, k, rng), draw(neg, n - k, rng)])
    return rng.permutation(chosen)


def positives_drawn(n: int, pos_fraction: float) -> int:
    """Positives among an epoch's `n` draws; a ConfigError naming the flags when the epoch is
    larger than MAX_DRAWS or would hold one class only (round(F n) is 0 or n)."""
    if n > MAX_DRAWS:
        raise ConfigError(f"--sampler balanced: an epoch of {n} images is more than the {MAX_DRAWS} one balanced epoch may draw; lower --epoch-samples")  # fmt: skip
    k = int(round(pos_fraction * n))
    if not 0 < k < n:
        raise ConfigError(f"--sampler balanced --pos-fraction {pos_fraction}: {k} of an epoch's {n} images would be positive, one class only; use a fraction between {0.5 / n:.3g} and {1 - 0.5 / n:.3g} or more --epoch-samples")  # fmt: skip
    return k


def sampled_prior(y: np.ndarray, n: int, pos_fraction: float) -> np.ndarray:
    """Each label's share among a balanced epoch's `n` draws, given the training labels `y`
    (N, 6; column 0 `any`): k/n for `any` (k = positives_drawn) and, as positives are drawn
    uniformly among the `any` positives, k/n x (label j's share among them) for subtype j."""
    y = np.asarray(y, dtype=np.float64)
    pos = y[:, 0] == 1
    among = y[pos].mean(axis=0) if pos.any() else np.zeros(y.shape[1])
    return positives_drawn(n, pos_fraction) / n * among


def logit_adjustment(natural: np.ndarray, sampled: np.ndarray) -> np.ndarray:
    """The prior correction of a model trained at `sampled` prevalences, to be scored at `natural`
    ones: logit(natural) - logit(sampled) per label, added to its logits (Bayes' rule under label
    shift, p(x | y) unchanged: the odds scale by the ratio of the natural to the sampled odds).
    Exact for `any`, whose share the sampler sets; for a subtype the negatives' mix shifts too
    (more `any` positives without it), so it is the same first-order correction. Both clipped to
    [1e-4, 1 - 1e-4], as the head's prior bias is (a label with no positives shifts by 0)."""

    def logit(p):
        p = np.clip(np.asarray(p, dtype=np.float64), 1e-4, 1 - 1e-4)
        return np.log(p / (1 - p))

    return logit(natural) - logit(sampled)


def describe(positive: np.ndarray, n: int, pos_fraction: float) -> str:
    """One line for fit's log: the share drawn per epoch against the natural one, and how often a
    positive and a negative are drawn."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    k = positives_drawn(n, pos_fraction)
    return (
        f"sampler balanced: each epoch draws {n} images, {k} positive for 'any' ({k / n:.1%}; "
        f"natural share {n_pos / max(n_pos + n_neg, 1):.1%}): each positive {k / max(n_pos, 1):.2f}x, "
        f"each negative {(n - k) / max(n_neg, 1):.2f}x per epoch on average; validation keeps its "
        "natural prevalence"
    )
