"""The sequence stage: embed (per-slice CNN features) and seq fit/evaluate (a bi-GRU per series)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ich_prep import LABELS
from ich_train.cli import main
from ich_train.config import TrainConfig
from ich_train.embed import LOGITS, META_KEY
from ich_train.infer import evaluate as cnn_evaluate
from ich_train.seq import SeqConfig, SeqError, SeqModel, evaluate, fit, masked_loss
from ich_train.seq_data import (
    SLICE_EXTRA,
    Series,
    augment,
    collate,
    read_embeddings,
    slice_inputs,
)
from ich_train.train import fit as cnn_fit
from tests.test_train_cli_errors import one_error_line
from tests.train_fixtures import make_build

# ---------------------------------------------------------------- pieces, by hand


def test_slice_inputs_by_hand():
    """f = [1, 2, 4] (D = 1), no positions (slice ranks): f - prev = [0, 1, 2], f - next =
    [-1, -2, 0], position 0, .5, 1, gaps to the neighbours 1 inside and 0 at the ends."""
    f = np.array([[1.0], [2.0], [4.0]], np.float32)
    z = np.zeros((3, 6), np.float32)
    x = slice_inputs(f, z)
    assert x.shape == (3, 3 + SLICE_EXTRA) and SLICE_EXTRA == 6 + 3
    assert x[:, 0].tolist() == [1, 2, 4] and x[:, 1].tolist() == [0, 1, 2]
    assert x[:, 2].tolist() == [-1, -2, 0] and x[:, -3].tolist() == [0, 0.5, 1]
    assert x[:, -2].tolist() == [0, 1, 1] and x[:, -1].tolist() == [1, 1, 0]
    assert np.array_equal(slice_inputs(f, z, np.array([10.0, 15.0, 20.0])), x)  # even spacing


def test_slice_inputs_see_a_gap_by_hand():
    """Positions 0, 5, 10, 20, 25 mm (the 15 mm slice missing): the 10 and 20 mm slices are not
    each other's neighbours (a step of 2x the median spacing, over split.neighbour_ranks' 1.5x):
    their difference there is 0, as at the series' ends, and the gap reads 2 median spacings;
    position is along the axis (mm), not by rank. Reversed, the same inputs in reverse order."""
    f = np.array([[1.0], [2.0], [4.0], [8.0], [16.0]], np.float32)
    z = np.zeros((5, 6), np.float32)
    pos = np.array([0.0, 5.0, 10.0, 20.0, 25.0])
    x = slice_inputs(f, z, pos)
    assert x[:, 1].tolist() == [0, 1, 2, 0, 8] and x[:, 2].tolist() == [-1, -2, 0, -8, 0]
    assert np.allclose(x[:, -3], [0, 0.2, 0.4, 0.8, 1.0])
    assert x[:, -2].tolist() == [0, 1, 1, 2, 1] and x[:, -1].tolist() == [1, 1, 2, 1, 0]
    by_rank = slice_inputs(f, z)
    assert by_rank[2, 2] == -4 and by_rank[3, 1] == 4  # before: the gap was invisible
    back = slice_inputs(f[::-1], z, pos[::-1])
    assert np.array_equal(back[:, :1], x[::-1, :1]) and np.array_equal(back[:, 1], x[::-1, 2])
    assert np.array_equal(back[:, -2], x[::-1, -1]) and np.allclose(back[:, -3], 1 - x[::-1, -3])


def _series(n: int, d: int = 4, fold: int = 0, seed: int = 0) -> Series:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.3).astype(np.float32)
    return Series(f"S{seed}", fold, [f"ID_{seed}_{i}" for i in range(n)],
                  rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, 6)).astype(np.float32), y)  # fmt: skip


def test_model_starts_as_the_cnn_and_padding_does_not_count():
    """Step 0 returns the CNN's logits exactly; the masked loss of a padded batch equals the
    competition-weighted BCE over the real slices only (checked against torch's BCE by hand)."""
    a, b = _series(5, seed=1), _series(2, seed=2)
    batch = collate([a, b])
    assert batch["x"].shape == (2, 5, 3 * 4 + SLICE_EXTRA) and batch["mask"].sum().item() == 7
    model = SeqModel(4, hidden=8)
    out = model(batch["x"], batch["base"], batch["mask"])
    torch.testing.assert_close(out, batch["base"])
    logits = torch.cat([torch.from_numpy(a.logits), torch.from_numpy(b.logits)])
    y = torch.cat([torch.from_numpy(a.labels), torch.from_numpy(b.labels)])
    w = torch.tensor([2.0, 1, 1, 1, 1, 1]) / 7
    by_hand = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum(1).mean()  # fmt: skip
    batch["base"][1, 2:] = 99.0  # padding: whatever it holds changes nothing
    torch.testing.assert_close(masked_loss(out, batch["y"], batch["mask"]), by_hand)


def test_augment_reverses_and_drops_but_keeps_one_slice():
    s = _series(6)
    r = augment(s, np.random.default_rng(0), reverse_p=1.0, drop_p=0.0)
    assert r.ids == s.ids[::-1] and np.array_equal(r.features, s.features[::-1])
    one = augment(s, np.random.default_rng(0), reverse_p=0.0, drop_p=0.999)
    assert len(one.ids) == 1 and one.ids[0] in s.ids


# ---------------------------------------------------------------- shown: context beats one slice


def write_embeddings(path, folds=3, per_fold=60, d=8, seed=0) -> None:
    """An embeddings file where a bleed spans a run of 3-8 slices at a random place in its series,
    strongest mid-run: a slice's own evidence (its feature 0 and the CNN logit, both noisy) is weak
    at the thin ends, its neighbours' is not. Label = inside the run; position says nothing."""
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(folds):
        for j in range(per_fold):
            n = int(rng.integers(12, 21))
            strength = np.zeros(n)
            if rng.random() < 0.5:
                run = int(rng.integers(3, 9))
                start = int(rng.integers(0, n - run + 1))
                strength[start : start + run] = np.sin(np.linspace(0.3, np.pi - 0.3, run))
            evidence = strength + rng.normal(0, 0.45, n)
            for r in range(n):
                y = [int(strength[r] > 0), int(strength[r] > 0), 0, 0, 0, 0]
                f = rng.normal(size=d).astype(np.float32)
                f[0] = evidence[r]
                logit = 3.0 * evidence[r] - 1.5
                rows.append({"image_id": f"ID_{fold}_{j}_{r}", "series_id": f"ID_s{fold}_{j}", "slice_rank": r, "series_len": n,
                             "fold": fold, "cnn": fold, "slice_position": 5.0 * r, **dict(zip(LABELS, y, strict=True)),
                             **dict(zip(LOGITS, [logit, logit, -4.0, -4.0, -4.0, -4.0], strict=True)), "features": f})  # fmt: skip
    frame = pd.DataFrame(rows)
    feats = np.stack(frame.pop("features").to_numpy()).astype(np.float16)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.append_column("features", pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), d))  # fmt: skip
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(oof_meta(folds)).encode()}), path)  # fmt: skip


