"""The 2.5D / stage-2 features against hostile inputs found by trying them: an index.parquet
edited by whoever handed the build over (slice ranks that are text, infinite, fractional, a series
split over two shards, ranks that disagree with the samples' own json), a checkpoint whose config
records a context fit never writes, `predict --seq` with a --checkpoint that is not there, and
scripts/two_stage.sh run again after a kill, with paths holding spaces, a missing test build or a
fold the build lacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ich_prep.cli import main as prep
from ich_train.cli import main
from ich_train.context import Context, series_positions
from ich_train.data import Build, EvalStream, ShardError
from tests.test_train_cli_errors import one_error_line
from tests.train_fixtures import make_build

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "two_stage.sh"
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


def _edited(build: Path, dst: Path, edit) -> Path:
    """A copy of `build` whose index.parquet went through `edit` (rows of shard train-f0-00000.tar
    come first; the manifest still matches it row for row)."""
    shutil.copytree(build, dst)
    index = pd.read_parquet(dst / "index.parquet")
    edit(index)
    index.to_parquet(dst / "index.parquet", index=False)
    return dst


def _rank_text(d):
    d["slice_rank"] = d["slice_rank"].astype(str)
    d.loc[1, "slice_rank"] = "x"


def _rank_inf(d):
    d["slice_rank"] = d["slice_rank"].astype(float)
    d.loc[1, "slice_rank"] = np.inf


def _rank_half(d):
    d["slice_rank"] = d["slice_rank"].astype(float)
    d.loc[1, "slice_rank"] = 1.5


def _split(d):
    """The first series of shard train-f0-00001 claimed as ranks 6..11 of the last series of
    train-f0-00000: one series over two shards (read in that order, the stacks cross them)."""
    a, b = d.index[d["shard"] == "train-f0-00000.tar"], d.index[d["shard"] == "train-f0-00001.tar"]
    d.loc[b[:6], "series_id"] = d.loc[a[-1], "series_id"]
    d.loc[b[:6], "slice_rank"] = range(6, 12)


@pytest.mark.parametrize(
    ("case", "edit", "message"),
    [("rank as text", _rank_text, "slice_rank holds values that are not whole numbers"),
     ("rank infinite", _rank_inf, "slice_rank holds values that are not whole numbers"),
     ("rank 1.5", _rank_half, "slice_rank holds values that are not whole numbers"),
     ("series over two shards", _split, "lies in 2 shards")],
)  # fmt: skip
def test_an_edited_index_is_refused_before_training(series, tmp_path, capsys, case, edit, message):
    """Before: ranks as text or inf were tracebacks (int() in series_positions), 1.5 was read as
    1, and a series over two shards trained (exit 0) whenever the shard order of a pass put them
    back to back (else failed mid-epoch, and evaluate failed with --workers 2, not with 0). Now
    fit --context refuses the index before the run folder is written."""
    _, build, _ = series
    bad = _edited(build, tmp_path / "bad", edit)
    out = tmp_path / "run"
    assert main(["fit", "--shards", str(bad), "--valid-fold", "1", *TINY, "--context", "1", "--out", str(out)]) == 2  # fmt: skip
    assert message in one_error_line(capsys, "fit") and not out.exists()


@pytest.mark.parametrize(("edit", "message"), [(_split, "lies in 2 shards"), (_rank_half, "not whole numbers")])  # fmt: skip
def test_verify_reports_the_index_series_the_trainer_refuses(series, tmp_path, capsys, edit, message):  # fmt: skip
    """ich-prep verify runs the same series check (manifest.series_ranks) as --context, embed and
    predict --seq, so it never passes an index they refuse."""
    _, build, _ = series
    bad = _edited(build, tmp_path / "bad", edit)
    assert prep(["verify", str(bad)]) == 1
    assert message in capsys.readouterr().out
    assert prep(["verify", str(build)]) == 0


def test_ranks_must_run_0_to_n_minus_1_in_every_series(series):
    """Representative of the cases that failed before only when the samples were read: a repeated,
    negative or far too large rank, or a gap, is refused from the index alone."""
    _, build, _ = series
    ok = Build(str(build)).ok.copy()
    assert len(series_positions(ok)) == len(ok)
    for rank in (0, -1, 10**12, 7):
        bad = ok.assign(slice_rank=ok["slice_rank"].where(ok.index != 2, rank))
        with pytest.raises(ValueError, match=r"series ID_s1x0x0: slice ranks .* are not 0..5 once each"):  # fmt: skip
            series_positions(bad)


def _swap(d):
    """Slices 0 and 1 of the first series swapped in the index: consistent in itself (ranks 0..5),
    but not with the shard, whose json (and order) say otherwise."""
    d.loc[0, "slice_rank"], d.loc[1, "slice_rank"] = 1, 0


def _merge(d):
    """The second series of shard train-f0-00000 claimed as ranks 6..11 of the first: back to back
    in the shard, so in order; only the samples' json say they are two series."""
    d.loc[6:11, "series_id"] = d.loc[0, "series_id"]
    d.loc[6:11, "slice_rank"] = range(6, 12)


