"""`ich-train fit | evaluate | report | predict | bench | average | embed | seq`: one add_*_parser / do_*
pair per subcommand (embed and seq in ich_train.cli_seq).

A user mistake (any `ich_prep.errors.UserError`: config, checkpoint, shard, submission, device,
model errors) is caught once, in `main`, and printed as one line `ich-train <command>: <message>`
(exit 2); so is a usage error argparse finds. Ctrl-C is one line too (exit 130; for `fit`, how
`--resume` continues), and an I/O error (disk full, permission) one line with exit 1. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from ich_prep.errors import (
    OneLineParser,
    UserError,
    int_range,
    run_cli,
)
from ich_prep.terminal import echo
from ich_train.cli_seq import add_embed_parser, add_seq_parser
from ich_train.config import COUNTS, PRECISIONS, TrainConfig
from ich_train.data import default_workers

DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
# errors a user can fix from the message; anything else is a bug and keeps its traceback.
# (FormatError, ShardError, CheckpointError... are UserErrors); FileNotFoundError: a path that is not there
USER_ERRORS = (UserError, FileNotFoundError)


def count(name: str):
    """The argparse type of the TrainConfig count `name`: int_range over its COUNTS range."""
    return int_range(*COUNTS[name])


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2,3, got {text!r}"
        ) from e


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected a number or 6 comma-separated numbers, got {text!r}"
        ) from e


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def _threshold_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threshold",
        type=probability,
        default=None,
        metavar="T",
        help="report precision/recall/F1/specificity at T (default: per label, the F1-maximising threshold on the fold)",
    )


def _runtime_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument(
        "--batch-size", type=count("batch_size"), default=batch_size, help="per process (per GPU)"
    )
    p.add_argument(
        "--workers",
        type=count("workers"),
        default=default_workers(),
        help="DataLoader workers per process (default: cores per process - 1, at most 16)",
    )
    p.add_argument("--device", default="auto", help="auto (GPU if present), cuda or cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")


def add_fit_parser(sub) -> None:
    p = sub.add_parser("fit", help="train a timm classifier on shard folds")
    p.add_argument("--shards", required=True, help="build folder or URL prefix (ich-prep output)")
    p.add_argument(
        "--out", required=True, help="run folder: config.json, metrics.csv/png, last.pt, best.pt"
    )
    p.add_argument("--valid-fold", type=int, default=DEFAULTS["valid_fold"])
    p.add_argument(
        "--train-folds",
        type=int_list,
        default=None,
        help="e.g. 0,1,2,3 (default: all but --valid-fold)",
    )
    p.add_argument("--model", default=DEFAULTS["model"], help="any timm model name")
    p.add_argument(
        "--pretrained",
        default=None,
        help="ImageNet weights: a local .safetensors or timm .pth, or timm:TAG (e.g. "
        "timm:efficientnet_b0.ra_in1k) through the Hugging Face cache (offline: HF_HUB_OFFLINE=1)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last.pt"
    )
    p.add_argument(
        "--checkpoint-every",
        type=count("checkpoint_every"),
        default=DEFAULTS["checkpoint_every"],
        metavar="STEPS",
        help="also save last.pt every STEPS optimizer steps inside an epoch, so --resume loses "
        "less than that after a crash or preemption (default 0: at epoch ends only)",
    )
    p.add_argument(
        "--image-size",
        type=count("image_size"),
        default=None,
        help="resize on device (default: the shards' size)",
    )
    p.add_argument("--epochs", type=count("epochs"), default=DEFAULTS["epochs"])
    p.add_argument(
        "--epoch-samples",
        type=count("epoch_samples"),
        default=None,
        help="samples per epoch (default: all training samples)",
    )
    _runtime_args(p, DEFAULTS["batch_size"])
    p.add_argument("--valid-batch-size", type=count("valid_batch_size"), default=None)
    p.add_argument(
        "--accum-steps",
        type=count("accum_steps"),
        default=DEFAULTS["accum_steps"],
        help="gradient accumulation",
    )
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--min-lr-ratio", type=float, default=DEFAULTS["min_lr_ratio"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument(
        "--warmup-frac",
        type=float,
        default=DEFAULTS["warmup_frac"],
        help="share of steps warming up",
    )
    p.add_argument(
        "--grad-clip", type=float, default=DEFAULTS["grad_clip"], help="max grad norm, 0 = off"
    )
    p.add_argument("--drop-rate", type=float, default=DEFAULTS["drop_rate"])
    p.add_argument(
        "--average-last",
        type=count("average_last"),
        default=DEFAULTS["average_last"],
        metavar="N",
        help="keep epoch<K>.pt of the last N epochs and write avg.pt, the mean of their weights "
        "with batch-norm statistics recomputed on training batches (default 0: off)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=DEFAULTS["ema"],
        metavar="DECAY",
        help="validate, save and predict with an exponential moving average of the weights "
        "(e.g. 0.999, warmed up over the first steps; default 0: off)",
    )
    p.add_argument("--loss", choices=("bce", "asl"), default=DEFAULTS["loss"])
    p.add_argument(
        "--pos-weight", type=float_list, default=None, help="positive weight: 1 value or 6"
    )
    p.add_argument("--asl-gamma-pos", type=float, default=DEFAULTS["asl_gamma_pos"])
    p.add_argument("--asl-gamma-neg", type=float, default=DEFAULTS["asl_gamma_neg"])
    p.add_argument("--asl-clip", type=float, default=DEFAULTS["asl_clip"])
    p.add_argument("--no-augment", dest="augment", action="store_false")
    for name in ("hflip", "rotate_deg", "scale", "shift", "brightness", "contrast", "noise"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=DEFAULTS[name])
    p.add_argument(
        "--shuffle-buffer",
        type=count("shuffle_buffer"),
        default=DEFAULTS["shuffle_buffer"],
        help="per loader worker: samples buffered by --loader stream; with --context and the "
        "span loader, series open at once (each holds up to 4K+1 decoded slices)",
    )
    p.add_argument(
        "--opt",
        default=DEFAULTS["opt"],
        help="optimizer: adamw (default, fused) or any timm optimizer name: radam, sgd, momentum, lamb, lion, ...",
    )
    p.add_argument(
        "--loader",
        choices=("auto", "stream", "spans"),
        default=DEFAULTS["loader"],
        help="spans: a uniform shuffle of samples, each read by its span in the index (mixes "
        "series-contiguous shards; with --context, many series interleaved); stream: read whole "
        "shards through a shuffle buffer; auto: spans when the index records them",
    )
    p.add_argument(
        "--sampler",
        choices=("natural", "balanced"),
        default=DEFAULTS["sampler"],
        help="natural: every training image once per pass (default); balanced: each epoch draws "
        "--pos-fraction of its images positive for 'any', oversampling positives and "
        "undersampling negatives from the index, seeded (needs the span loader)",
    )
    p.add_argument(
        "--pos-fraction",
        type=float,
        default=None,
        metavar="F",
        help="with --sampler balanced: share of 'any' positives drawn per epoch, in (0, 1)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=DEFAULTS["context"],
        metavar="K",
        help="2.5D: each sample is its slice with K neighbours on each side (ends repeated), "
        "stacked as channels: (2K+1) x windows; needs a series-aware build",
    )
    p.add_argument(
        "--context-window",
        default=None,
        metavar="NAME",
        help="with --context: take only this window (a channel name of the build, e.g. brain) of "
        "each slice: 2K+1 channels (the 1st place's s-1, s, s+1 in one window)",
    )
    p.add_argument("--seed", type=count("seed"), default=DEFAULTS["seed"])
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 where the GPU runs it natively (A100, H100, RTX 30xx+), fp16 with loss "
        "scaling on other GPUs (T4, P100, V100, RTX 20xx), fp32 on CPU",
    )
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="skip the end's report of best.pt on the validation fold (oof_fold<K>.parquet + report_fold<K>/)",
    )
    p.set_defaults(func=do_fit)


def do_fit(args) -> int:
    from ich_train.train import fit

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    fit(cfg, resume=args.resume)
    return 0


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="metrics of a checkpoint on one fold, plus out-of-fold predictions"
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument(
        "--out",
        default=None,
        help="predictions Parquet (default: oof_fold<K>.parquet beside the checkpoint)",
    )
    p.add_argument("--tta", choices=("hflip",), nargs="*", default=[])
    _threshold_arg(p)
    p.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="no report folder (default: report_fold<K>/ beside the predictions)",
    )
    _prior_correction_arg(p)
    _runtime_args(p, 128)
    p.set_defaults(func=do_evaluate)


def _prior_correction_arg(p) -> None:
    p.add_argument(
        "--no-prior-correction",
        dest="prior_correction",
        action="store_false",
        help="leave a --sampler balanced checkpoint's logits as trained (default: shifted by the "
        "log-odds of its natural against its drawn label shares, recorded in the checkpoint)",
    )


def do_evaluate(args) -> int:
    from ich_train.infer import evaluate
    from ich_train.report import format_table

    m = evaluate(args.checkpoint, args.shards, args.fold, args.out, tuple(args.tta), args.batch_size,
                 args.workers, args.device, args.progress, args.threshold, args.report,
                 args.prior_correction)  # fmt: skip
    table = m.pop("report_table", None)
    # strict JSON on stdout (an AUC of a one-class label is NaN: null here), notes on stderr
    echo(json.dumps(strict_json(m), indent=1, allow_nan=False))
    if table is not None:
        echo(f"{format_table(table)}\nreport: {Path(m['report']) / 'report.html'}", file=sys.stderr)
    if not m["out_of_fold"]:
        echo(
            f"ich-train evaluate: note: fold {args.fold} was a training fold of this checkpoint; "
            "these metrics are not out-of-fold",
            file=sys.stderr,
        )
    return 0


def strict_json(value):
    """`value` with NaN and infinities as None and numpy scalars as python ones: valid JSON."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="evaluation report (metrics, curves, report.html) from saved predictions"
    )
    p.add_argument("predictions", nargs="+", help="out-of-fold Parquet(s) from ich-train evaluate")
    p.add_argument("--out", required=True, help="report folder (new, empty, or a previous report)")
    p.add_argument(
        "--names",
        default=None,
        help="comma-separated run names, one per predictions file; files given one name are the "
        "folds of one run, pooled (one name alone: every file)",
    )
    _threshold_arg(p)
    p.set_defaults(func=do_report)