def oof_meta(folds: int) -> dict:
    """The metadata `embed --oof` writes for `folds` CNNs, CNN k validated on fold k."""
    cks = [{"path": f"cnn{k}/best.pt", "sha256": f"{k:064x}", "valid_fold": k, "model": "m"} for k in range(folds)]  # fmt: skip
    return {"checkpoints": cks, "build": "b", "oof": True, "tta": [], "feature_dim": 8}


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    path = tmp_path_factory.mktemp("seq") / "embed.parquet"
    write_embeddings(path)
    return str(path)


def test_sequence_model_beats_the_per_slice_model_on_a_held_out_fold(features, tmp_path):
    """Trained on folds 1 and 2, scored on fold 0: the GRU's weighted log loss is well below the
    per-slice CNN's, and `seq evaluate` agrees with fit's best epoch."""
    cfg = SeqConfig(
        protocol="pooled", features=features, valid_fold=0, hidden=32, epochs=12, lr=3e-3
    )
    r = fit(cfg, str(tmp_path / "run"), log=lambda *_: None)
    assert r["best_valid_loss"] < 0.85 * r["cnn_valid_loss"], r
    assert r["improved_on_cnn"] and r["best_epoch"] >= 1
    m = evaluate(str(tmp_path / "run" / "best.pt"), features, 0)
    assert m["valid_loss"] == pytest.approx(r["best_valid_loss"], rel=1e-5)
    assert m["cnn_loss"] == pytest.approx(r["cnn_valid_loss"], rel=1e-5) and m["out_of_fold"]
    oof = pd.read_parquet(m["predictions"])
    assert len(oof) == m["images"] and list(oof.columns[:8]) == ["image_id", "fold", *LABELS]