def test_embed_refuses_an_index_whose_series_disagree_with_the_samples(series, tmp_path, capsys):
    """Before: embed with a 2D CNN took the index's order as the truth: swapped ranks gave the
    sequence stage a series in the wrong order (exit 0), and text or empty ranks were tracebacks
    after the whole embedding. Now the index's series columns are checked first and each sample's
    json must repeat its series and rank: one line, no file."""
    _, build, ckpt = series
    for name, edit in (("swap", _swap), ("empty", lambda d: d.__setitem__("slice_rank", d["slice_rank"].astype("Int64").where(d.index != 3)))):  # fmt: skip
        bad = _edited(build, tmp_path / name, edit)
        out = tmp_path / f"{name}.parquet"
        assert main(["embed", "--checkpoint", str(ckpt), "--shards", str(bad), "--folds", "0", *RUNTIME, "--out", str(out)]) == 2  # fmt: skip
        err = one_error_line(capsys, "embed")
        assert ("json slice_rank 0 differs from the index's 1" in err) if name == "swap" else ("needs a series-aware build" in err)  # fmt: skip
        assert not out.exists()


def test_context_stacks_refuse_series_the_samples_do_not_belong_to(series, tmp_path):
    """Before: two series back to back in a shard, merged into one by the index, were stacked
    across the boundary (a slice's neighbour from another patient's scan), silently. Now the
    sample's json series is compared with the index's."""
    _, build, _ = series
    b = Build(str(_edited(build, tmp_path / "merge", _merge)))
    stream = EvalStream(b.select([0]), b.encoding, 64, context=Context(1), positions=series_positions(b.ok))  # fmt: skip
    with pytest.raises(ShardError, match="json series_id 'ID_s1x0x1' differs from the index's 'ID_s1x0x0'; json slice_rank 0 differs from the index's 6"):  # fmt: skip
        list(stream)


def test_predict_seq_names_a_missing_cnn_checkpoint(series, tmp_path, capsys):
    """Before: '[Errno 2] No such file or directory: ...' (no flag, no fix). Now it names
    --checkpoint and what to pass."""
    _, build, _ = series
    missing = tmp_path / "nope.pt"
    assert main(["predict", "--checkpoint", str(missing), "--seq", str(missing), "--shards", str(build), "--out", str(tmp_path / "s.csv")]) == 2  # fmt: skip
    assert f"--checkpoint {missing} cannot be read" in one_error_line(capsys, "predict")


# ---- scripts/two_stage.sh, its decisions checked with a stand-in ich-train that records calls

FAKE = """#!/usr/bin/env bash
printf '%s\\x1f' "$@" >> "$LOG"; printf '\\n' >> "$LOG"
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
case "$1 $2" in
    "fit "*|"seq fit") mkdir -p "$out"; : > "$out/best.pt" ;;
    "seq evaluate") echo '{"valid_loss": 0.1, "cnn_loss": 0.2, "cnn_auc_any": 0.5, "valid_auc_any": 0.6}' ;;
    *) [ -n "$out" ] && : > "$out" ;;
esac
"""


