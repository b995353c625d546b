"""Read RSNA DICOM slices: header metadata and stored pixel values. All DICOM I/O lives here
(the header's tags are converted and checked in dicom_header, ImageError's home).

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

from ich_prep.dicom_header import MAX_DETAIL as MAX_DETAIL  # re-exported: importers' names
from ich_prep.dicom_header import MAX_ID_CHARS as MAX_ID_CHARS
from ich_prep.dicom_header import ImageError, header_from_dataset

# The largest file read, in bytes. The largest slice accepted (4096 x 4096, 16 bits) is 32 MiB of
# pixels; an RSNA slice is 0.5 MiB. 256 MiB leaves room for big headers and overlays while
# bounding what one worker holds in memory for one file (a deflated file: its inflated size).
MAX_DICOM_BYTES = 256 * 1024 * 1024

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
