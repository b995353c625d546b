"""How well adjacent slices of a series line up under --crop series and --crop slice, and what the
series crop costs, measured on builds of one folder (the real RSNA samples by default).

Alignment, per pair of adjacent compiled slices of a series (slice_rank r and r+1), from the index:
  scale:  max(S_a, S_b) / min(S_a, S_b) - 1, S = the longer side of the slice's crop box (the
          square that becomes the image), the whole slice where it has no box;
  centre: distance between the two boxes' centres, in output pixels (original pixels * size / mean S).
Both are 0 when the two slices were cropped with one box. Also printed: how much smaller the head is
under the series box than under each slice's own box (its own S / the series S), and the time
of the shard tasks on one core for slice crops, series crops holding one series' HU in memory (the
default) and series crops reading every slice twice (SERIES_HOLD_BYTES = 0).

    python benchmarks/bench_crop.py                      # ../shared real samples, size 256
    python benchmarks/bench_crop.py --dicom-dir DIR [--labels CSV]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import ich_prep.build as build_mod
import ich_prep.build_worker as build_worker
from ich_prep.config import BuildConfig

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "rsna_samples"
BOX = ["crop_y0", "crop_y1", "crop_x0", "crop_x1"]


def boxes(index: pd.DataFrame) -> pd.DataFrame:
    """The ok rows in slice order with each slice's crop square side S and box centre (cy, cx),
    in original pixels (the whole slice where the index has no box)."""
    ok = index[index["status"] == "ok"].sort_values(["fold", "series_id", "slice_rank"])
    whole = ok["crop_y0"].isna()
    y0 = ok["crop_y0"].astype(float).where(~whole, 0.0)
    y1 = ok["crop_y1"].astype(float).where(~whole, ok["rows"].astype(float))
    x0 = ok["crop_x0"].astype(float).where(~whole, 0.0)
    x1 = ok["crop_x1"].astype(float).where(~whole, ok["cols"].astype(float))
    return ok.assign(S=np.maximum(y1 - y0, x1 - x0), cy=(y0 + y1) / 2, cx=(x0 + x1) / 2)


def adjacent_disagreement(index: pd.DataFrame, size: int) -> pd.DataFrame:
    """One row per pair of adjacent compiled slices of a series: scale (fraction) and centre
    (output pixels at `size`) disagreement, as defined in this module's docstring."""
    b = boxes(index)
    same = (b["series_id"].to_numpy()[1:] == b["series_id"].to_numpy()[:-1]) & (
        b["fold"].to_numpy()[1:] == b["fold"].to_numpy()[:-1]
    )
    s, cy, cx = (b[c].to_numpy() for c in ("S", "cy", "cx"))
    scale = np.maximum(s[1:], s[:-1]) / np.minimum(s[1:], s[:-1]) - 1
    centre = np.hypot(cy[1:] - cy[:-1], cx[1:] - cx[:-1]) * size / ((s[1:] + s[:-1]) / 2)
    n = b["series_len"].to_numpy()[1:]
    return pd.DataFrame({"scale": scale[same], "centre": centre[same], "series_len": n[same]})


def summary(d: pd.DataFrame) -> str:
    return (
        f"{len(d):5d} pairs  scale median {100 * d['scale'].median():5.2f}%  max "
        f"{100 * d['scale'].max():5.1f}%  centre median {d['centre'].median():5.2f} px  max "
        f"{d['centre'].max():5.1f} px"
    )


def build_index(cfg: BuildConfig, out: Path, hold: int | None = None) -> pd.DataFrame:
    """Build `cfg` into `out` on one core (with SERIES_HOLD_BYTES = `hold` when given); its index."""
    saved = build_worker.SERIES_HOLD_BYTES
    if hold is not None:
        build_worker.SERIES_HOLD_BYTES = hold
    try:
        build_mod.build(cfg, out, jobs=1, progress=False)
    finally:
        build_worker.SERIES_HOLD_BYTES = saved
    return pd.read_parquet(out / "index.parquet")


