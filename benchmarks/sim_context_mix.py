"""Batch mixing of the two training loaders with --context at RSNA's scale, simulated.

No images: a sample is (series, slice rank). 17,200 series of 24-47 slices (610,000 samples, about
RSNA's four training folds) are written series-contiguously, in slice order, into shards of a
1,000-sample target (ich-prep's default), and both loaders' own ordering code runs over them for
one epoch of one loader worker (a "slot": one rank x one DataLoader worker; fit gives each slot its
own share of the epoch, and a batch is made by one slot):

- stream: TrainStream with --context: the slot's shards (data.slot_passes) read in order, each
  series' stacks in slice order (context.with_context keeps the order), through the loader's
  shuffle buffer (data.shuffled) of `--shuffle-buffer` stacks;
- spans: SpanStream with --context: the slot's series (data.slot_passes over series) interleaved
  by span_context.series_order with `--shuffle-buffer` series open.

It prints, per batch of 256 and averaged over every batch of the slot's epoch: distinct series
(and its share of a uniform shuffle of all 610,000 samples), and the series a batch shares with
the batch before it (a uniform shuffle: about 4); for reference also a uniform shuffle of the
slot's own share of series (the most a slot can mix without reading other slots' series). Slots 1 (one process, no workers: what
ich_train.mixing measures), 8 (one GPU, 8 workers) and 64 (8 GPUs x 8 workers).

Run: python benchmarks/sim_context_mix.py   (pure python, about 20 s)
"""

import itertools
import random
import time

import numpy as np

from ich_train.data import shuffled, slot_passes
from ich_train.span_context import series_order

B, SHARD, SEED = 256, 1000, 0
rng = np.random.default_rng(SEED)
lengths = rng.integers(24, 48, 17_200)
series = [[(s, r) for r in range(n)] for s, n in enumerate(lengths.tolist())]
N = int(lengths.sum())
shards, cur = [], []
for s in rng.permutation(len(series)):
    if cur and len(cur) + len(series[s]) > SHARD:
        shards.append(cur)
        cur = []
    cur += series[s]
shards.append(cur)


def stats(stream, n_batches: int) -> tuple[float, float]:
    """(mean distinct series per batch, mean series shared with the previous batch)."""
    it = iter(stream)
    sets = [{s for s, _ in itertools.islice(it, B)} for _ in range(n_batches)]
    shared = [len(a & b) for a, b in zip(sets, sets[1:], strict=False)]
    return float(np.mean([len(x) for x in sets])), float(np.mean(shared))


def uniform() -> tuple[float, float]:
    order = [x for sr in series for x in sr]
    random.Random(SEED).shuffle(order)
    return stats(order, N // B)


def stream(slot: int, slots: int, buf: int):
    r = random.Random(f"{SEED}/0/{slot}")
    passes = slot_passes(shards, slot, slots, SEED, 0)
    return itertools.chain.from_iterable(shuffled(itertools.chain(*p), buf, r) for p in passes)


def spans(slot: int, slots: int, buf: int):
    r = random.Random(f"{SEED}/0/{slot}")
    passes = slot_passes(series, slot, slots, SEED, 0)
    return ((s[0][0], r_) for _, s, r_ in series_order(passes, len, buf, r))


t0 = time.time()
u_distinct, u_shared = uniform()
print(f"{len(series)} series, {N} samples, {len(shards)} shards; batch {B}, one epoch per slot")
print(f"uniform shuffle of all samples: distinct series/batch {u_distinct:.1f}, shared with the previous batch {u_shared:.1f}")  # fmt: skip
for slots in (1, 8, 64):
    own = [x for sr in next(slot_passes(series, 0, slots, SEED, 0)) for x in sr]
    random.Random(SEED).shuffle(own)
    d, sh = stats(own, len(own) // B)
    print(f"slots {slots:3d}  uniform shuffle of the slot's own samples:  distinct series/batch {d:6.1f} ({d / u_distinct:.2f} of uniform), shared with the previous batch {sh:6.1f}")  # fmt: skip
    for name, make in (("stream", stream), ("spans", spans)):
        for buf in (512, 1000):
            d, sh = stats(make(0, slots, buf), N // slots // B)
            print(f"slots {slots:3d}  {name:6s} --shuffle-buffer {buf:5d}: distinct series/batch {d:6.1f} ({d / u_distinct:.2f} of uniform), shared with the previous batch {sh:6.1f}")  # fmt: skip
print(f"({time.time() - t0:.0f} s)")
