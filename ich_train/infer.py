"""Inference from checkpoints: evaluate() a labelled fold (metrics + out-of-fold Parquet) and
predict_submission() a test build (checkpoints and TTA averaged) into a Kaggle CSV."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import timm
import torch

from ich_prep import LABELS
from ich_prep.location import atomic_file
from ich_prep.terminal import echo
from ich_train import distributed
from ich_train.augment import AugmentParams, DeviceAugment
from ich_train.checkpoint import (
    CheckpointError,
    check_keys,
    load_checkpoint,
    load_weights,
    recorded_adjustment,
    trained_preprocessing,
)
from ich_train.context import context_of, series_positions
from ich_train.data import Build, EvalStream, create_loader
from ich_train.engine import predict
from ich_train.metrics import compute_metrics, weighted_log_loss
from ich_train.model import UnknownModelError, build_model, model_spec
from ich_train.report import (
    check_out_dir,
    check_predictions,
    predictions_frame,
    report_dir_for,
    run_meta,
    write_predictions,
    write_report,
)
from ich_train.submission import (
    SubmissionError,
    align_to_index,
    check_out_file,
    check_submission,
    write_submission,
)

NO_AUGMENT = AugmentParams(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def load_model(path: str | Path, device: torch.device):
    """(model in eval mode on `device`, its DeviceAugment without augmentation, the checkpoint dict)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    ckpt.setdefault("in_chans", 3)  # checkpoints from before layouts: 3 channels
    check_keys(ckpt, ("in_chans",), path)
    if len(ckpt["normalize"]["mean"]) != ckpt["in_chans"]:
        raise CheckpointError(f"{path} is damaged: {len(ckpt['normalize']['mean'])} normalisation values for {ckpt['in_chans']} input channels; pass a best.pt or last.pt written by ich-train fit")  # fmt: skip
    spec = ckpt.get("model_spec", model_spec(cfg["model"], ckpt["in_chans"]))  # older: from config
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path} is damaged: its model_spec is not a mapping; pass a best.pt or last.pt written by ich-train fit")  # fmt: skip
    # the config names the model and in_chans its input (checked against the build); the weights
    # must fit both, or load_weights says they do not
    spec = {**spec, "name": cfg["model"], "in_chans": ckpt["in_chans"]}
    try:
        model = build_model(spec)
    except UnknownModelError as e:
        if timm.is_model(cfg["model"]):
            raise CheckpointError(f"{path} is damaged: {e}") from None
        raise CheckpointError(
            f"{path} was trained as --model {cfg['model']!r}, which this timm does not have; "
            "install the timm version the run used"
        ) from None
    load_weights(model, ckpt["model"], path, cfg["model"])
    cl = bool(cfg.get("channels_last", True))
    model.to(device, memory_format=torch.channels_last if cl else torch.preserve_format).eval()
    norm = ckpt["normalize"]
    return model, DeviceAugment(ckpt["image_size"], norm["mean"], norm["std"], NO_AUGMENT, cl), ckpt


def check_preprocessing(path, ckpt: dict, build: Build) -> None:
    """Refuse a build whose windows, pixel spacing or crop (checkpoint.PREPROCESSING_FIELDS) differ
    from those the checkpoint was trained on: its images would mean something else to the model,
    and a build whose images have another number of channels than the model takes. A field the
    checkpoint does not record (it is older than the check) passes."""
    context = context_of(ckpt["config"], build.layout, str(path))
    channels = context.channels(build.layout) if context else build.layout.channels
    if channels != ckpt.get("in_chans", 3):
        stacks = (
            f" stacked {2 * context.k + 1} slices deep (--context {context.k})" if context else ""
        )
        raise CheckpointError(
            f"{path} takes {ckpt.get('in_chans', 3)}-channel images, but {build.root} holds "
            f"{build.layout.channels}-channel images ({', '.join(build.layout.channel_names)}){stacks}; "
            "evaluate on a build made with the training build's settings"
        )
    now = build.preprocessing
    for key, was in trained_preprocessing(ckpt["data"]).items():
        if was != now[key]:
            raise CheckpointError(
                f"{path} was trained on a build with {key} = {was}, but {build.root} has {now[key]}; "
                f"rebuild it with the training build's settings (ich-prep build --{key.replace('_', '-')} ...)"
            )


def labelled_split(build: Build) -> str | None:
    """The split name of a build whose readable images carry labels (a training build), else None."""
    ok = build.ok
    labelled = ok[list(LABELS)].notna().any(axis=None) if len(ok) else False
    split = build.config.split
    if split == "train" or labelled:
        names = sorted(str(v) for v in ok["split"].dropna().unique()) if len(ok) else []
        return str(split) if isinstance(split, str) else "/".join(names) or "train"
    return None


def eval_stream(
    build: Build, shards, ckpt: dict, dist, batch_size: int, workers: int, series: str | None = None
) -> EvalStream:
    """Every sample of `shards` once, as the checkpoint's model takes it: stacked with its series'
    neighbours when it was trained with --context (the context its config records). With
    `series` (what needs them: embed, predict --seq) or a context, the index's series columns are
    checked first and each sample's json must repeat its series and slice rank."""
    context = context_of(ckpt["config"], build.layout)
    need = "--context" if context else series
    where = f"{build.root}/index.parquet"
    positions = series_positions(build.ok, need, where) if need else None
    return EvalStream(shards, build.encoding, batch_size, rank=dist.rank, world=dist.world,
                      workers=workers, context=context, positions=positions)  # fmt: skip


