"""Compile the same DICOMs two ways, side by side in one run, and print images/s per core.

baseline: the well-known notebook way, per image: pydicom pixel_array -> float64 HU -> three
          windows of the full 512x512 slice -> crop -> pad -> resize -> PNG (cv2 default level).
builder:  ich_prep.build.build with --jobs 1 (the real path: header pass, HU, crop, resize in HU,
          window at 256, encode, tar, sha256, index, manifest).
Each runs in its own fresh process pinned to one core, so peak RSS is that worker's; methods
alternate over --rounds rounds and the best round of each is compared (this VM's speed drifts).

    python benchmarks/bench_prep.py                         # synthetic set (made here)
    python benchmarks/bench_prep.py --dicom-dir DIR         # any folder of RSNA DICOMs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def baseline(dicom_dir: str, size: int) -> dict:
    import cv2
    import numpy as np
    import pydicom

    files = sorted(Path(dicom_dir).rglob("*.dcm"))
    n_ok, n_bytes = 0, 0
    t0 = time.perf_counter()
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            img = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
                ds.RescaleIntercept
            )
        except Exception:  # noqa: BLE001 - the notebook way skips anything that fails
            continue
        chans = []
        for c, w in [(40, 80), (80, 200), (600, 2800)]:
            x = np.clip(img, c - w / 2, c + w / 2)
            chans.append((x - (c - w / 2)) / w)
        rgb = np.stack(chans, -1)
        mask = rgb[..., 0] > 0
        ys, xs = np.where(mask)
        if len(ys):
            rgb = rgb[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        h, w = rgb.shape[:2]
        s = max(h, w)
        pad = np.zeros((s, s, 3))
        pad[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = rgb
        out = cv2.resize(pad, (size, size))
        ok, buf = cv2.imencode(".png", (out * 255).astype(np.uint8))
        n_ok += 1
        n_bytes += len(buf)
    wall = time.perf_counter() - t0
    return {"images": n_ok, "wall_s": wall, "bytes_per_image": n_bytes / max(1, n_ok)}


def builder(dicom_dir: str, labels: str | None, size: int, encoding: str) -> dict:
    from ich_prep.build import build
    from ich_prep.config import BuildConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = BuildConfig(
            dicom_dir=dicom_dir, labels=labels, size=size, encoding=encoding, shard_size=500
        )
        t0 = time.perf_counter()
        res = build(cfg, Path(tmp) / "out", jobs=1, progress=False)
        wall = time.perf_counter() - t0
    ok = res.manifest["counts"]["ok"]
    return {"images": ok, "wall_s": wall, "bytes_per_image": res.summary["bytes_per_image"]}


def _child(args) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, the same for every method
    if args.child == "baseline":
        r = baseline(args.dicom_dir, args.size)
    else:
        r = builder(args.dicom_dir, args.labels, args.size, args.child.split(":", 1)[1])
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(r))


def run(method: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--dicom-dir",
        args.dicom_dir,
        "--size",
        str(args.size),
    ]
    if args.labels:
        cmd += ["--labels", args.labels]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def stages(dicom_dir: str, size: int, repeat: int = 5) -> list[tuple[str, float]]:
    """(stage, ms per image, best of `repeat`) for the builder's per-image steps, each timed alone
    over every readable file, in the order the build runs them."""
    from ich_prep.read_dicom import ImageError, read_header, read_slice
    from ich_prep.shards import encode_image, write_tar
    from ich_prep.transform import compile_stored, stored_head_box

    files = [str(f) for f in sorted(Path(dicom_dir).rglob("*.dcm"))]
    heads = []
    for f in list(files):
        try:
            heads.append(read_header(f))
        except ImageError:
            files.remove(f)
    windows = [(40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)]
    rows: list[tuple[str, float]] = []

    def timed(name, fn):
        best, out = float("inf"), None
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        rows.append((name, best / len(files) * 1e3))
        return out

    timed("header pass (pydicom)", lambda: [read_header(f) for f in files])
    stored = timed(
        "pixels (file read)",
        lambda: [read_slice(f, h)[0] for f, h in zip(files, heads, strict=True)],
    )
    boxes = timed("head box (subsampled HU)", lambda: [stored_head_box(s, h) for s, h in zip(stored, heads, strict=True)])  # fmt: skip
    imgs = timed(
        "HU of the crop, pad, resize, windows",
        lambda: [
            compile_stored(s, h, b, windows, size)
            for s, h, b in zip(stored, heads, boxes, strict=True)
        ],
    )
    timed("encode npy.gz", lambda: [encode_image(i, "npy.gz") for i in imgs])
    samples = [{"__key__": f"ID_{i:06d}", "image": m, "meta": {"i": i}} for i, m in enumerate(imgs)]  # fmt: skip

    def tar():
        with tempfile.TemporaryDirectory() as tmp:
            write_tar(Path(tmp) / "s.tar", samples, "npy.gz")

    timed("encode + tar + json (write_tar)", tar)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dicom-dir")
    p.add_argument("--labels")
    p.add_argument("--size", type=int, default=256)
    p.add_argument(
        "--patients", type=int, default=30, help="synthetic patients when no --dicom-dir"
    )
    p.add_argument("--encodings", default="npy.gz,png", help="builder encodings to time")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each method once per round")
    p.add_argument("--stages", action="store_true", help="also time the builder's steps alone")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    tmp = None
    if not args.dicom_dir:
        from ich_prep.synth import write_synthetic

        tmp = tempfile.TemporaryDirectory()
        info = write_synthetic(tmp.name, patients=args.patients, seed=0, slices_per_series=8)
        args.dicom_dir, args.labels = str(info["train_dir"]), str(info["labels_csv"])
    print(
        f"data: {args.dicom_dir}  size {args.size}  ({args.rounds} rounds; each method once a "
        "round, in a fresh process pinned to one core; best round shown)"
    )
    methods = ["baseline"] + [f"builder:{e}" for e in args.encodings.split(",")]
    best: dict[str, dict] = {}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        got = {m: run(m, args) for m in methods}
        base = got["baseline"]["images"] / got["baseline"]["wall_s"]
        for m, r in got.items():
            ratios[m].append(r["images"] / r["wall_s"] / base)
            if m not in best or r["wall_s"] < best[m]["wall_s"]:
                best[m] = r
    b_rate = best["baseline"]["images"] / best["baseline"]["wall_s"]
    print(
        f"{'method':28s} {'images':>7s} {'img/s/core':>11s} {'ratio':>6s} {'per round':>18s} "
        f"{'KiB/img':>8s} {'peak MB':>8s}"
    )
    for m in methods:
        r = best[m]
        rate = r["images"] / r["wall_s"]
        name = "baseline (notebook, png)" if m == "baseline" else f"builder ({m.split(':')[1]})"
        rounds = " ".join(f"{x:.2f}" for x in ratios[m])
        print(
            f"{name:28s} {r['images']:7d} {rate:11.1f} {rate / b_rate:6.2f} {rounds:>18s} "
            f"{r['bytes_per_image'] / 1024:8.1f} {r['peak_rss_mb']:8.0f}"
        )
    if args.stages:
        print("builder steps alone, ms per image (best of 5):")
        for name, ms in stages(args.dicom_dir, args.size):
            print(f"  {name:40s} {ms:7.3f}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
