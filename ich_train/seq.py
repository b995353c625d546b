"""The second stage: a bidirectional GRU (or LSTM) over each series of per-slice CNN embeddings.

fit() trains on the embeddings of every fold but the validation fold and keeps the checkpoint with
the best validation weighted log loss; evaluate() scores a checkpoint on one fold next to the 2D
CNN whose logits it refines, and writes the same out-of-fold Parquet as `ich-train evaluate` (so
`ich-train report` reads it). The model's output is the CNN's logits plus a correction that starts
at zero: step 0 is exactly the 2D model, and training can only move away from it when the
validation loss says so (best.pt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ich_prep import LABELS
from ich_prep.errors import UserError
from ich_prep.location import atomic_open, file_in_the_way, temp_target, what_is
from ich_prep.terminal import echo
from ich_train.checkpoint import safe_torch_load
from ich_train.config import MAX_RATE
from ich_train.embed_format import MAX_FEATURE_DIM, PROTOCOLS
from ich_train.metrics import LABEL_WEIGHTS, check_diverged, compute_metrics
from ich_train.optim import create_scheduler
from ich_train.predictions import ReportError, check_predictions, predictions_frame
from ich_train.seq_data import (
    INPUT_LAYOUT,
    SLICE_EXTRA,
    Series,
    as_positions,
    augment,
    batches,
    check_held_out,
    check_protocol,
    check_trained_on,
    collate,
    positions_of,
    read_embeddings,
)
from ich_train.submission import check_out_file

RNNS = {"gru": nn.GRU, "lstm": nn.LSTM}


# What each slice gives the sequence model. The pooled features of two CNNs are not in one space
# (each fold's CNN learned its own), while their logits all mean the six labels: under the
# out-of-fold protocol a model trained on folds j's features (CNN j) meets fold k's (CNN k).
INPUTS = {
    "features": "pooled features, their differences to the neighbours, the CNN's logits, position",
    "logits": "the CNN's logits and the position only (no pooled features)",
}


def select_inputs(series: list, feature_dim: int) -> list:
    """`series` as a model of `feature_dim` takes them: feature_dim 0 (--inputs logits) keeps no
    pooled features (each series' features become (T, 0)); otherwise unchanged."""
    if feature_dim:
        return series
    return [dataclasses.replace(s, features=s.features[:, :0]) for s in series]


class SeqError(UserError, ValueError):
    """A sequence-stage flag, run folder or checkpoint we cannot use."""


@dataclass(frozen=True)
class SeqConfig:
    """Everything that decides a sequence run; stored in every checkpoint, compared on resume."""

    features: str
    valid_fold: int
    rnn: str = "gru"
    hidden: int = 128
    layers: int = 2
    dropout: float = 0.2
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_series: int = 32
    reverse_p: float = 0.5
    drop_p: float = 0.1
    seed: int = 0
    inputs: str = "features"  # or "logits": the CNN's logits (and position) only, see select_inputs
    # "per-cnn" (the default: it won on held-out folds, docs/training.md) or "pooled"; embed_format.PROTOCOLS
    protocol: str = "per-cnn"

    def __post_init__(self):
        if self.inputs not in INPUTS:
            raise SeqError(f"--inputs {self.inputs!r}: choose one of {', '.join(INPUTS)}")
        if self.protocol not in PROTOCOLS:
            raise SeqError(f"--protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if self.rnn not in RNNS:
            raise SeqError(f"--rnn {self.rnn!r}: choose one of {sorted(RNNS)}")
        for name, lo, hi in (("hidden", 4, 4096), ("layers", 1, 8), ("epochs", 1, 10_000), ("batch_series", 1, 100_000)):  # fmt: skip
            if not lo <= getattr(self, name) <= hi:
                raise SeqError(f"--{name.replace('_', '-')} {getattr(self, name)}: use {lo}..{hi}")
        for name in ("dropout", "reverse_p", "drop_p"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SeqError(f"--{name.replace('_', '-')} {getattr(self, name)}: use 0 <= value < 1")  # fmt: skip
        if not (0 < self.lr <= MAX_RATE and 0 <= self.weight_decay <= MAX_RATE):  # NaN fails both
            raise SeqError(f"--lr must be in (0, {MAX_RATE:g}] and --weight-decay in [0, {MAX_RATE:g}], got {self.lr!r} and {self.weight_decay!r}")  # fmt: skip
        if not 0 <= self.seed < 2**32:  # numpy's generators take no negative seed
            raise SeqError(f"--seed {self.seed}: use 0..{2**32 - 1}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SeqConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SeqModel(nn.Module):
    """x (B, T, 3D + SLICE_EXTRA), base logits (B, T, 6), mask (B, T) -> logits (B, T, 6) = base +
    correction."""

    def __init__(self, feature_dim: int, hidden: int = 128, layers: int = 2, rnn: str = "gru", dropout: float = 0.2):  # fmt: skip
        super().__init__()
        in_dim = 3 * feature_dim + SLICE_EXTRA
        self.inp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))  # fmt: skip
        self.rnn = RNNS[rnn](hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True, dropout=dropout if layers > 1 else 0.0)  # fmt: skip
        self.head = nn.Linear(2 * hidden, len(LABELS))
        nn.init.zeros_(self.head.weight)  # step 0 is the CNN's own prediction
        nn.init.zeros_(self.head.bias)

    def forward(self, x, base, mask):
        lengths = mask.sum(1).cpu()
        h = nn.utils.rnn.pack_padded_sequence(self.inp(x), lengths, batch_first=True, enforce_sorted=False)  # fmt: skip
        h, _ = self.rnn(h)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
        return base + self.head(h)


def model_args(cfg: SeqConfig, feature_dim: int) -> dict:
    """The constructor arguments of SeqModel, stored in every checkpoint and used to rebuild it."""
    return {"feature_dim": feature_dim, "hidden": cfg.hidden, "layers": cfg.layers, "rnn": cfg.rnn, "dropout": cfg.dropout}  # fmt: skip


def masked_loss(logits, y, mask) -> torch.Tensor:
    """The competition's weighted BCE (any x2) averaged over the real (unpadded) slices."""
    w = torch.as_tensor(LABEL_WEIGHTS / LABEL_WEIGHTS.sum(), dtype=logits.dtype, device=logits.device)  # fmt: skip
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    per_slice = (bce * w).sum(-1)
    return (per_slice * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def predict_series(model: SeqModel, series: list[Series], batch_series: int = 64) -> dict:
    """{'ids', 'probs' (N, 6) of the model, 'base' (N, 6) of the CNN, 'labels' (N, 6) or None}."""
    model.eval()
    dev = next(model.parameters()).device
    ids, probs, base = [], [], []
    for part in batches(series, batch_series):
        b = {k: v.to(dev) for k, v in collate(part).items()}
        p = torch.sigmoid(model(b["x"], b["base"], b["mask"]))[b["mask"]]
        probs.append(p.float().cpu().numpy())
        base.append(torch.sigmoid(b["base"][b["mask"]]).cpu().numpy())
        ids.extend(i for s in part for i in s.ids)
    labelled = all(s.labels is not None for s in series)
    labels = np.concatenate([s.labels for s in series]) if labelled and series else None
    return {"ids": ids, "probs": np.concatenate(probs).astype(np.float64), "base": np.concatenate(base).astype(np.float64), "labels": labels}  # fmt: skip


def _split(series: list[Series], fold: int, path: str) -> tuple[list[Series], list[Series]]:
    if any(s.labels is None for s in series):  # first: no --valid-fold helps a test build
        raise SeqError(f"--features {path} has no labels (a test build); fit on a training build's embeddings")  # fmt: skip
    train = [s for s in series if s.fold != fold]
    valid = [s for s in series if s.fold == fold]
    if not valid or not train:
        folds = sorted({s.fold for s in series})
        raise SeqError(f"--valid-fold {fold}: {path} has folds {folds}; pick one of them (and leave others to train on)")  # fmt: skip
    return train, valid


def _scores(model, valid: list[Series]) -> dict:
    out = predict_series(model, valid)
    check_diverged(out["probs"])
    m = compute_metrics(out["labels"], out["probs"])
    b = compute_metrics(out["labels"], out["base"], prefix="cnn_")
    return {**m, "cnn_loss": b["cnn_loss"], "cnn_auc_any": b["cnn_auc_any"]}


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread for the duration: the GRU's many tiny steps run 1.7-25x slower with
    two threads on this 2-core machine (thread hand-offs dominate; 25x when the cores are busy)."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(was)


RUN_FILES = ("config.json", "metrics.csv", "best.pt", "last.pt")  # what fit writes in --out


def _write(path: Path, write) -> None:
    """`write(file)` into a new private temporary file (atomic_open: never through a link), then
    renamed over `path`."""
    with atomic_open(path) as f:
        write(f)


def save(path: Path, **state) -> None:
    _write(path, lambda f: torch.save(state, f))


def _fields_ok(ck: dict) -> bool:
    """The fields evaluate and predict use have their types and ranges: constructor arguments
    SeqModel takes, a config SeqConfig accepts, a state dict of finite tensors."""
    args, names = ck["model_args"], ("feature_dim", "hidden", "layers", "rnn", "dropout")
    if not (isinstance(args, dict) and set(args) == set(names) and isinstance(ck["model"], dict)):
        return False
    ints = [args[k] for k in ("feature_dim", "hidden", "layers")]
    if not (all(type(v) is int for v in ints) and 0 <= args["feature_dim"] <= MAX_FEATURE_DIM):
        return False
    if not (isinstance(ck["config"], dict) and type(ck["epoch"]) is int):
        return False
    try:
        cfg = SeqConfig.from_dict({**ck["config"], **{k: args[k] for k in names[1:]}})
    except (SeqError, TypeError, ValueError):  # a type the checks cannot compare, a field missing
        return False
    if type(cfg.valid_fold) is not int or ck["config"].get("valid_fold") != cfg.valid_fold:
        return False
    return all(isinstance(v, torch.Tensor) and (not v.is_floating_point() or bool(v.isfinite().all())) for v in ck["model"].values())  # fmt: skip


def load(path: str) -> dict:
    """A sequence checkpoint, read with weights_only=True (nothing is unpickled), its fields
    checked (_fields_ok) and its weights checked against the model they rebuild (on the meta
    device: no memory), so a crafted file is one SeqError, never a traceback or a huge model."""
    try:
        ck = safe_torch_load(path)
    except Exception as e:  # noqa: BLE001 - a foreign or damaged file is one line
        raise SeqError(f"{path} is not a sequence checkpoint ({type(e).__name__}); pass a best.pt or last.pt of `ich-train seq fit`") from e  # fmt: skip
    if not (isinstance(ck, dict) and {"model", "config", "model_args", "epoch"} <= set(ck)):
        raise SeqError(f"{path} is not a sequence checkpoint; pass a best.pt or last.pt of `ich-train seq fit`")  # fmt: skip
    if not _fields_ok(ck):
        raise SeqError(f"{path} is a damaged or edited sequence checkpoint (its model arguments, config or weights are not what `ich-train seq fit` writes); train again or pass another")  # fmt: skip
    took = ck.get("slice_inputs")
    if not (isinstance(took, dict) and took.get("layout") == INPUT_LAYOUT and took.get("positions") in ("mm", "rank")):  # fmt: skip
        raise SeqError(f"{path} was trained on other per-slice inputs than this ich-train gives ({INPUT_LAYOUT}; before slice spacing, without gap_prev and gap_next); train it again with `ich-train seq fit`")  # fmt: skip
    with torch.device("meta"):
        want = {k: v.shape for k, v in SeqModel(**ck["model_args"]).state_dict().items()}
    if want != {k: v.shape for k, v in ck["model"].items()}:
        raise SeqError(f"{path}: its weights do not fit the model its arguments describe; train again or pass another")  # fmt: skip
    embed = ck.get("embed") if isinstance(ck.get("embed"), dict) else {}
    ck["embed"] = {**embed, "checkpoints": [c for c in embed.get("checkpoints", []) if isinstance(c, dict)] if isinstance(embed.get("checkpoints"), list) else []}  # fmt: skip
    return ck


def check_run_folder(out: Path, resume: bool) -> None:
    """SeqError unless `out` can be this run's folder: no file in its way, nothing in it but what
    fit writes (regular files, no links), and a last.pt exactly when resuming."""
    p = file_in_the_way(out, itself=True)
    if p is not None:
        raise SeqError(f"--out {out} cannot be a run folder: {p} is {what_is(p)}, in the way; choose a folder path for --out")  # fmt: skip
    names = sorted(os.listdir(out)) if out.is_dir() else []
    ours = {*RUN_FILES, *(f"{n}.partial" for n in RUN_FILES)}
    foreign = [n for n in names if (n not in ours and temp_target(n) not in RUN_FILES) or not stat.S_ISREG(os.lstat(out / n).st_mode)]  # fmt: skip
    if foreign:
        raise SeqError(f"--out {out} holds files `ich-train seq fit` did not write ({', '.join(foreign[:3])}); choose a new or empty folder")  # fmt: skip
    if resume and "last.pt" not in names:
        raise SeqError(f"--resume: {out / 'last.pt'} does not exist (no epoch was saved yet); run without --resume to start the run")  # fmt: skip
    if not resume and "last.pt" in names:
        raise SeqError(f"--out {out} already holds a run; pass --resume to continue it or choose a new --out")  # fmt: skip


def seq_device(name: str = "auto") -> torch.device:
    """cuda when asked or available ('auto'), else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SeqError("--device cuda: no CUDA device is visible; use --device cpu")
    if name not in ("auto", "cuda", "cpu"):
        raise SeqError(f"--device {name!r}: use auto, cuda or cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def fit(cfg: SeqConfig, out: str, resume: bool = False, log=echo, device: str = "auto") -> dict:
    """Train on every fold but cfg.valid_fold of cfg.features; best.pt, last.pt, metrics.csv in `out`."""
    with one_thread():
        return _fit(cfg, out, resume, log, seq_device(device))


def _fit_data(cfg: SeqConfig) -> tuple[list[Series], list[Series], dict, int, dict]:
    """(train, valid, the file's metadata, feature size taken, the per-slice inputs record), with
    a warning on stderr when the file has no slice positions (the model then sees slice ranks)."""
    series, meta = read_embeddings(cfg.features)
    dim = 0 if cfg.inputs == "logits" else series[0].features.shape[1]
    series = select_inputs(series, dim)
    train, valid = _split(series, cfg.valid_fold, cfg.features)
    check_held_out(valid, meta, cfg.valid_fold, cfg.features, "--valid-fold")
    check_protocol(series, meta, cfg.valid_fold, cfg.protocol, cfg.features)
    took = {"layout": INPUT_LAYOUT, "positions": positions_of(series)}
    if took["positions"] == "rank":
        echo(f"warning: --features {cfg.features} has no slice positions (embedded before them, or from a build without them): the sequence model sees slice ranks, so a missing slice's gap is invisible to it; rebuild with this ich-prep and embed again", file=sys.stderr)  # fmt: skip
    return train, valid, meta, dim, took


def _fit(cfg: SeqConfig, out: str, resume: bool, log, dev: torch.device) -> dict:
    check_run_folder(Path(out), resume)
    train, valid, meta, dim, took = _fit_data(cfg)
    torch.manual_seed(cfg.seed)
    model = SeqModel(**model_args(cfg, dim)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_series)
    sched = create_scheduler(opt, steps, 0.1, 0.01)  # fit's warmup + cosine: any number of steps
    run, start, best, rows = Path(out), 0, math.inf, []
    if resume:
        ck = load(str(run / "last.pt"))
        saved = {
            "inputs": "features",
            "protocol": "pooled",
            **ck["config"],
        }  # a run from before them
        if ck["slice_inputs"] != took:
            said = {"mm": "slice positions (mm)", "rank": "slice ranks (no positions)"}
            raise SeqError(f"--resume {run}: the run was started on {said[ck['slice_inputs']['positions']]}, {cfg.features} gives {said[took['positions']]}; use the same --features or a new --out")  # fmt: skip
        if saved != cfg.to_dict():
            diff = sorted(k for k in cfg.to_dict() if saved.get(k) != cfg.to_dict()[k])
            raise SeqError(f"--resume {run}: the run was started with other settings ({', '.join(diff)}); use the same flags or a new --out")  # fmt: skip
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["torch_rng"])  # dropout continues as if never stopped
            start, best, rows = ck["epoch"] + 1, float(ck["best_loss"]), [dict(r) for r in ck["history"]]  # fmt: skip
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # cut, edited or older
            raise SeqError(f"--resume {run}: last.pt cannot be resumed ({type(e).__name__}: {str(e)[:100]}); start a new --out") from None  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    _write(run / "config.json", lambda f: f.write((json.dumps(cfg.to_dict(), indent=1) + "\n").encode()))  # fmt: skip

    def state(epoch: int) -> dict:
        return {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "config": cfg.to_dict(), "model_args": model_args(cfg, dim), "slice_inputs": took, "epoch": epoch, "best_loss": best, "history": rows, "embed": meta}  # fmt: skip

    if start == 0:  # step 0 (the zero head: the CNN itself) is the first candidate for best.pt
        row = {"epoch": -1, "train_loss": math.nan, **_scores(model, valid)}
        rows.append(row)
        best = row["valid_loss"]
        save(run / "best.pt", **state(-1))
        log(f"seq: step 0 = the CNN: valid loss {row['valid_loss']:.4f}, AUC any {row['valid_auc_any']:.3f}")  # fmt: skip
    for epoch in range(start, cfg.epochs):
        t0, rng, losses = time.perf_counter(), np.random.default_rng([cfg.seed, epoch]), []
        model.train()
        for part in batches(train, cfg.batch_series, rng):
            b = collate([augment(s, rng, cfg.reverse_p, cfg.drop_p) for s in part])
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            loss = masked_loss(model(b["x"], b["base"], b["mask"]), b["y"], b["mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), **_scores(model, valid), "time_s": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
        improved = row["valid_loss"] < best
        best = min(best, row["valid_loss"])
        if improved:
            save(run / "best.pt", **state(epoch))
        save(run / "last.pt", **state(epoch), optimizer=opt.state_dict(), scheduler=sched.state_dict(), torch_rng=torch.get_rng_state())  # fmt: skip
        log(f"seq epoch {epoch + 1}/{cfg.epochs}: train {row['train_loss']:.4f} valid {row['valid_loss']:.4f} (CNN {row['cnn_loss']:.4f}) AUC any {row['valid_auc_any']:.3f}{' *best' if improved else ''}")  # fmt: skip
    _write(run / "metrics.csv", lambda f: f.write(pd.DataFrame(rows).to_csv(index=False).encode()))
    return _summary(rows, best, cfg.epochs, run, log)


def _summary(rows: list[dict], best: float, epochs: int, run: Path, log) -> dict:
    """What fit returns, and its last line: which epoch best.pt is and whether it beat the CNN."""
    cnn = rows[0]["cnn_loss"]
    best_epoch = next((r["epoch"] for r in rows if r["valid_loss"] == best), -1) + 1  # 0: step 0
    improved = best < cnn
    if improved:
        log(f"seq: best.pt is epoch {best_epoch}: valid loss {best:.4f} against the CNN's {cnn:.4f} ({100 * (best / cnn - 1):+.1f}%)")  # fmt: skip
    else:
        log(f"seq: the sequence model did not improve on the CNN (valid loss {cnn:.4f}): best.pt is step 0, the CNN's own predictions, and predict --seq with it gives the CNN's")  # fmt: skip
    return {"best_valid_loss": best, "cnn_valid_loss": cnn, "best_epoch": best_epoch, "improved_on_cnn": improved, "epochs": epochs, "out": str(run)}  # fmt: skip


def evaluate(checkpoint: str, features: str, fold: int, out: str | None = None, device: str = "auto") -> dict:  # fmt: skip
    """Metrics of a sequence checkpoint on `fold` of `features`, next to the CNN's own; the
    out-of-fold predictions written to `out` (Parquet, the format of `ich-train evaluate`)."""
    with one_thread():
        return _evaluate(checkpoint, features, fold, out, seq_device(device))


def _evaluate(checkpoint: str, features: str, fold: int, out: str | None, dev: torch.device) -> dict:  # fmt: skip
    path = Path(out) if out else Path(checkpoint).with_name(f"seq_oof_fold{fold}.parquet")
    check_out_file(path, "--out", "seq_oof.parquet")
    ck = load(checkpoint)
    series, meta = read_embeddings(features)
    chosen = [s for s in series if s.fold == fold]
    if not chosen or any(s.labels is None for s in chosen):
        raise SeqError(f"--fold {fold}: {features} has no labelled series in that fold; its folds are {sorted({s.fold for s in series})}")  # fmt: skip
    check_held_out(chosen, meta, fold, features, "--fold")
    check_trained_on(chosen, meta, ck["embed"], features, checkpoint)
    args = ck["model_args"]
    chosen = as_positions(select_inputs(chosen, args["feature_dim"]), ck["slice_inputs"]["positions"], f"--features {features}")  # fmt: skip
    if args["feature_dim"] != chosen[0].features.shape[1]:
        raise SeqError(f"{checkpoint} takes {args['feature_dim']} features per slice, {features} has {chosen[0].features.shape[1]}; embed with the same CNNs")  # fmt: skip
    model = SeqModel(**args)
    model.load_state_dict(ck["model"])
    res = predict_series(model.to(dev), chosen)
    frame = predictions_frame(res["ids"], fold, res["labels"], res["probs"])

    try:  # never written (nor reported ok) when `ich-train report` would refuse it
        check_predictions(frame, path)
    except ReportError as e:
        why = str(e).split("; pass the Parquet")[0]
        raise SeqError(f"{checkpoint} on fold {fold} gives predictions `ich-train report` would refuse ({why}); nothing written: train again or pass another checkpoint") from None  # fmt: skip
    metrics = compute_metrics(res["labels"], res["probs"])
    cnn = compute_metrics(res["labels"], res["base"], prefix="cnn_")
    metrics.update(cnn_loss=cnn["cnn_loss"], cnn_auc_any=cnn["cnn_auc_any"], images=len(res["ids"]), series=len(chosen))  # fmt: skip
    metrics["out_of_fold"] = ck["config"]["valid_fold"] == fold
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, lambda f: frame.to_parquet(f, index=False))
    metrics["predictions"] = str(path)
    return metrics
