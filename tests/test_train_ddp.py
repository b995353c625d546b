"""Two-process DDP (gloo on CPU) through torchrun."""

import os
import socket
import subprocess
import sys

import pandas as pd

from tests.train_fixtures import make_build


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_finish_and_write_one_run(tmp_path):
    """2 ranks x 2 workers over 1 training shard: no hang, one run folder, one metrics row per epoch."""
    shards = make_build(tmp_path / "shards", folds=2, per_shard=24, size=32)
    out = tmp_path / "runs" / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "ich_train", "fit", "--shards", str(shards), "--out", str(out), "--valid-fold", "1",
        "--model", "resnet10t", "--image-size", "32", "--epochs", "2", "--batch-size", "4",
        "--workers", "2", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    assert {"last.pt", "best.pt", "config.json", "metrics.csv", "metrics.png"} <= {
        p.name for p in out.iterdir()
    }
    m = pd.read_csv(out / "metrics.csv")
    assert list(m["epoch"]) == [0, 1]
    assert list(m["train_images"]) == [24, 24]  # 3 steps x 4 images x 2 ranks each epoch
    assert (
        proc.stdout.count("prior baseline (training label frequencies)") == 1
    )  # rank 0 alone prints
