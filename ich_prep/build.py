"""Build orchestration: scan -> reconcile with labels -> folds -> one joblib task per shard -> index + manifest.

Resumable: each finished shard leaves `_work/<shard>.json` (its per-image results, written after
the tar is renamed into place); a re-run skips those shards and produces the same bytes. The
manifest is written last and atomically, so a folder with a manifest is a finished build.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ich_prep import LABELS
from ich_prep.config import BuildConfig
from ich_prep.errors import UserError
from ich_prep.index import INDEX, MAX_INDEX_BYTES, SPAN_COLUMNS, index_frame, parse_index
from ich_prep.labels import LabelTable, read_labels
from ich_prep.location import (
    InputFile,
    Store,
    is_dir,
    join,
    list_inputs,
    open_stream,
    sha256_stream,
)
from ich_prep.manifest import MANIFEST, MAX_MANIFEST_BYTES, Build, recorded, write_build
from ich_prep.outdir import (
    WORK,
    BuildLock,
    check_apart,
    check_out_path,
    ledger_names,
    owned_names,
    remove_ledger,
    remove_owned,
)
from ich_prep.read_dicom import ImageError, read_header, read_slice
from ich_prep.shards import MAX_JSON_BYTES, encode_meta, write_shard
from ich_prep.split import (
    assign_folds,
    duplicate_positions,
    pack_series,
    series_keys,
    series_order,
    slice_order,
    slice_ranks,
)
from ich_prep.transform import ImplausibleHU, compile_stored, series_box, stored_head_box

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


# Error reasons of the build and the labels CSV (read_dicom.REASONS has the per-file reading
# ones): together, every `reason` an index row can have.
BUILD_REASONS = {
    "bad_file_name": "a file name that is not valid UTF-8 (cannot be recorded in the index)",
    "compile_failed": "reading worked but turning the pixels into the image failed (type and message in detail)",
    "metadata_too_large": "the sample's json would exceed the readers' limit (an oversized tag value)",
    "duplicate_file": "another file has the same image id",
    "missing_file": "the labels CSV lists an image with no file",
    "unlabeled_file": "a file with no rows in the labels CSV",
    # from ich_prep.labels: rows of the labels CSV
    "malformed_csv_id": "a CSV ID that is not ID_<image>_<subtype>",
    "malformed_label": "a CSV label that is not 0 or 1",
    "conflicting_labels": "two CSV rows give one (image, subtype) different labels",
    "missing_labels": "an image without a row for every subtype",
    "any_mismatch": "'any' disagrees with the subtypes",
}
MAX_DETAIL = 500  # characters of an error row's detail


class BuildError(UserError):
    """The build cannot start or finish (config mismatch, nothing to build, too many errors)."""


@dataclass
class BuildResult:
    out: Path
    manifest: dict  # as written
    summary: dict = field(default_factory=dict)

    @property
    def build(self) -> Build:
        """The finished build, opened (manifest.Build)."""
        return Build.of(self.out, self.manifest)


# ---------------------------------------------------------------- workers


_watching = threading.Event()


def exit_with_parent(parent_pid: int | None) -> None:
    """In a loky worker of the build process `parent_pid`: exit as soon as that parent is gone
    (kill -9 included), instead of compiling the tasks already queued for it into --out.

    A daemon thread polls getppid() twice a second (an orphan is re-parented, so it changes); a
    worker that is already an orphan when a task reaches it exits at once. Does nothing in the
    build process itself (--jobs 1) or outside loky workers (a Dask worker's parent is a nanny)."""
    if parent_pid is None or os.getpid() == parent_pid or _watching.is_set():
        return
    if not multiprocessing.current_process().name.startswith("LokyProcess"):
        return
    if os.getppid() != parent_pid:
        os._exit(1)
    _watching.set()

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="ich-prep-exit-with-parent", daemon=True).start()


# ---------------------------------------------------------------- scanning (header pass)


def _scan_chunk(root: str, rels: list[str], parent_pid: int | None = None) -> list[dict]:
    """Read the headers of a chunk of files; failures become rows with a reason."""
    exit_with_parent(parent_pid)
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


