"""`ich-train seq fit|evaluate` against hostile inputs found by trying them: crafted embeddings
files (types, empty values, ids that repeat, series across folds, metadata garbage, decoded
sizes), crafted sequence checkpoints (a pickle with code, edited model arguments, configs and
weights), old last.pt files, --out paths that are files or hold someone else's files, seeds numpy
refuses, and predictions `ich-train report` would refuse."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ich_prep import LABELS
from ich_train import seq, seq_data
from ich_train.cli import main
from ich_train.embed import META_KEY, EmbedError
from ich_train.seq_data import read_embeddings
from tests.test_seq import write_embeddings
from tests.test_train_cli_errors import one_error_line

FIT = ["--valid-fold", "0", "--epochs", "1", "--hidden", "8", "--protocol", "pooled"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-fold embeddings file (3 series a fold) and a one-epoch sequence run on it."""
    tmp = tmp_path_factory.mktemp("hostile_seq")
    path = tmp / "f.parquet"
    write_embeddings(path, folds=2, per_fold=3)
    cfg = seq.SeqConfig(protocol="pooled", features=str(path), valid_fold=0, hidden=8, epochs=1)
    seq.fit(cfg, str(tmp / "run"), log=lambda *_: None)
    return path, tmp / "run"


def _edited(small, tmp_path, column: str, array) -> str:
    t = pq.read_table(small[0])
    out = tmp_path / f"{column}.parquet"
    pq.write_table(t.set_column(t.column_names.index(column), column, array), out)
    return str(out)


def _fit_error(capsys, features: str, out) -> str:
    assert main(["seq", "fit", "--features", features, "--out", str(out), *FIT]) == 2
    return one_error_line(capsys, "seq fit")


def _column(n: int, case: str):
    # fmt: off
    return {
        "slice_rank as text": ("slice_rank", pa.array([str(i % 20) for i in range(n)]), "'slice_rank' must hold integers (the file has string)"),
        "fold as text": ("fold", pa.array(["a"] * n), "'fold' must hold integers (the file has string)"),
        "fold 0.5": ("fold", pa.array(np.full(n, 0.5)), "'fold' must hold integers (the file has double)"),
        "fold empty": ("fold", pa.array([None] * n, pa.int16()), "empty (null) values in ['fold']"),
        "logit as text": ("logit_any", pa.array(["x"] * n), "'logit_any' must hold floats (the file has string)"),
        "series empty": ("series_id", pa.array([None] * n, pa.string()), "empty (null) values in ['series_id']"),
        "image empty": ("image_id", pa.array([None] * n, pa.string()), "empty (null) values in ['image_id']"),
        "one image id": ("image_id", pa.array(["ID_x"] * n), "holds an image_id more than once"),
        "features as text": ("features", pa.FixedSizeListArray.from_arrays(pa.array(["1"] * (8 * n)), 8), "fixed-size list of 1..8192 floats (the file has fixed_size_list<"),
        "features of size 0": ("features", pa.array([[]] * n, type=pa.list_(pa.float16(), 0)), "fixed-size list of 1..8192 floats"),
    }[case]
    # fmt: on


