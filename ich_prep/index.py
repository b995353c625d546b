"""index.parquet: its schema, written and read here (one row per input, ok or error).

`INDEX_SCHEMA` names every column once, with the type it holds: the writer casts to it
(`index_frame`, ich-prep build and the test fixtures through manifest.write_build) and every
reader checks what it reads against it (`check_index`, through manifest.Build.index). The read
is bounded before anything is materialised (`parse_index`); the columns with rules beyond a type
have one check each: `index_spans` (shard_offset/shard_length), `series_ranks` (series_id,
slice_rank, slice_position).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ich_prep import LABELS, parquet_read
from ich_prep.errors import FormatError

INDEX = "index.parquet"
SPAN_COLUMNS = ("shard_offset", "shard_length")  # a sample's bytes in its shard: one range read
MAX_INDEX_BYTES = 1024**3  # the full RSNA index (~875k rows) is ~50 MB
MAX_INDEX_ROWS = 10_000_000  # 11x the whole RSNA data
MAX_INDEX_INFLATED = 4 * 1024**3  # decompressed column data, as the Parquet footer declares it
# decoded text columns together: the full RSNA index holds ~130 MB (~150 bytes a row: ids, path,
# shard, status); this leaves MAX_INDEX_ROWS rows ~200 bytes each
MAX_INDEX_TEXT = 2 * 1024**3


@dataclass(frozen=True)
class Column:
    """One index column: its name and the pandas dtype the writer gives it ("object": text, None
    where missing); its kind (text, whole, number, flag, label) is what readers check."""

    name: str
    dtype: str

    @property
    def kind(self) -> str:
        if self.name in LABELS:
            return "label"
        if self.dtype == "object":
            return "text"
        return {"float64": "number", "boolean": "flag"}.get(self.dtype, "whole")


def _cols(dtype: str, *names: str) -> tuple[Column, ...]:
    return tuple(Column(n, dtype) for n in names)


# In the order the writer writes them. DICOM tags behind them: read_dicom.read_header.
INDEX_SCHEMA: tuple[Column, ...] = (
    *_cols("object", "image_id", "path"),
    *_cols("Int64", "file_size", "file_mtime_ns"),
    *_cols("object", "patient_id", "study_id", "series_id", "series_source"),
    *_cols("float64", "z_position", "slice_position"),
    *_cols("Int32", "slice_rank", "series_len"),
    Column("duplicate_position", "boolean"),
    Column("instance_number", "Int64"),
    *_cols("float64", "pixel_spacing_y", "pixel_spacing_x"),
    *_cols("Int32", "rows", "cols", "crop_y0", "crop_y1", "crop_x0", "crop_x1"),
    Column("split", "object"),
    Column("fold", "int8"),
    Column("shard", "object"),
    *_cols("Int64", *SPAN_COLUMNS),
    *_cols("Int8", *LABELS),
    *_cols("object", "status", "reason", "detail"),
)
INDEX_COLUMNS = tuple(c.name for c in INDEX_SCHEMA)
REQUIRED_COLUMNS = ("image_id", "fold", "shard", "status")  # every reader reads these
# columns whose values have a rule of their own, checked where it is used (index_spans,
# series_ranks) with a message naming it
OWN_CHECK = frozenset({*SPAN_COLUMNS, "slice_rank", "slice_position"})


def index_frame(df: pd.DataFrame) -> pd.DataFrame:
    """`df` as the index is written: INDEX_SCHEMA's columns, in its order, of its dtypes."""
    out = {}
    for c in INDEX_SCHEMA:
        col = df[c.name]
        out[c.name] = col.astype(object).where(col.notna(), None) if c.dtype == "object" else col.astype(c.dtype)  # fmt: skip
    return pd.DataFrame(out, index=df.index)