def _detail(where: str, e: Exception) -> str:
    return f"{where}: {type(e).__name__}: {e}"[:MAX_DETAIL]


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
    come after compiling, from the slices that compiled: series_columns.)"""
    files = _files_table(inputs)
    dup = files["image_id"].duplicated(keep="first")
    dup_rows = files[dup].assign(
        reason="duplicate_file", detail=lambda d: d["path"] + ": another file has the same image id"
    )
    files = files[~dup]
    unopened, files = files[files["reason"].notna()], files[files["reason"].isna()]
    files = files.drop(columns=["reason", "detail"])

    if cfg.labels is not None:
        lt = lt if lt is not None else read_labels(cfg.labels)
        labels, label_errors, label_stats = lt.labels, lt.errors.copy(), lt.stats
        # CSV ids name files: key them like file names (the same for every RSNA id; a hashed key
        # for an id over 80 characters, so its file is still found)
        labels.index = labels.index.map(lambda i: _image_id(f"{i}.dcm"))
        label_errors["image_id"] = label_errors["image_id"].map(lambda i: _image_id(f"{i}.dcm"))
    else:
        labels, label_errors, label_stats = (
            pd.DataFrame(columns=list(LABELS)),
            pd.DataFrame(columns=["image_id", "reason", "detail"]),
            {},
        )
    label_errors = label_errors.drop_duplicates("image_id")

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

    def fail(mask, reason, detail):
        m = mask & df["reason"].isna()
        df.loc[m, "reason"] = reason
        df.loc[m, "detail"] = detail[m] if isinstance(detail, pd.Series) else detail

    if cfg.labels is not None:
        lerr = label_errors.set_index("image_id")
        in_files = lerr.index.isin(df["image_id"])
        # Label problems of images that have a file: the image row carries the label reason.
        m = df["image_id"].isin(lerr.index)
        df.loc[m, "reason"] = df.loc[m, "image_id"].map(lerr["reason"])
        df.loc[m, "detail"] = df.loc[m, "image_id"].map(lerr["detail"])
        extra = lerr[~in_files].reset_index()
        df = pd.concat([df, extra.assign(path=None)], ignore_index=True)
        fail(
            df["path"].isna(),
            "missing_file",
            "labels CSV lists "
            + df["image_id"]
            + " but no file "
            + df["image_id"]
            + ".dcm exists under --dicom-dir",
        )
        fail(
            df["any"].isna(),
            "unlabeled_file",
            df["path"].fillna("") + ": no rows for this image in the labels CSV",
        )
    df = pd.concat([df, dup_rows], ignore_index=True)

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
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    df.attrs["label_stats"] = label_stats
    if subset is not None:  # the patients of the kept series
        chosen["patients"] = int(df.loc[df["status"] == "ok", "patient_id"].nunique())
        df.attrs["subset"] = chosen
    return df


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
    chunk = 256
    chunks = [rels[i : i + chunk] for i in range(0, len(rels), chunk)]
    rows: list[dict] = []
    with tqdm(total=len(rels), desc="headers", unit="img", disable=not progress) as bar:
        for res in joblib.Parallel(n_jobs=jobs, return_as="generator")(
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


# ---------------------------------------------------------------- shards


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
        prefix = f"train-f{int(fold)}" if cfg.split == "train" else "test"
        for n in range(int(shard_of[-1]) + 1 if len(part) else 0):
            plan[f"{prefix}-{n:05d}.tar"] = part[shard_of == n]
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


def _read_stored(rec: dict, cfg: BuildConfig) -> tuple[np.ndarray, dict]:
    """One DICOM -> (stored values (H, W), its header). Raises ImageError."""
    h = rec.get("header")
    stored, h = read_slice(rec["path"], h if h and h.get("rows") else None)
    spacing = (h["pixel_spacing_y"], h["pixel_spacing_x"])
    if cfg.spacing_mm is not None and not all(v is not None and np.isfinite(v) for v in spacing):
        raise ImageError(
            "missing_tag",
            f"{rec['path']}: PixelSpacing (0028,0030) is missing; --spacing-mm needs it to resample",
        )
    return stored, h


def _head_box(stored: np.ndarray, h: dict, path: str):
    """stored_head_box; a rescale (RescaleSlope/Intercept (0028,1053/1052)) that gives no
    Hounsfield units (transform.check_hu: a constant slice, most of the head box above any head
    CT's range) is the file's 'bad_rescale' error, like a slope of 0."""
    try:
        return stored_head_box(stored, h)
    except ImplausibleHU as e:
        raise ImageError("bad_rescale", f"{path}: RescaleSlope={h['rescale_slope']!r} RescaleIntercept={h['rescale_intercept']!r}: {e}") from None  # fmt: skip


def _finish(
    rec: dict, cfg: BuildConfig, h: dict, stored: np.ndarray, box
) -> tuple[np.ndarray, dict]:
    """Stored values cropped to `box` (None: the whole slice) -> (uint8 image, metadata).
    Raises ImageError."""
    windows = [(w.center, w.width) for w in cfg.windows]
    img = compile_stored(stored, h, box, windows, cfg.size, cfg.spacing_mm)
    meta = dict(rec["meta"])
    meta.update(
        pixel_spacing=[h["pixel_spacing_y"], h["pixel_spacing_x"]],
        original_shape=[h["rows"], h["cols"]],
        crop_box=[int(v) for v in box] if box is not None else None,
    )
    if len(encode_meta(meta)) > MAX_JSON_BYTES:
        raise ImageError(
            "metadata_too_large",
            f"{rec['path']}: its sample json would exceed the readers' {MAX_JSON_BYTES}-byte limit "
            "(an oversized tag value)",
        )
    return img, meta


def compile_record(rec: dict, cfg: BuildConfig) -> tuple[np.ndarray, dict]:
    """One DICOM cropped to its own head box (`--crop slice`) -> (uint8 image (size, size, 3),
    metadata). Raises ImageError."""
    stored, h = _read_stored(rec, cfg)
    return _finish(rec, cfg, h, stored, _head_box(stored, h, rec["path"]))


# --crop series holds the stored values of one series between its two passes (boxes, then crops),
# up to this many bytes (a 512x512 slice is 512 KiB); the slices beyond it are read again in the
# second pass. Same bytes either way; holding is faster (docs/benchmarks.md).
SERIES_HOLD_BYTES = 128 * 2**20


class SeriesCrops:
    """`--crop series` inside one shard task, whose records arrive as whole series in slice order.

    The first time a slice of a series is compiled, the whole series is read (pass 1: each slice's
    stored values and head box, kept in memory up to SERIES_HOLD_BYTES per series) and its box
    chosen: transform.series_box over the boxes of the slices of the series' common geometry (the
    most frequent (rows, cols, pixel spacing), ties to the earliest in slice order). Every such
    slice is cropped with that box; a slice of another shape or spacing (it cannot share pixel
    coordinates) is cropped with its own head box, as under `--crop slice`, and listed in
    `fallback`. A slice that fails to read in pass 1 raises that error when it is compiled (its own
    error row); it takes no part in the box and stops nothing else. The held arrays are the ones
    the read returned (a view of the file's bytes for a native file): nothing is copied."""

    def __init__(self, cfg: BuildConfig, hold_bytes: int | None = None):
        self.cfg = cfg
        self.hold = SERIES_HOLD_BYTES if hold_bytes is None else hold_bytes
        self.series: str | None = None
        self.slices: dict[str, dict] = {}
        self.fallback: set[str] = set()

    def _prepare(self, recs: list[dict]) -> None:
        """Pass 1 over one series' records: stored values, header and head box of each, then the
        series' box."""
        self.slices, held, geometry = {}, 0, {}
        for rec in recs:
            s: dict = {"rec": rec}
            try:
                stored, h = _read_stored(rec, self.cfg)
                s.update(h=h, box=_head_box(stored, h, rec["path"]))
                if held + stored.nbytes <= self.hold:
                    s["stored"], held = stored, held + stored.nbytes
                g = (stored.shape, h["pixel_spacing_y"], h["pixel_spacing_x"])
                s["geometry"] = g
                geometry.setdefault(g, []).append(rec["image_id"])
            except Exception as e:  # noqa: BLE001 - raised again when this slice is compiled
                s["error"] = e.with_traceback(None)  # keep no frames (and their arrays) alive
            self.slices[rec["image_id"]] = s
        if not geometry:
            return
        # the most frequent geometry; max keeps the first of equals, dicts their insertion order
        common = max(geometry, key=lambda g: len(geometry[g]))
        box = series_box([self.slices[i]["box"] for i in geometry[common]])
        for s in self.slices.values():
            if "geometry" in s and s["geometry"] == common:
                s["box"] = box
            elif "geometry" in s:
                self.fallback.add(s["rec"]["image_id"])

    def compile(self, rec: dict, series_recs: list[dict]) -> tuple[np.ndarray, dict]:
        """(uint8 image, metadata) of `rec` cropped with its series' box; `series_recs` are the
        records of its series (read in pass 1 when the series is new). Raises ImageError."""
        sid = rec["meta"]["series_id"]
        if sid != self.series:
            self.series = sid
            self._prepare(series_recs)
        s = self.slices.pop(rec["image_id"], None)
        if s is None:  # not among its series' records: cannot happen in a planned shard
            return compile_record(rec, self.cfg)
        if "error" in s:
            raise s["error"]
        stored, h = (s["stored"], s["h"]) if "stored" in s else _read_stored(rec, self.cfg)
        return _finish(rec, self.cfg, h, stored, s["box"])


def _compile_one(rec: dict, cfg: BuildConfig, compile_fn=None) -> tuple[np.ndarray | None, dict]:
    """(image, meta) or (None, error result): whatever goes wrong with one file is its error row.
    `compile_fn(rec)` compiles it (default: compile_record, its own head box)."""
    try:
        img, meta = (compile_fn or (lambda r: compile_record(r, cfg)))(rec)
    except ImageError as e:
        return None, {"image_id": rec["image_id"], "reason": e.reason, "detail": e.detail[:MAX_DETAIL]}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - one damaged file must never stop a compile
        return None, {"image_id": rec["image_id"], "reason": "compile_failed", "detail": _detail(rec["path"], e)}  # fmt: skip
    return img, meta


def _series_of(recs: list[dict]) -> dict[str, list[dict]]:
    """Series id -> its records, in the order given (a shard holds each series whole)."""
    out: dict[str, list[dict]] = {}
    for rec in recs:
        out.setdefault(rec["meta"]["series_id"], []).append(rec)
    return out


def _ranked(recs: list[dict], results: list[dict]):
    """`recs` (whole series, each in slice order) with `slice_rank` set in their meta: the number of
    slices of the same series before it that compiled (found in `results` as they are appended),
    so ranks run 0..n-1 over the ok slices with no gap where one failed."""
    series, rank, seen = None, 0, len(results)
    for rec in recs:
        rank += sum(r["reason"] is None for r in results[seen:])  # the previous slice, if ok
        seen = len(results)
        if rec["meta"]["series_id"] != series:
            series, rank = rec["meta"]["series_id"], 0
        yield {**rec, "meta": {**rec["meta"], "slice_rank": rank}}


def compile_shard(
    out: str, name: str, recs: list[dict], cfg: BuildConfig, key: str, parent_pid: int | None = None
) -> dict:
    """Joblib task: compile one shard's images into `out/name`; return and persist per-image results.

    The tar is moved into place first, then `_work/<name>.json` (with `key`, see shard_key): a
    shard counts as done only when both exist, the key matches and the tar's hash matches, so a
    task killed anywhere, or one whose inputs changed, is simply run again.
    """
    exit_with_parent(parent_pid)
    results = []
    crops = SeriesCrops(cfg) if cfg.crop == "series" else None
    series = _series_of(recs) if crops is not None else {}

    def samples():
        for rec in _ranked(recs, results):
            fn = (lambda r: crops.compile(r, series[r["meta"]["series_id"]])) if crops else None
            img, meta = _compile_one(rec, cfg, fn)
            if img is None:
                results.append(meta)
                continue
            results.append({"image_id": rec["image_id"], "reason": None, "detail": None, "crop_box": meta["crop_box"]})  # fmt: skip
            if crops is not None and rec["image_id"] in crops.fallback:
                results[-1]["crop_fallback"] = True
            yield {"__key__": rec["image_id"], "image": img, "meta": meta}

    store = Store(out)
    # The ledger names the shard before it is moved into place: a shard-named file no record
    # names is never ours (outdir.owned_names), even one a task killed after the move left.
    store.write_bytes(f"{WORK}/{name}.json", json.dumps({"key": None}).encode())
    spans: dict = {}
    info = write_shard(store, name, samples(), cfg.encoding, spans)
    for r in results:  # each written sample's bytes in the shard: one range read fetches it
        if r["reason"] is None:
            r["span"] = list(spans[r["image_id"]])
    done = {"shard": info, "results": results, "key": key}
    store.write_bytes(f"{WORK}/{name}.json", json.dumps(done, sort_keys=True).encode())
    return done


def _record(store: Store, name: str) -> dict | None:
    """The ledger record of a shard an earlier run finished (not one only started), or None."""
    rec = f"{WORK}/{name}.json"
    if not store.exists(rec):
        return None
    try:
        done = json.loads(store.read_bytes(rec, MAX_MANIFEST_BYTES))
    except ValueError:
        return None
    return done if isinstance(done, dict) and "shard" in done else None


def _load_done(store: Store, name: str, key: str) -> dict | None:
    """Results of a shard a previous run finished from the same inputs, if its tar is intact."""
    done = _record(store, name)
    if done is None or done.get("key") != key or not store.exists(name):
        return None
    if any(r.get("reason") is None and "span" not in r for r in done.get("results", [])):
        return None  # a ledger from before spans were recorded: compile the shard again
    if store.size(name) != done["shard"]["bytes"] or store.sha256(name) != done["shard"]["sha256"]:
        return None
    return done


# ---------------------------------------------------------------- the build


def _differs(theirs: str | None, cfg: BuildConfig) -> str:
    """What differs between the config a folder records and `cfg`, flag by flag."""
    try:
        old = json.loads(theirs) if theirs is not None else None
    except ValueError:
        old = None
    if not isinstance(old, dict):
        return "its recorded config cannot be read"
    return "; ".join(BuildConfig.differences(old, cfg.to_dict())) or "recorded differently"


def _prepare_out(store: Store, cfg: BuildConfig, overwrite: bool) -> None:
    """Create the output, or check that what is there was made by the same config; with
    `overwrite`, delete what an earlier build of ours wrote there (owned_names), nothing else."""
    state = f"{WORK}/config.json"
    ours = json.dumps(cfg.to_dict(), sort_keys=True)
    owned, foreign = owned_names(store)
    if not owned and foreign:
        raise BuildError(
            f"--out {store} holds files that no ich-prep build wrote ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder for --out"
        )
    if owned:
        theirs = None
        with contextlib.suppress(ValueError):  # unreadable: a different config, said so
            if store.exists(state):
                theirs = store.read_bytes(state, MAX_MANIFEST_BYTES).decode()
            elif store.exists(MANIFEST):
                m = recorded(store)
                theirs = json.dumps(m.config if m is not None else None, sort_keys=True)
        if theirs != ours and not overwrite:
            raise BuildError(
                f"{store} already holds a build with a different config ({_differs(theirs, cfg)}); "
                "run with the same settings to resume it, choose another --out, or pass "
                "--overwrite to replace it"
            )
        if overwrite:
            if foreign:
                raise BuildError(
                    f"--overwrite: {store} also holds files no ich-prep build wrote "
                    f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); nothing was "
                    "deleted: move them away or choose another --out"
                )
            remove_owned(store, owned)
    store.makedirs(WORK)
    store.write_bytes(state, ours.encode())


