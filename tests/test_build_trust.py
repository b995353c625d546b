"""Builds you can trust: --out apart from the inputs, --overwrite deletes only our files, a rerun
never mixes old and new inputs, one build per --out, odd file names, FIFOs, orphaned workers."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds

from ich_prep.build import BuildError, build
from ich_prep.config import BuildConfig
from ich_prep.location import Store
from ich_prep.outdir import LOCK, BuildLock, OutDirError
from ich_prep.verify import verify
from tests.conftest import csv_rows, make_dataset, phantom_hu, write_hu


def cfg_for(dicom_dir, labels=None, **kw) -> BuildConfig:
    kw.setdefault("size", 32)
    kw.setdefault("shard_size", 4)
    kw.setdefault("folds", 3)
    return BuildConfig(
        dicom_dir=str(dicom_dir), labels=None if labels is None else str(labels), **kw
    )


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def out_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data", n_patients=6, slices=4, size=64)


# ---------------------------------------------------------------- 1. --out and --overwrite


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_out_overlapping_the_inputs_is_refused_before_anything(data, tmp_path, where):
    """--out equal to, the parent of, or inside --dicom-dir: refused with --overwrite too; no input touched."""
    dicom_dir, labels, _ = data
    before = files_of(tmp_path / "data")
    out = {"same": dicom_dir, "parent": dicom_dir.parent, "inside": dicom_dir / "shards"}[where]
    with pytest.raises(OutDirError, match="--dicom-dir"):
        build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False, overwrite=True)
    assert files_of(tmp_path / "data") == before
    assert not (dicom_dir / "shards").exists()


def test_out_holding_the_labels_is_refused(data, tmp_path):
    """--labels inside --out (not under --dicom-dir): refused, the CSV survives --overwrite."""
    dicom_dir, labels, _ = data
    out = tmp_path / "out"
    out.mkdir()
    csv = out / "labels.csv"
    csv.write_bytes(labels.read_bytes())
    with pytest.raises(OutDirError, match="holds --labels"):
        build(cfg_for(dicom_dir, csv), out, jobs=1, progress=False, overwrite=True)
    assert csv.read_bytes() == labels.read_bytes()


def test_overwrite_of_an_unrelated_folder_deletes_nothing(data, tmp_path):
    """A folder of someone else's files: refused with and without --overwrite; every file stays."""
    dicom_dir, labels, _ = data
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "x.tar").write_text("mine too")
    (out / "README.md").write_text("my readme")
    before = files_of(out)
    for overwrite in (False, True):
        with pytest.raises(BuildError, match="no ich-prep build wrote"):
            build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False, overwrite=overwrite)
    assert files_of(out) == before


def test_overwrite_removes_only_our_files(data, tmp_path):
    """A build of ours plus a foreign file: --overwrite refuses and deletes nothing; without the
    foreign file it replaces the build, and the result equals a fresh build."""
    dicom_dir, labels, _ = data
    out = tmp_path / "out"
    build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False)
    (out / "my_notes.txt").write_text("keep")
    before = files_of(out)
    with pytest.raises(BuildError, match="nothing was deleted"):
        build(cfg_for(dicom_dir, labels, size=48), out, jobs=1, progress=False, overwrite=True)
    assert files_of(out) == before
    (out / "my_notes.txt").unlink()
    build(cfg_for(dicom_dir, labels, size=48), out, jobs=1, progress=False, overwrite=True)
    build(cfg_for(dicom_dir, labels, size=48), tmp_path / "fresh", jobs=1, progress=False)
    assert out_bytes(out) == out_bytes(tmp_path / "fresh")


# ---------------------------------------------------------------- 2. inputs changed


def interrupt_before_manifest(monkeypatch, cfg, out):
    """Run a build that stops after every shard is finished, before the manifest: the state a
    kill leaves, with every shard's ledger entry present (the strongest temptation to reuse)."""
    import ich_prep.card

    def boom(_):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ich_prep.card, "dataset_card", boom)
        with pytest.raises(KeyboardInterrupt):
            build(cfg, out, jobs=1, progress=False)
    assert not (out / "manifest.json").exists() and glob.glob(str(out / "_work" / "*.tar.json"))
    assert not (out / LOCK).exists()