def test_best_pt_is_the_cnn_itself_when_no_epoch_beats_it(tmp_path):
    """The validation fold's `any` labels flipped: what the training folds teach makes it worse
    there. Before: best.pt was the least bad trained epoch (valid loss above the CNN's) and
    predict --seq shipped it. Now step 0 (the zero head: the CNN's logits) is a candidate, so
    best.pt is it, evaluate scores it exactly as the CNN, and fit says so in its last line."""
    write_embeddings(tmp_path / "f.parquet", folds=3, per_fold=20)
    t = pq.read_table(tmp_path / "f.parquet")
    y = t.column("any").to_numpy().copy()
    y[t.column("fold").to_numpy() == 0] ^= 1
    pq.write_table(t.set_column(t.column_names.index("any"), "any", pa.array(y)), tmp_path / "flip.parquet")  # fmt: skip
    lines = []
    cfg = SeqConfig(protocol="pooled", features=str(tmp_path / "flip.parquet"), valid_fold=0, hidden=16, epochs=3, lr=3e-3)  # fmt: skip
    r = fit(cfg, str(tmp_path / "run"), log=lines.append)
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert (history["valid_loss"][1:] > r["cnn_valid_loss"]).all()  # every epoch is worse
    assert not r["improved_on_cnn"] and r["best_epoch"] == 0
    assert r["best_valid_loss"] == r["cnn_valid_loss"] and "did not improve on the CNN" in lines[-1]
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == -1
    m = evaluate(str(tmp_path / "run" / "best.pt"), str(tmp_path / "flip.parquet"), 0)
    assert m["valid_loss"] == pytest.approx(m["cnn_loss"], rel=1e-6)


