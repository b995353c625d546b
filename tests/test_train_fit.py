"""fit(): learning on a synthetic set, run folder contents, checkpoints, resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import ich_train.train as train_mod
from ich_train.checkpoint import load_checkpoint
from ich_train.cli import main
from ich_train.config import ConfigError, TrainConfig
from ich_train.train import fit
from tests.train_fixtures import make_build

# trains models for several epochs (and kills and resumes them): not in `make test-fast`
pytestmark = pytest.mark.slow

TINY = dict(
    model="resnet10t", image_size=32, batch_size=8, workers=0, progress=False, shuffle_buffer=16
)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One CLI fit: 3 folds of 48 learnable images, 4 epochs (the head starts at the prior with zero
    weights: the trunk learns from the second step); returns (run dir, printed text)."""
    root = tmp_path_factory.mktemp("fit")
    shards = make_build(root / "shards", folds=3, per_shard=48, size=32, seed=1)
    out = root / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["fit", "--shards", str(shards), "--out", str(out), "--valid-fold", "2", "--model", "resnet10t",
                   "--epochs", "4", "--batch-size", "16", "--lr", "2e-3", "--workers", "0", "--no-progress"])  # fmt: skip
    assert rc == 0
    return out, buf.getvalue()


def test_fit_learns_well_below_the_prior_baseline(learned):
    """Best validation loss is well under the constant-prior loss and AUC(any) > 0.9."""
    out, _ = learned
    m = pd.read_csv(out / "metrics.csv")
    best = m.loc[m["valid_loss"].idxmin()]
    assert best["valid_loss"] < 0.8 * best["prior_loss"]
    assert best["valid_auc_any"] > 0.9


def test_fp16_with_loss_scaling_learns_like_fp32(learned, tmp_path):
    """The `learned` run again with --precision fp16 (float16 autocast and a GradScaler, on the
    CPU): every epoch's train and validation loss within 0.02 of fp32's (measured: 0.003), and
    it learns as far below the prior baseline; metrics.csv counts the skipped steps (none here)."""
    ref, _ = learned
    cfg = json.loads((ref / "config.json").read_text())
    out = tmp_path / "fp16"
    fit(TrainConfig.from_dict({**cfg, "out": str(out), "precision": "fp16", "report": False}))
    a, b = pd.read_csv(ref / "metrics.csv"), pd.read_csv(out / "metrics.csv")
    for col in ("train_loss", "valid_loss"):
        assert (a[col] - b[col]).abs().max() < 0.02, (col, a[col].tolist(), b[col].tolist())
    assert b["valid_loss"].min() < 0.8 * b["prior_loss"].iloc[0]
    assert list(b["train_overflow_steps"]) == [0, 0, 0, 0]
    assert load_checkpoint(out / "last.pt")["precision"] == "fp16"


def test_fit_prints_prior_baseline_and_model_loss(learned):
    """A person sees both numbers: the prior baseline and the model's validation loss."""
    _, text = learned
    assert "prior baseline (training label frequencies)" in text
    assert "best valid weighted log loss" in text and "vs prior baseline" in text


def test_run_folder_has_config_metrics_plot_and_checkpoints(learned):
    """config.json, one metrics.csv row per epoch, metrics.png, last.pt and best.pt."""
    out, _ = learned
    assert json.loads((out / "config.json").read_text())["model"] == "resnet10t"
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [0, 1, 2, 3]
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()


