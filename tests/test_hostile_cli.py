"""Every reader's command line on crafted and damaged builds: verify, info, preview, fit, evaluate,
predict. Each ends with a clear answer (a report, or one line on stderr and a non-zero exit),
never a traceback and never a hang (SIGALRM deadline); every image decode is bounded by the
build's layout (ImageLayout.max_bytes) and nothing is ever unpickled."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ich_prep.cli import main as prep
from ich_prep.config import BuildConfig
from ich_prep.manifest import dumps
from ich_prep.shards import sha256_file
from ich_train.cli import main as train
from ich_train.config import TrainConfig
from ich_train.train import fit
from tests.sharing_fixtures import shard_members, write_members
from tests.train_fixtures import deadline, make_build

SIZE = 32  # the fixture builds' image side: 32 x 32 x 3 uint8 (ImageLayout.max_bytes 68,608)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Small train builds (npy.gz, the default encoding, and raw npy; same images) and one 1-epoch
    checkpoint trained on fold 1 of the npy.gz build (so fold 0, where the damage goes, is scored)."""
    tmp = tmp_path_factory.mktemp("hostile_cli")
    roots = {enc: make_build(tmp / enc, folds=2, per_shard=8, size=SIZE, encoding=enc)
             for enc in ("npy.gz", "npy")}  # fmt: skip
    fit(TrainConfig(shards=str(roots["npy.gz"]), out=str(tmp / "run"), model="resnet10t", image_size=SIZE,
                    batch_size=8, epochs=1, workers=0, progress=False, valid_fold=0))  # fmt: skip
    return roots, tmp / "run" / "last.pt"


def _layout(root: Path):
    return BuildConfig.from_dict(_manifest(root)["config"]).layout


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


def _encoding(root: Path) -> str:
    return _manifest(root)["config"]["encoding"]


def image_member(make):
    """Replace the first image member of the first fold-0 shard with make(root) (raw .npy bytes,
    gzipped when the build is npy.gz); sizes and hashes recomputed so only the member is wrong."""

    def damage(root):
        name, enc = _first(root), _encoding(root)
        members = shard_members(root / name)
        i = next(i for i, (n, _) in enumerate(members) if n.endswith("." + enc))
        raw = make(root)
        members[i] = (members[i][0], gzip.compress(raw, 9, mtime=0) if enc == "npy.gz" else raw)
        write_members(root, name, members)

    return damage


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "|u1", fortran: bool = False) -> bytes:
    """A .npy header alone (version 1.0) declaring `shape`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})  # fmt: skip
    return buf.getvalue()


def fortran_npy(root):
    return npy(np.asfortranarray(np.zeros((SIZE, SIZE, 3), np.uint8)))


def bomb(root):
    """A (4096, 4096, 3) .npy of zeros: 48 MiB raw, ~50 KiB gzipped (under the layout's member
    bound of 68,608 bytes, so only a bounded inflate stops it)."""
    side = 4096
    return npy_header((side, side, 3)) + bytes(side * side * 3)


def giant_header(root):
    """A header claiming (100000, 100000, 3) uint8 (30 GB) followed by 64 bytes."""
    return npy_header((100_000, 100_000, 3)) + bytes(64)


class Evil:
    """Unpickling it creates `marker` (pickle calls open(marker, 'w')): the proof it ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def object_npy(root):
    arr = np.empty((SIZE, SIZE, 3), object)
    arr.fill(Evil(str(root.parent / "PICKLE_RAN")))
    return npy(arr, allow_pickle=True)


def other_image(shape: tuple[int, ...]):
    return lambda root: npy(np.full(shape, 128, np.uint8))


def drop_bytes(m):
    m["shards"][0].pop("bytes")


def garbage_index(root):
    (root / "index.parquet").write_bytes(np.random.default_rng(0).bytes(4096))
    _rehash(root, "index.parquet")


def index_without(column: str):
    def damage(root):
        idx = pd.read_parquet(root / "index.parquet").drop(columns=[column])
        idx.to_parquet(root / "index.parquet", index=False)
        _rehash(root, "index.parquet")

    return damage