def parse_index(
    data: bytes,
    url: str,
    columns: list[str] | None = None,
    rows: int | None = None,
    optional: tuple[str, ...] = (),
) -> pd.DataFrame:
    """index.parquet bytes -> DataFrame, bounded before anything is decoded (`_index_columns`:
    rows, declared and fixed-width sizes, column types) and its text columns before they are
    decoded (at most MAX_INDEX_TEXT bytes together), read through ich_prep.parquet_read (no
    reader threads, validated in full, pandas metadata rebuilt from the dtypes it declares).
    FormatError for anything unreadable."""
    try:
        pf = parquet_read.footer(io.BytesIO(data))
        names = _index_columns(pf, url, columns, rows, optional)
        text = [c for c in names if parquet_read.is_text(pf.schema_arrow.field(c).type)]
        table = parquet_read.read_table(io.BytesIO(data), names, text)
        table = parquet_read.decode_strings(table, text, MAX_INDEX_TEXT)
        pandas = parquet_read.pandas_metadata(table.schema)
        table = table.replace_schema_metadata(pandas and {b"pandas": pandas})
        return table.to_pandas(use_threads=False)
    except FormatError:
        raise
    except parquet_read.TooLarge as e:
        raise FormatError(f"{url}: its text columns would take {e.size} bytes decoded (limit {e.limit}): refused (run `ich-prep verify`, rebuild the build)") from None  # fmt: skip
    except (pa.ArrowException, OSError, ValueError) as e:
        raise FormatError(f"{url} is not a readable Parquet index ({type(e).__name__}: {str(e)[:200]}); copy it again or rebuild") from e  # fmt: skip


def _index_columns(pf: pq.ParquetFile, url: str, columns, rows, optional) -> list[str]:
    """The columns to read (`columns` and those of `optional` the index has; all when None), once
    the footer declares at most MAX_INDEX_ROWS rows (exactly `rows` when given), at most
    MAX_INDEX_INFLATED bytes of column data (declared, and 8 bytes a row for each column that is
    not text), and only numbers, booleans, text and nulls: nothing nested, nothing past a bound."""
    schema, n = pf.schema_arrow, pf.metadata.num_rows
    if len(set(schema.names)) != len(schema.names):
        raise FormatError(f"{url} names a column twice: refused (run `ich-prep verify`, rebuild the build)")  # fmt: skip
    wanted = schema.names if columns is None else [*columns, *optional]
    types = {c: schema.field(c).type for c in wanted if c in schema.names}
    fixed = 8 * n * sum(not parquet_read.is_text(t) for t in types.values())
    inflated = max(parquet_read.inflated_bytes(pf), fixed)
    if n > MAX_INDEX_ROWS or (rows is not None and n != rows) or inflated > MAX_INDEX_INFLATED:
        raise FormatError(
            f"{url} declares {n} rows ({inflated} bytes decompressed); the manifest says "
            f"{rows} rows, the limits are {MAX_INDEX_ROWS} rows and {MAX_INDEX_INFLATED} bytes: "
            "refused (run `ich-prep verify`, rebuild the build)"
        )
    missing = [c for c in columns or () if c not in schema.names]
    if missing:  # pyarrow would drop them silently, and the reader fail far from here
        raise FormatError(f"{url} has no column {', '.join(missing)}, which every index of this format has: refused (run `ich-prep verify`, rebuild the build)")  # fmt: skip
    odd = [f"{c} ({t})" for c, t in types.items() if not _index_type(t)]
    if odd:
        raise FormatError(f"{url}: column {', '.join(odd)[:200]} is not numbers, booleans or text, which no index of this format has: refused (run `ich-prep verify`, rebuild the build)")  # fmt: skip
    return list(types)


def _index_type(t: pa.DataType) -> bool:
    """Text (a dictionary of it too: decoded to plain text), numbers, booleans or nulls."""
    plain = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_null)
    return parquet_read.is_text(t) or any(f(t) for f in plain)