def change_labels(labels: Path, image_id: str) -> None:
    lines = labels.read_text().splitlines()
    keep = [ln for ln in lines if not ln.startswith(image_id + "_")]
    labels.write_text("\n".join(keep + csv_rows(image_id, {"any": 1, "subdural": 1})) + "\n")


def add_images(dicom_dir: Path, labels: Path, n: int) -> list[str]:
    ids = [f"ID_new{i:05d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        write_hu(dicom_dir / f"{image_id}.dcm", phantom_hu(64), patient="ID_pnew", z=float(i))
    with labels.open("a") as f:
        f.write("\n".join(r for i in ids for r in csv_rows(i)) + "\n")
    return ids


def rewrite_intercept(path: Path) -> None:
    """Same pixels, RescaleIntercept -1024 -> -824: every HU 200 higher."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.RescaleIntercept = "-824"
    time.sleep(0.01)  # a new mtime even on coarse clocks
    ds.save_as(path)


@pytest.mark.parametrize("change", ["labels", "added", "intercept"])
def test_resume_after_inputs_changed_equals_a_clean_build(data, tmp_path, monkeypatch, change):
    """Interrupted build, then labels changed / 8 DICOMs added / an intercept changed: the rerun
    redoes what changed and its output is byte-identical to a clean build of the new inputs."""
    dicom_dir, labels, truth = data
    out = tmp_path / "out"
    interrupt_before_manifest(monkeypatch, cfg_for(dicom_dir, labels), out)
    victim = sorted(truth)[3]
    if change == "labels":
        change_labels(labels, victim)
    elif change == "added":
        add_images(dicom_dir, labels, 8)
    else:
        rewrite_intercept(dicom_dir / f"{victim}.dcm")
    res = build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False)
    assert res.summary["changed_shards"] >= 1
    build(cfg_for(dicom_dir, labels), tmp_path / "clean", jobs=1, progress=False)
    assert out_bytes(out) == out_bytes(tmp_path / "clean")
    assert verify(str(out)).ok
    index = pd.read_parquet(out / "index.parquet").set_index("image_id")
    assert (index["status"] == "ok").all()
    if change == "labels":
        assert index.loc[victim, "subdural"] == 1


def test_kill_9_then_labels_change_then_rerun(tmp_path):
    """A real kill -9 mid-build, a label changed, the same command again: equal to a clean build."""
    dicom_dir, labels, truth = make_dataset(tmp_path / "data", n_patients=8, slices=6, size=96)
    args = ["build", "--dicom-dir", str(dicom_dir), "--labels", str(labels), "--size", "32", "--shard-size", "2", "--folds", "3", "--jobs", "1", "--quiet"]  # fmt: skip
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ich_prep", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(str(out / "_work" / "*.tar.json"))) < 4:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the kill must land mid-build"
    change_labels(labels, sorted(truth)[0])
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "inputs changed since the interrupted run" in rerun.stdout
    clean = subprocess.run([*cmd[:-1], str(tmp_path / "clean")], capture_output=True, timeout=300)
    assert clean.returncode == 0
    assert out_bytes(out) == out_bytes(tmp_path / "clean")


def test_finished_build_refuses_changed_inputs_naming_them(data, tmp_path):
    """A finished build, then a new DICOM / a changed labels CSV: refused, naming the file and
    --overwrite; unchanged inputs: nothing to do; --overwrite rebuilds with the new file."""
    dicom_dir, labels, _ = data
    out = tmp_path / "out"
    build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False)
    assert build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False).summary[
        "already_complete"
    ]
    before = out_bytes(out)
    (new,) = add_images(dicom_dir, labels, 1)
    with pytest.raises(BuildError, match=rf"1 new file\(s\) \(e.g. {new}\.dcm\).*--overwrite"):
        build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False)
    with pytest.raises(BuildError, match="labels CSV changed"):
        build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False)
    assert out_bytes(out) == before
    res = build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False, overwrite=True)
    assert new in set(pd.read_parquet(out / "index.parquet")["image_id"])
    assert res.manifest["counts"]["ok"] == res.manifest["counts"]["inputs"]


# ---------------------------------------------------------------- 3. one build per --out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def test_second_build_into_the_same_out_refused_while_the_first_runs(tmp_path):
    """Two real builds at once: the second exits 2 at once naming the holder; the first finishes
    and verifies."""
    dicom_dir, labels, _ = make_dataset(tmp_path / "data", n_patients=8, slices=6, size=96)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "ich_prep", "build", "--dicom-dir", str(dicom_dir), "--labels", str(labels), "--size", "32", "--shard-size", "2", "--folds", "3", "--jobs", "1", "--quiet", "--out", str(out)]  # fmt: skip
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and b"pid" not in _read(out / LOCK):
        time.sleep(0.002)
    first.send_signal(signal.SIGSTOP)  # holds the lock, mid-build, for as long as the test needs
    try:
        assert first.poll() is None, "the first build must still be running"
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    line = second.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"pid {first.pid}" in line and socket.gethostname() in line and "in use" in line
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert verify(str(out)).ok and not (out / LOCK).exists()


def test_stale_lock_of_a_killed_build_is_taken_over(data, tmp_path):
    """A lock file left by a dead process (flock released by the kernel): the next build runs."""
    dicom_dir, labels, _ = data
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}
    (out / LOCK).write_text(json.dumps(holder))
    build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False)
    assert verify(str(out)).ok and not (out / LOCK).exists()


def test_lock_on_a_url_store(tmp_path):
    """fsspec stores (no flock): a live holder refuses, a dead one on this host is taken over."""
    store = Store("memory://locktest/out")
    store.makedirs()
    store.write_bytes(LOCK, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    with pytest.raises(OutDirError, match=f"pid {os.getpid()}"):
        BuildLock(store).__enter__()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.write_bytes(LOCK, json.dumps({"host": socket.gethostname(), "pid": dead.pid}).encode())
    with BuildLock(store) as lock:
        assert lock.took_over["pid"] == dead.pid
        assert json.loads(store.read_bytes(LOCK))["pid"] == os.getpid()
    assert not store.exists(LOCK)


def test_in_process_lock_refuses_a_second_holder(tmp_path):
    """Two BuildLocks on one folder in one process (two open file descriptions): the second refuses."""
    store = Store(tmp_path)
    with BuildLock(store), pytest.raises(OutDirError, match="in use"):
        BuildLock(store).__enter__()
    with BuildLock(store):  # released: free again
        pass


# ---------------------------------------------------------------- 4-5. what the writer writes


def test_dotted_and_spaced_file_names_are_readable(tmp_path):
    """DICOM UIDs as file names (dots) and spaces: every ok row is a sample that verify, stock
    webdataset and the trainer's reader load; the index keeps the original file name."""
    d = tmp_path / "test"
    names = ["1.2.840.113619.2.55.3.dcm", "1.2.840.113619.2.55.4.dcm", "scan one.dcm", "-dash.dcm", "ID_plain.dcm"]  # fmt: skip
    for i, n in enumerate(names):
        write_hu(d / n, phantom_hu(64), z=float(i))
    # a name that is not UTF-8: one error row, not a traceback
    x = write_hu(tmp_path / "x.dcm", phantom_hu(64))
    os.rename(os.fsencode(x), os.path.join(os.fsencode(d), b"bad\xffname.dcm"))
    res = build(cfg_for(d), tmp_path / "out", jobs=1, progress=False)
    assert res.manifest["counts"]["ok"] == 5
    assert res.manifest["counts"]["errors_by_reason"] == {"bad_file_name": 1}
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert index.loc[index["reason"] == "bad_file_name", "path"].tolist() == ["bad\\xffname.dcm"]
    index = index[index["status"] == "ok"]
    assert sorted(index["path"]) == sorted(names)
    ids = dict(zip(index["path"], index["image_id"], strict=True))
    assert ids["ID_plain.dcm"] == "ID_plain" and len(set(ids.values())) == 5
    assert all("." not in i and " " not in i for i in ids.values())
    assert verify(str(tmp_path / "out")).ok
    urls = sorted(glob.glob(str(tmp_path / "out" / "*.tar")))
    keys = {s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert keys == set(ids.values())
    from ich_train.data import Build, decode_sample, read_shard

    b = Build(str(tmp_path / "out"))
    got = {decode_sample(r, b.encoding)[0] for s in b.shards for r in read_shard(s, b.encoding)}
    assert got == set(ids.values()) == set(b.ids(b.shards))


def test_huge_patient_id_is_an_error_row_not_an_unreadable_build(tmp_path):
    """A 100,000-character PatientID: that slice is an error row; the build verifies."""
    d = tmp_path / "test"
    write_hu(d / "ID_ok.dcm", phantom_hu(64))
    write_hu(d / "ID_huge.dcm", phantom_hu(64), patient="ID_" + "x" * 100_000)
    res = build(cfg_for(d), tmp_path / "out", jobs=1, progress=False)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("image_id")
    assert index.loc["ID_ok", "status"] == "ok" and index.loc["ID_huge", "status"] == "error"
    assert len(index.loc["ID_huge", "detail"]) <= 500
    assert res.manifest["counts"]["ok"] == 1 and verify(str(tmp_path / "out")).ok


# ---------------------------------------------------------------- 7-8. FIFOs, orphaned workers


def test_fifo_named_dcm_is_an_error_row_not_a_hang(tmp_path):
    """A FIFO named ID_x.dcm (nobody writes to it): the build finishes; the FIFO is one error row."""
    d = tmp_path / "test"
    write_hu(d / "ID_ok.dcm", phantom_hu(64))
    os.mkfifo(d / "ID_fifo.dcm")
    done = []
    t = threading.Thread(
        target=lambda: done.append(build(cfg_for(d), tmp_path / "out", jobs=1, progress=False)),
        daemon=True,
    )
    t.start()
    t.join(timeout=60)
    assert done, "the build hung on the FIFO"
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("image_id")
    assert index.loc["ID_fifo", "reason"] == "not_regular_file"
    assert index.loc["ID_ok", "status"] == "ok"


def test_workers_exit_when_the_build_is_killed(tmp_path):
    """kill -9 of the build process (--jobs 2): its workers are gone within seconds and nothing
    more is written into --out. 264 images: a build starts a worker per 256 (build.FILES_PER_WORKER)."""
    psutil = pytest.importorskip("psutil")
    dicom_dir, labels, _ = make_dataset(tmp_path / "data", n_patients=33, slices=8, size=256)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ich_prep", "build", "--dicom-dir", str(dicom_dir), "--labels", str(labels), "--size", "64", "--shard-size", "1", "--folds", "3", "--jobs", "2", "--quiet", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(str(out / "_work" / "*.tar.json"))) < 4:
        time.sleep(0.01)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len([w for w in workers if "LokyProcess" in " ".join(w.cmdline())]) == 2
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned workers still running: {[p.pid for p in alive]}"
    snapshot = sorted(os.listdir(out / "_work"))
    time.sleep(1.5)
    assert sorted(os.listdir(out / "_work")) == snapshot
    assert not (out / "manifest.json").exists()


def test_labels_fifo_is_refused_not_a_hang(tmp_path):
    """--labels naming a FIFO: one BuildError at once (hashing it would block forever)."""
    d = tmp_path / "train"
    write_hu(d / "ID_ok.dcm", phantom_hu(64))
    os.mkfifo(tmp_path / "labels.csv")
    done = []

    def run():
        try:
            build(cfg_for(d, tmp_path / "labels.csv"), tmp_path / "out", jobs=1, progress=False)
        except BuildError as e:
            done.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=30)
    assert done and "regular file" in str(done[0])


def test_spacing_mm_without_pixel_spacing_is_an_error_row(tmp_path):
    """--spacing-mm and a slice with no PixelSpacing: that slice is an error row, not a slice
    silently resized to another physical scale."""
    import pydicom

    d = tmp_path / "test"
    write_hu(d / "ID_ok.dcm", phantom_hu(64))
    p = write_hu(d / "ID_nospacing.dcm", phantom_hu(64), z=1.0)
    ds = pydicom.dcmread(p)
    del ds.PixelSpacing
    ds.save_as(p)
    build(cfg_for(d, spacing_mm=1.0), tmp_path / "out", jobs=1, progress=False)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("image_id")
    assert index.loc["ID_nospacing", "reason"] == "missing_tag"
    assert "PixelSpacing" in index.loc["ID_nospacing", "detail"]
    assert index.loc["ID_ok", "status"] == "ok"


def test_resume_keeps_a_users_file_in_work(data, tmp_path, monkeypatch):
    """A file someone put in `_work/` of an interrupted build survives the finishing rerun."""
    dicom_dir, labels, _ = data
    out = tmp_path / "out"
    interrupt_before_manifest(monkeypatch, cfg_for(dicom_dir, labels), out)
    (out / "_work" / "mine.txt").write_text("keep")
    build(cfg_for(dicom_dir, labels), out, jobs=1, progress=False)
    assert (out / "_work" / "mine.txt").read_text() == "keep"
    assert sorted(os.listdir(out / "_work")) == ["mine.txt"]


def test_paths_spelled_differently_name_the_same_build(data, tmp_path, monkeypatch, capsys):
    """`./data/train`, `$PWD/data/train/` and `data/train`: one build (a rerun is complete, not a
    'different config' refusal that only --overwrite, throwing away finished shards, would pass)."""
    from ich_prep.cli import main

    dicom_dir, labels, _ = data
    monkeypatch.chdir(tmp_path)
    base = ["build", "--size", "32", "--shard-size", "4", "--folds", "3", "--jobs", "1", "--quiet"]
    rel = [*base, "--dicom-dir", "./data/train", "--labels", "data/labels.csv", "--out", "out"]
    assert main(rel) == 0
    absolute = [*base, "--dicom-dir", f"{dicom_dir}/", "--labels", str(labels), "--out", f"{tmp_path}/out/"]  # fmt: skip
    capsys.readouterr()
    assert main(absolute) == 0
    assert "already complete" in capsys.readouterr().out


def test_jobs_far_beyond_the_cores_is_refused(data, tmp_path, capsys):
    """--jobs 100000 on a small machine: one line, exit 2, nothing written (it used to hang)."""
    from ich_prep.cli import main

    dicom_dir, labels, _ = data
    args = ["build", "--dicom-dir", str(dicom_dir), "--labels", str(labels), "--out", str(tmp_path / "o"), "--jobs", "100000"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err
        and "--jobs" in err
        and "got 100000" in err
        and not (tmp_path / "o").exists()
    )


def test_labelled_file_with_a_very_long_id_is_matched_to_its_labels(tmp_path):
    """ID_ + 200 letters: its key is hashed (tar names are bounded), and its CSV rows still find it
    (it used to be reported missing_file + unlabeled_file)."""
    d = tmp_path / "train"
    long_id = "ID_" + "L" * 200
    lines = []
    for i, image_id in enumerate([long_id, "ID_short1", "ID_short2", "ID_short3"]):
        write_hu(d / f"{image_id}.dcm", phantom_hu(64), patient=f"ID_p{i}", z=float(i))
        lines += csv_rows(image_id)
    (tmp_path / "labels.csv").write_text("ID,Label\n" + "\n".join(lines) + "\n")
    res = build(
        cfg_for(d, tmp_path / "labels.csv", folds=2), tmp_path / "out", jobs=1, progress=False
    )
    assert res.manifest["counts"]["ok"] == 4 and res.manifest["counts"]["inputs"] == 4
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert index.loc[index["path"] == f"{long_id}.dcm", "image_id"].str.len().item() < 80
