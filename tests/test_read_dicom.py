"""Reading DICOM slices: metadata, pixels, and a clear reason for each kind of bad file."""

import warnings

import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from ich_prep.read_dicom import ImageError, read_header, read_slice
from tests.conftest import phantom_hu, write_ct, write_hu


def test_header_fields(tmp_path):
    """The header pass returns ids, z position, spacing, shape and rescale values as numbers."""
    p = write_hu(tmp_path / "ID_aaa.dcm", phantom_hu(), z=12.5, intercept="-1024.000000")
    h = read_header(p)
    assert h["patient_id"] == "ID_p0000001" and h["series_id"] == "ID_se00000001"
    assert h["z_position"] == 12.5 and h["rows"] == 128 and h["rescale_intercept"] == -1024.0
    assert h["pixel_spacing_y"] == 0.5


def test_pixels_roundtrip(tmp_path):
    """Stored values come back exactly, for signed and unsigned storage."""
    stored = np.arange(64 * 64).reshape(64, 64) % 4000
    for rep in (0, 1):
        p = write_ct(
            tmp_path / f"ID_{rep}.dcm", stored, bits_stored=12 if rep == 0 else 16, pixel_rep=rep
        )
        got, h = read_slice(p)
        np.testing.assert_array_equal(got, stored)
        assert h["pixel_representation"] == rep


def test_rsna_uid_warning_silenced(tmp_path):
    """pydicom's 'Invalid value for VR UI' warning about ID_ UIDs is not shown."""
    p = write_hu(tmp_path / "ID_bbb.dcm", phantom_hu())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_slice(p)
    assert not [w for w in caught if "VR UI" in str(w.message)]


def _reason(path):
    with pytest.raises(ImageError) as e:
        read_slice(path)
    assert str(path) in str(e.value)  # the message names the file
    return e.value.reason


def test_not_dicom(tmp_path):
    """A text file is 'unreadable'."""
    p = tmp_path / "ID_txt.dcm"
    p.write_text("hello, not a DICOM")
    assert _reason(p) == "unreadable"


def test_truncated(tmp_path):
    """A file cut in the middle of the pixel data is 'unreadable'."""
    p = write_hu(tmp_path / "ID_cut.dcm", phantom_hu())
    p.write_bytes(p.read_bytes()[:3000])
    assert _reason(p) == "unreadable"


def test_missing_pixel_data(tmp_path):
    """A header-only file is 'no_pixel_data'."""
    assert (
        _reason(write_hu(tmp_path / "ID_np.dcm", phantom_hu(), with_pixels=False))
        == "no_pixel_data"
    )


def test_compressed_without_decoder(tmp_path):
    """JPEG 2000 pixels with no decoder installed: 'unsupported_transfer_syntax' naming the fix."""
    p = write_hu(
        tmp_path / "ID_j2k.dcm", phantom_hu(), transfer_syntax=JPEG2000Lossless, with_pixels=False
    )
    import pydicom

    ds = pydicom.dcmread(p)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(ImageError) as e:
        read_slice(p)
    assert e.value.reason in ("unsupported_transfer_syntax", "unreadable")
    assert "pylibjpeg" in str(e.value) or "decode" in str(e.value)


def test_not_ct(tmp_path):
    """An MR slice is 'not_ct'."""
    assert _reason(write_hu(tmp_path / "ID_mr.dcm", phantom_hu(), modality="MR")) == "not_ct"


def test_bad_bit_depth(tmp_path):
    """8-bit storage is 'bad_bit_depth'."""
    p = write_hu(tmp_path / "ID_8.dcm", phantom_hu())
    import pydicom

    ds = pydicom.dcmread(p)
    ds.BitsAllocated = 8
    ds.save_as(p, enforce_file_format=True)
    assert _reason(p) == "bad_bit_depth"


def test_bad_shape(tmp_path):
    """A 16x16 slice is 'bad_shape'."""
    assert _reason(write_ct(tmp_path / "ID_tiny.dcm", np.zeros((16, 16)))) == "bad_shape"


@pytest.mark.parametrize("missing", ["intercept", "slope", "z"])
def test_missing_tags(tmp_path, missing):
    """No intercept, slope or position: 'missing_tag' naming the tag."""
    p = write_hu(tmp_path / f"ID_{missing}.dcm", phantom_hu(), **{missing: None})
    with pytest.raises(ImageError) as e:
        read_slice(p)
    assert e.value.reason == "missing_tag"
    assert {"intercept": "RescaleIntercept", "slope": "RescaleSlope", "z": "ImagePositionPatient"}[
        missing
    ] in str(e.value)
