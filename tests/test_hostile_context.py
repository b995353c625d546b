"""The 2.5D / stage-2 features against hostile inputs found by trying them: an index.parquet
edited by whoever handed the build over (slice ranks that are text, infinite, fractional, a series
split over two shards, ranks that disagree with the samples' own json), a checkpoint whose config
records a context fit never writes, `predict --seq` with a --checkpoint that is not there, and
scripts/two_stage.sh run again after a kill, with paths holding spaces, a missing test build or a
fold the build lacks."""

from __future__ import annotations

import pytest
import torch

from ich_train.cli import main
from tests.test_train_cli_errors import one_error_line
from tests.train_fixtures import make_build

TINY = ["--model", "resnet10t", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
        "--workers", "0", "--no-progress", "--no-report"]  # fmt: skip
RUNTIME = ["--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A 2-fold series-aware build (2 shards a fold, series of 6 slices) and a 2D CNN on it."""
    tmp = tmp_path_factory.mktemp("hostile_context")
    build = make_build(tmp / "build", folds=2, per_shard=12, shards_per_fold=2, size=32, series_len=6)  # fmt: skip
    assert main(["fit", "--shards", str(build), "--valid-fold", "1", *TINY, "--out", str(tmp / "cnn")]) == 0  # fmt: skip
    return tmp, build, tmp / "cnn" / "last.pt"


@pytest.mark.parametrize("value", ["x", [1], float("inf"), "9" * 5000])
def test_a_checkpoint_recording_a_context_fit_never_writes_is_one_line(series, tmp_path, capsys, value):  # fmt: skip
    """Before: context_of ran int() on the checkpoint's value: text, a list, inf or a 5000-digit
    string were tracebacks. Now one line naming the checkpoint."""
    _, build, ckpt = series
    ck = torch.load(ckpt, weights_only=True)
    ck["config"] = {**ck["config"], "context": value}
    edited = tmp_path / "edited.pt"
    torch.save(ck, edited)
    assert main(["evaluate", "--checkpoint", str(edited), "--shards", str(build), "--fold", "1", *RUNTIME, "--no-report", "--out", str(tmp_path / "o.parquet")]) == 2  # fmt: skip
    assert f"{edited} records a context" in one_error_line(capsys, "evaluate")
