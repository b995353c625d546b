"""Folds grouped by patient and stratified over the six labels; the slice order within a series
(ranks, lengths, duplicate positions); the seeded series order within a fold. Deterministic from
the seed; pure numpy/pandas (the fold splitter, iterstrat -> scikit-learn -> scipy, ~1.4 s of
imports, is imported only inside assign_folds: never by a build worker nor by `ich-prep --help`)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


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
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold  # ~1.4 s: only here

        mskf = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for k, (_, test_idx) in enumerate(
            mskf.split(np.zeros(len(patients)), per_patient.to_numpy())
        ):
            fold_of[test_idx] = k
    else:  # fewer patients than folds (a tiny --limit): some folds stay empty
        fold_of[:] = np.random.default_rng(seed).permutation(len(patients)) % n_folds
    return pd.Series(fold_of, index=patients).loc[patient_ids].to_numpy()


DUPLICATE_MM = 1e-3  # slices of one series closer than this along the normal share a position


def _codes(series: np.ndarray) -> np.ndarray:
    """Integer code per slice of its series key (np.unique's sorted order)."""
    return np.unique(np.asarray(series, dtype=object).astype(str), return_inverse=True)[1]


def position_groups(series: np.ndarray, position: np.ndarray, tol: float = DUPLICATE_MM):
    """Per slice, the number of its position group: slices of one series whose positions chain
    within `tol` mm share a group; groups are numbered in (series, position) order."""
    pos = np.asarray(position, dtype=np.float64)
    codes = _codes(series)
    order = np.lexsort((pos, codes))
    c, p = codes[order], pos[order]
    new = np.r_[True, (c[1:] != c[:-1]) | ~(np.abs(p[1:] - p[:-1]) < tol)] if len(pos) else []
    group = np.empty(len(pos), np.int64)
    group[order] = np.cumsum(new) - 1
    return group


def slice_order(
    series: np.ndarray, position: np.ndarray, instance: np.ndarray, image_id: np.ndarray
) -> np.ndarray:
    """Indices that sort slices by series, then position along the slice normal (positions within
    DUPLICATE_MM tie), then InstanceNumber (a missing one, NaN, after the others), then image id."""
    inst = np.asarray(instance, dtype=np.float64)
    missing = np.isnan(inst)
    ids = np.asarray(image_id, dtype=object).astype(str)
    return np.lexsort(
        (ids, np.where(missing, 0.0, inst), missing, position_groups(series, position))
    )


def slice_ranks(
    series: np.ndarray, position: np.ndarray, instance: np.ndarray, image_id: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(slice_rank, series_len) per slice, int32: rank 0..n-1 in slice_order within its series,
    and n, the series' slice count. The input order does not matter."""
    n = len(series)
    order = slice_order(series, position, instance, image_id)
    codes = _codes(series)[order]
    starts = np.r_[True, codes[1:] != codes[:-1]] if n else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0)) if n else starts
    rank, length = np.empty(n, np.int32), np.empty(n, np.int32)
    rank[order] = np.arange(n) - first
    length[order] = np.bincount(codes)[codes] if n else codes
    return rank, length


def duplicate_positions(
    series: np.ndarray, position: np.ndarray, tol: float = DUPLICATE_MM
) -> np.ndarray:
    """True for each slice whose series holds another slice within `tol` mm (chained) of it."""
    group = position_groups(series, position, tol)
    return np.bincount(group)[group] > 1 if len(group) else np.zeros(0, bool)


GAP_FACTOR = 1.5  # a step beyond this many times the series' median spacing is a gap


def neighbour_ranks(n: int, k: int, position=None, gap: float = GAP_FACTOR) -> np.ndarray:
    """(n, 2k+1) int64: for each slice of one series (rows in rank order), the ranks of the slices
    of its 2.5D stack, itself in the middle. `position`: the n slices' positions along the normal (mm,
    the index's slice_position) in rank order; None for a build without them (each rank its own
    position, 1 apart: the end slices repeated, as before positions were used).

    Neighbours are the nearest slices at *other* positions: slices within DUPLICATE_MM (tied
    positions, `duplicate_position`) are one place, and a stack never holds a slice's twin; a
    neighbour place is represented by its lowest rank. A step between places longer than `gap`
    times the series' median step (a slice missing: failed to compile, unlabelled, never scanned)
    is treated like the series' end: the stack repeats the last slice before it, as at the ends."""
    pos = np.arange(n, dtype=np.float64) if position is None else np.asarray(position, np.float64)
    if pos.shape != (n,):
        raise ValueError(f"{len(pos)} positions for {n} slices")
    return _neighbours(pos, k, gap)


