"""Checkpoints: plain dicts of tensors and python primitives, loadable with weights_only=True.

{'format', 'model', 'optimizer', 'scheduler', 'step', 'epoch', 'config', 'rng', 'prior',
 'normalize', 'image_size', 'data', 'metrics', 'best_loss', 'best_metrics'}; written to a
temporary name, then renamed. A checkpoint is read like any file a user hands over: never
unpickled (torch.load(weights_only=True) only), and every key a reader uses is checked first.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import pickle
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ich_prep import LABELS
from ich_prep.config import LEGACY_CROP
from ich_prep.errors import UserError
from ich_prep.location import atomic_file, open_local

if TYPE_CHECKING:
    from ich_prep.manifest import Build

CHECKPOINT_FORMAT = 1
MAX_CHANNELS = 64  # input channels a checkpoint may declare (2.5D stacks of windows stay far below)
# keys evaluate/predict need, and the further keys a --resume needs
INFER_KEYS = ("model", "config", "prior", "normalize", "image_size", "data")
RESUME_KEYS = ("optimizer", "scheduler", "rng", "step", "epoch", "best_loss", "best_metrics")
# manifest config fields that say where the inputs were, not what was built (the index's sha256
# covers what was read): a build of the same inputs from another mount point is the same data
BUILD_LOCATION_FIELDS = ("dicom_dir", "labels")
# build config fields that decide what a pixel means to a model: a test build must repeat them
# (infer.check_preprocessing). windows: the HU range of each channel; spacing_mm: mm per pixel;
# crop: series boxes or per-slice boxes (the head's scale and centre). The others do not: size is
# resized on the device, encoding (jpg q95 against lossless) moves pixels by a grey level or two,
# folds/seed/shard_size/limit/fraction choose and group images, dicom_dir/labels say where
# the inputs were; the layout's channel count is checked on its own (in_chans).
PREPROCESSING_FIELDS = ("windows", "spacing_mm", "crop")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, not one of ours, damaged, or for another build."""


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
    """torch.save `state` (plus the format number) atomically; an interrupted save leaves nothing."""
    with atomic_file(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


def safe_torch_load(path: str | Path):
    """torch.load(weights_only=True) on the CPU: tensors and python primitives only, nothing is
    unpickled; opened through location.open_local, so only a regular file is read (a FIFO cannot
    hang it). Its warnings (e.g. about a foreign pickle protocol) are silenced: the caller turns a
    refusal into one line."""
    with warnings.catch_warnings(), open_local(path) as f:
        warnings.simplefilter("ignore")
        return torch.load(f, map_location="cpu", weights_only=True)


def short_reason(e: BaseException) -> str:
    """The first line of an exception's message, bounded, with its type: for one-line errors."""
    first = (str(e).strip().splitlines() or [""])[0]
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_failure(e: BaseException) -> str:
    """Why safe_torch_load refused a file, in a few words (torch's own text suggests turning
    weights_only off, which is exactly what must not be done with a file someone handed over)."""
    if isinstance(e, pickle.UnpicklingError):
        return "it holds pickled Python objects besides tensors, which are never unpickled"
    return f"it is not a torch file of tensors ({short_reason(e)})"


def load_checkpoint(path: str | Path, keys: tuple[str, ...] = INFER_KEYS) -> dict:
    """A checkpoint written by save_checkpoint, loaded on the CPU with weights_only=True, with
    `keys` present and of the expected types (CheckpointError naming the file otherwise)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder; pass the best.pt or last.pt inside a run folder"
        )
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} not found; pass a best.pt or last.pt from a run folder"
        )
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is not a regular file (a FIFO, device or socket); pass the best.pt "
            "or last.pt written by ich-train fit"
        )
    try:
        ckpt = safe_torch_load(path)
    except Exception as e:  # anything a foreign file makes torch raise: it is not a checkpoint
        raise CheckpointError(
            f"{path} is not an ich-train checkpoint: {load_failure(e)}; pass a best.pt or last.pt "
            "written by ich-train fit"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an ich-train checkpoint (format {CHECKPOINT_FORMAT}); pass a best.pt "
            "or last.pt written by ich-train fit"
        )
    check_keys(ckpt, keys, path)
    return ckpt


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _numbers(v, n: int) -> bool:
    return isinstance(v, list | tuple) and len(v) == n and all(_is_number(x) for x in v)


_CHECKS = {
    "model": lambda v: (
        isinstance(v, dict)
        and bool(v)
        and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())
    ),
    "config": lambda v: isinstance(v, dict) and isinstance(v.get("model"), str),
    "prior": lambda v: _numbers(v, len(LABELS)) and all(0 <= x <= 1 for x in v),
    "normalize": lambda v: (
        isinstance(v, dict)
        and isinstance(v.get("mean"), list | tuple)
        and 1 <= len(v["mean"]) <= MAX_CHANNELS
        and _numbers(v["mean"], len(v["mean"]))
        and _numbers(v.get("std"), len(v["mean"]))
        and all(x > 0 for x in v["std"])
    ),
    "in_chans": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_CHANNELS,
    "image_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 4096,
    "data": lambda v: isinstance(v, dict),
    "optimizer": lambda v: isinstance(v, dict),
    "scheduler": lambda v: isinstance(v, dict),
    "rng": lambda v: isinstance(v, dict),
    "step": lambda v: isinstance(v, int) and v >= 0,
    "epoch": lambda v: isinstance(v, int) and v >= 0,
    "best_loss": _is_number,
    "best_metrics": lambda v: isinstance(v, dict),
    "logit_adjustment": lambda v: _numbers(v, len(LABELS)) and all(abs(x) <= 20 for x in v),
}


def recorded_adjustment(ckpt: dict, path) -> list[float] | None:
    """The prior correction a --sampler balanced run recorded (logit(natural) - logit(drawn) per
    label, sampler.logit_adjustment), checked; None for a natural run or a checkpoint from before
    it was recorded (its predictions are left as they are)."""
    if "logit_adjustment" not in ckpt:
        return None
    check_keys(ckpt, ("logit_adjustment",), path)
    return [float(v) for v in ckpt["logit_adjustment"]]


def check_keys(ckpt: dict, keys: tuple[str, ...], path) -> None:
    """CheckpointError naming the first key of `keys` that is missing or malformed."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is an incomplete ich-train checkpoint (no {', '.join(missing)}); it was cut "
            "short or edited: pass a best.pt or last.pt written by ich-train fit"
        )
    for k in keys:
        if not _CHECKS[k](ckpt[k]):
            raise CheckpointError(
                f"{path} is a damaged ich-train checkpoint ('{k}' is malformed); pass a best.pt "
                "or last.pt written by ich-train fit"
            )