@pytest.mark.parametrize(
    "case",
    ["slice_rank as text", "fold as text", "fold 0.5", "fold empty", "logit as text", "series empty",
     "image empty", "one image id", "features as text", "features of size 0"],
)  # fmt: skip
def test_a_column_of_the_wrong_type_or_empty_is_one_line(small, tmp_path, capsys, case):
    """Before: ranks as text were sorted as text ('10' < '2': slices out of order, exit 0), a fold
    of 0.5 became 0, text features were parsed, empty or repeated ids were trained on and written
    into predictions `ich-train report` refuses, and a text or empty fold, a text logit or an
    empty series id were tracebacks. Now each is one line naming the column, before training."""
    n = pq.read_metadata(small[0]).num_rows
    column, array, says = _column(n, case)
    assert says in _fit_error(capsys, _edited(small, tmp_path, column, array), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_series_across_folds_or_with_a_repeated_rank_is_refused(small, tmp_path, capsys):
    """Before: a series whose slices sit in two folds took the first row's fold (its other slices
    leaked into training) and a repeated rank was ordered at random: both trained silently."""
    t = pq.read_table(small[0])
    fold = t.column("fold").to_numpy().copy()
    fold[0] = 1 - fold[0]
    rank = t.column("slice_rank").to_numpy().copy()
    rank[1] = rank[0]
    for col, values in (("fold", fold), ("slice_rank", rank)):
        says = _fit_error(capsys, _edited(small, tmp_path, col, pa.array(values)), tmp_path / "r")
        assert "spans folds or CNNs or repeats a slice rank" in says


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b"\xff\xfe{{", b"{" * 10])  # fmt: skip
def test_metadata_garbage_reads_as_empty(small, tmp_path, raw):
    """Before: deeply nested metadata was a RecursionError traceback and a JSON list was kept (and
    later broke `predict --seq`); now anything but a JSON object reads as {}."""
    t = pq.read_table(small[0])
    path = tmp_path / "meta.parquet"
    pq.write_table(t.replace_schema_metadata({META_KEY: raw}), path)
    series, meta = read_embeddings(str(path))
    assert meta == {} and len(series) == 6


def test_strings_and_values_are_bounded_before_decoding(small, tmp_path, monkeypatch):
    """A series id repeated by a dictionary page decodes to far more than the file holds (1M rows
    x 2,000 characters: 2 GB from a few hundred KB); rows x feature size has a limit too. Both are
    checked before decoding (limits lowered here to keep the test small)."""
    t = pq.read_table(small[0])
    n = t.num_rows
    sid = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["s" * 1000]))
    path = tmp_path / "bomb.parquet"
    pq.write_table(t.set_column(t.column_names.index("series_id"), "series_id", sid), path)
    monkeypatch.setattr(seq_data, "MAX_ID_BYTES", 10_000)
    with pytest.raises(EmbedError, match=f"series_id values would take {1000 * n} bytes decoded"):
        read_embeddings(str(path))
    monkeypatch.setattr(seq_data, "MAX_VALUES", 8 * n - 1)
    with pytest.raises(EmbedError, match=f"holds {n} x 8 feature values"):
        read_embeddings(str(small[0]))


def test_the_file_is_read_without_reader_threads(small, monkeypatch):
    """pyarrow reader threads (pre-buffering, use_threads) started just before an error made the
    interpreter abort at exit ('terminate called without an active exception', exit 134 instead
    of 2) in about 1 of 30 runs of a refused file, and in most runs of a script that exits right
    after reading. The reader now starts none."""
    seen = {}

    class Spy(pq.ParquetFile):
        def __init__(self, *a, **kw):
            seen["pre_buffer"] = kw.get("pre_buffer", True)
            super().__init__(*a, **kw)

        def read(self, *a, **kw):
            seen["use_threads"] = kw.get("use_threads", True)
            return super().read(*a, **kw)

    monkeypatch.setattr(pq, "ParquetFile", Spy)  # every reader opens files through it
    read_embeddings(str(small[0]))
    assert seen == {"pre_buffer": False, "use_threads": False}


