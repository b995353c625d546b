"""manifest.json and index.parquet: write atomically, read from a folder or URL, check the version.

URLs: http(s):// is read with the standard library (no aiohttp needed); other schemes (s3://, ...)
through fsspec. See ich_prep.location for the streaming and the safety rules.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ich_prep import FORMAT_VERSION, LABELS, __version__, location, parquet_read
from ich_prep.config import BuildConfig, ConfigError
from ich_prep.errors import UserError
from ich_prep.location import Store, join
from ich_prep.shards import SAFE_FILE_NAME

SPAN_COLUMNS = ("shard_offset", "shard_length")  # a sample's bytes in its shard: one range read
MANIFEST = "manifest.json"
INDEX = "index.parquet"
CARD = "README.md"  # the dataset card
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # a manifest of ~1,000 shards is ~200 KiB
MAX_INDEX_BYTES = 1024**3  # the full RSNA index (~875k rows) is ~50 MB
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_INDEX_ROWS = 10_000_000  # 11x the whole RSNA data
MAX_INDEX_INFLATED = 4 * 1024**3  # decompressed column data, as the Parquet footer declares it
# decoded text columns together: the full RSNA index holds ~130 MB (~150 bytes a row: ids, path,
# shard, status); this leaves MAX_INDEX_ROWS rows ~200 bytes each
MAX_INDEX_TEXT = 2 * 1024**3


class FormatError(UserError, ValueError):
    """A shard folder this version cannot read (missing manifest, newer format, damaged json)."""


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """Whole file from a local path or URL (http(s)://, s3://, ...), refusing more than `limit` bytes."""
    try:
        return location.read_bytes(url, limit)
    except ValueError as e:
        raise FormatError(str(e)) from e


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def write_build(
    store: Store,
    cfg: BuildConfig,
    index: pd.DataFrame,
    shards: list[dict],
    inputs: dict | None = None,
    extra_counts: dict | None = None,
) -> dict:
    """The last step of every build (ich-prep's, and the test fixtures'): index.parquet, the
    dataset card, then manifest.json, last and atomically (a folder without it is not a build).
    `shards` are write_shard's entries plus 'split' and 'fold'. Returns the manifest."""
    buf = io.BytesIO()
    index.to_parquet(buf, index=False)
    data = buf.getvalue()
    store.write_bytes(INDEX, data)
    ok = index[index["status"] == "ok"]
    labelled = cfg.labels is not None
    counts = {
        "inputs": len(index),
        "ok": len(ok),
        "error": int((index["status"] == "error").sum()),
        "errors_by_reason": dict(sorted(Counter(index["reason"].dropna()).items())),
        "positives": {k: int(ok[k].sum()) for k in LABELS} if labelled else None,
        "per_fold": {str(k): int(v) for k, v in sorted(Counter(ok["fold"]).items())},
        **(extra_counts or {}),
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": "ich_prep",
        "tool_version": __version__,
        "config": cfg.to_dict(),
        "inputs": inputs,
        "split": cfg.split,
        "counts": counts,
        "index": {"name": INDEX, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "image": layout_record(cfg),
        "order": ORDER,
        "shards": shards,
    }
    from ich_prep.card import dataset_card  # local import: the card is presentation only

    store.write_bytes(CARD, dataset_card(manifest).encode())
    store.write_bytes(MANIFEST, dumps(manifest))
    return manifest


def check_version(version: str, where: str) -> None:
    """Same major version reads; a newer major is refused with the fix."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError as e:
        raise FormatError(f"{where}: format_version {version!r} is not a version number") from e
    ours = int(FORMAT_VERSION.split(".")[0])
    if major > ours:
        raise FormatError(
            f"{where}: shard format {version} is newer than this ich-toolkit reads ({FORMAT_VERSION}); "
            "upgrade ich-toolkit to read it"
        )
    if major < ours:
        raise FormatError(
            f"{where}: shard format {version} is too old for this ich-toolkit ({FORMAT_VERSION}: "
            "series in slice order, per-series crops, sample spans); rebuild it: `ich-prep build "
            "--dicom-dir DICOMS [--labels CSV] --out THIS_FOLDER --overwrite` (its manifest's "
            "config names the DICOMs and the CSV)"
        )


# What format 2 guarantees about where a sample is, declared in every manifest.
ORDER = {
    "series": "contiguous: within a fold (or a test build) each series is whole in one shard",
    "slices": "slice order: position along the slice normal (ImagePositionPatient on the cross "
    "product of ImageOrientationPatient), ties by InstanceNumber then image id; slice_rank 0..n-1",
    "spans": "index.parquet shard_offset/shard_length: one range read fetches one sample",
    "crop": "config.crop: series = one box for every slice of a series (neighbours align), "
    "slice = each slice's own head box; index crop_y0..crop_x1 = the box used",
}


def layout_record(cfg: BuildConfig) -> dict:
    """The image layout as the manifest declares it (`image`): what every image of the build is."""
    lay = cfg.layout
    return {"height": lay.height, "width": lay.width, "channels": lay.channels,
            "channel_names": list(lay.channel_names), "dtype": lay.dtype}  # fmt: skip


def load_manifest(root: str | os.PathLike) -> dict:
    """Parsed manifest.json of a finished build at `root` (folder or URL prefix), version-checked."""
    url = join(root, MANIFEST)
    try:
        data = read_bytes(url, MAX_MANIFEST_BYTES)
    except FileNotFoundError as e:
        raise FormatError(
            f"{url} not found: {root} is not a finished ich-prep build (run `ich-prep build`)"
        ) from e
    except OSError as e:
        raise FormatError(f"{url} cannot be read ({e}); copy the build again") from e
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"{url} is not valid json: {str(e)[:200]}") from e
    if not isinstance(manifest, dict):
        raise FormatError(f"{url} is not a json object")
    check_version(manifest.get("format_version", "0"), url)
    check_shard_names(manifest, url)
    check_entries(manifest, url)
    cfg = build_config(manifest, url)
    if manifest.get("image") != layout_record(cfg):
        raise FormatError(f"{url}: the declared image layout {str(manifest.get('image'))[:200]} is not what its config makes ({layout_record(cfg)}); the manifest is damaged, rebuild")  # fmt: skip
    return manifest


def build_config(manifest: dict, where: str = MANIFEST) -> BuildConfig:
    """The manifest's config, typed and validated (FormatError naming the field otherwise)."""
    if "config" not in manifest:
        raise FormatError(f"{where} has no 'config'; not an ich-prep build, or a damaged one: rebuild it")  # fmt: skip
    try:
        return BuildConfig.from_dict(manifest["config"])
    except (ConfigError, TypeError) as e:
        raise FormatError(f"{where}: config: {str(e)[:200]}; rebuild the build") from e


def _count(v) -> bool:
    return type(v) is int and v >= 0


def check_entries(manifest: dict, where: str) -> None:
    """Every shard entry has a unique name, samples/bytes >= 0, an int fold, a 64-hex sha256; the
    counts and the index entry are numbers where readers use them."""
    names = set()
    for e in manifest["shards"]:
        bad = [k for k in ("samples", "bytes") if not _count(e.get(k))]
        bad += [] if type(e.get("fold")) is int else ["fold"]
        bad += [] if SHA256.fullmatch(str(e.get("sha256"))) else ["sha256"]
        if bad or e["name"] in names:
            what = f"bad {', '.join(bad)}" if bad else "listed twice"
            raise FormatError(f"{where}: shard entry {e['name']} has {what}; the manifest is damaged, copy it again or rebuild")  # fmt: skip
        names.add(e["name"])
    counts, index = manifest.get("counts"), manifest.get("index")
    if not (isinstance(counts, dict) and all(_count(counts.get(k)) for k in ("inputs", "ok", "error"))):  # fmt: skip
        raise FormatError(f"{where}: 'counts' lacks whole numbers inputs/ok/error; the manifest is damaged")  # fmt: skip
    if not (isinstance(index, dict) and _count(index.get("bytes")) and SHA256.fullmatch(str(index.get("sha256")))):  # fmt: skip
        raise FormatError(f"{where}: 'index' lacks its bytes and sha256; the manifest is damaged")


def check_shard_names(manifest: dict, where: str) -> None:
    """Shard names are flat file names: a manifest cannot point a reader outside its folder."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise FormatError(f"{where}: 'shards' is not a list")
    for s in shards:
        name = s.get("name") if isinstance(s, dict) else None
        if not (isinstance(name, str) and SAFE_FILE_NAME.fullmatch(name) and name.endswith(".tar")):
            raise FormatError(
                f"{where}: shard name {name!r} is not a plain <name>.tar file name; refusing it"
            )


def load_index(
    root: str | os.PathLike,
    columns: list[str] | None = None,
    manifest: dict | None = None,
    optional: tuple[str, ...] = (),
) -> pd.DataFrame:
    """index.parquet of the build at `root` (folder or URL prefix), bounded before it is
    materialised: at most MAX_INDEX_BYTES on disk, MAX_INDEX_ROWS rows (exactly the manifest's
    `counts.inputs` when `manifest` is given) and MAX_INDEX_INFLATED bytes once decompressed, as the
    Parquet footer declares them; a local path must be a regular file. `columns` must all be
    there; `optional` ones are read when the index has them."""
    url = join(root, INDEX)
    try:
        data = read_bytes(url, MAX_INDEX_BYTES)
    except FileNotFoundError as e:
        raise FormatError(f"{url} not found; copy the whole build folder or rebuild it") from e
    except OSError as e:
        raise FormatError(f"{url} cannot be read ({e}); copy it again or rebuild") from e
    want = None if manifest is None else (manifest.get("counts") or {}).get("inputs")
    return parse_index(data, url, columns, want, optional)


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
    numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
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
        numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
        if not numeric or not np.isfinite(col.to_numpy(np.float64, na_value=np.nan)).all():
            raise FormatError(f"{where}: slice_position holds values that are not finite numbers ({col.dtype}); the index is damaged or edited: run `ich-prep verify` and rebuild the build")  # fmt: skip
    shards = frame.groupby("series", sort=False)["shard"].nunique()
    if (shards > 1).any():
        raise FormatError(f"{where}: series {shards.index[np.argmax(shards.to_numpy() > 1)]} lies in {shards.max()} shards; a series must be whole in one shard (format 2.0): run `ich-prep verify` and rebuild the build")  # fmt: skip
    return sid, rank.astype(np.int64)


def index_mismatches(manifest: dict, index: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Where the index disagrees with the manifest, as (kind, where, message): row counts, one ok
    row per image, each shard's ok rows equal to its `samples` and all of its fold, no ok row in
    a shard the manifest does not list. The one check verify reports and the trainer refuses on."""
    out = []
    c = manifest.get("counts", {})
    ok = index[index["status"] == "ok"]
    if c.get("inputs") != len(index) or c.get("ok") != len(ok):
        out.append(("count", INDEX, f"{INDEX} has {len(index)} rows ({len(ok)} ok), {MANIFEST} says {c.get('inputs')} ({c.get('ok')} ok)"))  # fmt: skip
    for image_id in ok["image_id"][ok["image_id"].duplicated()].unique()[:50]:
        out.append(("duplicate_row", f"{INDEX} row {image_id}", f"{INDEX}: image {image_id} has more than one ok row"))  # fmt: skip
    per_shard = ok["shard"].value_counts().to_dict()
    folds = ok.groupby("shard")["fold"].unique().to_dict()
    for s in manifest["shards"]:
        name, n = s["name"], per_shard.get(s["name"], 0)
        if n != s["samples"]:
            out.append(("count", name, f"{INDEX} has {n} ok rows for {name}, {MANIFEST} says {s['samples']} samples"))  # fmt: skip
        if name in folds and sorted(int(f) for f in folds[name]) != [s["fold"]]:
            out.append(("index", name, f"{INDEX} rows of {name} are fold {sorted(int(f) for f in folds[name])}, {MANIFEST} says fold {s['fold']}"))  # fmt: skip
    listed = {s["name"] for s in manifest["shards"]}
    for row in ok[~ok["shard"].isin(listed)].head(50).itertuples():
        out.append(("missing_sample", f"{INDEX} row {row.image_id}", f"{INDEX} row {row.image_id} points to shard {row.shard!r}, which {MANIFEST} does not list"))  # fmt: skip
    return out
