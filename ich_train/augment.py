"""Batch preparation on the device: uint8 NHWC -> resized, augmented, normalised float NCHW.

Everything runs in torch over the whole batch on whatever device the batch is on (no per-sample
CPU work): one antialiased resize, one grid_sample for flip + rotate + scale + shift, then
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


def affine_theta(n: int, p: AugmentParams, g: torch.Generator, device) -> torch.Tensor:
    """(n, 2, 3) output->input maps for affine_grid: random hflip, rotation, zoom and shift."""

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g, device=device)

    angle = uniform(-p.rotate_deg, p.rotate_deg) * (math.pi / 180)
    zoom = uniform(1 - p.scale, 1 + p.scale)
    flip = torch.where(torch.rand(n, generator=g, device=device) < p.hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, 0, 2] = uniform(-p.shift, p.shift) * 2  # normalised coordinates span 2
    theta[:, 1, 2] = uniform(-p.shift, p.shift) * 2
    return theta


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
            grid = F.affine_grid(affine_theta(n, p, g, dev), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if p.contrast > 0 or p.brightness > 0:
            c = 1 + p.contrast * (2 * torch.rand(n, 1, 1, 1, generator=g, device=dev) - 1)
            b = p.brightness * (2 * torch.rand(n, 1, 1, 1, generator=g, device=dev) - 1)
            x = x * c + b
        if p.noise > 0:
            sigma = p.noise * torch.rand(n, 1, 1, 1, generator=g, device=dev)
            x = x + sigma * torch.randn(x.shape, generator=g, device=dev)
        return x.clamp_(0, 1)
