"""Model factory, local pretrained weights, and timm pretrained tags from an offline Hugging Face cache."""

import socket

import pytest
import timm
import torch
from safetensors.torch import save_file

from ich_train.model import PretrainedError, create_model, zero_init_residuals


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_any_timm_name_gives_a_six_label_head():
    """The classifier outputs one logit per label."""
    assert create_model("resnet10t")(torch.zeros(2, 3, 32, 32)).shape == (2, 6)


def test_unknown_model_names_how_to_list_models():
    """A typo in --model says how to list the valid names."""
    with pytest.raises(ValueError, match="timm.list_models"):
        create_model("resnet10tt")


def test_safetensors_imagenet_weights_load_without_network(tmp_path, no_network):
    """A 1000-class .safetensors loads into the 6-label model: backbone copied, head left new."""
    src = timm.create_model("resnet10t", num_classes=1000)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    model = create_model("resnet10t", pretrained=str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(model.conv1[0].weight, src.conv1[0].weight)
    assert model.fc.weight.shape == (6, src.fc.weight.shape[1])


def test_timm_checkpoint_with_wrapper_and_ddp_prefix_loads(tmp_path, no_network):
    """A torch checkpoint {'state_dict': {'module.*': ...}} loads too."""
    src = timm.create_model("resnet10t", num_classes=1000)
    torch.save(
        {"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3},
        tmp_path / "w.pth",
    )
    model = create_model("resnet10t", pretrained=str(tmp_path / "w.pth"))
    torch.testing.assert_close(model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    """mobilenet weights for a resnet: refused with a message naming the fix."""
    save_file(timm.create_model("mobilenetv3_small_050").state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(PretrainedError, match="another architecture"):
        create_model("resnet10t", pretrained=str(tmp_path / "m.safetensors"))


def test_missing_weights_file_says_to_download_it(tmp_path):
    """A wrong --pretrained path is named, with the fix."""
    with pytest.raises(PretrainedError, match="local path"):
        create_model("resnet10t", pretrained=str(tmp_path / "missing.safetensors"))


def test_input_channels_follow_the_layout():
    """in_chans=5 gives a model taking 5 channels, and normalisation values for 5 channels (the
    3 ImageNet values averaged, as timm adapts a stem)."""
    from ich_train.model import normalization

    model = create_model("resnet10t", in_chans=5)
    assert model.eval()(torch.zeros(1, 5, 32, 32)).shape == (1, 6)
    mean, std = normalization(model, 5)
    assert len(mean) == len(std) == 5 and mean[0] == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    assert normalization(create_model("resnet10t"), 3)[0] == (0.485, 0.456, 0.406)


def test_head_bias_starts_at_the_prior(tmp_path):
    """init_head: before any step, the model's weighted log loss on its training images is the
    prior baseline's (within 0.01); with timm's default head it is far above it (logits near 0)."""
    import numpy as np

    from ich_train.augment import AugmentParams, DeviceAugment
    from ich_train.data import Build, EvalStream
    from ich_train.metrics import label_prior, weighted_log_loss
    from ich_train.model import init_head, normalization
    from tests.train_fixtures import make_build

    build = Build(make_build(tmp_path / "b", folds=2, per_shard=32, size=32, positive_rate=0.3))
    batches = list(EvalStream(build.shards, build.encoding, 64))
    y = np.concatenate([b["label"].numpy() for b in batches])
    prior = label_prior(y)
    baseline = weighted_log_loss(y, np.broadcast_to(prior, y.shape))

    def loss(init: bool) -> float:
        torch.manual_seed(0)
        model = create_model("resnet10t").eval()
        if init:
            assert init_head(model, prior)
        aug = DeviceAugment(32, *normalization(model), AugmentParams())
        with torch.no_grad():
            p = np.concatenate([torch.sigmoid(model(aug(b["image"], train=False))).numpy() for b in batches])  # fmt: skip
        return weighted_log_loss(y, p)

    assert (
        abs(loss(True) - baseline) < 1e-9
    )  # exactly the prior: zero weights, bias at its log-odds
    assert loss(False) > baseline + 0.1


def test_local_imagenet_stem_is_adapted_to_other_channel_counts(tmp_path, no_network):
    """A 3-channel ImageNet stem for a 1- or 9-channel input (a one-window build, a 2.5D stack of
    3 slices x 3 windows) is adapted with timm's adapt_input_conv, not silently left random."""
    from timm.models import adapt_input_conv

    from ich_train.model import load_pretrained

    src = timm.create_model("resnet10t", num_classes=1000)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    w = src.conv1[0].weight
    for chans in (1, 9):
        model = create_model("resnet10t", in_chans=chans)
        report = load_pretrained(model, tmp_path / "w.safetensors")
        assert report["adapted"] == ["conv1.0.weight"] and "conv1.0.weight" not in report["missing"]
        torch.testing.assert_close(model.conv1[0].weight, adapt_input_conv(chans, w))
    # by hand: one channel is the sum over RGB; 9 channels repeat RGB 3x, scaled by 3/9
    torch.testing.assert_close(create_model("resnet10t", in_chans=1, pretrained=str(tmp_path / "w.safetensors")).conv1[0].weight, w.sum(1, keepdim=True))  # fmt: skip
    torch.testing.assert_close(adapt_input_conv(9, w)[:, 3:6], w * (3 / 9))


HF_SCRIPT = """
import sys
from safetensors.torch import save_file
from ich_train.model import PretrainedError, create_model, load_pretrained
for job in sys.argv[1:]:
    name, spec, out = job.split(",")
    model = create_model(name, in_chans=5)
    try:
        report = load_pretrained(model, spec)
    except PretrainedError as e:
        print("ERROR", e)
        continue
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    print("OK", len(report["loaded"]), report["adapted"])
"""


def write_hf_cache(home, repo: str, tensors: dict) -> None:
    """A Hugging Face cache (HF_HOME layout) holding `repo`'s model.safetensors at refs/main,
    as huggingface_hub leaves it after a download."""
    commit = "c0ffee" * 6 + "c0ff"
    entry = home / "hub" / f"models--{repo.replace('/', '--')}"
    (entry / "snapshots" / commit).mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    save_file(tensors, entry / "snapshots" / commit / "model.safetensors")


def test_timm_pretrained_tag_loads_offline_from_a_hugging_face_cache(tmp_path):
    """--pretrained timm:resnet10t.c3_in1k goes through timm and huggingface_hub, offline
    (HF_HUB_OFFLINE=1), from a cache this test builds: the backbone is the cached tensors, the stem
    adapted to 5 channels, the head new. Without the cache entry, or for another architecture, or
    an unknown tag: one PretrainedError naming the fix. Run in a fresh process so the hub reads
    the environment as a user's would."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from timm.models import adapt_input_conv

    src = timm.create_model("resnet10t", num_classes=1000).state_dict()
    write_hf_cache(tmp_path / "hf", "timm/resnet10t.c3_in1k", src)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)

    out = str(tmp_path / "m.safetensors")
    jobs = [
        f"resnet10t,timm:resnet10t.c3_in1k,{out}",
        "resnet14t,timm:resnet14t.c3_in1k,-",  # not in the cache, and the hub is offline
        "resnet10t,timm:resnet18.a1_in1k,-",
        "resnet10t,timm:resnet10t.nope,-",
    ]
    r = subprocess.run([sys.executable, "-c", HF_SCRIPT, *jobs], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    ok, missing, other, unknown = r.stdout.strip().splitlines()[-4:]
    assert ok.startswith("OK"), ok
    got = load_file(tmp_path / "m.safetensors")
    torch.testing.assert_close(got["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])
    torch.testing.assert_close(got["conv1.0.weight"], adapt_input_conv(5, src["conv1.0.weight"]))
    assert got["fc.weight"].shape[0] == 6
    assert missing.startswith("ERROR") and "could not load its weights" in missing
    assert "Hugging Face cache" in missing
    assert other.startswith("ERROR") and "is for resnet18, not --model resnet10t" in other
    assert unknown.startswith("ERROR") and "no pretrained tag" in unknown


def test_build_model_rebuilds_from_the_spec_a_checkpoint_stores(tmp_path):
    """fit stores model_spec in every checkpoint; build_model(spec) gives the same architecture
    (its state dict loads strictly); a crafted spec is refused, not built."""
    from ich_train.model import UnknownModelError, build_model, model_spec

    spec = model_spec("resnet10t", 5, 0.1)
    assert spec == {"name": "resnet10t", "in_chans": 5, "drop_rate": 0.1, "num_classes": 6}
    a, b = build_model(spec), build_model(spec)
    b.load_state_dict(a.state_dict(), strict=True)
    assert a.eval()(torch.zeros(1, 5, 32, 32)).shape == (1, 6)
    for bad in ({**spec, "in_chans": 10**9}, {**spec, "num_classes": 1000}, {**spec, "drop_rate": "x"}, {**spec, "name": "nope"}):  # fmt: skip
        with pytest.raises(UnknownModelError):
            build_model(bad)


def test_timm_tag_normalisation_follows_the_weights_and_the_checkpoint_keeps_it(tmp_path):
    """`fit --model mobilenetv4_conv_small --pretrained timm:mobilenetv4_conv_small.e3600_r256_in1k`
    normalises with that tag's mean/std (0.5/0.5), not its architecture's default tag's (ImageNet),
    in a real `ich-train fit` process reading the weights offline from a Hugging Face cache this
    test builds; the checkpoint stores them and every reader (evaluate, predict, embed: through
    infer.load_model) uses the stored values."""
    import os
    import subprocess
    import sys

    from ich_train.checkpoint import load_checkpoint
    from ich_train.infer import load_model
    from tests.train_fixtures import make_build

    arch, tag = "mobilenetv4_conv_small", "mobilenetv4_conv_small.e3600_r256_in1k"
    default = timm.models.get_pretrained_cfg(arch)
    assert tuple(default.mean) != (0.5, 0.5, 0.5)  # the premise: the tag differs from its arch
    assert tuple(timm.models.get_pretrained_cfg(tag).mean) == (0.5, 0.5, 0.5)
    write_hf_cache(tmp_path / "hf", f"timm/{tag}", timm.create_model(arch).state_dict())
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    build = make_build(tmp_path / "b", folds=2, per_shard=16, size=32)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ich_train", "fit", "--shards", str(build), "--out", str(run),
           "--valid-fold", "1", "--model", arch, "--pretrained", f"timm:{tag}", "--epochs", "1",
           "--batch-size", "8", "--workers", "0", "--no-progress", "--no-report"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"tensors from timm:{tag}" in r.stdout
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    _, augment, _ = load_model(run / "last.pt", torch.device("cpu"))
    assert augment.mean.flatten().tolist() == [0.5] * 3 and augment.std.flatten().tolist() == [0.5] * 3  # fmt: skip


def test_a_resumed_run_keeps_the_normalisation_it_trained_with(tmp_path):
    """On --resume (where --pretrained may change or be dropped) the run's mean/std come from its
    checkpoint, not from the architecture or the new --pretrained; a count that does not fit the
    input channels is a damaged checkpoint."""
    from ich_train.checkpoint import CheckpointError
    from ich_train.config import TrainConfig
    from ich_train.train import _normalize

    cfg = TrainConfig(shards="s", out=str(tmp_path), model="resnet10t")
    model = create_model("resnet10t")
    assert _normalize(cfg, model, 3, None) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    saved = {"normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    assert _normalize(cfg, model, 3, saved) == ([0.5] * 3, [0.5] * 3)
    with pytest.raises(CheckpointError, match="normalisation values for 9 input channels"):
        _normalize(cfg, model, 9, saved)


def _new_run(tmp_path, name: str, **kw):
    """create_run of a new fit (no checkpoint) on a tiny build: the model fit starts from."""
    from ich_train import distributed
    from ich_train.config import TrainConfig
    from ich_train.train import create_run, load_data
    from tests.train_fixtures import make_build

    build = tmp_path / "b"
    if not build.exists():
        make_build(build, folds=2, per_shard=8, size=32)
    cfg = TrainConfig(
        shards=str(build), out=str(tmp_path / name), valid_fold=1, workers=0, batch_size=4, **kw
    )
    dist = distributed.Dist(0, 1, 0, torch.device("cpu"))
    return create_run(cfg, dist, load_data(cfg, dist), None, lambda *a, **k: None)


def test_a_from_scratch_efficientnet_starts_with_identity_residual_blocks(tmp_path):
    """A new from-scratch run zeroes the last batch-norm scale of every residual block
    (zero_init_residuals, what timm does for its ResNets): each block with a skip is then the
    identity, so efficientnet_b0 starts as a shallow net and leaves the prior on small data
    (docs/training.md, "Learning on small data"); before, its 9 skip blocks were random branches.
    --pretrained weights are never touched."""
    model = _new_run(tmp_path, "scratch", model="efficientnet_b0").raw.eval()
    blocks = [m for m in model.modules() if getattr(m, "has_skip", False) is True]
    assert len(blocks) == 9
    for block in blocks:
        x = torch.randn(2, block.conv_pw.in_channels, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(block(x), x)
    # resnet18's blocks were already zero-initialised by timm: nothing else changes there
    assert zero_init_residuals(create_model("resnet18")) == 0
    # pretrained weights are the weights given, every batch-norm scale included
    src = create_model("efficientnet_b0")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    run = _new_run(tmp_path, "pre", model="efficientnet_b0", pretrained=str(tmp_path / "w.safetensors"))  # fmt: skip
    for key, value in src.state_dict().items():
        if "bn" in key and key.endswith("weight"):
            torch.testing.assert_close(run.raw.state_dict()[key], value)