def series_columns(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with slice_rank and series_len (int32) and duplicate_position (bool) from its ok rows,
    nulls on error rows: ranks 0..n-1 in slice order over the slices that compiled. A series is a
    series id within one fold, as the shards hold it."""
    df = df.copy()
    ok = (df["status"] == "ok").to_numpy()
    part = df[ok]
    key = (part["fold"].astype(str) + "/" + part["series_id"].astype(str)).to_numpy()
    pos = part["slice_position"].to_numpy(np.float64)
    inst = part["instance_number"].to_numpy(np.float64, na_value=np.nan)
    rank, length = slice_ranks(key, pos, inst, part["image_id"].to_numpy())
    for col, values, dtype in (
        ("slice_rank", rank, "Int32"),
        ("series_len", length, "Int32"),
        ("duplicate_position", duplicate_positions(key, pos), "boolean"),
    ):
        df[col] = pd.array([pd.NA] * len(df), dtype=dtype)
        df.loc[ok, col] = values
    return df


def _index_table(df: pd.DataFrame, shard_of: dict[str, str]) -> pd.DataFrame:
    df = series_columns(df)
    df["shard"] = df["image_id"].map(shard_of)
    df.loc[df["status"] != "ok", "shard"] = None
    crop = df.pop("crop_box")
    for i, c in enumerate(["crop_y0", "crop_y1", "crop_x0", "crop_x1"]):
        df[c] = pd.array([b[i] if isinstance(b, list) else None for b in crop], dtype="Int32")
    span = df.pop("span")
    for i, c in enumerate(SPAN_COLUMNS):
        df[c] = pd.array([s[i] if isinstance(s, list) else None for s in span], dtype="Int64")
    return index_frame(df)  # INDEX_SCHEMA's columns and types


def inputs_record(cfg: BuildConfig, inputs: list[InputFile]) -> dict:
    """What the build was made from, as the manifest records it: the number of .dcm entries, a
    sha256 over their paths, sizes and mtimes, and the labels CSV's sha256."""
    h = hashlib.sha256()
    for f in inputs:
        h.update(
            f"{f.path}\t{f.size}\t{f.mtime_ns}\t{int(f.regular)}\n".encode(
                "utf-8", "surrogateescape"
            )
        )
    labels = None
    if cfg.labels is not None:
        try:
            with open_stream(cfg.labels) as f:  # a local path: regular files only (no FIFO hang)
                labels = sha256_stream(f)
        except OSError as e:
            raise BuildError(
                f"--labels {cfg.labels} cannot be read ({e}); give the RSNA labels CSV file"
            ) from e
    return {"files": len(inputs), "files_sha256": h.hexdigest(), "labels_sha256": labels}


def _changes(store: Store, was: dict, now: dict, inputs: list[InputFile]) -> str:
    """A few words naming what changed between a finished build's inputs and today's."""
    parts = []
    if was.get("labels_sha256") != now["labels_sha256"]:
        parts.append("the labels CSV changed")
    if was.get("files_sha256") != now["files_sha256"]:
        data = store.read_bytes(INDEX, MAX_INDEX_BYTES)
        old = parse_index(data, f"{store}/{INDEX}", STAT_KEY).dropna()
        old = {r.path: (int(r.file_size), int(r.file_mtime_ns)) for r in old.itertuples()}
        cur = {f.path: (f.size, f.mtime_ns) for f in inputs}
        for what, names in (
            ("new", [p for p in cur if p not in old]),
            ("changed", [p for p in cur if p in old and old[p] != cur[p]]),
            ("gone", [p for p in old if p not in cur]),
        ):
            if names:
                parts.append(f"{len(names)} {what} file(s) (e.g. {', '.join(names[:3])})")
        if len(parts) == (was.get("labels_sha256") != now["labels_sha256"]):
            parts.append(f"the .dcm files under --dicom-dir differ ({now['files']} now, {was.get('files')} then)")  # fmt: skip
    return "; ".join(parts)


def build(
    cfg: BuildConfig,
    out: str | os.PathLike,
    jobs: int = -1,
    overwrite: bool = False,
    progress: bool = True,
    backend: str | None = None,
) -> BuildResult:
    """Compile `cfg.dicom_dir` into shards under `out`. Safe to kill and re-run; one build at a
    time per `out`. A finished build whose config and inputs are unchanged is left as it is; one
    whose inputs changed is refused (pass `overwrite` to rebuild it)."""
    t0 = time.perf_counter()
    check_out_path(str(out))
    store = Store(out)
    check_apart(store.root, cfg.dicom_dir, cfg.labels)
    if not is_dir(cfg.dicom_dir):
        raise BuildError(f"--dicom-dir {cfg.dicom_dir} is not a folder")
    inputs = list_inputs(cfg.dicom_dir, ".dcm")
    if not inputs:
        raise BuildError(f"--dicom-dir {cfg.dicom_dir} holds no .dcm files; check the path")
    now = inputs_record(cfg, inputs)
    if store.exists(MANIFEST) and not overwrite:
        m = recorded(store)
        if m is not None and m.config == cfg.to_dict():
            changed = _changes(store, m.inputs, now, inputs)
            if not changed:
                return BuildResult(out, m.record, {"already_complete": True})
            raise BuildError(
                f"{out} was built from other inputs: {changed}; pass --overwrite to rebuild "
                "it, or choose another --out"
            )
    # A labels CSV that is not ID,Label rows stops the build here, before --out is created.
    lt = read_labels(cfg.labels) if cfg.labels is not None else None
    store.makedirs()
    with BuildLock(store):
        return _build_locked(cfg, store, inputs, now, (jobs, overwrite, progress, backend), t0, lt)


def _compile_pending(store, plan, cfg, keys, pending, jobs, progress, backend) -> dict[str, dict]:
    """Run one joblib task per pending shard; the finished shards' results by name."""
    labelled, done = cfg.labels is not None, {}
    parent = os.getpid() if backend != "dask" else None
    todo = sum(len(plan[n]) for n in pending)
    with tqdm(total=todo, desc="compile", unit="img", disable=not progress) as bar:
        tasks = (
            joblib.delayed(compile_shard)(
                store.root, n, _records(plan[n], cfg.dicom_dir, labelled), cfg, keys[n], parent
            )
            for n in pending
        )
        with joblib.parallel_config(backend=backend) if backend else contextlib.nullcontext():
            # One task = one whole shard; unordered so a slow shard never holds back the bar.
            for res in joblib.Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
                done[res["shard"]["name"]] = res
                bar.update(len(res["results"]))
    return done


def _remove_leftovers(store: Store, shards: set[str]) -> None:
    """Delete the shards earlier runs of this build wrote (each named by a ledger record) that
    this plan does not have (written before the inputs changed), then the ledger. Only regular
    files the ledger names: a file we did not name stays."""
    for rec in ledger_names(store):
        name = rec.removesuffix(".json")
        if name != rec and name.endswith(".tar") and name not in shards and store.is_file(name):
            store.remove(name)
    remove_ledger(store)


def _build_locked(cfg, store, inputs, now, run, t0, lt) -> BuildResult:
    jobs, overwrite, progress, backend = run
    _prepare_out(store, cfg, overwrite)
    store.remove(MANIFEST)
    with joblib.parallel_config(backend=backend) if backend else contextlib.nullcontext():
        df = plan_images(cfg, inputs, jobs, store, progress, lt)  # header pass on the same workers
    fallback = int(df["orientation_fallback"].eq(True).sum())
    counts = {**df.attrs.get("label_stats", {}), "orientation_fallback": fallback}
    if "subset" in df.attrs:  # --limit / --fraction: what was kept (_select_subset)
        counts["subset"] = df.attrs["subset"]
    plan = plan_shards(df, cfg)
    labelled = cfg.labels is not None
    keys = {n: shard_key(part, cfg) for n, part in plan.items()}
    clash = sorted(set(plan) & set(owned_names(store)[1]))
    if clash:  # a shard's name taken by a file no manifest or ledger of ours names: never replaced
        raise BuildError(
            f"--out {store} holds {clash[0]}, named like a shard of this build but written by no "
            "ich-prep build (no manifest or ledger names it); move it away, or choose another --out"
        )

    done: dict[str, dict] = {}
    pending, stale = [], 0
    for name in plan:
        d = _load_done(store, name, keys[name])
        if d is None:
            pending.append(name)
            stale += _record(store, name) is not None
        else:
            done[name] = d
    todo = sum(len(plan[n]) for n in pending)
    done.update(_compile_pending(store, plan, cfg, keys, pending, jobs, progress, backend))
    # Fold per-image results back into the table.
    shard_of, crop_of, span_of = {}, {}, {}
    for name in plan:
        for r in done[name]["results"]:
            if r["reason"] is None:
                shard_of[r["image_id"]] = name
                crop_of[r["image_id"]] = r["crop_box"]
                span_of[r["image_id"]] = r["span"]
            else:
                m = df["image_id"] == r["image_id"]
                df.loc[m, ["status", "reason", "detail"]] = ["error", r["reason"], r["detail"]]
    df["crop_box"] = df["image_id"].map(crop_of)
    # slices cropped with their own box under --crop series (shape or spacing unlike their series')
    fell_back = [r.get("crop_fallback", False) for n in plan for r in done[n]["results"]]
    counts["crop_fallback"] = int(sum(fell_back))
    df["span"] = df["image_id"].map(span_of)
    index = _index_table(df, shard_of)
    shards = [
        {
            **done[n]["shard"],
            "split": cfg.split,
            "fold": int(plan[n]["fold"].iloc[0]) if labelled else -1,
        }
        for n in plan
    ]
    manifest = write_build(store, cfg, index, shards, now, counts)
    counts = Build.of(store.root, manifest).counts
    _remove_leftovers(store, set(plan))
    wall = time.perf_counter() - t0
    total_bytes = sum(s["bytes"] for s in shards)
    summary = {
        "ok": counts["ok"],
        "error": counts["error"],
        "errors_by_reason": counts["errors_by_reason"],
        "positives": counts["positives"],
        "shards": len(shards),
        "bytes": total_bytes,
        "bytes_per_image": total_bytes / max(1, counts["ok"]),
        "wall_s": wall,
        "images_per_s": todo / wall if wall > 0 else 0.0,
        "resumed_shards": len(plan) - len(pending),
        "changed_shards": stale,
    }
    return BuildResult(store.root, manifest, summary)