def compile_times(base: dict, variants, tmp: Path, rounds: int) -> dict[str, float]:
    """Seconds per compiled slice of the shard tasks alone (read, HU, boxes, crop, resize,
    windows, encode, tar; not the header pass), one core, best of `rounds` interleaved runs."""
    from ich_prep.location import WORK, Store, list_inputs

    cfg = BuildConfig(**base)
    store = Store(tmp / "plan")
    store.makedirs(WORK)
    df = build_mod.plan_images(cfg, list_inputs(cfg.dicom_dir, ".dcm"), 1, store, False)
    plan = build_mod.plan_shards(df, cfg)
    recs = {n: build_mod._records(p, cfg.dicom_dir, cfg.labels is not None) for n, p in plan.items()}  # fmt: skip
    n_slices = sum(len(r) for r in recs.values())
    best: dict[str, float] = {}
    saved = build_worker.SERIES_HOLD_BYTES
    for r in range(rounds):
        for name, crop, hold in variants:
            out = tmp / f"compile-{name}-{r}".replace(" ", "_").replace(",", "")
            Store(out).makedirs(WORK)
            vcfg = BuildConfig(**base, crop=crop)
            build_worker.SERIES_HOLD_BYTES = saved if hold is None else hold
            try:
                t0 = time.perf_counter()
                for n in plan:
                    build_mod.compile_shard(str(out), n, recs[n], vcfg, "bench")
                wall = time.perf_counter() - t0
            finally:
                build_worker.SERIES_HOLD_BYTES = saved
            best[name] = min(best.get(name, wall), wall / n_slices)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dicom-dir", default=str(REAL))
    ap.add_argument("--labels", help="labels CSV (default: a test build of every file)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="timed runs per variant (best kept)")
    args = ap.parse_args(argv)
    base = {"dicom_dir": str(Path(args.dicom_dir).resolve()), "size": args.size}
    if args.labels:
        base["labels"] = str(Path(args.labels).resolve())
    variants = [("slice", "slice", None), ("series, held", "series", None), ("series, read twice", "series", 0)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        index, shards = {}, {}
        for name, crop, hold in variants:
            out = Path(tmp) / name.replace(" ", "_").replace(",", "")
            index[name] = build_index(BuildConfig(**base, crop=crop), out, hold)
            shards[name] = [p.read_bytes() for p in sorted(out.glob("*.tar"))]
        per_slice = compile_times(base, variants, Path(tmp), args.rounds)
    ok = index["slice"]["status"].eq("ok").sum()
    print(f"data: {args.dicom_dir}  size {args.size}  {ok} compiled slices")
    print("adjacent slices of a series:")
    for name in ("slice", "series, held"):
        d = adjacent_disagreement(index[name], args.size)
        crop = name.split(",")[0]
        print(f"  --crop {crop:6s} {'whole series (>= 10 slices)':30s} {summary(d[d['series_len'] >= 10])}")  # fmt: skip
        print(f"  --crop {crop:6s} {'every series':30s} {summary(d)}")
        if crop == "slice":  # the slices above the head have no box and keep the whole slice
            b = adjacent_disagreement(index[name].dropna(subset=["crop_y0"]), args.size)
            print(f"  --crop {crop:6s} {'whole series, head boxes only':30s} {summary(b[b['series_len'] >= 10])}")  # fmt: skip
    own = boxes(index["slice"]).set_index("image_id")
    ser = boxes(index["series, held"]).set_index("image_id")
    has_box = own["crop_y0"].notna()
    zoom = own.loc[has_box, "S"] / ser.loc[own.index[has_box], "S"]
    print(
        f"head size under the series box vs its own box: median {zoom.median():.3f}, "
        f"min {zoom.min():.3f} ({has_box.sum()} slices with a head box)"
    )
    same = index["series, held"].equals(index["series, read twice"]) and (
        shards["series, held"] == shards["series, read twice"]
    )
    print(f"identical shards and index, HU held / read twice: {same}")
    print(f"shard tasks alone, one core, best of {args.rounds}:")
    for name, _, _ in variants:
        print(f"  --crop {name:20s} {1000 * per_slice[name]:6.3f} ms/slice")
    stage_costs(own, base, args.rounds)


def stage_costs(ok: pd.DataFrame, base: dict, rounds: int) -> None:
    """Per-slice cost of what reading twice repeats (read_slice + HU) and of the head box, which
    both crops compute once per slice: best of `rounds` passes over the compiled slices."""
    from ich_prep.read_dicom import read_header, read_slice
    from ich_prep.transform import head_box, header_to_hu

    paths = [Path(base["dicom_dir"]) / p for p in ok["path"]]
    headers = [read_header(p) for p in paths]  # the build has them from its header pass
    best_read, best_box = float("inf"), float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        hus = [header_to_hu(*read_slice(p, h)) for p, h in zip(paths, headers, strict=True)]
        t1 = time.perf_counter()
        for hu in hus:
            head_box(hu)
        t2 = time.perf_counter()
        best_read, best_box = min(best_read, t1 - t0), min(best_box, t2 - t1)
    mib = sum(hu.nbytes for hu in hus) / len(hus) / 2**20
    print(
        f"per slice: read + HU {1000 * best_read / len(paths):.3f} ms (what reading twice repeats), "
        f"head box {1000 * best_box / len(paths):.3f} ms; held HU {mib:.2f} MiB per slice"
    )


if __name__ == "__main__":
    main()
