"""Two-process DDP (gloo on CPU) through torchrun."""

import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from ich_train.checkpoint import load_checkpoint
from tests.train_fixtures import make_build

# real torchrun processes: not in `make test-fast`
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(shards, out, *extra) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "ich_train", "fit", "--shards", str(shards), "--out", str(out), "--valid-fold", "1",
        "--model", "resnet10t", "--image-size", "32", "--epochs", "2", "--batch-size", "4",
        "--workers", "2", "--no-progress", "--checkpoint-every", "1", *extra,
    ]  # fmt: skip


def _kill_then_resume(shards, out, *extra) -> dict:
    """torchrun fit killed with SIGKILL (both ranks) once its first checkpoint exists (inside epoch
    0, with --checkpoint-every 1), then the same command with --resume; the checkpoint the kill left."""
    proc = subprocess.Popen(
        _torchrun(shards, out, *extra), start_new_session=True, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "last.pt").exists():
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = load_checkpoint(out / "last.pt")
    resumed = subprocess.run(
        _torchrun(shards, out, *extra, "--resume"),
        capture_output=True, text=True, timeout=240, env=ENV,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return left


ENV = {**os.environ, "MASTER_ADDR": "127.0.0.1"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """2 ranks x 2 workers over 1 training shard of 48 images, 2 epochs of 6 steps."""
    tmp = tmp_path_factory.mktemp("ddp")
    shards = make_build(tmp / "shards", folds=2, per_shard=48, size=32)
    out = tmp / "runs" / "ddp"
    proc = subprocess.run(
        _torchrun(shards, out), capture_output=True, text=True, timeout=240, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, shards, out, proc.stdout


def test_torchrun_two_processes_finish_and_write_one_run(straight):
    """No hang, one run folder, one metrics row per epoch, rank 0 alone prints."""
    tmp, _, out, stdout = straight
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == ["ddp"]
    assert {"last.pt", "best.pt", "config.json", "metrics.csv", "metrics.png"} <= {
        p.name for p in out.iterdir()
    }
    m = pd.read_csv(out / "metrics.csv")
    assert list(m["epoch"]) == [0, 1]
    assert list(m["train_images"]) == [48, 48]  # 6 steps x 4 images x 2 ranks each epoch
    assert stdout.count("prior baseline (training label frequencies)") == 1


def test_torchrun_killed_inside_an_epoch_resumes_to_the_same_weights(straight):
    """kill -9 of both ranks mid-epoch, then torchrun --resume: the straight run's weights."""
    tmp, shards, ref, _ = straight
    out = tmp / "runs-killed" / "ddp"
    left = _kill_then_resume(shards, out)
    assert left["epoch"] == 0 and left["epoch_progress"]["world"] == 2
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(out / "last.pt")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert list(pd.read_csv(out / "metrics.csv")["train_images"]) == [48, 48]


@pytest.fixture(scope="module", params=["spans", "stream"])
def context_runs(tmp_path_factory, request):
    """fit --context 1 (9 channels, EMA, fp16 with its loss scaler) on a series-aware build under
    2 ranks x 2 workers, with the span loader (what --loader auto picks) or the streaming one: a
    straight run, and the same run killed with SIGKILL inside epoch 0 then resumed."""
    tmp = tmp_path_factory.mktemp("ddp-context")
    shards = make_build(tmp / "shards", folds=2, per_shard=48, size=32, series_len=6)
    extra = ("--context", "1", "--ema", "0.9", "--precision", "fp16", "--loader", request.param)
    ref = tmp / "straight"
    proc = subprocess.run(
        _torchrun(shards, ref, *extra), capture_output=True, text=True, timeout=240, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reader = {"spans": "span loader, 1000 series open", "stream": "streaming loader"}[request.param]
    assert reader in proc.stdout, proc.stdout[-2000:]
    out = tmp / "killed"
    return ref, out, _kill_then_resume(shards, out, *extra)


def test_context_under_torchrun_gives_equal_batches_and_resumes_bit_for_bit(context_runs):
    """--context 1 with 2 ranks in fp16, span or streaming loader: every epoch trains all 48 images
    in equal rank batches (6 steps of 4 x 2), the model takes 9 channels, and kill -9 inside epoch
    0 then --resume ends on the straight run's trained and EMA weights and loss scale, bit for bit."""
    ref, out, left = context_runs
    assert left["epoch"] == 0 and left["epoch_progress"]["world"] == 2
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(out / "last.pt")
    assert a["in_chans"] == b["in_chans"] == 9 and a["config"]["context"] == 1
    assert a["step"] == b["step"] == 12
    assert a["precision"] == "fp16" and a["scaler"] == b["scaler"]
    for weights in ("model", "model_train"):
        for k in a[weights]:
            assert torch.equal(a[weights][k], b[weights][k]), (weights, k)
    for run in (ref, out):
        assert list(pd.read_csv(run / "metrics.csv")["train_images"]) == [48, 48]