def test_inputs_logits_learns_from_the_cnn_logits_alone(features, tmp_path):
    """--inputs logits: the model takes 9 values a slice (6 logits, position, 2 gaps), beats the CNN
    on the held-out fold, and evaluate gives the same numbers on a file whose pooled features were
    zeroed (they are not read)."""
    cfg = SeqConfig(
        protocol="pooled",
        features=features,
        valid_fold=0,
        hidden=32,
        epochs=12,
        lr=3e-3,
        inputs="logits",
    )
    r = fit(cfg, str(tmp_path / "run"), log=lambda *_: None)
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ck["model_args"]["feature_dim"] == 0 and ck["model"]["inp.1.weight"].shape[1] == 9
    assert r["best_valid_loss"] < 0.85 * r["cnn_valid_loss"], r
    t = pq.read_table(features)
    zero = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(t.num_rows * 8, np.float16)), 8)
    pq.write_table(t.set_column(t.column_names.index("features"), "features", zero), tmp_path / "z.parquet")  # fmt: skip
    a = evaluate(str(tmp_path / "run" / "best.pt"), features, 0, out=str(tmp_path / "a.parquet"))
    b = evaluate(str(tmp_path / "run" / "best.pt"), str(tmp_path / "z.parquet"), 0, out=str(tmp_path / "b.parquet"))  # fmt: skip
    assert a["valid_loss"] == pytest.approx(r["best_valid_loss"], rel=1e-5) == b["valid_loss"]
    with pytest.raises(SeqError, match="--inputs 'pixels'"):
        SeqConfig(protocol="pooled", features=features, valid_fold=0, inputs="pixels")


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_does(features, tmp_path):
    """Ctrl-C after epoch 2 of 3, then --resume: the same final weights as one run of 3 epochs
    (batches, augmentation and dropout all continue from the saved state)."""
    cfg = SeqConfig(
        protocol="pooled", features=features, valid_fold=1, hidden=16, epochs=3, batch_series=64
    )
    fit(cfg, str(tmp_path / "a"), log=lambda *_: None)

    def stop_after_two(msg):
        if msg.startswith("seq epoch 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, str(tmp_path / "b"), log=stop_after_two)
    fit(cfg, str(tmp_path / "b"), resume=True, log=lambda *_: None)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_from_before_inputs_existed_resumes(features, tmp_path):
    """A last.pt whose config has no `inputs` (written before --inputs) resumes as --inputs
    features; one that says logits does not resume a features run."""
    cfg = SeqConfig(
        protocol="pooled", features=features, valid_fold=1, hidden=8, epochs=2, batch_series=64
    )

    def stop_after_one(msg):
        if msg.startswith("seq epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, str(tmp_path / "r"), log=stop_after_one)
    last = tmp_path / "r" / "last.pt"
    ck = torch.load(last, weights_only=True)
    torch.save({**ck, "config": {k: v for k, v in ck["config"].items() if k != "inputs"}}, last)
    assert fit(cfg, str(tmp_path / "r"), resume=True, log=lambda *_: None)["epochs"] == 2
    torch.save({**ck, "config": {**ck["config"], "inputs": "logits"}}, last)
    with pytest.raises(SeqError, match=r"other settings \(inputs\)"):
        fit(cfg, str(tmp_path / "r"), resume=True, log=lambda *_: None)


# ---------------------------------------------------------------- embed from real checkpoints


@pytest.fixture(scope="module")
def cnn_runs(tmp_path_factory):
    """A 2-fold build of series (6 slices each) and one short CNN per validation fold."""
    tmp = tmp_path_factory.mktemp("embed")
    build = make_build(tmp / "build", folds=2, per_shard=24, size=32, series_len=6)
    ckpts = []
    for fold in (0, 1):
        cfg = TrainConfig(shards=str(build), out=str(tmp / f"cnn{fold}"), model="resnet10t", image_size=32,
                          batch_size=8, epochs=1, workers=0, progress=False, valid_fold=fold)  # fmt: skip
        cnn_fit(cfg)
        ckpts.append(str(tmp / f"cnn{fold}" / "last.pt"))
    return tmp, build, ckpts


def test_embed_out_of_fold_then_seq_fit_and_report(cnn_runs, capsys):
    """embed --oof: every slice once, fold k embedded by the CNN validated on k, its logits those
    evaluate gives; pandas and DuckDB read the file; seq fit + evaluate run on it through the CLI,
    and `ich-train report` reads the sequence model's predictions."""
    tmp, build, ckpts = cnn_runs
    out = tmp / "oof.parquet"
    assert main(["embed", "--checkpoint", *ckpts, "--shards", str(build), "--out", str(out), "--oof", "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    frame = pd.read_parquet(out)
    index = pd.read_parquet(build / "index.parquet")
    assert sorted(frame["image_id"]) == sorted(index["image_id"]) and frame["image_id"].is_unique
    assert (frame["cnn"] == frame["fold"]).all()  # checkpoint i was validated on fold i
    assert frame["features"].iloc[0].dtype == np.float16 and len(frame["features"].iloc[0]) == 512
    meta = json.loads(pq.read_schema(out).metadata[META_KEY])
    assert meta["oof"] and [c["valid_fold"] for c in meta["checkpoints"]] == [0, 1]
    for fold in (0, 1):
        m = cnn_evaluate(ckpts[fold], str(build), fold, out=str(tmp / f"e{fold}.parquet"), workers=0, progress=False, report=False)  # fmt: skip
        probs = pd.read_parquet(m["predictions"]).set_index("image_id")[[f"pred_{lab}" for lab in LABELS]]  # fmt: skip
        mine = frame[frame["fold"] == fold].set_index("image_id")[list(LOGITS)]
        np.testing.assert_allclose(1 / (1 + np.exp(-mine.to_numpy())), probs.loc[mine.index].to_numpy(), atol=1e-4)  # fmt: skip
    duckdb = pytest.importorskip("duckdb")
    n, dim = duckdb.sql(f"select count(*), max(len(features)) from '{out}'").fetchall()[0]
    assert (n, dim) == (len(frame), 512)
    run = tmp / "seqrun"
    assert main(["seq", "fit", "--features", str(out), "--valid-fold", "0", "--protocol", "pooled", "--out", str(run), "--epochs", "2", "--hidden", "8"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 2
    assert main(["seq", "evaluate", "--checkpoint", str(run / "best.pt"), "--features", str(out), "--fold", "0"]) == 0  # fmt: skip
    m = json.loads(capsys.readouterr().out)
    assert m["images"] == int((frame["fold"] == 0).sum()) and m["out_of_fold"]
    assert main(["report", m["predictions"], "--out", str(tmp / "report")]) == 0
    assert (tmp / "report" / "report.html").is_file()


def test_embed_and_seq_mistakes_are_one_line(cnn_runs, capsys, tmp_path):
    """Two CNNs without --oof, a fold twice under --oof, a fold the features lack, a CNN
    checkpoint given to seq evaluate, a FIFO as --features: each exit 2 with one line."""
    tmp, build, ckpts = cnn_runs
    common = ["--shards", str(build), "--workers", "0", "--no-progress"]
    assert main(["embed", "--checkpoint", *ckpts, "--out", str(tmp_path / "x.parquet"), *common]) == 2  # fmt: skip
    assert "cannot be mixed" in one_error_line(capsys, "embed")
    assert main(["embed", "--checkpoint", ckpts[0], ckpts[0], "--oof", "--out", str(tmp_path / "x.parquet"), *common]) == 2  # fmt: skip
    assert "fold 0 is the validation fold of 2" in one_error_line(capsys, "embed")
    feats = tmp_path / "f.parquet"
    write_embeddings(feats, folds=2, per_fold=3)
    assert main(["seq", "fit", "--features", str(feats), "--valid-fold", "7", "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "--valid-fold 7" in one_error_line(capsys, "seq fit")
    assert main(["seq", "evaluate", "--checkpoint", ckpts[0], "--features", str(feats), "--fold", "0"]) == 2  # fmt: skip
    assert "not a sequence checkpoint" in one_error_line(capsys, "seq evaluate")
    os.mkfifo(tmp_path / "fifo.parquet")
    assert main(["seq", "fit", "--features", str(tmp_path / "fifo.parquet"), "--valid-fold", "0", "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "not a regular file" in one_error_line(capsys, "seq fit")
    series, _ = read_embeddings(str(feats))
    assert len(series) == 6 and all(s.ids == sorted(s.ids, key=lambda i: int(i.rsplit("_", 1)[1])) for s in series)  # fmt: skip


def test_a_run_of_one_step_per_epoch_trains(features, tmp_path):
    """Two series to train on and 3 epochs (3 optimizer steps): the schedule copes (torch's
    OneCycleLR divided by zero here, found by scripts/gpu_check.sh's smoke run)."""
    small = tmp_path / "small.parquet"
    write_embeddings(small, folds=2, per_fold=2)
    r = fit(SeqConfig(protocol="pooled", features=str(small), valid_fold=1, hidden=8, epochs=3, batch_series=64), str(tmp_path / "r"), log=lambda *_: None)  # fmt: skip
    assert r["epochs"] == 3 and np.isfinite(r["best_valid_loss"])


def test_features_a_cnn_trained_on_are_refused_as_validation(cnn_runs, capsys, tmp_path):
    """One CNN (validated on fold 0) embeds every fold without --oof. Before: `seq fit
    --valid-fold 1` ran and reported that CNN's in-sample score on fold 1 as its validation loss.
    Now fold 1 is refused by fit and evaluate in one line naming the CNN's validation fold; fold
    0, which that CNN held out, still trains and evaluates."""
    tmp, build, ckpts = cnn_runs
    feats = tmp_path / "in_sample.parquet"
    assert main(["embed", "--checkpoint", ckpts[0], "--shards", str(build), "--out", str(feats), "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    args = ["--features", str(feats), "--epochs", "1", "--hidden", "8", "--protocol", "per-cnn"]
    assert main(["seq", "fit", *args, "--valid-fold", "1", "--out", str(tmp_path / "r1")]) == 2
    line = one_error_line(capsys, "seq fit")
    assert "--valid-fold 1:" in line and "validated on fold 0" in line and "--oof" in line
    assert not (tmp_path / "r1" / "best.pt").exists()
    assert main(["seq", "fit", *args, "--valid-fold", "0", "--out", str(tmp_path / "r0")]) == 0
    capsys.readouterr()
    ev = ["seq", "evaluate", "--checkpoint", str(tmp_path / "r0" / "best.pt"), "--features", str(feats)]  # fmt: skip
    assert main([*ev, "--fold", "1", "--out", str(tmp_path / "e1.parquet")]) == 2
    assert "--fold 1:" in one_error_line(capsys, "seq evaluate")
    assert main([*ev, "--fold", "0", "--out", str(tmp_path / "e0.parquet")]) == 0
