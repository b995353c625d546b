"""Crafted and damaged builds (manifest sizes and hashes recomputed, so integrity checks pass):
the trainer's reader refuses what verify refuses, reads are bounded, FIFOs never hang a reader."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ich_prep.config import ImageLayout
from ich_prep.manifest import FormatError, dumps, open_build
from ich_prep.preview import collect
from ich_prep.shards import encode_image, sha256_file
from ich_prep.verify import verify
from ich_train.data import Build, ShardError, decode_sample, read_shard
from tests.sharing_fixtures import shard_members, write_members
from tests.train_fixtures import make_build

SIZE = 16


@pytest.fixture
def root(tmp_path) -> Path:
    return make_build(tmp_path / "b", folds=2, per_shard=4, size=SIZE)


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def save_manifest(root: Path, m: dict) -> None:
    (root / "manifest.json").write_bytes(dumps(m))


def first(root: Path) -> str:
    return manifest(root)["shards"][0]["name"]


def read_all(root: Path) -> list:
    b = Build(str(root))
    return [decode_sample(r, b.encoding) for s in b.shards for r in read_shard(s, b.encoding)]


def replace_member(root: Path, suffix: str, data: bytes, which: int = 0) -> None:
    """Swap the `which`-th member ending in `suffix` of the first shard for `data`."""
    name = first(root)
    members = shard_members(root / name)
    idx = [i for i, (n, _) in enumerate(members) if n.endswith(suffix)][which]
    members[idx] = (members[idx][0], data)
    write_members(root, name, members)


def refuse_everywhere(root: Path, match: str) -> None:
    assert not verify(str(root)).ok
    with pytest.raises(ShardError, match=match):
        read_all(root)


# ---------------------------------------------------------------- bounded reading


def test_gzip_compressed_tar_is_refused_by_the_trainer(root):
    """A gzip tar named .tar whose member declares 1 GiB: the trainer reads no member of it."""
    name = first(root)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        ti = tarfile.TarInfo("ID_x.npy.gz")
        ti.size = 2**30
        tar.addfile(ti, io.BytesIO(b"\0" * 2**30))
    (root / name).write_bytes(gzip.compress(raw.getvalue(), 9))
    m = manifest(root)
    m["shards"][0].update(bytes=(root / name).stat().st_size, sha256=sha256_file(root / name))
    save_manifest(root, m)
    assert (root / name).stat().st_size < 2**21
    refuse_everywhere(root, "not a readable tar")


def test_image_member_over_the_layout_bound_is_never_read(root):
    """An image member larger than a (size, size, 3) uint8 image can be: refused from its header."""
    replace_member(
        root, ".npy.gz", b"\0" * (ImageLayout(SIZE, SIZE, 3, ("a", "b", "c")).max_bytes + 1)
    )
    refuse_everywhere(root, "over the .*-byte limit")


def test_too_many_members_stop_the_read(root):
    """Thousands of tiny unexpected members in one shard: the read stops at a bound."""
    name = first(root)
    members = shard_members(root / name)
    key = members[-1][0].split(".")[0]  # same key as the last sample: skipped, unexpected members
    members += [(f"{key}.x{i}", b"x") for i in range(200)]
    write_members(root, name, members)
    with pytest.raises(ShardError, match="more than 96 tar members"):
        read_all(root)


def test_preview_stops_reading_a_shard_at_the_member_bound(root):
    """200 unexpected members before a shard's samples: preview's read of that shard stops at the
    bound (96 members for 16 samples) and shows none of its images, instead of reading on."""
    name = first(root)
    members = shard_members(root / name)
    write_members(root, name, [(f"ID_aaaa.x{i}", b"x") for i in range(200)] + members)
    b = open_build(str(root))
    rows = b.index()
    assert collect(b, rows[rows["shard"] == name], n=100) == []
    write_members(root, name, [(f"ID_aaaa.x{i}", b"x") for i in range(40)] + members)
    b = open_build(str(root))
    assert len(collect(b, rows[rows["shard"] == name], n=100)) == len(members) // 2


# ---------------------------------------------------------------- one source of truth


def test_json_labels_flipped_against_the_index(root):
    """The sample json says other labels than index.parquet: verify and the trainer refuse."""
    name = first(root)
    members = shard_members(root / name)
    i = next(i for i, (n, _) in enumerate(members) if n.endswith(".json"))
    meta = json.loads(members[i][1])
    meta["labels"] = [1 - v for v in meta["labels"]]
    members[i] = (members[i][0], json.dumps(meta).encode())
    write_members(root, name, members)
    refuse_everywhere(root, "differs from the index")


@pytest.mark.parametrize("change", ["negative", "duplicate"])
def test_manifest_shard_entries_that_disagree_with_the_index(root, change):
    """`samples: -1` and a duplicated entry: Build refuses (before it trained twice or skipped)."""
    m = manifest(root)
    if change == "negative":
        m["shards"][0]["samples"] = -1
    else:
        m["shards"].append(dict(m["shards"][0]))
    save_manifest(root, m)
    with pytest.raises(
        FormatError, match="bad samples" if change == "negative" else "listed twice"
    ):
        Build(str(root))
    assert not verify(str(root)).ok


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.pop("config"), "no 'config'"),
        (lambda m: m["shards"][0].pop("bytes"), "bad bytes"),
        (lambda m: m["config"].update(size="abc"), "size"),
        (lambda m: m["config"].update(windows="brain"), "windows"),
        (lambda m: m["config"].update(size=10**9), "size"),
        (lambda m: m.update(counts=[]), "counts"),
    ],
    ids=["no-config", "no-bytes", "size-abc", "windows-string", "size-huge", "counts-list"],
)
def test_malformed_manifest_fields_are_one_clear_error(root, edit, match):
    """Missing config, a shard without bytes, size 'abc', windows 'brain', size 10**9: one
    FormatError naming the field, for Build, info and verify alike (no KeyError/TypeError)."""
    from ich_prep.info import info

    m = manifest(root)
    edit(m)
    save_manifest(root, m)
    for read in (lambda: Build(str(root)), lambda: info(str(root))):
        with pytest.raises(FormatError, match=match):
            read()
    assert "manifest" in verify(str(root)).by_kind()


def test_index_fold_relabelled(root):
    """The fold-1 rows relabelled fold 0 in the index (hash recomputed): verify and Build refuse."""
    idx = pd.read_parquet(root / "index.parquet")
    idx.loc[idx["fold"] == 1, "fold"] = np.int8(0)
    idx.to_parquet(root / "index.parquet", index=False)
    m = manifest(root)
    m["index"].update(
        bytes=(root / "index.parquet").stat().st_size, sha256=sha256_file(root / "index.parquet")
    )
    save_manifest(root, m)
    assert "index" in verify(str(root)).by_kind()
    with pytest.raises(ShardError, match="fold"):
        Build(str(root))


# ---------------------------------------------------------------- what a sample may hold


def test_fortran_order_npy_refused_by_verify_and_trainer(tmp_path):
    """A Fortran-order .npy member: verify no longer says OK to what the trainer refuses."""
    root = make_build(tmp_path / "b", folds=2, per_shard=4, size=SIZE, encoding="npy")
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(np.zeros((SIZE, SIZE, 3), np.uint8)))
    replace_member(root, ".npy", buf.getvalue())
    assert "bad_image" in verify(str(root)).by_kind()
    with pytest.raises(ShardError, match="C-order"):
        read_all(root)


@pytest.mark.parametrize(
    "json_bytes,match",
    [
        (b"[1, 2]", "not an object"),
        (b"[" * 30000 + b"]" * 30000, "sample"),
        (
            b'{"image_id": "x", "labels": ["1", "0", "0", "0", "0", "0"]}',
            "is not null or 6 whole numbers",
        ),
        (b'{"image_id": "x", "labels": [null, 0, 0, 0, 0, 0]}', "is not null or 6 whole numbers"),
    ],
    ids=["list", "deep", "string-labels", "null-labels"],
)
def test_hostile_sample_json(root, json_bytes, match):
    """A json that is a list, nested 30,000 deep, or with string or null labels: one ShardError."""
    replace_member(root, ".json", json_bytes)
    with pytest.raises(ShardError, match=match):
        read_all(root)


def test_image_of_another_size(root):
    """A 32x32 image in a size-16 build: refused by name, not a collate crash."""
    replace_member(root, ".npy.gz", encode_image(np.zeros((8, 8, 3), np.uint8), "npy.gz"))
    refuse_everywhere(root, r"manifest says \(16, 16, 3\)")


# ---------------------------------------------------------------- FIFOs


def in_thread(fn, timeout: float = 20.0):
    """Run fn in a thread; (finished, result or exception)."""
    out: list = []

    def run():
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return bool(out), out[0] if out else None


@pytest.mark.parametrize("which", ["manifest.json", "index.parquet", "shard"])
def test_fifo_in_place_of_a_build_file_never_hangs(root, which):
    """A FIFO instead of the manifest, the index or a shard: verify and Build answer at once."""
    name = first(root) if which == "shard" else which
    os.unlink(root / name)
    os.mkfifo(root / name)
    done, rep = in_thread(lambda: verify(str(root)))
    assert done, "verify hung on a FIFO"
    assert not rep.ok
    from ich_prep.info import info

    readers = [lambda: read_all(root)] + ([] if which == "shard" else [lambda: info(str(root))])
    for reader in readers:  # info reads no shard
        done, res = in_thread(reader)
        assert done, "a reader hung on a FIFO"
        assert isinstance(res, Exception) and "regular file" in str(res)


def test_index_declaring_millions_of_rows_is_refused_before_reading(root):
    """A 2 MB zstd index.parquet of 20 M rows (hash recomputed): refused from its footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ich_prep.info import info
    from ich_prep.manifest import FormatError

    table = pa.table({"image_id": pa.array(np.zeros(20_000_000, np.int8))})
    pq.write_table(table, root / "index.parquet", compression="zstd")
    assert (root / "index.parquet").stat().st_size < 4 * 2**20
    m = manifest(root)
    m["index"].update(
        bytes=(root / "index.parquet").stat().st_size, sha256=sha256_file(root / "index.parquet")
    )
    save_manifest(root, m)
    for read in (lambda: info(str(root)), lambda: Build(str(root))):
        with pytest.raises(FormatError, match="declares 20000000 rows"):
            read()
    assert "index" in verify(str(root)).by_kind()