def labels_json(labels):
    def edit(raw: bytes) -> bytes:
        meta = json.loads(raw)
        meta["labels"] = labels
        return json.dumps(meta).encode()

    return json_member(edit)


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
    "format-1.0": manifest_edit(lambda m: m.update(format_version="1.0")),
    "image-layout-lies": manifest_edit(lambda m: m["image"].update(channels=5)),
    "npy-fortran": image_member(fortran_npy),  # on the raw-npy build (NPY_CASES)
    "npy.gz-fortran": image_member(fortran_npy),
    "shard-without-bytes": manifest_edit(drop_bytes),
    "windows-brain": manifest_edit(lambda m: m["config"].update(windows="brain")),
    "size-1e9": manifest_edit(lambda m: m["config"].update(size=10**9)),
    "index-garbage": garbage_index,
    "index-no-status": index_without("status"),
    "image-48px": image_member(other_image((48, 48, 3))),
    "image-16px": image_member(other_image((16, 16, 3))),
    "image-2-channels": image_member(other_image((SIZE, SIZE, 2))),
    "json-string-labels": labels_json(["1", "0", "0", "0", "0", "0"]),
    "json-null-labels": labels_json(None),
    "gzip-bomb": image_member(bomb),
    "npy-giant-header": image_member(giant_header),
    "npy-object-pickle": image_member(object_npy),
}
NPY_CASES = {"npy-fortran"}  # crafted on the raw .npy build; every other case on the npy.gz one


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


def crafted(made, tmp_path, case) -> Path:
    roots, _ = made
    b = shutil.copytree(roots["npy" if case in NPY_CASES else "npy.gz"], tmp_path / "b")
    CASES[case](b)
    return b


def fit_argv(b: Path, out: Path) -> list[str]:
    return ["fit", "--shards", str(b), "--out", str(out), "--model", "resnet10t", "--image-size", str(SIZE),
            "--batch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress", "--valid-fold", "0"]  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_every_reader_answers_a_crafted_build_clearly(made, tmp_path, capsys, case):
    """verify reports problems (exit 1); info and preview either work (the damage is in what they
    do not read) or stop in one line; fit, evaluate and predict stop in one line (exit 2). fit
    trains on fold 1 and validates on fold 0, the damaged one, so every case reaches it: none
    is in something fit does not read. Nothing is ever unpickled."""
    _, ckpt = made
    b = crafted(made, tmp_path, case)
    rc, _ = run(capsys, prep, ["verify", str(b)])
    assert rc == 1
    for argv in (["info", str(b)], ["preview", str(b), "--n", "16", "--out", str(tmp_path / "p.png")]):  # fmt: skip
        rc, err = run(capsys, prep, argv)
        assert rc == 0 or (rc == 2 and one_line(err).startswith("ich-prep ")), (argv, rc, err)
    train_runs = [
        fit_argv(b, tmp_path / "run"),
        ["evaluate", "--checkpoint", str(ckpt), "--shards", str(b), "--fold", "0", "--workers", "0", "--no-progress"],
        ["predict", "--checkpoint", str(ckpt), "--shards", str(b), "--out", str(tmp_path / "s.csv"), "--workers", "0", "--no-progress"],
    ]  # fmt: skip
    for argv in train_runs:
        rc, err = run(capsys, train, argv)
        assert rc == 2 and one_line(err).startswith("ich-train "), (argv[0], rc, err)
    assert not (tmp_path / "s.csv").exists()
    assert not (tmp_path / "PICKLE_RAN").exists(), "a reader unpickled a shard member"


def test_the_pickle_marker_would_show_an_unpickling(tmp_path):
    """The object-dtype member does run code when unpickled (so its marker's absence above means
    no reader unpickled it)."""
    raw = object_npy(tmp_path / "b")
    assert not (tmp_path / "PICKLE_RAN").exists()
    np.load(io.BytesIO(raw), allow_pickle=True)
    assert (tmp_path / "PICKLE_RAN").exists()


