"""Every reader's command line on crafted and damaged builds: verify, info, preview, evaluate,
predict. Each ends with a clear answer (a report, or one line on stderr and a non-zero exit),
never a traceback and never a hang (SIGALRM deadline)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from ich_prep.cli import main as prep
from ich_prep.manifest import dumps
from ich_prep.shards import sha256_file
from ich_train.cli import main as train
from ich_train.config import TrainConfig
from ich_train.train import fit
from tests.sharing_fixtures import shard_members, write_members
from tests.train_fixtures import deadline, make_build


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A small train build and one 1-epoch checkpoint trained on fold 1 (so fold 0 is scored)."""
    tmp = tmp_path_factory.mktemp("hostile_cli")
    root = make_build(tmp / "b", folds=2, per_shard=8, size=32)
    fit(TrainConfig(shards=str(root), out=str(tmp / "run"), model="resnet10t", image_size=32,
                    batch_size=8, epochs=1, workers=0, progress=False, valid_fold=0))  # fmt: skip
    return root, tmp / "run" / "last.pt"


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _first(root: Path) -> str:
    return next(s["name"] for s in _manifest(root)["shards"] if s["fold"] == 0)


def _rehash(root: Path, name: str) -> None:
    m = _manifest(root)
    entry = m["index"] if name == "index.parquet" else next(s for s in m["shards"] if s["name"] == name)  # fmt: skip
    entry.update(bytes=(root / name).stat().st_size, sha256=sha256_file(root / name))
    (root / "manifest.json").write_bytes(dumps(m))


def gzip_tar(root):
    name = _first(root)
    (root / name).write_bytes(gzip.compress((root / name).read_bytes()))
    _rehash(root, name)


def big_member(root):
    name = _first(root)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("ID_x.npy.gz")
        ti.size = 64 * 2**20
        tar.addfile(ti, io.BytesIO(b"\0" * ti.size))
    (root / name).write_bytes(buf.getvalue())
    _rehash(root, name)


def json_member(data: bytes):
    def damage(root):
        name = _first(root)
        members = shard_members(root / name)
        i = next(i for i, (n, _) in enumerate(members) if n.endswith(".json"))
        members[i] = (members[i][0], data(members[i][1]))
        write_members(root, name, members)

    return damage


def flipped(raw: bytes) -> bytes:
    meta = json.loads(raw)
    meta["labels"] = [1 - v for v in meta["labels"]]
    return json.dumps(meta).encode()


def manifest_edit(edit):
    def damage(root):
        m = _manifest(root)
        edit(m)
        (root / "manifest.json").write_bytes(dumps(m))

    return damage


def fifo(which):
    def damage(root):
        name = _first(root) if which == "shard" else which
        os.unlink(root / name)
        os.mkfifo(root / name)

    return damage


def huge_index(root):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_id": pa.array(np.zeros(5_000_000, np.int8))}),
                   root / "index.parquet", compression="zstd")  # fmt: skip
    _rehash(root, "index.parquet")


def fold_relabel(root):
    idx = pd.read_parquet(root / "index.parquet")
    idx.loc[idx["fold"] == 1, "fold"] = idx["fold"].dtype.type(0)
    idx.to_parquet(root / "index.parquet", index=False)
    _rehash(root, "index.parquet")


CASES = {
    "gzip-tar": gzip_tar,
    "member-64MiB": big_member,
    "labels-flipped": json_member(flipped),
    "json-list": json_member(lambda raw: b"[1, 2]"),
    "json-deep": json_member(lambda raw: b"[" * 30000 + b"]" * 30000),
    "samples-negative": manifest_edit(lambda m: m["shards"][0].update(samples=-1)),
    "shard-twice": manifest_edit(lambda m: m["shards"].append(dict(m["shards"][0]))),
    "no-config": manifest_edit(lambda m: m.pop("config")),
    "size-abc": manifest_edit(lambda m: m["config"].update(size="abc")),
    "fold-relabelled": fold_relabel,
    "index-5M-rows": huge_index,
    "fifo-manifest": fifo("manifest.json"),
    "fifo-index": fifo("index.parquet"),
    "fifo-shard": fifo("shard"),
}


def run(capsys, fn, argv) -> tuple[int, str]:
    with deadline(60):
        rc = fn(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def one_line(err: str) -> str:
    """The one error line (predict may add one warning line before it: a train build)."""
    lines = [ln for ln in err.splitlines() if ln.strip() and ": warning: " not in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_every_reader_answers_a_crafted_build_clearly(made, tmp_path, capsys, case):
    """verify reports problems (exit 1); info and preview either work (the damage is in what they
    do not read) or stop in one line; evaluate and predict stop in one line (exit 2)."""
    root, ckpt = made
    b = shutil.copytree(root, tmp_path / "b")
    CASES[case](b)
    rc, _ = run(capsys, prep, ["verify", str(b)])
    assert rc == 1
    for argv in (["info", str(b)], ["preview", str(b), "--n", "4", "--out", str(tmp_path / "p.png")]):  # fmt: skip
        rc, err = run(capsys, prep, argv)
        assert rc == 0 or (rc == 2 and one_line(err).startswith("ich-prep ")), (argv, rc, err)
    for argv in (
        ["evaluate", "--checkpoint", str(ckpt), "--shards", str(b), "--fold", "0", "--workers", "0", "--no-progress"],
        ["predict", "--checkpoint", str(ckpt), "--shards", str(b), "--out", str(tmp_path / "s.csv"), "--workers", "0", "--no-progress"],
    ):  # fmt: skip
        rc, err = run(capsys, train, argv)
        assert rc == 2 and one_line(err).startswith("ich-train "), (argv[0], rc, err)
    assert not (tmp_path / "s.csv").exists()