def places(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One series' slices by place: (place of each slice, numbered in position order: tied
    positions within DUPLICATE_MM share one; the position of each place, its lowest)."""
    place = position_groups(np.zeros(len(pos), np.int64), pos)
    where = np.full(int(place.max()) + 1 if len(pos) else 0, np.inf)
    np.minimum.at(where, place, pos)
    return place, where


def _neighbours(pos: np.ndarray, k: int, gap: float) -> np.ndarray:
    n = len(pos)
    out = np.repeat(np.arange(n, dtype=np.int64)[:, None], 2 * k + 1, axis=1)
    if n < 2:
        return out
    place, where = places(pos)
    count = len(where)
    first = np.full(count, n, np.int64)
    np.minimum.at(first, place, np.arange(n))
    steps = np.diff(where)
    close = steps <= gap * np.median(steps) if len(steps) else np.zeros(0, bool)
    for sign in (-1, 1):
        at = place.copy()
        for d in range(1, k + 1):
            nxt = at + sign
            inside = (nxt >= 0) & (nxt < count)
            step = np.clip(np.minimum(at, nxt), 0, max(count - 2, 0))
            at = np.where(inside & close[step], nxt, at) if len(close) else at
            out[:, k + sign * d] = np.where(at == place, np.arange(n), first[at])
    return out


# Where a slice's series key came from (index column `series_source`).
SERIES_SOURCES = ("uid", "derived", "file")
# The prefix of a key made here; a SeriesInstanceUID is digits and dots (RSNA: ID_...).
NO_UID = "nouid-"


def _key(*parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogateescape")).hexdigest()
    return NO_UID + digest[:20]


def series_keys(
    patient, study, series, frame, normal, number, position, path
) -> tuple[np.ndarray, np.ndarray]:
    """(series key, source) per slice; a missing SeriesInstanceUID (0020,000E) never merges scans.

    With a SeriesInstanceUID the key is that id ("uid"). Without one, the slices of one PatientID
    (0010,0020), StudyInstanceUID (0020,000D), FrameOfReferenceUID (0020,0052), slice normal
    (from ImageOrientationPatient, rounded) and SeriesNumber (0020,0011, may be empty) form one
    series ("derived"), unless two of them share a position (within DUPLICATE_MM: two scans of one
    volume, e.g. two kernels): then, as when the patient, study or frame of reference is missing
    too, each file is a series of its own ("file", keyed on its path). Derived keys are `nouid-`
    and 20 hex of a sha256. Left: two scans that agree on all of these and interleave without a
    tie are one series; no header tells them apart."""
    sid = np.asarray(series, dtype=object)
    missing = np.array([not (isinstance(v, str) and v) for v in sid], bool)
    out, source = sid.copy(), np.full(len(sid), "uid", dtype=object)
    if not missing.any():
        return out, source
    idx = np.flatnonzero(missing)
    parts = [np.asarray(a, dtype=object)[idx] for a in (patient, study, frame, normal, number)]
    full = np.array([all(isinstance(p[i], str) and p[i] for p in parts[:3]) for i in range(len(idx))], bool)  # fmt: skip
    derived = np.array([_key("derived", *(str(p[i]) for p in parts)) for i in range(len(idx))], dtype=object)  # fmt: skip
    pos = np.asarray(position, dtype=np.float64)[idx]
    tied = duplicate_positions(derived, pos)
    tied_group = set(derived[tied])
    per_file = ~full | np.array([k in tied_group for k in derived], bool)
    paths = np.asarray(path, dtype=object)[idx]
    out[idx] = np.where(per_file, [_key("file", str(p)) for p in paths], derived)
    source[idx] = np.where(per_file, "file", "derived")
    return out, source


def series_order(series: np.ndarray, seed: int, fold: int) -> np.ndarray:
    """The distinct series ids, sorted, in a seeded-random order per (seed, fold): the order in
    which a fold's series are written, so consecutive series (one shard) come from many patients."""
    ids = np.unique(np.asarray(series, dtype=object).astype(str))
    return ids[np.random.default_rng([seed, fold + 1]).permutation(len(ids))]


def pack_series(sizes: np.ndarray, target: int) -> np.ndarray:
    """Shard number (0, 1, ...) of each series, in write order, packing whole series into shards
    of about `target` slices: a shard is closed when the next series would take it past `target`,
    unless it is empty (a series longer than `target` is a shard of its own)."""
    out = np.empty(len(sizes), np.int64)
    shard, filled = 0, 0
    for i, n in enumerate(sizes):
        if filled and filled + int(n) > target:
            shard, filled = shard + 1, 0
        out[i] = shard
        filled += int(n)
    return out