def test_checkpoints_load_with_weights_only(learned):
    """torch.load(weights_only=True) reads them: only tensors and python primitives inside."""
    out, _ = learned
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / name, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scheduler", "step", "epoch", "config", "rng"} <= set(ckpt)
        assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
        assert TrainConfig.from_dict(ckpt["config"]).model == "resnet10t"
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4 * (96 // 16)


class Preempted(Exception):
    pass


def _resume_cfg(root, out, **kw):
    return TrainConfig(
        shards=str(root), out=str(out), valid_fold=1, epochs=2, **{**TINY, "lr": 1e-3, **kw}
    )


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """An uninterrupted 2-epoch run and one preempted after epoch 1 then resumed."""
    tmp = tmp_path_factory.mktemp("resume")
    root = make_build(tmp / "shards", folds=2, per_shard=24, size=32)
    fit(_resume_cfg(root, tmp / "straight"))
    real, calls = train_mod.train_one_epoch, []

    def preempt_second_epoch(*a, **kw):
        if kw["epoch"] == 1:
            raise Preempted
        return real(*a, **kw)

    def count(*a, **kw):
        calls.append(kw["epoch"])
        return real(*a, **kw)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(train_mod, "train_one_epoch", preempt_second_epoch)
        with pytest.raises(Preempted):
            fit(_resume_cfg(root, tmp / "resumed"))
        saved = load_checkpoint(tmp / "resumed" / "last.pt")
        mp.setattr(train_mod, "train_one_epoch", count)
        fit(
            _resume_cfg(root, tmp / "resumed", workers=1), resume=True
        )  # a runtime field may change
    finally:
        mp.undo()
    return tmp, root, saved, calls


def test_resume_continues_from_the_saved_epoch_and_step(resumed):
    """The resumed run trains only epoch 2, continuing the step count, and the CSV has one row per epoch."""
    tmp, _, saved, calls = resumed
    assert saved["epoch"] == 0 and saved["step"] == 24 // 8
    assert calls == [1]
    m = pd.read_csv(tmp / "resumed" / "metrics.csv")
    assert list(m["epoch"]) == [0, 1] and list(m["step"]) == [3, 6]


def test_resume_matches_an_uninterrupted_run(resumed):
    """Weights and optimizer state after preempt + resume equal those of a straight run."""
    tmp, _, _, _ = resumed
    a, b = (
        load_checkpoint(tmp / "straight" / "last.pt"),
        load_checkpoint(tmp / "resumed" / "last.pt"),
    )
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k])
    for pid, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(state["exp_avg_sq"], b["optimizer"]["state"][pid]["exp_avg_sq"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6


def test_resume_refuses_a_config_that_changes_training(resumed):
    """Resuming with another --lr fails before training, naming the field."""
    tmp, root, _, _ = resumed
    with pytest.raises(ConfigError, match="--lr"):
        fit(_resume_cfg(root, tmp / "resumed", lr=5e-3), resume=True)


def test_fresh_fit_refuses_an_existing_run(resumed):
    """Without --resume an existing run folder is not overwritten."""
    tmp, root, _, _ = resumed
    with pytest.raises(ConfigError, match="pass --resume"):
        fit(_resume_cfg(root, tmp / "straight"))


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    """A missing build exits 2 with a message saying what to run."""
    assert main(["fit", "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "ich-prep build" in capsys.readouterr().err


def test_gradient_accumulation_steps_once_per_accum_batches(tmp_path):
    """--accum-steps 2 with 24 images of batch 4: 6 batches, 3 optimizer steps per epoch."""
    root = make_build(tmp_path / "shards", folds=2, per_shard=24, size=32)
    cfg = TrainConfig(shards=str(root), out=str(tmp_path / "run"), valid_fold=1, epochs=1, accum_steps=2,
                      **{**TINY, "batch_size": 4})  # fmt: skip
    fit(cfg)
    m = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(m["step"]) == [3] and list(m["train_images"]) == [24]


MID_EPOCH = ["--valid-fold", "1", "--model", "resnet10t", "--image-size", "32", "--batch-size", "8",
             "--epochs", "2", "--lr", "1e-3", "--shuffle-buffer", "16", "--workers", "2", "--no-progress",
             "--ema", "0.9"]  # fmt: skip


@pytest.fixture(scope="module")
def killed_mid_epoch(tmp_path_factory):
    """A straight 2-epoch run (7 steps each, 2 loader workers), and the same run killed with
    SIGKILL inside epoch 1 (checkpointing every step) then resumed; returns the folders and the
    checkpoint the kill left."""
    tmp = tmp_path_factory.mktemp("midepoch")
    root = make_build(tmp / "shards", folds=2, per_shard=56, size=32)
    assert main(["fit", "--shards", str(root), "--out", str(tmp / "straight"), *MID_EPOCH]) == 0
    out = tmp / "killed"
    cmd = [sys.executable, "-m", "ich_train", "fit", "--shards", str(root), "--out", str(out),
           *MID_EPOCH, "--checkpoint-every", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same floats as in here
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "last.pt").exists():
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    left = load_checkpoint(out / "last.pt")
    assert main(["fit", "--shards", str(root), "--out", str(out), *MID_EPOCH, "--resume"]) == 0
    return tmp, root, left


def test_kill_inside_an_epoch_leaves_a_mid_epoch_checkpoint(killed_mid_epoch):
    """With --checkpoint-every 1 the kill lands after step 1..6 of the first epoch's 7."""
    _, _, left = killed_mid_epoch
    assert left["epoch"] == 0 and 1 <= left["epoch_progress"]["step"] < 7
    assert left["step"] == left["epoch_progress"]["step"]


def test_resume_inside_an_epoch_equals_an_uninterrupted_run(killed_mid_epoch):
    """kill -9 mid-epoch then --resume: the same weights, optimizer state and metrics, bit for bit."""
    tmp, _, _ = killed_mid_epoch
    a, b = (
        load_checkpoint(tmp / "straight" / "last.pt"),
        load_checkpoint(tmp / "killed" / "last.pt"),
    )
    assert a["step"] == b["step"] == 14 and "epoch_progress" not in b
    for weights in ("model", "model_train"):  # EMA and trained weights (the run uses --ema)
        for k in a[weights]:
            assert torch.equal(a[weights][k], b[weights][k]), (weights, k)
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"])
    ma, mb = (
        pd.read_csv(tmp / "straight" / "metrics.csv"),
        pd.read_csv(tmp / "killed" / "metrics.csv"),
    )
    cols = ["epoch", "step", "train_loss", "train_images", "valid_loss", "valid_auc_any"]
    pd.testing.assert_frame_equal(ma[cols], mb[cols])


def test_mid_epoch_resume_refuses_other_loader_workers(killed_mid_epoch):
    """A checkpoint saved inside an epoch names --workers when resumed with another worker count."""
    tmp, root, left = killed_mid_epoch
    run = tmp / "again"
    run.mkdir()
    shutil.copyfile(tmp / "killed" / "config.json", run / "config.json")
    torch.save(left, run / "last.pt")
    cfg = TrainConfig.from_dict({**left["config"], "out": str(run), "workers": 1})
    with pytest.raises(ConfigError, match="--workers 2"):
        fit(cfg, resume=True)


def test_bf16_precision_autocasts_on_cpu_and_still_learns(tmp_path):
    """--precision bf16 runs the model under bf16 autocast (here on the CPU) and the epoch's losses are finite."""
    from ich_train.engine import autocast

    with autocast(torch.device("cpu"), "bf16"):
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "auto"):  # auto: fp32 off the GPU
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.float32
    root = make_build(tmp_path / "shards", folds=2, per_shard=24, size=32)
    cfg = TrainConfig(shards=str(root), out=str(tmp_path / "run"), valid_fold=1, epochs=1,
                      precision="bf16", **TINY)  # fmt: skip
    summary = fit(cfg)
    assert 0 < summary["last"]["train_loss"] < 10 and 0 < summary["best_valid_loss"] < 10


def test_optimizer_is_fused_adamw_without_decay_on_norms_and_biases():
    """fit's AdamW uses the fused kernel (CPU here, CUDA on a GPU); 1-d parameters get no decay."""
    from ich_train.optim import create_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = create_optimizer(model, 1e-3, 0.05, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    decay = {g["weight_decay"]: sorted(p.ndim for p in g["params"]) for g in opt.param_groups}
    assert decay == {0.0: [1, 1, 1], 0.05: [4]}  # conv bias, bn weight and bias | conv weight
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_model_trains_and_saves_plain_weights(tmp_path):
    """--compile (inductor, here on the CPU) trains an epoch; the checkpoint's keys load into an uncompiled model."""
    from ich_train.model import create_model

    root = make_build(tmp_path / "shards", folds=2, per_shard=24, size=32)
    cfg = TrainConfig(shards=str(root), out=str(tmp_path / "run"), valid_fold=1, epochs=1,
                      compile=True, **TINY)  # fmt: skip
    assert 0 < fit(cfg)["best_valid_loss"] < 10
    state = load_checkpoint(tmp_path / "run" / "best.pt")["model"]
    assert not [k for k in state if "_orig_mod" in k]
    create_model("resnet10t").load_state_dict(state)


def test_ema_weights_are_validated_saved_and_predicted_with(tmp_path):
    """--ema: the averaged weights differ from the trained ones; metrics.csv, best.pt's "model" and
    evaluate() all describe the averaged weights, and "model_train" keeps the raw ones for --resume."""
    from ich_train.infer import evaluate

    root = make_build(tmp_path / "shards", folds=2, per_shard=24, size=32)
    cfg = TrainConfig(shards=str(root), out=str(tmp_path / "run"), valid_fold=1, epochs=2,
                      ema=0.9, **TINY)  # fmt: skip
    fit(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    differs = [
        k for k in ckpt["model"] if not torch.equal(ckpt["model"][k], ckpt["model_train"][k])
    ]
    assert "conv1.0.weight" in differs
    logged = pd.read_csv(tmp_path / "run" / "metrics.csv")["valid_loss"].iloc[-1]
    m = evaluate(str(tmp_path / "run" / "last.pt"), str(root), 1, workers=0, progress=False)
    assert m["valid_loss"] == pytest.approx(logged, rel=1e-6)


@pytest.mark.parametrize("opt", ["radam", "sgd"])
def test_any_timm_optimizer_trains_an_epoch(tmp_path, opt):
    """--opt radam / sgd: one short CPU epoch through timm's optimizer factory, recorded in the
    config; the optimizer state in last.pt is that optimizer's."""
    shards = make_build(tmp_path / "s", folds=2, per_shard=16, size=32)
    out = tmp_path / "run"
    assert main(["fit", "--shards", str(shards), "--out", str(out), "--model", "resnet10t", "--image-size", "32",
                 "--batch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress", "--valid-fold", "1",
                 "--opt", opt, "--lr", "1e-3"]) == 0  # fmt: skip
    assert json.loads((out / "config.json").read_text())["opt"] == opt
    state = load_checkpoint(out / "last.pt", keys=("optimizer",))["optimizer"]["state"]
    first = next(iter(state.values()))
    assert ("momentum_buffer" in first) if opt == "sgd" else ("exp_avg_sq" in first)
    assert pd.read_csv(out / "metrics.csv")["train_loss"].notna().all()


def test_inception_v3_at_299_trains_evaluates_and_predicts(tmp_path, capsys):
    """--model inception_v3 --image-size 299 (the Spark pipeline's choice), end to end on CPU: one
    short epoch, evaluate on the held-out fold, a submission for a test build."""
    shards = make_build(tmp_path / "s", folds=2, per_shard=8, size=64)
    test = make_build(tmp_path / "t", test=True, per_shard=4, size=64)
    run = tmp_path / "run"
    common = ["--workers", "0", "--no-progress"]
    assert main(["fit", "--shards", str(shards), "--out", str(run), "--model", "inception_v3", "--image-size", "299",
                 "--batch-size", "4", "--epochs", "1", "--valid-fold", "1", *common]) == 0  # fmt: skip
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--shards", str(shards), "--fold", "1", *common]) == 0  # fmt: skip
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["config"]["model"] == "inception_v3" and ckpt["image_size"] == 299
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--shards", str(test), "--out", str(tmp_path / "s.csv"), *common]) == 0  # fmt: skip
    assert len(pd.read_csv(tmp_path / "s.csv")) == 4 * 6
