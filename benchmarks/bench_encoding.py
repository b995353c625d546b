"""Size and one-core encode/decode time of each shard encoding, on compiled images, in one run.

python benchmarks/bench_encoding.py                       # real RSNA samples if present, else synthetic
python benchmarks/bench_encoding.py --dicom-dir DIR
python benchmarks/bench_encoding.py --gzip-levels 0,1,2,3   # also npy.gz at other ISA-L levels
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ich_prep.config import ENCODINGS, parse_windows
from ich_prep.read_dicom import ImageError, read_slice
from ich_prep.shards import decode_image, encode_image
from ich_prep.transform import compile_image, header_to_hu

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "rsna_samples"


def images(dicom_dir: Path, size: int) -> list[np.ndarray]:
    windows = [(w.center, w.width) for w in parse_windows("brain,subdural,bone")]
    out = []
    for f in sorted(dicom_dir.rglob("*.dcm")):
        try:
            s, h = read_slice(f)
        except ImageError:
            continue
        hu = header_to_hu(s, h)
        out.append(compile_image(hu, windows, size)[0])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dicom-dir", type=Path)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--gzip-levels", help="also time npy.gz at these ISA-L levels (the build: 2)")
    args = p.parse_args(argv)
    src = args.dicom_dir or (REAL if REAL.is_dir() else None)
    if src is None:
        from ich_prep.synth import write_synthetic

        src = Path(write_synthetic(tempfile.mkdtemp(), patients=12)["train_dir"])
    imgs = images(src, args.size)
    print(
        f"{len(imgs)} images from {src}, {args.size}x{args.size}x3 uint8 ({args.size * args.size * 3 / 1024:.0f} KiB raw)"
    )
    print(
        f"{'encoding':8s} {'KiB/img':>8s} {'encode ms':>10s} {'decode ms':>10s} {'decode img/s/core':>18s}  kind"
    )
    for enc, what in ENCODINGS.items():
        t0 = time.perf_counter()
        blobs = [encode_image(i, enc) for i in imgs]
        t_enc = (time.perf_counter() - t0) / len(imgs)
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            for b in blobs:
                decode_image(b, enc)
        t_dec = (time.perf_counter() - t0) / len(imgs) / args.repeat
        kib = np.mean([len(b) for b in blobs]) / 1024
        print(
            f"{enc:8s} {kib:8.1f} {t_enc * 1e3:10.2f} {t_dec * 1e3:10.2f} {1 / t_dec:18.0f}  {what.split(':')[0]}"
        )
    if args.gzip_levels:
        _levels(imgs, [int(v) for v in args.gzip_levels.split(",")], args.repeat)
    return 0


def _levels(imgs: list[np.ndarray], levels: list[int], repeat: int) -> None:
    """npy.gz at other ISA-L levels: best of `repeat` CPU times per image (decode: the reader's)."""
    from isal import igzip

    from ich_prep.shards import _encode_npy

    raw = [_encode_npy(i) for i in imgs]
    for level in levels:
        t_enc = t_dec = float("inf")
        for _ in range(repeat):
            t0 = time.process_time()
            blobs = [igzip.compress(r, compresslevel=level, mtime=0) for r in raw]
            t_enc = min(t_enc, time.process_time() - t0)
            t0 = time.process_time()
            for b in blobs:
                decode_image(b, "npy.gz")
            t_dec = min(t_dec, time.process_time() - t0)
        kib = np.mean([len(b) for b in blobs]) / 1024
        n = len(imgs)
        print(f"npy.gz level {level}: {kib:6.1f} KiB/img  encode {t_enc / n * 1e3:.3f} ms  decode {t_dec / n * 1e3:.3f} ms  ({n / t_dec:,.0f} img/s/core)")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
