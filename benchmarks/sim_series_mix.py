"""How well can a streaming loader mix series when shards hold whole series contiguously?

A simulation (no images: sample = (series, slice)) of the issue "Series-aware shards": 300 series
of 25-44 slices, written series-contiguously into shards of a 1,000-sample target, read by one
loader worker. It prints the mean number of distinct series in a batch of 256 for a uniform
shuffle of all samples, and for streaming readers that interleave k shards (round-robin at
random among k open shards) under (a) webdataset's shuffle buffer of `buf` samples and (b) a
series-aware buffer (emit a random series of those buffered, then a random slice of it).

Run: python benchmarks/sim_series_mix.py   (pure python, ~1 min)
"""

import itertools
import random

import numpy as np

from ich_train.data import shuffled  # the streaming loader's own buffer

rng = np.random.default_rng(0)
S = 300
lens = rng.integers(25, 45, S)
samples = [(s, r) for s in range(S) for r in range(lens[s])]
N = len(samples)
# series-contiguous shards, target 1000
order = rng.permutation(S)
shards, cur, n = [], [], 0
for s in order:
    if n + lens[s] > 1000 and cur:
        shards.append(cur)
        cur, n = [], 0
    cur += [(s, r) for r in range(lens[s])]
    n += lens[s]
shards.append(cur)
B = 256


def distinct(stream, nb=20):
    it = iter(stream)
    out = []
    for _ in range(nb):
        b = list(itertools.islice(it, B))
        if len(b) < B:
            break
        out.append(len({x[0] for x in b}))
    return np.mean(out)


def series_buffer(it, size, r):
    # hold up to `size` samples grouped by series; emit: random series, random sample
    groups = {}
    n = 0

    def emit():
        nonlocal n
        k = r.choice(list(groups))
        g = groups[k]
        x = g.pop(r.randrange(len(g)))
        n -= 1
        if not g:
            del groups[k]
        return x

    for s in it:
        groups.setdefault(s[0], []).append(s)
        n += 1
        if n >= size:
            yield emit()
    while groups:
        yield emit()


def interleave(shs, k, r):
    pending = list(shs)
    open_ = []
    while pending or open_:
        while len(open_) < k and pending:
            open_.append(iter(pending.pop(0)))
        i = r.randrange(len(open_))
        try:
            yield next(open_[i])
        except StopIteration:
            open_.pop(i)


def run(kind, k=1, buf=1000, seeds=5):
    res = []
    for seed in range(seeds):
        r = random.Random(seed)
        perm = np.random.default_rng(seed).permutation(len(shards))
        shs = [shards[i] for i in perm]
        if kind == "uniform":
            x = samples[:]
            r.shuffle(x)
            st = iter(x)
        else:
            base = interleave(shs, k, r)
            st = shuffled(base, buf, r) if kind == "buffer" else series_buffer(base, buf, r)
        res.append(distinct(st))
    return np.mean(res)


print("N", N, "shards", len(shards))
u = run("uniform")
print("uniform", u)
for kind in ("buffer", "series"):
    for k in (1, 4, 8, 16):
        for buf in (1000, 2000, 4000):
            d = run(kind, k, buf)
            print(kind, k, buf, round(d, 1), round(d / u, 3))
