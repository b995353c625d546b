"""The per-slice metadata the index keeps, from a parsed DICOM data set, validated
(`header_from_dataset`), and ImageError, the one error a slice that cannot be compiled raises.

The ~18 elements read here are converted by dicom_tags.strict_values (plain float/int/str from
the raw bytes: ~0.15 instead of ~0.55 ms per file on the real samples) when each is exactly what
pydicom would read the same way; otherwise by pydicom itself, lazily, as before. Both give the
checks below the same values, so every file, damaged or not, gets the same header or error.
"""

from __future__ import annotations

import math

import numpy as np
import pydicom

from ich_prep.dicom_tags import strict_view

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


# Several values: pydicom's MultiValue, or the tuple dicom_tags.strict_values gives instead (pydicom
# gives no tuple for these elements, so a tuple is always the strict converter's).
_MULTI = (pydicom.multival.MultiValue, tuple)


def _first(value):
    """First value of a possibly multi-valued element, e.g. WindowCenter '00036\\00036'."""
    if isinstance(value, _MULTI):
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
    n = len(ipp) if isinstance(ipp, _MULTI) else 1
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
    view = strict_view(ds)  # the strict converter's values, or pydicom's when it declines
    ds = ds if view is None else view
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
