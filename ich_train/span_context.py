"""The span loader with `--context K`: batches that mix series like a uniform shuffle, each slice
read and decoded once per pass.

A stack needs its slice's neighbours decoded together, and shards hold each series whole and in
slice order. Streaming them through a shuffle buffer mixes only the series the buffer spans
(benchmarks/sim_context_mix.py: about 0.3 of a uniform shuffle's distinct series per batch at
RSNA's scale); holding whole series decoded until their stacks are spread out would take
gigabytes. Instead each loader worker keeps `open_series` series open at once and walks every one
of them in slice order, so an open series holds only the decoded slices its next stacks need
(a sliding window of 2K+1, plus the 2K around its first slice until it wraps round: at most 4K+1).
`series_order` decides the emission order from the series' lengths alone (no sample read): in
rounds, the next slice of every open series once, in a fresh random order; each series starts at
a random slice and wraps round, so batches hold slices from every part of a series from the first
batch on; a finished series is replaced by the next one of the pass. A batch of B from M >= 2B
open series then holds about B different series (a uniform shuffle of RSNA's training folds:
254 of 256). `SeriesWindow` fetches (one range read of the sample's span, checked against its
index row) and decodes each slice when a stack first needs it and drops it when no pending stack
does, so a resume inside an epoch skips the stacks already made without reading them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from ich_prep.split import neighbour_ranks
from ich_train.context import Context, ContextError, stack


def series_order(passes: Iterable[Iterable], length: Callable[[object], int], open_series: int, rng: random.Random) -> Iterator[tuple[int, object, int]]:  # fmt: skip
    """(opening, series, slice rank) in emission order over `passes` (iterables of series, e.g.
    slot_passes' endless ones; `opening` numbers the series as they open, so a series met again
    in a later pass is a new opening). In each pass up to `open_series` series are open at once.
    While series of the pass wait to open, rounds take the next slice of every open series once,
    in a fresh random order, and a series that ends is replaced by the next; then the open ones
    drain (`_drain`). Each series runs from a random slice round to the one before it. Every slice
    of a pass exactly once, and a pass ends before the next starts (one pass, one epoch, when
    sizes fit); a function of its arguments only."""
    opened = itertools.count()

    def start(s) -> list:  # [opening, series, ranks in emission order, next position]
        n = length(s)
        r0 = rng.randrange(n)
        return [next(opened), s, [*range(r0, n), *range(r0)], 0]

    for series in passes:
        queue = list(series)
        walks = [start(s) for s in queue[:open_series]]
        waiting = queue[open_series:][::-1]
        while waiting:
            order = list(range(len(walks)))
            rng.shuffle(order)
            for i in order:
                yield _step(walks[i])
                if walks[i][3] == len(walks[i][2]):
                    walks[i] = start(waiting.pop()) if waiting else None
            walks = [w for w in walks if w is not None]
        yield from _drain(walks, rng)


def _step(walk: list) -> tuple[int, object, int]:
    key, s, ranks, pos = walk
    walk[3] += 1
    return key, s, ranks[pos]


def _drain(walks: list, rng: random.Random) -> Iterator[tuple[int, object, int]]:
    """The rest of the open series' slices, each series' spread evenly over the drain (its k-th of
    m left at (k + u) / m, u random per series), so the last batches of a pass still mix every
    series left rather than the longest ones alone."""
    times = []
    for i, (_, _, ranks, pos) in enumerate(walks):
        left, u = len(ranks) - pos, rng.random()
        times += [((k + u) / left, i) for k in range(left)]
    for _, i in sorted(times):
        yield _step(walks[i])


class SeriesWindow(Sequence):
    """One open series seen as the sequence of its decoded images (what context.stack indexes):
    slice j is fetched and decoded when a stack first needs it, and dropped once no pending stack
    (the rows of its neighbour table that hold j: ranks j-K .. j+K without gaps or ties) needs it. `fetch(image id) -> (image id, image, labels)`."""

    def __init__(self, ids: Sequence[str], ctx: Context, fetch: Callable[[str], tuple], mm=None):
        self.ids, self.ctx, self.fetch = ids, ctx, fetch
        self.pending = set(range(len(ids)))
        self.held: dict[int, tuple] = {}  # rank -> (image, labels)
        # each stack's ranks (split.neighbour_ranks over the slice positions `mm`, by rank without
        # them: gaps are ends, tied positions one place, as context.with_context stacks them)
        self.table = neighbour_ranks(len(ids), ctx.k, mm)
        self.users: dict[int, set[int]] = {}  # rank j -> the stacks that need slice j
        for r, row in enumerate(self.table.tolist()):
            for j in row:
                self.users.setdefault(j, set()).add(r)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int) -> np.ndarray:
        return self._slice(j)[0]

    def _slice(self, j: int) -> tuple:
        if j not in self.held:
            _, image, labels = self.fetch(self.ids[j])
            self.held[j] = (image, labels)
        return self.held[j]

    def emit(self, r: int) -> tuple[str, np.ndarray, np.ndarray]:
        """(image id, stack, labels) of slice r, then r is done."""
        item = (self.ids[r], stack(self, r, self.ctx, self.table[r]), self._slice(r)[1])
        self.skip(r)
        return item

    def skip(self, r: int) -> None:
        """Mark r's stack made (emitted, or before a resume point); drop what is no longer due."""
        self.pending.discard(r)
        for j in set(self.table[r].tolist()):
            if j in self.held and not self.users[j] & self.pending:
                del self.held[j]


def context_samples(order: Iterator[tuple[int, object, int]], ids: Callable[[object], Sequence[str]], ctx: Context, fetch: Callable[[str, object], tuple], skip: int = 0, mm: Callable[[object], Sequence[float] | None] | None = None) -> Iterator[tuple]:  # fmt: skip
    """(image id, stack, labels) for each (opening, series, rank) of `order` (series_order's), after the
    first `skip` of them, which are passed over without a read. `ids(series)`: its image ids in
    slice order; `fetch(image id, series) -> (image id, image, labels)`; `mm(series)`: its slice
    positions in slice order (None: stack by rank)."""
    windows: dict[int, SeriesWindow] = {}
    for n, (key, s, r) in enumerate(order):
        w = windows.get(key)
        if w is None:
            w = windows[key] = SeriesWindow(ids(s), ctx, lambda i, s=s: fetch(i, s), mm(s) if mm else None)  # fmt: skip
        if n < skip:
            w.skip(r)
        else:
            yield w.emit(r)
        if not w.pending:
            del windows[key]


def series_of(shards: list, positions: dict) -> list[tuple]:
    """(shard, image ids in slice order, their slice positions in mm or None) of every series of `shards` (data.Shard, with spans), in
    shard order and then by the offset of each series' first sample; `positions`: image id ->
    (series id, slice rank[, slice position]), as context.series_positions checks them."""
    out = []
    for s in shards:
        by_series: dict[str, dict[int, str]] = {}
        for key in sorted(s.spans, key=s.spans.get):
            if key not in positions:
                raise ContextError(f"{s.url}: sample {key} has no series in index.parquet; --context needs a series-aware build, rebuild it")  # fmt: skip
            sid, rank = positions[key][:2]
            by_series.setdefault(sid, {})[rank] = key
        for ranks in by_series.values():
            ids = tuple(ranks[r] for r in sorted(ranks))
            mm = [positions[i][2] if len(positions[i]) > 2 else None for i in ids]
            out.append((s, ids, None if None in mm else tuple(mm)))
    return out
