"""The geometric augmentation keeps the head in the frame, on images compiled from the real RSNA
samples (a tight --crop series box: the head touches the frame's edges)."""

from __future__ import annotations

import itertools
import tarfile

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.shards import decode_image
from ich_train.augment import DRAWS, AugmentParams, affine_theta, content_mask
from tests.conftest import REAL_SAMPLES

SIZE = 64
EXTREME = AugmentParams(hflip=0.5, rotate_deg=10.0, scale=0.1, shift=0.05)  # fit's defaults


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(N, C, S, S) float images in [0, 1] compiled by `ich-prep build` (--crop series, 64 px)
    from the real series and singles, and (N, S, S) bool head masks: the largest connected region
    above -300 HU (the bone window's channel: (HU + 800) / 2800 x 255 > 45.5), as head_box
    finds the head."""
    if not REAL_SAMPLES.is_dir():
        pytest.skip(f"real RSNA samples not found at {REAL_SAMPLES}")
    out = tmp_path_factory.mktemp("real") / "b"
    src = REAL_SAMPLES / "Riku-Sasaki_kaggle-rsna-intracranial-hemorrhage-detection"
    build(BuildConfig(dicom_dir=str(src), size=SIZE), out, jobs=2, progress=False)
    images, heads = [], []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in (m for m in tar.getmembers() if m.name.endswith(".npy.gz")):
                img = decode_image(tar.extractfile(m).read(), "npy.gz")
                mask = cv2.morphologyEx((img[..., 2] > 45.5).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))  # fmt: skip
                n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
                if n > 1:
                    images.append(img)
                    heads.append(labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return x, torch.from_numpy(np.stack(heads))


def _extremes(n: int) -> tuple[dict, int]:
    """Every corner of the draws (each DRAWS value 0 or 1: the largest rotation either way,
    mirrored or not, the most zoom-in or -out, the largest shift each way), for n images."""
    corners = list(itertools.product((0.0, 1.0 - 1e-7), repeat=len(DRAWS)))
    draws = {k: torch.tensor([c[i] for c in corners for _ in range(n)]) for i, k in enumerate(DRAWS)}  # fmt: skip
    return draws, len(corners)


def _mapped(theta: torch.Tensor, head: torch.Tensor) -> list[torch.Tensor]:
    """Where each head pixel's centre lands in the output (normalised coordinates): the inverse
    of grid_sample's output -> input map."""
    c = (torch.arange(SIZE, dtype=torch.float64) + 0.5) / SIZE * 2 - 1
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    out = []
    for t, h in zip(theta.double(), head, strict=True):
        v = torch.stack([xs[h], ys[h]], 1) - t[:, 2]
        out.append(v @ torch.linalg.inv(t[:, :2]).T)
    return out


def test_no_head_pixel_leaves_the_frame_under_the_most_extreme_augmentation(compiled):
    """Each of 32 extreme draws on each real compiled slice: every head pixel's centre stays inside
    the frame, and the head's area after grid_sample is its area times zoom^2 (nothing cut off);
    unbounded, the same draws push head pixels out of the frame (what the bound prevents)."""
    x, heads = compiled
    n = len(x)
    assert n >= 40 and heads.any(dim=0)[[0, -1], :].any()  # heads touch the top or bottom edge
    draws, k = _extremes(n)
    xs, hs = x.repeat(k, 1, 1, 1), heads.repeat(k, 1, 1)
    bounded = affine_theta(n * k, EXTREME, None, "cpu", content=content_mask(xs), draws=draws)
    free = affine_theta(n * k, EXTREME, None, "cpu", draws=draws)
    inside = torch.tensor([(m.abs() <= 1).all() for m in _mapped(bounded, hs)])
    assert inside.all(), f"{int((~inside).sum())} of {n * k} augmented slices lose head pixels"
    lost = torch.tensor([(m.abs() > 1).any() for m in _mapped(free, hs)])
    assert lost.float().mean() > 0.2  # without the bound a zoom-in or shift cuts the head

    grid = F.affine_grid(bounded, [n * k, 1, SIZE, SIZE], align_corners=False)
    warped = F.grid_sample(hs[:, None].float(), grid, align_corners=False)[:, 0]
    zoom = 1 / torch.linalg.det(bounded[:, :, :2].double()).abs().sqrt()
    ratio = warped.sum(dim=(1, 2)) / (hs.sum(dim=(1, 2)) * zoom**2)
    assert ((ratio - 1).abs() < 0.03).all(), ratio.min()


def test_random_draws_keep_the_head_and_still_vary(compiled):
    """fit's own draws (seeded) on the real slices: no head pixel leaves, and the bound leaves
    the augmentation random: zooms still spread over [0.9, 1] and shifts vary."""
    x, heads = compiled
    g = torch.Generator().manual_seed(0)
    theta = affine_theta(len(x), EXTREME, g, "cpu", content=content_mask(x))
    assert all((m.abs() <= 1).all() for m in _mapped(theta, heads))
    zoom = 1 / torch.linalg.det(theta[:, :, :2].double()).abs().sqrt()
    assert zoom.min() < 0.93 and zoom.std() > 0.02 and theta[:, :, 2].std() > 0.005
