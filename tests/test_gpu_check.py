"""scripts/gpu_check.sh in its CPU smoke mode (SMOKE=1), as CI runs it, and the table's rows
(ich_train.gpu_table): which cells a device gets, in which order, and the time budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ich_train.gpu_table import cells, precisions, render

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.slow  # runs scripts/gpu_check.sh end to end: not in `make test-fast`
def test_gpu_check_smoke_mode_runs_every_stage_and_prints_the_table(tmp_path):
    """SMOKE=1 on the CPU: synth -> build -> the table -> fit (--average-last 2) -> predict ->
    embed -> seq fit/evaluate -> predict --seq; exit 0, and OUT/table.md holds the device's
    table (fp32 and fp16 rows, 2D and --context 1, no bf16 or --compile rows on a CPU) and the
    stage timings, as the log's end prints them."""
    out = tmp_path / "gc"
    env = {**os.environ, "SMOKE": "1", "PY": sys.executable, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        text, _ = proc.communicate(timeout=900)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # tee, loader workers: nothing outlives the test
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, text[-3000:]
    table = (out / "table.md").read_text()
    assert table.startswith("**cpu**, torch ") and table in text
    rows = [line.split(" | ")[1:4] for line in table.splitlines() if line.startswith("| resnet10t")]
    assert rows == [["fp32", "eager", "2D (3 ch)"], ["fp16", "eager", "2D (3 ch)"],
                    ["fp32", "eager", "--context 1 (9 ch)"], ["fp16", "eager", "--context 1 (9 ch)"]]  # fmt: skip
    assert "| seq fit, 2 epochs |" in table and "| fit resnet10t, 2 epochs" in table
    assert (out / "runs" / "single" / "avg.pt").is_file()
    assert len(pd.read_csv(out / "submission_stage2.csv")) % 6 == 0


def test_table_rows_eager_first_bf16_only_where_native(monkeypatch):
    """bf16 rows only on a device that runs it natively; every model's eager rows come before
    any --compile row (compiling is slow: the time budget cuts those first), compiled at the
    `auto` precision."""
    assert precisions(CPU) == ["fp32", "fp16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # fmt: skip
    assert precisions(CUDA) == ["fp32", "fp16", "bf16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # fmt: skip
    assert precisions(CUDA) == ["fp32", "fp16"]  # a T4: bf16 only emulated
    rows = list(cells(["b0", "b2"], CUDA, compile_too=True))
    assert [r[2] for r in rows] == [False] * 8 + [True] * 4
    assert rows[8:] == [("b0", "fp16", True, 0), ("b0", "fp16", True, 1), ("b2", "fp16", True, 0), ("b2", "fp16", True, 1)]  # fmt: skip


def test_rows_past_the_budget_are_listed_as_skipped():
    class Args:
        batch, steps, warmup, workers = 4, 1, 1, 0

    text = render([{"model": "m", "precision": "fp16", "resident train": "skipped (time budget)"}], CPU, 32, Args)  # fmt: skip
    assert "| m | fp16 | - | - | skipped (time budget) | - |" in text
