"""Shards -> batches of uint8 images.

Folds are chosen through the manifest (whole shards belong to one fold), so unselected shards are
never opened. Shards open like every other file of a build (ich_prep.location.open_stream: local
paths, http(s) with the standard library, other fsspec URLs such as s3://). Tar members are read
with ich_prep's bounded tar reader (shards.iter_samples, the one verify and preview use), keeping
only the two members the format defines (`<key>.<encoding>` and `<key>.json`); nothing is ever
unpickled. Each sample is checked against the index: it must be one of the shard's ok rows, and
its json labels must equal the index's. Training
streams are infinite shard cycles cut at an exact number of batches per rank, so every rank runs the
same number of steps even with fewer shards than ranks x workers. A balanced epoch (--sampler
balanced) is the multiset ich_train.sampler draws from the index, read by the span loader.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import os
import random
import signal
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ich_prep import LABELS, sample
from ich_prep.config import ImageLayout
from ich_prep.errors import UserError
from ich_prep.index import SPAN_COLUMNS, index_spans
from ich_prep.location import join, open_stream
from ich_prep.manifest import FormatError, ShardEntry, index_mismatches, open_build
from ich_prep.sample import SampleError, index_labels
from ich_prep.shards import iter_samples, read_span
from ich_train.checkpoint import PREPROCESSING_FIELDS
from ich_train.config import CONTEXT_BALANCED, ConfigError
from ich_train.context import with_context
from ich_train.sampler import balanced_epoch
from ich_train.span_context import context_samples, series_of, series_order

# the index columns (index.INDEX_SCHEMA) the trainer reads: these must be there, the optional
# ones are read when they are
INDEX_COLUMNS = ["image_id", "split", "fold", "shard", "status", *LABELS]
OPTIONAL_COLUMNS = (*SPAN_COLUMNS, "series_id", "slice_rank", "slice_position")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ShardError(UserError, RuntimeError):
    """A shard that is missing, damaged, or disagrees with its manifest."""


@dataclass(frozen=True)
class Shard:
    name: str
    url: str
    fold: int
    samples: int
    layout: ImageLayout  # the manifest's image layout: bounds members, checks shapes
    bytes: int  # the manifest's size: no member may declare more than is left of it
    # image id -> labels of the index's ok rows for this shard (None labels in a test build)
    expected: dict | None = field(default=None, compare=False, hash=False, repr=False)
    # image id -> (offset, length) of its sample in this shard, when the index records spans
    spans: dict | None = field(default=None, compare=False, hash=False, repr=False)


class Build:
    """A finished ich-prep build opened for training: the manifest (`manifest`: the
    manifest.Build handle, typed), the index columns the trainer reads, and its shards selected by
    fold."""

    def __init__(self, root: str):
        self.root = str(root)
        self.manifest = open_build(self.root)
        cfg = self.manifest.config
        self.config = cfg  # the typed BuildConfig
        self.encoding, self.size, self.layout = cfg.encoding, cfg.size, cfg.layout
        self.index = self.manifest.index(INDEX_COLUMNS, optional=OPTIONAL_COLUMNS)
        self.ok = self.index[self.index["status"] == "ok"]
        entries = self._checked_entries()
        expected, spans = self._expected(), self._spans()
        self.shards = [
            Shard(
                e.name,
                join(self.root, e.name),
                e.fold,
                e.samples,
                self.layout,
                e.bytes,
                expected.get(e.name, {}),
                spans.get(e.name),
            )  # fmt: skip
            for e in entries
            if e.samples > 0
        ]

    def _fail(self, what: str) -> ShardError:
        return ShardError(f"{self.root}: {what}; the build is inconsistent, run `ich-prep verify {self.root}` and rebuild it")  # fmt: skip

    def _checked_entries(self) -> tuple[ShardEntry, ...]:
        """The manifest's shard entries, once the index agrees with them (index_mismatches)."""
        problems = index_mismatches(self.manifest, self.index)
        if problems:
            raise self._fail(problems[0][2])
        return self.manifest.shards

    def _expected(self) -> dict[str, dict]:
        """shard name -> {image id: labels (list of 6 ints) or None} of its ok rows."""
        ok = self.ok
        rows = index_labels(ok)
        out: dict[str, dict] = {}
        for shard, image_id, y in zip(ok["shard"], ok["image_id"], rows, strict=True):
            out.setdefault(shard, {})[image_id] = y
        return out

    def _spans(self) -> dict[str, dict]:
        """shard name -> {image id: (offset, length)} of its ok rows (manifest.index_spans); {}
        for a build without spans, which streams its shards."""
        spans = index_spans(self.ok)
        out: dict[str, dict] = {}
        for shard, image_id in zip(self.ok["shard"], self.ok["image_id"], strict=True):
            if image_id in spans:
                out.setdefault(shard, {})[image_id] = spans[image_id]
        return out

    @property
    def preprocessing(self) -> dict:
        """What a model trained on this build expects of its input pixels, beyond the size (which
        the device resize adapts): the windows (HU centre/width per channel), the pixel spacing
        and the crop (series: one box per series; slice: each slice's own box, so the head's
        scale and centre differ). A manifest without `crop` reads as "slice" (BuildConfig)."""
        recorded = self.config.to_dict()
        return {key: recorded[key] for key in PREPROCESSING_FIELDS}

    @property
    def folds(self) -> list[int]:
        return sorted({s.fold for s in self.shards if s.fold >= 0})

    def select(self, folds: list[int] | tuple[int, ...] | None) -> list[Shard]:
        """Shards of `folds` (None: every shard, e.g. a test build)."""
        if folds is None:
            chosen = list(self.shards)
        else:
            missing = sorted(set(folds) - set(self.folds))
            if missing:
                raise FormatError(
                    f"{self.root} has no shards for folds {missing}; its folds are {self.folds} "
                    "(pick --valid-fold/--train-folds among them)"
                )
            chosen = [s for s in self.shards if s.fold in set(folds)]
        if not chosen:
            raise FormatError(f"{self.root} has no shards with samples; is the build empty?")
        return chosen

    def labels(self, folds: list[int] | tuple[int, ...]) -> np.ndarray:
        """(N, 6) float labels of the ok rows of `folds`, read from the index (no samples read)."""
        rows = self.ok[self.ok["fold"].isin(list(folds))]
        y = rows[list(LABELS)].to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isnan(y).any():
            raise FormatError(
                f"{self.root}: folds {list(folds)} have rows without labels; is this a test build?"
            )
        return y

    def ids(self, shards: list[Shard]) -> pd.Series:
        names = {s.name for s in shards}
        return self.ok.loc[self.ok["shard"].isin(names), "image_id"]


