"""Weight averaging: `fit --average-last N` (epoch<K>.pt kept, avg.pt written with batch-norm
statistics recomputed), `ich-train average`, avg.pt loading wherever a checkpoint does, and
checkpoints of different runs refused in one line."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ich_train.average import mean_weights
from ich_train.checkpoint import load_checkpoint
from ich_train.cli import main
from ich_train.config import ConfigError, TrainConfig
from ich_train.embed import embed
from ich_train.infer import evaluate
from ich_train.seq import SeqConfig
from ich_train.seq import fit as seq_fit
from ich_train.train import fit
from tests.train_fixtures import make_build

RUN = dict(model="resnet10t", image_size=32, batch_size=8, workers=0, progress=False,
           shuffle_buffer=16, epochs=3, lr=1e-3, valid_fold=1, report=False, average_last=2,
           precision="fp16")  # fmt: skip


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    """A 3-epoch fp16 run (3 steps an epoch) on a series-aware build with --average-last 2."""
    tmp = tmp_path_factory.mktemp("avg")
    root = make_build(tmp / "shards", folds=2, per_shard=24, size=32, series_len=6)
    out = tmp / "run"
    fit(TrainConfig(shards=str(root), out=str(out), **RUN))
    return tmp, root, out


def _bn(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_average_last_keeps_the_epochs_and_writes_their_mean(averaged):
    """epoch2.pt and epoch3.pt are kept (not epoch1.pt); avg.pt holds their mean weights, and
    batch-norm statistics recomputed on training batches (not the mean of theirs)."""
    _, _, out = averaged
    assert sorted(p.name for p in out.glob("epoch*.pt")) == ["epoch2.pt", "epoch3.pt"]
    a, b = (load_checkpoint(out / f"epoch{e}.pt")["model"] for e in (2, 3))
    avg = load_checkpoint(out / "avg.pt")
    assert avg["averaged"]["batch_norm"].startswith("recomputed on 24 training images")
    assert [c["epoch"] for c in avg["averaged"]["checkpoints"]] == [1, 2]
    assert "optimizer" not in avg and avg["precision"] == "fp16"
    mean = mean_weights([a, b])
    weights = [k for k in mean if not _bn(k)]
    assert weights and all(torch.equal(avg["model"][k], mean[k]) for k in weights)
    assert not torch.equal(avg["model"]["bn1.running_var"], mean["bn1.running_var"])


def test_averaged_checkpoint_evaluates_predicts_and_embeds_for_seq_fit(averaged, tmp_path):
    """avg.pt (of an fp16 run) goes where any checkpoint goes: evaluate (finite loss), predict (a
    full submission), embed (both folds), and a sequence model trains on those embeddings."""
    tmp, root, out = averaged
    m = evaluate(str(out / "avg.pt"), str(root), 1, str(tmp_path / "oof.parquet"), workers=0,
                 progress=False, report=False)  # fmt: skip
    assert math.isfinite(m["valid_loss"]) and m["images"] == 24
    test = make_build(tmp_path / "test", test=True, per_shard=6, size=32)
    sub = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", str(out / "avg.pt"), "--shards", str(test), "--out",
                 str(sub), "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    assert len(pd.read_csv(sub)) == 6 * 6
    feats = tmp_path / "emb.parquet"
    r = embed([str(out / "avg.pt")], str(root), str(feats), workers=0, progress=False)
    assert r["rows"] == 48
    s = seq_fit(SeqConfig(features=str(feats), valid_fold=1, epochs=2, hidden=8, layers=1),
                str(tmp_path / "seq"), log=lambda *a: None, device="cpu")  # fmt: skip
    assert np.isfinite(s["best_valid_loss"])


def test_average_cli_recomputes_bn_with_shards_and_says_so_without(averaged, tmp_path, capsys):
    """`ich-train average` of the two epochs: with --shards the batch-norm statistics are
    recomputed on the run's training batches, without it they stay averaged, and it says so."""
    _, root, out = averaged
    cks = [str(out / "epoch2.pt"), str(out / "epoch3.pt")]
    assert main(["average", *cks, "--out", str(tmp_path / "a.pt"), "--shards", str(root),
                 "--bn-batches", "2", "--workers", "0"]) == 0  # fmt: skip
    assert "recomputed on 16 training images" in capsys.readouterr().out
    assert main(["average", *cks, "--out", str(tmp_path / "b.pt")]) == 0
    assert "statistics averaged" in capsys.readouterr().out
    b = load_checkpoint(tmp_path / "b.pt")["model"]
    mean = mean_weights([load_checkpoint(p)["model"] for p in cks])
    assert all(torch.equal(b[k], mean[k]) for k in mean)


