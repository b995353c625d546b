"""The whole series recipe on the real RSNA samples: build (labelled train, unlabelled test), then
scripts/two_stage.sh with 2.5D CNNs (--context 1) over two folds: a CNN per fold, embeddings,
a sequence model per fold (the default per-CNN protocol), the per-fold and pooled table, and the
stage-2 submission. Tiny settings: this shows the recipe runs on real files without an error, not
how well it scores. Skipped without ../shared/realdata/rsna_samples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ich_prep.cli import main as prep
from ich_prep.manifest import open_build
from tests.conftest import REAL_SAMPLES

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "two_stage.sh"
LABELS = "Riku-Sasaki_kaggle-rsna-intracranial-hemorrhage-detection/labels_extracted.csv"
TEST_SERIES = (
    "ahmad-alqaisi215_Automated-Brain-Hemorrhage-Detection-in-CT-Scans/series_ID_e17326e0bd"
)


def _run(cmd, env, timeout=900):
    """Run `cmd` in its own process group; the whole group is killed on every way out."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, out, err


@pytest.mark.skipif(not REAL_SAMPLES.is_dir(), reason="no ../shared/realdata/rsna_samples")
def test_the_series_recipe_runs_on_the_real_samples(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    args = ["--size", "64", "--shard-size", "16", "--jobs", "1", "--quiet"]
    rc = prep(["build", "--dicom-dir", str(REAL_SAMPLES), "--labels", str(REAL_SAMPLES / LABELS),
               "--out", str(train), "--folds", "2", *args])  # fmt: skip
    assert rc == 0
    rc = prep(["build", "--dicom-dir", str(REAL_SAMPLES / TEST_SERIES), "--out", str(test), *args])
    assert rc == 0
    folds = {s.fold for s in open_build(train).shards if s.samples > 0}
    assert folds == {0, 1}
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "FOLDS": "0 1",
           "OMP_NUM_THREADS": "1",
           "FIT_ARGS": "--model resnet10t --image-size 32 --batch-size 8 --epochs 1 --workers 0 --no-progress --no-report --context 1",
           "SEQ_ARGS": "--epochs 2 --hidden 8"}  # fmt: skip
    rc, out, err = _run(["bash", str(SCRIPT), str(train), str(tmp_path / "out"), str(test)], env)
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    lines = [line.split() for line in out.splitlines()]
    assert [row[0] for row in lines if row[:1] in (["0"], ["1"])] == ["0", "1"]
    assert any(row[:1] == ["pooled"] for row in lines)
    sub = pd.read_csv(tmp_path / "out" / "submission_stage2.csv")
    index = open_build(test).index(["image_id", "status"])
    ok = index[index["status"] == "ok"]
    assert len(sub) == 6 * len(ok) > 0
    assert sub["Label"].between(0, 1).all()
