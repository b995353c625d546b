"""Hand-made shard builds for ich_train tests, following docs/shard-format.md.

Images are learnable: a positive ('any') image has a bright blob inside a dim disc, and the
channels the blob lights up name its subtype.
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds

from ich_prep import LABELS
from ich_prep.config import BuildConfig
from ich_prep.location import Store, sha256_file
from ich_prep.manifest import write_build
from ich_prep.shards import TAR_MTIME, encode_image, write_shard

# subtype (1..5) -> channels its blob brightens
SUBTYPE_CHANNELS = {1: (0,), 2: (1,), 3: (2,), 4: (0, 1), 5: (1, 2)}


def make_image(rng: np.random.Generator, size: int, subtype: int | None) -> np.ndarray:
    """A dim noisy disc; with a subtype, a bright blob on that subtype's channels."""
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    img = np.zeros((size, size, 3), np.float32)
    img[(yy - c) ** 2 + (xx - c) ** 2 < (0.42 * size) ** 2] = 70
    img += rng.normal(0, 12, img.shape)
    if subtype is not None:
        r = max(2.0, size / 7)
        cy, cx = rng.uniform(c - 0.2 * size, c + 0.2 * size, 2)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        for ch in SUBTYPE_CHANNELS[subtype]:
            img[..., ch][blob] = 230
    return np.clip(img, 0, 255).astype(np.uint8)


def _labels(subtype: int | None) -> list[int]:
    y = [0] * len(LABELS)
    if subtype is not None:
        y[0] = y[subtype] = 1
    return y


def _series_plan(rng: np.random.Generator, n: int, series_len: int, positive_rate: float):
    """(series index, slice rank, subtype or None) for n slices cut into series of `series_len`:
    a positive series has one bleed of one subtype over a run of neighbouring slices."""
    out = []
    for j, start in enumerate(range(0, n, series_len)):
        m = min(series_len, n - start)
        bleed = set()
        if rng.random() < positive_rate and m >= 2:
            run = int(rng.integers(2, m + 1))
            first = int(rng.integers(0, m - run + 1))
            bleed, t = set(range(first, first + run)), int(rng.integers(1, 6))
        out += [(j, r, t if r in bleed else None) for r in range(m)]
    return out


def _write(store: Store, name: str, samples: list[dict], encoding: str, extra: dict[str, bytes] | None, spans: dict) -> dict:  # fmt: skip
    """The real shard writer; with `extra`, a deliberately odd shard (unexpected members) written
    with webdataset's TarWriter."""
    if not extra:
        return write_shard(store, name, samples, encoding, spans)
    path = Path(store.root) / name
    with wds.TarWriter(str(path), encoder=False, mtime=TAR_MTIME) as w:
        for s in samples:
            meta = json.dumps(s["meta"], sort_keys=True).encode()
            w.write({"__key__": s["__key__"], encoding: encode_image(s["image"], encoding), "json": meta, **extra})  # fmt: skip
    return {"name": name, "samples": len(samples), "bytes": path.stat().st_size, "sha256": sha256_file(path)}  # fmt: skip


def make_build(
    root: str | Path,
    *,
    folds: int = 3,
    per_shard: int = 16,
    shards_per_fold: int = 1,
    size: int = 32,
    encoding: str = "npy.gz",
    test: bool = False,
    positive_rate: float = 0.4,
    error_rows: int = 0,
    extra: dict[str, bytes] | None = None,
    seed: int = 0,
    series_len: int | None = None,
) -> Path:
    """A train build (folds 0..folds-1) or a test build of learnable images, written by the real
    writers (shards.write_shard, manifest.write_build) from an index of the columns readers use,
    with each sample's span (shard_offset, shard_length). With `series_len`, each shard holds
    series of that many slices in order (series_id, slice_rank, series_len in the index), a
    positive series bleeding on a run of neighbouring slices."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    store = Store(root)
    rng = np.random.default_rng(seed)
    groups = (
        [(-1, n) for n in range(shards_per_fold)]
        if test
        else [(f, n) for f in range(folds) for n in range(shards_per_fold)]
    )
    rows, shards, k, spans = [], [], 0, {}
    series_rng = np.random.default_rng([seed, 1])
    for fold, n in groups:
        name = f"test-{n:05d}.tar" if test else f"train-f{fold}-{n:05d}.tar"
        plan = (
            _series_plan(series_rng, per_shard, series_len, positive_rate) if series_len else None
        )
        samples = []
        for i in range(per_shard):
            image_id = f"ID_{k:09x}"
            k += 1
            if plan is None:
                subtype = int(rng.integers(1, 6)) if rng.random() < positive_rate else None
                where = {}
            else:
                j, rank, subtype = plan[i]
                sid = f"ID_s{fold + 1}x{n}x{j}"
                where = {"series_id": sid, "slice_rank": rank,
                         "series_len": sum(p[0] == j for p in plan)}  # fmt: skip
            y = None if test else _labels(subtype)
            meta = {"image_id": image_id, "patient_id": f"ID_p{k % 7}", "fold": fold, "labels": y, **where}  # fmt: skip
            samples.append(
                {"__key__": image_id, "image": make_image(rng, size, subtype), "meta": meta}
            )
            rows.append({"image_id": image_id, "fold": fold, "shard": name, "status": "ok", "reason": None, **where,
                         **{lab: (None if y is None else y[j]) for j, lab in enumerate(LABELS)}})  # fmt: skip
        entry = _write(store, name, samples, encoding, extra, spans)
        shards.append({**entry, "split": "test" if test else "train", "fold": fold})
    for e in range(error_rows):
        rows.append({"image_id": f"ID_bad{e:05d}", "fold": -1, "shard": None, "status": "error",
                     "reason": "unreadable", **{lab: None for lab in LABELS}})  # fmt: skip
    index = pd.DataFrame(rows)
    if spans:
        index["shard_offset"] = pd.array([spans.get(i, (None, None))[0] for i in index["image_id"]], dtype="Int64")  # fmt: skip
        index["shard_length"] = pd.array([spans.get(i, (None, None))[1] for i in index["image_id"]], dtype="Int64")  # fmt: skip
    index["split"] = "test" if test else "train"
    index["fold"] = index["fold"].astype("int8")
    for lab in LABELS:
        index[lab] = index[lab].astype("Int8")
    cfg = BuildConfig(
        dicom_dir="synthetic",
        labels=None if test else "synthetic.csv",
        size=size,
        encoding=encoding,
        folds=folds if folds >= 2 else 5,
        seed=seed,
    )
    write_build(store, cfg, index, shards)
    return root


@contextmanager
def deadline(seconds: int):
    """Fail with TimeoutError instead of hanging (SIGALRM; main thread only)."""

    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: hung")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
