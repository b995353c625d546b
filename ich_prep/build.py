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
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ich_prep import FORMAT_VERSION, LABELS, __version__
from ich_prep.config import BuildConfig
from ich_prep.errors import UserError
from ich_prep.labels import read_labels
from ich_prep.manifest import INDEX, MANIFEST, dumps, join
from ich_prep.read_dicom import ImageError, read_header, read_slice
from ich_prep.shards import sha256_file, write_tar
from ich_prep.split import assign_folds, shuffled, slice_ranks
from ich_prep.store import Store, is_dir, list_files
from ich_prep.transform import compile_image, header_to_hu

WORK = "_work"
HEADER_FIELDS = [
    "patient_id",
    "study_id",
    "series_id",
    "z_position",
    "pixel_spacing_y",
    "pixel_spacing_x",
    "rows",
    "cols",
]
# Read in the header pass and handed to the shard task, so the compile does not convert them again.
PIXEL_FIELDS = [
    "bits_stored",
    "pixel_representation",
    "rescale_slope",
    "rescale_intercept",
    "pixel_padding_value",
]


class BuildError(UserError):
    """The build cannot start or finish (config mismatch, nothing to build, too many errors)."""


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------- scanning (header pass)


def _scan_chunk(root: str, rels: list[str]) -> list[dict]:
    """Read the headers of a chunk of files; failures become rows with a reason."""
    rows = []
    for rel in rels:
        try:
            h = read_header(join(root, rel))
            rows.append(
                {
                    "path": rel,
                    **{k: h[k] for k in HEADER_FIELDS + PIXEL_FIELDS},
                    "reason": None,
                    "detail": None,
                }
            )
        except ImageError as e:
            rows.append({"path": rel, "reason": e.reason, "detail": e.detail})
    return rows


def _image_id(rel: str) -> str:
    return Path(rel).name[: -len(".dcm")]


def _select_subset(ids: list[str], cfg: BuildConfig) -> set[str] | None:
    """--limit / --fraction: a seeded random subset of input ids, chosen before any header is read."""
    if cfg.limit is None and cfg.fraction is None:
        return None
    n = len(ids) if cfg.limit is None else min(cfg.limit, len(ids))
    if cfg.fraction is not None:
        n = min(n, max(1, round(cfg.fraction * len(ids))))
    pick = np.random.default_rng(cfg.seed).permutation(len(ids))[:n]
    return {ids[i] for i in pick}


def plan_images(cfg: BuildConfig, jobs: int, store: Store, progress: bool) -> pd.DataFrame:
    """One row per input with header fields, labels, status; ok rows get fold and slice rank."""
    rels = list_files(cfg.dicom_dir, ".dcm")  # sorted: order never depends on the file system
    files = pd.DataFrame({"path": rels, "image_id": [_image_id(r) for r in rels]})
    dup = files["image_id"].duplicated(keep="first")
    dup_rows = files[dup].assign(
        reason="duplicate_file", detail=lambda d: d["path"] + ": another file has the same image id"
    )
    files = files[~dup]

    if cfg.labels is not None:
        lt = read_labels(cfg.labels)
        labels, label_errors, label_stats = lt.labels, lt.errors, lt.stats
    else:
        labels, label_errors, label_stats = (
            pd.DataFrame(columns=list(LABELS)),
            pd.DataFrame(columns=["image_id", "reason", "detail"]),
            {},
        )
    label_errors = label_errors.drop_duplicates("image_id")

    universe = sorted(
        set(files["image_id"])
        | set(labels.index)
        | set(label_errors["image_id"])
        | set(dup_rows["image_id"])
    )
    subset = _select_subset(universe, cfg)
    if subset is not None:
        files = files[files["image_id"].isin(subset)]
        labels = labels[labels.index.isin(subset)]
        label_errors = label_errors[label_errors["image_id"].isin(subset)]
        dup_rows = dup_rows[dup_rows["image_id"].isin(subset)]

    headers = _scan_headers(cfg.dicom_dir, files["path"].tolist(), jobs, store, progress)
    df = files.merge(headers, on="path", how="left")
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
    df["slice_rank"] = pd.array([pd.NA] * len(df), dtype="Int32")
    df.loc[ok, "slice_rank"] = slice_ranks(
        df.loc[ok, "series_id"].to_numpy(), df.loc[ok, "z_position"].to_numpy()
    )
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
    return df


def _scan_headers(
    root: str, rels: list[str], jobs: int, store: Store, progress: bool
) -> pd.DataFrame:
    cache = f"{WORK}/headers.parquet"
    if store.exists(cache):
        cached = pd.read_parquet(io.BytesIO(store.read_bytes(cache)))
        if cached["path"].tolist() == rels:
            return cached
    chunk = 256
    chunks = [rels[i : i + chunk] for i in range(0, len(rels), chunk)]
    rows: list[dict] = []
    with tqdm(total=len(rels), desc="headers", unit="img", disable=not progress) as bar:
        for res in joblib.Parallel(n_jobs=jobs, return_as="generator")(
            joblib.delayed(_scan_chunk)(root, c) for c in chunks
        ):
            rows.extend(res)
            bar.update(len(res))
    cols = ["path", *HEADER_FIELDS, *PIXEL_FIELDS, "reason", "detail"]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("rows", "cols", "bits_stored", "pixel_representation", "pixel_padding_value"):
        df[c] = df[c].astype("Int32")
    for c in ("reason", "detail", "patient_id", "study_id", "series_id"):
        df[c] = df[c].astype(object)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    store.write_bytes(cache, buf.getvalue())
    return df


# ---------------------------------------------------------------- shards


def plan_shards(df: pd.DataFrame, cfg: BuildConfig) -> dict[str, pd.DataFrame]:
    """Shard name -> its ok images in write order. Whole shards belong to one fold."""
    plan = {}
    ok = df[df["status"] == "ok"]
    for fold in sorted(ok["fold"].unique()):
        part = ok[ok["fold"] == fold]
        part = part.iloc[shuffled(len(part), cfg.seed, int(fold))]
        prefix = f"train-f{int(fold)}" if cfg.split == "train" else "test"
        for n, start in enumerate(range(0, len(part), cfg.shard_size)):
            plan[f"{prefix}-{n:05d}.tar"] = part.iloc[start : start + cfg.shard_size]
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
                    "slice_rank": int(r.slice_rank),
                    "fold": int(r.fold),
                    "labels": [int(getattr(r, k)) for k in LABELS] if labelled else None,
                },
            }
        )
    return recs


def compile_record(rec: dict, cfg: BuildConfig) -> tuple[np.ndarray, dict]:
    """One DICOM -> (uint8 image (size, size, 3), metadata). Raises ImageError."""
    h = rec.get("header")
    stored, h = read_slice(rec["path"], h if h and h.get("rows") else None)
    hu = header_to_hu(stored, h)
    img, box = compile_image(
        hu,
        [(w.center, w.width) for w in cfg.windows],
        cfg.size,
        (h["pixel_spacing_y"], h["pixel_spacing_x"]),
        cfg.spacing_mm,
    )
    meta = dict(rec["meta"])
    meta.update(
        pixel_spacing=[h["pixel_spacing_y"], h["pixel_spacing_x"]],
        original_shape=[h["rows"], h["cols"]],
        crop_box=list(box) if box is not None else None,
    )
    return img, meta


def compile_shard(out: str, name: str, recs: list[dict], cfg: BuildConfig) -> dict:
    """Joblib task: compile one shard's images into `out/name`; return and persist per-image results.

    The tar is moved into place first, then `_work/<name>.json`: a shard counts as done only when
    both exist and the tar's hash matches, so a task killed anywhere is simply run again.
    """
    results = []

    def samples():
        for rec in recs:
            try:
                img, meta = compile_record(rec, cfg)
            except ImageError as e:
                results.append(
                    {"image_id": rec["image_id"], "reason": e.reason, "detail": e.detail}
                )
                continue
            results.append(
                {
                    "image_id": rec["image_id"],
                    "reason": None,
                    "detail": None,
                    "crop_box": meta["crop_box"],
                }
            )
            yield {"__key__": rec["image_id"], "image": img, "meta": meta}

    store = Store(out)
    tmp = store.local_file(name)
    n = write_tar(tmp, samples(), cfg.encoding)
    info = {"name": name, "samples": n, "bytes": os.path.getsize(tmp), "sha256": sha256_file(tmp)}
    store.commit(name, tmp)
    done = {"shard": info, "results": results}
    store.write_bytes(f"{WORK}/{name}.json", json.dumps(done, sort_keys=True).encode())
    return done


def _load_done(store: Store, name: str) -> dict | None:
    """Results of a shard a previous run finished, if its tar is intact."""
    rec = f"{WORK}/{name}.json"
    if not (store.exists(rec) and store.exists(name)):
        return None
    done = json.loads(store.read_bytes(rec))
    if store.size(name) != done["shard"]["bytes"] or store.sha256(name) != done["shard"]["sha256"]:
        return None
    return done


# ---------------------------------------------------------------- the build


def _prepare_out(store: Store, cfg: BuildConfig, overwrite: bool) -> None:
    """Create the output, or check that what is there was made by the same config."""
    state = f"{WORK}/config.json"
    ours = json.dumps(cfg.to_dict(), sort_keys=True)
    entries = store.listdir()
    if entries:
        theirs = None
        if store.exists(state):
            theirs = store.read_bytes(state).decode()
        elif store.exists(MANIFEST):
            theirs = json.dumps(
                json.loads(store.read_bytes(MANIFEST)).get("config"), sort_keys=True
            )
        if theirs != ours:
            if not overwrite:
                raise BuildError(
                    f"{store} already holds a build with a different config (or unknown files); "
                    "choose another --out, or pass --overwrite to replace it"
                )
            for name in entries:
                store.remove(name)
    store.makedirs(WORK)
    store.write_bytes(state, ours.encode())


