"""Build orchestration: scan -> reconcile with labels -> folds -> one joblib task per shard -> index + manifest.

The plan (header pass, labels, folds, shards) is build_plan's, the shard tasks build_worker's,
the resume and the ledger build_ledger's; this module runs them and writes the index and manifest.

Resumable: each finished shard leaves `_work/<shard>.json` (its per-image results, written after
the tar is renamed into place); a re-run skips those shards and produces the same bytes. The
manifest is written last and atomically, so a folder with a manifest is a finished build.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ich_prep.build_ledger import (
    _changes,
    _load_done,
    _prepare_out,
    _record,
    _remove_leftovers,
    inputs_record,
)
from ich_prep.build_plan import KEY_COLUMNS as KEY_COLUMNS
from ich_prep.build_plan import _records as _records
from ich_prep.build_plan import plan_images as plan_images
from ich_prep.build_plan import plan_shards as plan_shards
from ich_prep.build_plan import shard_key as shard_key
from ich_prep.build_worker import FILES_PER_WORKER
from ich_prep.build_worker import compile_shard as compile_shard
from ich_prep.build_worker import exit_with_parent as exit_with_parent
from ich_prep.build_worker import worker_start as worker_start
from ich_prep.config import BuildConfig
from ich_prep.errors import BuildError
from ich_prep.index import SPAN_COLUMNS, index_frame
from ich_prep.labels import read_labels
from ich_prep.location import (
    Store,
    is_dir,
    list_inputs,
)
from ich_prep.manifest import MANIFEST, Build, recorded, write_build
from ich_prep.outdir import (
    BuildLock,
    check_apart,
    check_out_path,
    owned_names,
)
from ich_prep.split import (
    duplicate_positions,
)

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


@dataclass
class BuildResult:
    out: Path
    manifest: dict  # as written
    summary: dict = field(default_factory=dict)

    @property
    def build(self) -> Build:
        """The finished build, opened (manifest.Build)."""
        return Build.of(self.out, self.manifest)


def series_columns(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with series_len (int32) and duplicate_position (bool) from its ok rows, and its
    slice_rank (the shard tasks' own: build_worker._ranked, 0..n-1 in slice order over the slices
    that compiled, as each sample's json has it) as int32; nulls on error rows. A series is a
    series id within one fold, as the shards hold it."""
    df = df.copy()
    ok = (df["status"] == "ok").to_numpy()
    part = df[ok]
    key = (part["fold"].astype(str) + "/" + part["series_id"].astype(str)).to_numpy()
    pos = part["slice_position"].to_numpy(np.float64)
    length = pd.Series(key).groupby(key).transform("size").to_numpy()
    for col, values, dtype in (
        ("slice_rank", part["slice_rank"].to_numpy(), "Int32"),
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
            # no more workers than shards, nor than FILES_PER_WORKER images each
            n_jobs = max(1, min(jobs, len(pending), -(-todo // FILES_PER_WORKER)))
            for res in joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered")(tasks):
                done[res["shard"]["name"]] = res
                bar.update(len(res["results"]))
    return done


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
    keys = {n: shard_key(part, cfg) for n, part in plan.items()}
    clash = sorted(set(plan) & set(owned_names(store)[1]))
    if clash:  # a shard's name taken by a file no manifest or ledger of ours names: never replaced
        raise BuildError(
            f"--out {store} holds {clash[0]}, named like a shard of this build but written by no "
            "ich-prep build (no manifest or ledger names it); move it away, or choose another --out"
        )
    done, pending, stale = _resumable(store, plan, keys)
    todo = sum(len(plan[n]) for n in pending)
    done.update(_compile_pending(store, plan, cfg, keys, pending, jobs, progress, backend))
    index, counts["crop_fallback"] = _results_index(df, plan, done)
    labelled = cfg.labels is not None
    shards = [
        {
            **done[n]["shard"],
            "split": cfg.split,
            "fold": int(plan[n]["fold"].iloc[0]) if labelled else -1,
        }  # fmt: skip
        for n in plan
    ]
    manifest = write_build(store, cfg, index, shards, now, counts)
    _remove_leftovers(store, set(plan))
    counts, wall = Build.of(store.root, manifest).counts, time.perf_counter() - t0
    total_bytes = sum(s["bytes"] for s in shards)
    summary = {
        **{k: counts[k] for k in ("ok", "error", "errors_by_reason", "positives")},
        "shards": len(shards),
        "bytes": total_bytes,
        "bytes_per_image": total_bytes / max(1, counts["ok"]),
        "wall_s": wall,
        "images_per_s": todo / wall if wall > 0 else 0.0,
        "resumed_shards": len(plan) - len(pending),
        "changed_shards": stale,
    }
    return BuildResult(store.root, manifest, summary)


def _resumable(store: Store, plan: dict, keys: dict) -> tuple[dict[str, dict], list[str], int]:
    """(the shards an earlier run finished from the same inputs, by name; the shards to compile;
    how many of those an earlier run had finished from other inputs)."""
    done: dict[str, dict] = {}
    pending, stale = [], 0
    for name in plan:
        d = _load_done(store, name, keys[name])
        if d is None:
            pending.append(name)
            stale += _record(store, name) is not None
        else:
            done[name] = d
    return done, pending, stale


def _results_index(df: pd.DataFrame, plan: dict, done: dict) -> tuple[pd.DataFrame, int]:
    """(the index: the shard tasks' per-image results folded back into the plan's table, slices
    cropped with their own box under --crop series (crop_fallback))."""
    shard_of, crop_of, span_of, rank_of = {}, {}, {}, {}
    for name in plan:
        for r in done[name]["results"]:
            if r["reason"] is None:
                shard_of[r["image_id"]] = name
                crop_of[r["image_id"]] = r["crop_box"]
                span_of[r["image_id"]] = r["span"]
                rank_of[r["image_id"]] = r["slice_rank"]
            else:
                m = df["image_id"] == r["image_id"]
                df.loc[m, ["status", "reason", "detail"]] = ["error", r["reason"], r["detail"]]
    df["crop_box"] = df["image_id"].map(crop_of)
    # slices cropped with their own box under --crop series (shape or spacing unlike their series')
    fell_back = [r.get("crop_fallback", False) for n in plan for r in done[n]["results"]]
    df["span"] = df["image_id"].map(span_of)
    df["slice_rank"] = df["image_id"].map(rank_of)
    return _index_table(df, shard_of), int(sum(fell_back))
