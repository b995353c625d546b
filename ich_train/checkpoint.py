"""Checkpoints: plain dicts of tensors and python primitives, loadable with weights_only=True.

{'format', 'model', 'optimizer', 'scheduler', 'step', 'epoch', 'config', 'rng', 'prior',
 'normalize', 'image_size', 'data', 'metrics', 'best_loss', 'best_metrics'}; written to a
temporary name, then renamed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing or not one of ours."""


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python global RNG states as tensors and ints."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pystate, _ = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": [int(has_gauss), float(gauss)],
        "python": torch.tensor(pystate, dtype=torch.int64),
        "python_version": int(version),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if (
        state["cuda"]
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss)
    )
    random.setstate((state["python_version"], tuple(state["python"].tolist()), None))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: str | Path, **state) -> None:
    """torch.save `state` (plus the format number) atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by save_checkpoint, loaded on the CPU with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found; pass a best.pt or last.pt from a run folder"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable ich-train checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an ich-train checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt
