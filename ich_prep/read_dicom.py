"""Read RSNA DICOM slices: header metadata and stored pixel values. All DICOM I/O lives here.

Failures raise ImageError with a short machine-readable reason and a message naming the file,
so the builder records them as index rows instead of stopping. read_header and read_slice raise
ImageError and nothing else for anything about the file (a damaged file can make pydicom raise
almost anything); KeyboardInterrupt and SystemExit still stop a build.

Every read is bounded: a local path is opened non-blocking and checked to be a regular file
before a byte is read (a FIFO named ID_x.dcm never hangs the build), and no file larger than
MAX_DICOM_BYTES, nor a deflated one that inflates beyond it, is read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import logging
import math
import os
import stat
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

import fsspec
import numpy as np
import pydicom
from fsspec.implementations.local import LocalFileSystem
from pydicom.errors import InvalidDicomError

# The largest file read, in bytes. The largest slice accepted (4096 x 4096, 16 bits) is 32 MiB of
# pixels; an RSNA slice is 0.5 MiB. 256 MiB leaves room for big headers and overlays while
# bounding what one worker holds in memory for one file (a deflated file: its inflated size).
MAX_DICOM_BYTES = 256 * 1024 * 1024
MAX_DETAIL = 500  # characters of an ImageError's detail: it is stored in the index
# PatientID (LO) and the UIDs (UI) are at most 64 characters in DICOM; RSNA's pseudonyms can be a
# little longer. Anything longer than this is refused: it would go into every sample's json.
MAX_ID_CHARS = 256


class ImageError(Exception):
    """A slice that cannot be compiled; `reason` is one of REASONS, `detail` at most MAX_DETAIL chars."""

    def __init__(self, reason: str, detail: str):
        if len(detail) > MAX_DETAIL:
            detail = detail[: MAX_DETAIL - 3] + "..."
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


REASONS = {
    "unreadable": "not a DICOM file, truncated or damaged (the detail names the error)",
    "not_regular_file": "a FIFO, device, directory or socket: never read",
    "too_large": f"larger than {MAX_DICOM_BYTES // 2**20} MiB (or inflates beyond that): never read",
    "no_pixel_data": "PixelData (7FE0,0010) missing",
    "unsupported_transfer_syntax": "compressed pixels that no installed decoder handles",
    "not_ct": "Modality (0008,0060) is not CT",
    "bad_shape": "not a single-frame 2-D grey image of a plausible size",
    "bad_bit_depth": "BitsAllocated/BitsStored/PixelRepresentation the HU conversion does not know",
    "missing_tag": "a tag the conversion needs is absent or not a number",
    "bad_rescale": "RescaleSlope 0 or not finite, or RescaleIntercept not finite, or a rescale that "
    "makes the slice one value or puts most of its head box above 3071 HU "
    "(transform.check_hu): no Hounsfield units",
    "bad_tag": "a kept tag out of bounds: an id too long or with control characters, "
    "a position without exactly 3 values, a position or pixel spacing not finite, a spacing <= 0",
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


@contextlib.contextmanager
def _any_error_is_image_error(path):
    """Whatever else reading one file raises becomes ImageError('unreadable') with the type and
    message: a damaged file makes pydicom raise TypeError (a multi-valued Rows), struct.error,
    zlib.error, AttributeError, NotImplementedError (an unknown VR), ... ImageError passes
    through; KeyboardInterrupt and SystemExit are not Exceptions and still stop a build."""
    try:
        yield
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - any error about one file must be that file's error row
        raise ImageError("unreadable", f"{path}: {type(e).__name__}: {e}") from e


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


def _rescale(ds, path) -> tuple[float, float]:
    """(RescaleSlope (0028,1053), RescaleIntercept (0028,1052)): HU = stored * slope + intercept.

    A slope of 0 or a non-finite slope or intercept would give a constant (all-air) or NaN image
    that looks compiled: refused."""
    slope = _float_tag(ds, "RescaleSlope", path)
    intercept = _float_tag(ds, "RescaleIntercept", path)
    if slope == 0 or not math.isfinite(slope):
        raise ImageError(
            "bad_rescale",
            f"{path}: RescaleSlope={slope!r}; HU = stored x slope + intercept needs a finite, "
            "non-zero slope (0 makes every pixel one value)",
        )
    if not math.isfinite(intercept):
        raise ImageError(
            "bad_rescale",
            f"{path}: RescaleIntercept={intercept!r}; HU = stored x slope + intercept needs a "
            "finite intercept",
        )
    return slope, intercept


def _id_tag(ds, keyword: str, path) -> str:
    """A kept id (PatientID (0010,0020), Study/SeriesInstanceUID (0020,000D/000E)) as text.

    At most MAX_ID_CHARS characters (DICOM allows 64; the id goes into every sample's json) and
    printable (no newline, escape, other control or format character: ids group patients into folds and
    are printed on one line); otherwise refused, naming the tag and its length, not its value."""
    value = str(ds.get(keyword, ""))
    if len(value) > MAX_ID_CHARS:
        raise ImageError(
            "bad_tag", f"{path}: {keyword} is {len(value)} characters long; at most {MAX_ID_CHARS}"
        )
    if not value.isprintable():
        bad = next(i for i, c in enumerate(value) if not c.isprintable())
        raise ImageError(
            "bad_tag", f"{path}: {keyword} has a non-printable character at position {bad}"
        )
    return value


def _geometry(ds, path) -> tuple[tuple[float, float, float], float, float]:
    """(ImagePositionPatient (0020,0032) as (x, y, z), row spacing, column spacing) with
    PixelSpacing (0028,0030). A missing spacing is (nan, nan), usable without --spacing-mm; a
    present one must be finite and > 0, and the position finite."""
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or ipp == "":
        raise ImageError(
            "missing_tag", f"{path}: ImagePositionPatient is missing; slices cannot be ordered"
        )
    n = len(ipp) if isinstance(ipp, pydicom.multival.MultiValue) else 1
    if n != 3:
        raise ImageError(
            "bad_tag",
            f"{path}: ImagePositionPatient has {n} values, expected 3 (x, y, z in mm); "
            "slices cannot be ordered",
        )
    spacing = ds.get("PixelSpacing")
    try:
        sy, sx = (
            (float(spacing[0]), float(spacing[1]))
            if spacing and len(spacing) == 2
            else (np.nan, np.nan)
        )
        pos = (float(ipp[0]), float(ipp[1]), float(ipp[2]))
    except (TypeError, ValueError) as e:
        raise ImageError(
            "missing_tag", f"{path}: ImagePositionPatient/PixelSpacing not numeric"
        ) from e
    if not all(math.isfinite(v) for v in pos):
        raise ImageError("bad_tag", f"{path}: ImagePositionPatient={pos!r} is not finite")
    if spacing and len(spacing) == 2 and not (0 < sy < math.inf and 0 < sx < math.inf):
        raise ImageError(
            "bad_tag", f"{path}: PixelSpacing={sy!r}\\{sx!r}; expected two finite values > 0 mm"
        )
    return pos, sy, sx


AXIAL_NORMAL = (0.0, 0.0, 1.0)


def slice_normal(iop) -> tuple[float, float, float] | None:
    """Unit normal of the slice plane: the cross product of the row and column direction cosines
    of ImageOrientationPatient (0020,0037), which is the scan axis for a tilted gantry too. None
    when `iop` is not six finite numbers spanning a plane (missing, malformed, parallel cosines).
    Plain floats: numpy costs ~40 us per slice here, the cross product ~1 us."""
    try:
        v = [float(x) for x in iop]
    except (TypeError, ValueError):
        return None
    if len(v) != 6 or not all(math.isfinite(x) for x in v):
        return None
    (a, b, c), (d, e, f) = v[:3], v[3:]
    n = (b * f - c * e, c * d - a * f, a * e - b * d)
    length, lengths = math.hypot(*n), math.hypot(a, b, c) * math.hypot(d, e, f)
    # |row x col| = |row| |col| sin(angle): cosines less than 30 degrees apart span no plane.
    if not lengths > 1e-6 or not length >= 0.5 * lengths:
        return None
    return (n[0] / length, n[1] / length, n[2] / length)


_IOP_TAG = 0x00200037


def _raw_numbers(ds, tag: int):
    """A decimal-string element's values without pydicom's DS conversion (~100 us for six values):
    the raw bytes split at backslashes; an element pydicom already converted as it is; None if absent."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00").split("\\")
    return value


