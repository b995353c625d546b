"""How well a training loader mixes series into batches, against a uniform shuffle.

Shards hold whole series in slice order, so a loader that streams them can fill a batch with a
few series whose neighbouring slices share labels: fewer distinct series per batch and labels
correlated within it. Two numbers per loader over the same samples and batch size:

- distinct series per batch (mean over the batches measured);
- the lag-1 autocorrelation of the `any` label between neighbouring samples of a batch (0 for a
  uniform shuffle; near 1 when a batch is runs of one series' slices).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ich_train.context import Context, series_positions
from ich_train.data import Build, create_loader, create_train_stream

CPU = torch.device("cpu")


def batch_stats(batches: list[list[str]], series: dict, any_label: dict) -> dict:
    """{'distinct_series', 'label_autocorr'} of batches given as lists of image ids."""
    distinct = [len({series[i] for i in b}) for b in batches]
    a = np.concatenate([[any_label[i] for i in b[:-1]] for b in batches]).astype(float)
    c = np.concatenate([[any_label[i] for i in b[1:]] for b in batches]).astype(float)
    corr = float(np.corrcoef(a, c)[0, 1]) if a.std() > 0 and c.std() > 0 else float("nan")
    return {"distinct_series": float(np.mean(distinct)), "label_autocorr": corr}


def series_mixing(
    build: Build,
    batch_size: int,
    batches: int = 10,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    folds: list[int] | None = None,
    context: Context | None = None,
) -> dict[str, dict]:
    """{'uniform' | 'spans' | 'stream': batch_stats} over `batches` batches of the training
    shards of `folds` (all labelled folds by default), with `context` (--context K) stacks or
    single slices. The uniform shuffle is drawn from the index; the loaders are run (one process,
    no workers) as fit runs them. Raises ValueError for a build whose index has no series_id or
    no labels."""
    ok = build.ok
    if "series_id" not in ok or ok["series_id"].isna().all() or ok["any"].isna().all():
        raise ValueError("series mixing needs a labelled build whose index has series_id")
    shards = build.select(folds if folds is not None else build.folds)
    ids = build.ids(shards).to_numpy()
    n = min(batches, len(ids) // batch_size)
    if n < 1:
        raise ValueError(f"fewer samples ({len(ids)}) than one batch of {batch_size}")
    series = dict(zip(ok["image_id"], ok["series_id"], strict=True))
    any_label = dict(zip(ok["image_id"], ok["any"].fillna(0).astype(int), strict=True))
    rng = np.random.default_rng(seed)
    out = {"uniform": batch_stats([list(rng.permutation(ids)[:batch_size]) for _ in range(n)], series, any_label)}  # fmt: skip
    positions = series_positions(ok) if context is not None else None
    loaders = ["stream"] + (["spans"] if all(s.spans is not None for s in shards) else [])
    for name in loaders:
        ds = create_train_stream(name, shards, build.encoding, batch_size, n, rank=0, world=1,
                                 seed=seed, shuffle_buffer=shuffle_buffer, context=context,
                                 positions=positions)  # fmt: skip
        got = [b["id"] for b in itertools.islice(create_loader(ds, 0, CPU), n)]
        out[name] = batch_stats(got, series, any_label)
    return out