def do_report(args) -> int:
    from ich_train.report import (
        ReportError,
        default_names,
        format_table,
        pool_runs,
        read_predictions,
        write_report,
    )

    runs = [read_predictions(path) for path in args.predictions]
    names = (
        args.names.split(",")
        if args.names
        else default_names(args.predictions, [m for _, m in runs])
    )
    if len(names) == 1 < len(runs):  # one name: every file is a fold of that run, pooled
        names *= len(runs)
    if len(names) != len(runs):
        raise ReportError(f"--names gives {len(names)} names for {len(runs)} predictions files")
    frames, names, metas = pool_runs(args.predictions, runs, names)
    table = write_report(frames, names, args.out, metas, args.threshold)
    echo(f"{format_table(table)}\nreport: {Path(args.out) / 'report.html'}")
    return 0


def add_predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="Kaggle submission CSV from one or more checkpoints (averaged)"
    )
    p.add_argument("--checkpoint", nargs="+", required=True, help="CNN checkpoint(s)")
    p.add_argument("--shards", required=True, help="the test build")
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--tta", choices=("hflip",), nargs="*", default=[])
    p.add_argument(
        "--seq",
        nargs="+",
        default=None,
        metavar="S",
        help="stage 2: sequence checkpoint(s) of `ich-train seq fit`; the test build is embedded "
        "by each --checkpoint (the fold CNNs) and every S runs over each; all averaged",
    )
    _prior_correction_arg(p)
    _runtime_args(p, 128)
    p.set_defaults(func=do_predict)


