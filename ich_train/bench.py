"""Training throughput in images/s, same model and optimizer step for every input path:

(a) one batch resident on the device (the ceiling),
(b) the full pipeline: shards -> DataLoader workers -> pinned uint8 -> device augmentation,
(c) the baseline of well-known Kaggle notebooks: DataLoader workers read each DICOM with pydicom,
    cast to float64, window the full-size slice 3 times and cv2.resize it, every step;
plus, with no model at all, what the loaders of (b) and (c) alone deliver with the same workers
(the most images/s each can feed a GPU, meaningful on any machine), and the CPU cost of decoding
one shard image (ms, one core).
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ich_prep.shards import decode_bounded
from ich_prep.terminal import echo
from ich_train.augment import AugmentParams, DeviceAugment
from ich_train.context import Context
from ich_train.data import (
    Build,
    TrainStream,
    create_loader,
    create_train_stream,
    die_with_parent,
    read_shard,
)
from ich_train.distributed import pick_device
from ich_train.engine import autocast, grad_scaler, resolve_precision
from ich_train.losses import MultiLabelLoss
from ich_train.mixing import series_mixing
from ich_train.model import build_model, model_spec, normalization
from ich_train.optim import create_optimizer

KAGGLE_WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))


class KaggleDicomDataset(Dataset):
    """Per-step DICOM decoding and windowing, the way popular RSNA 2019 notebooks load data.
    An unreadable file (RSNA has one) yields a black image instead of stopping the benchmark."""

    def __init__(self, files: list[str], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import pydicom  # only the baseline needs it
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(self.files[i])
            img = ds.pixel_array.astype(np.float64)
            img = img * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        except (InvalidDicomError, ValueError, AttributeError, OSError):
            img = np.full((512, 512), -1024.0)
        chans = [np.clip((img - (c - w / 2)) / w, 0, 1) for c, w in KAGGLE_WINDOWS]
        x = cv2.resize(np.stack(chans, axis=-1), (self.size, self.size))
        return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32)), torch.zeros(6)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rate(batches, step, warmup: int, steps: int, dev: torch.device) -> float:
    """images/s of `step` over `steps` batches after `warmup` untimed ones (worker start-up excluded)."""
    n, t0 = 0, None
    for i, (x, y) in enumerate(itertools.islice(batches, warmup + steps)):
        if i == warmup:
            _sync(dev)
            t0 = time.perf_counter()
        step(x, y)
        if t0 is not None:
            n += x.shape[0]
    _sync(dev)
    if t0 is None or n == 0:
        raise RuntimeError("no timed steps ran; raise --steps")
    return n / (time.perf_counter() - t0)


def _loader_rate(batches, warmup: int, steps: int) -> float:
    """images/s a loader delivers with nothing consuming its batches."""
    return _rate(batches, lambda x, y: None, warmup, steps, torch.device("cpu"))


def decode_cost_ms(build: Build, samples: int = 200) -> float:
    """Mean ms to decode one image of the first shard on one core."""
    raw = [
        s[build.encoding]
        for s in itertools.islice(read_shard(build.shards[0], build.encoding), samples)
    ]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        t0 = time.perf_counter()
        for data in raw:
            decode_bounded(data, build.encoding, build.layout)
        return (time.perf_counter() - t0) / len(raw) * 1e3
    finally:
        cv2.setNumThreads(threads)


def bench(
    shards: str, model: str = "efficientnet_b0", batch_size: int = 256, image_size: int | None = None,
    steps: int = 20, warmup: int = 3, workers: int = 4, dicom_dir: str | None = None,
    device: str = "auto", precision: str = "auto", loader_steps: int = 50, compile: bool = False,
    say=echo,
) -> dict:  # fmt: skip
    """Run (a), (b), (c), the loaders alone and the decode cost; print and return the numbers."""
    dev = pick_device(device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"  # as fit sets it (distributed.setup)
    build = Build(shards)
    size = image_size or build.size
    channels = build.layout.channels
    net = build_model(model_spec(model, channels)).to(dev, memory_format=torch.channels_last)
    mean, std = normalization(net, channels)
    opt = create_optimizer(net, 1e-4, 0.0, dev)  # the optimizer fit uses
    if compile:  # compiled once here; --warmup steps (untimed) absorb the compilation
        net = torch.compile(net)
    augment = DeviceAugment(size, mean, std, AugmentParams(), channels_last=True)
    loss_fn = MultiLabelLoss().to(dev)
    mean_t = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    gen = torch.Generator(device=dev).manual_seed(0)
    scaler = grad_scaler(dev, precision)  # fp16 trains with loss scaling, as fit does

    def step(x, y):
        with autocast(dev, precision):
            logits = net(x)
        loss = loss_fn(logits, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def uint8_step(images, y):
        step(
            augment(images.to(dev, non_blocking=True), train=True, generator=gen),
            y.to(dev, non_blocking=True),
        )

    def float_step(x, y):
        x = (x.to(dev, non_blocking=True) - mean_t) / std_t
        step(x.contiguous(memory_format=torch.channels_last), y.to(dev, non_blocking=True))

    say(
        f"bench: {model}{' (compiled)' if compile else ''} at {size}px, batch {batch_size}, "
        f"{resolve_precision(precision, dev)}, "
        f"{steps} timed steps after {warmup}, {workers} workers, {dev}"
    )
    first = next(
        iter(
            create_loader(
                TrainStream(build.shards, build.encoding, batch_size, 1, shuffle_buffer=1), 0, dev
            )
        )
    )
    resident = (first["image"].to(dev), torch.nan_to_num(first["label"]).to(dev))
    res = {"model": model, "image_size": size, "batch_size": batch_size, "device": str(dev),
           "compile": compile, "precision": resolve_precision(precision, dev)}  # fmt: skip
    res["a_resident"] = _rate(itertools.repeat(resident), uint8_step, warmup, steps, dev)
    say(f"(a) batch resident on device:   {res['a_resident']:9.1f} img/s")

    def shard_batches(n: int):  # fit's default loader: spans when the index has them
        stream = create_train_stream("auto", build.shards, build.encoding, batch_size, warmup + n,
                                     rank=0, world=1, seed=0, shuffle_buffer=batch_size)  # fmt: skip
        loader = create_loader(stream, workers, dev)
        return ((b["image"], torch.nan_to_num(b["label"])) for b in loader)

    res["b_pipeline"] = _rate(shard_batches(steps), uint8_step, warmup, steps, dev)
    res["b_over_a"] = res["b_pipeline"] / res["a_resident"]
    say(
        f"(b) full pipeline from shards:  {res['b_pipeline']:9.1f} img/s   b/a = {res['b_over_a']:.2f}"
    )
    files = sorted(str(p) for p in Path(dicom_dir).rglob("*.dcm")) if dicom_dir else []
    if dicom_dir and not files:
        raise FileNotFoundError(f"--dicom-dir {dicom_dir} holds no .dcm files")

    def dicom_batches(n: int):
        sampler = RandomSampler(files, replacement=True, num_samples=(warmup + n) * batch_size)
        loader = DataLoader(KaggleDicomDataset(files, size), batch_size, sampler=sampler,
                            num_workers=workers, pin_memory=dev.type == "cuda", drop_last=True,
                            worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers else None)  # fmt: skip
        return iter(loader)

    if files:
        res["c_baseline"] = _rate(dicom_batches(steps), float_step, warmup, steps, dev)
        res["b_over_c"] = res["b_pipeline"] / res["c_baseline"]
        say(
            f"(c) baseline DICOM loader:      {res['c_baseline']:9.1f} img/s   b/c = {res['b_over_c']:.2f}"
        )
    else:
        say("(c) baseline DICOM loader: skipped (pass --dicom-dir with the DICOMs to compare)")
    say(f"loaders alone, no model, {workers} workers, {loader_steps} batches of {batch_size}:")
    res["b_loader"] = _loader_rate(shard_batches(loader_steps), warmup, loader_steps)
    say(f"    shards (b):                 {res['b_loader']:9.1f} img/s")
    if files:
        res["c_loader"] = _loader_rate(dicom_batches(loader_steps), warmup, loader_steps)
        res["b_loader_over_c_loader"] = res["b_loader"] / res["c_loader"]
        say(
            f"    DICOMs (c):                 {res['c_loader']:9.1f} img/s   "
            f"shards/DICOMs = {res['b_loader_over_c_loader']:.2f}"
        )
    res["decode_ms"] = decode_cost_ms(build)
    say(
        f"CPU decode cost ({build.encoding}, {build.size}px): {res['decode_ms']:.3f} ms/image on one core"
    )
    res["series_mixing"] = _mixing(build, batch_size, None, say)
    res["series_mixing_context"] = _mixing(build, batch_size, Context(1), say)
    return res


def _mixing(build: Build, batch_size: int, context: Context | None, say) -> dict | None:
    """series_mixing of the build's loaders (single slices or --context stacks), printed; None
    for a build without series or labels."""
    try:
        mix = series_mixing(build, batch_size, shuffle_buffer=1000, context=context)
    except ValueError as e:
        if context is None:
            say(f"series mixing: skipped ({e})")
        return None
    if context is None:
        say(f"series mixing, batch {batch_size} (shuffle buffer 1000 for stream):")
    else:
        say(f"series mixing with --context {context.k}, batch {batch_size} (--shuffle-buffer 1000: stacks for stream, open series for spans):")  # fmt: skip
    uniform = mix["uniform"]["distinct_series"]
    for name, m in mix.items():
        say(f"    {name:8s} distinct series/batch {m['distinct_series']:7.1f} "
            f"({m['distinct_series'] / uniform:.2f} of uniform), any-label autocorrelation "
            f"{m['label_autocorr']:+.2f}")  # fmt: skip
    return mix
