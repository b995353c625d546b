"""A build writes nothing through a link and deletes only what a build of ours wrote (issue 23).

Every write into --out goes through one owner (`location.atomic_open`: a new private temporary
file, then a rename refused over anything but a regular file); `Store` refuses a link at any path
component inside --out; `outdir.owned_names` calls ours only regular files the manifest or the
ledger names. The variant test plants every kind of entry at every name a build touches, in an
interrupted and a finished build, and checks that nothing outside --out changes, that nothing
not ours is deleted or changed, and that each run ends in success or one line (exit 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ich_prep.build import build
from ich_prep.cli import main
from ich_prep.location import atomic_file, read_bytes
from tests.conftest import make_dataset
from tests.test_build_trust import cfg_for, interrupt_before_manifest


def build_args(dicom_dir: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--dicom-dir", str(dicom_dir), "--labels", str(labels), "--size", "32", "--shard-size", "2", "--folds", "3", "--jobs", "1", "--quiet", "--out", str(out), *extra]  # fmt: skip


def finished_records(out: Path) -> int:
    n = 0
    for p in (out / "_work").glob("*.tar.json"):
        with contextlib.suppress(OSError, ValueError):
            n += "shard" in json.loads(p.read_bytes())
    return n


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def check_shards(out: Path) -> dict:
    """The manifest's shards are regular files (not links) with the hashes it records."""
    m = json.loads((out / "manifest.json").read_bytes())
    for s in m["shards"]:
        p = out / s["name"]
        assert stat.S_ISREG(os.lstat(p).st_mode), f"{p} is not a regular file"
        assert sha(p) == s["sha256"]
    return m


def test_resume_after_kill_9_never_writes_through_a_link(tmp_path, capsys):
    """Before: a link planted at `<shard>.partial` after a kill -9 was opened with 'wb' by the
    rerun: the user's file held tar bytes and the shard became a link to it. Now the rerun writes
    a private temporary file: the file and the links are untouched, every shard a regular file,
    and the build equals a clean one."""
    dicom_dir, labels, _ = make_dataset(tmp_path / "data", n_patients=8, slices=6, size=96)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ich_prep", *build_args(dicom_dir, labels, out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and finished_records(out) < 2:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists(), "the kill must land mid-build"
    links = [out / f"train-f{f}-{i:05d}.tar.partial" for f in range(3) for i in range(30)]
    for link in links:
        link.unlink(missing_ok=True)
        link.symlink_to(notes)
    assert main(build_args(dicom_dir, labels, out)) == 0
    assert notes.read_text() == "my notes"
    assert all(link.is_symlink() and link.resolve() == notes for link in links)
    assert not [p for p in out.iterdir() if p.suffix == ".tar" and p.is_symlink()]
    m = check_shards(out)
    assert main(build_args(dicom_dir, labels, tmp_path / "clean")) == 0
    assert m["shards"] == check_shards(tmp_path / "clean")["shards"]
    capsys.readouterr()
    assert main(["verify", str(out)]) != 0  # the planted links are reported as extra files
    assert "train-f0-00000.tar.partial" in capsys.readouterr().out


