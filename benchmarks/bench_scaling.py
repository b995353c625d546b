"""How the compile scales with workers: loky 1 vs N jobs, Dask LocalCluster 1 vs N workers, one run.

python benchmarks/bench_scaling.py --patients 40 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.synth import write_synthetic


def timed(cfg, out, **kw) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = build(cfg, out, progress=False, **kw)
    wall = time.perf_counter() - t0
    return res.manifest["counts"]["ok"] / wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--slices", type=int, default=10)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--shard-size", type=int, default=50)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    info = write_synthetic(
        tmp / "data", patients=args.patients, seed=0, slices_per_series=args.slices
    )
    cfg = BuildConfig(
        dicom_dir=str(info["train_dir"]), labels=str(info["labels_csv"]), shard_size=args.shard_size
    )
    print(
        f"{info['train_images']} synthetic slices (512 px class), size 256, npy.gz, shard size {args.shard_size}, {os.cpu_count()} cores"
    )
    rows = [
        ("loky", 1, timed(cfg, tmp / "o", jobs=1)),
        ("loky", args.workers, timed(cfg, tmp / "o", jobs=args.workers)),
    ]
    from dask.distributed import Client, LocalCluster

    for n in (1, args.workers):
        with (
            LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            ) as cl,
            Client(cl),
        ):
            rows.append(("dask", n, timed(cfg, tmp / "o", jobs=-1, backend="dask")))
    print(f"{'backend':8s} {'workers':>7s} {'img/s':>8s} {'speedup':>8s}")
    for backend, n, rate in rows:
        base = next(r for b, k, r in rows if b == backend and k == 1)
        print(f"{backend:8s} {n:7d} {rate:8.1f} {rate / base:8.2f}")
    shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
