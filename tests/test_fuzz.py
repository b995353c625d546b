"""Seeded fuzz of the DICOM reader and the build: a damaged file is an ImageError and one error
row, never an exception of another kind, a crash or a lost image.

Real-shaped files (written with pydicom: explicit and implicit VR, 12-bit storage, RLE Lossless,
Deflated Explicit VR Little Endian, Explicit VR Big Endian; plus the real RSNA samples when
present) get 1-8 random bytes changed in the header (the first KB after the 132-byte preamble and
'DICM'), in the tail (pixels; for RLE and deflated files the compressed stream), or are cut short.
numpy's default_rng with a fixed seed: a failure names the file and its mutation, and reproduces.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.read_dicom import (
    MAX_DETAIL,
    MAX_ID_CHARS,
    REASONS,
    ImageError,
    quiet_rsna_uids,
    read_header,
    read_slice,
)
from ich_prep.verify import verify
from tests.conftest import REAL_SAMPLES, phantom_hu, write_ct, write_hu

# pydicom warns about much of what the damage does (bad VRs, RLE padding): noise here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SEED = 20191010
HEADER_START, HEADER_SPAN = 132, 1024  # after the preamble and 'DICM'


def _stored() -> np.ndarray:
    return np.round(phantom_hu(64) + 1024).astype(np.int16)


def _resave(path: Path, edit) -> Path:
    with quiet_rsna_uids():
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path, enforce_file_format=True)
    return path


def _big_endian(path: Path) -> Path:
    write_ct(path, _stored(), transfer_syntax=ExplicitVRBigEndian, with_pixels=False)

    def edit(ds):
        ds.PixelData = _stored().astype(">i2").tobytes()  # big-endian, as that syntax stores it
        ds["PixelData"].VR = "OW"

    return _resave(path, edit)


def _deflated(path: Path) -> Path:
    write_hu(path, phantom_hu(64))
    return _resave(path, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", DeflatedExplicitVRLittleEndian))  # fmt: skip


def _bases(root: Path) -> dict[str, bytes]:
    """name -> bytes of each undamaged file; each reads fine before it is damaged."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "explicit": write_hu(root / "explicit.dcm", phantom_hu(64)),
        "implicit": write_hu(
            root / "implicit.dcm", phantom_hu(64), transfer_syntax=ImplicitVRLittleEndian
        ),  # fmt: skip
        "bits12": write_ct(
            root / "bits12.dcm", _stored() % 4096, bits_stored=12, pixel_rep=0, intercept="-1024"
        ),  # fmt: skip
        "rle": _resave(
            write_hu(root / "rle.dcm", phantom_hu(64)), lambda ds: ds.compress(RLELossless)
        ),  # fmt: skip
        "deflated": _deflated(root / "deflated.dcm"),
        "bigendian": _big_endian(root / "bigendian.dcm"),
    }
    for p in paths.values():
        read_slice(p, read_header(p))
    return {name: p.read_bytes() for name, p in paths.items()}