def _orientation(ds) -> tuple[tuple[float, float, float], bool]:
    """(slice normal, fell back): the axial normal (0, 0, 1) when ImageOrientationPatient is
    missing or malformed (counted by the build, never an error: z still orders an axial scan)."""
    try:
        iop = _raw_numbers(ds, _IOP_TAG)
        n = None if iop is None else slice_normal(iop)
    except Exception:  # noqa: BLE001 - a damaged orientation only loses the tilt correction
        n = None
    return (AXIAL_NORMAL, True) if n is None else (n, False)


def _instance_number(ds) -> int | None:
    """InstanceNumber (0020,0013) as an int, None when missing or not a whole number (it only
    breaks ties between slices at one position)."""
    try:
        v = _first(ds.get("InstanceNumber"))
        if v is None or v == "":
            return None
        i = int(v)
    except Exception:  # noqa: BLE001 - a malformed tie-breaker is just absent
        return None
    return i if -(2**62) < i < 2**62 else None


def _optional_text(ds, keyword: str) -> str:
    """FrameOfReferenceUID (0020,0052) or SeriesNumber (0020,0011) as text, "" when missing or
    unusable (over MAX_ID_CHARS, not printable): they only help tell scans apart when
    SeriesInstanceUID is missing (split.series_keys)."""
    try:
        value = str(_first(ds.get(keyword, "")) or "")
    except Exception:  # noqa: BLE001 - a damaged optional tag is just absent
        return ""
    return value if len(value) <= MAX_ID_CHARS and value.isprintable() else ""