# ---------------------------------------------------------------- bounded memory


@pytest.fixture
def decodes(monkeypatch):
    """Every decode_image call any reader makes, as (encoded bytes, limit, decoded bytes or None
    when it refused): the name is patched wherever a module holds it (a `from ... import`)."""
    import sys

    from ich_prep import shards

    original, calls = shards.decode_image, []

    def recording(data, encoding, limit=shards.MAX_IMAGE_BYTES, channels=3):
        try:
            arr = original(data, encoding, limit, channels)
        except ValueError:
            calls.append((len(data), limit, None))
            raise
        calls.append((len(data), limit, arr.nbytes))
        return arr

    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in ("ich_prep", "ich_train") and getattr(mod, "decode_image", None) is original:  # fmt: skip
            monkeypatch.setattr(mod, "decode_image", recording)
    return calls


@pytest.mark.parametrize("case", ["gzip-bomb", "npy-giant-header"])
def test_every_decode_is_bounded_by_the_layout(made, tmp_path, capsys, decodes, case):
    """preview, verify and evaluate (in process, no loader worker) on a gzip bomb and a .npy whose
    header claims 30 GB: every image decode is given at most the build's ImageLayout.max_bytes and
    never returns more than its limit; the hostile member reaches a decode and is refused there."""
    _, ckpt = made
    b = crafted(made, tmp_path, case)
    bound = _layout(b).max_bytes
    hostile = len(shard_members(b / _first(b))[0][1])
    for fn, argv, want in (
        (prep, ["preview", str(b), "--n", "16", "--out", str(tmp_path / "p.png")], 0),
        (prep, ["verify", str(b)], 1),
        (train, ["evaluate", "--checkpoint", str(ckpt), "--shards", str(b), "--fold", "0", "--workers", "0", "--no-progress"], 2),
    ):  # fmt: skip
        decodes.clear()
        rc, err = run(capsys, fn, argv)
        assert rc == want, (argv[0], rc, err)
        assert decodes, f"{argv[0]} decoded no image"
        over = [(n, lim) for n, lim, _ in decodes if lim > bound]
        assert not over, (
            f"{argv[0]}: decodes with a limit over the layout's {bound} bytes: {over[:3]}"
        )
        assert all(out is None or out <= lim for _, lim, out in decodes), argv[0]
        refused = [n for n, _, out in decodes if out is None]
        assert hostile in refused, f"{argv[0]} never refused the hostile member"


def test_a_format_1_build_is_refused_by_every_reader_with_the_rebuild_command(
    made, tmp_path, capsys
):
    """A 1.x build (shuffled shards, per-slice crops, no spans): verify, info, preview, fit,
    evaluate and predict each stop in one line that names `ich-prep build ... --overwrite`."""
    b = crafted(made, tmp_path, "format-1.0")
    _, ckpt = made
    runs = [
        (prep, ["verify", str(b)], 1),
        (prep, ["info", str(b)], 2),
        (prep, ["preview", str(b), "--out", str(tmp_path / "p.png")], 2),
        (train, ["fit", "--shards", str(b), "--out", str(tmp_path / "r"), "--workers", "0", "--no-progress"], 2),
        (train, ["evaluate", "--checkpoint", str(ckpt), "--shards", str(b), "--fold", "0", "--workers", "0", "--no-progress"], 2),
        (train, ["predict", "--checkpoint", str(ckpt), "--shards", str(b), "--out", str(tmp_path / "s.csv"), "--workers", "0", "--no-progress"], 2),
    ]  # fmt: skip
    for fn, argv, want in runs:
        with deadline(60):
            rc = fn(argv)
        cap = capsys.readouterr()
        text = cap.err + (cap.out if want == 1 else "")  # verify reports on stdout
        assert rc == want and "Traceback" not in text, (argv[0], rc, text)
        if want == 2:
            assert len(cap.err.strip().splitlines()) == 1, cap.err
        assert "shard format 1.0 is too old" in text and "ich-prep build --dicom-dir" in text, (argv[0], text)  # fmt: skip
        assert "--overwrite" in text
