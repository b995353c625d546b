"""`ich-prep` stops in one line: a user mistake exits 2 naming the flag or file, an I/O error 1,
Ctrl-C 130; never a traceback, and a stopped build resumes."""

from __future__ import annotations

import errno
import glob
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ich_prep.build as build_mod
import ich_prep.cli as cli
import ich_prep.shards as shards_mod
from ich_prep.build import BuildError
from ich_prep.cli import check_build_paths, main
from ich_prep.config import ConfigError
from ich_prep.errors import UserError
from ich_prep.labels import LabelsError
from ich_prep.manifest import FormatError
from ich_prep.preview import PreviewError
from ich_prep.synth import SynthError, write_synthetic

CLI = [sys.executable, "-m", "ich_prep.cli"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic set: (dicom dir, labels CSV)."""
    info = write_synthetic(tmp_path_factory.mktemp("synth"), patients=4, slices_per_series=4)
    return Path(info["train_dir"]), Path(info["labels_csv"])


def build_args(synth, out, *extra) -> list[str]:
    dicom_dir, labels = synth
    return ["build", "--dicom-dir", str(dicom_dir), "--labels", str(labels), "--out", str(out),
            "--size", "32", "--shard-size", "4", "--folds", "2", "--jobs", "1", "--quiet", *extra]  # fmt: skip


def one_line(err: str) -> str:
    """The single line a stopped command printed; fails if there is more (or a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_every_user_error_is_one_class():
    """The errors the commands raise for user mistakes share the one base main() catches."""
    for cls in (BuildError, ConfigError, LabelsError, FormatError, PreviewError, SynthError):
        assert issubclass(cls, UserError), cls
    for cls in (ConfigError, LabelsError, FormatError, PreviewError, SynthError):
        assert issubclass(cls, ValueError), cls  # callers that caught ValueError still do


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flag, value, says",
    [("--limit", "-1", ">= 1"), ("--limit", "0", ">= 1"), ("--fraction", "0", "(0, 1]"),
     ("--fraction", "1.5", "(0, 1]"), ("--spacing-mm", "inf", "0.1 to 10"),
     ("--spacing-mm", "nan", "0.1 to 10"), ("--spacing-mm", "0.001", "0.1 to 10"),
     ("--spacing-mm", "50", "0.1 to 10"), ("--seed", "-1", "0 to 4294967295"),
     ("--seed", str(2**32), "0 to 4294967295"), ("--jobs", "0", "from 1 to 1024"),
     ("--jobs", "-3", "from 1 to 1024"), ("--size", "5000", "16 to 4096"),
     ("--shard-size", "1000000", "1 to 100000"), ("--folds", "101", "2 to 100"),
     ("--max-errors", "-1", "at least 0"), ("--jobs", "two", "not a whole number")],
)  # fmt: skip
def test_bad_build_flag_refused(synth, tmp_path, capsys, flag, value, says):
    """Each out-of-range flag: exit 2, one line naming the flag and the allowed range, no output."""
    out = tmp_path / "out"
    assert main(build_args(synth, out, flag, value)) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("ich-prep build: ") and flag in line and says in line, line
    assert not out.exists()


def test_usage_error_is_one_line(capsys):
    """A missing required flag: argparse's error, in one line, exit 2."""
    assert main(["build", "--out", "x"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--dicom-dir" in line and "ich-prep build --help" in line


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("case", ["labels_missing", "labels_folder", "out_file", "dicom_missing", "dicom_file", "dicom_empty"])  # fmt: skip
def test_bad_paths_refused_before_anything_is_written(synth, tmp_path, capsys, case):
    """Missing or wrong-kind --labels/--out/--dicom-dir, a --dicom-dir without .dcm files: exit 2,
    one line naming the path, and nothing created (no out/_work left behind)."""
    dicom_dir, labels = synth
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no dicoms here")
    (tmp_path / "afile").write_text("x")
    bad = {
        "labels_missing": ("--labels", tmp_path / "nope.csv", "does not exist"),
        "labels_folder": ("--labels", tmp_path, "is a folder"),
        "out_file": ("--out", tmp_path / "afile", "is an existing file"),
        "dicom_missing": ("--dicom-dir", tmp_path / "nope", "is not a folder"),
        "dicom_file": ("--dicom-dir", tmp_path / "afile", "is not a folder"),
        "dicom_empty": ("--dicom-dir", empty, "holds no .dcm files"),
    }
    flag, path, says = bad[case]
    args = build_args(synth, out)
    args[args.index(flag) + 1] = str(path)
    before = sorted(os.listdir(tmp_path))
    assert main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{flag} {path} {says}" in line, line
    assert sorted(os.listdir(tmp_path)) == before


def test_urls_skip_the_local_checks():
    """fsspec URLs are not local paths: nothing is checked (or fetched) before build()."""
    check_build_paths("s3://bucket/stage_2_train", "s3://bucket/train.csv", "s3://bucket/out")


# ---------------------------------------------------------------- dask scheduler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_refused_fast(tmp_path):
    """`--backend dask --scheduler tcp://127.0.0.1:<closed>`: exit 2 in seconds, one line. The
    DICOM folder holds one real file of its own (it used to be the working directory, which held
    .dcm files only where the virtualenv with pydicom's test files lived inside the checkout)."""
    pytest.importorskip("dask.distributed")
    from tests.conftest import phantom_hu, write_hu

    write_hu(tmp_path / "dicom" / "ID_000000001.dcm", phantom_hu(64))
    addr = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    r = subprocess.run(
        [*CLI, "build", "--dicom-dir", str(tmp_path / "dicom"), "--out", str(tmp_path / "never"),
         "--backend", "dask", "--scheduler", addr],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert time.perf_counter() - t0 < 20
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert f"--scheduler {addr}" in line and "Connection refused" in line


def test_silent_scheduler_times_out_with_one_line(synth, tmp_path, capsys, monkeypatch):
    """A port that accepts TCP but never speaks dask: refused after the client's timeout."""
    pytest.importorskip("dask.distributed")
    monkeypatch.setattr(cli, "SCHEDULER_TIMEOUT_S", 1.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        addr = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        t0 = time.perf_counter()
        rc = main(build_args(synth, tmp_path / "out", "--backend", "dask", "--scheduler", addr))
    assert rc == 2 and time.perf_counter() - t0 < 20
    line = one_line(capsys.readouterr().err)
    assert f"--scheduler {addr}: no dask scheduler answered" in line


def test_build_through_a_reachable_scheduler(synth, tmp_path, capsys):
    """The checks let a real scheduler through: the build runs on it, same bytes as a local one."""
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:  # fmt: skip
        dask_args = ["--backend", "dask", "--scheduler", cluster.scheduler_address]
        assert main(build_args(synth, tmp_path / "dask", *dask_args)) == 0
    assert main(build_args(synth, tmp_path / "local")) == 0
    assert tree(tmp_path / "dask") == tree(tmp_path / "local")


def test_scheduler_without_dask_backend_refused(synth, tmp_path, capsys):
    """--scheduler with the default loky backend would be ignored: refused instead."""
    assert main(build_args(synth, tmp_path / "o", "--scheduler", "tcp://h:8786")) == 2
    assert "needs --backend dask" in one_line(capsys.readouterr().err)


# ---------------------------------------------------------------- labels CSV


@pytest.mark.parametrize(
    "content, says",
    [(b"Id,Lbl\nID_63eb1e259_epidural,0\n", "line 1 (the header) is 'Id,Lbl'"),
     (b"ID,Other\nID_63eb1e259_epidural,0\n", "line 1 (the header) is 'ID,Other'"),
     (b"ID\nID_63eb1e259_epidural\n", "line 1 (the header) is 'ID'"),
     (b"", "empty"),
     (b"ID,Label\n", "no rows"),
     (b"ID,Label\nID_63eb1e259_epidural,0\nID_63eb1e259_any\n", "line 3 has 1 field(s)"),
     (b"ID,Label\nID_63eb1e259_epidural,0,1\n", "line 2 has 3 field(s)"),
     (b"ID,Label\nID_63eb1e259_epidural,0\nID_63eb1e259_a\xffny,0\n", "line 3 has a byte that is not UTF-8")],
)  # fmt: skip
def test_malformed_labels_csv_refused(synth, tmp_path, capsys, content, says):
    """A CSV that is not ID,Label rows: exit 2, one line naming the CSV, the line and the format."""
    csv = tmp_path / "labels.csv"
    csv.write_bytes(content)
    args = build_args(synth, tmp_path / "out")
    args[args.index("--labels") + 1] = str(csv)
    assert main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert f"--labels {csv}: " in line and says in line, line
    assert "ID,Label" in line and "ID_63eb1e259_epidural,0" in line
    assert not (tmp_path / "out").exists()  # refused before --out is created


# ---------------------------------------------------------------- synth


@pytest.mark.parametrize("flag, value", [("--patients", "0"), ("--slices", "0"), ("--patients", "-2"), ("--seed", "-1")])  # fmt: skip
def test_synth_bad_counts_refused(tmp_path, capsys, flag, value):
    """`ich-prep synth --patients 0` / `--slices 0`: exit 2, one line naming the flag."""
    assert main(["synth", "--out", str(tmp_path / "s"), flag, value]) == 2
    assert flag in one_line(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def test_synth_out_file_refused(tmp_path, capsys):
    """`ich-prep synth --out FILE`: exit 2, one line naming it; the file is untouched."""
    (tmp_path / "f").write_text("keep")
    assert main(["synth", "--out", str(tmp_path / "f")]) == 2
    assert f"--out {tmp_path / 'f'} is a file, not a folder" in one_line(capsys.readouterr().err)
    assert (tmp_path / "f").read_text() == "keep"


# ---------------------------------------------------------------- through a real process


@pytest.mark.parametrize(
    "args, says",
    [(["build", "--dicom-dir", "{d}", "--labels", "{l}", "--out", "{o}", "--limit", "-1"], "--limit"),
     (["build", "--dicom-dir", "{d}", "--labels", "{o}/none.csv", "--out", "{o}"], "--labels"),
     (["build", "--dicom-dir", "{d}", "--labels", "{e}", "--out", "{o}/x"], "empty"),
     (["build", "--dicom-dir", "{d}", "--labels", "{l}", "--out", "{o}", "--spacing-mm", "nan"], "--spacing-mm"),
     (["synth", "--out", "{o}", "--patients", "0"], "--patients")],
)  # fmt: skip
def test_no_traceback_reaches_the_terminal(synth, tmp_path, args, says):
    """The real command: exit 2 and one line on stderr, no traceback."""
    (tmp_path / "empty.csv").write_bytes(b"")
    subs = {"d": str(synth[0]), "l": str(synth[1]), "o": str(tmp_path / "o"), "e": str(tmp_path / "empty.csv")}  # fmt: skip
    r = subprocess.run([*CLI, *(a.format(**subs) for a in args)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert says in one_line(r.stderr)


# ---------------------------------------------------------------- Ctrl-C and a full disk


@pytest.mark.slow  # a real build interrupted and resumed: not in `make test-fast`
def test_ctrl_c_ends_in_one_line_and_the_rerun_resumes(tmp_path):
    """SIGINT to a compiling `ich-prep build` (the whole process group, as a terminal's Ctrl-C):
    exit 130, the last stderr line says it was interrupted and that a rerun resumes; the same
    command then finishes and `ich-prep verify` passes."""
    data = tmp_path / "D"
    r = subprocess.run([*CLI, "synth", "--out", str(data), "--patients", "10", "--slices", "8"], capture_output=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    cmd = [*CLI, "build", "--dicom-dir", str(data / "stage_2_train"), "--labels", str(data / "stage_2_train.csv"),
           "--out", str(out), "--jobs", "2", "--shard-size", "8"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and not glob.glob(str(out / "*.tar*")) and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the build ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ich-prep build: interrupted;") and f"finished shards in {out} are kept" in last  # fmt: skip
    assert "run the same command again to resume" in last
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    verified = subprocess.run([*CLI, "verify", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert not list(out.glob("*.partial"))


def test_ctrl_c_in_process_returns_130(synth, tmp_path, capsys, monkeypatch):
    """main() itself turns a KeyboardInterrupt into one line and 130 (no traceback in a caller)."""

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "build", interrupted)
    assert main(build_args(synth, tmp_path / "out")) == 130
    assert "interrupted; finished shards in" in one_line(capsys.readouterr().err)


def test_full_disk_ends_in_one_line_and_the_rerun_is_byte_identical(synth, tmp_path, capsys, monkeypatch):  # fmt: skip
    """ENOSPC while writing the second shard (injected: no tmpfs to fill here): exit 1, one line
    naming the error and the file; the rerun resumes and equals a clean build byte for byte."""
    real = shards_mod.write_tar
    calls = []

    def full_disk(f, samples, encoding):
        calls.append(f.name)
        if len(calls) == 1:
            return real(f, samples, encoding)
        f.write(b"\0" * 512)  # what a full disk leaves: a cut temporary file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)

    out, clean = tmp_path / "out", tmp_path / "clean"
    monkeypatch.setattr(shards_mod, "write_tar", full_disk)
    assert main(build_args(synth, out)) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("ich-prep build: I/O error: No space left on device (ENOSPC): ")
    assert str(calls[1]) in line and "run the same command again to resume" in line
    assert len(list(out.glob("*.tar"))) == 1 and not (out / "manifest.json").exists()
    monkeypatch.undo()
    assert main(build_args(synth, out)) == 0
    assert "shards resumed: 1" in capsys.readouterr().out
    assert main(build_args(synth, clean)) == 0
    assert tree(out) == tree(clean) and not list(out.glob("*.partial"))


def test_other_io_errors_exit_1_in_one_line(tmp_path, capsys, monkeypatch):
    """An OSError in any command (here synth's writes): exit 1, one line with errno text and path."""

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "s"))

    monkeypatch.setattr("ich_prep.synth.write_synthetic", denied)
    assert main(["synth", "--out", str(tmp_path / "s")]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("ich-prep synth: I/O error: Permission denied (EACCES): ")