def _index_table(df: pd.DataFrame, shard_of: dict[str, str]) -> pd.DataFrame:
    df = df.copy()
    df["shard"] = df["image_id"].map(shard_of)
    df.loc[df["status"] != "ok", "shard"] = None
    crop = df.pop("crop_box")
    for i, c in enumerate(["crop_y0", "crop_y1", "crop_x0", "crop_x1"]):
        df[c] = pd.array([b[i] if isinstance(b, list) else None for b in crop], dtype="Int32")
    for c in LABELS:
        df[c] = df[c].astype("Int8")
    df["fold"] = df["fold"].astype(np.int8)
    cols = ["image_id", "path", "patient_id", "study_id", "series_id", "z_position", "slice_rank", "pixel_spacing_y", "pixel_spacing_x",
            "rows", "cols", "crop_y0", "crop_y1", "crop_x0", "crop_x1", "split", "fold", "shard", *LABELS, "status", "reason", "detail"]  # fmt: skip
    for c in ("path", "patient_id", "study_id", "series_id", "reason", "detail", "shard"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df[cols]


def build(
    cfg: BuildConfig,
    out: str | os.PathLike,
    jobs: int = -1,
    overwrite: bool = False,
    progress: bool = True,
    backend: str | None = None,
) -> BuildResult:
    """Compile `cfg.dicom_dir` into shards under `out`. Safe to kill and re-run."""
    t0 = time.perf_counter()
    store = Store(out)
    if store.exists(MANIFEST) and not overwrite:
        m = json.loads(store.read_bytes(MANIFEST))
        if m.get("config") == cfg.to_dict():
            return BuildResult(out, m, {"already_complete": True})
    if not is_dir(cfg.dicom_dir):
        raise BuildError(f"--dicom-dir {cfg.dicom_dir} is not a folder")
    _prepare_out(store, cfg, overwrite)
    store.remove(MANIFEST)
    with joblib.parallel_config(backend=backend) if backend else contextlib.nullcontext():
        df = plan_images(cfg, jobs, store, progress)  # the header pass runs on the same workers
    label_stats = df.attrs.get("label_stats", {})
    plan = plan_shards(df, cfg)
    labelled = cfg.labels is not None

    done: dict[str, dict] = {}
    pending = []
    for name in plan:
        d = _load_done(store, name)
        if d is None:
            pending.append(name)
        else:
            done[name] = d
    todo = sum(len(plan[n]) for n in pending)
    with tqdm(total=todo, desc="compile", unit="img", disable=not progress) as bar:
        tasks = (
            joblib.delayed(compile_shard)(
                store.root, n, _records(plan[n], cfg.dicom_dir, labelled), cfg
            )
            for n in pending
        )
        with joblib.parallel_config(backend=backend) if backend else contextlib.nullcontext():
            # One task = one whole shard; unordered so a slow shard never holds back the bar.
            for res in joblib.Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
                done[res["shard"]["name"]] = res
                bar.update(len(res["results"]))

    # Fold per-image results back into the table.
    shard_of, crop_of = {}, {}
    for name in plan:
        for r in done[name]["results"]:
            if r["reason"] is None:
                shard_of[r["image_id"]] = name
                crop_of[r["image_id"]] = r["crop_box"]
            else:
                m = df["image_id"] == r["image_id"]
                df.loc[m, ["status", "reason", "detail"]] = ["error", r["reason"], r["detail"]]
    df["crop_box"] = df["image_id"].map(crop_of)
    index = _index_table(df, shard_of)
    buf = io.BytesIO()
    index.to_parquet(buf, index=False)
    index_bytes = buf.getvalue()
    store.write_bytes(INDEX, index_bytes)

    ok = index[index["status"] == "ok"]
    shards = [
        {
            **done[n]["shard"],
            "split": cfg.split,
            "fold": int(plan[n]["fold"].iloc[0]) if labelled else -1,
        }
        for n in plan
    ]
    counts = {
        "inputs": len(index),
        "ok": len(ok),
        "error": int((index["status"] == "error").sum()),
        "errors_by_reason": dict(sorted(Counter(index["reason"].dropna()).items())),
        "positives": {k: int(ok[k].sum()) for k in LABELS} if labelled else None,
        "per_fold": {str(k): int(v) for k, v in sorted(Counter(ok["fold"]).items())},
        **label_stats,
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": "ich_prep",
        "tool_version": __version__,
        "config": cfg.to_dict(),
        "split": cfg.split,
        "counts": counts,
        "index": {
            "name": INDEX,
            "bytes": len(index_bytes),
            "sha256": hashlib.sha256(index_bytes).hexdigest(),
        },
        "shards": shards,
    }
    from ich_prep.card import dataset_card  # local import: the card is presentation only

    store.write_bytes("README.md", dataset_card(manifest).encode())
    store.write_bytes(MANIFEST, dumps(manifest))
    store.remove(WORK)
    for name in store.listdir():  # left by a worker killed mid-shard; its task was redone
        if name.endswith(".partial"):
            store.remove(name)
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
    }
    return BuildResult(out, manifest, summary)
