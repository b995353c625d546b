"""One training epoch, prediction over a loader, and validation with the competition metric.

train_one_epoch() and validate() return flat metric dicts; fit() appends them to metrics.csv.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch

from ich_train.checkpoint import unwrap
from ich_train.data import ShardError
from ich_train.distributed import Dist, all_gather, all_sum
from ich_train.metrics import DivergedError, check_diverged, compute_metrics
from ich_train.progress import bar as progress_bar
from ich_train.progress import track

PRECISIONS_CHOSEN = ("bf16", "fp16", "fp32")  # what "auto" becomes


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' for a CUDA device, 'cpu' otherwise: what runs print and record."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def resolve_precision(precision: str, device: torch.device) -> str:
    """What --precision means on `device`: 'auto' is bf16 where the CUDA device runs it natively
    (Ampere and later: A100, H100, RTX 30xx/40xx), fp16 on other CUDA devices (T4, P100, V100,
    RTX 20xx: bf16 would be emulated, slowly) and fp32 on the CPU; any other value is itself."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    # the current device: distributed.setup() made it this process's one
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast(device: torch.device, precision: str):
    """Autocast to bf16 or fp16 as resolve_precision() says; fp32 is no autocast."""
    chosen = resolve_precision(precision, device)
    dtype = torch.float16 if chosen == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=chosen != "fp32")


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The loss scaler fp16 needs (its gradients underflow unscaled); a no-op for bf16 and fp32.
    Steps whose scaled gradients overflow are skipped and the scale halved (train_one_epoch
    counts them)."""
    enabled = resolve_precision(precision, device) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def _found_inf(scaler: torch.amp.GradScaler, optimizer) -> torch.Tensor | float:
    """1 (a tensor, no host sync) when the step just taken was skipped for an overflow, else 0.
    Read from the scaler's per-optimizer record (torch keeps no public accessor) before update()."""
    if not scaler.is_enabled():
        return 0.0
    return sum(t.float() for t in scaler._found_inf_per_device(optimizer).values())


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    loss_fn,
    augment,
    *,
    epoch: int,
    dist: Dist,
    accum_steps: int = 1,
    grad_clip: float = 0.0,
    precision: str = "auto",
    generator: torch.Generator | None = None,
    progress: bool = True,
    log_every: int = 10,
    start: dict | None = None,
    checkpoint_every: int = 0,
    on_checkpoint=None,
    ema=None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """One pass over `loader` (exactly len(loader) batches); returns train_loss, lr, images/s,
    train_any_share (the share of trained images positive for `any`: what the sampler drew) and
    train_overflow_steps (fp16 steps the scaler skipped for an overflow).

    `start` continues an epoch cut short: this rank's {'step', 'loss_sum', 'batches', 'seen',
    'time_s', 'any_sum', 'overflow'} as given to `on_checkpoint`, which is called with them every
    `checkpoint_every` optimizer steps inside the epoch (at the same step on every rank). `ema`
    (timm ModelEmaV3) is updated after every optimizer step. `scaler` (grad_scaler(), for fp16)
    scales the loss; gradients are unscaled before clipping."""
    model.train()
    dev = dist.device
    start = start or {"step": 0, "loss_sum": 0.0, "batches": 0, "seen": 0, "time_s": 0.0}
    step, n_batches, seen = int(start["step"]), int(start["batches"]), int(start["seen"])
    n_steps = step + len(loader) // accum_steps
    loss_sum = torch.full((), float(start["loss_sum"]), device=dev)
    # positives for `any` trained on; a checkpoint from before this count has none: 0
    any_sum = torch.full((), float(start.get("any_sum", 0.0)), device=dev)
    overflow = torch.full((), float(start.get("overflow", 0.0)), device=dev)
    scaler = scaler or torch.amp.GradScaler(dev.type, enabled=False)
    bar = progress_bar(n_steps, f"epoch {epoch + 1}", "step", dist.main and progress, initial=step)
    t0 = time.perf_counter() - float(start["time_s"])
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        images = batch["image"].to(dev, non_blocking=True)
        labels = batch["label"].to(dev, non_blocking=True)
        x = augment(images, train=True, generator=generator)
        boundary = (i + 1) % accum_steps == 0
        sync = model.no_sync() if dist.enabled and not boundary else nullcontext()
        with sync:
            with autocast(dev, precision):
                logits = model(x)
            loss = loss_fn(logits, labels)  # in fp32, outside autocast
            scaler.scale(loss / accum_steps).backward()
        loss_sum += loss.detach()
        any_sum += labels[:, 0].sum()
        n_batches += 1
        seen += images.shape[0]
        if not boundary:
            continue
        if grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        overflow += _found_inf(scaler, optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(unwrap(model), step=scheduler.last_epoch)
        step += 1
        if step % log_every == 0 or step == n_steps:
            mean = loss_sum.item() / n_batches  # the only host sync, every log_every steps
            if not math.isfinite(mean):
                raise DivergedError(
                    f"training loss became {mean} at epoch {epoch + 1} step {step}; lower --lr or "
                    "raise --warmup-frac and start a new --out"
                )
            bar.set_postfix(
                loss=f"{mean:.4f}", img_s=f"{seen * dist.world / (time.perf_counter() - t0):.0f}"
            )
        bar.update(1)  # after the postfix: a progress line shows the loss it just computed
        if on_checkpoint and checkpoint_every and step % checkpoint_every == 0 and step < n_steps:
            on_checkpoint(
                {
                    "step": step,
                    "loss_sum": loss_sum.item(),
                    "batches": n_batches,
                    "seen": seen,
                    "time_s": time.perf_counter() - t0,
                    "any_sum": any_sum.item(),
                    "overflow": overflow.item(),
                }
            )
    bar.close()
    elapsed = time.perf_counter() - t0
    total_loss, total_batches, total_seen, total_any = all_sum(
        dist, [loss_sum.item(), n_batches, seen, any_sum.item()]
    )
    return {
        "epoch": epoch,
        "step": scheduler.last_epoch,
        "lr": optimizer.param_groups[0]["lr"],
        "train_loss": total_loss / max(total_batches, 1),
        "train_images": int(total_seen),
        "train_images_per_s": total_seen / elapsed,
        "train_any_share": total_any / max(total_seen, 1),
        "train_time_s": elapsed,
        # the same on every rank: the scaler sees the all-reduced gradients
        "train_overflow_steps": int(overflow.item()),
    }


@torch.inference_mode()
def predict(
    model,
    loader,
    augment,
    *,
    dist: Dist,
    precision: str = "auto",
    tta: tuple[str, ...] = (),
    progress=True,
    shift=None,
) -> dict:
    """{'ids', 'probs' (N, 6), 'labels' (N, 6)} over every rank's share, gathered on all ranks.
    `shift` (6 numbers, e.g. a balanced run's prior correction) is added to every view's logits."""
    model.eval()
    dev = dist.device
    add = torch.as_tensor(shift, dtype=torch.float32, device=dev) if shift is not None else 0.0
    ids, probs, labels = [], [], []
    for batch in track(loader, "predict", "batch", dist.main and progress):
        x = augment(batch["image"].to(dev, non_blocking=True), train=False)
        with autocast(dev, precision):
            p = torch.sigmoid(model(x).float() + add)
            if "hflip" in tta:
                p = (p + torch.sigmoid(model(x.flip(3)).float() + add)) / 2
        ids.extend(batch["id"])
        probs.append(p)  # stays on the device: a copy per batch would sync the GPU every batch
        labels.append(batch["label"].numpy().astype(np.float64))
    probs = [torch.cat(probs).cpu().numpy().astype(np.float64)] if probs else []
    local = (ids, _cat(probs), _cat(labels))
    parts = all_gather(dist, local)
    return {
        "ids": [i for part in parts for i in part[0]],
        "probs": np.concatenate([part[1] for part in parts]),
        "labels": np.concatenate([part[2] for part in parts]),
    }


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0, 6))


def validate(
    model, loader, augment, *, dist: Dist, expected: int, precision: str = "auto", progress=True,
    keep: dict | None = None, shift=None,
) -> dict:  # fmt: skip
    """Competition metric, per-label log loss and AUC over the whole validation fold, the logits
    shifted by `shift` (see predict). With `keep` (a dict), the predictions ('ids', 'probs',
    'labels') are also left in it."""
    t0 = time.perf_counter()
    out = predict(model, loader, augment, dist=dist, precision=precision, progress=progress, shift=shift)  # fmt: skip
    if keep is not None:
        keep.update(out)
    if len(out["ids"]) != expected or len(set(out["ids"])) != expected:
        raise ShardError(
            f"validation saw {len(out['ids'])} samples ({len(set(out['ids']))} distinct), the manifest lists "
            f"{expected}; the shards disagree with the manifest: check the build with ich-prep verify"
        )
    check_diverged(out["probs"])
    metrics = compute_metrics(out["labels"], out["probs"])
    metrics["valid_time_s"] = time.perf_counter() - t0
    return metrics