def _number(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def _fits(col: pd.Series, c: Column) -> bool:
    """Whether `col` holds what INDEX_SCHEMA says `c` holds (a column of nulls fits any kind but
    fold's; whole numbers may come as floats from a writer that had nulls)."""
    if c.name == "fold":
        return pd.api.types.is_integer_dtype(col) and bool(col.notna().all())
    values = col.dropna()
    if values.empty:
        return True
    if c.kind == "text":
        return pd.api.types.is_object_dtype(col) or pd.api.types.is_string_dtype(col)
    if c.kind == "flag":
        return pd.api.types.is_bool_dtype(col) or bool(values.map(type).eq(bool).all())
    if not _number(col):
        return False
    v = values.to_numpy(np.float64)
    if c.kind == "label":
        return bool(np.isin(v, (0, 1)).all())
    return c.kind == "number" or bool((np.isfinite(v) & (v == np.round(v))).all())


def check_index(index: pd.DataFrame, where: str) -> None:
    """FormatError naming the column unless `index` has REQUIRED_COLUMNS and every INDEX_SCHEMA
    column it has holds that column's kind (fold whole numbers, labels 0, 1 or null, ...); the
    OWN_CHECK columns are checked where they are used. Extra columns (a newer writer's) pass."""
    missing = [c for c in REQUIRED_COLUMNS if c not in index.columns]
    if missing:
        raise FormatError(f"{where} has no column {', '.join(missing)}; the index is damaged, copy it again or rebuild")  # fmt: skip
    bad = [c.name for c in INDEX_SCHEMA if c.name in index.columns and c.name not in OWN_CHECK and not _fits(index[c.name], c)]  # fmt: skip
    if bad:
        raise FormatError(f"{where}: column {', '.join(bad)} holds values of the wrong type (fold: whole numbers; labels: 0, 1 or null; docs/shard-format.md gives every column's); the index is damaged, rebuild it")  # fmt: skip


def index_spans(rows: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """image id -> (shard_offset, shard_length) of `rows` (ok rows); {} when the index has no span
    columns or some row lacks a span (such a build is read by streaming its shards). FormatError
    when the columns are not whole numbers: a float or text offset is a damaged index."""
    if not all(c in rows for c in SPAN_COLUMNS):
        return {}
    if not all(pd.api.types.is_integer_dtype(rows[c]) for c in SPAN_COLUMNS):
        raise FormatError(f"{INDEX}: columns {', '.join(SPAN_COLUMNS)} are not whole numbers; the index is damaged, run `ich-prep verify` and rebuild")  # fmt: skip
    if rows[list(SPAN_COLUMNS)].isna().any(axis=None):
        return {}
    offsets, lengths = (rows[c].astype("int64").tolist() for c in SPAN_COLUMNS)
    return dict(zip(rows["image_id"], zip(offsets, lengths, strict=True), strict=True))


def series_ranks(ok: pd.DataFrame, where: str = INDEX) -> tuple[np.ndarray, np.ndarray]:
    """(series ids as str, slice ranks as int64) of a format 2.0 index's ok rows (columns
    series_id, slice_rank, shard, no empty value), once they are what ich-prep writes: whole-number
    ranks that run 0..n-1 once each over every series, each series in one shard, and
    slice_position, where the index has it (builds before it do not), finite numbers. FormatError
    naming the first series that is not (an edited index would stack slices across series)."""
    sid, col = ok["series_id"].astype(str).to_numpy(), ok["slice_rank"]
    numeric = _number(col)
    rank = col.to_numpy(np.float64) if numeric else np.zeros(0)
    if not numeric or not (np.isfinite(rank) & (rank == np.round(rank))).all():
        raise FormatError(f"{where}: slice_rank holds values that are not whole numbers ({col.dtype}); the index is damaged or edited: run `ich-prep verify` and rebuild the build")  # fmt: skip
    frame = pd.DataFrame({"series": sid, "rank": rank, "shard": ok["shard"].to_numpy()})
    size = frame.groupby("series", sort=False)["rank"].transform("size").to_numpy()
    # n ranks in [0, n), none twice: exactly 0..n-1
    bad = (rank < 0) | (rank >= size) | frame.duplicated(["series", "rank"]).to_numpy()
    if bad.any():
        s = sid[np.argmax(bad)]
        raise FormatError(f"{where}: series {s}: slice ranks {', '.join(f'{v:g}' for v in sorted(rank[sid == s])[:12])} are not 0..{int(size[sid == s][0]) - 1} once each; the index is damaged or edited: run `ich-prep verify` and rebuild the build")  # fmt: skip
    if "slice_position" in ok:  # mm along the normal: 2.5D neighbours (split.neighbour_ranks)
        col = ok["slice_position"]
        if not _number(col) or not np.isfinite(col.to_numpy(np.float64, na_value=np.nan)).all():
            raise FormatError(f"{where}: slice_position holds values that are not finite numbers ({col.dtype}); the index is damaged or edited: run `ich-prep verify` and rebuild the build")  # fmt: skip
    shards = frame.groupby("series", sort=False)["shard"].nunique()
    if (shards > 1).any():
        raise FormatError(f"{where}: series {shards.index[np.argmax(shards.to_numpy() > 1)]} lies in {shards.max()} shards; a series must be whole in one shard (format 2.0): run `ich-prep verify` and rebuild the build")  # fmt: skip
    return sid, rank.astype(np.int64)
