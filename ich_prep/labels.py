"""Read the RSNA labels CSV (`ID_<image>_<subtype>,Label`, long format) into one row per image.

Streams the file in record batches with pyarrow, so millions of rows cost a few compact
columns, not Python objects. A problem with one row's id or label becomes a counted error row;
a file that is not such a CSV at all (no `ID,Label` header, no rows, a row with the wrong number
of fields, bytes that are not UTF-8) raises LabelsError naming the file, the line and the format.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ich_prep import LABELS
from ich_prep.errors import UserError

# An image id: ID_ and letters or digits, no longer than a file name can be (255 bytes with
# `.dcm`); a longer one matches no file and is a malformed id.
_ID_RE = r"^(?P<image>ID_[0-9A-Za-z]{1,248})_(?P<subtype>" + "|".join(LABELS) + r")$"
EXPECTED = (
    "expected the RSNA format: a header line ID,Label, then rows like ID_63eb1e259_epidural,0"
)


class LabelsError(UserError, ValueError):
    """The labels CSV cannot be read as `ID,Label` rows (a ValueError too, as before)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"--labels {path}: {problem}; {EXPECTED}")


@dataclass
class LabelTable:
    """labels: index image_id, columns LABELS (int8); errors: image_id, reason, detail."""

    labels: pd.DataFrame
    errors: pd.DataFrame
    stats: dict = field(default_factory=dict)