def read_shard(shard: Shard, encoding: str) -> Iterator[dict]:
    """Raw samples {'__key__', '__url__', encoding: bytes, 'json': bytes} of one shard, read with
    ich_prep's one bounded tar reader (shards.iter_samples: regular members, bounded sizes and
    member count, other members skipped unread) and checked against the manifest and the index
    (`shard.expected`: the ok rows' ids and labels, when known)."""
    try:
        stream = open_stream(shard.url)
    except FileNotFoundError as e:
        raise ShardError(
            f"{shard.url} is listed in the manifest but missing; copy the whole build folder or rebuild"
        ) from e
    except OSError as e:
        raise ShardError(
            f"{shard.url} cannot be opened ({e}); is the server or bucket reachable?"
        ) from e
    n = 0
    try:
        for s in iter_samples(stream, encoding, shard.layout, shard.samples, size=shard.bytes):
            yield _raw_sample(shard, s, encoding)
            n += 1
    except (tarfile.TarError, EOFError, ValueError) as e:
        raise ShardError(
            f"{shard.url} is not a readable tar file ({e}); re-copy or rebuild it (ich-prep verify names the damage)"
        ) from e
    except OSError as e:
        raise ShardError(f"{shard.url}: read failed ({e}); re-copy it or check the server") from e
    finally:
        stream.close()
    if n != shard.samples:
        raise ShardError(
            f"{shard.url} held {n} samples, the manifest says {shard.samples}; the shard is truncated "
            "or replaced, re-copy or rebuild it"
        )