def _check_complete(ds, path) -> None:
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


def _storage(ds, path) -> tuple[int, int, int, int]:
    """(rows, cols, BitsStored (0028,0101), PixelRepresentation (0028,0103)) of a one-frame grey
    16-bit image (Rows/Columns (0028,0010/0011), NumberOfFrames, SamplesPerPixel, BitsAllocated)."""
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
    return rows, cols, bits_stored, pixel_rep


def header_from_dataset(ds, path) -> dict:
    """The per-slice metadata the index keeps, validated.

    Tags: PatientID (0010,0020), StudyInstanceUID (0020,000D), SeriesInstanceUID (0020,000E),
    ImagePositionPatient (0020,0032) and its projection on the slice normal from
    ImageOrientationPatient (0020,0037) (`slice_position`; the axial normal, and
    `orientation_fallback`, when that is missing or malformed; the normal itself as `slice_normal`,
    three numbers rounded to 1e-3, as text), InstanceNumber (0020,0013, or None), FrameOfReferenceUID
    (0020,0052) and SeriesNumber (0020,0011) as text ("" when absent),
    PixelSpacing (0028,0030), Rows/Columns,
    BitsStored (0028,0101), PixelRepresentation (0028,0103), RescaleSlope/Intercept (0028,1053/1052),
    PixelPaddingValue (0028,0120). Values that would break the output are refused here, never
    passed on: ids of bounded length, finite geometry, a rescale that gives Hounsfield units.
    """
    _check_complete(ds, path)
    rows, cols, bits_stored, pixel_rep = _storage(ds, path)
    pos, sy, sx = _geometry(ds, path)
    normal, fallback = _orientation(ds)
    along = pos[0] * normal[0] + pos[1] * normal[1] + pos[2] * normal[2]
    if not math.isfinite(along):  # finite values near 1e308 can still overflow
        raise ImageError("bad_tag", f"{path}: ImagePositionPatient={pos!r} is out of range")
    slope, intercept = _rescale(ds, path)
    padding = ds.get("PixelPaddingValue")
    return {
        "patient_id": _id_tag(ds, "PatientID", path),
        "study_id": _id_tag(ds, "StudyInstanceUID", path),
        "series_id": _id_tag(ds, "SeriesInstanceUID", path),
        "z_position": pos[2],
        "slice_position": along,
        "instance_number": _instance_number(ds),
        "orientation_fallback": fallback,
        "slice_normal": ",".join(f"{round(v, 3) + 0.0:.3f}" for v in normal),  # no "-0.000"
        "frame_of_reference": _optional_text(ds, "FrameOfReferenceUID"),
        "series_number": _optional_text(ds, "SeriesNumber"),
        "pixel_spacing_y": sy,
        "pixel_spacing_x": sx,
        "rows": rows,
        "cols": cols,
        "bits_stored": bits_stored,
        "pixel_representation": pixel_rep,
        "rescale_slope": slope,
        "rescale_intercept": intercept,
        "pixel_padding_value": None if padding is None else int(_first(padding)),
    }


