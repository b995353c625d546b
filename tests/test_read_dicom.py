"""Reading DICOM slices: metadata, pixels, and a clear reason for each kind of bad file."""

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from ich_prep.read_dicom import ImageError, native_pixels, read_header, read_slice
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


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, "explicit"])
def test_native_pixels_read_from_the_bytes_equal_pydicoms(tmp_path, syntax):
    """Implicit and explicit VR little endian: pixels taken from the file's tail equal pixel_array."""
    stored = (np.arange(96 * 80).reshape(96, 80) * 7 % 4000 - 1000).astype(np.int16)
    kw = {} if syntax == "explicit" else {"transfer_syntax": syntax}
    p = write_ct(tmp_path / "ID_n.dcm", stored, **kw)
    h = read_header(p)
    got = native_pixels(p.read_bytes(), h)
    np.testing.assert_array_equal(got, pydicom.dcmread(p).pixel_array)
    np.testing.assert_array_equal(read_slice(p, h)[0], stored)


def test_other_layouts_fall_back_to_pydicom(tmp_path):
    """An element after PixelData, or big-endian pixels: no fast path, and read_slice still reads them."""
    stored = (np.arange(64 * 64).reshape(64, 64) % 3000).astype(np.int16)
    p = write_ct(tmp_path / "ID_pad.dcm", stored)
    ds = pydicom.dcmread(p)
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)  # DataSetTrailingPadding after the pixels
    ds.save_as(p, enforce_file_format=True)
    h = read_header(p)
    assert native_pixels(p.read_bytes(), h) is None
    np.testing.assert_array_equal(read_slice(p, h)[0], stored)
    big = write_ct(tmp_path / "ID_be.dcm", stored, transfer_syntax=ExplicitVRBigEndian,
                   with_pixels=False)  # fmt: skip
    ds = pydicom.dcmread(big)
    ds.PixelData = stored.astype(">i2").tobytes()  # big-endian bytes, as that syntax stores them
    ds["PixelData"].VR = "OW"
    ds.save_as(big, enforce_file_format=True)
    h = read_header(big)
    assert native_pixels(big.read_bytes(), h) is None
    np.testing.assert_array_equal(read_slice(big, h)[0], stored)


def test_truncated_pixels_with_a_header_from_the_header_pass(tmp_path):
    """The build passes the header it already read: a file cut inside its pixels is still 'unreadable'."""
    p = write_hu(tmp_path / "ID_cut.dcm", phantom_hu())
    h = read_header(p)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ImageError) as e:
        read_slice(p, h)
    assert e.value.reason == "unreadable" and "ID_cut.dcm" in str(e.value)


def test_real_rsna_files_take_the_fast_path(real_samples):
    """Every readable real RSNA sample (explicit and implicit VR) is read from its bytes, equal to pydicom."""
    n = 0
    for p in sorted(real_samples.rglob("*.dcm")):
        try:
            h = read_header(p)
        except ImageError:
            continue
        got = native_pixels(p.read_bytes(), h)
        assert got is not None, p
        np.testing.assert_array_equal(got, pydicom.dcmread(p).pixel_array)
        n += 1
    assert n >= 100


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
