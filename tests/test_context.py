"""2.5D inputs (--context K): stacks of neighbouring slices, each slice decoded once."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import ich_train.data as data_mod
from ich_prep.config import ImageLayout
from ich_train.augment import AugmentParams, DeviceAugment
from ich_train.cli import main
from ich_train.config import ConfigError, TrainConfig
from ich_train.context import (  # fmt: skip
    Context,
    ContextError,
    create_context,
    series_positions,
    stack,
    with_context,
)
from ich_train.data import Build, EvalStream, TrainStream
from ich_train.model import normalization
from tests.test_train_cli_errors import one_error_line
from tests.train_fixtures import make_build

LAYOUT = ImageLayout(height=4, width=4, channels=3, channel_names=("brain", "subdural", "bone"))


def _img(v: int) -> np.ndarray:
    """A 4x4 slice whose three windows hold v, v + 1, v + 2."""
    return np.stack([np.full((4, 4), v + c, np.uint8) for c in range(3)], -1)


def test_stack_by_hand_ends_repeated():
    """Slices 10, 20, 30 of one series, K = 1: rank 0 is [10, 10, 20], rank 2 is [20, 30, 30], all
    windows of each (9 channels); with --context-window subdural one window each (3 channels)."""
    images = [_img(10), _img(20), _img(30)]
    full = Context(1)
    assert stack(images, 0, full)[0, 0].tolist() == [10, 11, 12, 10, 11, 12, 20, 21, 22]
    assert stack(images, 2, full)[0, 0].tolist() == [20, 21, 22, 30, 31, 32, 30, 31, 32]
    one = create_context(1, "subdural", LAYOUT)
    assert one.channels(LAYOUT) == 3 and stack(images, 1, one)[0, 0].tolist() == [11, 21, 31]
    assert Context(2).channels(LAYOUT) == 15 and full.names(LAYOUT)[:2] == ["z-1:brain", "z-1:subdural"]  # fmt: skip


def test_context_flags_are_checked():
    with pytest.raises(ConfigError, match="--context-window 'lung'"):
        create_context(1, "lung", LAYOUT)
    with pytest.raises(ConfigError, match="give --context K >= 1"):
        TrainConfig(shards="s", out="o", context_window="brain")
    with pytest.raises(ConfigError, match="--context must be 0"):
        TrainConfig(shards="s", out="o", context=9)
    with pytest.raises(ConfigError, match="--sampler balanced draws single images"):
        TrainConfig(shards="s", out="o", context=1, sampler="balanced", pos_fraction=0.5)
    assert TrainConfig(shards="s", out="o", context=1, loader="spans").loader == "spans"
    assert create_context(0, None, LAYOUT) is None


def test_series_must_come_whole_and_in_order():
    """A series split by another, or out of slice order: one ContextError naming the series."""
    pos = {"a0": ("A", 0), "a1": ("A", 1), "b0": ("B", 0)}
    item = {k: (k, _img(1), np.zeros(6, np.float32)) for k in pos}
    ok = list(with_context([item["a0"], item["a1"], item["b0"]], pos, Context(1)))
    assert [i for i, _, _ in ok] == ["a0", "a1", "b0"] and ok[2][1].shape == (4, 4, 9)
    with pytest.raises(ContextError, match="series A is split"):
        list(with_context([item["a0"], item["b0"], item["a1"]], pos, Context(1)))
    with pytest.raises(ContextError, match="slice rank 1 where 0 was due"):
        list(with_context([item["a1"], item["a0"]], pos, Context(1)))


@pytest.fixture(scope="module")
def series_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("context")
    return tmp, make_build(tmp / "build", folds=2, per_shard=24, shards_per_fold=2, size=32, series_len=6)  # fmt: skip


def test_each_slice_is_decoded_once_and_stacks_hold_its_neighbours(series_build, monkeypatch):
    """EvalStream with --context 1: one decode per sample; every stack is [rank-1, rank, rank+1] of
    its own series (checked against each slice decoded alone)."""
    _, root = series_build
    build = Build(str(root))
    calls = []
    real = data_mod.decode_sample
    monkeypatch.setattr(data_mod, "decode_sample", lambda s, *a: calls.append(s["__key__"]) or real(s, *a))  # fmt: skip
    pos = series_positions(build.ok)
    alone = {i: img for b in EvalStream(build.shards, build.encoding, 64) for i, img in zip(b["id"], b["image"].numpy(), strict=True)}  # fmt: skip
    calls.clear()
    stacks = {i: img for b in EvalStream(build.shards, build.encoding, 64, context=Context(1), positions=pos) for i, img in zip(b["id"], b["image"].numpy(), strict=True)}  # fmt: skip
    assert sorted(calls) == sorted(alone) and len(calls) == len(set(calls))
    by_series: dict = {}
    for image_id, (sid, rank, _) in pos.items():
        by_series.setdefault(sid, {})[rank] = image_id
    for image_id, (sid, rank, _) in pos.items():
        ranks = by_series[sid]
        want = [alone[ranks[min(max(rank + d, 0), len(ranks) - 1)]] for d in (-1, 0, 1)]
        assert np.array_equal(stacks[image_id], np.concatenate(want, -1)), image_id


def test_train_stream_with_context_resumes_and_gives_equal_batches(series_build):
    """The streaming loader with stacks: a resume after 2 batches yields the tail of the same epoch;
    two ranks yield the same number of batches."""
    _, root = series_build
    build = Build(str(root))
    pos, shards = series_positions(build.ok), build.select([0])

    def ids(skip=0, rank=0, world=1):
        ds = TrainStream(shards, build.encoding, 4, 5, rank=rank, world=world, seed=3, shuffle_buffer=8, context=Context(1), positions=pos)  # fmt: skip
        ds.set_epoch(2, skip=skip)
        return [b["id"] for b in ds]

    full = ids()
    assert len(full) == 5 and ids(skip=2) == full[2:]
    assert len(ids(rank=0, world=2)) == len(ids(rank=1, world=2)) == 5


def test_one_geometric_transform_per_stack():
    """A stack of 9 identical channels stays identical channel for channel through the geometric
    augmentation (rotation, scale, shift, flip): the slices of a stack move together."""
    mean, std = normalization(torch.nn.Identity(), 9)
    assert mean == (0.485, 0.456, 0.406) * 3
    aug = DeviceAugment(32, mean, [1.0] * 9, AugmentParams(0.5, 20.0, 0.2, 0.1, 0.0, 0.0, 0.0))
    base = torch.randint(0, 256, (6, 32, 32, 1), dtype=torch.uint8)
    out = aug(base.repeat(1, 1, 1, 9), train=True, generator=torch.Generator().manual_seed(0))
    centred = out + torch.tensor(mean).view(1, 9, 1, 1)  # undo the per-channel mean only
    assert all(torch.allclose(centred[:, 0], centred[:, c], atol=1e-6) for c in range(1, 9))
    assert not torch.allclose(out[:, 0], aug(base.repeat(1, 1, 1, 9), train=False)[:, 0])


def test_fit_evaluate_predict_with_context(series_build, capsys):
    """fit --context 1 (9 channels) and --context 1 --context-window brain (3 channels): the
    checkpoint records the context and its channels; evaluate and predict stack the same way. A
    build without series columns is one line."""
    tmp, root = series_build
    common = ["--shards", str(root), "--valid-fold", "1", "--model", "resnet10t", "--image-size", "32",
              "--batch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress"]  # fmt: skip
    for name, extra, chans in (("ctx", ["--context", "1"], 9), ("mono", ["--context", "1", "--context-window", "brain"], 3)):  # fmt: skip
        assert main(["fit", *common, "--out", str(tmp / name), *extra]) == 0
        ck = torch.load(tmp / name / "last.pt", weights_only=True)
        assert (
            ck["in_chans"] == chans == ck["model_spec"]["in_chans"] and ck["config"]["context"] == 1
        )
        assert len(ck["normalize"]["mean"]) == chans
    assert "context: 3 slices a sample, 9 channels" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(tmp / "ctx" / "last.pt"), "--shards", str(root), "--fold", "1",
                 "--workers", "0", "--no-progress", "--no-report"]) == 0  # fmt: skip
    m = json.loads(capsys.readouterr().out)
    assert m["images"] == 48 and m["out_of_fold"]
    test = make_build(tmp / "test", test=True, per_shard=12, size=32, series_len=4, seed=7)
    assert main(["predict", "--checkpoint", str(tmp / "ctx" / "last.pt"), str(tmp / "mono" / "last.pt"),
                 "--shards", str(test), "--out", str(tmp / "sub.csv"), "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    assert len(pd.read_csv(tmp / "sub.csv")) == 6 * 12
    flat = make_build(tmp / "flat", folds=2, per_shard=16, size=32)  # no series columns
    assert main(["fit", *common[:1], str(flat), *common[2:], "--out", str(tmp / "x"), "--context", "1"]) == 2  # fmt: skip
    assert "series-aware build" in one_error_line(capsys, "fit") and not (tmp / "x").exists()
    # the checkpoint's context is its own: evaluate and predict refuse a build that cannot stack
    ev = ["evaluate", "--checkpoint", str(tmp / "ctx" / "last.pt"), "--shards", str(flat), "--fold", "1",
          "--workers", "0", "--no-progress", "--no-report"]  # fmt: skip
    assert main(ev) == 2 and "series-aware build" in one_error_line(capsys, "evaluate")
    flat_test = make_build(tmp / "flat_test", test=True, per_shard=8, size=32)
    pr = ["predict", "--checkpoint", str(tmp / "ctx" / "last.pt"), "--shards", str(flat_test),
          "--out", str(tmp / "flat.csv"), "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(pr) == 2 and "series-aware build" in one_error_line(capsys, "predict")
    assert not (tmp / "flat.csv").exists()
