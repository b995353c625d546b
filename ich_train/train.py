"""fit(): the training run, top to bottom.

data (folds -> shards via the manifest, labels and prior from the index) -> run folder and resume
-> model, optimizer, schedule, loss, device augmentation -> loaders -> epochs of
train_one_epoch() + validate(), one metrics row and checkpoint per epoch (rank 0 writes).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel as DDP

from ich_prep import LABELS
from ich_prep.location import atomic_file
from ich_train import distributed
from ich_train.augment import AugmentParams, DeviceAugment
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
from ich_train.data import Build, EvalStream, create_loader, create_train_stream
from ich_train.engine import train_one_epoch, validate
from ich_train.losses import create_loss
from ich_train.metrics import label_prior, prior_baseline_loss
from ich_train.model import (
    build_model,
    check_model_name,
    init_head_bias,
    load_pretrained,
    model_spec,
    normalization,
)
from ich_train.optim import create_optimizer, create_scheduler
from ich_train.report import (
    check_out_dir,
    check_predictions,
    report_dir_for,
    run_meta,
    write_predictions,
    write_report,
)
from ich_train.runlog import MetricsLog
from ich_train.sampler import describe


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
    """ConfigError unless --out can be a run folder: neither it nor a parent is a file."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            where = "" if p == out else f" ({p} is a file)"
            raise ConfigError(
                f"--out {out} cannot be a run folder{where}: an existing file is in the way; "
                "choose a folder path for --out"
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
        except (CheckpointError, ConfigError) as e:
            error = e
    ckpt, error = distributed.broadcast(dist, (ckpt, error))
    if error is not None:
        raise error
    return ckpt


def _restore(ckpt: dict, cfg: TrainConfig, model, ema, optimizer, scheduler) -> None:
    """Load a resumed run's weights, optimizer, schedule and RNG states, or a CheckpointError
    naming last.pt (a file that passed the key checks but was edited or cut)."""
    last = Path(cfg.out) / "last.pt"
    load_weights(model, ckpt.get("model_train", ckpt["model"]), last, cfg.model)
    if ema is not None:
        load_weights(ema.module, ckpt["model"], last, cfg.model)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(
            f"{last} cannot be resumed: its optimizer, schedule or RNG state is damaged "
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
    frame = pd.DataFrame({"image_id": predictions["ids"], "fold": cfg.valid_fold})
    for j, lab in enumerate(LABELS):
        frame[lab] = predictions["labels"][:, j].astype(np.int8)
    for j, lab in enumerate(LABELS):
        frame[f"pred_{lab}"] = predictions["probs"][:, j]
    meta = run_meta(load_checkpoint(best_pt), best_pt, cfg.shards)
    with atomic_file(path) as tmp:
        write_predictions(tmp, frame, meta)
    where = report_dir_for(path)
    write_report([check_predictions(frame, path)], [meta["run"]], where, [meta])
    return (
        f"report of best.pt on fold {cfg.valid_fold}: {where / 'report.html'} (predictions: {path})"
    )


def _fit(cfg: TrainConfig, resume: bool, dist: distributed.Dist) -> dict:
    dev, out = dist.device, Path(cfg.out)
    say = print if dist.main else (lambda *a, **k: None)

    # ---- data: folds select shards through the manifest; labels and the prior come from the index
    build = Build(cfg.shards)
    train_folds = cfg.train_folds or tuple(f for f in build.folds if f != cfg.valid_fold)
    train_shards, valid_shards = build.select(train_folds), build.select([cfg.valid_fold])
    y_train, y_valid = build.labels(train_folds), build.labels([cfg.valid_fold])
    prior = label_prior(y_train)
    prior_loss = prior_baseline_loss(y_train, y_valid)
    epoch_samples = cfg.epoch_samples or len(y_train)
    steps_per_epoch = epoch_samples // dist.world // (cfg.batch_size * cfg.accum_steps)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch of {epoch_samples} samples over {dist.world} process(es) is less than one step of "
            f"--batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps}; lower them"
        )
    image_size = cfg.image_size or build.size
    # --context: each sample a stack of its series' neighbours; the model's input channels follow
    context = create_context(cfg.context, cfg.context_window, build.layout)
    positions = series_positions(build.ok) if context else None
    channels = context.channels(build.layout) if context else build.layout.channels
    # the training stream (and a balanced epoch's draw) before anything is written: a build it
    # cannot read (no spans for --sampler balanced, one class only) leaves no run folder
    train_ds = create_train_stream(
        cfg.loader,
        train_shards,
        build.encoding,
        cfg.batch_size,
        steps_per_epoch * cfg.accum_steps,
        rank=dist.rank,
        world=dist.world,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        pos_fraction=cfg.pos_fraction if cfg.sampler == "balanced" else None,
        context=context,
        positions=positions,
    )

    # ---- run folder; a resume must match the saved config in every field that changes training
    check_model_name(cfg.model)
    if cfg.report:  # the end's report folder must be writable before hours of training
        check_out_dir(report_dir_for(out / f"oof_fold{cfg.valid_fold}.parquet"))
    ckpt = _open_run(cfg, build, resume, dist)

    # ---- model (and --pretrained) before anything is written: a bad file leaves no run folder
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    spec = model_spec(cfg.model, channels, cfg.drop_rate)
    model = build_model(spec)
    report = load_pretrained(model, cfg.pretrained) if cfg.pretrained and ckpt is None else None
    if ckpt is None:  # a new run starts from the prior; a resumed one has its own weights
        init_head_bias(model, prior)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    if report is not None:
        say(
            f"pretrained: {len(report['loaded'])} tensors from {cfg.pretrained}, new: {report['missing']}"
        )

    # ---- optimizer, schedule, loss, augmentation
    mean, std = normalization(model, channels)
    model.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    optimizer = create_optimizer(model, cfg.lr, cfg.weight_decay, dev, cfg.opt)
    scheduler = create_scheduler(
        optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_frac, cfg.min_lr_ratio
    )
    start_epoch, best, partial, best_predictions = 0, math.inf, None, None
    # the EMA copy is what validation, best.pt and predict use; the raw weights keep training
    ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True) if cfg.ema > 0 else None
    if ckpt is not None:
        _restore(ckpt, cfg, model, ema, optimizer, scheduler)
        start_epoch, best = ckpt["epoch"] + 1, ckpt["best_loss"]
        partial = ckpt.get("epoch_progress")
        if partial is not None:  # saved inside an epoch: redo none of its steps
            _check_mid_epoch(partial, cfg, dist)
            start_epoch = ckpt["epoch"]
        where = f", {partial['step']} of its steps done" if partial else ""
        say(f"resuming {out} at epoch {start_epoch + 1}{where} (step {ckpt['step']})")
    raw = model
    if dist.enabled:
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    loss_fn = create_loss(cfg).to(dev)
    augment = DeviceAugment(
        image_size, mean, std, AugmentParams.from_config(cfg), cfg.channels_last
    )

    # ---- loaders: an exact number of batches per rank per epoch, validation split over ranks
    valid_ds = EvalStream(
        valid_shards,
        build.encoding,
        cfg.eval_batch_size,
        rank=dist.rank,
        world=dist.world,
        workers=cfg.workers,
        context=context,
        positions=positions,
    )
    train_loader = create_loader(train_ds, cfg.workers, dev)
    valid_loader = create_loader(valid_ds, cfg.workers, dev)

    n_params = sum(p.numel() for p in raw.parameters()) / 1e6
    say(
        f"{cfg.model} ({n_params:.1f}M params) at {image_size}px on {dist.world} x {dev.type}; "
        f"train folds {list(train_folds)}: {len(train_shards)} shards, {len(y_train)} images; "
        f"valid fold {cfg.valid_fold}: {len(valid_shards)} shards, {len(y_valid)} images; "
        f"{steps_per_epoch} steps/epoch of {cfg.batch_size} x {cfg.accum_steps} x {dist.world}"
        + (f"; validating the EMA (decay {cfg.ema}) of the weights" if ema is not None else "")
    )
    if context is not None:
        say(f"context: {2 * context.k + 1} slices a sample, {channels} channels ({', '.join(context.names(build.layout))})")  # fmt: skip
    if cfg.sampler == "balanced":
        say(describe(train_ds.positive, train_ds.epoch_draws, cfg.pos_fraction))
    say(
        f"prior baseline (training label frequencies) on fold {cfg.valid_fold}: weighted log loss {prior_loss:.4f}"
    )
    log = MetricsLog(out, keep_before_epoch=start_epoch) if dist.main else None
    t_start, row, best_row = time.perf_counter(), {}, dict(ckpt["best_metrics"]) if ckpt else {}

    # ---- epochs
    def save(path: Path, epoch: int, metrics: dict, **extra) -> None:
        weights = {"model": raw.state_dict()}
        if ema is not None:  # "model" is what evaluate/predict load: the averaged weights
            weights = {"model": ema.module.state_dict(), "model_train": raw.state_dict()}
        save_checkpoint(
            path,
            **weights,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            step=scheduler.last_epoch,
            epoch=epoch,
            config=cfg.to_dict(),
            rng=rng_state(),
            prior=prior.tolist(),
            normalize={"mean": list(mean), "std": list(std)},
            image_size=image_size,
            in_chans=channels,
            model_spec=spec,
            data=checkpoint_data(build),
            metrics=metrics,
            best_loss=best,
            best_metrics=best_row,
            **extra,
        )

    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator(device=dev).manual_seed(augment_seed(cfg.seed, epoch, dist.rank))
        start = None
        if partial is not None and epoch == ckpt["epoch"]:
            start = partial["ranks"][dist.rank]
            gen.set_state(partial["generators"][dist.rank])
        train_ds.set_epoch(epoch, skip=start["step"] * cfg.accum_steps if start else 0)

        def checkpoint_mid_epoch(progress: dict, epoch=epoch, gen=gen) -> None:
            """last.pt inside an epoch: every rank's progress and augmentation generator."""
            ranks = distributed.all_gather(dist, (progress, gen.get_state()))
            if dist.main:
                save(out / "last.pt", epoch, {}, epoch_progress={
                    "step": progress["step"], "world": dist.world, "workers": cfg.workers,
                    "ranks": [r[0] for r in ranks], "generators": [r[1] for r in ranks],
                })  # fmt: skip
            distributed.barrier(dist)

        row = train_one_epoch(
            model,
            train_loader,
            optimizer,
            scheduler,
            loss_fn,
            augment,
            epoch=epoch,
            dist=dist,
            accum_steps=cfg.accum_steps,
            grad_clip=cfg.grad_clip,
            precision=cfg.precision,
            generator=gen,
            progress=cfg.progress,
            start=start,
            checkpoint_every=cfg.checkpoint_every,
            on_checkpoint=checkpoint_mid_epoch,
            ema=ema,
        )
        predictions: dict = {}
        row |= validate(
            raw if ema is None else ema.module,
            valid_loader,
            augment,
            dist=dist,
            expected=len(y_valid),
            precision=cfg.precision,
            progress=cfg.progress,
            keep=predictions,
        )
        row["prior_loss"] = prior_loss
        improved = row["valid_loss"] < best
        best_predictions = predictions if improved else best_predictions
        best = min(best, row["valid_loss"])
        best_row = row if improved else best_row
        if dist.main:
            log.append(row)
            save(out / "last.pt", epoch, row)
            if improved:
                with atomic_file(out / "best.pt") as tmp:
                    shutil.copyfile(out / "last.pt", tmp)
            drew = f", drew {row['train_any_share']:.1%} 'any'" if cfg.sampler == "balanced" else ""
            say(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, valid loss "
                f"{row['valid_loss']:.4f} (prior {prior_loss:.4f}), AUC any {row['valid_auc_any']:.3f}, "
                f"{row['train_images_per_s']:.0f} img/s{drew}{' *best' if improved else ''}"
            )
        distributed.barrier(dist)

    if dist.main and cfg.report:
        say(best_report(out, cfg, best_predictions))
    summary = {
        "out": str(out),
        "best_valid_loss": best,
        "best_auc_any": best_row.get("valid_auc_any", math.nan),
        "best_epoch": best_row.get("epoch", -1),
        "prior_loss": prior_loss,
        "last": row,
        "wall_s": time.perf_counter() - t_start,
    }
    say(
        f"done: best valid weighted log loss {best:.4f} (epoch {summary['best_epoch'] + 1}, AUC any "
        f"{summary['best_auc_any']:.3f}) vs prior baseline {prior_loss:.4f}; "
        f"checkpoints in {out} ({summary['wall_s']:.0f} s)"
    )
    return summary
