"""What a newcomer sees on a first run: synth's summary, fit's progress in a log."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from ich_prep.cli import main
from ich_train.config import ConfigError
from tests.train_fixtures import make_build


def test_synth_prints_a_summary_and_keeps_json_behind_a_flag(tmp_path, capsys):
    """`ich-prep synth` tells a person what it wrote (patients, series, slices, positives, the
    planted quirks) instead of raw JSON; `--json` still prints the JSON for scripts."""
    argv = ["synth", "--patients", "3", "--slices", "2", "--seed", "4"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert main([*argv, "--out", str(tmp_path / "b"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    train = f"train: {info['patients']['train']} patients, {info['series']['train']} series, {info['train_images']} slices"  # fmt: skip
    assert train in text
    assert f"test:  {info['patients']['test']} patients, {info['series']['test']} series" in text
    assert ", ".join(f"{k} {v}" for k, v in info["positives"].items()) in text
    assert ", ".join(f"{k} {v}" for k, v in info["forms"].items()) in text
    assert info["corrupt"] and f"truncated (unreadable) slices: {info['corrupt'][0]}" in text
    assert sum(info["series"].values()) == sum(info["forms"].values())
    assert "{" not in text


@pytest.mark.slow  # a real ich-train fit process: not in `make test-fast`
def test_fit_progress_into_a_pipe_is_lines_a_log_can_hold(tmp_path):
    """`ich-train fit` whose stderr is a pipe (a log, `| tee`): progress comes as plain lines
    (epoch, step/steps, elapsed, loss, img/s), one per interval (ICH_PROGRESS_EVERY_S, 0 here: every
    step), never tqdm's carriage-return bar that makes one endless line."""
    shards = make_build(tmp_path / "shards", folds=2, per_shard=96, size=32)
    cmd = [sys.executable, "-m", "ich_train", "fit", "--shards", str(shards), "--out", str(tmp_path / "run"),
           "--valid-fold", "1", "--model", "resnet10t", "--image-size", "32", "--epochs", "1",
           "--batch-size", "8", "--workers", "0"]  # fmt: skip
    env = {**os.environ, "ICH_PROGRESS_EVERY_S": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "\r" not in err and "epoch 1/1: train loss" in out
    lines = re.findall(
        r"^epoch 1: step (\d+)/12 \(\d+%\), 0:\d\d elapsed, ~0:\d\d left(.*)$", err, re.M
    )
    assert [int(k) for k, _ in lines] == list(range(1, 12)), err[
        -2000:
    ]  # the 12th: the epoch's line
    # the loss and img/s, computed every 10 steps (engine's log_every), from step 10 on
    assert all(re.fullmatch(r", loss=\d\.\d{4}, img_s=\d+", tail) for _, tail in lines[9:]), lines
    assert re.search(r"^predict: batch \d+/\d+ \(\d+%\), 0:\d\d elapsed", err, re.M), err[-2000:]
    assert max(len(line) for line in err.splitlines()) < 200


def test_a_bad_progress_interval_is_one_line(tmp_path, monkeypatch, capsys):
    """ICH_PROGRESS_EVERY_S that is not 0 to 86400 seconds: ConfigError naming it (exit 2)."""
    from ich_train.progress import every_s

    for bad in ("soon", "-1", "nan", "1e9"):
        monkeypatch.setenv("ICH_PROGRESS_EVERY_S", bad)
        with pytest.raises(ConfigError, match="ICH_PROGRESS_EVERY_S=.*0 to 86400"):
            every_s()
    monkeypatch.setenv("ICH_PROGRESS_EVERY_S", "2.5")
    assert every_s() == 2.5
