"""A sample's json (`<key>.json`): its schema, and the one check of it against the index.

`check_meta` is what `verify`, `preview` and `ich-train`'s readers all call, so a build verify
passes is one the readers take (they used to check labels and series positions with code of their
own: `[false, ...]` or `[0.0, ...]` labels and a json slice_rank that disagreed with the index
passed verify and stopped evaluate, `fit --context` and embed). The schema (`FIELDS`) gives each
field's type once; to add a field, add a line there (and, when the index has a column it must
equal, pass that value in `expected` under the field's name). Fields not in the schema are
allowed (a newer writer's) and ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pandas as pd

from ich_prep import LABELS


def _text(v) -> bool:
    return isinstance(v, str)


def _whole(v) -> bool:
    return type(v) is int  # not bool, not 3.0


def _rank(v) -> bool:
    return _whole(v) and v >= 0


def _number(v) -> bool:
    return type(v) in (int, float) and not (isinstance(v, float) and math.isinf(v))


def _numbers(n: int, ok: Callable) -> Callable:
    return lambda v: isinstance(v, list) and len(v) == n and all(ok(x) for x in v)


def _labels(v) -> bool:
    return v is None or _numbers(len(LABELS), lambda x: _whole(x) and x in (0, 1))(v)


def _box(v) -> bool:
    return v is None or _numbers(4, _whole)(v)


@dataclass(frozen=True)
class Field:
    """One json field: `ok(value)` says whether the value has the field's type, `what` says it in
    words; `required` fields must be present."""

    name: str
    ok: Callable[[object], bool]
    what: str
    required: bool = False


FIELDS: tuple[Field, ...] = (
    Field("image_id", _text, "text (the sample's key)", required=True),
    Field("fold", _whole, "a whole number (-1 in a test build)", required=True),
    Field("labels", _labels, f"null or {len(LABELS)} whole numbers 0 or 1", required=True),
    Field("patient_id", _text, "text"),
    Field("study_id", _text, "text"),
    Field("series_id", _text, "text"),
    Field("slice_rank", _rank, "a whole number >= 0"),
    Field("z_position", _number, "a number (mm)"),
    Field("slice_position", _number, "a number (mm)"),
    Field(
        "pixel_spacing",
        _numbers(2, lambda x: x is None or _number(x)),
        "2 numbers (mm; null without PixelSpacing)",
    ),  # fmt: skip
    Field("original_shape", _numbers(2, _whole), "2 whole numbers"),
    Field("crop_box", _box, "null or 4 whole numbers"),
)


def _shown(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def check_meta(meta: object, expected: Mapping[str, object]) -> list[str]:
    """What is wrong with a sample's decoded json, as short sentences (empty: nothing): not an
    object, a required field missing, a field of the wrong type (FIELDS), or a field that differs
    from `expected` (field -> the value the index and manifest give: image_id the key, fold the
    shard's, labels and series_id / slice_rank the index row's; a field that is absent is only
    compared when required)."""
    if not isinstance(meta, dict):
        return [f"json is a {type(meta).__name__}, not an object"]
    out = []
    for f in FIELDS:
        if f.name not in meta:
            if f.required:
                out.append(f"json has no {f.name}")
        elif not f.ok(meta[f.name]):
            out.append(f"json {f.name} {_shown(meta[f.name])} is not {f.what}")
    bad = {f.name for f in FIELDS if f.name in meta and not f.ok(meta[f.name])}
    for name, want in expected.items():
        if name in meta and name not in bad and meta[name] != want:
            out.append(f"json {name} {_shown(meta[name])} differs from the index's {_shown(want)}")
    return out


def index_labels(rows: pd.DataFrame) -> list[list | None]:
    """Each row's labels as the json must repeat them: None for a row without labels (a test
    build), else the LABELS values as ints (None where the index has none: no json can match)."""
    lab = rows[list(LABELS)]
    values = lab.astype("Int64").astype(object).where(lab.notna(), None).to_numpy().tolist()
    empty = lab.isna().all(axis=1).to_numpy()
    return [None if e else v for v, e in zip(values, empty, strict=True)]
