"""evaluate (metrics + out-of-fold Parquet) and predict (Kaggle submission)."""

import numpy as np
import pandas as pd
import pytest

from ich_prep import LABELS
from ich_train.cli import main
from ich_train.config import TrainConfig
from ich_train.infer import evaluate, predict_submission
from ich_train.metrics import weighted_log_loss
from ich_train.report import read_predictions
from ich_train.submission import SubmissionError, check_submission, write_submission
from ich_train.train import fit
from tests.train_fixtures import make_build

RUN = dict(
    model="resnet10t",
    image_size=32,
    batch_size=8,
    epochs=1,
    workers=0,
    progress=False,
    valid_fold=1,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two 1-epoch checkpoints (seeds 0 and 1), a train build and a test build with 2 unreadable images."""
    tmp = tmp_path_factory.mktemp("pred")
    train = make_build(tmp / "train", folds=2, per_shard=16, size=32)
    test = make_build(
        tmp / "test", test=True, per_shard=10, shards_per_fold=2, size=32, error_rows=2, seed=5
    )
    ckpts = []
    for seed in (0, 1):
        fit(TrainConfig(shards=str(train), out=str(tmp / f"run{seed}"), seed=seed, **RUN))
        ckpts.append(str(tmp / f"run{seed}" / "last.pt"))
    return tmp, train, test, ckpts


def _sub(setup, name, ckpts, tta=()):
    tmp, _, test, _ = setup
    predict_submission(ckpts, str(test), str(tmp / name), tta=tta, workers=0, progress=False)
    return pd.read_csv(tmp / name)


def test_submission_has_six_rows_per_test_image_exactly_once(setup):
    """Header ID,Label; ID_<image>_<subtype> for every image of the test index, once; values in [0, 1]."""
    tmp, _, test, ckpts = setup
    sub = _sub(setup, "one.csv", ckpts[:1])
    index = pd.read_parquet(test / "index.parquet")
    assert list(sub.columns) == ["ID", "Label"]
    assert len(sub) == 6 * len(index) == 6 * 22
    assert sorted(sub["ID"]) == sorted(f"{i}_{lab}" for i in index["image_id"] for lab in LABELS)
    assert sub["Label"].between(0, 1).all()
    assert list(sub["ID"][:6]) == [f"{index['image_id'][0]}_{lab}" for lab in LABELS]


def test_unreadable_images_get_the_training_prior(setup):
    """Index rows with status error (no sample) are predicted with the checkpoint's label prior."""
    import torch

    _, _, _, ckpts = setup
    sub = _sub(setup, "one.csv", ckpts[:1]).set_index("ID")["Label"]
    prior = torch.load(ckpts[0], weights_only=True)["prior"]
    got = [sub[f"ID_bad00000_{lab}"] for lab in LABELS]
    np.testing.assert_allclose(got, prior, rtol=1e-5)


def test_several_checkpoints_average(setup):
    """Two checkpoints give the mean of their single-checkpoint probabilities."""
    _, _, _, ckpts = setup
    a, b = _sub(setup, "a.csv", ckpts[:1]), _sub(setup, "b.csv", ckpts[1:])
    ab = _sub(setup, "ab.csv", ckpts)
    assert not np.allclose(a["Label"], b["Label"])
    np.testing.assert_allclose(ab["Label"], (a["Label"] + b["Label"]) / 2, atol=2e-6, rtol=1e-5)


def test_hflip_tta_changes_predictions_and_keeps_the_format(setup):
    """--tta hflip averages a mirrored view: different numbers, same rows."""
    tmp, _, test, ckpts = setup
    plain = _sub(setup, "one.csv", ckpts[:1])
    assert main(["predict", "--checkpoint", ckpts[0], "--shards", str(test), "--out", str(tmp / "tta.csv"),
                 "--tta", "hflip", "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    tta = pd.read_csv(tmp / "tta.csv")
    assert list(tta["ID"]) == list(plain["ID"])
    assert not np.allclose(tta["Label"], plain["Label"])


def test_evaluate_writes_out_of_fold_predictions_matching_its_metric(setup):
    """Every image of the fold once in the Parquet; its loss recomputed from the file equals the metric."""
    tmp, train, _, ckpts = setup
    m = evaluate(ckpts[0], str(train), 1, out=str(tmp / "oof.parquet"), workers=0, progress=False)
    oof = pd.read_parquet(tmp / "oof.parquet")
    index = pd.read_parquet(train / "index.parquet")
    assert sorted(oof["image_id"]) == sorted(index.loc[index["fold"] == 1, "image_id"])
    y, p = oof[list(LABELS)].to_numpy(), oof[[f"pred_{k}" for k in LABELS]].to_numpy()
    assert m["valid_loss"] == pytest.approx(weighted_log_loss(y, p))
    assert m["out_of_fold"] is True
    # the report beside it (oof.parquet -> report/): its mean log loss is the metric, and the
    # Parquet records the run's config and build for `ich-train report`
    assert m["report"] == str(tmp / "report") and (tmp / "report" / "report.html").is_file()
    table = pd.read_csv(tmp / "report" / "metrics.csv").set_index("label")
    assert table.loc["mean", "log_loss"] == pytest.approx(m["valid_loss"])
    _, meta = read_predictions(tmp / "oof.parquet")
    assert meta["config"]["model"] == "resnet10t" and len(meta["build"]["fingerprint"]) == 64


def test_check_submission_rejects_a_missing_image(tmp_path):
    """A submission lacking one image of the index fails the check."""
    path = write_submission(tmp_path / "s.csv", ["ID_a", "ID_b"], np.full((2, 6), 0.5))
    check_submission(path, ["ID_a", "ID_b"])
    with pytest.raises(SubmissionError, match="do not match"):
        check_submission(path, ["ID_a", "ID_b", "ID_c"])


def test_predict_refuses_a_build_with_other_windows(setup, tmp_path, capsys):
    """A checkpoint trained on one set of windows refuses a test build compiled with others, naming both."""
    import json
    import shutil

    import torch

    from ich_train.checkpoint import load_checkpoint

    _, _, test, ckpts = setup
    brain = [{"name": "brain", "center": 40.0, "width": 80.0},
             {"name": "subdural", "center": 80.0, "width": 200.0},
             {"name": "bone", "center": 600.0, "width": 2800.0}]  # fmt: skip
    ckpt = load_checkpoint(ckpts[0])
    ckpt["data"]["windows"] = brain
    torch.save(ckpt, tmp_path / "ckpt.pt")
    other = tmp_path / "test"
    shutil.copytree(test, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config"]["windows"] = [{**brain[0], "center": 35.0}, *brain[1:]]
    (other / "manifest.json").write_text(json.dumps(manifest))
    args = ["predict", "--checkpoint", str(tmp_path / "ckpt.pt"), "--shards", str(other),
            "--out", str(tmp_path / "s.csv"), "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'center': 40.0" in err and "'center': 35.0" in err and "--windows" in err
    assert not (tmp_path / "s.csv").exists()
    manifest["config"]["windows"] = brain  # the training build's windows: accepted
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(args) == 0


def test_predict_refuses_a_build_with_another_crop(setup, tmp_path, capsys):
    """A checkpoint trained on a --crop series build refuses a --crop slice test build (the head's
    scale and centre differ slice to slice) in one line naming both; a checkpoint from before
    `crop` was recorded under `data` takes it from its build description, and one whose build
    description has no crop (a build from before series crops) reads as slice."""
    import json
    import shutil

    import torch

    from ich_train.checkpoint import load_checkpoint

    _, _, test, ckpts = setup
    ckpt = load_checkpoint(ckpts[0])
    assert ckpt["data"]["crop"] == "series" == ckpt["data"]["build"]["config"]["crop"]
    other = tmp_path / "test"
    shutil.copytree(test, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config"]["crop"] = "slice"
    (other / "manifest.json").write_text(json.dumps(manifest))

    def run(data: dict) -> int:
        torch.save({**ckpt, "data": data}, tmp_path / "ckpt.pt")
        return main(["predict", "--checkpoint", str(tmp_path / "ckpt.pt"), "--shards", str(other),
                     "--out", str(tmp_path / "s.csv"), "--workers", "0", "--no-progress"])  # fmt: skip

    assert run(ckpt["data"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "crop = series" in err and "has slice" in err and "--crop" in err
    )
    older = {k: v for k, v in ckpt["data"].items() if k != "crop"}
    assert run(older) == 2 and "crop = series" in capsys.readouterr().err
    legacy = {**older, "build": {**older["build"], "config": {k: v for k, v in older["build"]["config"].items() if k != "crop"}}}  # fmt: skip
    assert run(legacy) == 0 and (tmp_path / "s.csv").is_file()


def test_checkpoint_records_its_input_channels_and_refuses_other_builds(setup, tmp_path, capsys):
    """fit records in_chans (the build's layout); a checkpoint taking 5 channels is refused on a
    3-channel build in one line naming both; one from before in_chans existed reads as 3."""
    import torch

    from ich_train.checkpoint import load_checkpoint
    from ich_train.model import create_model, normalization

    _, _, test, ckpts = setup
    ckpt = load_checkpoint(ckpts[0])
    assert ckpt["in_chans"] == 3 and len(ckpt["normalize"]["mean"]) == 3
    five = create_model("resnet10t", in_chans=5)
    mean, std = normalization(five, 5)
    torch.save({**ckpt, "model": five.state_dict(), "in_chans": 5,
                "normalize": {"mean": list(mean), "std": list(std)}}, tmp_path / "five.pt")  # fmt: skip
    args = ["predict", "--shards", str(test), "--out", str(tmp_path / "s.csv"), "--workers", "0", "--no-progress"]  # fmt: skip
    assert main([*args, "--checkpoint", str(tmp_path / "five.pt")]) == 2
    err = capsys.readouterr().err
    assert "takes 5-channel images" in err and "3-channel images" in err
    assert not (tmp_path / "s.csv").exists()
    old = {k: v for k, v in ckpt.items() if k != "in_chans"}
    torch.save(old, tmp_path / "old.pt")
    assert main([*args, "--checkpoint", str(tmp_path / "old.pt")]) == 0


def test_fit_ends_with_the_report_of_best_pt(tmp_path):
    """fit writes oof_fold<K>.parquet (best.pt's validation predictions, what evaluate of best.pt
    gives) and report_fold<K>/report.html beside its checkpoints; --no-report writes neither."""
    root = make_build(tmp_path / "b", folds=2, per_shard=16, size=32)
    fit(TrainConfig(shards=str(root), out=str(tmp_path / "run"), **{**RUN, "epochs": 2}))
    got = pd.read_parquet(tmp_path / "run" / "oof_fold1.parquet").set_index("image_id")
    assert (tmp_path / "run" / "report_fold1" / "report.html").is_file()
    m = evaluate(str(tmp_path / "run" / "best.pt"), str(root), 1, out=str(tmp_path / "e.parquet"), workers=0, progress=False, report=False)  # fmt: skip
    want = pd.read_parquet(m["predictions"]).set_index("image_id")
    cols = [f"pred_{lab}" for lab in LABELS]
    np.testing.assert_allclose(got.loc[want.index, cols].to_numpy(), want[cols].to_numpy(), atol=1e-5)  # fmt: skip
    fit(TrainConfig(shards=str(root), out=str(tmp_path / "quiet"), report=False, **RUN))
    assert not list((tmp_path / "quiet").glob("*fold1*"))
