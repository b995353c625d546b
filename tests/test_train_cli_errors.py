"""ich-train's error contract (issue 11): a user mistake ends in one line on stderr, `ich-train
<command>: <what, which file or flag, the fix>`, and exit 2, never a traceback. Ctrl-C during fit is
one line saying how --resume continues (exit 130). Most cases run main() in-process; the ones
where something else could reach the terminal (torch warnings, DataLoader workers, signals) run
the real command in a subprocess."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.errors import UserError
from ich_prep.synth import write_synthetic
from ich_train.checkpoint import CheckpointError, load_checkpoint
from ich_train.cli import main
from ich_train.config import ConfigError
from ich_train.data import ShardError
from ich_train.submission import SubmissionError
from tests.train_fixtures import deadline, make_build

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet10t", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
        "--valid-fold", "1", "--no-progress"]  # fmt: skip


def one_error_line(capsys, command: str) -> str:
    """The single stderr line of a failed command (no traceback, nothing else)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"ich-train {command}: "), err
    return lines[0]


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """The real `python -m ich_train ...`: what reaches a terminal."""
    return subprocess.run([sys.executable, "-m", "ich_train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def assert_one_line(r: subprocess.CompletedProcess, command: str, rc: int = 2) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == rc, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith(f"ich-train {command}: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-fold train build, a test build and a 1-epoch checkpoint (resnet10t, 32 px)."""
    tmp = tmp_path_factory.mktemp("errors")
    train = make_build(tmp / "train", folds=2, per_shard=16, size=32)
    test = make_build(tmp / "test", test=True, per_shard=8, size=32, seed=3)
    assert main(["fit", "--shards", str(train), "--out", str(tmp / "run"), *TINY, "--workers", "0"]) == 0  # fmt: skip
    return tmp, train, test, tmp / "run" / "last.pt"


def test_user_errors_are_one_base_class():
    """Every ich-train error a user can fix is a UserError, and keeps its old base class."""
    assert issubclass(CheckpointError, ValueError) and issubclass(ConfigError, ValueError)
    assert issubclass(ShardError, RuntimeError) and issubclass(SubmissionError, ValueError)
    for cls in (CheckpointError, ConfigError, ShardError, SubmissionError):
        assert issubclass(cls, UserError)


# ---- checkpoints: read like any file someone hands over


def _evil_pickle(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps(Evil()))


def _bad_checkpoint(kind: str, tmp: Path, good: Path) -> Path:
    path = tmp / f"{kind}.pt"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "format_only":
        torch.save({"format": 1}, path)
    elif kind == "other_model":  # resnet10t weights under the name resnet18
        ckpt = load_checkpoint(good)
        ckpt["config"]["model"] = "resnet18"
        torch.save(ckpt, path)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "fifo":
        os.mkfifo(path)  # nobody writes to it: a read would block forever
    return path


@pytest.mark.parametrize(
    "kind, says",
    [
        ("text", "is not an ich-train checkpoint"),
        ("format_only", "incomplete ich-train checkpoint (no model, config"),
        ("other_model", "weights do not fit --model resnet18"),
        ("truncated", "is not an ich-train checkpoint"),
        ("fifo", "is not a regular file"),
    ],
)
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_bad_checkpoint_is_one_line(trained, tmp_path, capsys, kind, says, command):
    """A text file, a {'format': 1} dict, another model's weights, a cut file: exit 2, one line
    naming the file and saying to pass a checkpoint written by ich-train fit; nothing written."""
    _, train, test, good = trained
    path = _bad_checkpoint(kind, tmp_path, good)
    if command == "evaluate":
        args = ["evaluate", "--checkpoint", str(path), "--shards", str(train), "--fold", "1",
                "--out", str(tmp_path / "oof.parquet")]  # fmt: skip
    else:
        args = ["predict", "--checkpoint", str(path), "--shards", str(test), "--out", str(tmp_path / "s.csv")]  # fmt: skip
    with deadline(60):
        assert main([*args, "--workers", "0", "--no-progress"]) == 2
    line = one_error_line(capsys, command)
    assert says in line and str(path) in line and "ich-train fit" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_pickle_checkpoint_is_never_unpickled(trained, tmp_path):
    """A pickle whose loading would run code: refused without running it, one line and no torch
    warning on the real terminal (subprocess)."""
    _, train, _, _ = trained
    marker = tmp_path / "pwned"
    _evil_pickle(tmp_path / "evil.pt", marker)
    r = run_cli("evaluate", "--checkpoint", str(tmp_path / "evil.pt"), "--shards", str(train),
                "--fold", "1", "--workers", "0", "--no-progress")  # fmt: skip
    line = assert_one_line(r, "evaluate")
    assert "pickled Python objects" in line and "never unpickled" in line
    assert not marker.exists()


def test_resume_from_a_damaged_last_pt_is_one_line(trained, tmp_path, capsys):
    """--resume whose last.pt is a text file: exit 2, one line naming it."""
    _, train, _, good = trained
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_text("not a checkpoint")
    assert main(["fit", "--shards", str(train), "--out", str(run), *TINY, "--resume"]) == 2
    assert f"{run / 'last.pt'} is not an ich-train checkpoint" in one_error_line(capsys, "fit")


# ---- fit flags


def test_pretrained_text_file_is_one_line_and_writes_nothing(trained, tmp_path, capsys):
    """--pretrained a text file: exit 2, one line naming the flag; no run folder is made."""
    _, train, _, _ = trained
    (tmp_path / "w.pth").write_text("weights, honest\n")
    out = tmp_path / "run"
    assert main(["fit", "--shards", str(train), "--out", str(out), *TINY,
                 "--pretrained", str(tmp_path / "w.pth")]) == 2  # fmt: skip
    assert f"--pretrained {tmp_path / 'w.pth'} is not a weights file" in one_error_line(
        capsys, "fit"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--model", "no_such_model"], "--model 'no_such_model' is not a timm model"),
        (["--opt", "adamm"], "--opt 'adamm' is not a timm optimizer"),
        (["--device", "foo"], "--device 'foo' is not a device torch knows"),
        (["--lr", "nan"], "--lr must be a number in (0, 100], got nan"),
        (["--lr", "inf"], "--lr must be a number in (0, 100], got inf"),
        (["--lr=-1e-3"], "--lr must be a number in (0, 100]"),
        (["--weight-decay", "-0.1"], "--weight-decay must be a number in [0, 100]"),
        (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0"),
        (["--min-lr-ratio", "2"], "--min-lr-ratio must be a number in [0, 1]"),
        (["--hflip", "1.5"], "--hflip must be a number in [0, 1]"),
        (["--drop-rate", "nan"], "--drop-rate must be a number in [0, 1)"),
        (["--pos-weight", "1,1,1,1,1,-2"], "--pos-weight must be a finite number >= 0"),
        (["--ema", "nan"], "--ema must be in [0, 1)"),
        (["--seed", "-1"], "argument --seed: must be from 0 to 4294967295, got -1"),
        (["--shuffle-buffer", "0"], "argument --shuffle-buffer: must be from 1 to 100000"),
        (["--batch-size", "0"], "argument --batch-size: must be from 1 to 4096"),
        (["--workers", "-1"], "argument --workers: must be from 0 to 64"),
        (["--lr", "fast"], "argument --lr: invalid float value"),
    ],
)
def test_bad_fit_flags_are_one_line(trained, tmp_path, capsys, flags, says):
    """An unknown model or device, a non-finite or out-of-range number: exit 2, one line naming
    the flag, before anything is written."""
    _, train, _, _ = trained
    out = tmp_path / "run"
    assert main(["fit", "--shards", str(train), "--out", str(out), *TINY, "--workers", "0", *flags]) == 2  # fmt: skip
    assert says in one_error_line(capsys, "fit")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line(trained, tmp_path, capsys):
    """--device cuda on a machine without one: exit 2, one line with the fix (--device cpu)."""
    _, train, _, good = trained
    assert main(["fit", "--shards", str(train), "--out", str(tmp_path / "r"), *TINY, "--device", "cuda"]) == 2  # fmt: skip
    assert "torch sees no GPU here; use --device cpu" in one_error_line(capsys, "fit")
    assert main(["evaluate", "--checkpoint", str(good), "--shards", str(train), "--fold", "1",
                 "--device", "cuda"]) == 2  # fmt: skip
    assert "--device cuda" in one_error_line(capsys, "evaluate")


def test_fit_out_an_existing_file_is_one_line(trained, tmp_path, capsys):
    """fit --out a file (or a path under one): exit 2, one line; the file is untouched."""
    _, train, _, _ = trained
    (tmp_path / "f").write_text("mine")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        assert main(["fit", "--shards", str(train), "--out", str(out), *TINY]) == 2
        assert f"--out {out} cannot be a run folder" in one_error_line(capsys, "fit")
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("name", ["config.json", "metrics.csv", "metrics.png"])
def test_fit_out_a_folder_of_someone_elses_files_is_one_line(trained, tmp_path, capsys, name):
    """Before: a new fit into a folder holding someone's config.json / metrics.csv / metrics.png
    overwrote it. Now exit 2, one line naming the file, and the file untouched."""
    _, train, _, _ = trained
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / name).write_text("mine")
    assert main(["fit", "--shards", str(train), "--out", str(tmp_path / "theirs"), *TINY]) == 2
    assert f"already holds {name}, not written by an ich-train run" in one_error_line(capsys, "fit")
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == [name]
    assert (tmp_path / "theirs" / name).read_text() == "mine"


def test_fit_restarts_a_run_of_ours_stopped_before_its_first_checkpoint(trained, tmp_path):
    """A run folder with our config.json and metrics but no last.pt (stopped in its first epoch)
    is started again by the same fit command."""
    tmp, train, _, _ = trained
    out = tmp_path / "again"
    out.mkdir()
    for name in ("config.json", "metrics.csv", "metrics.png"):
        shutil.copyfile(tmp / "run" / name, out / name)
    assert main(["fit", "--shards", str(train), "--out", str(out), *TINY, "--workers", "0"]) == 0
    assert (out / "last.pt").exists()


def test_predict_out_a_folder_is_one_line_and_leaves_nothing(trained, tmp_path, capsys):
    """predict --out a folder: exit 2 before predicting, and no <folder>.partial left beside it."""
    _, _, test, good = trained
    out = tmp_path / "runs"
    out.mkdir()
    assert main(["predict", "--checkpoint", str(good), "--shards", str(test), "--out", str(out),
                 "--workers", "0", "--no-progress"]) == 2  # fmt: skip
    assert f"--out {out} is a folder" in one_error_line(capsys, "predict")
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and not list(out.iterdir())


# ---- damaged shards read in DataLoader workers


@pytest.fixture(scope="module")
def damaged(trained):
    """A copy of the train build whose fold-0 shard is garbage (the manifest still lists it)."""
    tmp, train, _, _ = trained
    bad = tmp / "damaged"
    shutil.copytree(train, bad)
    (bad / "train-f0-00000.tar").write_bytes(os.urandom(4096))
    return bad


def test_shard_error_in_a_loader_worker_is_its_own_message(trained, damaged):
    """A ShardError raised inside a DataLoader worker: the real command prints the original
    one-line message, not torch's wrapper with the worker's traceback."""
    _, _, _, good = trained
    r = run_cli("evaluate", "--checkpoint", str(good), "--shards", str(damaged), "--fold", "0",
                "--workers", "1", "--no-progress")  # fmt: skip
    line = assert_one_line(r, "evaluate")
    assert line.startswith(f"ich-train evaluate: {damaged / 'train-f0-00000.tar'} is not a readable tar file")  # fmt: skip
    assert "worker" not in line


def test_shard_error_in_a_training_worker_is_one_line(damaged, tmp_path, capsys):
    """The same during fit (training loader, one worker): exit 2, one line."""
    assert main(["fit", "--shards", str(damaged), "--out", str(tmp_path / "r"), *TINY, "--workers", "1"]) == 2  # fmt: skip
    line = one_error_line(capsys, "fit")
    # the span loader (the default for a build with spans) reads sample by sample: it names the
    # shard and the sample whose bytes are not there
    assert "train-f0-00000.tar: sample ID_" in line and "run `ich-prep verify`" in line
    assert "Original" not in line


# ---- Ctrl-C


@pytest.mark.slow  # a real fit interrupted and resumed: not in `make test-fast`
def test_ctrl_c_during_fit_says_how_to_resume_and_resume_finishes(tmp_path):
    """SIGINT to the whole process group (what Ctrl-C does) inside fit, with a loader worker:
    exit 130, one line naming last.pt and --resume; the same command with --resume finishes."""
    root = make_build(tmp_path / "shards", folds=2, per_shard=24, size=32)
    out = tmp_path / "run"
    args = ["fit", "--shards", str(root), "--out", str(out), "--model", "resnet10t", "--image-size", "32",
            "--batch-size", "8", "--epochs", "2", "--valid-fold", "1", "--workers", "1", "--no-progress",
            "--checkpoint-every", "1"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "ich_train", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (out / "last.pt").exists():
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("ich-train fit: interrupted; ") and "--resume" in lines[0]
    assert str(out / "last.pt") in lines[0]
    assert not list(out.glob("*.partial"))
    assert main([*args, "--resume"]) == 0
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [0, 1]


# ---- resume against another build (same DICOMs, other --size)


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    """Two ich-prep builds of the same synthetic DICOMs at --size 32 and 48, and a 1-epoch run on
    the first."""
    tmp = tmp_path_factory.mktemp("sizes")
    raw = write_synthetic(tmp / "raw", patients=6, seed=2, slices_per_series=4, test_patients=1)
    for size in (32, 48):
        cfg = BuildConfig(dicom_dir=raw["train_dir"], labels=raw["labels_csv"], size=size, folds=2, shard_size=16)  # fmt: skip
        build(cfg, tmp / f"b{size}", jobs=1, progress=False)
    run = tmp / "run"
    assert main(["fit", "--shards", str(tmp / "b32"), "--out", str(run), "--model", "resnet10t",
                 "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--valid-fold", "1",
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    return tmp, run


def _resume(run: Path, shards: Path) -> int:
    return main(["fit", "--shards", str(shards), "--out", str(run), "--model", "resnet10t",
                 "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--valid-fold", "1",
                 "--workers", "0", "--no-progress", "--resume"])  # fmt: skip


def test_resume_refuses_a_build_of_the_same_dicoms_at_another_size(two_sizes, capsys):
    """Same DICOMs, same index, other --size: the fingerprint covers the build's config, so the
    resume is refused in one line naming both builds and the difference."""
    tmp, run = two_sizes
    import pandas as pd

    from ich_prep.manifest import SPAN_COLUMNS

    # the two indexes differ only in the samples' byte spans: images, labels and folds are the
    # same, so an index-only fingerprint (the old one, before spans) could not tell them apart
    idx = [pd.read_parquet(tmp / b / "index.parquet").drop(columns=list(SPAN_COLUMNS)) for b in ("b32", "b48")]  # fmt: skip
    pd.testing.assert_frame_equal(idx[0], idx[1])
    assert _resume(run, tmp / "b48") == 2
    line = one_error_line(capsys, "fit")
    assert str(tmp / "b48") in line and str(tmp / "b32") in line and "size 32 -> 48" in line


def test_resume_accepts_the_same_build_moved(two_sizes, capsys):
    """The same build in another folder is the same data: --shards may move."""
    tmp, run = two_sizes
    moved = tmp / "moved"
    if not moved.exists():
        shutil.copytree(tmp / "b32", moved)
    assert _resume(run, moved) == 0, capsys.readouterr().err


def test_old_checkpoints_compare_their_recorded_size(two_sizes, tmp_path, capsys):
    """A checkpoint from before build descriptions (fingerprint = index sha256) still resumes on
    its build, and is refused for the other size through the size it recorded."""
    tmp, run = two_sizes
    old = tmp_path / "old"
    shutil.copytree(run, old)
    ckpt = load_checkpoint(old / "last.pt")
    data = ckpt["data"]
    ckpt["data"] = {"fingerprint": data["build"]["index_sha256"], "encoding": data["encoding"],
                    "size": data["size"], "windows": data["windows"], "spacing_mm": data["spacing_mm"]}  # fmt: skip
    torch.save(ckpt, old / "last.pt")
    assert _resume(old, tmp / "b48") == 2
    assert "size 32 -> 48" in one_error_line(capsys, "fit")
    assert _resume(old, tmp / "b32") == 0


# ---- predict on a training build, evaluate's JSON


def test_predict_on_a_training_build_warns_naming_the_split(trained, tmp_path, capsys):
    """A submission from a labelled build is written, with one warning line naming the split;
    a test build gives no warning."""
    _, train, test, good = trained
    common = ["--checkpoint", str(good), "--workers", "0", "--no-progress"]
    assert main(["predict", *common, "--shards", str(train), "--out", str(tmp_path / "a.csv")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "'train'" in err
    assert main(["predict", *common, "--shards", str(test), "--out", str(tmp_path / "b.csv")]) == 0
    assert capsys.readouterr().err == ""


def test_evaluate_prints_strict_json_with_null_for_nan(trained, tmp_path, capsys):
    """A fold without positives has NaN AUCs: stdout is strict JSON (null), parseable as is."""
    _, _, _, good = trained
    negatives = make_build(
        tmp_path / "neg", folds=2, per_shard=8, size=32, positive_rate=0.0, seed=4
    )
    assert main(["evaluate", "--checkpoint", str(good), "--shards", str(negatives), "--fold", "1",
                 "--out", str(tmp_path / "oof.parquet"), "--workers", "0", "--no-progress"]) == 0  # fmt: skip

    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    m = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert m["valid_auc_any"] is None and m["valid_auc_mean"] is None
    assert isinstance(m["valid_loss"], float)
