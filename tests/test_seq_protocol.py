"""seq fit --protocol per-cnn (the 2nd-place solution's): the sequence model of fold k learns
from CNN k's own embeddings of every fold and is applied with CNN k only; the files' and
checkpoints' metadata refuse every other pairing in one line (issue 20, item 7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ich_prep import LABELS
from ich_train.cli import main
from ich_train.config import TrainConfig
from ich_train.embed import embed
from ich_train.seq import SeqModel, predict_series
from ich_train.seq_data import read_embeddings
from ich_train.train import fit as cnn_fit
from tests.test_seq import cnn_runs  # noqa: F401 - the module-scoped fixture
from tests.test_train_cli_errors import one_error_line
from tests.train_fixtures import make_build

FIT = ["--epochs", "2", "--hidden", "8"]
RUN = ["--workers", "0", "--no-progress"]


def _per_cnn(cnn_runs, tmp_path, capsys):  # noqa: F811
    """Each fold CNN's embeddings of every fold, and its per-cnn sequence model."""
    tmp, build, ckpts = cnn_runs
    seqs = []
    for k, ck in enumerate(ckpts):
        embed([ck], str(build), str(tmp_path / f"emb{k}.parquet"), workers=0, progress=False)
        argv = ["seq", "fit", "--features", str(tmp_path / f"emb{k}.parquet"), "--valid-fold", str(k), "--protocol", "per-cnn", "--out", str(tmp_path / f"seq{k}"), *FIT]  # fmt: skip
        assert main(argv) == 0
        seqs.append(str(tmp_path / f"seq{k}" / "best.pt"))
    capsys.readouterr()
    return build, ckpts, seqs


def test_per_cnn_models_run_each_on_its_own_cnn(cnn_runs, tmp_path, capsys):  # noqa: F811
    """Two fold CNNs, each with a sequence model trained on its own embeddings of both folds
    (--protocol per-cnn, recorded in the checkpoint): predict --seq averages sequence model k run
    over CNN k's test features only (computed here step by step), where pooled models run over
    every CNN. seq evaluate scores model k on fold k of CNN k's file."""
    build, ckpts, seqs = _per_cnn(cnn_runs, tmp_path, capsys)
    assert all(torch.load(s, weights_only=True)["config"]["protocol"] == "per-cnn" for s in seqs)
    ev = ["seq", "evaluate", "--checkpoint", seqs[1], "--features", str(tmp_path / "emb1.parquet"), "--fold", "1"]  # fmt: skip
    assert main(ev) == 0
    test = make_build(tmp_path / "test", test=True, per_shard=12, size=32, series_len=4, seed=9)
    sub = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", *ckpts, "--seq", *seqs, "--shards", str(test), "--out", str(sub), *RUN]) == 0  # fmt: skip
    got = pd.read_csv(sub).set_index("ID")["Label"]
    want = {}
    for k, (c, s) in enumerate(zip(ckpts, seqs, strict=True)):
        ck = torch.load(s, weights_only=True)
        model = SeqModel(**ck["model_args"])
        model.load_state_dict(ck["model"])
        embed([c], str(test), str(tmp_path / f"t{k}.parquet"), workers=0, progress=False)
        p = predict_series(model, read_embeddings(str(tmp_path / f"t{k}.parquet"))[0])
        for image_id, row in zip(p["ids"], p["probs"], strict=True):
            want[image_id] = want.get(image_id, 0) + row / 2
    assert len(want) == 12
    for image_id, row in want.items():
        np.testing.assert_allclose([got[f"{image_id}_{lab}"] for lab in LABELS], row, rtol=1e-4, atol=1e-6)  # fmt: skip


def test_protocol_misuse_is_one_line(cnn_runs, tmp_path, capsys):  # noqa: F811
    """per-cnn on an out-of-fold file, pooled on one CNN's in-sample file, a per-cnn model with
    another fold's CNN or without its own, a mix of protocols, a model evaluated on another CNN's
    features: each one line, exit 2, nothing written."""
    build, ckpts, seqs = _per_cnn(cnn_runs, tmp_path, capsys)
    embed(ckpts, str(build), str(tmp_path / "oof.parquet"), oof=True, workers=0, progress=False)
    fit = ["seq", "fit", "--valid-fold", "0", *FIT]
    assert main([*fit, "--features", str(tmp_path / "oof.parquet"), "--protocol", "per-cnn", "--out", str(tmp_path / "a")]) == 2  # fmt: skip
    assert "per-cnn takes one CNN's embeddings of every fold" in one_error_line(capsys, "seq fit")
    assert main([*fit, "--features", str(tmp_path / "emb0.parquet"), "--protocol", "pooled", "--out", str(tmp_path / "b")]) == 2  # fmt: skip
    assert "not out of fold" in one_error_line(capsys, "seq fit")
    assert main([*fit, "--features", str(tmp_path / "oof.parquet"), "--protocol", "pooled", "--out", str(tmp_path / "pooled")]) == 0  # fmt: skip
    capsys.readouterr()
    test = make_build(tmp_path / "test", test=True, per_shard=8, size=32, series_len=4, seed=4)
    pred = ["predict", "--shards", str(test), "--out", str(tmp_path / "x.csv"), *RUN]
    assert main([*pred, "--checkpoint", ckpts[1], "--seq", seqs[0]]) == 2
    assert "not among --checkpoint" in one_error_line(capsys, "predict")
    assert main([*pred, "--checkpoint", *ckpts, "--seq", seqs[0]]) == 2
    assert f"--checkpoint {ckpts[1]} has no --seq model of its own" in one_error_line(capsys, "predict")  # fmt: skip
    assert main([*pred, "--checkpoint", *ckpts, "--seq", *seqs, str(tmp_path / "pooled" / "best.pt")]) == 2  # fmt: skip
    assert "mixes sequence models of --protocol per-cnn and pooled" in one_error_line(capsys, "predict")  # fmt: skip
    assert not (tmp_path / "x.csv").exists()
    other = tmp_path / "other"
    cnn_fit(TrainConfig(shards=str(build), out=str(other), model="resnet10t", image_size=32, batch_size=8,
                        epochs=1, workers=0, progress=False, valid_fold=0, seed=5))  # fmt: skip
    embed([str(other / "last.pt")], str(build), str(tmp_path / "other.parquet"), workers=0, progress=False)  # fmt: skip
    capsys.readouterr()
    ev = ["seq", "evaluate", "--checkpoint", seqs[0], "--fold", "0", "--out", str(tmp_path / "e.parquet")]  # fmt: skip
    assert main([*ev, "--features", str(tmp_path / "other.parquet")]) == 2
    assert "trained on the features of other CNNs" in one_error_line(capsys, "seq evaluate")
    assert main([*ev, "--features", str(tmp_path / "emb1.parquet")]) == 2
    assert "--fold 0:" in one_error_line(capsys, "seq evaluate")
    assert not (tmp_path / "e.parquet").exists()
