"""The worker side of a build: one joblib task compiles one shard (`compile_shard`).

A task gets its shard's records (build_plan._records: whole series in slice order), numbers each
series' compiled slices 0..n-1 as it writes them (`_ranked`), compiles each DICOM (`compile_record`
under `--crop slice`; `SeriesCrops` under `--crop series`: one box per series), turns whatever goes
wrong with one file into its error row (`_compile_one`), writes the tar through shards.write_shard
and leaves its ledger record `_work/<shard>.json`. `exit_with_parent` is the per-process setup of
every worker (header pass and shard tasks): it exits when the build process dies.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time

import numpy as np

from ich_prep.config import BuildConfig
from ich_prep.location import (
    Store,
)
from ich_prep.outdir import (
    WORK,
)
from ich_prep.read_dicom import ImageError, read_slice, reuse_freed_memory
from ich_prep.shards import MAX_JSON_BYTES, encode_meta, write_shard
from ich_prep.transform import ImplausibleHU, compile_stored, series_box, stored_head_box

MAX_DETAIL = 500  # characters of an error row's detail


def _detail(where: str, e: Exception) -> str:
    return f"{where}: {type(e).__name__}: {e}"[:MAX_DETAIL]


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


# A worker costs ~1 s of start-up (imports), about what one core takes to read this many headers
# or to compile a quarter as many images: fewer files than this per worker start no more workers.
FILES_PER_WORKER = 256


def worker_start(parent_pid: int | None) -> None:
    """First thing every build task does, in a worker or in the build process (--jobs 1): exit
    with the build process (exit_with_parent), keep freed pixel buffers for the next slice
    (read_dicom.reuse_freed_memory: no page faults per read)."""
    exit_with_parent(parent_pid)
    reuse_freed_memory()


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
    worker_start(parent_pid)
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
            results.append({"image_id": rec["image_id"], "reason": None, "detail": None, "crop_box": meta["crop_box"], "slice_rank": meta["slice_rank"]})  # fmt: skip
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
