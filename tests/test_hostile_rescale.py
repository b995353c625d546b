"""A rescale that gives no Hounsfield units is the file's error row (bad_rescale), never an image:
real RSNA slices rewritten with RescaleSlope 1e-30 (was: an all-zero image, status ok), 1e30 (was:
a binary 0/255 image) and slopes between, under both crops; the real slices themselves all pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.read_dicom import quiet_rsna_uids, read_slice
from ich_prep.transform import ImplausibleHU, check_hu, stored_head_box

BAD_SLOPES = [1e-30, 1e-12, 1e-6, 1e-3, 1e4, 1e6, 1e12, 1e30, 1e38, 1e300]
GOOD_SLOPES = [1.0, 0.5, 2.0]  # odd, but Hounsfield-like: never refused


def real_files(real_samples: Path, n: int) -> list[Path]:
    """`n` real slices of one whole series (the first in the samples)."""
    files = sorted(real_samples.rglob("*.dcm"))
    by_series: dict[str, list[Path]] = {}
    for f in files:
        with quiet_rsna_uids():
            sid = str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
        by_series.setdefault(sid, []).append(f)
    return max(by_series.values(), key=len)[:n]


def rescaled(src: Path, dst: Path, slope: float) -> Path:
    """`src` (a real file) with its RescaleSlope (0028,1053) replaced."""
    with quiet_rsna_uids():
        ds = pydicom.dcmread(src)
        ds.RescaleSlope = f"{slope:.6g}"
        ds.save_as(dst)
    return dst


@pytest.mark.parametrize("crop", ["series", "slice"])
def test_real_slices_with_extreme_slopes_are_error_rows(real_samples, tmp_path, crop):
    """Real slices of one series, each copy with another slope: every BAD_SLOPES copy is an error
    row 'bad_rescale' naming the slope; the untouched slices and the GOOD_SLOPES copies compile."""
    src = real_files(real_samples, 3)
    d = tmp_path / "dicom"
    d.mkdir()
    want = {}
    for f in src:
        shutil.copy(f, d / f.name)
        want[f.stem] = "ok"
    for k, slope in enumerate(BAD_SLOPES + GOOD_SLOPES):
        name = f"ID_slope{k:02d}"
        rescaled(src[k % len(src)], d / f"{name}.dcm", slope)
        want[name] = "ok" if slope in GOOD_SLOPES else "bad_rescale"
    cfg = BuildConfig(dicom_dir=str(d), size=32, folds=2, crop=crop, shard_size=100)
    build(cfg, str(tmp_path / "out"), jobs=1, progress=False)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("image_id")
    got = {i: ("ok" if r.status == "ok" else r.reason) for i, r in index.iterrows()}
    assert got == want
    for i in (i for i, w in want.items() if w == "bad_rescale"):
        assert "RescaleSlope=" in index.loc[i, "detail"] and "HU" in index.loc[i, "detail"]


def test_every_real_sample_passes_the_check(real_samples):
    """All 109 real slices: a head box and HU a head CT has (no false alarm)."""
    files = sorted(real_samples.rglob("*.dcm"))
    assert len(files) >= 100
    for f in files:
        stored, h = read_slice(f)
        stored_head_box(stored, h)


@pytest.mark.parametrize("value", [-1024.0, 0.0, 40.0, 5000.0])
def test_a_constant_slice_is_refused(value):
    """One value everywhere (whatever it is): no image."""
    with pytest.raises(ImplausibleHU, match="constant image"):
        check_hu(np.full((128, 128), value, np.float32), 4, None)


def test_metal_in_a_head_is_not_refused():
    """A head with a metal implant (30,000 HU on an extended scale) over a fifth of its box."""
    hu = np.full((128, 128), -1000.0, np.float32)
    hu[20:100, 20:100] = 40.0
    hu[30:60, 30:60] = 30000.0
    check_hu(hu, 1, (20, 100, 20, 100))
    hu[20:100, 20:100] = 30000.0
    with pytest.raises(ImplausibleHU, match="100% of the head box is above 3071 HU"):
        check_hu(hu, 1, (20, 100, 20, 100))