def do_predict(args) -> int:
    from ich_train.infer import predict_submission
    from ich_train.seq_submission import predict_seq_submission

    if args.seq and not args.prior_correction:
        raise UserError("predict --no-prior-correction applies to the CNN probabilities of predict without --seq; the sequence stage reads the CNN logits as embed wrote them: drop one of the two flags")  # fmt: skip
    if args.seq:
        r = predict_seq_submission(args.checkpoint, args.seq, args.shards, args.out, tuple(args.tta),
                                   args.batch_size, args.workers, args.device, args.progress)  # fmt: skip
    else:
        r = predict_submission(args.checkpoint, args.shards, args.out, tuple(args.tta), args.batch_size,
                               args.workers, args.device, args.progress, args.prior_correction)  # fmt: skip
    echo(f"wrote {r['out']}: {r['images']} images x 6 labels from {r['checkpoints']} checkpoint(s)")
    if r["filled_with_prior"]:
        echo(
            f"note: {r['filled_with_prior']} images the build could not read got the training prior"
        )
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="training images/s: resident batch vs shard pipeline vs DICOM baseline"
    )
    p.add_argument("--shards", required=True)
    p.add_argument("--model", default="efficientnet_b0")
    p.add_argument("--image-size", type=count("image_size"), default=None)
    p.add_argument(
        "--steps", type=int_range(1, 100_000), default=20, help="timed steps per measurement"
    )
    p.add_argument("--warmup", type=int_range(0, 100_000), default=3, help="untimed steps first")
    p.add_argument("--dicom-dir", default=None, help="DICOM folder for the baseline loader (c)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument(
        "--loader-steps",
        type=int_range(1, 100_000),
        default=50,
        help="batches timed for the loaders alone",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    _runtime_args(p, 256)
    p.set_defaults(func=do_bench)


def do_bench(args) -> int:
    from ich_train.bench import bench

    bench(args.shards, args.model, args.batch_size, args.image_size, args.steps, args.warmup, args.workers,
          args.dicom_dir, args.device, args.precision, args.loader_steps, args.compile)  # fmt: skip
    return 0


def add_average_parser(sub) -> None:
    p = sub.add_parser(
        "average", help="one checkpoint with the mean weights of several epochs of one run"
    )
    p.add_argument("checkpoints", nargs="+", metavar="CK", help="checkpoints of one run (epoch<N>.pt, last.pt)")  # fmt: skip
    p.add_argument("--out", required=True, help="the averaged checkpoint to write, e.g. avg.pt")
    p.add_argument(
        "--shards",
        default=None,
        help="the run's training build: recompute the batch-norm statistics on its training "
        "batches (default: they stay the checkpoints' mean)",
    )
    p.add_argument(
        "--bn-batches", type=int_range(1, 100_000), default=None, metavar="N",
        help="training batches (of the run's batch size) that recompute the batch-norm statistics (default 50)",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=count("workers"), default=default_workers(), help="DataLoader workers"
    )
    p.add_argument("--device", default="auto", help="auto (GPU if present), cuda or cpu")
    p.set_defaults(func=do_average)


def do_average(args) -> int:
    from ich_train.average import BN_BATCHES, average, check_average_out, training_batches
    from ich_train.checkpoint import load_checkpoint
    from ich_train.config import ConfigError
    from ich_train.distributed import pick_device

    if args.bn_batches and not args.shards:
        raise ConfigError(
            "--bn-batches needs --shards (the run's training build) to draw them from"
        )
    check_average_out(args.out, args.checkpoints)
    dev = pick_device(args.device)
    batches = None
    if args.shards:
        ckpt = load_checkpoint(args.checkpoints[-1])
        batches = training_batches(ckpt, args.shards, args.workers, dev, args.bn_batches or BN_BATCHES)  # fmt: skip
    average(args.checkpoints, args.out, batches=batches, device=dev)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ich-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_fit_parser,
        add_evaluate_parser,
        add_report_parser,
        add_predict_parser,
        add_bench_parser,
        add_average_parser,
    ):
        add(sub)
    add_embed_parser(sub, _runtime_args)
    add_seq_parser(sub)
    return parser


