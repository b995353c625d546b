"""`python -m ich_train.gpu_table`: one markdown table of training and inference throughput on the
device at hand, ready for docs/benchmarks.md (scripts/gpu_check.sh runs it).

Per model, for every precision the device runs natively (fp32, fp16, bf16 where
resolve_precision's test says so), eager and (at the `auto` precision) --compile, 2D and
--context 1: images/s of (a) a training step on a batch resident on the device (the ceiling),
(b) the same step fed by the shard pipeline (only for eager at the `auto` precision: the loader
does not depend on the rest), inference (predict's forward + sigmoid) and embed (pooled features +
logits) on the resident batch, and the peak device memory of the cell. Cells past --budget-s are
listed as skipped, so the table always comes out within the budget.
"""

from __future__ import annotations

import itertools
import math
import sys
import time

import torch

from ich_prep.errors import OneLineParser, UserError, run_cli
from ich_prep.location import atomic_open
from ich_prep.terminal import echo
from ich_train.augment import AugmentParams, DeviceAugment
from ich_train.bench import _rate
from ich_train.context import create_context, series_positions
from ich_train.data import Build, create_loader, create_train_stream
from ich_train.distributed import pick_device
from ich_train.embed import pooled_and_logits
from ich_train.engine import autocast, device_name, grad_scaler, resolve_precision
from ich_train.losses import MultiLabelLoss
from ich_train.model import build_model, model_spec, normalization
from ich_train.optim import create_optimizer

COLUMNS = ("model", "precision", "mode", "input", "resident train", "pipeline train", "inference", "embed", "peak GiB")  # fmt: skip


def precisions(dev: torch.device) -> list[str]:
    """fp32 and fp16 everywhere; bf16 where the device runs it natively ('auto' picks it)."""
    native_bf16 = dev.type == "cuda" and resolve_precision("auto", dev) == "bf16"
    return ["fp32", "fp16"] + (["bf16"] if native_bf16 else [])


