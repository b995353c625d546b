"""The sequence stage's data: an embeddings file (ich_train.embed) read back, bounded and checked,
as whole series in slice order, and batched into padded tensors.

Per slice the model sees [f, f - f_prev, f - f_next, the CNN's logits, position] where f is the
slice's pooled CNN features (float16 on disk, float32 here), prev/next its neighbours in the series
(the end slices repeat themselves) and position = rank / (n - 1) in the (possibly augmented)
series. Shapes: a batch is x (B, T, 3D + 7), base logits (B, T, 6), labels (B, T, 6), mask (B, T).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ich_prep import LABELS, parquet_read
from ich_prep.location import open_local
from ich_train.embed import ID_COLUMNS, LOGITS, META_KEY, EmbedError

MAX_ROWS = 5_000_000  # the full RSNA train + test is ~875k slices
MAX_FEATURE_DIM = 8192
MAX_SERIES_LEN = 4096  # slices in one series; RSNA series have 20-60
MAX_VALUES = 2**31  # rows x feature size (full RSNA x 1280 features: 1.1e9)
MAX_ID_BYTES = 256 * 1024 * 1024  # decoded image_id or series_id strings (RSNA's: 12 characters)
MAX_META = 1024 * 1024
STRINGS = ("image_id", "series_id")
INTEGERS = ("slice_rank", "series_len", "fold", "cnn")


@dataclass
class Series:
    """One series in slice order: features (T, D) float32, logits (T, 6), labels (T, 6) or None;
    `cnn` is the index (in the file's metadata) of the checkpoint that embedded it."""

    series_id: str
    fold: int
    ids: list[str]
    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray | None
    cnn: int = 0


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


def check_schema(schema: pa.Schema, path: str) -> int:
    """The feature size, once every column ich-train embed writes is there with its type
    (string ids, integer ranks/folds/labels, float logits, a fixed-size list of 1..MAX_FEATURE_DIM
    floats); EmbedError naming the column otherwise."""
    missing = [c for c in (*ID_COLUMNS, *LOGITS, "features") if c not in schema.names]
    if missing:
        raise EmbedError(f"--features {path} lacks columns {missing}; write it with `ich-train embed`")  # fmt: skip
    ftype = schema.field("features").type
    dim = getattr(ftype, "list_size", 0)
    if not (0 < dim <= MAX_FEATURE_DIM and pa.types.is_floating(ftype.value_type)):
        raise EmbedError(f"--features {path}: 'features' must be a fixed-size list of 1..{MAX_FEATURE_DIM} floats (the file has {ftype})")  # fmt: skip
    for col in schema.names:
        t = schema.field(col).type
        t = t.value_type if pa.types.is_dictionary(t) else t
        if col in STRINGS:
            ok, want = pa.types.is_string(t) or pa.types.is_large_string(t), "strings"
        elif col in INTEGERS or col in LABELS:
            ok, want = pa.types.is_integer(t), "integers"
        elif col in LOGITS:
            ok, want = pa.types.is_floating(t), "floats"
        else:
            continue
        if not ok:
            raise EmbedError(f"--features {path}: column {col!r} must hold {want} (the file has {t}); write it with `ich-train embed`")  # fmt: skip
    return dim


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
    order = np.lexsort((rank, sid))
    out, start = [], 0
    for end in [*np.flatnonzero(sid[order][1:] != sid[order][:-1]) + 1, n]:
        rows = order[start:end]
        start = end
        if len(rows) > MAX_SERIES_LEN:
            raise EmbedError(f"--features {path}: series {sid[rows[0]]} has {len(rows)} slices; at most {MAX_SERIES_LEN}")  # fmt: skip
        if (fold[rows] != fold[rows[0]]).any() or (cnn[rows] != cnn[rows[0]]).any() or (np.diff(rank[rows]) == 0).any():  # fmt: skip
            raise EmbedError(f"--features {path}: series {sid[rows[0]]} spans folds or CNNs or repeats a slice rank; embed again")  # fmt: skip
        out.append(Series(str(sid[rows[0]]), int(fold[rows[0]]), [ids[i] for i in rows], feats[rows], logits[rows], None if labels is None else labels[rows], int(cnn[rows[0]])))  # fmt: skip
    return out


def check_held_out(series: list[Series], meta: dict, fold: int, path: str, flag: str) -> None:
    """EmbedError unless every series of `fold` was embedded by a CNN that held `fold` out: the
    checkpoint its `cnn` column names in the file's metadata has `valid_fold` == fold. Features a
    CNN trained on are confident and right, so scores on them are optimistic (docs/training.md)."""
    cks = meta.get("checkpoints") if isinstance(meta.get("checkpoints"), list) else []
    for s in series:
        if s.fold != fold:
            continue
        ck = cks[s.cnn] if 0 <= s.cnn < len(cks) and isinstance(cks[s.cnn], dict) else {}
        held_out = ck.get("valid_fold")
        if held_out == fold and type(held_out) is int:
            continue
        who = f"a CNN validated on fold {held_out!r} ({str(ck.get('path', '?'))[-80:]!r})" if ck else "a CNN its metadata does not name"  # fmt: skip
        raise EmbedError(f"{flag} {fold}: {path}'s features of fold {fold} come from {who}, not one that held fold {fold} out, so its scores there would be in-sample; embed with --oof (fold k by the CNN validated on k) or validate on that CNN's own validation fold")  # fmt: skip


def slice_inputs(features: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """(T, D) features and (T, 6) logits of one series in order -> (T, 3D + 7) model inputs:
    [f, f - f_prev, f - f_next, logits, position]; the end slices are their own neighbours."""
    t = len(features)
    prev = features[np.maximum(np.arange(t) - 1, 0)]
    nxt = features[np.minimum(np.arange(t) + 1, t - 1)]
    pos = (np.arange(t, dtype=np.float32) / max(t - 1, 1))[:, None]
    return np.concatenate([features, features - prev, features - nxt, logits, pos], 1)


def augment(s: Series, rng: np.random.Generator, reverse_p: float, drop_p: float) -> Series:
    """The series reversed with probability `reverse_p` and each slice dropped with probability
    `drop_p` (at least one kept); the neighbours are recomputed from what is left."""
    keep = rng.random(len(s.ids)) >= drop_p
    if not keep.any():
        keep[rng.integers(len(keep))] = True
    idx = np.flatnonzero(keep)
    if rng.random() < reverse_p:
        idx = idx[::-1]
    lab = None if s.labels is None else s.labels[idx]
    return Series(s.series_id, s.fold, [s.ids[i] for i in idx], s.features[idx], s.logits[idx], lab, s.cnn)  # fmt: skip


def collate(batch: list[Series]) -> dict[str, torch.Tensor]:
    """Padded tensors of a list of series: x, base (logits), y (labels, zeros if none), mask."""
    t = max(len(s.ids) for s in batch)
    d = batch[0].features.shape[1] * 3 + 7
    x = np.zeros((len(batch), t, d), np.float32)
    base = np.zeros((len(batch), t, 6), np.float32)
    y = np.zeros((len(batch), t, 6), np.float32)
    mask = np.zeros((len(batch), t), bool)
    for i, s in enumerate(batch):
        n = len(s.ids)
        x[i, :n] = slice_inputs(s.features, s.logits)
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
