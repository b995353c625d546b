"""The out-of-fold predictions Parquet that evaluate, fit and seq evaluate write and `ich-train
report` reads: image_id, fold, the six labels and pred_<label> probabilities, with the run's name,
config and build in its metadata. Read bounded (bytes, rows, decompressed size, decoded ids) and
checked before use: a predictions file is untrusted. No matplotlib here (ich_train.report draws).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ich_prep import LABELS, parquet_read
from ich_prep.errors import UserError
from ich_prep.location import read_bytes

META_KEY = b"ich_train"  # Parquet key-value metadata: {"run", "config", "build", "checkpoint"}
MAX_BYTES = 512 * 1024 * 1024
MAX_ROWS = 2_000_000  # RSNA stage 2 train has 752,803 images
MAX_INFLATED = 2 * 1024 * 1024 * 1024
MAX_META = 1024 * 1024
MAX_ID_BYTES = 128 * 1024 * 1024  # decoded image ids (RSNA's are 12 characters)
PRED = [f"pred_{k}" for k in LABELS]


class ReportError(UserError, ValueError):
    """Predictions that cannot be reported: unreadable, malformed, or runs that do not compare."""


def predictions_frame(ids, fold: int, labels, probs) -> pd.DataFrame:
    """The out-of-fold table evaluate, fit and seq evaluate write: image_id, fold, the six labels
    (int8) and pred_<label> probabilities, from (N, 6) label and probability arrays."""
    frame = pd.DataFrame({"image_id": list(ids), "fold": fold})
    for j, lab in enumerate(LABELS):
        frame[lab] = np.asarray(labels)[:, j].astype(np.int8)
    for j, lab in enumerate(LABELS):
        frame[f"pred_{lab}"] = np.asarray(probs)[:, j]
    return frame


def write_predictions(path, frame: pd.DataFrame, meta: dict) -> None:
    """The out-of-fold Parquet, with `meta` (run name, config, build identity) in its metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    extra = {META_KEY: json.dumps(meta, default=str).encode()}
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **extra}), path)


def read_predictions(path) -> tuple[pd.DataFrame, dict]:
    """(checked predictions, metadata dict) of the Parquet at `path`, bounded in bytes, rows,
    decompressed size and column types before anything is decoded, and image ids in decoded
    bytes (a dictionary page can repeat one long id a million times); a local path must be a
    regular file."""
    try:
        data = read_bytes(path, MAX_BYTES)
    except (FileNotFoundError, ValueError) as e:
        raise ReportError(f"{path}: {e}; pass the Parquet ich-train evaluate wrote") from None
    try:
        _check_footer(parquet_read.footer(io.BytesIO(data)), path)
        table = parquet_read.read_table(io.BytesIO(data), ["image_id", "fold", *LABELS, *PRED], ["image_id"])  # fmt: skip
        table = parquet_read.decode_strings(table, ["image_id"], MAX_ID_BYTES)
        frame = table.replace_schema_metadata(None).to_pandas()  # pandas' own metadata unread
        raw = (table.schema.metadata or {}).get(META_KEY, b"{}")
    except ReportError:
        raise
    except parquet_read.TooLarge as e:
        raise ReportError(f"{path}: its image ids would take {e.size} bytes decoded (limit {e.limit}); pass the Parquet ich-train evaluate wrote") from None  # fmt: skip
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ReportError(f"{path} is not a readable Parquet file ({type(e).__name__}: {str(e)[:200]})") from None  # fmt: skip
    return check_predictions(frame, path), _meta(raw)


def _check_footer(pf: pq.ParquetFile, path) -> None:
    meta, schema = pf.metadata, pf.schema_arrow
    inflated = parquet_read.inflated_bytes(pf)
    if meta.num_rows > MAX_ROWS or inflated > MAX_INFLATED:
        raise ReportError(f"{path} declares {meta.num_rows} rows ({inflated} bytes decompressed); the limits are {MAX_ROWS} rows and {MAX_INFLATED} bytes: refused")  # fmt: skip
    missing = [c for c in ("image_id", "fold", *LABELS, *PRED) if c not in schema.names]
    if missing:
        raise ReportError(f"{path} has no column {', '.join(missing)}; pass the Parquet ich-train evaluate wrote")  # fmt: skip
    need = {"image_id": "image_id must be unique, non-null strings", "fold": "fold must hold integer folds"}  # fmt: skip
    need |= {c: f"label column {c!r} must hold integers 0 or 1" for c in LABELS}
    need |= {c: f"column {c!r} must hold finite probabilities in [0, 1]" for c in PRED}
    for col, what in need.items():
        t = schema.field(col).type
        t = t.value_type if pa.types.is_dictionary(t) else t
        ok = {"image_id": pa.types.is_string(t) or pa.types.is_large_string(t), "fold": pa.types.is_integer(t)}  # fmt: skip
        if not ok.get(col, pa.types.is_integer(t) if col in LABELS else pa.types.is_floating(t)):
            raise ReportError(f"{path}: {what} (the file has {t}); pass the Parquet ich-train evaluate wrote")  # fmt: skip


def _meta(raw: bytes) -> dict:
    """The metadata dict, or {} when it is absent, too large or not a JSON object."""
    try:
        meta = json.loads(raw) if len(raw) <= MAX_META else {}
    except (ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def check_predictions(frame: pd.DataFrame, where) -> pd.DataFrame:
    """ReportError unless `frame` has string ids (unique), integer folds (one, or several: one run's
    out-of-fold predictions pooled), 0/1 integer labels and finite probabilities in [0, 1];
    returns it sorted by image_id."""

    def bad(what: str) -> ReportError:
        return ReportError(f"{where}: {what}; pass the Parquet ich-train evaluate wrote")

    if len(frame) == 0:
        raise bad("no rows")
    ids = frame["image_id"]
    if not pd.api.types.is_string_dtype(ids) or ids.isna().any() or ids.duplicated().any():
        raise bad("image_id must be unique, non-null strings")
    if not pd.api.types.is_integer_dtype(frame["fold"]):
        raise bad(f"fold must hold integer folds (dtype {frame['fold'].dtype})")
    for col in LABELS:
        if not pd.api.types.is_integer_dtype(frame[col]) or not frame[col].isin((0, 1)).all():
            raise bad(f"label column {col!r} must hold integers 0 or 1 (dtype {frame[col].dtype})")
    for col in PRED:
        p = frame[col]
        if not pd.api.types.is_float_dtype(p) or not (np.isfinite(p) & p.between(0, 1)).all():
            raise bad(f"column {col!r} must hold finite probabilities in [0, 1] (dtype {p.dtype})")
    return frame.sort_values("image_id", ignore_index=True)