def _peak_gib(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else math.nan


def _forward_rate(fn, x, dev, precision, steps, warmup) -> float:
    """images/s of `fn(x)` under inference_mode and the precision's autocast."""

    def once(x, _):
        with torch.inference_mode(), autocast(dev, precision):
            fn(x).float().sum()

    return _rate(itertools.repeat((x, None)), once, warmup, steps, dev)


def measure(model: str, channels: int, size: int, raw: int, precision: str, compiled: bool,
            batch: int, steps: int, warmup: int, dev: torch.device, batches=None) -> dict:  # fmt: skip
    """One table row: the rates of one model, precision, mode and input (see the module doc)."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    plain = build_model(model_spec(model, channels)).to(dev, memory_format=torch.channels_last)
    mean, std = normalization(plain, channels)
    opt, scaler = create_optimizer(plain, 1e-4, 0.0, dev), grad_scaler(dev, precision)
    net = torch.compile(plain) if compiled else plain
    augment = DeviceAugment(size, mean, std, AugmentParams(), channels_last=True)
    loss_fn, gen = MultiLabelLoss().to(dev), torch.Generator(device=dev).manual_seed(0)

    def step(images, y):
        x = augment(images.to(dev, non_blocking=True), train=True, generator=gen)
        with autocast(dev, precision):
            logits = net(x)
        scaler.scale(loss_fn(logits, y.to(dev, non_blocking=True))).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    # a batch as the loader hands it over: uint8 (B, H, W, C) at the build's size (`raw`)
    images = torch.randint(0, 256, (batch, raw, raw, channels), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 2, (batch, 6), device=dev).float()
    row = {"resident train": _rate(itertools.repeat((images, labels)), step, warmup, steps, dev)}
    if batches is not None:
        row["pipeline train"] = _rate(batches, step, warmup, steps, dev)
    net.eval()
    x = augment(images, train=False)
    row["inference"] = _forward_rate(lambda x: torch.sigmoid(net(x)), x, dev, precision, steps, warmup)  # fmt: skip
    row["embed"] = _forward_rate(lambda x: torch.cat(pooled_and_logits(plain, x), 1), x, dev, precision, steps, warmup)  # fmt: skip
    row["peak GiB"] = _peak_gib(dev)
    return row


def shard_batches(build: Build, context, batch: int, n: int, workers: int, dev: torch.device):
    """n training batches of the build through fit's loader (the streaming one with --context)."""
    positions = series_positions(build.ok) if context else None
    stream = create_train_stream("stream" if context else "auto", build.shards, build.encoding, batch, n,
                                 rank=0, world=1, seed=0, shuffle_buffer=batch, context=context,
                                 positions=positions)  # fmt: skip
    return ((b["image"], torch.nan_to_num(b["label"])) for b in create_loader(stream, workers, dev))


def cells(models: list[str], dev: torch.device, compile_too: bool):
    """(model, precision, compiled, context k) of every row: every model's eager rows first, then
    the compiled ones (compiling takes a minute a model: the time budget cuts those first)."""
    auto = resolve_precision("auto", dev)
    for model in models:
        for k in (0, 1):
            for precision in precisions(dev):
                yield model, precision, False, k
    for model in models if compile_too else ():
        for k in (0, 1):
            yield model, auto, True, k


def table(args) -> str:
    dev = pick_device(args.device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    build = Build(args.shards)
    size, t0, rows = args.size or build.size, time.perf_counter(), []
    auto = resolve_precision("auto", dev)
    for model, precision, compiled, k in cells(args.models, dev, args.compile):
        context = create_context(k, None, build.layout) if k else None
        channels = context.channels(build.layout) if context else build.layout.channels
        row = {"model": model, "precision": precision, "mode": "compile" if compiled else "eager",
               "input": f"--context {k} ({channels} ch)" if k else f"2D ({channels} ch)"}  # fmt: skip
        if time.perf_counter() - t0 > args.budget_s:
            rows.append({**row, "resident train": "skipped (time budget)"})
            continue
        batches = None
        if precision == auto and not compiled:
            batches = shard_batches(build, context, args.batch, args.warmup + args.steps, args.workers, dev)  # fmt: skip
        row |= measure(model, channels, size, build.size, precision, compiled, args.batch, args.steps, args.warmup, dev, batches)  # fmt: skip
        rows.append(row)
        echo(" ".join(f"{c}={_fmt(row.get(c))}" for c in COLUMNS))
        sys.stdout.flush()
    return render(rows, dev, size, args)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else (f"{v:.2f}" if v < 100 else f"{v:,.0f}")
    return str(v)


def render(rows: list[dict], dev: torch.device, size: int, args) -> str:
    """The markdown table, headed by the device and the settings."""
    head = (
        f"**{device_name(dev)}**, torch {torch.__version__}, {size} px, batch {args.batch}, "
        f"{args.steps} timed steps after {args.warmup}, {args.workers} loader workers; images/s "
        "(pipeline: shards -> workers -> device augmentation, at the `auto` precision, eager)"
    )
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m ich_train.gpu_table", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shards", required=True, help="a series-aware training build (for --context 1)"
    )
    p.add_argument("--models", nargs="+", default=["efficientnet_b0", "efficientnet_b2"])
    p.add_argument("--size", type=int, default=None, help="default: the build's size")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="add --compile rows (auto precision)")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new row after this")
    p.add_argument("--out", default=None, help="also write the table to this file")

    def run(args) -> int:
        text = table(args)
        echo(text)
        if args.out:
            with atomic_open(args.out) as f:  # the one local writer: never through a link
                f.write(text.encode())
        return 0

    p.set_defaults(func=run, command="table")
    return run_cli(p, argv, "gpu_table", (UserError, FileNotFoundError), str, lambda e, a: str(e), lambda a: "")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
