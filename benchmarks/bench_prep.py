"""Compile the same DICOMs three ways, side by side, and print images per CPU-second of one core.

baseline: the well-known notebook way, per image: pydicom pixel_array -> float64 HU -> three
          windows of the full 512x512 slice -> crop -> pad -> resize -> PNG (cv2 default level).
builder:  ich_prep.build.build with --jobs 1 (the real path: header pass, planning, series boxes,
          HU, crop, resize in HU, window, encode, tar, sha256, index, manifest).
floor:    the builder's per-image work alone (raw read + header + pixels + the exact transform +
          encode; no orchestration): the limit the builder is measured against.
Each run is a fresh process pinned to one core, under the same malloc setting for every method
(--allocator: the build's own, or glibc's defaults: the baseline alone runs ~2x faster or slower
between the two); imports and one warm-up run are not timed; the time is the process's CPU time
(this VM is shared). Rounds alternate the methods (the order rotates); the table shows the median
and range of each method and of the per-round ratios.

    python benchmarks/bench_prep.py                         # synthetic set (made here)
    python benchmarks/bench_prep.py --dicom-dir DIR         # any folder of RSNA DICOMs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
    return {"images": n_ok, "bytes_per_image": n_bytes / max(1, n_ok)}


def builder(dicom_dir: str, labels: str | None, size: int, encoding: str, out: Path) -> dict:
    from ich_prep.build import build
    from ich_prep.config import BuildConfig

    cfg = BuildConfig(
        dicom_dir=dicom_dir, labels=labels, size=size, encoding=encoding, shard_size=500
    )
    res = build(cfg, out, jobs=1, progress=False)
    ok = res.manifest["counts"]["ok"]
    return {"images": ok, "bytes_per_image": res.summary["bytes_per_image"]}


def floor(dicom_dir: str, size: int, encoding: str) -> dict:
    """The builder's per-image work and nothing else: raw read + header + pixels + the exact
    transform (head box, crop, pad, resize in HU, windows) + encode; no planning, tar, hashing,
    index or manifest, no series bookkeeping (each slice cropped with its own head box: the same
    operations a series box costs)."""
    from ich_prep.config import BuildConfig
    from ich_prep.read_dicom import ImageError, read_header, read_slice
    from ich_prep.shards import encode_image
    from ich_prep.transform import ImplausibleHU, compile_stored, stored_head_box

    windows = [(w.center, w.width) for w in BuildConfig(dicom_dir=dicom_dir).windows]
    n_ok, n_bytes = 0, 0
    for f in sorted(Path(dicom_dir).rglob("*.dcm")):
        try:
            h = read_header(f)
            stored, h = read_slice(f, h)
            box = stored_head_box(stored, h)
        except (ImageError, ImplausibleHU):
            continue
        n_bytes += len(encode_image(compile_stored(stored, h, box, windows, size), encoding))
        n_ok += 1
    return {"images": n_ok, "bytes_per_image": n_bytes / max(1, n_ok)}


def _once(args, tmp: Path, i: int) -> dict:
    kind, _, enc = args.child.partition(":")
    if kind == "baseline":
        return baseline(args.dicom_dir, args.size)
    if kind == "floor":
        return floor(args.dicom_dir, args.size, enc)
    return builder(args.dicom_dir, args.labels, args.size, enc, tmp / f"out{i}")


def _child(args) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, the same for every method
    import ich_prep.build
    from ich_prep.read_dicom import reuse_freed_memory

    if args.allocator == "build":
        reuse_freed_memory()  # the build's own setting (build_worker.worker_start), in every method
    else:  # glibc's defaults everywhere: the build's tasks must not set theirs either
        ich_prep.build.reuse_freed_memory = lambda: False
    import cv2  # noqa: F401 - imports are not timed, in any method
    import pydicom  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.warmup):  # first use of each library, the page cache
            _once(args, Path(tmp), i)
        r = {"cpu_s": float("inf")}
        for i in range(args.repeat):  # the least disturbed of `repeat` timed runs
            c0, t0 = time.process_time(), time.perf_counter()
            got = _once(args, Path(tmp), args.warmup + i)
            got["cpu_s"], got["wall_s"] = time.process_time() - c0, time.perf_counter() - t0
            r = got if got["cpu_s"] < r["cpu_s"] else r
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(r))


def run(method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--dicom-dir", args.dicom_dir]
    cmd += ["--size", str(args.size), "--allocator", args.allocator]
    cmd += ["--warmup", str(args.warmup), "--repeat", str(args.repeat)]
    if args.labels:
        cmd += ["--labels", args.labels]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
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
            t0 = time.process_time()
            out = fn()
            best = min(best, time.process_time() - t0)
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
        with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "s.tar", "wb") as f:
            write_tar(f, samples, "npy.gz")

    timed("encode + tar + json (write_tar)", tar)
    return rows


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} ({min(xs):.2f}-{max(xs):.2f})"


def _report(methods: list[str], got: dict[str, list[dict]], floor_of: dict[str, str]) -> None:
    """Per method: median (min-max) img/s per core over the rounds; then the per-round ratios."""
    rate = {m: [r["images"] / r["cpu_s"] for r in got[m]] for m in methods}
    wall = {m: [r["images"] / r["wall_s"] for r in got[m]] for m in methods}
    print(f"{'method':26s} {'images':>6s} {'img/s per CPU-s: median (min-max)':>34s} "
          f"{'wall img/s':>11s} {'KiB/img':>8s} {'peak MB':>8s}")  # fmt: skip
    for m in methods:
        r = got[m][-1]
        kind, _, enc = m.partition(":")
        name = "baseline (notebook, png)" if kind == "baseline" else f"{kind} ({enc})"
        print(f"{name:26s} {r['images']:6d} {_spread(rate[m]):>34s} {statistics.median(wall[m]):11.1f} "
              f"{r['bytes_per_image'] / 1024:8.1f} {max(x['peak_rss_mb'] for x in got[m]):8.0f}")  # fmt: skip
    print("ratios of img/s per CPU-s, each round's methods side by side: median (min-max)")
    for m in methods:
        if m.startswith("builder"):
            x = [a / b for a, b in zip(rate[m], rate["baseline"], strict=True)]
            print(f"  {m.replace(':', ' ') + ' / baseline':34s} {_spread(x)}   goal >= 4")
            if floor_of.get(m) in rate:
                y = [a / b for a, b in zip(rate[floor_of[m]], rate[m], strict=True)]
                print(f"  {floor_of[m].replace(':', ' ') + ' / ' + m.replace(':', ' '):34s} {_spread(y)}   goal <= 1.15")  # fmt: skip


def _copies(src: str, out: Path, k: int) -> str:
    """`out` holding each DICOM of `src` k times, as <dir>/ID_x_c<i>.dcm (the bytes unchanged:
    copies of a series are one series with tied positions, the same work per slice)."""
    for i in range(k):
        for f in sorted(Path(src).rglob("*.dcm")):
            dest = out / f.parent.relative_to(src) / f"{f.stem}_c{i}.dcm"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    return str(out)


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
    p.add_argument("--encodings", default="npy.gz", help="builder (and floor) encodings to time")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each method once per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first, in each process")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed runs in each process; the least CPU time counts",
    )
    p.add_argument(
        "--allocator",
        choices=["build", "glibc"],
        default="build",
        help="build: every method under the build's malloc setting "
        "(read_dicom.reuse_freed_memory); glibc: every method under glibc's defaults",
    )
    p.add_argument("--copies", type=int, default=1, help="read each file this many times (copies)")
    p.add_argument("--stages", action="store_true", help="also time the builder's steps alone")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if args.copies > 1 and args.labels:
        p.error("--copies renames the files: leave --labels out")
    tmp = None
    if not args.dicom_dir:
        from ich_prep.synth import write_synthetic

        tmp = tempfile.TemporaryDirectory()
        info = write_synthetic(tmp.name, patients=args.patients, seed=0, slices_per_series=8)
        args.dicom_dir, args.labels = str(info["train_dir"]), str(info["labels_csv"])
    if args.copies > 1:  # each file K times under new names: fixed costs weigh as on a bigger set
        tmp = tmp or tempfile.TemporaryDirectory()
        args.dicom_dir = _copies(args.dicom_dir, Path(tmp.name) / "copies", args.copies)
    alloc = {"build": "the build's (glibc mallopt, read_dicom.reuse_freed_memory)", "glibc": "glibc's defaults"}  # fmt: skip
    print(
        f"data: {args.dicom_dir}  size {args.size}\n{args.rounds} rounds, the methods' order "
        f"rotated each round; each a fresh process pinned to one core: {args.warmup} untimed "
        f"run(s), then the least CPU time of {args.repeat}; allocator in every method: {alloc[args.allocator]}"
    )
    encs = args.encodings.split(",")
    methods = ["baseline"] + [f"{k}:{e}" for e in encs for k in ("builder", "floor")]
    got: dict[str, list[dict]] = {m: [] for m in methods}
    for i in range(args.rounds):
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        for m in order:
            got[m].append(run(m, args))
    _report(methods, got, {f"builder:{e}": f"floor:{e}" for e in encs})
    if args.stages:
        print("builder steps alone, ms of CPU per image (best of 5, this process, not pinned):")
        for name, ms in stages(args.dicom_dir, args.size):
            print(f"  {name:40s} {ms:7.3f}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
