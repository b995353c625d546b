"""`ich-train predict --seq`: the stage-2 submission from fold CNNs and sequence checkpoints."""

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


def test_stage_two_submission_averages_every_cnn_and_sequence_model(cnn_runs, tmp_path, capsys):  # noqa: F811
    """Two fold CNNs, one sequence model trained on their out-of-fold features: the submission's
    values are the mean over the CNNs of the sequence model run on each CNN's own test features
    (computed here step by step); unreadable images get the prior; a CNN the sequence model never
    saw is refused in one line."""
    tmp, build, ckpts = cnn_runs
    feats = tmp_path / "oof.parquet"
    embed(ckpts, str(build), str(feats), oof=True, workers=0, progress=False)
    run = tmp_path / "seq"
    assert main(["seq", "fit", "--features", str(feats), "--valid-fold", "0", "--protocol", "pooled", "--out", str(run), "--epochs", "2", "--hidden", "8"]) == 0  # fmt: skip
    test = make_build(tmp_path / "test", test=True, per_shard=12, size=32, series_len=4, error_rows=2, seed=9)  # fmt: skip
    sub = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", *ckpts, "--seq", str(run / "best.pt"), "--shards", str(test), "--out", str(sub), "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    got = pd.read_csv(sub).set_index("ID")["Label"]
    assert len(got) == 6 * 14 and got.between(0, 1).all()
    ck = torch.load(run / "best.pt", weights_only=True)
    seq = SeqModel(**ck["model_args"])
    seq.load_state_dict(ck["model"])
    want = {}
    for i, c in enumerate(ckpts):
        embed([c], str(test), str(tmp_path / f"t{i}.parquet"), workers=0, progress=False)
        series, _ = read_embeddings(str(tmp_path / f"t{i}.parquet"))
        p = predict_series(seq, series)
        for image_id, row in zip(p["ids"], p["probs"], strict=True):
            want[image_id] = want.get(image_id, 0) + row / len(ckpts)
    assert len(want) == 12
    for image_id, row in want.items():
        np.testing.assert_allclose([got[f"{image_id}_{lab}"] for lab in LABELS], row, rtol=1e-4, atol=1e-6)  # fmt: skip
    prior = np.mean([torch.load(c, weights_only=True)["prior"] for c in ckpts], axis=0)
    np.testing.assert_allclose([got[f"ID_bad00000_{lab}"] for lab in LABELS], prior, rtol=1e-5)
    other = tmp_path / "other"
    cnn_fit(TrainConfig(shards=str(build), out=str(other), model="resnet10t", image_size=32, batch_size=8,
                        epochs=1, workers=0, progress=False, valid_fold=0, seed=5))  # fmt: skip
    capsys.readouterr()  # seq fit's warning: this build has no slice positions
    assert main(["predict", "--checkpoint", str(other / "last.pt"), "--seq", str(run / "best.pt"), "--shards", str(test), "--out", str(tmp_path / "x.csv"), "--workers", "0", "--no-progress"]) == 2  # fmt: skip
    assert "trained on features of other CNNs" in one_error_line(capsys, "predict")
    # a sequence model of the CNN logits alone (--inputs logits) takes the same CNNs' test features
    lo = tmp_path / "seq_logits"
    assert main(["seq", "fit", "--features", str(feats), "--valid-fold", "0", "--protocol", "pooled", "--out", str(lo), "--epochs", "2", "--hidden", "8", "--inputs", "logits"]) == 0  # fmt: skip
    both = tmp_path / "both.csv"
    assert main(["predict", "--checkpoint", *ckpts, "--seq", str(run / "best.pt"), str(lo / "best.pt"), "--shards", str(test), "--out", str(both), "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    assert len(pd.read_csv(both)) == 6 * 14


def test_tta_must_match_the_embeddings_the_sequence_model_learned_from(cnn_runs, tmp_path, capsys):  # noqa: F811
    """Sequence models trained on out-of-fold features made with --tta hflip and without it.
    Before: `predict --seq` ran either with either --tta (the mean of a slice's and its mirror's
    features fed to a model that learned single views, and the reverse). Now a mismatch is one
    line naming the --tta the embeddings used; the matching --tta writes the submission."""
    tmp, build, ckpts = cnn_runs
    test = make_build(tmp_path / "test", test=True, per_shard=8, size=32, series_len=4, seed=4)
    runs = {}
    for name, tta in (("flip", ("hflip",)), ("plain", ())):
        embed(ckpts, str(build), str(tmp_path / f"{name}.parquet"), oof=True, tta=tta, workers=0, progress=False)  # fmt: skip
        runs[name] = tmp_path / f"seq_{name}"
        assert main(["seq", "fit", "--features", str(tmp_path / f"{name}.parquet"), "--valid-fold", "0", "--protocol", "pooled", "--out", str(runs[name]), "--epochs", "1", "--hidden", "8"]) == 0  # fmt: skip
    capsys.readouterr()
    common = ["--checkpoint", *ckpts, "--shards", str(test), "--workers", "0", "--no-progress"]
    assert main(["predict", *common, "--seq", str(runs["flip"] / "best.pt"), "--out", str(tmp_path / "a.csv")]) == 2  # fmt: skip
    assert "made with --tta 'hflip', this predict uses --tta 'none'" in one_error_line(capsys, "predict")  # fmt: skip
    assert main(["predict", *common, "--seq", str(runs["plain"] / "best.pt"), "--tta", "hflip", "--out", str(tmp_path / "b.csv")]) == 2  # fmt: skip
    assert "made with --tta 'none', this predict uses --tta 'hflip'" in one_error_line(capsys, "predict")  # fmt: skip
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()
    assert main(["predict", *common, "--seq", str(runs["flip"] / "best.pt"), "--tta", "hflip", "--out", str(tmp_path / "c.csv")]) == 0  # fmt: skip
    assert len(pd.read_csv(tmp_path / "c.csv")) == 6 * 8


def test_embed_oof_refuses_to_mix_2d_and_2_5d_cnns(cnn_runs, tmp_path, capsys):  # noqa: F811
    """Fold 0's CNN reads single slices, fold 1's (--context 1) three. Before: `embed --oof` wrote
    one file of both CNNs' features and the sequence model trained on one kind, validated on the
    other. Now it is one line naming both inputs; nothing is written."""
    tmp, build, ckpts = cnn_runs
    ctx = tmp_path / "ctx1"
    cnn_fit(TrainConfig(shards=str(build), out=str(ctx), model="resnet10t", image_size=32, batch_size=8,
                        epochs=1, workers=0, progress=False, valid_fold=1, context=1))  # fmt: skip
    out = tmp_path / "mixed.parquet"
    assert main(["embed", "--checkpoint", ckpts[0], str(ctx / "last.pt"), "--oof", "--shards", str(build), "--out", str(out), "--workers", "0", "--no-progress"]) == 2  # fmt: skip
    line = one_error_line(capsys, "embed")
    assert (
        "trained on --context 1" in line
        and "on 2D (no --context)" in line
        and "must not mix" in line
    )
    assert not out.exists()
