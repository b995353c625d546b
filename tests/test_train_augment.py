"""Device augmentation over whole uint8 batches."""

import torch

from ich_train.augment import AugmentParams, DeviceAugment

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OFF = AugmentParams(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def _plain(x):
    return (
        x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(STD).view(1, 3, 1, 1)


def test_eval_is_normalisation_only_in_channels_last():
    """train=False: (x / 255 - mean) / std, NCHW shape, channels_last memory."""
    x = _batch()
    out = DeviceAugment(32, MEAN, STD, AugmentParams())(x, train=False)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _plain(x))


def test_resize_happens_on_device_to_image_size():
    """A 32 px batch comes out at the requested 16 px."""
    assert DeviceAugment(16, MEAN, STD, OFF)(_batch(), train=False).shape == (4, 3, 16, 16)


def test_hflip_with_probability_one_mirrors_every_image():
    """hflip=1 and nothing else equals flipping the width axis."""
    x = _batch()
    out = DeviceAugment(32, MEAN, STD, AugmentParams(1.0, 0, 0, 0, 0, 0, 0))(
        x, True, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, _plain(x).flip(3), atol=1e-4, rtol=0)


def test_augmentation_is_random_per_sample_and_reproducible_by_seed():
    """Same generator seed: same output; the samples of one batch get different transforms."""
    x = _batch(1).expand(8, -1, -1, -1).contiguous()
    aug = DeviceAugment(32, MEAN, STD, AugmentParams())
    a = aug(x, True, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, aug(x, True, torch.Generator().manual_seed(3)))
    assert not torch.allclose(a[0], a[1])


def test_non_uint8_input_is_refused():
    """Batches must arrive as uint8 NHWC."""
    import pytest

    with pytest.raises(ValueError, match="uint8"):
        DeviceAugment(32, MEAN, STD, OFF)(_batch().float(), train=False)


def test_channel_count_follows_the_normalisation_values():
    """Five channels (a 2.5D stack, say): five mean/std values normalise a (B, H, W, 5) batch;
    a 3-channel batch is refused, not broadcast."""
    import pytest

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 16, 16, 5), generator=g, dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3, 0.4, 0.5), (0.5, 0.4, 0.3, 0.2, 0.1)
    out = DeviceAugment(16, mean, std, OFF)(x, train=True)
    want = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 5, 1, 1)) / torch.tensor(std).view(1, 5, 1, 1)  # fmt: skip
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match=r"\(B, H, W, 5\)"):
        DeviceAugment(16, mean, std, OFF)(_batch(size=16), train=False)
