"""Weight averaging: one checkpoint holding the mean of several checkpoints' weights of one run
(`ich-train average`, and `fit --average-last N` at the end of a run).

The epochs of one run lie in one basin of the loss: their mean generalises better than any of them
(the 2nd place and many top-20 RSNA 2019 solutions averaged epoch weights). Checkpoints of other
models, builds, contexts, normalisations or training settings are refused in one line: their mean
is no model. Batch-norm running statistics do not average (a mean of weights makes new features):
with the training build they are recomputed on training batches (torch.optim.swa_utils.update_bn),
without it they stay the checkpoints' mean, and the output says which.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from ich_prep.terminal import echo
from ich_train.checkpoint import (
    CheckpointError,
    check_keys,
    load_checkpoint,
    same_build,
    save_checkpoint,
)
from ich_train.config import TrainConfig, config_mismatch

# what makes two checkpoints' weights mean the same thing; each is compared as stored
SAME = {
    "model": lambda c: (c["config"].get("model"), c.get("model_spec")),
    "build": lambda c: c["data"].get("fingerprint"),
    "context": lambda c: (
        c["config"].get("context", 0),
        c["config"].get("context_window"),
        c.get("in_chans", 3),
    ),  # fmt: skip
    "normalisation": lambda c: (c["normalize"], c["image_size"]),
}
CPU = torch.device("cpu")
BN_BATCHES = 50  # training batches that recompute the batch-norm statistics


def check_one_run(ckpts: list[dict], paths: list) -> None:
    """CheckpointError (one line) unless every checkpoint is of the first one's model, build,
    context and normalisation, trained with the same settings (the epochs of one run)."""
    first = ckpts[0]
    for ck, path in zip(ckpts[1:], paths[1:], strict=True):
        for what, key in SAME.items():
            if key(ck) != key(first):
                raise CheckpointError(
                    f"{path} is of another {what} than {paths[0]}; average only checkpoints of "
                    "one run (its last.pt / epoch<N>.pt files)"
                )
        diff = config_mismatch(first["config"], TrainConfig.from_dict(ck["config"]))
        if diff:
            name, (a, b) = next(iter(diff.items()))
            raise CheckpointError(
                f"{path} was trained with --{name.replace('_', '-')} {b!r}, {paths[0]} with {a!r}: "
                "not one run; average only checkpoints of one run"
            )


def check_same_tensors(ckpts: list[dict], paths: list) -> None:
    """CheckpointError unless every checkpoint's weights have the first one's names and shapes
    (a file edited after the run: its config says one model, its tensors another)."""
    want = {k: v.shape for k, v in ckpts[0]["model"].items()}
    for ck, path in zip(ckpts[1:], paths[1:], strict=True):
        if {k: v.shape for k, v in ck["model"].items()} != want:
            raise CheckpointError(
                f"{path}: its weights' names or shapes differ from {paths[0]}'s although their "
                "configs agree (an edited file); average only checkpoints written by ich-train fit"
            )


def mean_weights(states: list[dict]) -> dict:
    """The elementwise mean of floating-point tensors (computed in float64, stored in each
    tensor's dtype); other tensors (batch-norm step counters) from the last state."""
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            total = sum(s[key].double() for s in states)
            out[key] = (total / len(states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


def recompute_bn(model: torch.nn.Module, batches, augment, device, precision: str) -> int:
    """Batch-norm running statistics of `model` recomputed over `batches` (dicts with a uint8
    'image'), normalised as for validation; the number of images seen (0: the model has no
    batch norm, nothing is run)."""
    from torch.optim.swa_utils import update_bn

    from ich_train.engine import autocast

    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return 0
    seen = [0]

    def inputs():
        for b in batches:
            seen[0] += b["image"].shape[0]
            yield augment(b["image"].to(device, non_blocking=True), train=False)

    with torch.no_grad(), autocast(device, precision):
        update_bn(inputs(), model)
    model.eval()
    return seen[0]


def load_all(paths: list) -> list[dict]:
    """Every checkpoint, checked as evaluate checks one, and checked to be of one run."""
    if len(paths) < 2:
        raise CheckpointError("average needs at least 2 checkpoints of one run")
    ckpts = []
    for path in paths:
        ck = load_checkpoint(path)
        ck.setdefault("in_chans", 3)
        check_keys(ck, ("in_chans",), path)
        ckpts.append(ck)
    try:
        check_one_run(ckpts, paths)
        check_same_tensors(ckpts, paths)
    except (TypeError, ValueError, KeyError) as e:  # a config a newer/edited file holds
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{paths[-1]}: its config cannot be compared ({e}); average only checkpoints written by ich-train fit") from None  # fmt: skip
    return ckpts


def average(paths: list, out, *, batches=None, device=CPU, say=echo) -> dict:
    """Write `out`: the last checkpoint with the mean of every checkpoint's weights (the EMA
    weights, when the run kept an EMA) and without its optimizer state (it evaluates, predicts and
    embeds like any checkpoint; it is not resumed). With `batches` (the run's training batches:
    dicts with a uint8 'image') the batch-norm statistics are recomputed on them. Returns the
    record stored in the file under 'averaged'."""
    from ich_train.infer import load_model

    paths = [Path(p) for p in paths]
    ckpts = load_all(paths)
    last, weights = ckpts[-1], mean_weights([ck["model"] for ck in ckpts])
    bn = "averaged (no training build given)"
    if batches is not None:
        model, augment, _ = load_model(paths[-1], device)  # rebuilt and checked as evaluate does
        model.load_state_dict(weights)
        precision = last["config"].get("precision", "auto")
        images = recompute_bn(model, batches, augment, device, precision)
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        bn = f"recomputed on {images} training images" if images else "none (no batch norm)"
    record = {
        "checkpoints": [
            {"path": str(p), "epoch": ck.get("epoch")} for p, ck in zip(paths, ckpts, strict=True)
        ],  # fmt: skip
        "batch_norm": bn,
    }
    keep = {k: last[k] for k in KEEP if k in last}
    save_checkpoint(out, model=weights, averaged=record, metrics={}, **keep)
    say(f"wrote {out}: the mean of {len(paths)} checkpoints' weights; batch-norm statistics {bn}")
    return record


def check_average_out(out, inputs: list) -> None:
    """CheckpointError unless `out` can be written: a file path, not one of the inputs, and not
    an existing file other than an earlier `ich-train average` output (never overwritten)."""
    from ich_train.submission import check_out_file

    out = Path(out)
    check_out_file(out, "--out", "avg.pt")
    if any(out.resolve() == Path(p).resolve() for p in inputs):
        raise CheckpointError(f"--out {out} is one of the checkpoints to average; choose a new file, e.g. avg.pt")  # fmt: skip
    if out.exists() or out.is_symlink():
        try:
            ours = "averaged" in load_checkpoint(out, ())
        except CheckpointError:
            ours = False
        if not ours or out.is_symlink():
            raise CheckpointError(f"--out {out} already exists and is not an averaged checkpoint; choose a new file")  # fmt: skip


# what an averaged checkpoint keeps of the last one: what evaluate, predict and embed read
KEEP = ("config", "prior", "normalize", "image_size", "data", "in_chans", "model_spec", "epoch",
        "step", "precision")  # fmt: skip


def training_batches(ckpt: dict, shards: str, workers: int, device: torch.device, n: int = BN_BATCHES):  # fmt: skip
    """Up to n batches of the run's own training stream (its folds, batch size, sampler and
    context) drawn from `shards`, which must be the build the checkpoint was trained on (CheckpointError)."""
    from ich_train import distributed
    from ich_train.data import create_loader
    from ich_train.train import load_data

    cfg = TrainConfig.from_dict({**ckpt["config"], "shards": shards, "workers": workers})
    data = load_data(cfg, distributed.Dist(0, 1, 0, device))
    same, diffs = same_build(ckpt["data"], data.build.manifest)
    if not same:
        raise CheckpointError(
            f"--shards {shards} is not the build these checkpoints were trained on "
            f"({'; '.join(diffs[:3])}); pass the training build to recompute the batch-norm statistics"
        )
    data.train_ds.set_epoch(cfg.epochs)  # a fresh draw, past the run's own epochs
    return itertools.islice(create_loader(data.train_ds, workers, device), n)