# ---------------------------------------------------------------- checkpoints


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_without_running_it(small, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    torch.save({"model": Evil(marker), "config": {}, "model_args": {}, "epoch": 0}, tmp_path / "evil.pt")  # fmt: skip
    argv = ["seq", "evaluate", "--checkpoint", str(tmp_path / "evil.pt"), "--features", str(small[0]), "--fold", "0"]  # fmt: skip
    assert main(argv) == 2
    assert "not a sequence checkpoint (UnpicklingError)" in one_error_line(capsys, "seq evaluate")
    assert not marker.exists()


def _crafted(ck: dict, case: str) -> dict:
    args = ck["model_args"]
    # fmt: off
    return {
        "hidden 1e6": {"model_args": {**args, "hidden": 10**6}},  # before: tried to allocate 12 TB
        "extra argument": {"model_args": {**args, "evil": 1}},
        "unknown rnn": {"model_args": {**args, "rnn": "transformer"}},
        "arguments a string": {"model_args": "x"},
        "config a string": {"config": "x"},
        "config without fold": {"config": {k: v for k, v in ck["config"].items() if k != "valid_fold"}},
        "weights a list": {"model": [1, 2]},
        "weights of other shapes": {"model": {k: torch.zeros(1) for k in ck["model"]}},
        "weights NaN": {"model": {k: torch.full_like(v, math.nan) for k, v in ck["model"].items()}},
    }[case]
    # fmt: on


@pytest.mark.parametrize(
    "case",
    ["hidden 1e6", "extra argument", "unknown rnn", "arguments a string", "config a string",
     "config without fold", "weights a list", "weights of other shapes", "weights NaN"],
)  # fmt: skip
def test_an_edited_checkpoint_is_one_line(small, tmp_path, capsys, case):
    """Before: each was a traceback in evaluate (TypeError, KeyError, RuntimeError from
    load_state_dict, the allocator refusing 12 TB, scikit-learn refusing NaN predictions)."""
    ck = torch.load(small[1] / "best.pt", weights_only=True)
    torch.save({**ck, **_crafted(ck, case)}, tmp_path / "edited.pt")
    argv = ["seq", "evaluate", "--checkpoint", str(tmp_path / "edited.pt"), "--features", str(small[0]), "--fold", "0", "--out", str(tmp_path / "p.parquet")]  # fmt: skip
    assert main(argv) == 2
    assert str(tmp_path / "edited.pt") in one_error_line(capsys, "seq evaluate")
    assert not (tmp_path / "p.parquet").exists()


def test_resuming_a_last_pt_whose_states_do_not_load_is_one_line(small, tmp_path, capsys):
    """Before: a last.pt written before fit's schedule changed (OneCycleLR's state, no
    lr_lambdas) was a KeyError traceback on --resume."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "config.json"):
        (run / name).write_bytes((small[1] / name).read_bytes())
    ck = torch.load(run / "last.pt", weights_only=True)
    torch.save({**ck, "scheduler": {"total_steps": 2}}, run / "last.pt")
    argv = ["seq", "fit", "--features", ck["config"]["features"], "--out", str(run), "--resume", *FIT]  # fmt: skip
    assert main(argv) == 2
    assert "last.pt cannot be resumed (KeyError" in one_error_line(capsys, "seq fit")


# ---------------------------------------------------------------- --out, --seed, predictions


def test_fit_out_that_is_a_file_or_holds_other_files_is_one_line(small, tmp_path, capsys):
    """Before: --out a file or inside a file was an I/O error (exit 1); a folder of someone
    else's files had its config.json and metrics.csv replaced; a link at best.pt.partial was
    written through. Now one line each, exit 2, nothing touched."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    says = _fit_error(capsys, str(small[0]), a_file)
    assert f"cannot be a run folder: {a_file} is a file, in the way" in says
    says = _fit_error(capsys, str(small[0]), a_file / "sub")
    assert f"{a_file} is a file, in the way" in says
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("their config")
    (theirs / "data.csv").write_text("their data")
    assert "holds files `ich-train seq fit` did not write (data.csv)" in _fit_error(capsys, str(small[0]), theirs)  # fmt: skip
    assert (theirs / "config.json").read_text() == "their config"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "best.pt.partial").symlink_to(a_file)
    assert "did not write (best.pt.partial)" in _fit_error(capsys, str(small[0]), linked)
    assert a_file.read_text() == "mine"


def test_evaluate_out_that_is_a_folder_or_inside_a_file_is_one_line(small, tmp_path, capsys):
    """Before: an I/O error (exit 1) after the predictions were computed."""
    (tmp_path / "f").write_text("x")
    for out, says in ((tmp_path, "is a folder; give a file path"), (tmp_path / "f" / "p.parquet", "is a file, not a folder")):  # fmt: skip
        argv = ["seq", "evaluate", "--checkpoint", str(small[1] / "best.pt"), "--features", str(small[0]), "--fold", "0", "--out", str(out)]  # fmt: skip
        assert main(argv) == 2
        assert says in one_error_line(capsys, "seq evaluate")


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_a_seed_numpy_or_torch_refuses_is_one_line(small, tmp_path, capsys, seed):
    """Before: a traceback from numpy (negative) or torch (overflow), after the run folder was made."""
    argv = ["seq", "fit", "--features", str(small[0]), "--out", str(tmp_path / "r"), *FIT, "--seed", seed]  # fmt: skip
    assert main(argv) == 2
    assert f"--seed {seed}: use 0..4294967295" in one_error_line(capsys, "seq fit")
    assert not (tmp_path / "r").exists()


