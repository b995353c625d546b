"""Folds: grouped by patient, stratified over labels, deterministic."""

import numpy as np

from ich_prep.split import assign_folds, shuffled, slice_ranks


def make(n_patients=200, per=10, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"ID_p{i:04d}" for i in range(n_patients)], per)
    labels = np.zeros((len(patients), 6), np.int8)
    for i in range(n_patients):
        if rng.random() < 0.3:
            k = rng.integers(1, 6)
            labels[i * per : i * per + per // 2, [0, k]] = 1
    return patients, labels


def test_no_patient_in_two_folds():
    """Every slice of a patient lands in the same fold."""
    patients, labels = make()
    folds = assign_folds(patients, labels, 5, seed=1)
    per_patient = {p: set(folds[patients == p]) for p in np.unique(patients)}
    assert all(len(s) == 1 for s in per_patient.values())
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]


def test_stratified_prevalence():
    """Patient-level positives of each label split evenly (within one patient) across folds."""
    patients, labels = make()
    folds = assign_folds(patients, labels, 5, seed=1)
    for k in range(6):
        pos_patients = [
            len({p for p in patients[(folds == f) & (labels[:, k] == 1)]}) for f in range(5)
        ]
        assert max(pos_patients) - min(pos_patients) <= 2, (k, pos_patients)


def test_deterministic_from_seed():
    """The same seed gives the same folds; another seed gives others."""
    patients, labels = make()
    a = assign_folds(patients, labels, 5, seed=3)
    assert np.array_equal(a, assign_folds(patients, labels, 5, seed=3))
    assert not np.array_equal(a, assign_folds(patients, labels, 5, seed=4))


def test_fewer_patients_than_folds():
    """Three patients and five folds still gives each patient one fold."""
    patients, labels = make(n_patients=3)
    folds = assign_folds(patients, labels, 5, seed=0)
    assert len(set(folds)) == 3


def test_slice_rank_by_z():
    """Ranks follow z within each series, independent of input order."""
    ranks = slice_ranks(np.array(["a", "a", "b", "a"]), np.array([5.0, -1.0, 3.0, 2.0]))
    assert ranks.tolist() == [2, 0, 0, 1]


def test_shuffle_deterministic_per_fold():
    """Within-fold order is a fixed permutation per (seed, fold)."""
    assert np.array_equal(shuffled(50, 0, 1), shuffled(50, 0, 1))
    assert not np.array_equal(shuffled(50, 0, 1), shuffled(50, 0, 2))
