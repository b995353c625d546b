"""End to end on the synthetic RSNA-like set: write_synthetic -> ich_prep build -> fit -> predict."""

import json

import numpy as np
import pandas as pd
import pytest

from ich_prep import LABELS
from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.synth import write_synthetic
from ich_train.checkpoint import load_checkpoint
from ich_train.cli import main

# synthetic DICOMs to a submission: build, fit, predict: not in `make test-fast`
pytestmark = pytest.mark.slow


def test_synthetic_dicoms_to_submission(tmp_path):
    """Real build output trains for 2 epochs and predicts a complete submission for the test build."""
    raw = write_synthetic(tmp_path / "raw", patients=8, seed=3)
    train_cfg = BuildConfig(
        dicom_dir=raw["train_dir"], labels=raw["labels_csv"], size=64, folds=2, shard_size=16
    )
    build(train_cfg, tmp_path / "train", jobs=1, progress=False)
    build(
        BuildConfig(dicom_dir=raw["test_dir"], size=64, shard_size=16),
        tmp_path / "test",
        jobs=1,
        progress=False,
    )
    run = tmp_path / "run"
    assert main(["fit", "--shards", str(tmp_path / "train"), "--out", str(run), "--valid-fold", "1",
                 "--model", "resnet10t", "--image-size", "64", "--epochs", "2", "--batch-size", "8",
                 "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    m = pd.read_csv(run / "metrics.csv")
    assert list(m["epoch"]) == [0, 1] and np.isfinite(m["valid_loss"]).all()
    data = load_checkpoint(run / "best.pt")["data"]  # what predict checks a test build against
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert data["windows"] == manifest["config"]["windows"] and len(data["windows"]) == 3
    sub_path = tmp_path / "submission.csv"
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--shards", str(tmp_path / "test"),
                 "--out", str(sub_path), "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    sub = pd.read_csv(sub_path)
    index = pd.read_parquet(tmp_path / "test" / "index.parquet")
    assert set(sub["ID"]) == {f"{i}_{lab}" for i in index["image_id"] for lab in LABELS}
    assert len(sub) == 6 * index["image_id"].nunique() and sub["Label"].between(0, 1).all()
