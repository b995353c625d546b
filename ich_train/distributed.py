"""DDP plumbing: process group from torchrun's environment, device choice, gathers.

A plain `python -m ich_train fit` is a world of one and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ich_prep.errors import UserError


class DeviceError(UserError, RuntimeError):
    """A --device this machine does not have (or torch does not know)."""


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto': this process's GPU when there is one, else the CPU. A device torch does not know or
    this machine does not have is a DeviceError naming the fix, before anything is read or written."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(
            f"--device {name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {name} asked for, but torch sees no GPU here; use --device cpu "
                "(or auto), or install a CUDA build of torch"
            )
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                f"no cuda:{index}; pick an index below that"
            )
        return torch.device("cuda", index)
    if dev.type != "cpu":
        try:  # mps, xpu, ...: usable only where the backend is present
            torch.empty(1, device=dev)
        except Exception as e:
            raise DeviceError(
                f"--device {name} is not usable on this machine ({type(e).__name__}); "
                "use --device cpu or auto"
            ) from e
    return dev


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # every batch has the same shape: let cuDNN time its algorithms once and keep the fastest
        # (timm's train.py does the same); the price is run-to-run float differences on GPU
        torch.backends.cudnn.benchmark = True
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        tdist.init_process_group(backend=backend, **kwargs)
    return Dist(rank, world, local_rank, dev)


def cleanup() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        tdist.barrier()


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.enabled:
        tdist.all_reduce(t)
    return t.tolist()


def all_gather(d: Dist, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (our own arrays; never data from shards)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj):
    """Rank 0's obj on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