def read_sample(shard: Shard, image_id: str, encoding: str) -> dict:
    """One raw sample fetched by a single range read of its span (the index's shard_offset and
    shard_length), through the same bounded reader and checks as read_shard."""
    offset, length = shard.spans[image_id]
    try:
        s = read_span(shard.url, offset, length, encoding, shard.layout)
    except ValueError as e:
        raise ShardError(f"{shard.url}: sample {image_id} at bytes {offset}+{length}: {e}; the index and the shard disagree, run `ich-prep verify` and rebuild") from e  # fmt: skip
    except OSError as e:
        raise ShardError(f"{shard.url}: read failed ({e}); re-copy it or check the server") from e
    if s.key != image_id:
        raise ShardError(f"{shard.url}: bytes {offset}+{length} hold sample {s.key}, the index says {image_id}; run `ich-prep verify` and rebuild")  # fmt: skip
    return _raw_sample(shard, s, encoding)


def _raw_sample(shard: Shard, s, encoding: str) -> dict:
    """The sample's members and what its decode checks them against (decode_sample)."""
    if s.problems:
        raise ShardError(f"{shard.url}: sample {s.key}: {s.problems[0]}; the shard is damaged or crafted, rebuild it")  # fmt: skip
    raw = {"__key__": s.key, "__url__": shard.url, "__fold__": shard.fold, **s.fields}
    if shard.expected is not None:
        if s.key not in shard.expected:
            raise ShardError(f"{shard.url} holds sample {s.key}, which index.parquet does not list for this shard; the build is inconsistent, rebuild it")  # fmt: skip
        raw["__labels__"] = shard.expected[s.key]
    raw["__layout__"] = shard.layout
    return raw


def decode_sample(raw: dict, encoding: str, positions: dict | None = None) -> tuple[str, np.ndarray, np.ndarray]:  # fmt: skip
    """(image_id, uint8 (H, W, C) of the build's layout, float32 labels (6,), NaN when
    unlabelled), from a raw sample of read_shard (which attaches the shard's layout, fold and the
    index's labels), by sample.decode_sample, verify's decode: the json's schema, its image id,
    fold and labels those of the key, the shard and the index (the one source of truth) and,
    with `positions` (image id -> (series id, slice rank, position or None) of the index), its
    series_id, slice_rank and slice_position the index's."""
    key = raw["__key__"]
    expected = {"fold": raw["__fold__"]}
    if "__labels__" in raw:
        expected["labels"] = raw["__labels__"]
    if positions is not None and key in positions:
        sid, rank, *mm = positions[key]
        expected.update(series_id=sid, slice_rank=rank)
        if mm and mm[0] is not None:
            expected["slice_position"] = mm[0]
    try:
        image, meta = sample.decode_sample(key, raw, encoding, raw["__layout__"], expected)
    except SampleError as e:
        raise ShardError(f"{raw.get('__url__')}: sample {key}: {e}; the build is inconsistent (an edited shard or index?): run `ich-prep verify` and rebuild it") from None  # fmt: skip
    if meta.labels is None:
        return key, image, np.full(len(LABELS), np.nan, np.float32)
    return key, image, np.asarray(meta.labels, np.float32)


def collate(items: list[tuple[str, np.ndarray, np.ndarray]]) -> dict:
    """{'image': uint8 (B, H, W, C), 'label': float32 (B, 6), 'id': [str]}."""
    ids, images, labels = zip(*items, strict=True)
    return {
        "image": torch.from_numpy(np.stack(images)),
        "label": torch.from_numpy(np.stack(labels)),
        "id": list(ids),
    }


def batched(samples, batch_size: int, drop_last: bool) -> Iterator[dict]:
    buf = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf and not drop_last:
        yield collate(buf)