def _predict_checkpoint(path, build, shards, dist, batch_size, workers, tta, progress, correct=True) -> dict:  # fmt: skip
    """Probabilities of one checkpoint over `shards`; with `correct`, a balanced run's logits get
    the prior correction it recorded (checkpoint.recorded_adjustment), in out['shift']."""
    model, augment, ckpt = load_model(path, dist.device)
    check_preprocessing(path, ckpt, build)
    shift = recorded_adjustment(ckpt, path) if correct else None
    loader = create_loader(eval_stream(build, shards, ckpt, dist, batch_size, workers), workers, dist.device)  # fmt: skip
    precision = ckpt["config"].get("precision", "auto")
    out = predict(
        model, loader, augment, dist=dist, precision=precision, tta=tta, progress=progress,
        shift=shift,
    )  # fmt: skip
    out["ckpt"], out["shift"] = ckpt, shift
    return out


def evaluate(
    checkpoint: str, shards: str, fold: int, out: str | None = None, tta: tuple[str, ...] = (),
    batch_size: int = 128, workers: int = 4, device: str = "auto", progress: bool = True,
    threshold: float | None = None, report: bool = True, prior_correction: bool = True,
) -> dict:  # fmt: skip
    """Metrics of `checkpoint` on `fold` of `shards`; out-of-fold predictions written to `out`
    (Parquet) and, unless report=False, the report beside it (ich_train.report). A balanced run's
    prior correction is applied unless prior_correction=False (metrics['prior_correction'])."""
    path = Path(out) if out else Path(checkpoint).with_name(f"oof_fold{fold}.parquet")
    check_out_file(path, "--out", "oof.parquet")
    if report:
        check_out_dir(report_dir_for(path))
    dist = distributed.setup(device)
    try:
        build = Build(shards)
        sel = build.select([fold])
        res = _predict_checkpoint(checkpoint, build, sel, dist, batch_size, workers, tta, progress, prior_correction)  # fmt: skip
        cfg = res["ckpt"]["config"]
        metrics = compute_metrics(res["labels"], res["probs"])
        prior = np.asarray(res["ckpt"]["prior"])
        metrics["prior_loss"] = weighted_log_loss(
            res["labels"], np.broadcast_to(prior, res["labels"].shape)
        )
        metrics["images"] = len(res["ids"])
        metrics["prior_correction"] = res["shift"]
        trained_on = cfg.get("train_folds") or [f for f in build.folds if f != cfg["valid_fold"]]
        metrics["out_of_fold"] = fold not in trained_on
        if dist.main:
            frame = predictions_frame(res["ids"], fold, res["labels"], res["probs"])
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = run_meta(res["ckpt"], checkpoint, shards, tta)
            with atomic_file(path) as tmp:
                write_predictions(tmp, frame, meta)
            if report:
                frame = check_predictions(frame, path)
                table = write_report(
                    [frame], [meta["run"]], report_dir_for(path), [meta], threshold
                )
                metrics["report"], metrics["report_table"] = str(report_dir_for(path)), table
        metrics["predictions"] = str(path)
        return metrics
    finally:
        distributed.cleanup()


def predict_submission(
    checkpoints: list[str], shards: str, out: str, tta: tuple[str, ...] = (),
    batch_size: int = 128, workers: int = 4, device: str = "auto", progress: bool = True,
    prior_correction: bool = True,
) -> dict:  # fmt: skip
    """Average the probabilities of `checkpoints` (and TTA views) over every shard of `shards`; write
    the Kaggle CSV. Images the build could not read get the checkpoints' mean training prior.
    Each balanced run's prior correction is applied unless prior_correction=False."""
    check_out_file(out)
    dist = distributed.setup(device)
    try:
        build = Build(shards)
        split = labelled_split(build)
        if split and dist.main:
            echo(
                f"ich-train predict: warning: --shards {shards} is a labelled {split!r} build, not a "
                "test build; the submission is written anyway (a Kaggle submission is predicted on "
                "the test build: ich-prep build without --labels)",
                file=sys.stderr,
            )
        sel = build.select(None)
        total, priors, ids = None, [], None
        for path in checkpoints:
            res = _predict_checkpoint(path, build, sel, dist, batch_size, workers, tta, progress, prior_correction)  # fmt: skip
            order = np.argsort(res["ids"])
            probs, these = res["probs"][order], [res["ids"][i] for i in order]
            if ids is not None and these != ids:
                raise SubmissionError(
                    f"{path} predicted a different set of images than {checkpoints[0]}; "
                    f"the build {shards} changed while predicting, predict again"
                )
            ids, total = these, probs if total is None else total + probs
            priors.append(np.asarray(res["ckpt"]["prior"]))
        fill = np.mean(priors, axis=0)
        ids, probs, n_filled = align_to_index(build.index, ids, total / len(checkpoints), fill)
        if dist.main:
            write_submission(out, ids, probs)
            check_submission(out, ids)
        return {
            "out": out,
            "split": split or "test",
            "images": len(ids),
            "filled_with_prior": n_filled,
            "checkpoints": len(checkpoints),
        }
    finally:
        distributed.cleanup()
