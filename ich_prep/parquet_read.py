"""Reading untrusted Parquet bounded: the one owner of what every reader of a Parquet file here
(the build index in manifest.parse_index, predictions in ich_train.report, embeddings in
ich_train.seq_data) does before it trusts the decoded data.

A small file can decode to far more than it holds, since a dictionary page can repeat one long
string for every row, and pandas metadata is JSON anyone can write. So reads start no pyarrow
threads and are validated in full (`read_table`), text columns stay dictionaries until their
decoded size is counted (`decode_strings`, else TooLarge), and pandas metadata is rebuilt from
the dtypes it may declare (`pandas_metadata`). Each reader turns a refusal into its own error.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MAX_PANDAS_META = 1024 * 1024  # pandas' JSON for the 35-column build index is ~4 KB
# numpy dtypes pyarrow converts from the Arrow type alone (it ignores these names)
NUMPY_DTYPES = frozenset(
    "int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 bool object".split()
)
# pandas' nullable dtypes -> the Arrow type they are read from, exactly as pandas writes them
NULLABLE = {n.capitalize(): pa.from_numpy_dtype(np.dtype(n)) for n in ("int8", "int16", "int32", "int64", "float32", "float64")}  # fmt: skip
NULLABLE |= {f"UInt{b}": pa.from_numpy_dtype(np.dtype(f"uint{b}")) for b in (8, 16, 32, 64)}
NULLABLE |= {"boolean": pa.bool_()}
STRING_DTYPES = frozenset({"str", "string"})  # pandas' string dtypes: string or large_string


class TooLarge(ValueError):
    """Text columns that would decode to more than a reader's limit (each reader says it its way)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"text columns would take {size} bytes decoded (limit {limit})")
        self.size, self.limit = size, limit


def is_text(t: pa.DataType) -> bool:
    """Whether values of type `t` are variable-length bytes (string or binary, small or large), or
    a dictionary of them."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return any(f(t) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary))  # fmt: skip


def footer(source) -> pq.ParquetFile:
    """The Parquet file at `source` (a binary file object), for its footer (rows, declared sizes,
    schema); nothing is decoded and no reader thread started."""
    source.seek(0)
    return pq.ParquetFile(source, pre_buffer=False)


def inflated_bytes(pf: pq.ParquetFile) -> int:
    """The decompressed size of the column data, as the footer declares it (a dictionary-encoded
    column counts its dictionary and indices, not what they decode to: see decode_strings)."""
    meta = pf.metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def read_table(source, columns: list[str] | None, dictionaries: list[str]) -> pa.Table:
    """`columns` (all when None) of the Parquet at `source`, the text columns `dictionaries` kept
    as dictionaries (decode them with decode_strings). No reader threads or pre-buffering: a
    thread pyarrow starts late can abort the interpreter at exit. Validated in full: a damaged
    page can decode to indices past its dictionary."""
    source.seek(0)
    pf = pq.ParquetFile(source, pre_buffer=False, read_dictionary=dictionaries)
    table = pf.read(columns=columns, use_threads=False)
    table.validate(full=True)
    return table


def decoded_size(column: pa.ChunkedArray) -> int:
    """Bytes the text column takes decoded, counted from its dictionaries and indices without
    decoding them (plain chunks: their value bytes)."""
    size = 0
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            lengths = pc.binary_length(chunk.dictionary).to_numpy(zero_copy_only=False)
            index = chunk.indices.fill_null(0).to_numpy(zero_copy_only=False)
            size += int(lengths[index].sum(dtype=np.int64)) if len(lengths) else 0
        else:
            size += int(pc.sum(pc.binary_length(chunk)).as_py() or 0)
    return size


def decode_strings(table: pa.Table, names: list[str], limit: int) -> pa.Table:
    """`table` with its text columns `names` decoded to plain arrays of their value type, once
    their decoded size together is known to be at most `limit` bytes; TooLarge before decoding
    any of them otherwise."""
    size = sum(decoded_size(table.column(n)) for n in names)
    if size > limit:
        raise TooLarge(size, limit)
    for n in names:
        col = table.column(n)
        plain = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
        table = table.set_column(table.schema.get_field_index(n), n, col.cast(plain))
    return table


def pandas_metadata(schema: pa.Schema) -> bytes | None:
    """The pandas metadata of `schema` rebuilt from the one thing readers need from it, each
    column's dtype, for `table.to_pandas()`: a numpy dtype, or pandas' nullable dtype of exactly
    the column's Arrow type (Int32 for int32, boolean for bool, str for strings). No index, column
    index or attrs are kept. None when there is none. ValueError when it is over MAX_PANDAS_META
    bytes, not JSON, or declares anything else: not what pandas writes."""
    raw = (schema.metadata or {}).get(b"pandas")
    if raw is None:
        return None
    if len(raw) > MAX_PANDAS_META:
        raise ValueError(f"its pandas metadata is {len(raw)} bytes (limit {MAX_PANDAS_META})")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"its pandas metadata is not JSON ({str(e)[:100]})") from None
    cols = meta.get("columns") if isinstance(meta, dict) else None
    if not isinstance(cols, list) or not all(isinstance(c, dict) for c in cols):
        raise ValueError("its pandas metadata has no list of column entries")
    out = [_pandas_column(c, schema) for c in cols if c.get("field_name") in schema.names]
    return json.dumps({"index_columns": [], "column_indexes": [], "columns": out}).encode()


def _pandas_column(entry: dict, schema: pa.Schema) -> dict:
    name, dtype = entry["field_name"], entry.get("numpy_type")
    t = schema.field(name).type
    dtype = dtype if isinstance(dtype, str) else repr(dtype)
    ok = dtype in NUMPY_DTYPES or (dtype in NULLABLE and t == NULLABLE[dtype])
    ok = ok or (dtype in STRING_DTYPES and (pa.types.is_string(t) or pa.types.is_large_string(t)))
    if not ok:
        raise ValueError(f"its pandas metadata declares column {name!r} ({t}) as dtype {str(dtype)[:40]!r}")  # fmt: skip
    return {"name": name, "field_name": name, "pandas_type": "object", "numpy_type": dtype, "metadata": None}  # fmt: skip
