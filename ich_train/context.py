"""2.5D inputs (`--context K`): each slice stacked with its K neighbours on each side.

A sample becomes slices rank-K .. rank+K of its series (the end slices repeated; with the index's
slice_position, neighbours at other positions only, and a gap in the series treated like its end:
ich_prep.split.neighbour_ranks), each with all of
the build's windows, or with one window (`--context-window brain`: the 1st place's "s-1, s, s+1
in one window"), concatenated along channels: (H, W, (2K+1) x c) uint8, neighbours in slice
order. Shards of format 2.0 hold every series whole and in slice order, so a reader that goes
through a shard in order has each series' slices together: with_context() holds one series'
decoded images at a time and emits every slice's stack, so each slice is decoded once per pass.
The geometric augmentation runs on the stacked tensor, one transform per sample, so every slice
of a stack moves together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ich_prep.config import ImageLayout
from ich_prep.errors import FormatError, UserError
from ich_prep.index import series_ranks
from ich_prep.split import neighbour_ranks
from ich_train.config import MAX_CONTEXT, ConfigError

MAX_SERIES_SLICES = 2048  # held decoded at once; RSNA series have 20-60 slices


class ContextError(UserError, ValueError):
    """A build whose shards do not hold series whole and in slice order, as --context needs."""


@dataclass(frozen=True)
class Context:
    """K neighbours on each side; `picks`: the layout channels taken from each slice (all: None)."""

    k: int
    picks: tuple[int, ...] | None = None

    def channels(self, layout: ImageLayout) -> int:
        """Input channels of a stack: (2K+1) x the channels taken from each slice."""
        return (2 * self.k + 1) * (len(self.picks) if self.picks else layout.channels)

    def names(self, layout: ImageLayout) -> list[str]:
        """Channel names in stack order, e.g. 'z-1:brain'."""
        own = [layout.channel_names[i] for i in self.picks] if self.picks else list(layout.channel_names)  # fmt: skip
        return [f"z{d:+d}:{n}" if d else f"z:{n}" for d in range(-self.k, self.k + 1) for n in own]


def create_context(k: int, window: str | None, layout: ImageLayout) -> Context | None:
    """The Context of --context K [--context-window NAME] for a build of `layout`; None for K = 0."""
    if not 0 <= k <= MAX_CONTEXT:
        raise ConfigError(f"--context {k}: use 0 (single slices) to {MAX_CONTEXT} neighbours on each side")  # fmt: skip
    if window is None:
        return Context(k) if k else None
    if not k:
        raise ConfigError("--context-window picks one window of each neighbour; give --context K >= 1 too")  # fmt: skip
    if window not in layout.channel_names:
        raise ConfigError(f"--context-window {window!r} is not a channel of this build; its channels are {list(layout.channel_names)}")  # fmt: skip
    return Context(k, (list(layout.channel_names).index(window),))


def context_of(config: dict, layout: ImageLayout, where: str = "the checkpoint") -> Context | None:
    """The Context a training config (a checkpoint's) records; None before --context existed.
    ContextError when it records what fit never writes (a context that is not a whole number
    0..MAX_CONTEXT, a window that is not text)."""
    k, window = config.get("context", 0), config.get("context_window")
    if k is None:
        k = 0
    if type(k) is not int or not 0 <= k <= MAX_CONTEXT or not (window is None or isinstance(window, str)):  # fmt: skip
        raise ContextError(f"{where} records a context (neighbours 0..{MAX_CONTEXT}) or context window that `ich-train fit` never writes; it is damaged or edited: pass a best.pt or last.pt written by ich-train fit")  # fmt: skip
    return create_context(k, window, layout)


def series_positions(ok, what: str = "--context", where: str = "index.parquet") -> dict[str, tuple[str, int, float | None]]:  # fmt: skip
    """image id -> (series id, slice rank, slice_position in mm or None) of the index's ok rows (a
    format 2.0 build; None for all when the index predates slice_position), once its series columns
    are what ich-prep writes (manifest.series_ranks): no empty value, whole-number slice ranks that
    run 0..n-1 once each over every series, each series in one shard, finite positions.
    ContextError otherwise (`what` names the feature that needs them, `where` the index)."""
    if not {"series_id", "slice_rank"} <= set(ok.columns) or ok[["series_id", "slice_rank"]].isna().any(axis=None):  # fmt: skip
        raise ContextError(f"{what} needs a series-aware build (index columns series_id and slice_rank, format 2.0); rebuild it with this ich-prep")  # fmt: skip
    try:
        sid, rank = series_ranks(ok, where)
    except FormatError as e:
        raise ContextError(str(e)) from None
    mm = ok["slice_position"].astype("float64").tolist() if "slice_position" in ok else [None] * len(ok)  # fmt: skip
    return dict(zip(ok["image_id"], zip(sid.tolist(), rank.tolist(), mm, strict=True), strict=True))  # fmt: skip


def stack(images: list[np.ndarray], r: int, ctx: Context, ranks=None) -> np.ndarray:
    """uint8 (H, W, (2K+1) x c): the `ranks` of one series' images (in slice order; its row of
    split.neighbour_ranks), by default slices r-K .. r+K with the end slices repeated, the `picks`
    channels of each."""
    n = len(images)
    if ranks is None:
        ranks = [min(max(r + d, 0), n - 1) for d in range(-ctx.k, ctx.k + 1)]
    parts = [images[i] for i in ranks]
    if ctx.picks:
        parts = [p[..., list(ctx.picks)] for p in parts]
    return np.concatenate(parts, axis=-1)


def with_context(decoded, positions: dict, ctx: Context, where: str = "the shards") -> Iterator:
    """(image id, image, labels) of whole series in slice order -> the same with each image
    replaced by its stack. ContextError when a sample is not in the index, a series comes back
    after another one started, its ranks are not 0, 1, 2, ... in order, or it is too long."""
    held: list = []
    series, done = None, set()
    for item in decoded:
        if item[0] not in positions:
            raise ContextError(f"{where}: sample {item[0]} is not an ok row of index.parquet; rebuild the build")  # fmt: skip
        sid, rank = positions[item[0]][:2]
        if sid != series:
            yield from _stacks(held, positions, ctx)
            if sid in done:
                raise ContextError(f"{where}: series {sid} is split; --context needs each series whole in one shard (format 2.0), rebuild it")  # fmt: skip
            done.add(sid)
            held, series = [], sid
        if rank != len(held):
            raise ContextError(f"{where}: series {sid}: slice rank {rank} where {len(held)} was due; the shard is not in slice order, rebuild it")  # fmt: skip
        if len(held) >= MAX_SERIES_SLICES:
            raise ContextError(f"{where}: series {sid} has more than {MAX_SERIES_SLICES} slices; refusing to hold it")  # fmt: skip
        held.append(item)
    yield from _stacks(held, positions, ctx)


def _stacks(held: list, positions: dict, ctx: Context) -> Iterator:
    """The stacks of one series' decoded slices (`held`, in rank order): neighbours from
    split.neighbour_ranks over their slice positions (ranks alone for a build without them)."""
    images = [image for _, image, _ in held]
    mm = [positions[image_id][2] if len(positions[image_id]) > 2 else None for image_id, _, _ in held]  # fmt: skip
    table = neighbour_ranks(len(held), ctx.k, None if None in mm else mm)
    for r, (image_id, _, labels) in enumerate(held):
        yield image_id, stack(images, r, ctx, table[r]), labels
