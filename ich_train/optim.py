"""The optimizer: fused AdamW by default (one kernel, on CUDA and CPU alike), or any of timm's
optimizers by name (`--opt radam`, `sgd`, `lamb`, ...) through timm's factory; no weight decay on
norms and biases either way. And a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2, list_optimizers, param_groups_weight_decay
from torch.optim.lr_scheduler import LambdaLR


def optimizer_names() -> list[str]:
    """What --opt takes: timm's optimizer names (adamw is ours, fused)."""
    return sorted(set(list_optimizers()) | {"adamw"})


def create_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device, opt: str = "adamw"
):
    """`opt` 'adamw': fused AdamW, one kernel for all parameters instead of a loop of small ops
    (torch has fused kernels for CUDA and CPU; other devices get the default implementation).
    Any other name: timm's create_optimizer_v2 (the same no-decay groups)."""
    if opt != "adamw":
        return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay)
    groups = param_groups_weight_decay(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cuda", "cpu") or None)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def create_scheduler(optimizer, total_steps: int, warmup_frac: float, min_ratio: float) -> LambdaLR:
    warmup = int(round(warmup_frac * total_steps))

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup, min_ratio)

    return LambdaLR(optimizer, factor)
