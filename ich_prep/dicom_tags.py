"""A strict converter of the raw DICOM elements the header needs: their values as pydicom would
convert them, read straight from the bytes pydicom's dcmread left raw, or None when any of them is
not plainly what pydicom converts that way (the caller then lets pydicom convert, as before).

pydicom converts an element on first access through its hooks, a VR lookup, value validation and
a DataElement: ~30 us each, over half of a header's cost. Here each element is accepted only when it is
a RawDataElement with its bytes in memory, non-empty, little endian, of the expected VR (explicit)
or of none (implicit VR, the dictionary's), and its bytes are:

- US: exactly 2 -> int (`<H`; SS `<h`);
- DS: printable ASCII (then NUL padding), backslash-separated items, each a plain decimal number of
  at most 16 characters with optional spaces -> float, or a tuple of floats for several values;
- IS: one plain integer -> pydicom's own IS (whose str() is its text, as SeriesNumber needs);
- CS, LO, UI: one value of printable ASCII without a backslash -> str, trailing spaces and NULs
  removed; LO only under a character set that reads ASCII as ASCII.

Anything else (an empty or deferred value, another VR, 'nan', '1,5', non-ASCII text, several values
of a US/IS/text element, an implicit-VR PixelPaddingValue whose US or SS depends on
PixelRepresentation, big endian) makes the whole data set go through pydicom.
"""

from __future__ import annotations

import re
import struct

from pydicom.dataelem import RawDataElement
from pydicom.valuerep import IS

# keyword: (tag, VR). ImageOrientationPatient (0020,0037) is read raw by dicom_header itself.
ELEMENTS = {
    "Modality": (0x00080060, "CS"),
    "PatientID": (0x00100020, "LO"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "SeriesNumber": (0x00200011, "IS"),
    "InstanceNumber": (0x00200013, "IS"),
    "ImagePositionPatient": (0x00200032, "DS"),
    "FrameOfReferenceUID": (0x00200052, "UI"),
    "SamplesPerPixel": (0x00280002, "US"),
    "NumberOfFrames": (0x00280008, "IS"),
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "PixelSpacing": (0x00280030, "DS"),
    "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"),
    "PixelRepresentation": (0x00280103, "US"),
    "PixelPaddingValue": (0x00280120, "US or SS"),
    "RescaleIntercept": (0x00281052, "DS"),
    "RescaleSlope": (0x00281053, "DS"),
}
# pydicom's codec names for SpecificCharacterSet (0008,0005) absent / ISO_IR 6, ISO_IR 100 and
# ISO_IR 192: printable ASCII decodes to itself under each.
_ASCII_SETS = {"iso8859", "latin_1", "UTF8"}
_TEXT = re.compile(rb"[ -\[\]-~]*\x00*")  # printable ASCII but the backslash, then NUL padding
_DS_TEXT = re.compile(rb"[ -~]*\x00*")
_DS_ITEM = re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")
_IS_ITEM = re.compile(rb" *[+-]?[0-9]+ *\x00*")
_US, _SS = struct.Struct("<H"), struct.Struct("<h")


class _Unusual(Exception):
    """An element pydicom must convert itself."""


def _ds(raw: bytes):
    if not _DS_TEXT.fullmatch(raw):
        raise _Unusual
    # pydicom: decode, strip(), rstrip(" \x00"), split at backslashes, float() of each
    items = raw.decode("ascii").strip().rstrip(" \x00").split("\\")
    if not all(len(v) <= 16 and _DS_ITEM.fullmatch(v) for v in items):
        raise _Unusual
    return float(items[0]) if len(items) == 1 else tuple(float(v) for v in items)


def _text(raw: bytes) -> str:
    if not _TEXT.fullmatch(raw):
        raise _Unusual
    return raw.decode("ascii").rstrip(" \x00")


def _convert(elem, vr: str, ascii_text: bool):
    if type(elem) is not RawDataElement or not isinstance(elem.value, bytes) or not elem.length:
        raise _Unusual
    raw = elem.value
    if not elem.is_little_endian or len(raw) != elem.length:
        raise _Unusual
    if vr == "US or SS":  # the VR an explicit file states; an implicit one: pydicom decides
        if elem.VR not in ("US", "SS") or len(raw) != 2:
            raise _Unusual
        return (_US if elem.VR == "US" else _SS).unpack(raw)[0]
    if elem.VR not in (None, vr):
        raise _Unusual
    if vr == "US":
        if len(raw) != 2:
            raise _Unusual
        return _US.unpack(raw)[0]
    if vr == "DS":
        return _ds(raw)
    if vr == "IS":
        if not _IS_ITEM.fullmatch(raw):
            raise _Unusual
        return IS(raw.decode("ascii").rstrip(" \x00"))
    if vr == "LO" and not ascii_text:
        raise _Unusual
    return _text(raw)


class _Element:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class StrictView:
    """What dicom_header reads of a data set, with the values strict_values converted: `keyword
    in view`, `view[keyword].value`, `view.get(keyword, default)`, `view.get_item(tag)` (raw,
    for ImageOrientationPatient) and `len(view)`; presence and the rest from the data set."""

    __slots__ = ("ds", "values")

    def __init__(self, ds, values: dict):
        self.ds, self.values = ds, values

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.ds

    def __getitem__(self, keyword: str) -> _Element:
        return _Element(self.values[keyword])

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, keyword: str, default=None):
        return self.values.get(keyword, default)

    def get_item(self, tag: int):
        return self.ds.get_item(tag)


def strict_view(ds) -> StrictView | None:
    """`ds` seen through strict_values, or None when pydicom must convert."""
    values = strict_values(ds)
    return None if values is None else StrictView(ds, values)


def strict_values(ds) -> dict | None:
    """{keyword: value} for the ELEMENTS present in `ds` (a data set dcmread returned, its
    elements not yet converted), each as pydicom would give it (a tuple where pydicom gives a
    MultiValue), or None when any is unusual (see the module's docstring)."""
    charset = ds.original_character_set
    first = charset if isinstance(charset, str) else (charset[0] if charset else "")
    ascii_text = first in _ASCII_SETS
    values = {}
    try:
        for keyword, (tag, vr) in ELEMENTS.items():
            elem = ds.get_item(tag, keep_deferred=True)
            if elem is not None:
                values[keyword] = _convert(elem, vr, ascii_text)
    except _Unusual:
        return None
    return values