def load_weights(module: torch.nn.Module, state: dict, path, model_name: str) -> None:
    """module.load_state_dict(state) (strict), or a one-line CheckpointError saying how the
    checkpoint's weights fail to fit `model_name` (torch's own message runs to hundreds of lines)
    or that some are NaN or infinite."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is a damaged ich-train checkpoint (its weights are a {type(state).__name__}, "
            "not a state dict); pass a best.pt or last.pt written by ich-train fit"
        )
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [
        k
        for k in own
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)
    ]
    if missing or unexpected or shape:
        example = (shape or missing or unexpected)[0]
        raise CheckpointError(
            f"{path}: its weights do not fit --model {model_name} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shape)} of another shape, e.g. {example!r}); "
            "the file was edited or mixes two models: pass a checkpoint written by ich-train fit"
        )
    bad = [k for k in own if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]  # fmt: skip
    if bad:  # NaN weights predict NaN: a traceback in evaluate, a silent prior in predict
        raise CheckpointError(
            f"{path}: its weights hold NaN or infinite values (e.g. {bad[0]!r}); the run diverged "
            "or the file was edited: pass a checkpoint of a run that trained"
        )
    module.load_state_dict(state)


# ---- the build a checkpoint was trained on


def build_description(build: Build) -> dict:
    """What identifies a build's data (`build`: the opened manifest, manifest.Build): its format
    version, its config as recorded (everything that decides the output bytes, less where the
    inputs were) and its index's sha256 (every image, label and fold)."""
    config = build.recorded_config
    for key in BUILD_LOCATION_FIELDS:
        config.pop(key, None)
    return {
        "format_version": build.format_version,
        "config": json.loads(json.dumps(config)),
        "index_sha256": build.index_sha256,
    }


def build_fingerprint(description: dict) -> str:
    """sha256 of a build_description, as canonical json."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_differences(saved: dict, now: dict) -> list[str]:
    """['size 64 -> 32', ...] between two build descriptions (empty when they are the same)."""
    out = []
    if saved.get("format_version") != now.get("format_version"):
        out.append(f"format_version {saved.get('format_version')} -> {now.get('format_version')}")
    a, b = saved.get("config", {}), now.get("config", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key} {_short(a.get(key))} -> {_short(b.get(key))}")
    if saved.get("index_sha256") != now.get("index_sha256"):
        out.append("index.parquet differs (other images, labels or folds)")
    return out


def same_build(data: dict, manifest: Build) -> tuple[bool, list[str]]:
    """(whether checkpoint data section `data` was written for the build `manifest` (the opened
    manifest, manifest.Build), the differences). Checkpoints from before build descriptions were recorded stored the index
    sha256 as fingerprint plus size, encoding, windows and spacing: those are compared."""
    now = build_description(manifest)
    if "build" in data and isinstance(data["build"], dict):
        if data.get("fingerprint") == build_fingerprint(now):
            return True, []
        return False, build_differences(data["build"], now) or ["fingerprint differs"]
    diffs = []
    if data.get("fingerprint") != now["index_sha256"]:
        diffs.append("index.parquet differs (other images, labels or folds)")
    config = now["config"]
    for key in ("size", "encoding", "windows", "spacing_mm"):
        if key in data and data[key] != config.get(key):
            diffs.append(f"{key} {_short(data[key])} -> {_short(config.get(key))}")
    return not diffs, diffs


def trained_preprocessing(data: dict) -> dict:
    """The PREPROCESSING_FIELDS of the build a checkpoint's 'data' section was trained on, as far
    as it records them: its own keys, else its build description's config (a checkpoint from
    before `crop` was compared: a config without `crop` is a build from before series crops,
    cropped per slice). Fields it cannot tell are left out (never compared)."""
    build = data.get("build")
    config = build.get("config") if isinstance(build, dict) else None
    out = {}
    for key in PREPROCESSING_FIELDS:
        if key in data:
            out[key] = data[key]
        elif key == "crop" and isinstance(config, dict):
            out[key] = config.get("crop", LEGACY_CROP)
    return out


def checkpoint_data(build) -> dict:
    """The checkpoint's 'data' section for a Build: its fingerprint and description, plus the
    fields evaluate/predict compare a test build against (encoding, size, windows, spacing)."""
    description = build_description(build.manifest)
    return {
        "fingerprint": build_fingerprint(description),
        "build": description,
        "encoding": build.encoding,
        "size": build.size,
        **build.preprocessing,
    }
