"""The embeddings Parquet of the sequence stage, written and checked in one module: `ich-train
embed` and `predict --seq` write it (embedding_table), ich_train.seq_data reads it back
(check_schema, then its own bounded reader).

One row per slice: image_id, series_id, slice_rank, series_len, fold, cnn (which checkpoint of the
file's metadata embedded the row), slice_position (mm along the series axis, from the index:
ImagePositionPatient (0020,0032) projected on the normal of ImageOrientationPatient (0020,0037);
null for every row of a build that predates it), the six labels (int8, training builds),
logit_<label> (float32) and `features` (fixed-size list of float16). Schema metadata `ich_embed`:
the checkpoints (path, sha256, valid fold, model), the build, the TTA, the feature size.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ich_prep import LABELS
from ich_prep.errors import UserError

META_KEY = b"ich_embed"
ID_COLUMNS = ("image_id", "series_id", "slice_rank", "series_len", "fold", "cnn")
POSITION = "slice_position"  # optional on read: files from before it give slice ranks instead
LOGITS = tuple(f"logit_{lab}" for lab in LABELS)
STRINGS = ("image_id", "series_id")
INTEGERS = ("slice_rank", "series_len", "fold", "cnn")
MAX_FEATURE_DIM = 8192

# How the sequence model of fold k meets the CNNs (seq fit --protocol, checked against a file's
# metadata by seq_data.check_protocol; docs/training.md); here, so scripts read it without torch
PROTOCOLS = {
    "per-cnn": "every fold's features from CNN k alone (embed --checkpoint cnnK): trained on its own in-sample features, applied with CNN k only (the default)",
    "pooled": "fold j's features from CNN j (embed --oof): trained on several CNNs' out-of-fold features, applied with every CNN",
}


class EmbedError(UserError, ValueError):
    """Checkpoints that do not cover the folds asked for, or an embeddings file we cannot use."""


def embedding_table(build, res: dict, cnn: int) -> pa.Table:
    """The rows of one checkpoint's embedding (res: embed.embed_loader's ids, features, logits) of
    `build` (ich_train.data.Build), with the index's series columns, positions and labels."""
    ok = build.ok
    if not {"series_id", "slice_rank"} <= set(ok.columns) or ok["series_id"].isna().any():
        raise EmbedError(
            f"{build.root} has no series columns (series_id, slice_rank) in its index; rebuild it "
            "with this ich-prep (format 2.0) to use the sequence stage"
        )
    ok = ok.assign(series_len=ok.groupby("series_id")["image_id"].transform("size"))
    rows = ok.set_index("image_id").loc[res["ids"]]
    where = rows[POSITION].to_numpy(np.float64) if POSITION in rows else None
    cols = {
        "image_id": pa.array(res["ids"], pa.string()),
        "series_id": pa.array(rows["series_id"].astype(str).tolist(), pa.string()),
        "slice_rank": pa.array(rows["slice_rank"].to_numpy(np.int32)),
        "series_len": pa.array(rows["series_len"].to_numpy(np.int32)),
        "fold": pa.array(rows["fold"].to_numpy(np.int16)),
        "cnn": pa.array(np.full(len(rows), cnn, np.int16)),
        POSITION: pa.array(where) if where is not None else pa.nulls(len(rows), pa.float64()),
    }
    lab = rows[list(LABELS)]
    if lab.notna().all(axis=None) and len(lab):
        for name in LABELS:
            cols[name] = pa.array(lab[name].to_numpy(np.int8))
    for j, name in enumerate(LOGITS):
        cols[name] = pa.array(res["logits"][:, j])
    f = res["features"]
    cols["features"] = pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), f.shape[1])
    return pa.table(cols)


def check_schema(schema: pa.Schema, path: str) -> int:
    """The feature size, once every column ich-train embed writes is there with its type
    (string ids, integer ranks/folds/labels, float logits and positions, a fixed-size list of
    1..MAX_FEATURE_DIM floats; slice_position may be absent); EmbedError naming the column."""
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
        elif col in LOGITS or col == POSITION:
            ok, want = pa.types.is_floating(t) or (col == POSITION and pa.types.is_null(t)), "floats"  # fmt: skip
        else:
            continue
        if not ok:
            raise EmbedError(f"--features {path}: column {col!r} must hold {want} (the file has {t}); write it with `ich-train embed`")  # fmt: skip
    return dim
