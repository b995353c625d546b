"""Model factory and local pretrained weights (never a hub)."""

import socket

import pytest
import timm
import torch
from safetensors.torch import save_file

from ich_train.model import PretrainedError, create_model


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
    """init_head_bias: before any step, the model's weighted log loss on its training images is the
    prior baseline's (within 0.01); with timm's default head it is far above it (logits near 0)."""
    import numpy as np

    from ich_train.augment import AugmentParams, DeviceAugment
    from ich_train.data import Build, EvalStream
    from ich_train.metrics import label_prior, weighted_log_loss
    from ich_train.model import init_head_bias, normalization
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
            assert init_head_bias(model, prior)
        aug = DeviceAugment(32, *normalization(model), AugmentParams())
        with torch.no_grad():
            p = np.concatenate([torch.sigmoid(model(aug(b["image"], train=False))).numpy() for b in batches])  # fmt: skip
        return weighted_log_loss(y, p)

    assert abs(loss(True) - baseline) < 0.01
    assert loss(False) > baseline + 0.1
