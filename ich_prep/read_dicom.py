"""Read RSNA DICOM slices: header metadata and stored pixel values. All DICOM I/O lives here.

Failures raise ImageError with a short machine-readable reason and a message naming the file,
so the builder records them as index rows instead of stopping.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError


class ImageError(Exception):
    """A slice that cannot be compiled; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


REASONS = {
    "unreadable": "not a DICOM file, or truncated",
    "no_pixel_data": "PixelData (7FE0,0010) missing",
    "unsupported_transfer_syntax": "compressed pixels that no installed decoder handles",
    "not_ct": "Modality (0008,0060) is not CT",
    "bad_shape": "not a single-frame 2-D grey image of a plausible size",
    "bad_bit_depth": "BitsAllocated/BitsStored/PixelRepresentation the HU conversion does not know",
    "missing_tag": "a tag the conversion needs is absent or not a number",
}


class _RsnaUidFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (
            msg.startswith("Invalid value for VR UI: 'ID_") or "exceeds the maximum length" in msg
        )


_UID_FILTER = _RsnaUidFilter()


@contextlib.contextmanager
def quiet_rsna_uids():
    """Silence exactly pydicom's warning about the RSNA pseudonym UIDs ('ID_...'), nothing else.

    pydicom both warns and logs it (warn_and_log), so both channels are filtered.
    """
    logger = logging.getLogger("pydicom")
    logger.addFilter(_UID_FILTER)
    try:
        with _quiet_warnings():
            yield
    finally:
        logger.removeFilter(_UID_FILTER)


@contextlib.contextmanager
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Invalid value for VR UI: 'ID_", category=UserWarning
        )
        # Patient IDs such as 'ID_cd5a85fd...' can exceed SH/LO lengths in a few files.
        warnings.filterwarnings(
            "ignore",
            message=r"The value length \(\d+\) exceeds the maximum length",
            category=UserWarning,
        )
        yield


def _first(value):
    """First value of a possibly multi-valued element, e.g. WindowCenter '00036\\00036'."""
    if isinstance(value, pydicom.multival.MultiValue):
        return value[0] if len(value) else None
    return value


def _float_tag(ds, keyword: str, path, default=None) -> float:
    if keyword not in ds or ds[keyword].value in (None, ""):
        if default is not None:
            return default
        raise ImageError(
            "missing_tag", f"{path}: {keyword} is missing; cannot convert to Hounsfield units"
        )
    try:
        # Decimal strings such as '-1024.000000': parse as float, never int().
        return float(_first(ds[keyword].value))
    except (TypeError, ValueError) as e:
        raise ImageError(
            "missing_tag", f"{path}: {keyword}={ds[keyword].value!r} is not a number"
        ) from e


def header_from_dataset(ds, path) -> dict:
    """The per-slice metadata the index keeps, validated.

    Tags: PatientID (0010,0020), StudyInstanceUID (0020,000D), SeriesInstanceUID (0020,000E),
    ImagePositionPatient (0020,0032, z = third value), PixelSpacing (0028,0030), Rows/Columns,
    BitsStored (0028,0101), PixelRepresentation (0028,0103), RescaleSlope/Intercept (0028,1053/1052).
    """
    essential = ("Modality", "Rows", "Columns", "BitsAllocated")
    if sum(k not in ds for k in essential) >= 2:
        # pydicom reads a file cut inside its header without complaint; what is left lacks the basics.
        raise ImageError(
            "unreadable",
            f"{path}: DICOM header incomplete ({len(ds)} elements, no {'/'.join(k for k in essential if k not in ds)}); truncated file?",
        )
    modality = str(ds.get("Modality", "")).strip()
    if modality != "CT":
        raise ImageError("not_ct", f"{path}: Modality is {modality or 'missing'!r}, expected 'CT'")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if not (64 <= rows <= 4096 and 64 <= cols <= 4096) or frames != 1 or spp != 1:
        raise ImageError(
            "bad_shape",
            f"{path}: Rows={rows} Columns={cols} frames={frames} samples/pixel={spp}; "
            "expected one grey frame between 64 and 4096 pixels a side",
        )
    bits_alloc = int(ds.get("BitsAllocated", 0) or 0)
    bits_stored = int(ds.get("BitsStored", bits_alloc) or 0)
    pixel_rep = int(ds.get("PixelRepresentation", -1))
    if bits_alloc != 16 or not 8 <= bits_stored <= 16 or pixel_rep not in (0, 1):
        raise ImageError(
            "bad_bit_depth",
            f"{path}: BitsAllocated={bits_alloc} BitsStored={bits_stored} "
            f"PixelRepresentation={pixel_rep}; expected 16-bit storage with 0 or 1 representation",
        )
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        raise ImageError(
            "missing_tag", f"{path}: ImagePositionPatient is missing; slices cannot be ordered"
        )
    spacing = ds.get("PixelSpacing")
    try:
        sy, sx = (
            (float(spacing[0]), float(spacing[1]))
            if spacing and len(spacing) == 2
            else (np.nan, np.nan)
        )
        z = float(ipp[2])
    except (TypeError, ValueError) as e:
        raise ImageError(
            "missing_tag", f"{path}: ImagePositionPatient/PixelSpacing not numeric"
        ) from e
    padding = ds.get("PixelPaddingValue")
    return {
        "patient_id": str(ds.get("PatientID", "")),
        "study_id": str(ds.get("StudyInstanceUID", "")),
        "series_id": str(ds.get("SeriesInstanceUID", "")),
        "z_position": z,
        "pixel_spacing_y": sy,
        "pixel_spacing_x": sx,
        "rows": rows,
        "cols": cols,
        "bits_stored": bits_stored,
        "pixel_representation": pixel_rep,
        "rescale_slope": _float_tag(ds, "RescaleSlope", path),
        "rescale_intercept": _float_tag(ds, "RescaleIntercept", path),
        "pixel_padding_value": None if padding is None else int(_first(padding)),
    }


