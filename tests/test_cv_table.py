"""scripts/cv_table.py: the demo's table, every held-out fold pooled, each row against the 2D CNN."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ich_prep import LABELS
from ich_train import report
from ich_train.metrics import weighted_log_loss
from tests.test_report import table

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cv_table.py"
ROWS = {"2d/cnn": 0.3, "2.5d/cnn": 0.5, "2d/seq": 0.4, "2.5d/seq": 0.6}  # skill of each recipe


def _runs(root: Path) -> dict[str, float]:
    """Two folds of every recipe's out-of-fold predictions as two_stage.sh leaves them, and the
    pooled weighted log loss of each."""
    pooled = {}
    for run, skill in ROWS.items():
        frames = []
        for k in (0, 1):
            f = table(n=30, seed=k, fold=k, skill=skill)
            f["image_id"] = [f"ID_{k}_{i:03d}" for i in range(len(f))]
            name = f"seq_oof_fold{k}.parquet" if run.endswith("seq") else f"oof_fold{k}.parquet"
            folder = root / f"{run}{k}"
            folder.mkdir(parents=True)
            report.write_predictions(folder / name, f, {})
            pd.DataFrame({"prior_loss": [0.45 + 0.01 * k]}).to_csv(folder / "metrics.csv")
            frames.append(f)
        f = pd.concat(frames)
        pooled[run] = weighted_log_loss(f[list(LABELS)].to_numpy(), f[report.PRED].to_numpy())
    return pooled


def test_each_row_is_pooled_over_the_folds_and_compared_with_2d(tmp_path):
    """Every row's loss is the pooled loss of its folds; 'vs 2D' is its change against the 2D CNN
    (blank on the 2D row itself); the prior is the image-weighted mean of the folds' priors."""
    pooled = _runs(tmp_path)
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "0", "1"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "60 images" in lines[0] and lines[1].split()[-4:] == ["vs", "2D", "AUC", "any"]
    assert float(lines[2].split()[-1]) == pytest.approx(0.455, abs=1e-4)
    base = pooled["2d/cnn"]
    for line, run in zip(lines[3:], ROWS, strict=True):
        cells = line.split()
        if run == "2d/cnn":
            assert float(cells[-2]) == pytest.approx(base, abs=1e-4) and "%" not in line
            continue
        loss, change = float(cells[-3]), float(cells[-2].rstrip("%")) / 100
        assert loss == pytest.approx(pooled[run], abs=1e-4)
        assert change == pytest.approx(pooled[run] / base - 1, abs=1e-3)
