"""fit(): the training run, top to bottom.

data (folds -> shards via the manifest, labels and prior from the index) -> run folder and resume
-> model, optimizer, schedule, loss, device augmentation -> loaders -> epochs of
train_one_epoch() + validate(), one metrics row and checkpoint per epoch (rank 0 writes).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel as DDP

from ich_prep.location import atomic_file, atomic_open, file_in_the_way, what_is
from ich_prep.terminal import echo
from ich_train import distributed
from ich_train.augment import AugmentParams, DeviceAugment
from ich_train.average import BN_BATCHES, average
from ich_train.checkpoint import (
    INFER_KEYS,
    RESUME_KEYS,
    CheckpointError,
    checkpoint_data,
    load_checkpoint,
    load_weights,
    rng_state,
    same_build,
    save_checkpoint,
    set_rng_state,
    short_reason,
)
from ich_train.config import ConfigError, TrainConfig, check_resumable
from ich_train.context import create_context, series_positions
from ich_train.data import Build, EvalStream, SpanStream, create_loader, create_train_stream
from ich_train.engine import (
    PRECISIONS_CHOSEN,
    device_name,
    grad_scaler,
    resolve_precision,
    train_one_epoch,
    validate,
)
from ich_train.losses import create_loss
from ich_train.metrics import label_prior, prior_baseline_loss
from ich_train.model import (
    build_model,
    check_model_name,
    init_head,
    load_pretrained,
    model_spec,
    normalization,
    zero_init_residuals,
)
from ich_train.optim import create_optimizer, create_scheduler
from ich_train.report import (
    check_out_dir,
    check_predictions,
    predictions_frame,
    report_dir_for,
    run_meta,
    write_predictions,
    write_report,
)
from ich_train.runlog import MetricsLog
from ich_train.sampler import describe, logit_adjustment, positives_drawn, sampled_prior


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the device augmentation generator: fixed per (run seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)


def _check_mid_epoch(partial: dict, cfg: TrainConfig, dist: distributed.Dist) -> None:
    """A checkpoint saved inside an epoch resumes exactly only with the same processes and workers:
    together they fix which samples each batch held."""
    keys = ("step", "world", "workers", "ranks", "generators")
    if not (isinstance(partial, dict) and all(k in partial for k in keys)) or not (
        len(partial["ranks"]) == len(partial["generators"]) == partial["world"]
    ):
        raise CheckpointError(
            f"{cfg.out}/last.pt has a damaged epoch_progress (saved inside an epoch); "
            "start a new run with another --out"
        )
    if partial["world"] != dist.world or partial["workers"] != cfg.workers:
        raise ConfigError(
            f"{cfg.out}/last.pt was saved inside an epoch by {partial['world']} process(es) with "
            f"--workers {partial['workers']}; resume with the same process count and --workers "
            f"(now {dist.world} and {cfg.workers})"
        )


def fit(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train cfg.model on the training folds, validating on cfg.valid_fold; returns a summary dict."""
    dist = distributed.setup(cfg.device)
    try:
        return _fit(cfg, resume, dist)
    finally:
        distributed.cleanup()


def check_out_folder(out: Path) -> None:
    """ConfigError unless --out can be a run folder: neither it nor a parent is a file (or a
    link to nothing)."""
    p = file_in_the_way(out, itself=True)
    if p is not None:
        raise ConfigError(
            f"--out {out} cannot be a run folder: {p} is {what_is(p)}, in the way; "
            "choose a folder path for --out"
        )


RUN_FILES = ("config.json", "metrics.csv", "metrics.png")  # written before the first checkpoint