def test_predictions_report_would_refuse_are_not_written(small, tmp_path, capsys, monkeypatch):
    """Before: non-finite probabilities (a checkpoint whose finite weights overflow) were written
    and evaluate said ok (exit 0); `ich-train report` then refused the file. Now one line, no file."""
    real = seq.predict_series

    def overflowing(model, series, *a, **kw):
        out = real(model, series, *a, **kw)
        out["probs"][0, 0] = math.nan
        return out

    monkeypatch.setattr(seq, "predict_series", overflowing)
    out = tmp_path / "p.parquet"
    argv = ["seq", "evaluate", "--checkpoint", str(small[1] / "best.pt"), "--features", str(small[0]), "--fold", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "gives predictions `ich-train report` would refuse" in one_error_line(
        capsys, "seq evaluate"
    )
    assert not out.exists()
    monkeypatch.undo()
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["predictions"] == str(out)


def test_damaged_pages_missing_ids_and_huge_logits_are_one_line(small, tmp_path, capsys):
    """Found by flipping bytes: an image id that is not UTF-8 was a UnicodeDecodeError traceback;
    a logit past float32 printed numpy's overflow warning before the error line (two lines on
    stderr); a file without series_id stays one line."""
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(small[0]), plain, compression="none")
    data = bytearray(plain.read_bytes())
    data[data.find(b"ID_0_0_0") + 3] = 0xFF
    plain.write_bytes(bytes(data))
    assert "not an embeddings file from `ich-train embed` (ArrowInvalid" in _fit_error(capsys, str(plain), tmp_path / "r")  # fmt: skip
    n = pq.read_metadata(small[0]).num_rows
    huge = _edited(small, tmp_path, "logit_any", pa.array(np.full(n, 1e300)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning printed on stderr fails here
        assert "holds non-finite features or logits" in _fit_error(capsys, huge, tmp_path / "r")
    pq.write_table(pq.read_table(small[0]).drop(["series_id"]), tmp_path / "nosid.parquet")
    assert "lacks columns ['series_id']" in _fit_error(capsys, str(tmp_path / "nosid.parquet"), tmp_path / "r")  # fmt: skip


def test_fit_on_a_test_build_says_so_first(small, tmp_path, capsys):
    """Before: a test build's embeddings (fold -1, no labels) were answered with 'has folds [-1];
    pick one of them', and --valid-fold -1 then with 'no labels': now the cause, first."""
    t = pq.read_table(small[0])
    t = t.drop(list(LABELS))
    path = tmp_path / "test.parquet"
    pq.write_table(t.set_column(t.column_names.index("fold"), "fold", pa.array(np.full(t.num_rows, -1, np.int16))), path)  # fmt: skip
    assert "has no labels (a test build)" in _fit_error(capsys, str(path), tmp_path / "r")


def test_a_features_file_of_no_rows_is_one_line(small, tmp_path, capsys):
    """The right schema and metadata, 0 rows. Before: an IndexError traceback in series_of_table
    (issue 23). Now fit and evaluate each say it in one line, exit 2."""
    path = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(small[0]).slice(0, 0), path)
    assert "has no rows" in _fit_error(capsys, str(path), tmp_path / "r")
    assert main(["seq", "evaluate", "--checkpoint", str(small[1] / "best.pt"), "--features", str(path), "--fold", "0", "--out", str(tmp_path / "e.parquet")]) == 2  # fmt: skip
    assert "has no rows" in one_error_line(capsys, "seq evaluate")
