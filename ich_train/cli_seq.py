"""`ich-train embed` and `ich-train seq fit|evaluate`: the sequence stage's subcommands (one
add_*_parser / do_* pair each, registered by ich_train.cli.build_parser)."""

from __future__ import annotations

import json

from ich_prep.terminal import echo


def add_embed_parser(sub, runtime_args) -> None:
    p = sub.add_parser(
        "embed", help="per-slice CNN features and logits (Parquet) for the sequence stage"
    )
    p.add_argument("--checkpoint", nargs="+", required=True, help="CNN checkpoint(s) (best.pt)")
    p.add_argument("--shards", required=True, help="the build to embed")
    p.add_argument("--out", required=True, help="embeddings Parquet to write")
    p.add_argument("--folds", type=int, nargs="+", default=None, help="default: every fold")
    p.add_argument(
        "--oof",
        action="store_true",
        help="out of fold: each fold embedded by the checkpoint whose validation fold it was "
        "(one checkpoint per fold); what the sequence model must be trained on",
    )
    p.add_argument("--tta", choices=("hflip",), nargs="*", default=[])
    runtime_args(p, 128)
    p.set_defaults(func=do_embed)


def do_embed(args) -> int:
    from ich_train.embed import embed

    r = embed(args.checkpoint, args.shards, args.out, args.folds, args.oof, tuple(args.tta),
              args.batch_size, args.workers, args.device, args.progress)  # fmt: skip
    echo(
        f"wrote {args.out}: {r['rows']} slices of {r['series']} series, {r['feature_dim']} "
        f"features each, from {len(r['checkpoints'])} checkpoint(s){' out of fold' if r['oof'] else ''}"
    )
    return 0


def add_seq_parser(sub) -> None:
    from ich_train.embed_format import PROTOCOLS
    from ich_train.seq import INPUTS, SeqConfig

    d = SeqConfig(features="", valid_fold=0)
    p = sub.add_parser("seq", help="second stage: a bidirectional GRU/LSTM over each series")
    seq = p.add_subparsers(dest="subcommand", required=True)
    f = seq.add_parser("fit", help="train on the embeddings of every fold but --valid-fold")
    f.add_argument("--features", required=True, help="embeddings Parquet (ich-train embed --oof)")
    f.add_argument("--valid-fold", type=int, required=True)
    f.add_argument("--out", required=True, help="run folder")
    f.add_argument("--resume", action="store_true")
    f.add_argument("--rnn", choices=("gru", "lstm"), default=d.rnn)
    f.add_argument("--inputs", choices=tuple(INPUTS), default=d.inputs,
                   help="what each slice gives the model: " + "; ".join(f"{k}: {v}" for k, v in INPUTS.items()))  # fmt: skip
    f.add_argument("--protocol", choices=tuple(PROTOCOLS), default=d.protocol,
                   help="which CNNs' features the model of fold k learns from: " + "; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items()))  # fmt: skip
    for name in ("hidden", "layers", "epochs", "batch_series", "seed"):
        f.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("dropout", "lr", "weight_decay", "reverse_p", "drop_p"):
        f.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    f.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    f.set_defaults(func=do_seq_fit)
    e = seq.add_parser("evaluate", help="metrics of a sequence checkpoint on one fold vs the CNN")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--features", required=True)
    e.add_argument("--fold", type=int, required=True)
    e.add_argument("--out", default=None, help="predictions Parquet (default: beside the checkpoint)")  # fmt: skip
    e.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    e.set_defaults(func=do_seq_evaluate)


def do_seq_fit(args) -> int:
    import dataclasses

    from ich_train.seq import SeqConfig, fit

    names = {f.name for f in dataclasses.fields(SeqConfig)}
    cfg = SeqConfig(**{k: v for k, v in vars(args).items() if k in names})
    r = fit(cfg, args.out, resume=args.resume, device=args.device)
    from ich_train.cli import strict_json

    echo(json.dumps(strict_json(r)))
    return 0


def do_seq_evaluate(args) -> int:
    from ich_train.cli import strict_json
    from ich_train.seq import evaluate

    echo(
        json.dumps(
            strict_json(evaluate(args.checkpoint, args.features, args.fold, args.out, args.device))
        )
    )
    return 0
