"""scripts/two_stage.sh: every fold's CNN, out-of-fold embeddings, every fold's sequence model,
the table, and the stage-2 submission, in one command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.train_fixtures import make_build

# runs scripts/two_stage.sh end to end (fits, embeds, sequence models): not in `make test-fast`
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "two_stage.sh"


def test_two_stage_script_runs_every_fold_and_writes_the_stage_two_submission(tmp_path):
    train = make_build(tmp_path / "train", folds=2, per_shard=24, size=32, series_len=6)
    test = make_build(tmp_path / "test", test=True, per_shard=8, size=32, series_len=4, seed=3)
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "FOLDS": "0 1",
           "FIT_ARGS": "--model resnet10t --image-size 32 --batch-size 8 --epochs 1 --workers 0 --no-progress --no-report",
           "SEQ_ARGS": "--epochs 2 --hidden 8", "PROTOCOL": "pooled"}  # fmt: skip
    cmd = ["bash", str(SCRIPT), str(train), str(tmp_path / "out"), str(test)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [row[0] for row in table] == ["0", "1"]
    assert len(pd.read_csv(tmp_path / "out" / "submission_stage2.csv")) == 6 * 8
    assert any(line.split()[:1] == ["pooled"] for line in r.stdout.splitlines())
    # PROTOCOL=per-cnn on the same CNNs (CNN_DIR): each CNN's own embeddings, its own model
    env = {**env, "PROTOCOL": "per-cnn", "CNN_DIR": str(tmp_path / "out"), "FIT_ARGS": "--epochs 0"}
    r = subprocess.run([*cmd[:3], str(tmp_path / "per"), str(test)], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        not (tmp_path / "per" / "cnn0").exists() and (tmp_path / "per" / "emb1.parquet").is_file()
    )
    ck = torch.load(tmp_path / "per" / "seq1" / "best.pt", weights_only=True)
    assert (
        ck["config"]["protocol"] == "per-cnn" and ck["embed"]["checkpoints"][0]["valid_fold"] == 1
    )
    assert len(pd.read_csv(tmp_path / "per" / "submission_stage2.csv")) == 6 * 8
    env["PROTOCOL"] = "per-fold"
    r = subprocess.run([*cmd[:3], str(tmp_path / "bad"), str(test)], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode != 0 and "PROTOCOL='per-fold': use one of per-cnn, pooled" in r.stderr