def one_line(text: str) -> str:
    return " ".join(text.split())


def user_message(e: BaseException) -> str:
    """The message of a user error as one line. An error raised in a DataLoader worker reaches us
    re-raised by torch with the worker's whole traceback as its message: keep only the original
    message (the text after the traceback's last `<module>.<Type>: `)."""
    text = str(e)
    if "Original Traceback (most recent call last):" in text:
        t = type(e)
        name = (
            t.__qualname__
            if t.__module__ in ("builtins", "__main__")
            else f"{t.__module__}.{t.__qualname__}"
        )
        head, sep, tail = text.rpartition(f"\n{name}: ")
        if sep:
            text = tail
    return one_line(text)


def _stopped(args) -> str:
    """What a stopped command leaves behind and how to go on."""
    if args.command == "fit":
        last = Path(args.out) / "last.pt"
        if last.is_file():
            return (
                f"; {last} holds the last saved epoch (or --checkpoint-every step): run the same "
                "command with --resume to continue from there"
            )
        return f"; nothing was saved in {args.out} yet: run the same command again to start over"
    if args.command in ("evaluate", "predict", "report"):
        return "; no output file was written"
    return ""


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        build_parser(),
        argv,
        "ich-train",
        USER_ERRORS,
        user_message,
        lambda e, args: one_line(str(e)),
        _stopped,
    )
