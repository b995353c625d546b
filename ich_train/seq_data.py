"""The sequence stage's data: an embeddings file (ich_train.embed_format) read back, bounded and
checked, as whole series in slice order, and batched into padded tensors.

Per slice the model sees [f, f - f_prev, f - f_next, the CNN's logits, position, gap_prev,
gap_next] (INPUT_LAYOUT) where f is the slice's pooled CNN features (float16 on disk, float32
here) and the rest is the series' geometry from slice_position (mm along the series axis):
prev/next are the slice's neighbours at other positions by ich_prep.split.neighbour_ranks, the
rule 2.5D uses (a step over 1.5x the series' median spacing is a gap, treated like the series'
end: the slice is its own neighbour there, as at the ends); position = (p - p_first) /
(p_last - p_first) in the (possibly augmented) series; gap_prev/gap_next the step to the
neighbouring position in units of the series' median spacing (0 at the ends, at most MAX_GAP). An
embeddings file without positions (written before them, or from a build without them) gives
slice ranks instead: position rank / (n - 1), every gap 1 (`positions` "rank", with a warning).
Shapes: a batch is x (B, T, 3D + SLICE_EXTRA), base logits (B, T, 6), labels (B, T, 6), mask (B, T).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ich_prep import LABELS, parquet_read
from ich_prep.location import open_local
from ich_prep.split import neighbour_ranks, places
from ich_train.embed_format import (
    ID_COLUMNS,
    LOGITS,
    META_KEY,
    POSITION,
    EmbedError,
    check_schema,
)

# What the model gets per slice besides the 3 x D feature values; recorded in every sequence
# checkpoint, so one trained on other inputs is refused rather than fed these.
INPUT_LAYOUT = "f,f-prev,f-next,logits,position,gap_prev,gap_next"
SLICE_EXTRA = len(LABELS) + 3  # the logits, position, gap_prev, gap_next
MAX_GAP = 8.0  # gap inputs are capped here (median spacings): a stray slice far away is one value
MAX_ROWS = 5_000_000  # the full RSNA train + test is ~875k slices
MAX_SERIES_LEN = 4096  # slices in one series; RSNA series have 20-60
MAX_VALUES = 2**31  # rows x feature size (full RSNA x 1280 features: 1.1e9)
MAX_ID_BYTES = 256 * 1024 * 1024  # decoded image_id or series_id strings (RSNA's: 12 characters)
MAX_META = 1024 * 1024
STRINGS = ("image_id", "series_id")


@dataclass
class Series:
    """One series in slice order: features (T, D) float32, logits (T, 6), labels (T, 6) or None;
    `cnn` is the index (in the file's metadata) of the checkpoint that embedded it; `position` its
    slices' positions (T,) in mm, None where the file has none (slice ranks stand in)."""

    series_id: str
    fold: int
    ids: list[str]
    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray | None
    cnn: int = 0
    position: np.ndarray | None = None


def read_embeddings(path: str) -> tuple[list[Series], dict]:
    """(series, the file's ich_embed metadata) of an embeddings Parquet written by `ich-train
    embed`: a regular file; its rows, feature values, column types and decoded id sizes bounded
    and checked from the footer before the columns are read."""
    try:
        with open_local(path) as f:  # a regular file only (a FIFO is refused, never waited on)
            pf = parquet_read.footer(f)
            meta = _meta((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
            n = pf.metadata.num_rows
            if n > MAX_ROWS:
                raise EmbedError(f"--features {path} has {n} rows; at most {MAX_ROWS}")
            dim = check_schema(pf.schema_arrow, path)
            if n * dim > MAX_VALUES:
                raise EmbedError(f"--features {path} holds {n} x {dim} feature values; at most {MAX_VALUES}")  # fmt: skip
            table = parquet_read.read_table(f, None, list(STRINGS))  # ids bounded in _strings
    except EmbedError:
        raise
    except (OSError, ValueError, TypeError, pa.ArrowException) as e:
        raise EmbedError(f"--features {path} is not an embeddings file from `ich-train embed` ({type(e).__name__}: {str(e)[:200]})") from e  # fmt: skip
    return series_of_table(table, path), meta


def _meta(raw: bytes) -> dict:
    """The file's ich_embed metadata: a JSON object, else {} (too large, nested too deep, not
    JSON or not an object)."""
    try:
        meta = json.loads(raw) if len(raw) <= MAX_META else {}
    except (ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _strings(table: pa.Table, name: str, path: str) -> np.ndarray:
    """A string column (maybe dictionary-encoded) as an object array, once its decoded size is
    known to be at most MAX_ID_BYTES: a dictionary can repeat one long string a million times."""
    try:
        table = parquet_read.decode_strings(table, [name], MAX_ID_BYTES)
    except parquet_read.TooLarge as e:
        raise EmbedError(f"--features {path}: its {name} values would take {e.size} bytes decoded; at most {MAX_ID_BYTES}") from None  # fmt: skip
    return np.asarray(table.column(name).to_pylist(), dtype=object)


def series_of_table(table, path: str) -> list[Series]:
    """The series of an embeddings table (see read_embeddings), checked: no empty (null) value,
    unique image ids, each series in one fold with distinct slice ranks."""
    dim = check_schema(table.schema, path)
    nulls = [c for c in (*ID_COLUMNS, *LOGITS, "features") if table.column(c).null_count]
    if nulls:
        raise EmbedError(f"--features {path} has empty (null) values in {nulls}; embed again")
    n = table.num_rows
    if n == 0:
        raise EmbedError(f"--features {path} has no rows; embed a build that has images")
    feats = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    with np.errstate(over="ignore", invalid="ignore"):  # a value past float32 is refused below
        feats = feats.astype(np.float32).reshape(n, dim)
        logits = np.stack([table.column(c).to_numpy().astype(np.float32) for c in LOGITS], 1)
    labelled = all(c in table.column_names for c in LABELS)
    labels = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in LABELS], 1) if labelled else None  # fmt: skip
    if not (np.isfinite(feats).all() and np.isfinite(logits).all()):
        raise EmbedError(f"--features {path} holds non-finite features or logits; embed again")
    if labels is not None and not np.isin(labels, (0.0, 1.0)).all():
        raise EmbedError(f"--features {path}: labels must be 0 or 1")
    sid = _strings(table, "series_id", path)
    ids = _strings(table, "image_id", path)
    if len(set(ids)) != n:
        raise EmbedError(f"--features {path} holds an image_id more than once; embed again")
    rank = table.column("slice_rank").to_numpy().astype(np.int64)
    fold = table.column("fold").to_numpy().astype(np.int64)
    cnn = table.column("cnn").to_numpy().astype(np.int64)
    where = _positions(table, path)
    order = np.lexsort((rank, sid))
    out, start = [], 0
    for end in [*np.flatnonzero(sid[order][1:] != sid[order][:-1]) + 1, n]:
        rows = order[start:end]
        start = end
        if len(rows) > MAX_SERIES_LEN:
            raise EmbedError(f"--features {path}: series {sid[rows[0]]} has {len(rows)} slices; at most {MAX_SERIES_LEN}")  # fmt: skip
        if (fold[rows] != fold[rows[0]]).any() or (cnn[rows] != cnn[rows[0]]).any() or (np.diff(rank[rows]) == 0).any():  # fmt: skip
            raise EmbedError(f"--features {path}: series {sid[rows[0]]} spans folds or CNNs or repeats a slice rank; embed again")  # fmt: skip
        if where is not None and (np.diff(where[rows]) < 0).any():  # ranks follow positions
            raise EmbedError(f"--features {path}: series {sid[rows[0]]} has slice positions out of slice-rank order; embed again")  # fmt: skip
        out.append(Series(str(sid[rows[0]]), int(fold[rows[0]]), [ids[i] for i in rows], feats[rows], logits[rows], None if labels is None else labels[rows], int(cnn[rows[0]]), None if where is None else where[rows]))  # fmt: skip
    return out


def _positions(table, path: str) -> np.ndarray | None:
    """slice_position as float64, or None when the file has none (no column, or null in every
    row: a build without positions); EmbedError when only some rows have one or one is not finite."""
    if POSITION not in table.column_names or table.column(POSITION).null_count == table.num_rows:
        return None
    col = table.column(POSITION)
    where = col.to_numpy(zero_copy_only=False).astype(np.float64) if not col.null_count else None
    if where is None or not np.isfinite(where).all():
        raise EmbedError(f"--features {path}: slice_position has empty or non-finite values in some rows; embed again")  # fmt: skip
    return where


def positions_of(series: list[Series]) -> str:
    """'mm' when every series has slice positions, else 'rank' (the file had none)."""
    return "mm" if all(s.position is not None for s in series) else "rank"


def as_positions(series: list[Series], positions: str, what: str) -> list[Series]:
    """`series` as a model trained on `positions` ('mm' or 'rank') takes them: rank-trained, the
    positions are dropped (it never learned gaps); mm-trained, series without positions are
    refused (EmbedError naming `what`): it would see a series without its gaps."""
    if positions == "rank":
        return [dataclasses.replace(s, position=None) for s in series]
    if positions_of(series) != "mm":
        raise EmbedError(f"{what} has no slice positions (a build from before them) and the sequence model was trained on them; rebuild it with this ich-prep")  # fmt: skip
    return series


def check_held_out(series: list[Series], meta: dict, fold: int, path: str, flag: str) -> None:
    """EmbedError unless every series of `fold` was embedded by a CNN that held `fold` out: the
    checkpoint its `cnn` column names in the file's metadata has `valid_fold` == fold. Features a
    CNN trained on are confident and right, so scores on them are optimistic (docs/training.md)."""
    cks = _checkpoints(meta)
    for s in series:
        if s.fold != fold:
            continue
        ck = cks[s.cnn] if 0 <= s.cnn < len(cks) else {}
        held_out = ck.get("valid_fold")
        if held_out == fold and type(held_out) is int:
            continue
        who = f"a CNN validated on fold {held_out!r} ({str(ck.get('path', '?'))[-80:]!r})" if ck else "a CNN its metadata does not name"  # fmt: skip
        raise EmbedError(f"{flag} {fold}: {path}'s features of fold {fold} come from {who}, not one that held fold {fold} out, so its scores there would be in-sample; embed with --oof (fold k by the CNN validated on k) or validate on that CNN's own validation fold")  # fmt: skip


def check_trained_on(series: list[Series], meta: dict, trained: dict, path: str, checkpoint: str) -> None:  # fmt: skip
    """EmbedError unless every series was embedded by a CNN (by sha256) whose features the sequence
    checkpoint learned from (`trained`: its embeddings metadata; none recorded: not checked)."""
    shas = {c.get("sha256") for c in _checkpoints(trained)}
    cks = _checkpoints(meta)
    for s in series:
        ck = cks[s.cnn] if 0 <= s.cnn < len(cks) else {}
        if shas and ck.get("sha256") not in shas:
            raise EmbedError(f"{checkpoint} was trained on the features of other CNNs than the one that embedded fold {s.fold} of {path} ({str(ck.get('path', '?'))[-80:]!r}); pass the features of the CNNs it learned from")  # fmt: skip


def _checkpoints(meta: dict) -> list[dict]:
    cks = meta.get("checkpoints") if isinstance(meta.get("checkpoints"), list) else []
    return [c if isinstance(c, dict) else {} for c in cks]


def check_protocol(series: list[Series], meta: dict, fold: int, protocol: str, path: str) -> None:
    """EmbedError unless `series` (every fold of the file) are what --protocol takes for the model
    of `fold`: per-cnn, every row from the file's one CNN, the one validated on `fold`; pooled,
    every row of fold j from a CNN validated on j (out of fold). The validation fold itself is
    check_held_out's."""
    cks = _checkpoints(meta)
    if protocol == "per-cnn":
        mine = cks[0].get("valid_fold") if len(cks) == 1 else None
        if len(cks) != 1 or mine != fold or type(mine) is not int or any(s.cnn != 0 for s in series):  # fmt: skip
            raise EmbedError(f"--protocol per-cnn --valid-fold {fold}: {path} holds the features of {len(cks)} CNNs (validated on {[c.get('valid_fold') for c in cks][:8]}); per-cnn takes one CNN's embeddings of every fold, the CNN validated on fold {fold}: `ich-train embed --checkpoint <its best.pt>` (no --oof)")  # fmt: skip
        return
    for s in series:
        ck = cks[s.cnn] if 0 <= s.cnn < len(cks) else {}
        if ck.get("valid_fold") != s.fold or type(ck.get("valid_fold")) is not int:
            raise EmbedError(f"--protocol pooled: {path}'s features of fold {s.fold} come from a CNN validated on fold {ck.get('valid_fold')!r}, not out of fold; embed with --oof (fold k by the CNN validated on k), or train on one CNN's own embeddings with --protocol per-cnn")  # fmt: skip


def geometry(t: int, position: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prev, next, extra) of one series of t slices in its current order: the rows of each slice's
    neighbours (a gap or an end: the slice itself; split.neighbour_ranks' rule), and (t, 3)
    float32 [position, gap_prev, gap_next] (see the module doc). No positions: slice ranks."""
    pos = np.arange(t, dtype=np.float64) if position is None else np.asarray(position, np.float64)
    if t > 1 and pos[-1] < pos[0]:  # a reversed series: prev is still the row before
        pos = -pos
    ranks = neighbour_ranks(t, 1, pos)
    place, at = places(pos)
    steps = np.diff(at)
    unit = float(np.median(steps)) if len(steps) else 1.0
    step = np.minimum(np.r_[0.0, steps, 0.0] / (unit if unit > 0 else 1.0), MAX_GAP)
    span = pos.max() - pos.min() if t else 0.0
    rel = (pos - pos.min()) / span if span > 0 else np.arange(t) / max(t - 1, 1)
    extra = np.stack([rel, step[place], step[place + 1]], 1).astype(np.float32)
    return ranks[:, 0], ranks[:, 2], extra


def slice_inputs(features: np.ndarray, logits: np.ndarray, position: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """(T, D) features and (T, 6) logits of one series in order, with its positions (T,) in mm
    or None -> (T, 3D + SLICE_EXTRA) model inputs in INPUT_LAYOUT's order."""
    prev, nxt, extra = geometry(len(features), position)
    return np.concatenate([features, features - features[prev], features - features[nxt], logits, extra], 1)  # fmt: skip


def augment(s: Series, rng: np.random.Generator, reverse_p: float, drop_p: float) -> Series:
    """The series reversed with probability `reverse_p` and each slice dropped with probability
    `drop_p` (at least one kept); the neighbours are recomputed from what is left (with positions,
    a dropped slice leaves a gap, as a missing one does)."""
    keep = rng.random(len(s.ids)) >= drop_p
    if not keep.any():
        keep[rng.integers(len(keep))] = True
    idx = np.flatnonzero(keep)
    if rng.random() < reverse_p:
        idx = idx[::-1]
    lab = None if s.labels is None else s.labels[idx]
    where = None if s.position is None else s.position[idx]
    return Series(s.series_id, s.fold, [s.ids[i] for i in idx], s.features[idx], s.logits[idx], lab, s.cnn, where)  # fmt: skip


def collate(batch: list[Series]) -> dict[str, torch.Tensor]:
    """Padded tensors of a list of series: x, base (logits), y (labels, zeros if none), mask."""
    t = max(len(s.ids) for s in batch)
    d = batch[0].features.shape[1] * 3 + SLICE_EXTRA
    x = np.zeros((len(batch), t, d), np.float32)
    base = np.zeros((len(batch), t, 6), np.float32)
    y = np.zeros((len(batch), t, 6), np.float32)
    mask = np.zeros((len(batch), t), bool)
    for i, s in enumerate(batch):
        n = len(s.ids)
        x[i, :n] = slice_inputs(s.features, s.logits, s.position)
        base[i, :n] = s.logits
        if s.labels is not None:
            y[i, :n] = s.labels
        mask[i, :n] = True
    return {k: torch.from_numpy(v) for k, v in {"x": x, "base": base, "y": y, "mask": mask}.items()}


def batches(series: list[Series], size: int, rng: np.random.Generator | None = None):
    """Lists of `size` series: shuffled with `rng` (training), else in the given order."""
    order = rng.permutation(len(series)) if rng is not None else np.arange(len(series))
    for i in range(0, len(order), size):
        yield [series[j] for j in order[i : i + size]]
