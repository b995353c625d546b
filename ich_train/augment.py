"""Batch preparation on the device: uint8 NHWC -> resized, augmented, normalised float NCHW.

Everything runs in torch over the whole batch on whatever device the batch is on (no per-sample
CPU work): one antialiased resize, one grid_sample for flip + rotate + scale + shift (the zoom
and shift bounded per sample so the head stays in the frame: keep_inside), then
brightness/contrast and Gaussian noise drawn per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    hflip: float = 0.5  # probability
    rotate_deg: float = 10.0  # uniform in [-rotate_deg, rotate_deg]
    scale: float = 0.1  # zoom factor uniform in [1 - scale, 1 + scale]
    shift: float = 0.05  # fraction of the image size, per axis
    brightness: float = 0.1  # added offset uniform in [-b, b] (images in [0, 1])
    contrast: float = 0.1  # factor uniform in [1 - c, 1 + c]
    noise: float = 0.02  # Gaussian sigma uniform in [0, noise] per sample

    @classmethod
    def from_config(cls, cfg) -> AugmentParams:
        if not cfg.augment:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return cls(
            cfg.hflip, cfg.rotate_deg, cfg.scale, cfg.shift, cfg.brightness, cfg.contrast, cfg.noise
        )


DRAWS = ("angle", "zoom", "flip", "shift_x", "shift_y")  # uniform [0, 1) draws, in this order


def affine_theta(
    n: int, p: AugmentParams, g: torch.Generator | None, device, content=None, draws=None
) -> torch.Tensor:
    """(n, 2, 3) output->input maps for affine_grid: random hflip, rotation, zoom and shift.

    With `content` ((n, S, S) bool: the pixels that are not air, content_mask), the zoom and the
    shift are bounded per sample so that every content pixel's centre stays inside the frame
    (keep_inside): a zoom-in or shift that would push the head past an edge is cut to what fits,
    a zoom-out never is. `draws` ({name: (n,) tensor in [0, 1]} for DRAWS) replaces the random
    draws (tests pass the extremes)."""
    u = draws or {k: torch.rand(n, generator=g, device=device) for k in DRAWS}
    angle = (2 * u["angle"] - 1) * p.rotate_deg * (math.pi / 180)
    zoom = 1 - p.scale + 2 * p.scale * u["zoom"]
    flip = torch.where(u["flip"] < p.hflip, -1.0, 1.0)
    # the shift, in output coordinates (normalised coordinates span 2)
    shift = torch.stack([(2 * u[k] - 1) * p.shift * 2 for k in ("shift_x", "shift_y")], 1)
    if content is not None:
        zoom, shift = keep_inside(content, angle, flip, zoom, shift)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    # input = L (output - shift): the content moves by `shift` in the output
    theta[:, :, 2] = -torch.einsum("nij,nj->ni", theta[:, :, :2], shift)
    return theta


def content_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool of a (B, C, S, S) batch in [0, 1]: pixels above 0 in some channel. Air is 0
    in every window whose lower edge lies above air's -1024 HU (brain, subdural, bone, ...), so
    this is the head with whatever else is not air (head rest, table): a superset of the head."""
    return (x > 0).any(dim=1)


def keep_inside(content, angle, flip, zoom, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """(zoom, shift) cut per sample so that the centres of the `content` pixels, rotated, flipped,
    zoomed and shifted, stay within the centres of the frame's outer pixels: the zoom at most
    what the rotated content's extent allows (a head spanning the frame: no zoom-in), then the
    shift clamped to the room left on each side. Samples with no content are left as drawn."""
    size = content.shape[-1]
    c = (torch.arange(size, device=content.device, dtype=torch.float32) + 0.5) / size * 2 - 1
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    # content coordinates in the output's orientation (before zoom and shift)
    w = ((cos * xs + sin * ys) * flip.view(-1, 1, 1), -sin * xs + cos * ys)
    inf = torch.tensor(math.inf, device=content.device)
    lo = torch.stack([torch.where(content, a, inf).amin(dim=(1, 2)) for a in w], 1)
    hi = torch.stack([torch.where(content, a, -inf).amax(dim=(1, 2)) for a in w], 1)
    lim = 1 - 1 / size  # the outer pixels' centres
    has = content.any(dim=(1, 2))
    span = (hi - lo).amax(dim=1).clamp_min(1e-6)
    zoom = torch.where(has, torch.minimum(zoom, 2 * lim / span), zoom)
    z = zoom.view(-1, 1)
    bounded = torch.minimum(torch.maximum(shift, -lim - z * lo), lim - z * hi)
    return zoom, torch.where(has.view(-1, 1), bounded, shift)


class DeviceAugment:
    """Callable: (uint8 (B, H, W, C) on device, train) -> normalised float (B, C, S, S); C is the
    number of `mean`/`std` values (the build's layout channels)."""

    def __init__(
        self, image_size: int, mean, std, params: AugmentParams, channels_last: bool = True
    ):
        self.size, self.params, self.channels_last = image_size, params, channels_last
        self.channels = len(mean)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def _geometric(self, p: AugmentParams) -> bool:
        return p.hflip > 0 or p.rotate_deg > 0 or p.scale > 0 or p.shift > 0

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != self.channels:
            raise ValueError(
                f"expected uint8 (B, H, W, {self.channels}) images, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        x = images.permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        if train:
            x = self._augment(x, generator)
        if self.mean.device != x.device:  # once: a copy from pageable memory would sync every batch
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        x = (x - self.mean) / self.std
        return (
            x.contiguous(memory_format=torch.channels_last)
            if self.channels_last
            else x.contiguous()
        )

    def _augment(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        p, n, dev = self.params, x.shape[0], x.device
        if self._geometric(p):
            theta = affine_theta(n, p, g, dev, content=content_mask(x))
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if p.contrast > 0 or p.brightness > 0:
            c = 1 + p.contrast * (2 * torch.rand(n, 1, 1, 1, generator=g, device=dev) - 1)
            b = p.brightness * (2 * torch.rand(n, 1, 1, 1, generator=g, device=dev) - 1)
            x = x * c + b
        if p.noise > 0:
            sigma = p.noise * torch.rand(n, 1, 1, 1, generator=g, device=dev)
            x = x + sigma * torch.randn(x.shape, generator=g, device=dev)
        return x.clamp_(0, 1)
