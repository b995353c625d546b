"""`ich-prep verify`: a clean build passes; each kind of damage is reported by name."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile

import numpy as np
import pandas as pd
import pytest

from ich_prep.cli import main
from ich_prep.shards import MAX_JSON_BYTES
from ich_prep.verify import verify
from tests.sharing_fixtures import (
    build_synthetic,
    manifest_of,
    rewrite_manifest,
    shard_members,
    write_members,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("verify"))


@pytest.fixture
def folder(built, tmp_path):
    """A private copy of the build that a test may damage."""
    return shutil.copytree(built, tmp_path / "copy")


def first_shard(folder) -> str:
    return manifest_of(folder)["shards"][0]["name"]


def run_verify(folder, capsys, *flags) -> tuple[int, str]:
    rc = main(["verify", str(folder), *flags])
    return rc, capsys.readouterr().out


def test_clean_build_verifies(built, capsys):
    """An untouched build: exit 0, OK, every sample checked."""
    rc, out = run_verify(built, capsys)
    assert rc == 0 and ": OK" in out
    assert f"{manifest_of(built)['counts']['ok']} samples" in out


def test_missing_shard(folder, capsys):
    """A deleted shard is reported as missing, by name."""
    name = first_shard(folder)
    (folder / name).unlink()
    rc, out = run_verify(folder, capsys)
    assert rc == 1 and f"MISSING          {name} is listed in manifest.json" in out


def test_truncated_shard(folder, capsys):
    """A shard cut short is reported as truncated, by name, with both sizes."""
    name = first_shard(folder)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    rc, out = run_verify(folder, capsys)
    assert rc == 1 and f"TRUNCATED        {name} is {len(data) // 2} bytes" in out
    assert [p.kind for p in verify(folder).problems] == ["truncated"]


def test_flipped_byte_in_an_image(folder, capsys):
    """One flipped byte inside an image: the shard is altered and the damaged sample is named."""
    name = first_shard(folder)
    path = folder / name
    with tarfile.open(path) as tar:
        ti = next(t for t in tar if t.name.endswith(".npy.gz"))
    data = bytearray(path.read_bytes())
    data[ti.offset_data + ti.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    rc, out = run_verify(folder, capsys)
    key = ti.name.split(".")[0]
    assert rc == 1 and f"{name}: sha256 differs from manifest.json" in out
    assert f"{name}: sample {key}: image is damaged" in out


def test_extra_stray_file(folder, capsys):
    """A stray file in the folder is reported as extra, by name."""
    (folder / "train-f9-00000.tar").write_bytes(b"x" * 1024)
    rc, out = run_verify(folder, capsys)
    assert rc == 1 and "EXTRA            train-f9-00000.tar is not in manifest.json" in out
    assert [p.where for p in verify(folder).problems] == ["train-f9-00000.tar"]


def test_index_row_without_a_sample(folder, capsys):
    """An ok index row whose shard has no such sample is reported with its image id."""
    index = pd.read_parquet(folder / "index.parquet")
    ghost = index[index["status"] == "ok"].head(1).assign(image_id="ID_ghost00001")
    pd.concat([index, ghost], ignore_index=True).to_parquet(folder / "index.parquet", index=False)
    rc, out = run_verify(folder, capsys)
    shard = ghost["shard"].iloc[0]
    assert rc == 1
    assert f"index.parquet row ID_ghost00001 says shard {shard}, which has no sample" in out


def test_sample_without_an_index_row(folder):
    """A sample whose index row is gone is reported as an extra sample, by key."""
    index = pd.read_parquet(folder / "index.parquet")
    victim = index[index["status"] == "ok"].iloc[0]
    index[index["image_id"] != victim["image_id"]].to_parquet(folder / "index.parquet", index=False)
    wheres = [p.where for p in verify(folder).problems if p.kind == "extra_sample"]
    assert wheres == [f"{victim['shard']}:{victim['image_id']}"]


def test_quick_checks_sizes_not_bytes(folder):
    """--quick catches a truncated shard but, by design, not a same-size flipped byte."""
    name = first_shard(folder)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 3] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    assert verify(folder, quick=True).ok and not verify(folder).ok
    (folder / name).write_bytes(bytes(data[:-512]))
    assert [p.kind for p in verify(folder, quick=True).problems] == ["truncated"]


def test_jobs_give_the_same_report(folder):
    """Streaming shards in parallel finds the same problems in the same order."""
    (folder / first_shard(folder)).unlink()
    (folder / "notes.txt").write_text("hi")
    assert verify(folder, jobs=3).problems == verify(folder, jobs=1).problems


def test_json_report(built, capsys):
    """--json prints the report: ok flag, counts, problems."""
    rc, out = run_verify(built, capsys, "--json")
    d = json.loads(out)
    assert (
        rc == 0
        and d["ok"]
        and d["problems"] == []
        and d["shards"] == len(manifest_of(built)["shards"])
    )


# ---------------------------------------------------------------- hostile shards


def _sample_members(folder, name):
    return shard_members(folder / name)


def test_unsafe_member_names_are_refused(folder, tmp_path):
    """'..', absolute paths, links and devices in a shard are reported and never written anywhere."""
    name = first_shard(folder)
    members = _sample_members(folder, name)
    link = tarfile.TarInfo("ID_link.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    dev = tarfile.TarInfo("ID_dev.json")
    dev.type = tarfile.CHRTYPE
    evil = [("../evil.json", b"{}"), ("/tmp/abs.json", b"{}"), link, dev]
    write_members(folder, name, members + evil)
    kinds = [p.message for p in verify(folder).problems if p.kind == "unsafe_member"]
    assert len(kinds) == 4
    assert any("climbs out" in k for k in kinds) and any("absolute" in k for k in kinds)
    assert any("symlink" in k for k in kinds) and any("device" in k for k in kinds)
    assert not (folder.parent / "evil.json").exists()


def test_pickled_npy_is_refused_not_run(folder, tmp_path):
    """A .npy of Python objects (pickle inside) is reported as a bad image; nothing is unpickled."""
    name = first_shard(folder)
    members = _sample_members(folder, name)
    buf = io.BytesIO()
    np.save(buf, np.array([print], dtype=object), allow_pickle=True)
    members[0] = (members[0][0], gzip.compress(buf.getvalue()))
    write_members(folder, name, members)
    # the new member's size moves every later sample: their index spans are reported as well
    msgs = [p.message for p in verify(folder).problems if p.kind != "index"]
    assert len(msgs) == 1 and "would need pickle" in msgs[0]


def test_oversized_json_and_gzip_bomb_are_refused(folder):
    """A json over the size bound and a gzip that inflates far past an image are refused."""
    name = first_shard(folder)
    members = _sample_members(folder, name)
    members[0] = (members[0][0], gzip.compress(b"\0" * (64 * 64 * 3 * 200)))
    members[1] = (members[1][0], b" " * (MAX_JSON_BYTES + 1))
    write_members(folder, name, members)
    msgs = [p.message for p in verify(folder).problems]
    assert any("inflates past" in m for m in msgs) and any("byte limit" in m for m in msgs)


# ---------------------------------------------------------------- format versions


def test_newer_major_format_is_refused_with_the_fix(folder, capsys):
    """A manifest of format 3.x: verify fails and says to upgrade ich-toolkit."""
    m = manifest_of(folder)
    rewrite_manifest(folder, {**m, "format_version": "3.0"})
    rc, out = run_verify(folder, capsys)
    assert rc == 1 and "upgrade ich-toolkit" in out


def test_unsafe_shard_name_in_manifest_is_refused(folder):
    """A manifest naming a shard outside its folder is refused before anything is opened."""
    m = manifest_of(folder)
    m["shards"][0]["name"] = "../../etc/passwd.tar"
    rewrite_manifest(folder, m)
    (p,) = verify(folder).problems
    assert p.kind == "manifest" and "not a plain <name>.tar" in p.message