def test_overwrite_keeps_a_users_folder_and_file_named_like_shards(tmp_path, capsys):
    """Before: `--overwrite` removed a folder `train-f0-00099.tar` (with its contents) and a file
    `train-f1-00042.tar`, because a shard-like name counted as ours. Now neither is ours (no
    manifest or ledger names it): refused, one line, nothing deleted."""
    dicom_dir, labels, _ = make_dataset(tmp_path / "data", n_patients=3, slices=2, size=64)
    out = tmp_path / "out"
    assert main(build_args(dicom_dir, labels, out)) == 0
    (out / "train-f0-00099.tar").mkdir()
    (out / "train-f0-00099.tar" / "mine.txt").write_text("mine")
    capsys.readouterr()
    assert main(build_args(dicom_dir, labels, out, "--overwrite")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-f0-00099.tar" in err, err
    assert (out / "train-f0-00099.tar" / "mine.txt").read_text() == "mine"
    shutil.rmtree(out / "train-f0-00099.tar")
    (out / "train-f1-00042.tar").write_text("my tar")
    assert main(build_args(dicom_dir, labels, out, "--overwrite")) == 2
    assert "train-f1-00042.tar" in capsys.readouterr().err
    assert (out / "train-f1-00042.tar").read_text() == "my tar"
    check_shards(out)


def test_overwrite_never_writes_through_a_work_link(tmp_path, capsys):
    """Before: `_work` a link to a user's folder: --overwrite wrote the ledger through it and then
    removed the user's config.json there. Now refused, one line naming the link."""
    dicom_dir, labels, _ = make_dataset(tmp_path / "data", n_patients=3, slices=2, size=64)
    out, theirs = tmp_path / "out", tmp_path / "theirs"
    assert main(build_args(dicom_dir, labels, out)) == 0
    theirs.mkdir()
    (theirs / "config.json").write_text('{"mine": 1}')
    (out / "_work").symlink_to(theirs)
    assert main(build_args(dicom_dir, labels, out)) == 0  # complete already: nothing written
    capsys.readouterr()
    for extra in (("--overwrite",), ("--size", "48")):
        assert main([*build_args(dicom_dir, labels, out), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{out / '_work'} is a symlink" in err, err
        assert os.listdir(theirs) == ["config.json"]
        assert (theirs / "config.json").read_text() == '{"mine": 1}'


# ---------------------------------------------------------------- every kind at every name

KINDS = ("file", "folder", "link_file", "link_folder", "dangling", "fifo")
NAMES = (
    "manifest.json",
    "index.parquet",
    "README.md",
    "train-f0-00000.tar",
    "train-f0-00099.tar",
    "test-00000.tar",
    "train-f0-00000.tar.partial",
    ".ich-prep.lock",
    "_work",
    "_work/config.json",
    "_work/headers.parquet",
    "_work/train-f0-00000.tar.json",
    "_work/train-f0-00000.tar.abcd1234.partial",
    "_work/notes.txt",
)


def plant(path: Path, kind: str, outside: Path) -> None:
    """Put an entry of `kind` at `path`, replacing what is there."""
    if path.is_symlink() or path.is_file() or path.is_fifo():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_text("a user's file")
    elif kind == "folder":
        path.mkdir()
        (path / "inner.txt").write_text("a user's file in a folder")
    elif kind == "link_file":
        path.symlink_to(outside / "target.txt")
    elif kind == "link_folder":
        path.symlink_to(outside / "target_dir", target_is_directory=True)
    elif kind == "dangling":
        path.symlink_to(outside / "nothing")
    else:
        os.mkfifo(path)


def tree(root: Path) -> dict[str, str]:
    """Every entry below root, not following links: kind and content or link target."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = "file:" + sha(p)
            else:
                out[rel] = "dir" if stat.S_ISDIR(st.st_mode) else "other"
    return out


def named_by_build(out: Path) -> set[str]:
    """What the folder's own manifest and ledger name (this test's reading of the rule): with a
    manifest, it and the index, card and its shards; with a ledger, those three, the ledger's
    files (its own names and `<name>.<8 random>.partial`) and the shards its records name."""
    names = set()
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        m = json.loads(read_bytes(out / "manifest.json"))  # regular files only: never a FIFO
        names |= {"manifest.json", "index.parquet", "README.md", *(s["name"] for s in m["shards"])}
    work = out / "_work"
    if (work / "config.json").is_file() and not work.is_symlink():
        names |= {"manifest.json", "index.parquet", "README.md"}
        for p in work.iterdir():
            if re.fullmatch(r"config\.json|headers\.parquet|.+\.tar\.json|.+\.[a-z0-9_]{8}\.partial", p.name):  # fmt: skip
                names.add(f"_work/{p.name}")
            if p.name.endswith(".tar.json"):
                names.add(p.name.removesuffix(".json"))
    return names


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """(dicom_dir, labels, {'interrupted': folder, 'finished': folder}) built once."""
    root = tmp_path_factory.mktemp("links")
    dicom_dir, labels, _ = make_dataset(root / "data", n_patients=3, slices=2, size=64)
    cfg = cfg_for(dicom_dir, labels, shard_size=2)
    finished, interrupted = root / "finished", root / "interrupted"
    build(cfg, finished, jobs=1, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        interrupt_before_manifest(mp, cfg, interrupted)
    return dicom_dir, labels, {"finished": finished, "interrupted": interrupted}


@pytest.mark.parametrize("scenario", ["interrupted", "finished"])
def test_no_write_through_a_link_and_no_delete_of_what_is_not_ours(templates, scenario, tmp_path, capsys):  # fmt: skip
    """Each of KINDS at each of NAMES, in an interrupted build (rerun) and a finished one
    (--overwrite): exit 0 or 2 with one line (never a traceback or exit 1), nothing outside --out
    changed, and the planted entry kept exactly unless it is a regular file at a name the
    folder's manifest or ledger names; after exit 0 every shard is a regular file."""
    dicom_dir, labels, folders = templates
    outside = tmp_path / "outside"
    (outside / "target_dir").mkdir(parents=True)
    (outside / "target.txt").write_text("a user's file outside")
    (outside / "target_dir" / "inner.txt").write_text("a user's file in a folder outside")
    data_before, outside_before = tree(dicom_dir.parent), tree(outside)
    extra = ("--overwrite",) if scenario == "finished" else ()
    failures = []
    for name in NAMES:
        for kind in KINDS:
            out = tmp_path / f"out-{NAMES.index(name)}-{kind}"
            shutil.copytree(folders[scenario], out, symlinks=True)
            plant(out / name, kind, outside)
            ours = named_by_build(out)
            planted = {k: v for k, v in tree(out).items() if k == name or k.startswith(name + "/")}
            capsys.readouterr()
            rc = main(build_args(dicom_dir, labels, out, *extra))
            err = capsys.readouterr().err.strip()
            case = f"{scenario}: {kind} at {name}: rc {rc}"
            if rc not in (0, 2) or (rc == 2 and len(err.splitlines()) != 1) or "Traceback" in err:
                failures.append(f"{case}: {err[-300:]}")
            if tree(outside) != outside_before or tree(dicom_dir.parent) != data_before:
                failures.append(f"{case}: something outside --out changed")
            if not (kind == "file" and name in ours):
                now = {k: v for k, v in tree(out).items() if k == name or k.startswith(name + "/")}
                if now != planted:
                    failures.append(f"{case}: the planted {kind} changed: {planted} -> {now}")
            if rc == 0:
                try:
                    check_shards(out)
                except (AssertionError, OSError, ValueError) as e:
                    failures.append(f"{case}: {e}")
            shutil.rmtree(out)
    assert not failures, "\n".join(failures)


def test_atomic_writers_never_follow_or_reuse(tmp_path):
    """The one writer: whatever is planted beside or at the target (a link at `<name>.partial`,
    at the target, a folder at the target) is never written through; a link or folder at the
    target is refused (NotOurs), the regular file there replaced."""
    from ich_prep.errors import NotOurs
    from ich_prep.location import atomic_open

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "best.pt"
    (tmp_path / "best.pt.partial").symlink_to(victim)
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("best.pt.") and tmp.stat().st_size == 0  # fmt: skip
        tmp.write_bytes(b"weights")
    assert target.read_bytes() == b"weights" and not target.is_symlink()
    target.unlink()
    target.symlink_to(victim)
    for writer in (atomic_file, atomic_open):
        with pytest.raises(NotOurs, match="is a symlink"), writer(target) as f:
            f.write(b"x") if hasattr(f, "write") and not isinstance(f, Path) else f.write_bytes(b"x")  # fmt: skip
    assert victim.read_text() == "keep me" and target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.partial", "victim.txt"]  # fmt: skip


def test_a_checkpoint_is_never_written_through_a_link(tmp_path):
    """ich-train's writers share the owner: save_checkpoint over a link to someone's file is
    refused and the file is untouched; over a regular file it is replaced."""
    torch = pytest.importorskip("torch")
    from ich_prep.errors import NotOurs
    from ich_train.checkpoint import save_checkpoint

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "last.pt").symlink_to(victim)
    with pytest.raises(NotOurs):
        save_checkpoint(tmp_path / "last.pt", epoch=1, model=torch.zeros(2))
    assert victim.read_text() == "keep me"
    (tmp_path / "last.pt").unlink()
    save_checkpoint(tmp_path / "last.pt", epoch=1, model=torch.zeros(2))
    assert not (tmp_path / "last.pt").is_symlink() and (tmp_path / "last.pt").stat().st_size > 0


# ---------------------------------------------------------------- --out errors that say what is wrong


@pytest.fixture
def small(tmp_path):
    return make_dataset(tmp_path / "data", n_patients=3, slices=2, size=64)


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("kind", ["file", "fifo", "dangling"])
def test_out_that_cannot_be_a_folder_is_one_line(small, tmp_path, capsys, kind, depth):
    """Before: a dangling link as --out, or --out inside a regular file, was an I/O error (exit
    1) saying to run the command again. Now exit 2 naming the entry in the way, at any depth,
    and nothing is created."""
    dicom_dir, labels, _ = small
    bad = tmp_path / "a"
    out = bad.joinpath(*["sub"] * depth)
    if kind == "file":
        bad.write_text("x")
    elif kind == "fifo":
        os.mkfifo(bad)
    else:
        bad.symlink_to(tmp_path / "nowhere")
    before = tree(tmp_path)
    capsys.readouterr()
    assert main(build_args(dicom_dir, labels, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run the same command again" not in err, err
    says = "which does not exist" if kind == "dangling" else "not a folder"
    assert f"{bad}" in err and says in err, err
    assert tree(tmp_path) == before


def test_every_spelling_of_an_out_inside_the_inputs_is_refused_alike(small, tmp_path, capsys, monkeypatch):  # fmt: skip
    """Before: `simplecache::file://<dicom>/out` built into the DICOM folder (exit 0) and
    `FILE://...` was a traceback. Now every spelling of a folder inside --dicom-dir gives the same
    line and exit 2, and an unknown protocol one line."""
    dicom_dir, labels, _ = small
    (tmp_path / "via").symlink_to(dicom_dir.parent)
    monkeypatch.chdir(tmp_path)
    inside = f"{dicom_dir}/out"
    spellings = [inside, f"file://{inside}", f"file://{inside}/", f"simplecache::file://{inside}",
                 f"{dicom_dir}/../{dicom_dir.name}/out", "data/train/out", "via/train/out",
                 f"file://{tmp_path}/via/train/out"]  # fmt: skip
    before = tree(dicom_dir.parent)
    for out in spellings:
        capsys.readouterr()
        assert main(build_args(dicom_dir, labels, Path(out) if "://" not in out else out)) == 2, out  # type: ignore[arg-type]  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "lies inside --dicom-dir" in err, (out, err)
    assert tree(dicom_dir.parent) == before
    for out in (f"FILE://{tmp_path}/o", f"nosuch://{tmp_path}/o"):
        assert main(build_args(dicom_dir, labels, out)) == 2, out  # type: ignore[arg-type]
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "unknown protocol" in err, err


def test_different_config_names_each_setting_with_both_values(small, tmp_path, capsys):
    """Before: every differing setting gave the same line. Now each is named with the folder's
    value and the new one, and nothing in the build changes."""
    dicom_dir, labels, _ = small
    out = tmp_path / "out"
    assert main(build_args(dicom_dir, labels, out)) == 0
    before = tree(out)
    changes = {
        ("--size", "48"): "--size 32 (now 48)",
        ("--crop", "slice"): "--crop series (now slice)",
        ("--windows", "brain"): "--windows brain,subdural,bone (now brain)",
        ("--encoding", "png"): "--encoding npy.gz (now png)",
        ("--folds", "4"): "--folds 3 (now 4)",
        ("--seed", "7"): "--seed 0 (now 7)",
        ("--limit", "3"): "--limit not set (now 3)",
        ("--shard-size", "5"): "--shard-size 2 (now 5)",
    }
    for flags, says in changes.items():
        capsys.readouterr()
        assert main([*build_args(dicom_dir, labels, out), *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, (flags, err)
        assert err.count("(now ") == 1, err
    capsys.readouterr()
    assert main([*build_args(dicom_dir, labels, out), "--size", "48", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "--size 32 (now 48)" in err and "--seed 0 (now 7)" in err
    assert tree(out) == before


@pytest.mark.parametrize("which", ["shard", "index.parquet", "manifest.json"])
def test_verify_refuses_a_build_file_that_is_a_link(small, tmp_path, capsys, which):
    """Before: a shard that was a symlink to an identical copy elsewhere passed verify (OK), so a
    link a resume had written through looked sound. Now a shard, the index or the manifest that is
    a link is a `link` problem (exit 1) and is not read."""
    dicom_dir, labels, _ = small
    out = tmp_path / "out"
    assert main(build_args(dicom_dir, labels, out)) == 0
    name = json.loads((out / "manifest.json").read_bytes())["shards"][0]["name"] if which == "shard" else which  # fmt: skip
    copy = tmp_path / "elsewhere"
    shutil.copyfile(out / name, copy)
    (out / name).unlink()
    (out / name).symlink_to(copy)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "LINK" in printed and f"{name} is a symlink" in printed, printed


def test_resume_never_replaces_a_file_no_ledger_names(small, tmp_path, capsys, monkeypatch):
    """An interrupted build whose plan needs `train-f0-00000.tar`, where that name now holds a
    user's file that no ledger record names: the rerun refuses in one line and keeps the file
    (before: the file was replaced by the shard)."""
    dicom_dir, labels, _ = small
    out = tmp_path / "out"
    interrupt_before_manifest(monkeypatch, cfg_for(dicom_dir, labels, shard_size=2), out)
    (out / "_work" / "train-f0-00000.tar.json").unlink()
    (out / "train-f0-00000.tar").write_text("a user's file")
    capsys.readouterr()
    assert main(build_args(dicom_dir, labels, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds train-f0-00000.tar" in err, err
    assert (out / "train-f0-00000.tar").read_text() == "a user's file"


def test_preview_and_metrics_png_never_write_through_a_link(small, tmp_path, capsys):
    """Before: `preview --out` and the run folder's metrics.png were opened with 'wb' / savefig
    by path, writing a PNG into whatever file a link there pointed at. Now both go through the one
    writer: refused (preview: one line, exit 2), the file untouched; a regular file is replaced."""
    from ich_prep.errors import NotOurs
    from ich_train.runlog import plot_metrics

    dicom_dir, labels, _ = small
    out = tmp_path / "out"
    assert main(build_args(dicom_dir, labels, out)) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "sheet.png"
    link.symlink_to(victim)
    capsys.readouterr()
    assert main(["preview", str(out), "--n", "2", "--out", str(link)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{link} is a symlink" in err, err
    frame = pd.DataFrame({"epoch": [0], "train_loss": [0.5], "valid_loss": [0.6]})
    with pytest.raises(NotOurs):
        plot_metrics(frame, link)
    assert victim.read_text() == "keep me" and link.is_symlink()
    link.unlink()
    assert main(["preview", str(out), "--n", "2", "--out", str(link)]) == 0
    assert link.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