_HEAD = 8192  # bytes looked at for a deflated syntax; a real file meta is a few hundred bytes
# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer (on a regular file it
# changes nothing). O_NOCTTY: a terminal never becomes our controlling terminal.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def _too_large(size: int, path) -> ImageError | None:
    if size <= MAX_DICOM_BYTES:
        return None
    return ImageError(
        "too_large", f"{path}: {size} bytes; a DICOM file over {MAX_DICOM_BYTES} bytes is not read"
    )


def _refused(st: os.stat_result, path) -> ImageError | None:
    """Why a file with this fstat must not be read (not a regular file, too large), or None."""
    if stat.S_ISREG(st.st_mode):
        return _too_large(st.st_size, path)
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
    return ImageError("not_regular_file", f"{path}: {kind}, not a regular file; not read")


def _open_local(path, name=None) -> tuple[BinaryIO, int]:
    """(binary file, size) of a local path, only if it is a regular file of at most
    MAX_DICOM_BYTES: checked with fstat on the open descriptor (no race with a rename) before a
    byte is read. `name`: the path or URL for messages."""
    name = path if name is None else name
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        # ENXIO: a socket, or a device with no driver behind it.
        reason = "not_regular_file" if e.errno == errno.ENXIO else "unreadable"
        raise ImageError(reason, f"{name}: {type(e).__name__}: {e}") from e
    st = os.fstat(fd)
    problem = _refused(st, name)
    if problem is not None:
        os.close(fd)
        raise problem
    return os.fdopen(fd, "rb", buffering=_HEAD), st.st_size


def _open_file(path) -> tuple[BinaryIO, int]:
    """(binary file, size) of a local path or an fsspec URL (s3://..., file://...), size-checked.
    A file:// URL is a local path, opened the same way (a FIFO there must not hang either)."""
    if "://" not in str(path):
        return _open_local(path)
    fs, p = fsspec.core.url_to_fs(str(path))
    if isinstance(fs, LocalFileSystem):
        return _open_local(p, name=path)
    f = fs.open(p, "rb")
    size = getattr(f, "size", None)
    size = fs.size(p) if size is None else size
    problem = _too_large(size, path)
    if problem is not None:
        f.close()
        raise problem
    return f, size


_DEFLATED = pydicom.uid.DeflatedExplicitVRLittleEndian


def _check_inflated_size(f: BinaryIO, path) -> None:
    """pydicom inflates a Deflated Explicit VR Little Endian file whole, and a few KB of deflate
    can claim gigabytes: when the file's meta says deflated, inflate it here first, in bounded
    steps, and refuse it beyond MAX_DICOM_BYTES. Other files cost one look at their first _HEAD
    bytes, already buffered (a deflated syntax UID beyond them, in a file meta that long, is not
    seen). Leaves `f` at its start."""
    if isinstance(f, io.BufferedReader):  # a local file: its buffer (_HEAD bytes), no extra read
        head = f.peek(_HEAD)[:_HEAD]
    else:
        head = f.read(_HEAD)
        f.seek(0)
    if _DEFLATED.encode() not in head:
        return
    # Exactly what dcmread reads before the data set (pydicom is pinned in pyproject.toml).
    pydicom.filereader.read_preamble(f, False)
    meta = pydicom.filereader._read_file_meta_info(f)
    pydicom.filereader._read_command_set_elements(f)
    if meta.get("TransferSyntaxUID") == _DEFLATED:
        d, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while chunk := d.unconsumed_tail or f.read(1 << 20):
            total += len(d.decompress(chunk, 1 << 24))
            if total > MAX_DICOM_BYTES:
                raise ImageError(
                    "too_large",
                    f"{path}: deflated data set inflates beyond {MAX_DICOM_BYTES} bytes",
                )
    f.seek(0)