def _fake_bin(tmp: Path) -> tuple[dict, Path]:
    bin_dir, log = tmp / "fake bin", tmp / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "ich-train").write_text(FAKE)
    (bin_dir / "python").write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    for f in ("ich-train", "python"):
        os.chmod(bin_dir / f, 0o755)
    return {**os.environ, "BIN": str(bin_dir), "LOG": str(log), "FIT_ARGS": "--epochs 2", "SEQ_ARGS": "--epochs 3"}, log  # fmt: skip


def _calls(log: Path) -> list[list[str]]:
    text = log.read_text() if log.exists() else ""
    return [line.split("\x1f")[:-1] for line in text.splitlines()]


def _last(run: Path, epoch: int, epochs: int) -> None:
    run.mkdir(parents=True)
    torch.save({"epoch": epoch, "config": {"epochs": epochs}}, run / "last.pt")
    (run / "best.pt").write_bytes(b"ours")


@pytest.mark.slow  # two_stage.sh run, stopped and rerun: not in `make test-fast`
def test_two_stage_rerun_skips_finished_folds_and_resumes_stopped_ones(tmp_path):
    """Before: a fold counted as finished once its best.pt existed, which fit writes after the
    first epoch: a run killed part-way was skipped on the rerun and its half-trained CNN or
    sequence model used, silently (and one killed with last.pt but no best.pt was refused: the
    folder already holds a run). Now finished folds are skipped, stopped ones continue with
    --resume, new ones start; paths with spaces arrive whole; the user's files stay."""
    env, log = _fake_bin(tmp_path)
    three = make_build(tmp_path / "train build", folds=3, per_shard=6, size=16, series_len=3)
    test = make_build(tmp_path / "test build", test=True, per_shard=4, size=16, series_len=2)
    out = tmp_path / "my runs"
    _last(out / "cnn0", 1, 2)  # done
    _last(out / "cnn1", 0, 2)  # stopped after epoch 1 of 2
    _last(out / "seq0", 2, 3)
    _last(out / "seq1", 1, 3)
    (out / "notes.txt").write_text("mine")
    r = subprocess.run(["bash", str(SCRIPT), str(three), str(out), str(test)], env={**env, "FOLDS": "0 1 2"},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    calls = _calls(log)
    fits = [(c[c.index("--valid-fold") + 1], "--resume" in c) for c in calls if c[0] == "fit"]
    seqs = [(c[c.index("--valid-fold") + 1], "--resume" in c) for c in calls if c[:2] == ["seq", "fit"]]  # fmt: skip
    assert fits == [("1", True), ("2", False)] and seqs == [("1", True), ("2", False)]
    assert all(c[c.index("--shards") + 1] == str(three) for c in calls if c[0] == "fit")
    assert calls[-1][:1] == ["predict"] and calls[-1][calls[-1].index("--shards") + 1] == str(test)
    assert (out / "notes.txt").read_text() == "mine" and (out / "cnn0" / "best.pt").read_bytes() == b"ours"  # fmt: skip


@pytest.mark.parametrize(("folds", "test", "message"), [
    ("0 1", "missing", "missing/manifest.json not found"),
    ("0 7", None, "FOLDS='0 7': give two or more distinct folds"),
])  # fmt: skip
def test_two_stage_checks_builds_and_folds_before_training(tmp_path, folds, test, message):
    """Before: a missing test build was found by the last step, after every fold had trained, and
    FOLDS='0 7' trained fold 0 before fit found no fold 7. Now both end the script before anything
    runs."""
    build = make_build(tmp_path / "build", folds=2, per_shard=4, size=16, series_len=2)
    env, log = _fake_bin(tmp_path)
    args = [str(build), str(tmp_path / "out"), *([str(tmp_path / test)] if test else [])]
    r = subprocess.run(["bash", str(SCRIPT), *args], env={**env, "FOLDS": folds}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert _calls(log) == [] and not (tmp_path / "out").exists()