def _shown(text: str, limit: int = 80) -> str:
    """`text` for an error row or message: at most `limit` characters (a field can be megabytes)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image_id", "reason", "detail"])


def read_labels(path: str, block_size: int = 1 << 22) -> LabelTable:
    """Parse, validate and pivot the labels CSV."""
    try:
        with fsspec.open(path, "rb") as f:  # a local path or any fsspec URL
            return _read(f, path, block_size)
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:  # pyarrow names no line: find it
        raise LabelsError(path, _locate(path, str(e))) from None


MAX_LINE_BYTES = 1 << 16  # a labels row is about 30 bytes; _locate looks at no longer line


def _lines(f, limit: int = MAX_LINE_BYTES):
    """(line number, bytes) of a binary file, read in bounded chunks: a line longer than `limit`
    bytes ends the walk as (its number, None), so one huge field is never held whole."""
    buf, no = b"", 0
    while chunk := f.read(1 << 20):
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            no += 1
            yield (no, line + b"\n") if len(line) <= limit else (no, None)
            if len(line) > limit:
                return
        if len(buf) > limit:
            yield no + 1, None
            return
    if buf:
        yield no + 1, buf


def _locate(path: str, arrow_message: str) -> str:
    """What is wrong with the CSV, with the line number when one line is to blame (a second,
    plain pass over the file, only taken when pyarrow has refused it; lines bounded by
    MAX_LINE_BYTES)."""
    if "Empty CSV" in arrow_message:
        return "the file is empty (0 bytes or only blank lines)"
    with fsspec.open(path, "rb") as f:
        n_fields = None
        for no, raw in _lines(f):
            if raw is None:
                return f"line {no} is longer than {MAX_LINE_BYTES} bytes (a row is ID,Label: about 30)"  # fmt: skip
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {no} has a byte that is not UTF-8 (0x{raw[e.start]:02x} at column {e.start + 1})"  # fmt: skip
            try:
                fields = next(csv.reader([text]), [])
            except csv.Error as e:
                return f"line {no} is not a CSV row ({e})"
            if not fields:
                continue  # a blank line, skipped by the reader too
            if n_fields is None:
                n_fields = len(fields)
            elif len(fields) != n_fields:
                return f"line {no} has {len(fields)} field(s), not {n_fields}: {_shown(text.strip())!r}"
    return f"pyarrow cannot parse it: {' '.join(arrow_message.split())}"


def _read(f, path: str, block_size: int) -> LabelTable:
    opts = pacsv.ConvertOptions(column_types={"ID": pa.string(), "Label": pa.string()})
    reader = pacsv.open_csv(
        f, read_options=pacsv.ReadOptions(block_size=block_size), convert_options=opts
    )
    if reader.schema.names[:2] != ["ID", "Label"]:
        names = ",".join(reader.schema.names)
        raise LabelsError(path, f"line 1 (the header) is {_shown(names)!r}")
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
                shown = _shown(str(raw_id))
                bad.append(
                    (
                        shown,
                        "malformed_csv_id",
                        f"{path} line {line + i}: ID {shown!r} is not ID_<image>_<subtype>",
                    )
                )
            else:
                img = parsed[int(i)].as_py()["image"]
                bad.append(
                    (
                        img,
                        "malformed_label",
                        f"{path} line {line + i}: label {_shown(str(raw_label))!r} for {raw_id} is not 0 or 1",
                    )
                )
        sel = parsed.filter(good)
        code = pc.index_in(pc.struct_field(sel, "subtype"), value_set=pa.array(LABELS))
        parts.append(
            pa.table(
                {
                    "image": pc.struct_field(sel, "image"),
                    "code": pc.cast(code, pa.int8()),
                    "label": pc.cast(labels.filter(good), pa.int8()),
                }
            )
        )
        line += batch.num_rows
        n_rows += batch.num_rows
    # Integer arrays from here on: image -> dictionary index, (image, subtype) -> one int key.
    # 4.5M rows cost a few tens of MB instead of millions of Python strings.
    n_codes = len(LABELS)
    if parts:
        img_dict = (
            pa.chunked_array([t["image"] for t in parts]).combine_chunks().dictionary_encode()
        )
        image_names = img_dict.dictionary.to_numpy(zero_copy_only=False)
        # key = (image index * 6 + subtype) * 2 + label fits int32 up to ~178M images.
        rows = img_dict.indices.to_numpy().astype(np.int32)
        del img_dict
        rows *= n_codes
        rows += np.concatenate([t["code"].to_numpy() for t in parts])
        rows *= 2
        rows += np.concatenate([t["label"].to_numpy() for t in parts])
    else:
        image_names = np.array([], dtype=object)
        rows = np.array([], dtype=np.int32)
    del parts
    if n_rows == 0:
        raise LabelsError(path, "there is a header but no rows")
    n_rows_kept = len(rows)
    rows = np.unique(rows)  # distinct (image, subtype, label)
    duplicate_rows = n_rows_kept - len(rows)
    errors = [b for b in bad if b[1] == "malformed_csv_id"]
    bad_label_images = {b[0]: b for b in bad if b[1] == "malformed_label"}

    key, label = rows // 2, rows % 2
    conflict_keys = key[1:][key[1:] == key[:-1]]  # same (image, subtype) with both labels
    conflicted = sorted(set(image_names[np.unique(conflict_keys // n_codes)]))
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
    dropped = np.isin(image_names, list(set(conflicted) | set(bad_label_images)))
    img_of, code_of = key // n_codes, key % n_codes
    keep = ~dropped[img_of]
    img_of, code_of, label = img_of[keep], code_of[keep], label[keep]
    # One bit per subtype: which rows are present, and which are positive.
    present_all = np.zeros(len(image_names), np.int64)
    mask_all = np.zeros(len(image_names), np.int64)
    np.add.at(present_all, img_of, 1 << code_of)
    np.add.at(mask_all, img_of, label << code_of)
    seen = np.zeros(len(image_names), bool)
    seen[img_of] = True
    order = np.argsort(image_names[seen], kind="stable")
    images = image_names[seen][order]
    present = present_all[seen][order]
    mask = mask_all[seen][order]
    values = ((mask[:, None] >> np.arange(len(LABELS))) & 1).astype(np.int8)
    missing = present != (1 << len(LABELS)) - 1
    for i in np.flatnonzero(missing):
        absent = [k for j, k in enumerate(LABELS) if not present[i] >> j & 1]
        errors.append(
            (images[i], "missing_labels", f"{path}: {images[i]} has no row for {', '.join(absent)}")
        )
    mismatch = ~missing & (values[:, 0] != values[:, 1:].max(axis=1))
    for i in np.flatnonzero(mismatch):
        errors.append(
            (
                images[i],
                "any_mismatch",
                f"{path}: {images[i]} has any={values[i, 0]} but subtypes {values[i, 1:].tolist()}",
            )
        )
    ok = ~missing & ~mismatch
    wide = pd.DataFrame(
        values[ok], index=pd.Index(images[ok], name="image_id"), columns=list(LABELS)
    )
    stats = {
        "csv_rows": n_rows,
        "duplicate_rows_dropped": int(duplicate_rows),
        "labelled_images": len(wide),
    }
    return LabelTable(labels=wide, errors=_error_frame(errors), stats=stats)
