"""Folds: grouped by patient, stratified over labels, deterministic."""

import numpy as np

from ich_prep.split import (
    assign_folds,
    duplicate_positions,
    pack_series,
    series_order,
    slice_order,
    slice_ranks,
)


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


NAN = float("nan")


def test_slice_rank_by_position():
    """Ranks follow the position within each series, independent of input order; series_len."""
    series = np.array(["a", "a", "b", "a"])
    rank, length = slice_ranks(
        series, np.array([5.0, -1.0, 3.0, 2.0]), np.full(4, NAN), np.array(["w", "x", "y", "z"])
    )
    assert rank.tolist() == [2, 0, 0, 1] and length.tolist() == [3, 3, 1, 3]
    perm = np.array([3, 1, 0, 2])
    rank2, _ = slice_ranks(
        series[perm],
        np.array([2.0, -1.0, 5.0, 3.0]),
        np.full(4, NAN),
        np.array(["z", "x", "w", "y"]),
    )
    assert rank2.tolist() == rank[perm].tolist()


def test_ties_by_instance_number_then_id():
    """Equal positions (within 1e-3 mm) order by InstanceNumber, a missing one last, then by id."""
    series = np.array(["s"] * 5)
    pos = np.array([1.0, 1.0004, 1.0, 1.0, 0.0])
    inst = np.array([9, 2, NAN, NAN, 50])
    ids = np.array(["ID_a", "ID_b", "ID_d", "ID_c", "ID_e"])
    order = slice_order(series, pos, inst, ids)
    assert ids[order].tolist() == ["ID_e", "ID_b", "ID_a", "ID_c", "ID_d"]
    assert duplicate_positions(series, pos).tolist() == [True, True, True, True, False]


def test_duplicates_only_within_a_series_and_tolerance():
    """The same position in two series, or 2e-3 mm apart, is no duplicate."""
    dup = duplicate_positions(np.array(["a", "b", "a", "a"]), np.array([1.0, 1.0, 1.002, 7.0]))
    assert not dup.any()
    assert duplicate_positions(np.array([], object), np.array([])).tolist() == []


def test_empty_input():
    rank, length = slice_ranks(
        np.array([], object), np.array([]), np.array([]), np.array([], object)
    )
    assert rank.tolist() == [] and length.tolist() == []


def test_series_order_deterministic_per_fold():
    """Series order within a fold is a fixed permutation per (seed, fold) of the distinct ids."""
    ids = np.array([f"ID_s{i:03d}" for i in range(50)] * 2)
    a = series_order(ids, 0, 1)
    assert sorted(a.tolist()) == sorted(set(ids.tolist()))
    assert np.array_equal(a, series_order(ids[::-1], 0, 1))
    assert not np.array_equal(a, series_order(ids, 0, 2))
    assert not np.array_equal(a, series_order(ids, 1, 1))


def test_pack_series_whole_series_up_to_the_target():
    """A shard closes before a series would pass the target, unless it is empty."""
    assert pack_series([3, 3, 5, 1, 10, 2], 6).tolist() == [0, 0, 1, 1, 2, 3]
    assert pack_series([7], 6).tolist() == [0] and pack_series([], 6).tolist() == []
