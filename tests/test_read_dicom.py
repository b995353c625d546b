"""Reading DICOM slices: metadata, pixels, and a clear reason for each kind of bad file."""

import contextlib
import math
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from ich_prep import read_dicom
from ich_prep.read_dicom import ImageError, native_pixels, quiet_rsna_uids, read_header, read_slice
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


# ---------------------------------------------------------------- only regular files, bounded


def _in_thread(fn, *args, timeout: float = 10.0):
    """fn(*args) in a daemon thread: ('ok', value), ('raised', exception) or ('hung', None)."""
    box = []

    def run():
        try:
            box.append(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - handed back to the test to inspect
            box.append(("raised", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else ("hung", None)


def _unblock_fifo(path) -> None:
    """Open the FIFO's write side once, so a reader stuck in open() (the old code) returns."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("how", ["header", "slice", "slice with header", "file URL"])
def test_fifo_is_not_regular_file_and_never_blocks(tmp_path, how):
    """A FIFO named ID_x.dcm that nobody writes to: 'not_regular_file' at once, not a hang."""
    fifo = tmp_path / "ID_fifo.dcm"
    os.mkfifo(fifo)
    header = read_header(write_hu(tmp_path / "ID_ok.dcm", phantom_hu()))
    fn, args = {
        "header": (read_header, (fifo,)),
        "slice": (read_slice, (fifo,)),
        "slice with header": (read_slice, (fifo, header)),
        "file URL": (read_header, (f"file://{fifo}",)),
    }[how]
    try:
        kind, value = _in_thread(fn, *args)
    finally:
        _unblock_fifo(fifo)
    assert kind == "raised", f"{how} on a FIFO: {kind}"
    assert isinstance(value, ImageError) and value.reason == "not_regular_file"


def test_directory_and_device_named_dcm_are_not_regular_files(tmp_path):
    """A folder and a character device (a link to /dev/zero, which never ends) are never read."""
    (tmp_path / "ID_dir.dcm").mkdir()
    (tmp_path / "ID_dev.dcm").symlink_to("/dev/zero")
    for name in ("ID_dir.dcm", "ID_dev.dcm"):
        kind, value = _in_thread(read_slice, tmp_path / name)
        assert kind == "raised" and isinstance(value, ImageError), (name, kind, value)
        assert value.reason == "not_regular_file" and name in value.detail


def test_file_over_the_size_bound_is_never_read(tmp_path, monkeypatch):
    """A file larger than MAX_DICOM_BYTES is 'too_large', in the header pass and the pixel read."""
    p = write_hu(tmp_path / "ID_big.dcm", phantom_hu())
    header = read_header(p)
    monkeypatch.setattr(read_dicom, "MAX_DICOM_BYTES", p.stat().st_size - 1)
    for fn, args in [(read_header, (p,)), (read_slice, (p, header)), (read_slice, (p,))]:
        with pytest.raises(ImageError) as e:
            fn(*args)
        assert e.value.reason == "too_large"


def test_deflated_file_that_inflates_past_the_bound_is_refused(tmp_path, monkeypatch):
    """A small deflated file whose data set inflates beyond MAX_DICOM_BYTES (here 1 MiB) is
    'too_large' before pydicom inflates it whole; an ordinary deflated file reads."""
    p = write_hu(tmp_path / "ID_bomb.dcm", phantom_hu(64))
    with quiet_rsna_uids():
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(tmp_path / "ID_deflated.dcm", enforce_file_format=True)
        ds.add_new(0x00091010, "OB", b"\x00" * (2 << 20))  # a private 2 MiB of zeros
        ds.save_as(p, enforce_file_format=True)
    assert p.stat().st_size < 64 << 10
    monkeypatch.setattr(read_dicom, "MAX_DICOM_BYTES", 1 << 20)
    with pytest.raises(ImageError) as e:
        read_header(p)
    assert e.value.reason == "too_large" and "inflates" in e.value.detail
    stored, _ = read_slice(tmp_path / "ID_deflated.dcm")
    np.testing.assert_array_equal(stored, np.round(phantom_hu(64) + 1024))


# ---------------------------------------------------------------- damaged files: ImageError only


def _damaged(tmp_path, how: str) -> Path:
    """A file damaged so that pydicom itself raises something other than its own errors."""
    p = write_hu(tmp_path / f"ID_{how}.dcm", phantom_hu(64))
    data = p.read_bytes()
    if how == "multi_valued_rows":  # Rows (0028,0010) US with two values: int() of a list
        data = data.replace(b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x10\x00US\x04\x00\x40\x00", 1)  # fmt: skip
    elif how == "unknown_vr":  # BitsStored (0028,0101) with VR 'U\x93'
        data = data.replace(b"\x28\x00\x01\x01US", b"\x28\x00\x01\x01U\x93", 1)
    elif how == "odd_length_ul":  # the group length (0002,0000) UL with 3 bytes
        data = data[:138] + b"\x03" + data[139:]
    elif how in ("deflated", "rle"):
        with quiet_rsna_uids():
            ds = pydicom.dcmread(p)
            if how == "rle":
                ds.compress(RLELossless)
                del ds.SamplesPerPixel
            else:
                ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
            ds.save_as(p, enforce_file_format=True)
        data = p.read_bytes()
        if how == "deflated":
            data = data[: len(data) // 2] + b"\xff" * 8 + data[len(data) // 2 + 8 :]
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "how", ["multi_valued_rows", "unknown_vr", "odd_length_ul", "deflated", "rle"]
)
def test_damaged_file_raises_image_error_naming_the_cause(tmp_path, how):
    """TypeError, NotImplementedError, BytesLengthException, zlib.error, AttributeError from
    pydicom become ImageError('unreadable'), its detail naming the file and the error type."""
    p = _damaged(tmp_path, how)
    with pytest.raises(ImageError) as e:
        read_slice(p, read_header(p))
    assert e.value.reason in read_dicom.REASONS and p.name in e.value.detail
    with pytest.raises(ImageError):
        read_slice(p)


def test_keyboard_interrupt_is_not_swallowed(tmp_path, monkeypatch):
    """Ctrl-C inside pydicom still stops a build: only Exception becomes ImageError."""
    p = write_hu(tmp_path / "ID_k.dcm", phantom_hu(64))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pydicom, "dcmread", interrupted)
    with pytest.raises(KeyboardInterrupt):
        read_header(p)


def test_image_error_detail_is_bounded():
    """Details go into the index: at most MAX_DETAIL characters, however long the message."""
    e = ImageError("unreadable", "x" * 100_000)
    assert len(e.detail) <= read_dicom.MAX_DETAIL and len(str(e)) < read_dicom.MAX_DETAIL + 20


# ---------------------------------------------------------------- tag values that break the output


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom: value too long for its VR
@pytest.mark.parametrize(
    "kw, tag",
    [
        ({"patient": "ID_" + "x" * 100_000}, "PatientID"),
        ({"series": "ID_se" + "1" * 100_000}, "InstanceUID"),
    ],
)
def test_huge_id_is_bad_tag_naming_its_length_not_its_value(tmp_path, kw, tag):
    """A 100,000-character PatientID or UID (it would go into every sample's json): 'bad_tag'."""
    p = write_hu(tmp_path / "ID_huge.dcm", phantom_hu(64), **kw)
    with pytest.raises(ImageError) as e:
        read_header(p)
    assert e.value.reason == "bad_tag" and tag in e.value.detail
    assert "characters long" in e.value.detail and "xxxxxxxx" not in e.value.detail
    assert "11111111" not in e.value.detail


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # pydicom, when writing it
def test_ids_a_little_over_the_dicom_length_are_kept(tmp_path):
    """RSNA pseudonyms may exceed LO's 64 characters a little: kept up to MAX_ID_CHARS."""
    pid = "ID_" + "a" * 90
    assert read_header(write_hu(tmp_path / "ID_l.dcm", phantom_hu(64), patient=pid))["patient_id"] == pid  # fmt: skip


def test_id_with_a_newline_is_bad_tag(tmp_path):
    """Ids group patients into folds and are printed one per line: control characters refused."""
    p = write_hu(tmp_path / "ID_nl.dcm", phantom_hu(64), patient="ID_a\nb")
    with pytest.raises(ImageError) as e:
        read_header(p)
    assert e.value.reason == "bad_tag" and "PatientID" in e.value.detail


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS:UserWarning")  # written on purpose
@pytest.mark.parametrize(
    "kw", [{"slope": "0"}, {"slope": "nan"}, {"slope": "inf"}, {"intercept": "nan"}, {"intercept": "-inf"}]
)  # fmt: skip
def test_bad_rescale_is_an_error_not_a_blank_image(tmp_path, kw):
    """RescaleSlope 0/nan/inf or RescaleIntercept nan/inf: 'bad_rescale' naming the tag and value."""
    p = write_hu(tmp_path / "ID_r.dcm", phantom_hu(64), **kw)
    with pytest.raises(ImageError) as e:
        read_slice(p)
    tag = "RescaleSlope" if "slope" in kw else "RescaleIntercept"
    assert e.value.reason == "bad_rescale" and f"{tag}=" in e.value.detail


def _with_geometry(tmp_path, spacing=None, z="0") -> Path:
    p = write_hu(tmp_path / "ID_g.dcm", phantom_hu(64))
    with quiet_rsna_uids():
        ds = pydicom.dcmread(p)
        if spacing is None:
            del ds.PixelSpacing
        else:
            ds.PixelSpacing = spacing
        ds.ImagePositionPatient = ["-125", "-125", z]
        ds.save_as(p, enforce_file_format=True)
    return p


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS:UserWarning")  # written on purpose
@pytest.mark.parametrize(
    "spacing, z",
    [(["inf", "inf"], "0"), (["0", "0"], "0"), (["-0.5", "-0.5"], "0"), (["nan", "0.5"], "0"),
     (["0.5", "0.5"], "nan"), (["0.5", "0.5"], "inf")],
)  # fmt: skip
def test_non_finite_or_non_positive_geometry_is_bad_tag(tmp_path, spacing, z):
    """PixelSpacing inf/0/negative/nan or a non-finite z: 'bad_tag' naming the tag."""
    with pytest.raises(ImageError) as e:
        read_header(_with_geometry(tmp_path, spacing, z))
    assert e.value.reason == "bad_tag"
    assert ("PixelSpacing" if z == "0" else "ImagePositionPatient") in e.value.detail


def test_missing_spacing_is_still_tolerated(tmp_path):
    """No PixelSpacing: (nan, nan), as before (only --spacing-mm needs it)."""
    h = read_header(_with_geometry(tmp_path, None))
    assert np.isnan(h["pixel_spacing_y"]) and np.isnan(h["pixel_spacing_x"])


# ---------------------------------------------------------------- slice order tags

TILT = math.radians(25)
ROW, COL = (1.0, 0.0, 0.0), (0.0, math.cos(TILT), -math.sin(TILT))
NORMAL = (0.0, math.sin(TILT), math.cos(TILT))  # ROW x COL


def test_header_projects_position_on_the_tilted_normal(tmp_path):
    """slice_position = ImagePositionPatient . (row x col cosines); InstanceNumber is read."""
    pos = (3.0, 40.0, 10.0)
    path = write_hu(tmp_path / "ID_t.dcm", phantom_hu(64), position=pos, orientation=[*ROW, *COL], instance=7)  # fmt: skip
    h = read_header(path)
    assert h["slice_position"] == pytest.approx(float(np.dot(pos, NORMAL)), abs=1e-9)
    assert h["z_position"] == 10.0 and h["instance_number"] == 7
    assert h["orientation_fallback"] is False


@pytest.mark.parametrize(
    "orientation",
    [None, [1, 0, 0], ["a", "b", "c", "d", "e", "f"], [1, 0, 0, 1, 0, 0], ["nan", 0, 0, 0, 1, 0]],
    ids=["missing", "three-values", "text", "parallel", "nan"],
)
def test_missing_or_malformed_orientation_falls_back_to_axial(tmp_path, orientation):
    """No usable ImageOrientationPatient: the axial normal (position = z), flagged, never an error."""
    text = orientation is not None and isinstance(orientation[0], str) and orientation[0] == "a"
    path = write_hu(tmp_path / "ID_o.dcm", phantom_hu(64), position=(5.0, 6.0, 7.5), orientation=None if text else orientation)  # fmt: skip
    if text:  # pydicom refuses to write letters as DS: store them as LO under the same tag
        ds = pydicom.dcmread(path)
        ds.add_new(0x00200037, "LO", "\\".join(orientation))
        with quiet_rsna_uids():
            ds.save_as(path)
    h = read_header(path)
    assert h["slice_position"] == 7.5 and h["orientation_fallback"] is True
    assert h["instance_number"] is None


def test_malformed_instance_number_is_absent_not_an_error(tmp_path):
    path = write_hu(tmp_path / "ID_i.dcm", phantom_hu(64), z=1.0)
    ds = pydicom.dcmread(path)
    ds.add_new(0x00200013, "LO", "1.5x")
    with quiet_rsna_uids():
        ds.save_as(path)
    assert read_header(path)["instance_number"] is None


@pytest.mark.parametrize("position", [("nan", 0, 0), (0, "inf", 0), (0, "1.5e308", "1.5e308")])
def test_non_finite_x_or_y_position_is_bad_tag(tmp_path, position):
    """Every ImagePositionPatient value is projected, so each, and the projection, must be finite."""
    orientation = [1, 0, 0, 0, 0.8, -0.6]
    p = write_hu(tmp_path / "ID_x.dcm", phantom_hu(64), position=position, orientation=orientation)
    with pytest.raises(ImageError) as e:
        read_header(p)
    assert e.value.reason == "bad_tag" and "ImagePositionPatient" in e.value.detail


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6])
def test_position_with_other_than_3_values_is_malformed_not_missing(tmp_path, n):
    """An ImagePositionPatient with 4 (or any count but 3) values is present but malformed:
    'bad_tag' saying how many values it has, never 'missing_tag' ("is missing")."""
    p = write_hu(tmp_path / f"ID_p{n}.dcm", phantom_hu(64), position=[-125.0, -125.0, 5.0, 7.0, 1.0, 2.0][:n])  # fmt: skip
    with pytest.raises(ImageError) as e:
        read_header(p)
    assert e.value.reason == "bad_tag", e.value
    assert f"ImagePositionPatient has {n} values, expected 3" in e.value.detail
    assert "missing" not in e.value.detail