def _is_our_config(path: Path) -> bool:
    """True when `path` is a regular file (not a link) holding a TrainConfig's json."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 2**20:
            return False
        TrainConfig.from_dict(json.loads(path.read_bytes()))
        return True
    except (OSError, ValueError, TypeError, RecursionError, AttributeError, ConfigError):
        return False


def check_new_run_folder(out: Path) -> None:
    """ConfigError when a new run's files would overwrite someone else's: --out holds
    config.json, metrics.csv or metrics.png without a config.json of ours beside them (a run of
    ours stopped before its first checkpoint is started again)."""
    there = [n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()]
    if there and not _is_our_config(out / "config.json"):
        raise ConfigError(
            f"--out {out} already holds {', '.join(there)}, not written by an ich-train run; "
            "choose a new or empty folder for --out"
        )


def _open_run(cfg: TrainConfig, build: Build, resume: bool, dist: distributed.Dist) -> dict | None:
    """The checkpoint to resume from (None for a new run). Rank 0 alone reads the run folder (other
    nodes may not see it) and shares the checkpoint, or the error, with every rank. Writes nothing."""
    ckpt, error, out = None, None, Path(cfg.out)
    last = out / "last.pt"
    if dist.main:
        try:
            check_out_folder(out)
            if resume:
                if not last.exists():
                    raise ConfigError(
                        f"--resume: {last} does not exist (no epoch or --checkpoint-every step "
                        "was saved yet); run without --resume to start the run"
                    )
                ckpt = load_checkpoint(last, INFER_KEYS + RESUME_KEYS)
                check_resumable(ckpt["config"], cfg)
                same, diffs = same_build(ckpt["data"], build.manifest)
                if not same:
                    was = ckpt["config"].get("shards", "?")
                    raise ConfigError(
                        f"--resume: --shards {cfg.shards} is not the build {cfg.out} was trained on "
                        f"({was}): {'; '.join(diffs)}; pass --shards {was} (or a copy of it) or "
                        "start a new run with another --out"
                    )
            elif last.exists():
                raise ConfigError(
                    f"{cfg.out} already holds a run; pass --resume to continue it or choose a new --out"
                )
            else:
                check_new_run_folder(out)
        except (CheckpointError, ConfigError) as e:
            error = e
    ckpt, error = distributed.broadcast(dist, (ckpt, error))
    if error is not None:
        raise error
    return ckpt


def _restore(ckpt: dict, cfg: TrainConfig, model, ema, optimizer, scheduler, scaler) -> None:
    """Load a resumed run's weights, optimizer, schedule, loss scale (fp16) and RNG states, or a
    CheckpointError naming last.pt (a file that passed the key checks but was edited or cut)."""
    last = Path(cfg.out) / "last.pt"
    load_weights(model, ckpt.get("model_train", ckpt["model"]), last, cfg.model)
    if ema is not None:
        load_weights(ema.module, ckpt["model"], last, cfg.model)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt.get("scaler"):  # none: the run did not train in fp16
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(
            f"{last} cannot be resumed: its optimizer, schedule, loss scale or RNG state is damaged "
            f"({short_reason(e)}); start a new run with another --out"
        ) from e


def best_report(out: Path, cfg: TrainConfig, predictions: dict | None) -> str:
    """The validation fold's predictions by best.pt (oof_fold<K>.parquet, the format of
    `ich-train evaluate`) and its report folder beside them; one line saying where. Only when
    best.pt's epoch ran in this process: after a resume past it, `ich-train evaluate` makes them."""
    best_pt = out / "best.pt"
    if not predictions or not best_pt.is_file():
        return f"report: best.pt's epoch ran before this resume; `ich-train evaluate --checkpoint {best_pt} --shards {cfg.shards} --fold {cfg.valid_fold}` writes its report"  # fmt: skip
    path = out / f"oof_fold{cfg.valid_fold}.parquet"
    frame = predictions_frame(predictions["ids"], cfg.valid_fold, predictions["labels"], predictions["probs"])  # fmt: skip
    meta = run_meta(load_checkpoint(best_pt), best_pt, cfg.shards)
    with atomic_file(path) as tmp:
        write_predictions(tmp, frame, meta)
    where = report_dir_for(path)
    write_report([check_predictions(frame, path)], [meta["run"]], where, [meta])
    return (
        f"report of best.pt on fold {cfg.valid_fold}: {where / 'report.html'} (predictions: {path})"
    )


@dataclass
class Data:
    """What the build gives a run: folds -> shards through the manifest, labels and the prior from
    the index, the epoch's length, the image layout (and --context stacks) the model takes."""

    build: Build
    train_folds: tuple[int, ...]
    train_shards: list
    valid_shards: list
    y_train: np.ndarray
    y_valid: np.ndarray
    prior: np.ndarray
    prior_loss: float
    steps_per_epoch: int
    image_size: int
    context: object
    positions: dict | None
    channels: int
    train_ds: object
    # --sampler balanced: each label's share among an epoch's draws (where the head starts) and
    # the prior correction added to the logits at validation, evaluate and predict
    # (sampler.logit_adjustment); None for natural runs
    drawn: np.ndarray | None = None
    adjustment: np.ndarray | None = None


