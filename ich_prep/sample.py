"""A sample (`<key>.<encoding>` + `<key>.json`): its json schema, and the one decode and check of
it against its shard and index row (`decode_sample` -> image, `SampleMeta`).

`decode_sample` (and in it `check_meta`) is what `verify`, `preview` and `ich-train`'s readers all
call, so a build verify
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

import numpy as np
import pandas as pd

from ich_prep import LABELS
from ich_prep.config import ImageLayout
from ich_prep.shards import decode_bounded, decode_json


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


class SampleError(ValueError):
    """What is wrong with one sample: `problems`, (kind, sentence) pairs, kind one of verify's:
    bad_sample (a member missing), bad_image, bad_json. str(): the sentences."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(why for _, why in problems))


@dataclass(frozen=True)
class SampleMeta:
    """A sample's json once check_meta passed: the fields readers use, typed (FIELDS gives every
    field's type; the others stay in the json)."""

    image_id: str
    fold: int
    labels: tuple[int, ...] | None
    series_id: str | None = None
    slice_rank: int | None = None
    slice_position: float | None = None

    @classmethod
    def of(cls, meta: dict) -> SampleMeta:
        labels = None if meta["labels"] is None else tuple(meta["labels"])
        where = (meta.get(k) for k in ("series_id", "slice_rank", "slice_position"))
        return cls(meta["image_id"], meta["fold"], labels, *where)


def _image(key: str, fields: Mapping[str, bytes], encoding: str, layout: ImageLayout):
    """(image or None, problems) of the sample's image member: present, decodable within the
    layout's bound (shards.decode_bounded), of the layout's shape and dtype."""
    if encoding not in fields:
        return None, [("bad_sample", f"no .{encoding} image")]
    try:
        image = decode_bounded(fields[encoding], encoding, layout)
    except ValueError as e:
        return None, [("bad_image", f"image is damaged: {str(e)[:200]}")]
    if image.shape != layout.shape or image.dtype != np.dtype(layout.dtype):
        return None, [("bad_image", f"image is {image.shape} {image.dtype}, the manifest says {layout.shape} {layout.dtype}")]  # fmt: skip
    return image, []


def decode_sample(
    key: str,
    fields: Mapping[str, bytes],
    encoding: str,
    layout: ImageLayout,
    expected: Mapping[str, object] | None = None,
) -> tuple[np.ndarray, SampleMeta]:
    """The one decode of a sample, for every reader (verify, preview, ich-train's loaders):
    (uint8 image of `layout`, its json as SampleMeta) from the members `fields` of sample `key`
    (shards.iter_samples / read_span). The json is checked by check_meta against its key and
    `expected` (the shard's fold; the index row's labels, series_id, slice_rank and
    slice_position, where the reader has them). SampleError naming every problem otherwise."""
    image, problems = _image(key, fields, encoding, layout)
    meta = None
    if "json" not in fields:
        problems.append(("bad_sample", "no .json metadata"))
    else:
        try:
            meta = decode_json(fields["json"])
        except (ValueError, RecursionError) as e:  # RecursionError: json nested thousands deep
            problems.append(("bad_json", f"json is damaged: {str(e)[:200]}"))
        else:
            why = check_meta(meta, {"image_id": key, **(expected or {})})
            problems += [("bad_json", w) for w in why]
    if problems:
        raise SampleError(problems)
    return image, SampleMeta.of(meta)
