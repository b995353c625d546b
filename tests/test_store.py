"""Builds that read DICOMs from and write shards to fsspec URLs instead of local folders."""

from __future__ import annotations

import fsspec
import pytest

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.location import Store, list_files
from ich_prep.manifest import load_manifest
from ich_prep.verify import verify
from tests.conftest import make_dataset


def tree_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def memory_dataset(tmp_path):
    """The small labelled set copied into an in-memory fsspec file system (an object-store stand-in)."""
    dicom_dir, labels, truth = make_dataset(tmp_path / "data", n_patients=4, slices=3)
    fs = fsspec.filesystem("memory")
    root = f"memory://ich-{tmp_path.name}"
    for p in sorted(dicom_dir.iterdir()):
        fs.pipe(f"{root}/train/{p.name}", p.read_bytes())
    fs.pipe(f"{root}/labels.csv", labels.read_bytes())
    yield root, truth, dicom_dir, labels
    fs.rm(root, recursive=True)


def test_build_from_and_to_memory_urls(memory_dataset):
    """DICOMs read from memory://, shards written to memory://: a complete build verify accepts."""
    root, truth, _, _ = memory_dataset
    cfg = BuildConfig(
        dicom_dir=f"{root}/train", labels=f"{root}/labels.csv", size=32, shard_size=4, folds=2
    )
    res = build(cfg, f"{root}/out", jobs=1, progress=False)
    assert res.manifest["counts"]["ok"] == len(truth)
    assert load_manifest(f"{root}/out") == res.manifest
    report = verify(f"{root}/out")
    assert not report.problems, report.problems
    assert not [n for n in Store(f"{root}/out").listdir() if n.endswith(".partial") or n == "_work"]


def test_url_build_matches_local_build(memory_dataset, tmp_path):
    """The same config written to a URL and to a folder gives the same bytes."""
    root, _, _, _ = memory_dataset
    cfg = BuildConfig(
        dicom_dir=f"{root}/train", labels=f"{root}/labels.csv", size=32, shard_size=4, folds=2
    )
    build(cfg, f"{root}/out", jobs=1, progress=False)
    build(cfg, tmp_path / "local", jobs=1, progress=False)
    store = Store(f"{root}/out")
    assert {n: store.read_bytes(n) for n in store.listdir()} == tree_bytes(tmp_path / "local")


def test_list_files_on_url_is_relative_and_sorted(memory_dataset):
    """Listing a URL gives the same relative, sorted names as listing a folder."""
    root, _, dicom_dir, _ = memory_dataset
    assert list_files(f"{root}/train", ".dcm") == list_files(str(dicom_dir), ".dcm")


def test_dask_build_with_file_urls(tmp_path):
    """Dask process workers read file:// DICOM URLs and write to a file:// output: same bytes as local."""
    distributed = pytest.importorskip("dask.distributed", reason="the dask extra is not installed")
    dicom_dir, labels, _ = make_dataset(tmp_path / "data", n_patients=4, slices=3)
    cfg = BuildConfig(
        dicom_dir=f"file://{dicom_dir}", labels=str(labels), size=32, shard_size=4, folds=2
    )
    build(cfg, tmp_path / "local", jobs=1, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cl, distributed.Client(cl):  # fmt: skip
        build(cfg, f"file://{tmp_path / 'remote'}", jobs=-1, progress=False, backend="dask")
    assert tree_bytes(tmp_path / "remote") == tree_bytes(tmp_path / "local")