def _real_bases(n: int = 3) -> dict[str, bytes]:
    files = sorted(REAL_SAMPLES.rglob("*.dcm"))[:n] if REAL_SAMPLES.is_dir() else []
    return {f"real{i}": p.read_bytes() for i, p in enumerate(files)}


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """(damaged copy, what was done): 1-8 random bytes in the header or the tail, or a cut."""
    kind = rng.choice(["header", "header", "tail", "cut"])
    if kind == "cut":
        n = int(rng.integers(0, len(data)))
        return data[:n], f"cut at {n}"
    lo, hi = (HEADER_START, HEADER_START + HEADER_SPAN) if kind == "header" else (len(data) // 2, len(data))  # fmt: skip
    hi = min(hi, len(data))
    buf = bytearray(data)
    where = sorted(int(i) for i in rng.integers(lo, hi, size=int(rng.integers(1, 9))))
    for i in where:
        buf[i] = int(rng.integers(0, 256))
    return bytes(buf), f"{kind} bytes {where}"


def write_mutants(bases: dict[str, bytes], out: Path, per_base: int, seed: int) -> dict[str, str]:
    """Write `per_base` damaged copies of each base as out/ID_<base><i>.dcm; path name -> mutation."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    what = {}
    for name, data in bases.items():
        for i in range(per_base):
            damaged, how = mutate(data, rng)
            path = out / f"ID_{name}{i:04d}.dcm"
            path.write_bytes(damaged)
            what[path.name] = f"{name}: {how}"
    return what


def _check_header(h: dict) -> None:
    """What an accepted header promises the writer: bounded ids, finite numbers."""
    assert all(len(h[k]) <= MAX_ID_CHARS for k in ("patient_id", "study_id", "series_id"))
    assert math.isfinite(h["z_position"]) and math.isfinite(h["rescale_intercept"])
    assert math.isfinite(h["rescale_slope"]) and h["rescale_slope"] != 0


def outcome(path: Path) -> str:
    """'ok' or the ImageError reason of read_header, then read_slice with and without a header."""
    try:
        h = read_header(path)
        _check_header(h)
        for header in (h, None):
            stored, _ = read_slice(path, header)
            assert stored.shape == (h["rows"], h["cols"])
    except ImageError as e:
        assert e.reason in REASONS and len(e.detail) <= MAX_DETAIL
        return e.reason
    return "ok"


def _fuzz_reader(bases: dict[str, bytes], tmp: Path, per_base: int, seed: int) -> dict[str, int]:
    what = write_mutants(bases, tmp, per_base, seed)
    counts: dict[str, int] = {}
    failures = []
    for name, how in what.items():
        try:
            reason = outcome(tmp / name)
        except Exception as e:  # noqa: BLE001 - collect every escape, not just the first
            failures.append(f"{name} ({how}): {type(e).__name__}: {str(e)[:200]}")
            continue
        counts[reason] = counts.get(reason, 0) + 1
    assert not failures, f"{len(failures)} of {len(what)} damaged files escaped ImageError:\n" + "\n".join(failures[:20])  # fmt: skip
    return counts


def test_damaged_files_raise_only_image_error(tmp_path):
    """Part 1: 480 damaged synthetic files (six encodings): read_header and read_slice either
    succeed with a sane header or raise ImageError, never anything else."""
    counts = _fuzz_reader(_bases(tmp_path / "base"), tmp_path / "fuzz", 80, SEED)
    n = sum(counts.values())
    assert n == 480
    assert 0.05 * n < counts.get("ok", 0) < 0.95 * n, counts  # the fuzz hits both outcomes


def test_damaged_real_rsna_files_raise_only_image_error(tmp_path):
    """Part 1 on real RSNA slices (skipped without ../shared): 3 files x 25 damaged copies."""
    bases = _real_bases()
    if not bases:
        pytest.skip(f"real RSNA samples not found at {REAL_SAMPLES}")
    counts = _fuzz_reader(bases, tmp_path / "fuzz", 25, SEED + 1)
    assert sum(counts.values()) == 25 * len(bases)


def test_build_of_damaged_files_finishes_with_one_row_each(tmp_path):
    """Part 2: a build over 240 damaged files (40 of each encoding, or 30 each plus 30 of each of
    two real RSNA slices) finishes; every input has exactly one index row; every ok row decodes
    (verify re-reads every shard)."""
    bases = {**_bases(tmp_path / "base"), **_real_bases(2)}
    per_base = 40 if len(bases) == 6 else 30
    what = write_mutants(bases, tmp_path / "test", per_base, SEED + 2)
    cfg = BuildConfig(dicom_dir=str(tmp_path / "test"), labels=None, size=64, shard_size=50)
    res = build(cfg, tmp_path / "out", jobs=1, progress=False)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert sorted(index["path"]) == sorted(what) and index["image_id"].is_unique
    ok = int((index["status"] == "ok").sum())
    assert 0 < ok < len(what) and res.manifest["counts"]["ok"] == ok
    assert (index.loc[index["status"] != "ok", "detail"].str.len() <= MAX_DETAIL).all()
    report = verify(str(tmp_path / "out"))
    assert report.ok, report
