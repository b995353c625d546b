"""The strict header converter (dicom_tags) gives exactly what pydicom's conversion gives: the same
header or the same error for every file. It converts the real RSNA files itself and hands anything
unusual to pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.uid import ImplicitVRLittleEndian

import ich_prep.dicom_header as dicom_header
from ich_prep.dicom_tags import strict_values
from ich_prep.read_dicom import ImageError, _open, quiet_rsna_uids, read_header
from tests.conftest import phantom_hu, write_hu
from tests.test_fuzz import SEED, _bases, _real_bases, write_mutants

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _header(path: Path):
    try:
        return read_header(path)
    except ImageError as e:
        return e.reason, e.detail


def _both(path: Path, monkeypatch) -> tuple[object, object]:
    """(strict converter's result, pydicom's) for one file: its header, or (reason, detail)."""
    strict = _header(path)
    with monkeypatch.context() as m:
        m.setattr(dicom_header, "strict_view", lambda ds: None)
        return strict, _header(path)


def _accepted(path: Path) -> bool:
    return strict_values(_open(path, stop_before_pixels=True)) is not None


def test_real_files_are_converted_strictly_and_identically(real_samples, monkeypatch):
    files = sorted(real_samples.rglob("*.dcm"))
    assert files and all(_accepted(f) for f in files)  # none needs pydicom's conversion
    for f in files:
        strict, plain = _both(f, monkeypatch)
        assert isinstance(strict, dict) and strict == plain, f


def _raw(path: Path, tag: int, vr: str | None, value: bytes | None) -> Path:
    """Rewrite one element of `path` with exactly these bytes (None: remove it)."""
    with quiet_rsna_uids():
        ds = pydicom.dcmread(path)
        if value is None:
            del ds[tag]
        else:
            implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
            ds[tag] = RawDataElement(tag, vr, len(value), value, 0, implicit, True)
        ds.save_as(path, enforce_file_format=True)
    return path


SLOPE, INTERCEPT, POSITION, PATIENT = 0x00281053, 0x00281052, 0x00200032, 0x00100020
CASES = {  # name: (tag, VR written, bytes, the strict converter takes it)
    "exponent": (SLOPE, "DS", b"1.5e0 ", True),
    "two slopes": (SLOPE, "DS", b"1\\2 ", True),
    "nan slope": (SLOPE, "DS", b"nan ", False),
    "comma": (INTERCEPT, "DS", b"-1024,0 ", False),
    "long DS": (INTERCEPT, "DS", b"-1024.00000000000", False),
    "two positions": (POSITION, "DS", b"1\\2 ", True),
    "infinite position": (POSITION, "DS", b"1e999\\0\\0 ", True),
    "latin-1 id": (PATIENT, "LO", b"ID_\xe9t\xe9 ", False),
    "two ids": (PATIENT, "LO", b"ID_a\\ID_b", False),
    "id with NULs": (PATIENT, "LO", b"ID_a\x00\x00", True),
    "empty id": (PATIENT, "LO", b"", False),
    "series 007": (0x00200011, "IS", b"007 ", True),
    "series 0": (0x00200011, "IS", b"0 ", True),
    "series 1.0": (0x00200011, "IS", b"1.0 ", False),
    "instance": (0x00200013, "IS", b"-12 ", True),
    "padding SS": (0x00280120, "SS", b"\x30\xf8", True),
    "padding US": (0x00280120, "US", b"\x30\xf8", True),
    "rows, 2 values": (0x00280010, "US", b"\x40\x00\x40\x00", False),
    "rows as SS": (0x00280010, "SS", b"\x40\x00", False),
    "modality CT\\MR": (0x00080060, "CS", b"CT\\MR ", False),
    "modality ct": (0x00080060, "CS", b" ct ", True),
    "no modality": (0x00080060, None, None, True),
    "frames": (0x00280008, "IS", b"2 ", True),
    "study with control": (0x0020000D, "UI", b"ID_\x01", False),
}


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_unusual_values_give_pydicom_s_result(tmp_path, monkeypatch, implicit):
    """Each case once in an explicit-VR and once in an implicit-VR file: the same header or error
    both ways, and the strict converter takes exactly the plain ones."""
    kw = {"transfer_syntax": ImplicitVRLittleEndian} if implicit else {}
    for i, (name, (tag, vr, value, strict)) in enumerate(CASES.items()):
        path = write_hu(tmp_path / f"ID_case{i:02d}.dcm", phantom_hu(64), **kw)
        _raw(path, tag, None if implicit else vr, value)
        if implicit and tag == 0x00280120:
            strict = False  # US or SS decided by PixelRepresentation: pydicom's to do
        if implicit and name == "rows as SS":
            strict = True  # no VR written: the dictionary's US
        assert _accepted(path) == strict, name
        got, want = _both(path, monkeypatch)
        assert got == want, name


def test_damaged_files_give_pydicom_s_outcome(tmp_path, monkeypatch):
    """Damaged copies of six synthetic encodings and two real slices (tests/test_fuzz.mutate):
    read_header and read_slice give the same outcome (reason and detail, or header and pixels)
    through the strict converter as through pydicom's conversion alone."""
    bases = {**_bases(tmp_path / "base"), **_real_bases(2)}
    what = write_mutants(bases, tmp_path / "fuzz", 20, SEED + 3)
    taken = 0
    for name in what:
        path = tmp_path / "fuzz" / name
        strict, plain = _both(path, monkeypatch)
        assert strict == plain, (name, what[name])
        taken += _accepted(path) if isinstance(strict, dict) else 0
    assert taken > 0.2 * len(what)  # the strict path was exercised, not only the fallback


def test_pixels_are_the_same_either_way(tmp_path, monkeypatch):
    """read_slice without a header converts the header too: same pixels and header both ways."""
    from ich_prep.read_dicom import read_slice

    path = write_hu(tmp_path / "ID_px.dcm", phantom_hu(64))
    a, ha = read_slice(path)
    with monkeypatch.context() as m:
        m.setattr(dicom_header, "strict_view", lambda ds: None)
        b, hb = read_slice(path)
    assert np.array_equal(a, b) and ha == hb