def _variant(src, dst, **change):
    ck = torch.load(src, weights_only=True)
    for key, value in change.items():
        if key.startswith("config."):
            ck["config"][key.removeprefix("config.")] = value
        elif key == "fingerprint":
            ck["data"]["fingerprint"] = value
        else:
            ck[key] = value
    torch.save(ck, dst)
    return str(dst)


@pytest.mark.parametrize(
    "change, said",
    [
        ({"config.model": "resnet18d"}, "another model"),
        ({"fingerprint": "0" * 64}, "another build"),
        ({"config.context": 1, "in_chans": 9}, "another context"),
        ({"normalize": {"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]}}, "another normalisation"),
        ({"config.seed": 7}, "--seed 7"),
    ],
    ids=["model", "build", "context", "normalisation", "seed"],
)
def test_average_refuses_checkpoints_of_different_runs_in_one_line(averaged, tmp_path, capsys, change, said):  # fmt: skip
    """A checkpoint of another model, build, context, normalisation or training setting: exit 2,
    one line naming it, nothing written."""
    _, _, out = averaged
    other = _variant(out / "epoch3.pt", tmp_path / "other.pt", **change)
    dst = tmp_path / "avg.pt"
    assert main(["average", str(out / "epoch2.pt"), other, "--out", str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1 and err.startswith("ich-train average:")
    assert not dst.exists()


def test_average_refuses_edited_weights_and_bn_batches_without_shards(averaged, tmp_path, capsys):
    """Weights of another shape under an agreeing config, and --bn-batches without --shards:
    exit 2, one line each."""
    _, _, out = averaged
    ck = torch.load(out / "epoch3.pt", weights_only=True)
    ck["model"]["fc.bias"] = torch.zeros(7)
    torch.save(ck, tmp_path / "edited.pt")
    args = ["average", str(out / "epoch2.pt"), str(tmp_path / "edited.pt"), "--out", str(tmp_path / "a.pt")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "names or shapes differ" in err and len(err.splitlines()) == 1
    assert main([*args[:3], "--out", str(tmp_path / "b.pt"), "--bn-batches", "3"]) == 2
    assert "--bn-batches needs --shards" in capsys.readouterr().err


def test_average_refuses_to_overwrite_an_input_or_a_foreign_file(averaged, tmp_path, capsys):
    _, _, out = averaged
    cks = [str(out / "epoch2.pt"), str(out / "epoch3.pt")]
    assert main(["average", *cks, "--out", cks[0]]) == 2
    assert "is one of the checkpoints" in capsys.readouterr().err
    foreign = tmp_path / "notes.pt"
    foreign.write_text("mine")
    assert main(["average", *cks, "--out", str(foreign)]) == 2
    assert "not an averaged checkpoint" in capsys.readouterr().err
    assert foreign.read_text() == "mine"


@pytest.mark.parametrize("n", [1, 4, -1])
def test_average_last_must_be_off_or_2_to_epochs(n):
    with pytest.raises(ConfigError, match="--average-last must be (0|a whole number from 0)"):
        TrainConfig(shards="s", out="o", epochs=3, average_last=n)
