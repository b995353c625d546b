"""One schema and one check of a sample's json (ich_prep.sample.check_meta) for verify, preview and
ich-train's readers: whatever verify passes the readers take, whatever they refuse verify reports
(was: `[false, ...]` / `[0.0, ...]` labels and a json slice_rank or series_id that differs from
the index passed verify, then evaluate, `fit --context` and embed exited 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ich_prep import LABELS
from ich_prep.preview import collect
from ich_prep.sample import FIELDS, check_meta
from ich_prep.verify import verify
from ich_train.context import series_positions
from ich_train.data import Build, ShardError, decode_sample, read_shard
from tests.sharing_fixtures import manifest_of, shard_members, write_members
from tests.train_fixtures import make_build


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("schema") / "b", folds=2, per_shard=8, size=16, series_len=4)  # fmt: skip


def edit_json(folder: Path, edit) -> str:
    """The first shard again with its first sample's json replaced by edit(json), manifest size
    and hash recomputed (so only the json is wrong); returns that sample's key."""
    name = manifest_of(folder)["shards"][0]["name"]
    members = shard_members(folder / name)
    i = next(i for i, (n, _) in enumerate(members) if n.endswith(".json"))
    meta = json.loads(members[i][1])
    edit(meta)
    members[i] = (members[i][0], json.dumps(meta).encode())
    write_members(folder, name, members)
    return members[i][0].split(".")[0]


def readers_refuse(folder: Path) -> str | None:
    """The ShardError message of the trainer's reader with series positions (fit --context,
    embed), or None when it takes every sample."""
    b = Build(str(folder))
    positions = series_positions(b.ok)
    try:
        for s in b.shards:
            for raw in read_shard(s, b.encoding):
                decode_sample(raw, b.encoding, positions)
    except ShardError as e:
        return str(e)
    return None


def set_(field, value):
    def edit(meta):
        meta[field] = value

    return edit


def drop(field):
    return lambda meta: meta.pop(field)


def shifted_label(meta):
    meta["labels"] = [1 - v for v in meta["labels"]]


WRONG = (None, True, 0, -1, 1.5, float("nan"), "1", [], [0, 0], [1] * 6, {})
CASES = {
    # the reported ones
    "labels false": set_("labels", [False] * len(LABELS)),
    "labels 0.0": set_("labels", [0.0] * len(LABELS)),
    "slice_rank other": lambda m: m.update(slice_rank=m["slice_rank"] + 1),
    "series_id other": set_("series_id", "ID_someone_else"),
    # generated: every schema field given values of other types
    **{f"{f.name}={v!r}": set_(f.name, v) for f in FIELDS for v in WRONG if not f.ok(v)},
    **{f"no {f.name}": drop(f.name) for f in FIELDS if f.required},
    "labels 5 values": set_("labels", [0] * 5),
    "labels 2": set_("labels", [2] + [0] * 5),
    "labels flipped": shifted_label,
    "fold other": set_("fold", 1),
    "image_id other": set_("image_id", "ID_other"),
    "slice_rank -1": set_("slice_rank", -1),
    "slice_rank 0.0": lambda m: m.update(slice_rank=float(m["slice_rank"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verify_reports_exactly_what_the_readers_refuse(made, tmp_path, case):
    """Each edit of one sample's json: verify reports that sample (bad_json) and the trainer's
    reader (with series positions) refuses the build, naming the same sample; preview does not
    show it."""
    folder = Path(shutil.copytree(made, tmp_path / "b"))
    key = edit_json(folder, CASES[case])
    report = verify(str(folder))
    bad = [p for p in report.problems if p.kind == "bad_json"]
    refused = readers_refuse(folder)
    assert bad and all(key in p.where for p in bad), (case, report.problems)
    assert refused is not None and key in refused, case
    if case in ("labels false", "labels 0.0", "fold other", "image_id other", "no labels"):
        b = Build(str(folder))
        shown = {s["image_id"] for s in collect(b.manifest, b.ok, len(b.ok))}
        assert key not in shown and len(shown) == len(b.ok) - 1


@pytest.mark.parametrize("field", ["patient_id", "z_position", "pixel_spacing", "brand_new_field"])
def test_unknown_fields_and_harmless_values_pass_everywhere(made, tmp_path, field):
    """A json with a field the schema does not know (a newer writer's) or another value of the
    right type: verify passes and the readers take it (no false alarms)."""
    folder = Path(shutil.copytree(made, tmp_path / "b"))
    value = {"patient_id": "ID_x", "z_position": -3.25, "pixel_spacing": [None, None],  # no PixelSpacing
             "brand_new_field": {"a": [1]}}[field]  # fmt: skip
    edit_json(folder, set_(field, value))
    assert verify(str(folder)).ok
    assert readers_refuse(folder) is None


def test_check_meta_names_each_problem():
    good = {"image_id": "ID_1", "fold": 0, "labels": [0] * 6, "slice_rank": 2, "series_id": "S"}
    want = {"image_id": "ID_1", "fold": 0, "labels": [0] * 6, "slice_rank": 2, "series_id": "S"}
    assert check_meta(good, want) == []
    assert check_meta([1], want) == ["json is a list, not an object"]
    assert check_meta({**good, "labels": [False] * 6}, want) == [
        "json labels [False, False, False, False, False, False] is not null or 6 whole numbers 0 or 1"
    ]
    assert check_meta({**good, "slice_rank": 3}, want) == ["json slice_rank 3 differs from the index's 2"]  # fmt: skip
