"""--precision fp16: what `auto` picks per device, fp16 autocast with a GradScaler on the CPU,
skipped (overflow) steps counted, and the loss scale carried through a resume inside an epoch."""

import pandas as pd
import pytest
import torch

import ich_train.train as train_mod
from ich_train.checkpoint import load_checkpoint
from ich_train.config import TrainConfig
from ich_train.distributed import Dist
from ich_train.engine import autocast, grad_scaler, resolve_precision, train_one_epoch
from ich_train.train import fit, run_precision
from tests.train_fixtures import make_build

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("native, chosen", [(True, "bf16"), (False, "fp16")])
def test_auto_picks_bf16_only_where_the_gpu_runs_it_natively(monkeypatch, native, chosen):
    """auto on CUDA asks torch whether bf16 is native (emulation excluded: a T4 or V100 emulates
    it slowly) and picks bf16 or fp16; on the CPU it is fp32; an explicit choice stays itself."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # what torch answers on a T4: emulated, not native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", CUDA) == chosen
    assert asked == [False]
    assert resolve_precision("auto", CPU) == "fp32"
    for p in ("bf16", "fp16", "fp32"):
        assert resolve_precision(p, CUDA) == resolve_precision(p, CPU) == p


def test_resumed_auto_run_keeps_what_it_chose_when_it_started():
    """--resume of a --precision auto run uses the precision its checkpoint records (the same
    run on another card continues as it began); an explicit --precision is itself."""
    cfg = TrainConfig(shards="s", out="o")
    assert run_precision(cfg, CPU, None) == "fp32"
    assert run_precision(cfg, CPU, {"precision": "fp16"}) == "fp16"
    assert run_precision(cfg, CPU, {"precision": "bogus"}) == "fp32"  # an edited file: ignored
    assert run_precision(TrainConfig(shards="s", out="o", precision="bf16"), CPU, {"precision": "fp16"}) == "bf16"  # fmt: skip


def test_fp16_autocasts_on_the_cpu_and_only_fp16_scales_the_loss():
    """torch runs float16 autocast on the CPU; the GradScaler is on for fp16 alone."""
    with autocast(CPU, "fp16"):
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.float16
    assert grad_scaler(CPU, "fp16").is_enabled()
    assert not any(grad_scaler(CPU, p).is_enabled() for p in ("auto", "bf16", "fp32"))


def _epoch(scaler, steps=3):
    """One train_one_epoch of a tiny conv net in fp16 on the CPU; (its row, weights before, after)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(6)
    )
    model(torch.zeros(1, 3, 8, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randint(0, 255, (4, 3, 8, 8), generator=g, dtype=torch.uint8),
                "label": torch.randint(0, 2, (4, 6), generator=g).float()} for _ in range(steps)]  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    row = train_one_epoch(
        model, batches, opt, sched, torch.nn.BCEWithLogitsLoss(),
        lambda x, train, generator: x.float() / 255, epoch=0, dist=Dist(0, 1, 0, CPU),
        precision="fp16", progress=False, scaler=scaler, grad_clip=1.0,
    )  # fmt: skip
    return row, before, list(model.parameters())


def test_overflowing_steps_are_skipped_and_counted():
    """A loss scale so large that the fp16 gradients overflow: every step is skipped (weights
    unchanged) and counted in train_overflow_steps; the default scale trains with none skipped."""
    row, before, after = _epoch(torch.amp.GradScaler("cpu", init_scale=2.0**40))
    assert row["train_overflow_steps"] == 3
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    row, before, after = _epoch(grad_scaler(CPU, "fp16"))
    assert row["train_overflow_steps"] == 0
    assert not any(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_gradients_are_unscaled_before_clipping(monkeypatch):
    """--grad-clip sees the true gradients: the norm clip_grad_norm_ measures under fp16 is the
    size of an unscaled gradient (well under 1 here), not 2^16 times it."""
    import ich_train.engine as engine

    norms, clip = [], torch.nn.utils.clip_grad_norm_

    def record(params, max_norm):
        params = list(params)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        return clip(params, max_norm)

    monkeypatch.setattr(engine.torch.nn.utils, "clip_grad_norm_", record)
    _epoch(grad_scaler(CPU, "fp16"))
    assert len(norms) == 3 and all(0 < n < 100 for n in norms), norms


class Preempted(Exception):
    pass


TINY16 = dict(model="resnet10t", image_size=32, batch_size=4, accum_steps=2, workers=0,
              progress=False, shuffle_buffer=16, epochs=2, lr=1e-3, ema=0.9, precision="fp16",
              valid_fold=1, report=False, checkpoint_every=1)  # fmt: skip


@pytest.fixture(scope="module")
def fp16_resumed(tmp_path_factory):
    """fp16 with gradient accumulation, clipping and EMA: a straight 2-epoch run (3 steps of 2 x 4
    images each), and the same run stopped just after its mid-epoch checkpoint at step 2 of epoch
    0 then resumed; returns the folder and the checkpoint the stop left."""
    tmp = tmp_path_factory.mktemp("fp16")
    root = make_build(tmp / "shards", folds=2, per_shard=24, size=32)
    fit(TrainConfig(shards=str(root), out=str(tmp / "straight"), **TINY16))
    real = train_mod.Run.checkpoint_mid_epoch

    def stop_at_step_2(self, epoch, gen, progress):
        real(self, epoch, gen, progress)
        if progress["step"] == 2:
            raise Preempted

    cfg = TrainConfig(shards=str(root), out=str(tmp / "stopped"), **TINY16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod.Run, "checkpoint_mid_epoch", stop_at_step_2)
        with pytest.raises(Preempted):
            fit(cfg)
    left = load_checkpoint(tmp / "stopped" / "last.pt")
    fit(cfg, resume=True)
    return tmp, left


def test_fp16_checkpoints_record_the_precision_and_the_loss_scale(fp16_resumed):
    """The mid-epoch last.pt says fp16 and holds the scaler's state after step 2."""
    _, left = fp16_resumed
    assert left["precision"] == "fp16" and left["epoch_progress"]["step"] == 2
    assert left["scaler"]["scale"] == 2.0**16 and left["scaler"]["_growth_tracker"] == 2


def test_fp16_resume_inside_an_epoch_equals_an_uninterrupted_run(fp16_resumed):
    """Stopped inside epoch 0 and resumed: trained and EMA weights, optimizer moments and the
    loss scaler's state equal the straight run's bit for bit, and so do the metrics rows
    (skipped-step counts included)."""
    tmp, _ = fp16_resumed
    a, b = load_checkpoint(tmp / "straight" / "last.pt"), load_checkpoint(tmp / "stopped" / "last.pt")  # fmt: skip
    assert a["step"] == b["step"] == 6
    for weights in ("model", "model_train"):
        for k in a[weights]:
            assert torch.equal(a[weights][k], b[weights][k]), (weights, k)
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][pid]["exp_avg_sq"])
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 6
    cols = ["epoch", "step", "train_loss", "valid_loss", "train_overflow_steps"]
    ma, mb = (pd.read_csv(tmp / run / "metrics.csv")[cols] for run in ("straight", "stopped"))
    pd.testing.assert_frame_equal(ma, mb)
