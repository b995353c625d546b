"""Read the RSNA labels CSV (`ID_<image>_<subtype>,Label`, long format) into one row per image.

Streams the file in record batches with pyarrow, so millions of rows cost a few compact
columns, not Python objects. Every problem becomes a counted error, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ich_prep import LABELS

_ID_RE = r"^(?P<image>ID_[0-9A-Za-z]+)_(?P<subtype>" + "|".join(LABELS) + r")$"


@dataclass
class LabelTable:
    """labels: index image_id, columns LABELS (int8); errors: image_id, reason, detail."""

    labels: pd.DataFrame
    errors: pd.DataFrame
    stats: dict = field(default_factory=dict)


def _error_frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image_id", "reason", "detail"])


def read_labels(path: str, block_size: int = 1 << 22) -> LabelTable:
    """Parse, validate and pivot the labels CSV."""
    with fsspec.open(path, "rb") as f:  # a local path or any fsspec URL
        return _read(f, path, block_size)


def _read(f, path: str, block_size: int) -> LabelTable:
    opts = pacsv.ConvertOptions(column_types={"ID": pa.string(), "Label": pa.string()})
    reader = pacsv.open_csv(
        f, read_options=pacsv.ReadOptions(block_size=block_size), convert_options=opts
    )
    if reader.schema.names[:2] != ["ID", "Label"]:
        raise ValueError(
            f"{path}: header is {reader.schema.names}, expected 'ID,Label' (the RSNA stage_2_train.csv format)"
        )
    parts, bad = [], []
    line = 2  # line 1 is the header
    n_rows = 0
    for batch in reader:
        ids = pc.utf8_trim_whitespace(batch.column("ID"))
        labels = pc.utf8_trim_whitespace(batch.column("Label"))
        parsed = pc.extract_regex(ids, _ID_RE)
        ok_id = pc.is_valid(parsed)
        ok_label = pc.is_in(labels, pa.array(["0", "1"]))
        good = pc.and_(ok_id, pc.fill_null(ok_label, False))
        for i in np.flatnonzero(~good.to_numpy(zero_copy_only=False)):
            raw_id, raw_label = ids[int(i)].as_py(), labels[int(i)].as_py()
            if not ok_id[int(i)].as_py():
                bad.append(
                    (
                        str(raw_id),
                        "malformed_csv_id",
                        f"{path} line {line + i}: ID {raw_id!r} is not ID_<image>_<subtype>",
                    )
                )
            else:
                img = parsed[int(i)].as_py()["image"]
                bad.append(
                    (
                        img,
                        "malformed_label",
                        f"{path} line {line + i}: label {raw_label!r} for {raw_id} is not 0 or 1",
                    )
                )
        sel = parsed.filter(good)
        parts.append(
            pd.DataFrame(
                {
                    "image_id": pc.struct_field(sel, "image").to_numpy(zero_copy_only=False),
                    "subtype": pd.Categorical(
                        pc.struct_field(sel, "subtype").to_numpy(zero_copy_only=False),
                        categories=LABELS,
                    ),
                    "label": labels.filter(good).to_numpy(zero_copy_only=False).astype(np.int8),
                }
            )
        )
        line += batch.num_rows
        n_rows += batch.num_rows
    long = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["image_id", "subtype", "label"])
    )
    before = len(long)
    long = long.drop_duplicates(["image_id", "subtype", "label"])
    duplicate_rows = before - len(long)
    errors = [b for b in bad if b[1] == "malformed_csv_id"]
    bad_label_images = {b[0]: b for b in bad if b[1] == "malformed_label"}

    counts = long.groupby(["image_id", "subtype"], observed=True).size()
    conflicted = counts[counts > 1].index.get_level_values(0).unique()
    for img in conflicted:
        if img not in bad_label_images:
            errors.append(
                (
                    img,
                    "conflicting_labels",
                    f"{path}: {img} has rows with different labels for the same subtype",
                )
            )
    errors.extend(bad_label_images.values())
    drop = set(conflicted) | set(bad_label_images)
    long = long[~long["image_id"].isin(drop)]

    wide = long.pivot(index="image_id", columns="subtype", values="label").reindex(
        columns=list(LABELS)
    )
    wide.columns = list(LABELS)
    missing = wide.isna().any(axis=1)
    for img in wide.index[missing]:
        absent = [c for c in LABELS if pd.isna(wide.at[img, c])]
        errors.append((img, "missing_labels", f"{path}: {img} has no row for {', '.join(absent)}"))
    wide = wide[~missing].astype(np.int8)
    mismatch = wide["any"] != wide[list(LABELS[1:])].max(axis=1)
    for img in wide.index[mismatch]:
        errors.append(
            (
                img,
                "any_mismatch",
                f"{path}: {img} has any={wide.at[img, 'any']} but subtypes {wide.loc[img, list(LABELS[1:])].tolist()}",
            )
        )
    wide = wide[~mismatch]
    wide.index.name = "image_id"
    stats = {
        "csv_rows": n_rows,
        "duplicate_rows_dropped": int(duplicate_rows),
        "labelled_images": len(wide),
    }
    return LabelTable(labels=wide.sort_index(), errors=_error_frame(errors), stats=stats)
