"""One house for a build: manifest.open_build is the one reader of manifest.json, and
index.INDEX_SCHEMA the one declaration of the index's columns, used by the writer and checked by
every reader (issue 22)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from ich_prep.index import INDEX_COLUMNS, INDEX_SCHEMA
from ich_prep.manifest import Build, FormatError, ShardEntry, open_build
from ich_prep.verify import verify
from ich_train.data import Build as TrainBuild
from tests.sharing_fixtures import build_synthetic
from tests.test_hostile_index import rewrite_index
from tests.test_sample_schema import edit_json, readers_refuse
from tests.train_fixtures import make_build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("handle") / "b", folds=2, per_shard=6, size=16)


@pytest.fixture
def root(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "b"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("real"))


def test_the_writer_writes_the_schema(built):
    """A real build's index holds INDEX_SCHEMA's columns in its order, each of its dtype."""
    index = open_build(built).index()
    assert tuple(index.columns) == INDEX_COLUMNS
    for c in INDEX_SCHEMA:
        want = "str" if c.dtype == "object" else c.dtype
        assert str(index[c.name].dtype) in (want, "object"), c


def test_open_build_is_typed(root):
    """The handle's fields are typed (shard entries, config, layout), frozen, and its index is
    read once per column set."""
    b = open_build(root)
    assert isinstance(b, Build) and all(isinstance(s, ShardEntry) for s in b.shards)
    assert b.layout.shape == (16, 16, 3) and b.split == "train" and b.counts["ok"] == 12
    with pytest.raises(AttributeError):
        b.root = "elsewhere"  # type: ignore[misc]
    assert b.index(["image_id"]) is b.index(["image_id"])
    with pytest.raises(ValueError, match="no index column"):
        b.index(["image_idd"])


def test_the_trainer_checks_the_index_types_as_info_does(root):
    """A fold column of text: info refused it, the trainer took it (and selected no row of any
    fold); both read through open_build now and refuse it in one line naming the column."""
    index = pd.read_parquet(root / "index.parquet")
    text_fold = index.assign(fold=index["fold"].astype(str))
    rewrite_index(root, pa.Table.from_pandas(text_fold, preserve_index=False))
    with pytest.raises(FormatError, match="column fold holds values of the wrong type"):
        TrainBuild(str(root))


def _manifest(node) -> bool:
    """A name or attribute called manifest (a manifest dict, as readers held it)."""
    return (isinstance(node, ast.Name) and node.id == "manifest") or (
        isinstance(node, ast.Attribute) and node.attr == "manifest"
    )


def _raw_manifest_reads(path: Path) -> list[str]:
    """`manifest[...]` / `manifest.get(...)` (on a name or attribute called manifest) and
    json.loads of the manifest file (MANIFEST) in one module."""
    tree, out = ast.parse(path.read_text()), []
    for node in ast.walk(tree):
        target = node.value if isinstance(node, ast.Subscript) else None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":  # fmt: skip
            target = node.func.value
        if _manifest(target):
            out.append(f"{path.name}:{node.lineno}")
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if isinstance(node, ast.Call) and "MANIFEST" in names and ast.unparse(node.func) == "json.loads":  # fmt: skip
            out.append(f"{path.name}:{node.lineno} json.loads")
    return out


def test_no_module_but_manifest_reads_the_manifest_dict():
    """Every reader goes through manifest.open_build: no raw manifest dict access elsewhere."""
    found = []
    for pkg in ("ich_prep", "ich_train"):
        for path in sorted((ROOT / pkg).glob("*.py")):
            if path.name != "manifest.py":
                found += _raw_manifest_reads(path)
    assert found == []


def test_a_json_slice_position_other_than_the_index_is_refused(built, tmp_path):
    """The json's slice_position is compared with the index row's, as slice_rank is, by the one
    decode (sample.decode_sample): verify reports the sample, the trainer's series-aware reader
    refuses it (before, nothing compared it: verify passed, --context read the build)."""
    folder = Path(shutil.copytree(built, tmp_path / "b"))
    key = edit_json(folder, lambda m: m.update(slice_position=m["slice_position"] + 1.0))
    bad = [p for p in verify(str(folder)).problems if p.kind == "bad_json"]
    assert [p.where.split(":")[-1] for p in bad] == [key], bad
    assert "json slice_position" in bad[0].message and "differs from the index's" in bad[0].message
    refused = readers_refuse(folder)
    assert refused is not None and key in refused and "slice_position" in refused


def test_the_index_takes_the_slice_ranks_the_shards_were_written_with(tmp_path, monkeypatch):
    """The slice rank is computed once, by the shard task as it writes each series
    (build_worker._ranked); the index takes it from the task's results instead of ranking the
    slices a second time (split.slice_ranks). Seen by giving the task other ranks (each series
    reversed): the index follows the jsons and verify passes (before, the index ranked again and
    verify found every reversed json)."""
    from collections import Counter

    import ich_prep.build_worker as worker
    from ich_prep.build import build
    from ich_prep.config import BuildConfig
    from ich_prep.synth import write_synthetic

    real = worker._ranked

    def reversed_ranks(recs, results):  # every slice of the synthetic test set compiles
        n = Counter(r["meta"]["series_id"] for r in recs)
        for r in real(recs, results):
            sid, rank = r["meta"]["series_id"], r["meta"]["slice_rank"]
            yield {**r, "meta": {**r["meta"], "slice_rank": n[sid] - 1 - rank}}

    monkeypatch.setattr(worker, "_ranked", reversed_ranks)
    info = write_synthetic(tmp_path / "syn", patients=2, seed=1, slices_per_series=3)
    cfg = BuildConfig(dicom_dir=info["test_dir"], size=32)
    build(cfg, tmp_path / "out", jobs=1, progress=False)
    report = verify(str(tmp_path / "out"))
    assert report.ok, report.problems[:3]
    ok = open_build(tmp_path / "out").index(["series_id", "slice_rank", "slice_position"])
    ok = ok[ok["status"] == "ok"].sort_values(["series_id", "slice_position"])
    ranks = ok.groupby("series_id")["slice_rank"].apply(list)
    assert all(r == sorted(r, reverse=True) for r in ranks) and len(ranks) >= 2
