"""A run folder handed over by someone else (a hostile teammate), resumed or written into: no
write through a link planted in it, no hang or traceback on what a resume reads back from it, and
one line with exit 2 for output paths that cannot be folders (fresh hostile pass, issue 23)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ich_prep.errors import UserError
from ich_prep.synth import SynthError, write_synthetic
from ich_train.cli import main
from tests.test_train_cli_errors import one_error_line
from tests.train_fixtures import deadline, make_build

TINY = ["--model", "resnet10t", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
        "--workers", "0", "--no-progress", "--no-report", "--device", "cpu"]  # fmt: skip
RUNTIME = ["--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-fold build and a finished 1-epoch run on it, with its fold-1 predictions."""
    tmp = tmp_path_factory.mktemp("hostile_run")
    build = make_build(tmp / "build", folds=2, per_shard=8, size=32)
    assert main(["fit", "--shards", str(build), "--valid-fold", "1", *TINY, "--out", str(tmp / "run")]) == 0  # fmt: skip
    ckpt = str(tmp / "run" / "best.pt")
    assert main(["evaluate", "--checkpoint", ckpt, "--shards", str(build), "--fold", "1", "--no-report", *RUNTIME]) == 0  # fmt: skip
    return build, tmp / "run"


def _resume(build: Path, run: Path) -> int:
    with deadline(60):
        return main(["fit", "--shards", str(build), "--valid-fold", "1", *TINY, "--out", str(run), "--resume"])  # fmt: skip


def test_resume_never_writes_config_json_through_a_link(finished, tmp_path, capsys):
    """Before: fit --resume wrote config.json with write_text, through a link planted at its name
    (the user's file was overwritten with the run's config). Now it is refused, the file intact."""
    build, run = finished
    victim = tmp_path / "notes.txt"
    victim.write_text("precious\n")
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "config.json").unlink()
    (copy / "config.json").symlink_to(victim)
    assert _resume(build, copy) == 2
    assert "config.json is a symlink" in one_error_line(capsys, "fit")
    assert victim.read_text() == "precious\n"


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _zero(p: Path) -> None:
    p.symlink_to("/dev/zero")


@pytest.mark.parametrize(
    "plant",
    [
        _fifo,
        _zero,
        lambda p: p.write_text('epoch,valid_loss\n"\x1b[2Jx",1\n'),  # text epochs
        lambda p: p.write_text("valid_loss\n1\n"),  # no epoch column
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"\x00\xff" * 1000),
    ],
    ids=["fifo", "dev-zero", "text-epoch", "no-epoch", "empty", "binary"],
)
def test_resume_reads_metrics_csv_bounded_and_checked(finished, tmp_path, capsys, plant):
    """Before: pd.read_csv(metrics.csv) on resume hung on a FIFO, read /dev/zero until killed and
    raised TypeError on text epochs. Now each is one line naming the file, exit 2, at once."""
    build, run = finished
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "metrics.csv").unlink()
    plant(copy / "metrics.csv")
    assert _resume(build, copy) == 2
    line = one_error_line(capsys, "fit")
    assert "metrics.csv" in line and "\x1b" not in line


def _argv(command: str, build: Path, run: Path, out: Path) -> list[str]:
    ckpt, oof = str(run / "best.pt"), str(run / "oof_fold1.parquet")
    return {
        "fit": ["fit", "--shards", str(build), "--valid-fold", "1", *TINY, "--out", str(out)],
        "report": ["report", oof, "--out", str(out)],
        "evaluate": [
            "evaluate",
            "--checkpoint",
            ckpt,
            "--shards",
            str(build),
            "--fold",
            "1",
            "--no-report",
            *RUNTIME,
            "--out",
            str(out / "p.parquet"),
        ],  # fmt: skip
        "predict": [
            "predict",
            "--checkpoint",
            ckpt,
            "--shards",
            str(build),
            *RUNTIME,
            "--out",
            str(out / "s.csv"),
        ],  # fmt: skip
        "seq fit": [
            "seq",
            "fit",
            "--features",
            oof,
            "--valid-fold",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],  # fmt: skip
    }[command]


@pytest.mark.parametrize("command", ["fit", "report", "evaluate", "predict", "seq fit"])
@pytest.mark.parametrize("target", ["nothing", "a/b"])
def test_out_a_link_to_nothing_is_one_line(finished, tmp_path, capsys, command, target):
    """Before: an --out (or a folder above the output file) that is a symlink to nothing passed the
    checks and failed at mkdir: 'I/O error: File exists', exit 1. Now one line naming the link,
    exit 2, and nothing is created at its target."""
    build, run = finished
    link = tmp_path / "out"
    link.symlink_to(tmp_path / target)
    with deadline(60):
        assert main(_argv(command, build, run, link)) == 2
    assert f"{link} is a symlink to nothing" in one_error_line(capsys, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["link", "inside-file", "inside-link"])