def _open(path, stop_before_pixels: bool, name=None):
    """dcmread a local path, an fsspec URL (s3://..., file://...) read through a file object, or
    a file object already open (`name`: its path, for messages)."""
    name = path if name is None else name
    try:
        with quiet_rsna_uids():
            if isinstance(path, io.IOBase):
                return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
            if "://" in str(path):
                with fsspec.open(str(path), "rb") as f:
                    return pydicom.dcmread(f, stop_before_pixels=stop_before_pixels)
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ImageError(
            "unreadable", f"{name}: {type(e).__name__}: {e}; is it a complete DICOM file?"
        ) from e


def read_header(path: str | Path) -> dict:
    """Header metadata only (no pixels): fast enough to scan the whole dataset before planning folds."""
    ds = _open(path, stop_before_pixels=True)
    with quiet_rsna_uids():
        return header_from_dataset(ds, path)


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) in little-endian byte order


def native_pixels(data: bytes, header: dict) -> np.ndarray | None:
    """Stored pixels (rows, cols) read straight from a file's bytes when its last element is an
    uncompressed little-endian PixelData (7FE0,0010) of exactly Rows x Columns 16-bit values, as in
    RSNA files; None for any other layout (compressed, padded, big-endian), which pydicom reads.

    Checked before use: the tag, the VR (OW/OB, explicit VR) and the 4-byte length that precede
    the last rows x cols x 2 bytes, so a match cannot come from compressed or deflated data by
    accident (2^-64)."""
    need = header["rows"] * header["cols"] * 2
    n = len(data) - need
    length = need.to_bytes(4, "little")
    explicit = (
        data[n - 12 : n - 8] == _PIXEL_DATA_TAG
        and data[n - 8 : n - 6] in (b"OW", b"OB")
        and data[n - 6 : n] == b"\x00\x00" + length
    )
    implicit = data[n - 8 : n] == _PIXEL_DATA_TAG + length
    if n < 140 or not (explicit or implicit):  # 128-byte preamble + 'DICM' + an element at least
        return None
    dtype = np.dtype("<i2") if header["pixel_representation"] == 1 else np.dtype("<u2")
    return np.frombuffer(data, dtype, need // 2, offset=n).reshape(header["rows"], header["cols"])


def _read_bytes(path) -> bytes:
    try:
        if "://" in str(path):
            with fsspec.open(str(path), "rb") as f:
                return f.read()
        return Path(path).read_bytes()
    except OSError as e:
        raise ImageError("unreadable", f"{path}: {type(e).__name__}: {e}") from e


def read_slice(path: str | Path, header: dict | None = None) -> tuple[np.ndarray, dict]:
    """(stored pixel values (rows, cols), int16 or uint16 as stored, read-only; header dict).

    `header`: the dict read_header returned for this file in the header pass. With it, the pixels
    of a native file are taken from its bytes without parsing the DICOM a second time
    (native_pixels); other files go through pydicom, without converting the tags again.
    """
    if header is not None:
        data = _read_bytes(path)
        stored = native_pixels(data, header)
        if stored is not None:
            return stored, header
        ds = _open(io.BytesIO(data), stop_before_pixels=False, name=path)
    else:
        ds = _open(path, stop_before_pixels=False)
    if header is None:
        with quiet_rsna_uids():
            header = header_from_dataset(ds, path)
    if "PixelData" not in ds:
        raise ImageError("no_pixel_data", f"{path}: PixelData (7FE0,0010) is missing")
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        if tsyntax is None or (not tsyntax.is_compressed and tsyntax.is_little_endian):
            # Native little-endian: view the bytes directly (what pixel_array does, minus overhead).
            dtype = np.int16 if header["pixel_representation"] == 1 else np.uint16
            need = header["rows"] * header["cols"] * 2
            buf = ds.PixelData
            if len(buf) < need:
                raise ImageError(
                    "unreadable",
                    f"{path}: PixelData holds {len(buf)} bytes, {need} expected; file truncated?",
                )
            stored = np.frombuffer(buf, dtype=dtype, count=need // 2).reshape(
                header["rows"], header["cols"]
            )
        else:
            with quiet_rsna_uids():
                stored = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        raise ImageError(
            "unsupported_transfer_syntax",
            f"{path}: transfer syntax {tsyntax} ({getattr(tsyntax, 'name', '?')}) cannot be decoded here: {e}. "
            "Install pylibjpeg[all] or python-gdcm, or decompress with `gdcmconv --raw`",
        ) from e
    except ValueError as e:
        raise ImageError("unreadable", f"{path}: pixel data cannot be decoded: {e}") from e
    if stored.shape != (header["rows"], header["cols"]):
        raise ImageError("bad_shape", f"{path}: pixel array shape {stored.shape} != Rows x Columns")
    return stored, header