def load_data(cfg: TrainConfig, dist: distributed.Dist) -> Data:
    """The run's data, and its training stream (a balanced epoch's draw included) before anything
    is written: a build it cannot read (no spans for --sampler balanced, one class only, no series
    for --context) leaves no run folder."""
    build = Build(cfg.shards)
    train_folds = tuple(cfg.train_folds or (f for f in build.folds if f != cfg.valid_fold))
    train_shards, valid_shards = build.select(train_folds), build.select([cfg.valid_fold])
    y_train, y_valid = build.labels(train_folds), build.labels([cfg.valid_fold])
    epoch_samples = cfg.epoch_samples or len(y_train)
    steps_per_epoch = epoch_samples // dist.world // (cfg.batch_size * cfg.accum_steps)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch of {epoch_samples} samples over {dist.world} process(es) is less than one step of "
            f"--batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps}; lower them"
        )
    # --context: each sample a stack of its series' neighbours; the model's input channels follow
    context = create_context(cfg.context, cfg.context_window, build.layout)
    positions = series_positions(build.ok) if context else None
    channels = context.channels(build.layout) if context else build.layout.channels
    train_ds = create_train_stream(
        cfg.loader, train_shards, build.encoding, cfg.batch_size, steps_per_epoch * cfg.accum_steps,
        rank=dist.rank, world=dist.world, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
        pos_fraction=cfg.pos_fraction if cfg.sampler == "balanced" else None,
        context=context, positions=positions,
    )  # fmt: skip
    drawn = adjustment = None
    if cfg.sampler == "balanced":  # an epoch that cannot be drawn is refused here, not at epoch 1
        positives_drawn(train_ds.epoch_draws, cfg.pos_fraction)
        drawn = sampled_prior(y_train, train_ds.epoch_draws, cfg.pos_fraction)
        adjustment = logit_adjustment(label_prior(y_train), drawn)
    return Data(build, train_folds, train_shards, valid_shards, y_train, y_valid,
                label_prior(y_train), prior_baseline_loss(y_train, y_valid), steps_per_epoch,
                cfg.image_size or build.size, context, positions, channels, train_ds, drawn, adjustment)  # fmt: skip


@dataclass
class Run:
    """The model and what trains it; save() writes a checkpoint of it."""

    cfg: TrainConfig
    dist: distributed.Dist
    data: Data
    spec: dict
    raw: torch.nn.Module  # the model itself; `model` may be its DDP / compiled wrapper
    model: torch.nn.Module
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: torch.nn.Module
    augment: DeviceAugment
    normalize: dict
    precision: str  # what --precision chose on this device (run_precision)
    scaler: torch.amp.GradScaler  # fp16's loss scaler; disabled otherwise
    best: float = math.inf
    best_row: dict = field(default_factory=dict)
    best_predictions: dict | None = None

    def save(self, path: Path, epoch: int, metrics: dict, **extra) -> None:
        weights = {"model": self.raw.state_dict()}
        if self.ema is not None:  # "model" is what evaluate/predict load: the averaged weights
            weights = {"model": self.ema.module.state_dict(), "model_train": self.raw.state_dict()}
        save_checkpoint(
            path, **weights, optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), step=self.scheduler.last_epoch, epoch=epoch,
            config=self.cfg.to_dict(), rng=rng_state(), prior=self.data.prior.tolist(),
            normalize=self.normalize, image_size=self.data.image_size, in_chans=self.data.channels,
            model_spec=self.spec, data=checkpoint_data(self.data.build), metrics=metrics,
            best_loss=self.best, best_metrics=self.best_row, **self._adjustment(), precision=self.precision,
            scaler=self.scaler.state_dict(), **extra,
        )  # fmt: skip

    def _adjustment(self) -> dict:
        a = self.data.adjustment
        return {} if a is None else {"logit_adjustment": [float(v) for v in a]}

    def checkpoint_mid_epoch(self, epoch: int, gen: torch.Generator, progress: dict) -> None:
        """last.pt inside an epoch: every rank's progress and augmentation generator."""
        dist, cfg = self.dist, self.cfg
        ranks = distributed.all_gather(dist, (progress, gen.get_state()))
        if dist.main:
            self.save(Path(cfg.out) / "last.pt", epoch, {}, epoch_progress={
                "step": progress["step"], "world": dist.world, "workers": cfg.workers,
                "ranks": [r[0] for r in ranks], "generators": [r[1] for r in ranks],
            })  # fmt: skip
        distributed.barrier(dist)