def test_synth_out_that_cannot_be_a_folder_is_one_line(tmp_path, where):
    """Before: synth --out a link to nothing or a path inside a file was an I/O error (exit 1)
    saying to run the same command again. Now a SynthError (exit 2) naming the entry in the way."""
    (tmp_path / "f").write_text("keep")
    (tmp_path / "dang").symlink_to(tmp_path / "nothing")
    out = {"link": "dang", "inside-file": "f/sub", "inside-link": "dang/sub"}[where]
    with pytest.raises(SynthError, match="not a folder") as e:
        write_synthetic(tmp_path / out, patients=1, slices_per_series=1)
    assert isinstance(e.value, UserError) and (tmp_path / "f").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dang", "f"]


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay"])
@pytest.mark.parametrize("command", ["fit", "seq fit"])
def test_a_rate_too_large_for_float32_is_one_line(finished, tmp_path, capsys, flag, command):
    """Before: --lr or --weight-decay 1e300 passed the checks (finite) and ended in a traceback:
    ValueError 'Input contains NaN' (fit, seq fit) or RuntimeError 'value cannot be converted to
    type float without overflow' (seq fit's AdamW). Now both are bounded by config.MAX_RATE."""
    build, run = finished
    argv = _argv(command, build, run, tmp_path / "out") + [flag, "1e300"]
    assert main(argv) == 2
    assert flag in one_error_line(capsys, command)
    assert not (tmp_path / "out").exists()


def test_validation_predictions_that_are_nan_are_a_diverged_run(monkeypatch):
    """Before: weights a huge step made NaN gave NaN validation predictions, and compute_metrics
    raised ValueError 'Input contains NaN' (a traceback). Now fit's validation (engine.validate)
    and seq fit's (seq._scores) raise DivergedError, a UserError naming --lr."""
    import numpy as np

    from ich_train import engine, seq
    from ich_train.metrics import DivergedError

    nan = {"ids": ["a", "b"], "probs": np.full((2, 6), np.nan), "labels": np.zeros((2, 6)),
           "base": np.full((2, 6), 0.5)}  # fmt: skip
    monkeypatch.setattr(engine, "predict", lambda *a, **k: dict(nan))
    with pytest.raises(DivergedError, match="--lr") as e:
        engine.validate(None, None, None, dist=None, expected=2)
    assert isinstance(e.value, UserError)
    monkeypatch.setattr(seq, "predict_series", lambda *a, **k: dict(nan))
    with pytest.raises(DivergedError, match="--lr"):
        seq._scores(None, [])


@pytest.mark.parametrize("command", ["evaluate", "predict", "embed"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_nan_weights_is_one_line(finished, tmp_path, capsys, command, value):
    """Before: a checkpoint whose weights are NaN (a diverged run, or edited) made evaluate end in
    ValueError 'Input contains NaN' (a traceback), and predict wrote a submission of the training
    prior with exit 0 ('images the build could not read'). Now checkpoint.load_weights refuses it."""
    import torch

    build, run = finished
    ck = torch.load(run / "best.pt", weights_only=True)
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name] = torch.full_like(ck["model"][name], value)
    bad = tmp_path / "bad.pt"
    torch.save(ck, bad)
    out = tmp_path / "out"
    argv = {
        "evaluate": [
            "evaluate",
            "--checkpoint",
            str(bad),
            "--shards",
            str(build),
            "--fold",
            "1",
            "--no-report",
            "--out",
            str(out),
        ],  # fmt: skip
        "predict": ["predict", "--checkpoint", str(bad), "--shards", str(build), "--out", str(out)],
        "embed": ["embed", "--checkpoint", str(bad), "--shards", str(build), "--out", str(out)],
    }[command]
    assert main([*argv, *RUNTIME]) == 2
    err = capsys.readouterr().err  # predict warns first that this is a train build
    assert "Traceback" not in err and not out.exists()
    assert (
        f"ich-train {command}: {bad}: its weights hold NaN or infinite values"
        in err.splitlines()[-1]
    )


@pytest.mark.parametrize("target", ["empty", "earlier_report"])
def test_a_report_folder_that_is_a_link_is_refused(tmp_path, target):
    """A report folder (`--out`, or report_fold<K> beside the predictions) that is a symlink to a
    folder, empty or holding an earlier report of ours, is one line: nothing is written through it."""
    from ich_train.report import ReportError, check_out_dir

    real = tmp_path / "elsewhere"
    real.mkdir()
    if target == "earlier_report":
        (real / "report.html").write_text("<!doctype html>")
    before = sorted(os.listdir(real))
    (tmp_path / "report_fold0").symlink_to(real)
    with pytest.raises(ReportError, match="symlink to a folder"):
        check_out_dir(tmp_path / "report_fold0")
    assert sorted(os.listdir(real)) == before
