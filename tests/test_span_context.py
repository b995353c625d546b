"""The span loader's --context order (ich_train.span_context), on its own: which stack comes when,
what is read and what is held. The loader around it is tested in test_train_spans.py."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from ich_train.context import Context, stack
from ich_train.span_context import context_samples, series_order

LENGTHS = [7, 1, 12, 3, 9, 5, 10, 2, 8, 6, 11, 4]  # 78 slices in 12 series


def _image(series: int, rank: int) -> np.ndarray:
    return np.full((2, 2, 1), series * 16 + rank, np.uint8)


def _run(k: int, open_series: int, seed: int = 0, skip: int = 0):
    """(emitted items, fetched ids, most slices held by one series, most series open) over the 12
    series of LENGTHS."""
    fetched, held = [], Counter()
    peak = {"slices": 0, "open": 0}

    def fetch(image_id: str, s: int) -> tuple:
        fetched.append(image_id)
        return image_id, _image(s, int(image_id.split("-")[1])), np.zeros(6, np.float32)

    order = series_order([range(len(LENGTHS))], LENGTHS.__getitem__, open_series, random.Random(seed))  # fmt: skip
    ids = {s: [f"{s}-{r}" for r in range(n)] for s, n in enumerate(LENGTHS)}
    out = []
    gen = context_samples(order, ids.__getitem__, Context(k), fetch, skip=skip)
    for item in gen:
        out.append(item)
        windows = gen.gi_frame.f_locals["windows"]
        held = [len(w.held) for w in windows.values()]
        peak["slices"] = max([peak["slices"], *held])
        peak["open"] = max(peak["open"], len(windows))
    return out, fetched, peak


@pytest.mark.parametrize("k", [1, 2])
def test_every_stack_once_each_slice_read_once_and_the_stacks_are_context_stack(k):
    """K = 1 and 2 over 12 series of 1-12 slices, 4 open at once: every slice's stack exactly once,
    equal to context.stack over the whole series, each slice fetched once; no series holds more
    than 4K+1 decoded slices, no more than 4 series are open."""
    out, fetched, peak = _run(k, 4)
    ids = [i for i, _, _ in out]
    assert sorted(ids) == sorted(f"{s}-{r}" for s, n in enumerate(LENGTHS) for r in range(n))
    assert sorted(fetched) == sorted(ids)  # each slice read and decoded once
    for image_id, got, _ in out:
        s, r = map(int, image_id.split("-"))
        whole = [_image(s, j) for j in range(LENGTHS[s])]
        assert np.array_equal(got, stack(whole, r, Context(k))), image_id
    assert peak["slices"] <= 4 * k + 1 and peak["open"] <= 4


def test_rounds_take_one_slice_of_each_open_series_from_a_random_start():
    """6 of the 12 series open: the first round is one slice of each of series 0-5, not all their
    first slices; the same seed gives the same order, another seed another."""
    first = [i for i, _, _ in _run(1, 6)[0][:6]]
    assert sorted(int(i.split("-")[0]) for i in first) == list(range(6))
    assert sum(i.split("-")[1] != "0" for i in first) >= 3  # measured: 4 of 6 start past slice 0
    assert _run(1, 6)[0][5][0] == first[5] and [i for i, _, _ in _run(1, 6, seed=1)[0][:6]] != first  # fmt: skip


def test_the_drain_spreads_every_series_left_over_the_rest_of_the_pass():
    """All 12 series open at once (no series waits: the whole pass drains): every sixth of the
    pass (13 stacks) holds slices of at least 8 of the 12 series, the short ones included, rather
    than the longest series alone at the end."""
    ids = [i for i, _, _ in _run(1, 12)[0]]
    per_sixth = [len({i.split("-")[0] for i in ids[q : q + 13]}) for q in range(0, 78, 13)]
    assert min(per_sixth) >= 8, per_sixth  # measured: 9 9 10 9 10 10


def test_a_resume_skips_stacks_without_reading_what_only_they_needed():
    """skip=30: the same stacks as items 30.. of the whole run, and fewer reads (slices needed only
    by the skipped stacks are never fetched); each fetched slice still once."""
    whole, _, _ = _run(1, 4, seed=2)
    tail, fetched, _ = _run(1, 4, seed=2, skip=30)
    assert [i for i, _, _ in tail] == [i for i, _, _ in whole[30:]]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(tail, whole[30:], strict=True))
    assert len(fetched) == len(set(fetched)) < sum(LENGTHS) - 20  # measured: 52 of 78
