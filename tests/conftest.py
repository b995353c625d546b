"""Shared fixtures: real DICOM files written with pydicom, and the path of the real RSNA samples."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ich_prep.read_dicom import quiet_rsna_uids
from ich_prep.synth import CSV_ORDER

REAL_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "rsna_samples"


@pytest.fixture(autouse=True, scope="module")
def _restore_environ():
    """Undo environment changes a module leaves behind: a dask LocalCluster's nannies set
    OMP_NUM_THREADS=1 in this process, which would change later subprocesses' float results."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


def phantom_hu(size: int = 128, radius: float = 0.4) -> np.ndarray:
    """A tiny head in HU (size, size): air, a skull ring of 1000 HU, brain of 40 HU."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2) / size
    hu = np.full((size, size), -1000.0)
    hu[r < radius] = 1000.0
    hu[r < radius - 0.04] = 40.0
    return hu


def write_ct(
    path: Path,
    stored: np.ndarray,
    *,
    bits_stored: int = 16,
    pixel_rep: int = 1,
    intercept: str | None = "-1024",
    slope: str | None = "1",
    patient: str = "ID_p0000001",
    series: str = "ID_se00000001",
    z: float | None = 0.0,
    modality: str = "CT",
    transfer_syntax=ExplicitVRLittleEndian,
    with_pixels: bool = True,
    position: tuple | None = None,
    orientation: list | None = None,
    instance: int | str | None = None,
    study: str | None = None,
    frame: str | None = None,
) -> Path:
    """Write a real single-frame CT DICOM file with RSNA-style pseudonym UIDs. `position`
    (ImagePositionPatient) replaces (-125, -125, z); `orientation` (ImageOrientationPatient) and
    `instance` (InstanceNumber) are written only when given; `study` replaces the StudyInstanceUID
    made from `series`; `frame` (FrameOfReferenceUID) is written only when given."""
    image_id = Path(path).stem
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = transfer_syntax
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = image_id
    ds.Modality = modality
    ds.PatientID = patient
    ds.StudyInstanceUID = "ID_st" + series[5:] if study is None else study
    if frame is not None:
        ds.FrameOfReferenceUID = frame
    ds.SeriesInstanceUID = series
    if position is not None:
        ds.ImagePositionPatient = list(position)
    elif z is not None:
        ds.ImagePositionPatient = [-125, -125, z]
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    if instance is not None:
        ds.InstanceNumber = instance
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_rep
    ds.WindowCenter = ["00036", "00036"]
    ds.WindowWidth = ["00080", "00080"]
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if slope is not None:
        ds.RescaleSlope = slope
    if with_pixels:
        ds.PixelData = stored.astype(np.int16 if pixel_rep else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_rsna_uids():
        ds.save_as(path, enforce_file_format=True)
    return path


def write_hu(path: Path, hu: np.ndarray, **kw) -> Path:
    """Write HU as 16-bit signed storage with intercept -1024."""
    return write_ct(path, np.round(hu + 1024).astype(np.int16), **kw)


@pytest.fixture
def real_samples() -> Path:
    if not REAL_SAMPLES.is_dir():
        pytest.skip(
            f"real RSNA samples not found at {REAL_SAMPLES} (they live in ../shared beside the repo)"
        )
    return REAL_SAMPLES


def csv_rows(image_id: str, positive: dict | None = None) -> list[str]:
    positive = positive or {}
    return [f"{image_id}_{k},{positive.get(k, 0)}" for k in CSV_ORDER]


def make_dataset(
    root: Path, n_patients: int = 6, slices: int = 4, size: int = 96
) -> tuple[Path, Path, dict]:
    """A small labelled set: one series per patient, a bright blob = intraparenchymal + any."""
    dicom_dir, labels = root / "train", root / "labels.csv"
    lines, truth = [], {}
    for p in range(n_patients):
        for s in range(slices):
            image_id = f"ID_{p:04x}{s:05x}"
            hu = phantom_hu(size)
            positive = (p + s) % 2 == 0
            if positive:
                hu[size // 2 - 8 : size // 2 + 8, size // 2 - 8 : size // 2 + 8] = 75.0
            write_hu(
                dicom_dir / f"{image_id}.dcm",
                hu,
                patient=f"ID_p{p:07d}",
                series=f"ID_se{p:08d}",
                z=5.0 * s,
            )
            pos = {"intraparenchymal": 1, "any": 1} if positive else {}
            lines += csv_rows(image_id, pos)
            truth[image_id] = [1, 0, 1, 0, 0, 0] if positive else [0] * 6
    labels.write_text("ID,Label\n" + "\n".join(lines) + "\n")
    return dicom_dir, labels, truth


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")
