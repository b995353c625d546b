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
import pyarrow.parquet as pq
import torch

from ich_prep import LABELS
from ich_prep.location import open_local
from ich_train.embed import ID_COLUMNS, LOGITS, META_KEY, EmbedError

MAX_ROWS = 5_000_000  # the full RSNA train + test is ~875k slices
MAX_FEATURE_DIM = 8192
MAX_SERIES_LEN = 4096  # slices in one series; RSNA series have 20-60


@dataclass
class Series:
    """One series in slice order: features (T, D) float32, logits (T, 6), labels (T, 6) or None."""

    series_id: str
    fold: int
    ids: list[str]
    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray | None


def read_embeddings(path: str) -> tuple[list[Series], dict]:
    """(series, the file's ich_embed metadata) of an embeddings Parquet written by `ich-train
    embed`: a regular file, its columns and types checked, rows and feature size bounded."""
    try:
        with open_local(path) as f:  # a regular file only (a FIFO is refused, never waited on)
            pf = pq.ParquetFile(f)
            meta = json.loads((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
            if pf.metadata.num_rows > MAX_ROWS:
                raise EmbedError(f"--features {path} has {pf.metadata.num_rows} rows; at most {MAX_ROWS}")  # fmt: skip
            table = pf.read()
    except EmbedError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise EmbedError(f"--features {path} is not an embeddings file from `ich-train embed` ({type(e).__name__}: {e})") from e  # fmt: skip
    return series_of_table(table, path), meta


def series_of_table(table, path: str) -> list[Series]:
    """The series of an embeddings table (see read_embeddings), checked."""
    missing = [c for c in (*ID_COLUMNS, *LOGITS, "features") if c not in table.column_names]
    if missing:
        raise EmbedError(f"--features {path} lacks columns {missing}; write it with `ich-train embed`")  # fmt: skip
    ftype = table.schema.field("features").type
    dim = getattr(ftype, "list_size", 0)
    if not (0 < dim <= MAX_FEATURE_DIM):
        raise EmbedError(f"--features {path}: 'features' must be a fixed-size list of 1..{MAX_FEATURE_DIM} numbers")  # fmt: skip
    n = table.num_rows
    feats = table.column("features").combine_chunks().values.to_numpy(zero_copy_only=False)
    feats = feats.astype(np.float32).reshape(n, dim)
    logits = np.stack([table.column(c).to_numpy().astype(np.float32) for c in LOGITS], 1)
    labelled = all(c in table.column_names for c in LABELS)
    labels = np.stack([table.column(c).to_numpy().astype(np.float32) for c in LABELS], 1) if labelled else None  # fmt: skip
    if not (np.isfinite(feats).all() and np.isfinite(logits).all()):
        raise EmbedError(f"--features {path} holds non-finite features or logits; embed again")
    if labels is not None and not np.isin(labels, (0.0, 1.0)).all():
        raise EmbedError(f"--features {path}: labels must be 0 or 1")
    sid = np.asarray(table.column("series_id").to_pylist(), dtype=object)
    rank = table.column("slice_rank").to_numpy()
    fold = table.column("fold").to_numpy()
    ids = table.column("image_id").to_pylist()
    order = np.lexsort((rank, sid))
    out, start = [], 0
    for end in [*np.flatnonzero(sid[order][1:] != sid[order][:-1]) + 1, n]:
        rows = order[start:end]
        start = end
        if len(rows) > MAX_SERIES_LEN:
            raise EmbedError(f"--features {path}: series {sid[rows[0]]} has {len(rows)} slices; at most {MAX_SERIES_LEN}")  # fmt: skip
        out.append(Series(str(sid[rows[0]]), int(fold[rows[0]]), [ids[i] for i in rows], feats[rows], logits[rows], None if labels is None else labels[rows]))  # fmt: skip
    return out


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
    return Series(s.series_id, s.fold, [s.ids[i] for i in idx], s.features[idx], s.logits[idx], lab)  # fmt: skip


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
