"""Per-file cost of reading DICOMs, side by side in one run (one core, best of several rounds):

header pass:      read_header (pydicom, stops before the pixels, converts the tags the index keeps)
pixels, pydicom:  dcmread of the whole file again, then a view of PixelData (the builder before)
pixels, native:   the file's bytes, PixelData checked and viewed at the tail (read_slice now)

    python benchmarks/bench_read.py                                   # ../shared real samples
    python benchmarks/bench_read.py --dicom-dir DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pydicom

from ich_prep.read_dicom import ImageError, native_pixels, quiet_rsna_uids, read_header

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "rsna_samples"


def pixels_pydicom(path, h):
    with quiet_rsna_uids():
        ds = pydicom.dcmread(path)
    dtype = np.int16 if h["pixel_representation"] == 1 else np.uint16
    return np.frombuffer(ds.PixelData, dtype, h["rows"] * h["cols"]).reshape(h["rows"], h["cols"])


def pixels_native(path, h):
    return native_pixels(Path(path).read_bytes(), h)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dicom-dir", default=str(REAL))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    headers = {}
    for p in sorted(Path(args.dicom_dir).rglob("*.dcm")):
        try:
            headers[p] = read_header(p)
        except ImageError:
            continue
    n_readable = len(headers)
    # time the files both ways can read (a deliberately truncated synthetic file reads neither way)
    headers = {p: h for p, h in headers.items() if native_pixels(p.read_bytes(), h) is not None}
    same = all(
        np.array_equal(pixels_pydicom(p, h), pixels_native(p, h)) for p, h in headers.items()
    )
    ways = {
        "header pass": lambda p, h: read_header(p),
        "pixels, pydicom": pixels_pydicom,
        "pixels, native": pixels_native,
    }
    best = {name: np.inf for name in ways}
    for _ in range(args.rounds):  # alternate so drifts of a shared machine hit every way alike
        for name, fn in ways.items():
            t0 = time.perf_counter()
            for p, h in headers.items():
                fn(p, h)
            best[name] = min(best[name], (time.perf_counter() - t0) / len(headers) * 1e3)
    print(f"{n_readable} files with a readable header in {args.dicom_dir}; {len(headers)} take the "
          f"native path; identical pixels both ways: {same}")  # fmt: skip
    for name, ms in best.items():
        print(f"{name:18s} {ms:7.3f} ms/file")
    print(f"pixels: pydicom / native = {best['pixels, pydicom'] / best['pixels, native']:.1f}x")


if __name__ == "__main__":
    main()
