"""Builds read from a URL: a local HTTP server on 127.0.0.1, and an fsspec memory:// store."""

from __future__ import annotations

import shutil

import fsspec
import pandas as pd
import pytest

from ich_prep.cli import main
from ich_prep.info import info
from ich_prep.manifest import FormatError, load_index, load_manifest, read_bytes
from ich_prep.preview import preview
from ich_prep.verify import verify
from tests.sharing_fixtures import build_synthetic, manifest_of, serve


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """A proxy from the environment must not intercept 127.0.0.1."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("remote"))


@pytest.fixture
def served(built):
    with serve(built) as (url, requests):
        yield url, requests


def test_info_from_http_equals_info_from_folder(built, served):
    """info over http gives the same answer as on the folder."""
    url, _ = served
    assert {**info(url), "root": None} == {**info(built), "root": None}


def test_verify_from_http_passes(served, capsys):
    """verify over http: exit 0, every shard fetched exactly once (streamed, one pass)."""
    url, requests = served
    assert main(["verify", url]) == 0
    assert ": OK" in capsys.readouterr().out
    tar_gets = sorted(p for m, p in requests if m == "GET" and p.endswith(".tar"))
    assert tar_gets == sorted(f"/{s['name']}" for s in load_manifest(url)["shards"])


def test_verify_from_http_names_a_missing_shard(built, tmp_path):
    """A shard the server does not have (404) is reported missing, by name."""
    folder = shutil.copytree(built, tmp_path / "copy")
    name = manifest_of(folder)["shards"][-1]["name"]
    (folder / name).unlink()
    with serve(folder) as (url, _):
        problems = verify(url).problems
    assert [(p.kind, p.where) for p in problems] == [("missing", name)]


def test_verify_from_http_finds_extra_files_in_the_listing(built, tmp_path):
    """A stray file is found through the server's directory listing."""
    folder = shutil.copytree(built, tmp_path / "copy")
    (folder / "old-00001.tar").write_bytes(b"\0" * 512)
    with serve(folder) as (url, _):
        assert [(p.kind, p.where) for p in verify(url).problems] == [("extra", "old-00001.tar")]


def test_verify_quick_from_http_uses_head_only(served):
    """--quick over http asks sizes (HEAD) and never downloads a shard."""
    url, requests = served
    assert verify(url, quick=True).ok
    assert not [p for m, p in requests if m == "GET" and p.endswith(".tar")]
    assert len([p for m, p in requests if m == "HEAD"]) == len(load_manifest(url)["shards"]) + 1


def test_preview_from_http_streams_only_what_it_shows(served):
    """preview --n 2 over http fetches only the shards holding its 2 samples (from two folds:
    two shards, each once), not the folder."""
    url, requests = served
    _, n = preview(url, n=2)
    assert n == 2
    tars = [p for m, p in requests if m == "GET" and p.endswith(".tar")]
    assert len(tars) == len(set(tars)) == 2 < len(load_manifest(url)["shards"])


def test_index_from_http_equals_local(built, served):
    """load_index over http returns the same table as the local file."""
    url, _ = served
    pd.testing.assert_frame_equal(load_index(url), pd.read_parquet(built / "index.parquet"))


def test_http_missing_manifest_is_a_clear_error(served):
    """A URL with no manifest.json behind it: FormatError saying it is not a finished build."""
    url, _ = served
    with pytest.raises(FormatError, match="not a finished ich-prep build"):
        load_manifest(url + "/nothing-here")


def test_read_bytes_refuses_past_the_limit(served):
    """read_bytes stops at its limit instead of reading a huge file into memory."""
    url, _ = served
    with pytest.raises(FormatError, match="larger than 100 bytes"):
        read_bytes(url + "/index.parquet", limit=100)


def test_fsspec_memory_url_verifies_and_reports(built):
    """Any fsspec URL works (memory:// here, as s3:// would): verify passes, then finds damage."""
    fs = fsspec.filesystem("memory")
    for p in built.iterdir():
        fs.pipe(f"/share/{p.name}", p.read_bytes())
    try:
        assert verify("memory://share").ok
        assert info("memory://share")["counts"] == info(built)["counts"]
        name = manifest_of(built)["shards"][0]["name"]
        fs.pipe(f"/share/{name}", (built / name).read_bytes()[:1000])
        assert [(p.kind, p.where) for p in verify("memory://share").problems] == [
            ("truncated", name)
        ]
    finally:
        fs.rm("/share", recursive=True)


def test_fit_one_epoch_from_http(built, served, tmp_path):
    """`ich-train fit` trains one epoch from an http:// build root (manifest, index and shards over HTTP)."""
    from ich_train.cli import main as train_main

    url, requests = served
    out = tmp_path / "run"
    rc = train_main(["fit", "--shards", url, "--out", str(out), "--valid-fold", "2", "--model", "resnet10t",
                     "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert (out / "last.pt").exists() and (out / "metrics.csv").read_text().count("\n") == 2
    assert any(path.endswith(".tar") for _, path in requests)


def test_atomic_file_never_writes_through_a_link_at_its_partial_name(tmp_path):
    """A symlink planted at `<path>.partial` (pointing at someone's file) is replaced, not written
    through: the victim is untouched and the result is a regular file."""
    from ich_prep.location import atomic_file

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out.csv"
    (tmp_path / "out.csv.partial").symlink_to(victim)
    with atomic_file(out) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert victim.read_text() == "keep me" and out.read_text() == "new" and not out.is_symlink()


def test_file_in_the_way_names_the_nearest_file(tmp_path):
    """The nearest existing non-folder among a path's parents (and the path with itself=True)."""
    from ich_prep.location import file_in_the_way

    (tmp_path / "f").write_text("x")
    assert file_in_the_way(tmp_path / "f" / "a" / "b") == tmp_path / "f"
    assert file_in_the_way(tmp_path / "f") is None
    assert file_in_the_way(tmp_path / "f", itself=True) == tmp_path / "f"
    assert file_in_the_way(tmp_path / "new" / "x", itself=True) is None