def _normalize(cfg: TrainConfig, model, channels: int, ckpt: dict | None) -> tuple[list, list]:
    """(mean, std) of a run: a new run's from the weights it starts from (--pretrained timm:TAG's
    own config), a resumed run's from its checkpoint (--pretrained may change on resume; what the
    model learned on may not)."""
    if ckpt is None:
        mean, std = normalization(model, channels, cfg.pretrained)
        return list(mean), list(std)
    norm = ckpt["normalize"]
    if len(norm["mean"]) != channels:
        raise CheckpointError(f"{cfg.out}/last.pt is damaged: {len(norm['mean'])} normalisation values for {channels} input channels; start a new run with another --out")  # fmt: skip
    return [float(v) for v in norm["mean"]], [float(v) for v in norm["std"]]


def run_precision(cfg: TrainConfig, dev: torch.device, ckpt: dict | None) -> str:
    """bf16, fp16 or fp32: --precision on this device, except that a resumed --precision auto run
    keeps what it chose when it started (recorded in its checkpoints), on any device."""
    chosen = ckpt.get("precision") if ckpt is not None else None
    if cfg.precision == "auto" and chosen in PRECISIONS_CHOSEN:
        return chosen
    return resolve_precision(cfg.precision, dev)


def create_run(cfg: TrainConfig, dist: distributed.Dist, data: Data, ckpt: dict | None, say) -> Run:
    """Model (and --pretrained, before the run folder is written: a bad file leaves none), head
    bias at the prior, optimizer, schedule, EMA, loss and device augmentation; a resumed run's
    states restored."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    spec = model_spec(cfg.model, data.channels, cfg.drop_rate)
    model = build_model(spec)
    report = load_pretrained(model, cfg.pretrained) if cfg.pretrained and ckpt is None else None
    if ckpt is None:  # a new run starts from the prior it trains on; a resumed one has its weights
        init_head(model, data.prior if data.drawn is None else data.drawn)
        if not cfg.pretrained:  # from scratch: residual blocks start at the identity
            zero_init_residuals(model)
    if dist.main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        with atomic_open(
            Path(cfg.out) / "config.json"
        ) as f:  # a resume never writes through a link
            f.write((json.dumps(cfg.to_dict(), indent=1) + "\n").encode())
    if report is not None:
        say(f"pretrained: {len(report['loaded'])} tensors from {cfg.pretrained}, new: {report['missing']}")  # fmt: skip
    mean, std = _normalize(cfg, model, data.channels, ckpt)
    dev = dist.device
    model.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    optimizer = create_optimizer(model, cfg.lr, cfg.weight_decay, dev, cfg.opt)
    scheduler = create_scheduler(optimizer, data.steps_per_epoch * cfg.epochs, cfg.warmup_frac, cfg.min_lr_ratio)  # fmt: skip
    # the EMA copy is what validation, best.pt and predict use; the raw weights keep training
    ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True) if cfg.ema > 0 else None
    precision = run_precision(cfg, dev, ckpt)
    scaler = grad_scaler(dev, precision)
    if ckpt is not None:
        _restore(ckpt, cfg, model, ema, optimizer, scheduler, scaler)
    raw = model
    if dist.enabled:
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    augment = DeviceAugment(data.image_size, mean, std, AugmentParams.from_config(cfg), cfg.channels_last)  # fmt: skip
    run = Run(cfg, dist, data, spec, raw, model, ema, optimizer, scheduler, create_loss(cfg).to(dev),
              augment, {"mean": mean, "std": std}, precision, scaler)  # fmt: skip
    if ckpt is not None:
        run.best, run.best_row = ckpt["best_loss"], dict(ckpt["best_metrics"])
    return run


def start_point(ckpt: dict | None, cfg: TrainConfig, dist: distributed.Dist, say) -> tuple[int, dict | None]:  # fmt: skip
    """(first epoch to run, the progress saved inside it or None) of a new or resumed run."""
    if ckpt is None:
        return 0, None
    start_epoch, partial = ckpt["epoch"] + 1, ckpt.get("epoch_progress")
    if partial is not None:  # saved inside an epoch: redo none of its steps
        _check_mid_epoch(partial, cfg, dist)
        start_epoch = ckpt["epoch"]
    where = f", {partial['step']} of its steps done" if partial else ""
    say(f"resuming {cfg.out} at epoch {start_epoch + 1}{where} (step {ckpt['step']})")
    return start_epoch, partial


def announce(run: Run, say) -> None:
    """What is about to train, on what, against which baseline."""
    cfg, d, dist = run.cfg, run.data, run.dist
    n_params = sum(p.numel() for p in run.raw.parameters()) / 1e6
    say(
        f"{cfg.model} ({n_params:.1f}M params) at {d.image_size}px on {dist.world} x {dist.device.type}; "
        f"train folds {list(d.train_folds)}: {len(d.train_shards)} shards, {len(d.y_train)} images; "
        f"valid fold {cfg.valid_fold}: {len(d.valid_shards)} shards, {len(d.y_valid)} images; "
        f"{d.steps_per_epoch} steps/epoch of {cfg.batch_size} x {cfg.accum_steps} x {dist.world}"
        + (f"; validating the EMA (decay {cfg.ema}) of the weights" if run.ema is not None else "")
    )
    how = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling", "fp32": "fp32"}
    say(
        f"precision: {how[run.precision]} (--precision {cfg.precision} on {device_name(dist.device)})"
    )
    if d.context is not None:
        say(f"context: {2 * d.context.k + 1} slices a sample, {d.channels} channels ({', '.join(d.context.names(d.build.layout))}); {_context_reader(d.train_ds, cfg)}")  # fmt: skip
    if cfg.sampler == "balanced":
        say(describe(d.train_ds.positive, d.train_ds.epoch_draws, cfg.pos_fraction))
        shift = ", ".join(f"{v:+.3f}" for v in d.adjustment)
        say(f"prior correction: validation, evaluate and predict add logit(natural) - logit(drawn) = [{shift}] to the logits (evaluate/predict --no-prior-correction to leave them)")  # fmt: skip
    say(f"prior baseline (training label frequencies) on fold {cfg.valid_fold}: weighted log loss {d.prior_loss:.4f}")  # fmt: skip


def _context_reader(ds, cfg: TrainConfig) -> str:
    """How the --context stacks are read: which loader, and what its buffer holds."""
    if isinstance(ds, SpanStream):
        return f"span loader, {cfg.shuffle_buffer} series open per loader worker (--shuffle-buffer)"
    return f"streaming loader, {cfg.shuffle_buffer} stacks buffered per loader worker (--shuffle-buffer)"  # fmt: skip


def run_epoch(run: Run, epoch: int, start, gen, loaders, log, say) -> dict:
    """One epoch: train (from `start`, the progress saved inside it, if any), validate, keep the
    best, write last.pt (and best.pt); its metrics row."""
    cfg, dist, out = run.cfg, run.dist, Path(run.cfg.out)
    train_loader, valid_loader = loaders
    row = train_one_epoch(
        run.model, train_loader, run.optimizer, run.scheduler, run.loss_fn, run.augment,
        epoch=epoch, dist=dist, accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip,
        precision=run.precision, generator=gen, progress=cfg.progress, start=start,
        checkpoint_every=cfg.checkpoint_every, ema=run.ema, scaler=run.scaler,
        on_checkpoint=lambda progress: run.checkpoint_mid_epoch(epoch, gen, progress),
    )  # fmt: skip
    predictions: dict = {}
    row |= validate(
        run.raw if run.ema is None else run.ema.module, valid_loader, run.augment, dist=dist,
        expected=len(run.data.y_valid), precision=run.precision, progress=cfg.progress,
        keep=predictions, shift=run.data.adjustment,
    )  # fmt: skip
    row["prior_loss"] = run.data.prior_loss
    improved = row["valid_loss"] < run.best
    if improved:
        run.best, run.best_row, run.best_predictions = row["valid_loss"], row, predictions
    if dist.main:
        log.append(row)
        run.save(out / "last.pt", epoch, row)
        keep = [out / "best.pt"] if improved else []
        if epoch >= cfg.epochs - cfg.average_last:  # --average-last: the epochs avg.pt averages
            keep.append(out / f"epoch{epoch + 1}.pt")
        for path in keep:
            with atomic_file(path) as tmp:
                shutil.copyfile(out / "last.pt", tmp)
        drew = f", drew {row['train_any_share']:.1%} 'any'" if cfg.sampler == "balanced" else ""
        say(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, valid loss "
            f"{row['valid_loss']:.4f} (prior {run.data.prior_loss:.4f}), AUC any {row['valid_auc_any']:.3f}, "
            f"{row['train_images_per_s']:.0f} img/s{drew}{' *best' if improved else ''}"
        )
    distributed.barrier(dist)
    return row


def write_average(run: Run, say) -> None:
    """avg.pt: the mean weights of the last --average-last epochs' checkpoints, batch-norm
    statistics recomputed on training batches of a fresh epoch's draw (rank 0's share)."""
    cfg, out = run.cfg, Path(run.cfg.out)
    paths = [out / f"epoch{e + 1}.pt" for e in range(cfg.epochs - cfg.average_last, cfg.epochs)]
    run.data.train_ds.set_epoch(cfg.epochs)
    loader = create_loader(run.data.train_ds, cfg.workers, run.dist.device)
    batches = itertools.islice(loader, BN_BATCHES)
    average(paths, out / "avg.pt", batches=batches, device=run.dist.device, say=say)
    say(f"evaluate it: ich-train evaluate --checkpoint {out / 'avg.pt'} --shards {cfg.shards} --fold {cfg.valid_fold}")  # fmt: skip


def _fit(cfg: TrainConfig, resume: bool, dist: distributed.Dist) -> dict:
    dev, out = dist.device, Path(cfg.out)
    say = echo if dist.main else (lambda *a, **k: None)

    # ---- data, then the run folder: a resume must match the saved config in every field that
    # changes training; the end's report folder must be writable before hours of training
    data = load_data(cfg, dist)
    check_model_name(cfg.model)
    ckpt = _open_run(cfg, data.build, resume, dist)
    if cfg.report:
        check_out_dir(report_dir_for(out / f"oof_fold{cfg.valid_fold}.parquet"))

    # ---- model, optimizer, schedule, loss, augmentation (a resumed run's states restored)
    run = create_run(cfg, dist, data, ckpt, say)
    start_epoch, partial = start_point(ckpt, cfg, dist, say)

    # ---- loaders: an exact number of batches per rank per epoch, validation split over ranks
    valid_ds = EvalStream(data.valid_shards, data.build.encoding, cfg.eval_batch_size, rank=dist.rank,
                          world=dist.world, workers=cfg.workers, context=data.context, positions=data.positions)  # fmt: skip
    loaders = (
        create_loader(data.train_ds, cfg.workers, dev),
        create_loader(valid_ds, cfg.workers, dev),
    )
    announce(run, say)
    log = MetricsLog(out, keep_before_epoch=start_epoch) if dist.main else None
    t_start, row = time.perf_counter(), {}

    # ---- epochs: a resumed epoch continues from its saved step and augmentation generator
    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator(device=dev).manual_seed(augment_seed(cfg.seed, epoch, dist.rank))
        start = None
        if partial is not None and epoch == ckpt["epoch"]:
            start = partial["ranks"][dist.rank]
            gen.set_state(partial["generators"][dist.rank])
        data.train_ds.set_epoch(epoch, skip=start["step"] * cfg.accum_steps if start else 0)
        row = run_epoch(run, epoch, start, gen, loaders, log, say)

    # ---- the end: best.pt's report, avg.pt and a summary
    if dist.main and cfg.report:
        say(best_report(out, cfg, run.best_predictions))
    if dist.main and cfg.average_last:
        write_average(run, say)
    distributed.barrier(dist)
    summary = {
        "out": str(out),
        "best_valid_loss": run.best,
        "best_auc_any": run.best_row.get("valid_auc_any", math.nan),
        "best_epoch": run.best_row.get("epoch", -1),
        "prior_loss": data.prior_loss,
        "last": row,
        "wall_s": time.perf_counter() - t_start,
    }
    say(
        f"done: best valid weighted log loss {run.best:.4f} (epoch {summary['best_epoch'] + 1}, AUC any "
        f"{summary['best_auc_any']:.3f}) vs prior baseline {data.prior_loss:.4f}; "
        f"checkpoints in {out} ({summary['wall_s']:.0f} s)"
    )
    return summary
