"""Folds grouped by patient and stratified over the six labels; deterministic from the seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold


def assign_folds(
    patient_ids: np.ndarray, labels: np.ndarray, n_folds: int, seed: int
) -> np.ndarray:
    """Fold (int8) per image: no patient in two folds, patient-level label vectors stratified.

    patient_ids: (N,) strings; labels: (N, 6) 0/1. A patient's vector is the OR over its slices,
    then iterative stratification (Sechidis et al. 2011) splits patients.
    """
    df = pd.DataFrame(labels, columns=range(labels.shape[1]))
    df["patient"] = patient_ids
    per_patient = df.groupby("patient", sort=True).max()
    patients = per_patient.index.to_numpy()
    fold_of = np.empty(len(patients), dtype=np.int8)
    if len(patients) >= n_folds:
        mskf = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for k, (_, test_idx) in enumerate(
            mskf.split(np.zeros(len(patients)), per_patient.to_numpy())
        ):
            fold_of[test_idx] = k
    else:  # fewer patients than folds (a tiny --limit): some folds stay empty
        fold_of[:] = np.random.default_rng(seed).permutation(len(patients)) % n_folds
    return pd.Series(fold_of, index=patients).loc[patient_ids].to_numpy()


def slice_ranks(series_ids: np.ndarray, z: np.ndarray) -> np.ndarray:
    """0-based rank of each slice's z position within its series (ties broken by input order)."""
    df = pd.DataFrame({"s": series_ids, "z": z})
    return df.groupby("s")["z"].rank(method="first").sub(1).fillna(-1).astype(np.int32).to_numpy()


def shuffled(n: int, seed: int, fold: int) -> np.ndarray:
    """Deterministic permutation of a fold's n images, so each shard mixes patients."""
    return np.random.default_rng([seed, fold + 1]).permutation(n)