def _parse(f: BinaryIO, stop_before_pixels: bool, path):
    """dcmread an open file; `path` names it in messages."""
    try:
        _check_inflated_size(f, path)
        with quiet_rsna_uids():
            return pydicom.dcmread(f, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ImageError(
            "unreadable", f"{path}: {type(e).__name__}: {e}; is it a complete DICOM file?"
        ) from e


def _open(path, stop_before_pixels: bool):
    """dcmread a local path or an fsspec URL through a bounded file object (_open_file). The
    header pass (stop_before_pixels) reads only up to the pixels, through the file's buffer."""
    f, _ = _open_file(path)
    with f:
        return _parse(f, stop_before_pixels, path)


def read_header(path: str | Path) -> dict:
    """Header metadata only (no pixels): fast enough to scan the whole dataset before planning folds.

    Raises ImageError, and nothing else, for anything about the file."""
    with _any_error_is_image_error(path):
        ds = _open(path, stop_before_pixels=True)
        with quiet_rsna_uids():
            return header_from_dataset(ds, path)


# glibc's malloc: allocations above M_MMAP_THRESHOLD get pages of their own from the kernel, given
# back on free; free memory above M_TRIM_THRESHOLD at the heap's top is given back too. A slice's
# bytes (0.5 MiB), its HU and the resize's buffers are all above the default (128 KiB, raised
# dynamically up to 32 MiB), so every read faulted its pages in again (~120-200 minor faults per
# image: 0.4 ms of 2). Kept on the heap instead, they are reused from slice to slice.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 * 2**20  # a held series is at most build.SERIES_HOLD_BYTES = 128 MiB


def reuse_freed_memory() -> bool:
    """Keep freed pixel buffers in this process's heap for the next slice instead of returning
    them to the kernel (glibc mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD; a build worker calls it
    at start). The output bytes are unchanged; a worker's RSS stays at its peak. True if set;
    False (nothing changed) on a C library other than glibc."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        glibc = ""
    if not glibc.startswith("glibc"):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


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
    """The whole file (a regular file of at most MAX_DICOM_BYTES, see _open_file)."""
    f, size = _open_file(path)
    with f:
        return f.read(size)


def read_slice(path: str | Path, header: dict | None = None) -> tuple[np.ndarray, dict]:
    """(stored pixel values (rows, cols), int16 or uint16 as stored, read-only; header dict).

    `header`: the dict read_header returned for this file in the header pass. With it, the pixels
    of a native file are taken from its bytes without parsing the DICOM a second time
    (native_pixels); other files go through pydicom, without converting the tags again.
    Raises ImageError, and nothing else, for anything about the file.
    """
    with _any_error_is_image_error(path):
        return _read_slice(path, header)


def _read_slice(path, header: dict | None) -> tuple[np.ndarray, dict]:
    if header is not None:
        data = _read_bytes(path)
        stored = native_pixels(data, header)
        if stored is not None:
            return stored, header
        ds = _parse(io.BytesIO(data), stop_before_pixels=False, path=path)
    else:
        ds = _open(path, stop_before_pixels=False)
        with quiet_rsna_uids():
            header = header_from_dataset(ds, path)
    if "PixelData" not in ds:
        raise ImageError("no_pixel_data", f"{path}: PixelData (7FE0,0010) is missing")
    stored = _pixels(ds, header, path)
    if stored.shape != (header["rows"], header["cols"]):
        raise ImageError("bad_shape", f"{path}: pixel array shape {stored.shape} != Rows x Columns")
    return stored, header


def _pixels(ds, header: dict, path) -> np.ndarray:
    """PixelData (7FE0,0010) as stored values: a view of native little-endian bytes, else
    pydicom's pixel_array (big-endian, compressed)."""
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
            return np.frombuffer(buf, dtype=dtype, count=need // 2).reshape(
                header["rows"], header["cols"]
            )
        with quiet_rsna_uids():
            return ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        raise _decoder_error(e, tsyntax, path) from e
    except ValueError as e:
        raise ImageError("unreadable", f"{path}: pixel data cannot be decoded: {e}") from e


def _decoder_error(e: Exception, tsyntax, path) -> ImageError:
    """pydicom's decoder failure: its installed decoders all failed on the data (damaged
    compressed pixels, 'unreadable'), or none is installed ('unsupported_transfer_syntax')."""
    name = getattr(tsyntax, "name", "?")
    if str(e).startswith("Unable to decode as exceptions were raised by all available plugins"):
        return ImageError("unreadable", f"{path}: {name} pixel data is damaged: {e}")
    return ImageError(
        "unsupported_transfer_syntax",
        f"{path}: transfer syntax {tsyntax} ({name}) cannot be decoded here: {e}. "
        "Install pylibjpeg[all] or python-gdcm, or decompress with `gdcmconv --raw`",
    )