def shuffled(samples, bufsize: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: hold `bufsize` samples, emit a random one as each new one arrives."""
    buf = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


def slot_passes(
    shards: list[Shard], slot: int, slots: int, seed: int, epoch: int
) -> Iterator[list[Shard]]:
    """Infinite sequence of passes for one (rank, worker) slot over `shards` (or any items: the
    span loader deals samples). Pass k is a fresh permutation of all of them, dealt round-robin
    over the slots (this slot takes positions slot, slot + slots, ... of the
    back-to-back permutations). Every slot always gets shards, and with at least `slots` shards each
    shard is read once per pass."""
    n = len(shards)
    pos, k = slot, 0
    while True:
        perm = np.random.default_rng([seed, epoch, k]).permutation(n)
        mine = []
        while pos < (k + 1) * n:
            mine.append(shards[perm[pos - k * n]])
            pos += slots
        if mine:
            yield mine
        k += 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Exactly `batches_per_rank` shuffled batches per epoch on every rank, split over DataLoader workers."""

    def __init__(
        self,
        shards,
        encoding,
        batch_size,
        batches_per_rank,
        *,
        rank=0,
        world=1,
        seed=0,
        shuffle_buffer=1000,
        context=None,
        positions=None,
    ):
        super().__init__()
        if not shards:
            raise ShardError("no training shards selected")
        self.shards, self.encoding, self.batch_size = list(shards), encoding, batch_size
        self.batches_per_rank, self.rank, self.world = batches_per_rank, rank, world
        self.seed, self.shuffle_buffer, self.epoch, self.skip = seed, shuffle_buffer, 0, 0
        # --context: (Context, image id -> (series id, rank)); stacks are made before the shuffle
        self.context, self.positions = context, positions

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start `epoch`, leaving out its first `skip` batches of this rank (a mid-epoch resume)."""
        if not 0 <= skip <= self.batches_per_rank:
            raise ValueError(f"cannot skip {skip} of {self.batches_per_rank} batches")
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        """Batches this rank still yields this epoch."""
        return self.batches_per_rank - self.skip

    def _read(self, shards: list[Shard]) -> Iterator[dict]:
        return itertools.chain.from_iterable(read_shard(s, self.encoding) for s in shards)

    def _slot_plan(self) -> tuple[int, int, int, int]:
        """(slot, slots, quota, done) of this worker this epoch: its slot among all (rank, worker)
        slots, its batches this epoch and those already made before a mid-epoch resume."""
        w, n_workers = _worker()
        # The DataLoader takes batches from its workers round-robin starting at worker 0, so batch i
        # of an epoch comes from worker role i % n_workers. After `skip` batches, worker w plays
        # role (w + skip) % n_workers; that role has made skip // n_workers batches, one more if it
        # comes before skip % n_workers.
        w = (w + self.skip) % n_workers
        slot, slots = self.rank * n_workers + w, self.world * n_workers
        quota = self.batches_per_rank // n_workers + (w < self.batches_per_rank % n_workers)
        done = self.skip // n_workers + (w < self.skip % n_workers)
        return slot, slots, quota, done

    def __iter__(self) -> Iterator[dict]:
        slot, slots, quota, done = self._slot_plan()
        if quota - done <= 0:
            return
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
        passes = slot_passes(self.shards, slot, slots, self.seed, self.epoch)
        if self.context is not None:  # stacks of whole series in order, then the shuffle
            items = itertools.chain.from_iterable(
                shuffled(self._stacked(p), self.shuffle_buffer, rng) for p in passes
            )
            decoded = itertools.islice(items, done * self.batch_size, None)
        else:
            raw = itertools.chain.from_iterable(  # shuffle within each pass: one pass = one epoch when sizes fit
                shuffled(self._read(p), self.shuffle_buffer, rng) for p in passes
            )
            # skipped samples are read and shuffled exactly as before (same order after them) but not decoded
            raw = itertools.islice(raw, done * self.batch_size, None)
            decoded = (decode_sample(s, self.encoding) for s in raw)
        yield from itertools.islice(batched(decoded, self.batch_size, drop_last=True), quota - done)

    def _stacked(self, shards: list[Shard]) -> Iterator:
        """Decoded samples of `shards`, each image replaced by its --context stack."""
        decoded = (decode_sample(s, self.encoding, self.positions) for s in self._read(shards))
        return with_context(decoded, self.positions, self.context)


class SpanStream(TrainStream):
    """TrainStream's contract (exact batches per rank, worker split, resume inside an epoch) with
    a uniform shuffle: every pass is a seeded permutation of all training samples, each fetched
    by one range read of its span. Shards that hold whole series in slice order still give
    batches of many series (a streaming buffer mixes only the series it spans:
    benchmarks/sim_series_mix.py). Needs spans for every shard.

    With `context` (--context K) a pass is a seeded permutation of whole series instead, dealt
    over the (rank, worker) slots; each worker keeps `shuffle_buffer` of its series open at once
    and interleaves their stacks (ich_train.span_context: each slice read and decoded once per
    pass, batches of about as many series as a uniform shuffle's).

    With `pos_fraction` (--sampler balanced) an epoch is instead the multiset
    sampler.balanced_epoch draws from the index's `any` labels: exactly the samples of this
    epoch's batches over all ranks (batches_per_rank x world x batch_size), batch i of rank r
    holding draws [(i x world + r) x batch_size, ...) of it. Every rank and worker computes the
    same draw from (seed, epoch), so ranks get disjoint shares that together are the multiset,
    and a resume skips whole batches without reading them."""

    def __init__(self, shards, encoding, batch_size, batches_per_rank, *, rank=0, world=1, seed=0, pos_fraction=None, shuffle_buffer=1000, context=None, positions=None):  # fmt: skip
        super().__init__(shards, encoding, batch_size, batches_per_rank, rank=rank, world=world, seed=seed, shuffle_buffer=shuffle_buffer, context=context, positions=positions)  # fmt: skip
        if any(s.spans is None for s in self.shards):
            raise ShardError("the index records no sample spans for some shards; use the streaming loader")  # fmt: skip
        self.items = [(s, key) for s in self.shards for key in sorted(s.spans)]
        self.pos_fraction, self.positive = pos_fraction, None
        if pos_fraction is not None:
            self.positive = _any_positive(self.items)
        self.series = series_of(self.shards, positions) if context is not None else None

    @property
    def epoch_draws(self) -> int:
        """Samples all ranks train on per epoch: the size of a balanced epoch's multiset."""
        return self.batches_per_rank * self.world * self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into `items` of a balanced epoch's draws, in batch order over all ranks."""
        return balanced_epoch(self.positive, self.epoch_draws, self.pos_fraction, self.seed, epoch)

    def _balanced(self, slot: int, slots: int, done: int) -> Iterator[tuple[Shard, str]]:
        """This worker's samples of a balanced epoch: its role's batches i = role, role + workers,
        ... of this rank, from the first not yet made."""
        n_workers = slots // self.world
        role, b = slot - self.rank * n_workers, self.batch_size
        order = self.epoch_order(self.epoch)
        for i in range(role + done * n_workers, self.batches_per_rank, n_workers):
            start = (i * self.world + self.rank) * b
            yield from (self.items[j] for j in order[start : start + b])

    def __iter__(self) -> Iterator[dict]:
        slot, slots, quota, done = self._slot_plan()
        if quota - done <= 0:
            return
        if self.context is not None:
            yield from itertools.islice(batched(self._stacks(slot, slots, done), self.batch_size, drop_last=True), quota - done)  # fmt: skip
            return
        if self.positive is not None:
            order = self._balanced(slot, slots, done)  # skipped batches: never read
        else:
            order = itertools.chain.from_iterable(
                slot_passes(self.items, slot, slots, self.seed, self.epoch)
            )
            order = itertools.islice(order, done * self.batch_size, None)  # skipped: never read
        decoded = (decode_sample(read_sample(s, key, self.encoding), self.encoding) for s, key in order)  # fmt: skip
        yield from itertools.islice(batched(decoded, self.batch_size, drop_last=True), quota - done)

    def _stacks(self, slot: int, slots: int, done: int) -> Iterator[tuple]:
        """This worker's --context stacks: its series of each pass (slot_passes over series),
        interleaved by span_context.series_order, after the `done` batches already made."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
        passes = slot_passes(self.series, slot, slots, self.seed, self.epoch)
        order = series_order(passes, lambda s: len(s[1]), self.shuffle_buffer, rng)

        def fetch(key: str, s: tuple) -> tuple:
            return decode_sample(read_sample(s[0], key, self.encoding), self.encoding, self.positions)  # fmt: skip

        return context_samples(order, lambda s: s[1], self.context, fetch, skip=done * self.batch_size, mm=lambda s: s[2])  # fmt: skip


def _any_positive(items: list[tuple[Shard, str]]) -> np.ndarray:
    """One bool per (shard, image id): its `any` label in the index. A ConfigError when the index
    has no labels or the training samples hold only one class (nothing to balance)."""
    labels = [s.expected.get(key) if s.expected else None for s, key in items]
    if any(y is None for y in labels):
        raise ConfigError("--sampler balanced needs the index's labels for every training image; is this a test build?")  # fmt: skip
    positive = np.array([y[0] == 1 for y in labels], dtype=bool)
    if positive.all() or not positive.any():
        what = "negative" if positive.all() else "positive"
        raise ConfigError(f"--sampler balanced: the training folds hold no {what} ('any') image to draw; use --sampler natural")  # fmt: skip
    return positive


def create_train_stream(loader: str, shards: list[Shard], encoding: str, batch_size: int, batches_per_rank: int, *, rank: int, world: int, seed: int, shuffle_buffer: int, pos_fraction: float | None = None, context=None, positions=None) -> TrainStream:  # fmt: skip
    """The training stream `loader` names: 'spans' (SpanStream), 'stream' (TrainStream), or
    'auto': spans when every shard has them in the index, else stream; either reads --context
    stacks (`context`, `positions`). A balanced epoch (`pos_fraction`, --sampler balanced) is
    drawn by the span loader only, without --context: it reads any sample any number of times, a
    whole-shard stream cannot, and stacks read each slice once per pass."""
    spans = all(s.spans is not None for s in shards)
    if context is not None and pos_fraction is not None:
        raise ConfigError(CONTEXT_BALANCED)
    if pos_fraction is not None and (loader == "stream" or not spans):
        why = "--loader stream reads whole shards" if loader == "stream" else "this build's index records no sample spans (shard_offset, shard_length); rebuild it with this ich-prep"  # fmt: skip
        raise ConfigError(f"--sampler balanced draws samples by their index spans (the span loader), but {why}")  # fmt: skip
    if loader == "spans" and not spans:
        raise ShardError("--loader spans: this build's index records no sample spans (shard_offset, shard_length); use --loader stream or rebuild with this ich-prep")  # fmt: skip
    if loader == "spans" or (loader == "auto" and spans):
        return SpanStream(shards, encoding, batch_size, batches_per_rank, rank=rank, world=world, seed=seed, pos_fraction=pos_fraction, shuffle_buffer=shuffle_buffer, context=context, positions=positions)  # fmt: skip
    return TrainStream(shards, encoding, batch_size, batches_per_rank, rank=rank, world=world, seed=seed, shuffle_buffer=shuffle_buffer, context=context, positions=positions)  # fmt: skip


class EvalStream(IterableDataset):
    """Every sample of `shards` exactly once over all ranks and workers, in shard order."""

    def __init__(self, shards, encoding, batch_size, *, rank=0, world=1, workers=0, context=None, positions=None):  # fmt: skip
        super().__init__()
        self.shards, self.encoding, self.batch_size = list(shards), encoding, batch_size
        self.rank, self.world, self.workers = rank, world, workers
        self.context, self.positions = context, positions  # --context: see TrainStream

    def _mine(self, w: int, n_workers: int) -> list[Shard]:
        return self.shards[self.rank :: self.world][w::n_workers]

    def __len__(self) -> int:
        n = max(self.workers, 1)
        return sum(
            math.ceil(sum(s.samples for s in self._mine(w, n)) / self.batch_size) for w in range(n)
        )

    @property
    def samples(self) -> int:
        """Samples this rank will see."""
        return sum(s.samples for s in self.shards[self.rank :: self.world])

    def __iter__(self) -> Iterator[dict]:
        w, n_workers = _worker()
        raw = itertools.chain.from_iterable(
            read_shard(s, self.encoding) for s in self._mine(w, n_workers)
        )
        decoded = (decode_sample(s, self.encoding, self.positions) for s in raw)
        if self.context is not None:
            decoded = with_context(decoded, self.positions, self.context)
        yield from batched(decoded, self.batch_size, drop_last=False)


def default_workers() -> int:
    """Loader workers per process: the cores of this process's share of the node, minus one, 1..16.
    One worker feeds ~1,500 img/s (docs/benchmarks.md); prediction on an H100 wants ~15,000."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, (os.cpu_count() or 1) // local_world - 1))


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: Linux kills this worker (SIGKILL) as soon as the process that
    started it is gone, kill -9 included (prctl PR_SET_PDEATHSIG), as ich_prep.build's
    exit_with_parent does for build workers; a worker whose parent is already gone exits now.
    Elsewhere nothing (torch's own watchdog ends workers within seconds)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl: no signal will come
        os._exit(1)


def create_loader(dataset: IterableDataset, workers: int, device: torch.device) -> DataLoader:
    """DataLoader over a stream that already yields batches; pinned memory on CUDA; its workers
    die with this process (die_with_parent).

    Batches in flight sit in shared memory (/dev/shm): workers x prefetch_factor x batch bytes, e.g.
    15 x 2 x 256 x 192 KiB = 1.4 GiB; in a container, give it --shm-size accordingly."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,  # fresh workers per epoch pick up set_epoch()
        worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers > 0 else None,
    )
