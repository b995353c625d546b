"""The plan of a build: the header pass, the reconciliation with the labels, folds and shards.

`plan_images` lists every input (files and labels CSV rows) with its header fields (read in
parallel by `_scan_chunk`, cached in `_work/headers.parquet`), series key (`with_series_keys`),
labels, status and fold; `--limit` / `--fraction` keep whole series (`_select_subset`).
`plan_shards` orders each fold's series and packs them whole into shards; `_records` is what a
shard task gets, `shard_key` what decides its bytes (a finished shard is reused only when its key
is unchanged).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ich_prep import LABELS
from ich_prep.build_worker import FILES_PER_WORKER, MAX_DETAIL, _detail, worker_start
from ich_prep.config import BuildConfig
from ich_prep.index import MAX_INDEX_BYTES
from ich_prep.labels import LabelTable, read_labels
from ich_prep.location import (
    InputFile,
    Store,
    join,
)
from ich_prep.outdir import (
    WORK,
)
from ich_prep.read_dicom import ImageError, read_header
from ich_prep.shards import shard_name
from ich_prep.split import (
    assign_folds,
    pack_series,
    series_keys,
    series_order,
    slice_order,
)

HEADER_FIELDS = [
    "patient_id",
    "study_id",
    "series_id",
    "z_position",
    "slice_position",
    "instance_number",
    "pixel_spacing_y",
    "pixel_spacing_x",
    "rows",
    "cols",
]


# Read in the header pass, not indexed: counted in the manifest (`counts.orientation_fallback`), or
# used to key a series without SeriesInstanceUID (split.series_keys).
SCAN_ONLY = ["orientation_fallback", "slice_normal", "frame_of_reference", "series_number"]


# Read in the header pass and handed to the shard task, so the compile does not convert them again.
PIXEL_FIELDS = [
    "bits_stored",
    "pixel_representation",
    "rescale_slope",
    "rescale_intercept",
    "pixel_padding_value",
]


def _scan_chunk(root: str, rels: list[str], parent_pid: int | None = None) -> list[dict]:
    """Read the headers of a chunk of files; failures become rows with a reason."""
    worker_start(parent_pid)
    rows = []
    for rel in rels:
        try:
            h = read_header(join(root, rel))
            rows.append(
                {
                    "path": rel,
                    **{k: h[k] for k in HEADER_FIELDS + PIXEL_FIELDS + SCAN_ONLY},
                    "reason": None,
                    "detail": None,
                }
            )
        except ImageError as e:
            rows.append({"path": rel, "reason": e.reason, "detail": e.detail[:MAX_DETAIL]})
        except Exception as e:  # noqa: BLE001 - one damaged file must never stop a compile
            rows.append({"path": rel, "reason": "unreadable", "detail": _detail(rel, e)})
    return rows


# A tar member key every reader (shards.SAFE_FILE_NAME) and webdataset keep whole.
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")


def _image_id(rel: str) -> str:
    """The sample key of a file: its name without `.dcm` when that is a safe key (RSNA's `ID_...`),
    else the name with every run of other characters as `_`, cut to 48, plus 12 hex of its sha256
    (webdataset splits a key at its first dot; tar names are bounded). The index keeps the path."""
    stem = Path(rel).name[: -len(".dcm")]
    if SAFE_ID.fullmatch(stem):
        return stem
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).lstrip("_-")[:48].rstrip("_-")
    digest = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{safe}_{digest}" if safe else f"file_{digest}"


def _select_subset(group: dict[str, str], ids: list[str], cfg: BuildConfig) -> tuple[set[str] | None, dict]:  # fmt: skip
    """--limit / --fraction: (the kept image ids, what was kept). Whole series only (`group`: the
    image id of every file -> its series key after the header pass, `series:<id>`, or `file:<id>`
    for a file whose header could not be read), so the kept slices are exactly their series'
    slices: --context neighbours, ranks and the series crop box are those of a full build. Series
    are drawn in a seeded order and kept while the total stays within the target (N, or the
    fraction of the files); the first one drawn is kept whatever its size. `ids` (every input:
    files and CSV rows) only counts the CSV rows that name no file: a subset leaves them out."""
    if cfg.limit is None and cfg.fraction is None:
        return None, {}
    files = sorted(group)
    n = len(files) if cfg.limit is None else min(cfg.limit, len(files))
    if cfg.fraction is not None:
        n = min(n, max(1, round(cfg.fraction * len(files))))
    names, codes = np.unique(np.asarray([group[i] for i in files], dtype=object).astype(str), return_inverse=True)  # fmt: skip
    sizes = np.bincount(codes, minlength=len(names))
    take, total = [], 0
    for g in np.random.default_rng(cfg.seed).permutation(len(names)):
        if take and total + sizes[g] > n:
            break
        take.append(g)
        total += int(sizes[g])
    kept = np.isin(codes, take)
    return {i for i, k in zip(files, kept, strict=True) if k}, {
        "images": int(kept.sum()),
        "of_images": len(files),
        "series": sum(k.startswith("series:") for k in names[take]),
        "of_series": int(sum(k.startswith("series:") for k in names)),
        "csv_rows_without_file_left_out": len(set(ids) - set(group)),
    }


def _files_table(inputs: list[InputFile]) -> pd.DataFrame:
    """One row per input file: path, image_id, file_size, file_mtime_ns, and reason/detail for the
    files that are never opened (not regular, name not UTF-8); sorted by path, as listed."""
    named = [_is_utf8(f.path) for f in inputs]  # before any table: arrow strings refuse surrogates
    reason = [
        ("not_regular_file" if not f.regular else None) if ok else "bad_file_name"
        for f, ok in zip(inputs, named, strict=True)
    ]
    files = pd.DataFrame(
        {
            "path": [
                f.path if ok else _printable(f.path) for f, ok in zip(inputs, named, strict=True)
            ],
            "image_id": [_image_id(f.path) for f in inputs],
            "file_size": pd.array([f.size for f in inputs], dtype="Int64"),
            "file_mtime_ns": pd.array([f.mtime_ns for f in inputs], dtype="Int64"),
            "reason": pd.array(reason, dtype=object),
        },
    )
    why = {
        "not_regular_file": "not a regular file (a FIFO, device, socket or broken link); only regular files are read",
        "bad_file_name": "file name is not valid UTF-8; rename it",
    }
    files["detail"] = [f"{p}: {why[r]}" if r in why else None for p, r in zip(files["path"], files["reason"], strict=True)]  # fmt: skip
    return files


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(s: str) -> str:
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def plan_images(
    cfg: BuildConfig,
    inputs: list[InputFile],
    jobs: int,
    store: Store,
    progress: bool,
    lt: LabelTable | None = None,
) -> pd.DataFrame:
    """One row per input with header fields, labels, status; ok rows get a fold. (Slice ranks
    come after compiling, from the slices that compiled: build.series_columns.)"""
    files = _files_table(inputs)
    dup = files["image_id"].duplicated(keep="first")
    dup_rows = files[dup].assign(
        reason="duplicate_file", detail=lambda d: d["path"] + ": another file has the same image id"
    )
    files = files[~dup]
    unopened, files = files[files["reason"].notna()], files[files["reason"].isna()]
    files = files.drop(columns=["reason", "detail"])
    labels, label_errors, label_stats = _label_table(cfg, lt)
    universe = sorted(
        set(files["image_id"])
        | set(unopened["image_id"])
        | set(labels.index)
        | set(label_errors["image_id"])
        | set(dup_rows["image_id"])
    )
    # every header is read, also for a subset: it is made of whole series (_select_subset)
    headers = with_series_keys(_scan_headers(cfg.dicom_dir, files, jobs, store, progress))
    read = files.merge(headers[headers["reason"].isna()], on="path")
    group = {i: f"file:{i}" for i in (*files["image_id"], *unopened["image_id"])}
    group.update(zip(read["image_id"], "series:" + read["series_id"], strict=True))
    subset, chosen = _select_subset(group, universe, cfg)
    if subset is not None:
        files = files[files["image_id"].isin(subset)]
        headers = headers[headers["path"].isin(files["path"])]
        labels = labels[labels.index.isin(subset)]
        label_errors = label_errors[label_errors["image_id"].isin(subset)]
        dup_rows = dup_rows[dup_rows["image_id"].isin(subset)]
        unopened = unopened[unopened["image_id"].isin(subset)]
    df = pd.concat([files.merge(headers, on="path", how="left"), unopened], ignore_index=True)
    df = df.merge(
        labels, left_on="image_id", right_index=True, how="outer" if cfg.labels else "left"
    )
    df["path"] = df["path"].where(df["path"].notna(), None)
    if cfg.labels is not None:
        df = _with_label_errors(df, label_errors)
    df = _with_folds(pd.concat([df, dup_rows], ignore_index=True), cfg)
    df.attrs["label_stats"] = label_stats
    if subset is not None:  # the patients of the kept series
        chosen["patients"] = int(df.loc[df["status"] == "ok", "patient_id"].nunique())
        df.attrs["subset"] = chosen
    return df


def _label_table(cfg: BuildConfig, lt: LabelTable | None):
    """(labels by image id, label error rows, label stats) of the labels CSV (empty without one).
    CSV ids name files: keyed like file names (the same for every RSNA id; a hashed key for an id
    over 80 characters, so its file is still found)."""
    if cfg.labels is None:
        empty = pd.DataFrame(columns=["image_id", "reason", "detail"])
        return pd.DataFrame(columns=list(LABELS)), empty, {}
    lt = lt if lt is not None else read_labels(cfg.labels)
    labels, label_errors = lt.labels, lt.errors.copy()
    labels.index = labels.index.map(lambda i: _image_id(f"{i}.dcm"))
    label_errors["image_id"] = label_errors["image_id"].map(lambda i: _image_id(f"{i}.dcm"))
    return labels, label_errors.drop_duplicates("image_id"), lt.stats


def _fail(df: pd.DataFrame, mask, reason: str, detail) -> None:
    """Rows of `mask` that have no reason yet get `reason` and `detail` (a value or a Series)."""
    m = mask & df["reason"].isna()
    df.loc[m, "reason"] = reason
    df.loc[m, "detail"] = detail[m] if isinstance(detail, pd.Series) else detail


def _with_label_errors(df: pd.DataFrame, label_errors: pd.DataFrame) -> pd.DataFrame:
    """The label problems of images that have a file on their rows, the others as rows of their
    own; CSV rows without a file (missing_file) and files without CSV rows (unlabeled_file)."""
    lerr = label_errors.set_index("image_id")
    in_files = lerr.index.isin(df["image_id"])
    m = df["image_id"].isin(lerr.index)
    df.loc[m, "reason"] = df.loc[m, "image_id"].map(lerr["reason"])
    df.loc[m, "detail"] = df.loc[m, "image_id"].map(lerr["detail"])
    extra = lerr[~in_files].reset_index()
    df = pd.concat([df, extra.assign(path=None)], ignore_index=True)
    missing = "labels CSV lists " + df["image_id"] + " but no file " + df["image_id"] + ".dcm exists under --dicom-dir"  # fmt: skip
    _fail(df, df["path"].isna(), "missing_file", missing)
    _fail(df, df["any"].isna(), "unlabeled_file", df["path"].fillna("") + ": no rows for this image in the labels CSV")  # fmt: skip
    return df


def _with_folds(df: pd.DataFrame, cfg: BuildConfig) -> pd.DataFrame:
    """`df` with status, split and fold (patient-grouped, stratified: split.assign_folds; -1 in a
    test build and on error rows), sorted by image id."""
    df["status"] = np.where(df["reason"].isna(), "ok", "error")
    df["split"] = cfg.split
    ok = df["status"] == "ok"
    df["fold"] = np.int8(-1)
    if cfg.labels is not None and ok.any():
        df.loc[ok, "fold"] = assign_folds(
            df.loc[ok, "patient_id"].to_numpy(),
            df.loc[ok, list(LABELS)].to_numpy(np.int8),
            cfg.folds,
            cfg.seed,
        )
    return df.sort_values("image_id", kind="stable").reset_index(drop=True)


def with_series_keys(headers: pd.DataFrame) -> pd.DataFrame:
    """`headers` with each read slice's series key in `series_id` and where it came from in
    `series_source` (split.series_keys: a missing SeriesInstanceUID never merges scans); both null
    on rows whose header could not be read."""
    headers = headers.copy()
    read = headers["reason"].isna().to_numpy()
    h = headers[read]
    keys, source = series_keys(*(h[c].to_numpy() for c in ("patient_id", "study_id", "series_id", "frame_of_reference", "slice_normal", "series_number", "slice_position", "path")))  # fmt: skip
    headers["series_source"] = pd.Series([None] * len(headers), dtype=object, index=headers.index)
    headers.loc[read, "series_id"] = keys
    headers.loc[read, "series_source"] = source
    return headers


STAT_KEY = ["path", "file_size", "file_mtime_ns"]


SCAN_COLUMNS = ["path", *HEADER_FIELDS, *PIXEL_FIELDS, *SCAN_ONLY, "reason", "detail"]


def _scan_headers(
    root: str, files: pd.DataFrame, jobs: int, store: Store, progress: bool
) -> pd.DataFrame:
    """Header rows for `files` (path, file_size, file_mtime_ns). Cached in `_work/headers.parquet`
    keyed on each file's path, size and mtime: a file that changed since it was read is read again."""
    cache = f"{WORK}/headers.parquet"
    cached = None
    if store.exists(cache):
        with contextlib.suppress(ValueError):  # damaged or not parquet: read the headers again
            cached = pd.read_parquet(io.BytesIO(store.read_bytes(cache, MAX_INDEX_BYTES)))
        if cached is not None and not set(STAT_KEY + SCAN_COLUMNS) <= set(cached.columns):
            cached = None  # written by an older version: read the headers again
    if cached is not None:
        cached = cached.merge(files[STAT_KEY], on=STAT_KEY, how="inner")
    todo = files if cached is None else files[~files["path"].isin(cached["path"])]
    fresh = _read_headers(root, todo, jobs, progress)
    df = fresh if cached is None or cached.empty else pd.concat([cached, fresh], ignore_index=True)
    df = df.sort_values("path", kind="stable").reset_index(drop=True)
    if len(todo):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        store.write_bytes(cache, buf.getvalue())
    return df.drop(columns=["file_size", "file_mtime_ns"])


def _read_headers(root: str, files: pd.DataFrame, jobs: int, progress: bool) -> pd.DataFrame:
    rels = files["path"].tolist()
    chunk = FILES_PER_WORKER
    chunks = [rels[i : i + chunk] for i in range(0, len(rels), chunk)]
    rows: list[dict] = []
    with tqdm(total=len(rels), desc="headers", unit="img", disable=not progress) as bar:
        # no more workers than chunks: one chunk is read here, starting no worker
        for res in joblib.Parallel(n_jobs=max(1, min(jobs, len(chunks))), return_as="generator")(
            joblib.delayed(_scan_chunk)(root, c, os.getpid()) for c in chunks
        ):
            rows.extend(res)
            bar.update(len(res))
    df = pd.DataFrame(rows, columns=SCAN_COLUMNS)
    for c in ("rows", "cols", "bits_stored", "pixel_representation", "pixel_padding_value"):
        df[c] = df[c].astype("Int32")
    df["instance_number"] = df["instance_number"].astype("Int64")
    df["orientation_fallback"] = df["orientation_fallback"].astype("boolean")
    for c in ("reason", "detail", "patient_id", "study_id", "series_id", "slice_normal", "frame_of_reference", "series_number"):  # fmt: skip
        df[c] = df[c].astype(object)
    for c in (
        "z_position",
        "slice_position",
        "pixel_spacing_y",
        "pixel_spacing_x",
        "rescale_slope",
        "rescale_intercept",
    ):
        df[c] = df[c].astype(float)
    return df.merge(files[STAT_KEY], on="path", how="left")


def _in_slice_order(part: pd.DataFrame) -> pd.DataFrame:
    """`part`'s rows sorted by series, then slice order (split.slice_order)."""
    return part.iloc[
        slice_order(
            part["series_id"].to_numpy(),
            part["slice_position"].to_numpy(np.float64),
            part["instance_number"].to_numpy(np.float64, na_value=np.nan),
            part["image_id"].to_numpy(),
        )
    ]


def fold_order(part: pd.DataFrame, seed: int, fold: int) -> pd.DataFrame:
    """One fold's ok images in write order: its series in a seeded-random order (series_order),
    each series whole and in slice order."""
    part = _in_slice_order(part)
    place = {s: i for i, s in enumerate(series_order(part["series_id"].to_numpy(), seed, fold))}
    where = part["series_id"].astype(str).map(place).to_numpy()
    return part.iloc[np.argsort(where, kind="stable")]


def plan_shards(df: pd.DataFrame, cfg: BuildConfig) -> dict[str, pd.DataFrame]:
    """Shard name -> its ok images in write order. Whole shards belong to one fold; a series is
    written whole, in slice order, into one shard, closed before the next series would take it
    past `cfg.shard_size` images (pack_series)."""
    plan = {}
    ok = df[df["status"] == "ok"]
    for fold in sorted(ok["fold"].unique()):
        part = fold_order(ok[ok["fold"] == fold], cfg.seed, int(fold))
        series = part["series_id"].astype(str).to_numpy()
        starts = np.flatnonzero(np.r_[True, series[1:] != series[:-1]])
        sizes = np.diff(np.r_[starts, len(part)])
        shard_of = np.repeat(pack_series(sizes, cfg.shard_size), sizes)
        for n in range(int(shard_of[-1]) + 1 if len(part) else 0):
            plan[shard_name(cfg.split, int(fold), n)] = part[shard_of == n]
    return plan


def _py(v):
    """numpy/pandas scalar -> plain Python (None for missing), so records are cheap to ship."""
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _records(part: pd.DataFrame, root: str, labelled: bool) -> list[dict]:
    """What a shard task needs, as small plain dicts (workers never see the whole table)."""
    recs = []
    for r in part.itertuples(index=False):
        recs.append(
            {
                "image_id": r.image_id,
                "path": join(root, r.path),
                "header": {k: _py(getattr(r, k)) for k in HEADER_FIELDS + PIXEL_FIELDS},
                "meta": {
                    "image_id": r.image_id,
                    "patient_id": r.patient_id,
                    "study_id": r.study_id,
                    "series_id": r.series_id,
                    "z_position": float(r.z_position),
                    "slice_position": float(r.slice_position),
                    "fold": int(r.fold),
                    "labels": [int(getattr(r, k)) for k in LABELS] if labelled else None,
                },
            }
        )
    return recs


KEY_COLUMNS = ["image_id", "path", "file_size", "file_mtime_ns", *HEADER_FIELDS, *PIXEL_FIELDS, "fold", *LABELS]  # fmt: skip


def shard_key(part: pd.DataFrame, cfg: BuildConfig) -> str:
    """sha256 of everything that decides a shard's bytes: the config and, row by row in write
    order, its files (path, size, mtime), headers, labels and fold (the order decides the ranks:
    _ranked). A finished shard is reused only when its key is unchanged. Vectorised (pandas'
    per-row hash): ~5 us per image."""
    rows = pd.util.hash_pandas_object(part[KEY_COLUMNS], index=False)
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(rows.to_numpy().tobytes())
    return h.hexdigest()
