"""`ich-prep info` and the manifest's format-version rule."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from ich_prep import LABELS
from ich_prep.cli import main
from ich_prep.info import info
from ich_prep.manifest import FormatError, load_manifest
from tests.sharing_fixtures import build_synthetic, manifest_of, rewrite_manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("info"))


@pytest.fixture
def folder(built, tmp_path):
    return shutil.copytree(built, tmp_path / "copy")


def test_counts_per_fold_match_the_manifest(built):
    """Images and shards per fold agree with the manifest; bytes add up."""
    d, m = info(built), manifest_of(built)
    assert {str(g["fold"]): g["images"] for g in d["groups"]} == m["counts"]["per_fold"]
    assert sum(g["shards"] for g in d["groups"]) == len(m["shards"])
    assert d["bytes"]["shards"] == sum(s["bytes"] for s in m["shards"])
    assert d["bytes"]["total"] == d["bytes"]["shards"] + m["index"]["bytes"]


def test_prevalence_per_fold_is_the_index_mean(built):
    """Label prevalence per fold is the mean of the ok index rows of that fold."""
    index = pd.read_parquet(built / "index.parquet")
    ok = index[index["status"] == "ok"]
    want = ok.groupby("fold")[list(LABELS)].mean()
    d = info(built)
    for fold, row in want.iterrows():
        assert d["prevalence"][str(fold)] == pytest.approx(row.to_dict(), abs=1e-4)


def test_error_summary_names_the_file(built):
    """The synthetic set's truncated DICOM shows up by reason with a detail naming the file."""
    d = info(built)
    assert d["counts"]["error"] == 1 and d["errors"]["by_reason"] == {"unreadable": 1}
    assert ".dcm" in d["errors"]["examples"]["unreadable"][0]


def test_cli_prints_config_and_tables(built, capsys):
    """The text output names format, encoding, windows and a row per fold."""
    assert main(["info", str(built)]) == 0
    out = capsys.readouterr().out
    assert "format 2.0" in out and "encoding npy.gz" in out
    assert "brain L40/W80, subdural L80/W200, bone L600/W2800" in out
    assert "label prevalence per fold" in out and "unreadable: 1" in out
    assert sum(line.startswith("train ") for line in out.splitlines()) == 3


def test_cli_json(built, capsys):
    """--json prints the same dict info() returns."""
    assert main(["info", "--json", str(built)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(info(built)))


def test_not_a_build_gets_a_clear_error(tmp_path, capsys):
    """A folder without manifest.json: exit 2 and a message saying it is not a finished build."""
    assert main(["info", str(tmp_path)]) == 2
    assert "not a finished ich-prep build" in capsys.readouterr().err


def test_newer_major_format_is_refused(folder, capsys):
    """Format 3.0 from a newer toolkit: a clear error telling the user to upgrade."""
    rewrite_manifest(folder, {**manifest_of(folder), "format_version": "3.0"})
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "shard format 3.0 is newer" in err and "upgrade ich-toolkit" in err


def test_newer_minor_format_loads(folder):
    """Format 2.7 (same major, unknown extra keys) still loads."""
    rewrite_manifest(folder, {**manifest_of(folder), "format_version": "2.7", "new_key": [1]})
    assert info(folder)["format_version"] == "2.7"


def test_older_compatible_format_loads(built, monkeypatch):
    """A 2.0 folder read by a 2.3 reader loads."""
    monkeypatch.setattr("ich_prep.manifest.FORMAT_VERSION", "2.3")
    assert load_manifest(built)["format_version"] == "2.0"
    assert info(built)["counts"]["ok"] == manifest_of(built)["counts"]["ok"]


def test_older_major_format_is_refused(folder):
    """Format 1.0 (shuffled shards, per-slice crops, no spans): refused with the command that
    rebuilds it."""
    rewrite_manifest(folder, {**manifest_of(folder), "format_version": "1.0"})
    with pytest.raises(FormatError, match="too old.*rebuild"):
        load_manifest(folder)


def test_image_layout_comes_from_the_typed_config(built, capsys):
    """The image shape and channel names are the manifest config's layout, not an assumed 3."""
    d = info(built)
    assert d["image"] == {"height": 64, "width": 64, "channels": 3, "dtype": "uint8",
                          "channel_names": ["brain", "subdural", "bone"]}  # fmt: skip
    assert d["config"]["windows"][0] == {"name": "brain", "center": 40.0, "width": 80.0}
    assert main(["info", str(built)]) == 0
    assert "images: 64x64x3 uint8, encoding npy.gz" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda ix: ix.drop(columns=["status"]), "no column status"),
        (lambda ix: ix.assign(fold=ix["fold"].astype(str)), "column fold holds values"),
        (lambda ix: ix.assign(any=ix["any"].astype(str)), "column any holds values"),
    ],
    ids=["no-status", "fold-str", "labels-str"],
)
def test_index_without_usable_columns_is_one_line(folder, capsys, damage, message):
    """An index (hash recomputed) lacking a column info reads, or with one of the wrong type:
    exit 2 and one line naming the column, not a KeyError or ValueError traceback."""
    from ich_prep.shards import sha256_file

    path = folder / "index.parquet"
    damage(pd.read_parquet(path)).to_parquet(path, index=False)
    m = manifest_of(folder)
    m["index"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    rewrite_manifest(folder, m)
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
