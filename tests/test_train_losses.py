"""The training loss: metric-weighted BCE, positive weighting, asymmetric loss."""

import torch
import torch.nn.functional as F

from ich_train.losses import MultiLabelLoss
from ich_train.metrics import LABEL_WEIGHTS

W = torch.tensor(LABEL_WEIGHTS, dtype=torch.float32)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g) * 3, (torch.rand(32, 6, generator=g) < 0.3).float()


def test_default_is_bce_weighted_like_the_metric():
    """No options: per-image (2, 1, 1, 1, 1, 1)-weighted BCE averaged over the batch."""
    x, y = _data()
    ref = (F.binary_cross_entropy_with_logits(x, y, reduction="none") @ W / W.sum()).mean()
    torch.testing.assert_close(MultiLabelLoss()(x, y), ref)


def test_pos_weight_matches_torch():
    """Per-label positive weights act like BCEWithLogits' pos_weight."""
    x, y = _data()
    pw = torch.tensor([1.0, 5.0, 2.0, 2.0, 3.0, 1.5])
    ref = (
        F.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="none") @ W / W.sum()
    ).mean()
    torch.testing.assert_close(MultiLabelLoss(pos_weight=pw.tolist())(x, y), ref)


def test_asymmetric_loss_matches_the_paper_formula():
    """gamma+/gamma-/clip follow Ridnik et al.: probability shifting on negatives, focusing on both."""
    x, y = _data(1)
    gp, gn, clip = 1.0, 4.0, 0.05
    p = torch.sigmoid(x.double())
    pm = (p - clip).clamp(min=0)
    ll = -(y * (1 - p) ** gp * torch.log(p) + (1 - y) * pm**gn * torch.log(1 - pm))
    ref = (ll @ W.double() / W.sum()).mean()
    got = MultiLabelLoss(gamma_pos=gp, gamma_neg=gn, clip=clip)(x, y)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_asymmetric_loss_ignores_easy_negatives_below_clip():
    """A negative with p below the clip contributes nothing."""
    x = torch.full((1, 6), -6.0)  # p ~ 0.0025 < clip
    assert MultiLabelLoss(gamma_neg=4.0, clip=0.05)(x, torch.zeros(1, 6)).item() == 0.0


def test_loss_stays_fp32_under_bf16_autocast():
    """Under bf16 autocast (as in training on a GPU) the loss is still computed in fp32."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    y = (torch.rand(16, 6, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    loss = MultiLabelLoss(gamma_neg=4.0, clip=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(x, y)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, loss(x, y), rtol=0, atol=0)
