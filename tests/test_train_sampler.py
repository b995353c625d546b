"""--sampler balanced --pos-fraction F: each epoch draws F of its images positive for `any` from a
build whose natural share is far from F, deterministically from (seed, epoch), through the span
loader, with equal disjoint shares per rank, the same remaining batches after a resume, and fit
end to end."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

import ich_train.train as train_mod
from ich_train.checkpoint import load_checkpoint
from ich_train.cli import main
from ich_train.config import ConfigError, TrainConfig
from ich_train.data import Build, SpanStream, create_loader, create_train_stream
from ich_train.sampler import balanced_epoch, draw
from ich_train.train import fit
from tests.train_fixtures import deadline, make_build

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rare(tmp_path_factory):
    """2 folds x 2 shards of 60 images, about 15% positive for `any`."""
    return make_build(tmp_path_factory.mktemp("rare") / "b", folds=2, per_shard=60,
                      shards_per_fold=2, size=16, positive_rate=0.15, seed=2)  # fmt: skip


def _stream(b, batch, batches, *, fraction=0.5, rank=0, world=1, seed=0) -> SpanStream:
    return SpanStream(b.select([0]), b.encoding, batch, batches, rank=rank, world=world, seed=seed, pos_fraction=fraction)  # fmt: skip


def _batches(ds, workers=0) -> list[dict]:
    with deadline(120):
        return list(create_loader(ds, workers, CPU))


def test_fixture_is_far_from_balanced(rare):
    share = Build(rare).labels([0])[:, 0].mean()
    assert 0.08 < share < 0.25, share


@pytest.mark.parametrize(("n", "fraction"), [(120, 0.5), (400, 0.5), (120, 0.3), (50, 0.7)])
def test_a_balanced_epoch_draws_the_target_share(rare, n, fraction):
    """round(F n) positives, each drawn floor or ceil of its average (oversampling), negatives
    without replacement while there are enough (undersampling), from the index alone."""
    positive = _stream(Build(rare), 4, 1).positive
    order = balanced_epoch(positive, n, fraction, seed=0, epoch=0)
    assert len(order) == n and positive[order].sum() == round(fraction * n)
    pos_counts = Counter(order[positive[order]].tolist()).values()
    k = round(fraction * n)
    assert set(pos_counts) <= {k // positive.sum(), -(-k // positive.sum())}
    neg = Counter(order[~positive[order]].tolist())
    if n - k <= (~positive).sum():
        assert max(neg.values()) == 1


def test_draw_spreads_repeats_evenly():
    rng = np.random.default_rng(0)
    pool = np.arange(7)
    assert sorted(Counter(draw(pool, 23, rng).tolist()).values()) == [3] * 5 + [4] * 2
    assert len(set(draw(pool, 5, rng).tolist())) == 5
    assert draw(pool, 0, rng).size == 0


def test_balanced_epochs_are_seeded_and_change_every_epoch(rare):
    positive = _stream(Build(rare), 4, 1).positive
    a = balanced_epoch(positive, 200, 0.5, seed=1, epoch=3)
    assert np.array_equal(a, balanced_epoch(positive, 200, 0.5, seed=1, epoch=3))
    assert not np.array_equal(a, balanced_epoch(positive, 200, 0.5, seed=1, epoch=4))
    assert not np.array_equal(a, balanced_epoch(positive, 200, 0.5, seed=2, epoch=3))


def test_the_loader_yields_the_drawn_share(rare):
    """What the loader yields over an epoch is the drawn multiset, its labels 50% positive
    (natural share about 15%); each image keeps its own label."""
    b = Build(rare)
    ds = _stream(b, 6, 20)  # 120 draws
    ds.set_epoch(1)
    batches = _batches(ds, workers=2)
    ids = [i for x in batches for i in x["id"]]
    labels = torch.cat([x["label"] for x in batches])
    assert len(batches) == 20 and abs(labels[:, 0].mean().item() - 0.5) < 0.03
    assert ids == [ds.items[j][1] for j in ds.epoch_order(1)]
    index = b.ok.set_index("image_id")["any"]
    assert [int(index[i]) for i in ids] == labels[:, 0].int().tolist()


def test_two_ranks_get_equal_batches_and_disjoint_shares_of_the_multiset(rare):
    """2 ranks x 2 workers: the same number of batches each, and together exactly the epoch's
    multiset (every draw once, repeats included); with 3 workers per rank too."""
    b = Build(rare)
    for workers in (2, 3):
        per_rank = []
        for rank in range(2):
            ds = _stream(b, 4, 10, rank=rank, world=2, seed=5)
            ds.set_epoch(2)
            per_rank.append([i for x in _batches(ds, workers) for i in x["id"]])
        assert [len(r) for r in per_rank] == [40, 40]
        want = Counter(ds.items[j][1] for j in ds.epoch_order(2))
        assert Counter(per_rank[0]) + Counter(per_rank[1]) == want
        positive = dict(zip(b.ok["image_id"], b.ok["any"].astype(int), strict=True))
        share = sum(positive[i] for r in per_rank for i in r) / 80
        assert share == 0.5


@pytest.mark.parametrize(("workers", "skip"), [(0, 7), (2, 7), (2, 4), (3, 5)])
def test_resuming_inside_an_epoch_yields_the_remaining_batches(rare, workers, skip):
    """set_epoch(e, skip=k): exactly the batches after the first k of an uninterrupted epoch."""
    b = Build(rare)

    def ids(skip):
        ds = _stream(b, 5, 12, seed=4)
        ds.set_epoch(2, skip=skip)
        return [x["id"] for x in _batches(ds, workers)]

    full = ids(0)
    assert ids(skip) == full[skip:]
    assert len(full) == 12


def test_balanced_needs_the_span_loader_and_labels(rare, tmp_path):
    """--loader stream, a build without spans, or a test build: one clear ConfigError each."""
    b = Build(rare)
    kw = dict(rank=0, world=1, seed=0, shuffle_buffer=8, pos_fraction=0.5)
    assert type(create_train_stream("auto", b.select([0]), b.encoding, 4, 2, **kw)) is SpanStream
    with pytest.raises(ConfigError, match="--loader stream reads whole shards"):
        create_train_stream("stream", b.select([0]), b.encoding, 4, 2, **kw)
    plain = Build(make_build(tmp_path / "plain", folds=2, per_shard=8, size=16, extra={"x": b"1"}))
    with pytest.raises(ConfigError, match="records no sample spans"):
        create_train_stream("auto", plain.select([0]), plain.encoding, 4, 2, **kw)
    test = Build(make_build(tmp_path / "test", test=True, per_shard=8, size=16))
    with pytest.raises(ConfigError, match="needs the index's labels"):
        create_train_stream("auto", test.select(None), test.encoding, 4, 2, **kw)
    none = Build(make_build(tmp_path / "neg", folds=2, per_shard=8, size=16, positive_rate=0))
    with pytest.raises(ConfigError, match="no positive"):
        create_train_stream("auto", none.select([0]), none.encoding, 4, 2, **kw)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--sampler", "balanced"], "needs --pos-fraction"),
        (["--sampler", "balanced", "--pos-fraction", "0"], "--pos-fraction must be a number in (0, 1)"),
        (["--sampler", "balanced", "--pos-fraction", "1"], "--pos-fraction must be a number in (0, 1)"),
        (["--sampler", "balanced", "--pos-fraction", "nan"], "--pos-fraction must be"),
        (["--pos-fraction", "0.5"], "only applies with --sampler balanced"),
        (["--sampler", "balanced", "--pos-fraction", "0.5", "--loader", "stream"], "cannot run with --loader stream"),
        (["--sampler", "balanced", "--pos-fraction", "0.5", "--context", "1"], "--sampler balanced draws single images any number of times: drop one"),
        (["--sampler", "uniform"], "invalid choice"),
    ],
)  # fmt: skip
def test_sampler_flags_are_checked_in_one_line(tmp_path, capsys, extra, says):
    argv = ["fit", "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_fit_balanced_on_a_build_without_spans_stops_before_writing(tmp_path, capsys):
    """A build whose index records no spans: one line naming the cause, exit 2, no run folder."""
    plain = make_build(tmp_path / "plain", folds=2, per_shard=8, size=16, extra={"x": b"1"})
    argv = ["fit", "--shards", str(plain), "--out", str(tmp_path / "r"), "--valid-fold", "1",
            "--model", "resnet10t", "--batch-size", "4", "--sampler", "balanced", "--pos-fraction", "0.5"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "records no sample spans" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


BALANCED = dict(model="resnet10t", image_size=16, batch_size=8, workers=0, progress=False,
                valid_fold=1, epochs=1, lr=1e-3, sampler="balanced", pos_fraction=0.5)  # fmt: skip


def test_fit_balanced_trains_an_epoch_and_logs_the_share(rare, tmp_path):
    """`ich-train fit --sampler balanced --pos-fraction 0.5`: one short CPU epoch; the run says
    the share drawn (printed and in metrics.csv) and records the sampler in its config."""
    out = tmp_path / "run"
    buf = io.StringIO()
    argv = ["fit", "--shards", str(rare), "--out", str(out), "--model", "resnet10t", "--image-size", "16",
            "--batch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress", "--valid-fold", "1",
            "--sampler", "balanced", "--pos-fraction", "0.5", "--epoch-samples", "64"]  # fmt: skip
    with contextlib.redirect_stdout(buf), deadline(240):
        assert main(argv) == 0
    text = buf.getvalue()
    assert "sampler balanced: each epoch draws 64 images, 32 positive for 'any' (50.0%" in text
    assert "drew 50.0% 'any'" in text
    m = pd.read_csv(out / "metrics.csv")
    assert list(m["train_images"]) == [64] and list(m["train_any_share"]) == [0.5]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["sampler"], cfg["pos_fraction"]) == ("balanced", 0.5)


class Preempted(Exception):
    pass


def test_fit_balanced_resumed_inside_an_epoch_equals_an_uninterrupted_run(rare, tmp_path):
    """Stopped after step 3 of 7 (last.pt saved inside the epoch), then --resume: the same
    weights, step count and drawn share as a straight run."""
    cfg = dict(BALANCED, shards=str(rare), checkpoint_every=1, epoch_samples=56)
    with deadline(300):
        fit(TrainConfig(out=str(tmp_path / "straight"), **cfg))
        real = train_mod.train_one_epoch

        def stop_after_step_3(*a, **kw):
            def save_then_stop(progress, _save=kw["on_checkpoint"]):
                _save(progress)
                if progress["step"] == 3:
                    raise Preempted

            return real(*a, **{**kw, "on_checkpoint": save_then_stop})

        mp = pytest.MonkeyPatch()
        try:
            mp.setattr(train_mod, "train_one_epoch", stop_after_step_3)
            with pytest.raises(Preempted):
                fit(TrainConfig(out=str(tmp_path / "resumed"), **cfg))
        finally:
            mp.undo()
        assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch_progress"]["step"] == 3
        with pytest.raises(ConfigError, match="--pos-fraction: run has 0.5, now 0.25"):
            fit(TrainConfig(out=str(tmp_path / "resumed"), **{**cfg, "pos_fraction": 0.25}), resume=True)  # fmt: skip
        fit(TrainConfig(out=str(tmp_path / "resumed"), **cfg), resume=True)
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 7
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma, mb = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("straight", "resumed"))
    assert list(ma["train_any_share"]) == list(mb["train_any_share"]) == [0.5]


@pytest.mark.slow  # a real torchrun: not in `make test-fast`
def test_two_gloo_ranks_under_torchrun_draw_the_target_share(rare, tmp_path):
    """A real 2-process torchrun (gloo, CPU): both ranks train the same steps and, summed over
    them (metrics.csv), the epoch's images are exactly 50% positive."""
    import subprocess

    from tests.test_train_ddp import ENV, _torchrun

    out = tmp_path / "ddp"
    cmd = _torchrun(rare, out, "--epochs", "1", "--workers", "0", "--checkpoint-every", "0",
                    "--image-size", "16", "--epoch-samples", "48", "--sampler", "balanced",
                    "--pos-fraction", "0.5")  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = pd.read_csv(out / "metrics.csv")
    assert list(m["step"]) == [6] and list(m["train_images"]) == [48]
    assert list(m["train_any_share"]) == [0.5]
    assert proc.stdout.count("sampler balanced: each epoch draws 48 images, 24 positive") == 1


# ---- hostile flags (found by trying them; part of issue 14)


def test_an_epoch_too_large_to_draw_is_refused_before_drawing():
    """Before: --epoch-samples 10**13 with --sampler balanced made every loader process draw 10**13
    indices: memory exhausted, the machine's other jobs with it. Now a ConfigError naming the
    flag, before an index is drawn."""
    from ich_train.sampler import MAX_DRAWS, positives_drawn

    with pytest.raises(ConfigError, match="lower --epoch-samples"):
        positives_drawn(10**13, 0.5)
    positive = np.array([True, False] * 4)
    with pytest.raises(ConfigError, match=f"more than the {MAX_DRAWS}"):
        balanced_epoch(positive, MAX_DRAWS + 1, 0.5, seed=0, epoch=0)


@pytest.mark.parametrize(("n", "fraction", "k"), [(32, 0.001, 0), (32, 0.999, 32), (10, 1e-300, 0)])
def test_a_fraction_that_rounds_to_one_class_is_refused(n, fraction, k):
    """Before: --pos-fraction 0.001 (or 1e-300) passed the (0, 1) check but an epoch of 32 images
    drew 0 positives (0.999: 32 of 32), and fit trained on one class (exit 0)."""
    with pytest.raises(ConfigError, match=f"{k} of an epoch's {n} images would be positive"):
        balanced_epoch(np.array([True, False] * 8), n, fraction, seed=0, epoch=0)


def test_fit_with_a_fraction_of_one_class_stops_before_training(rare, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["fit", "--shards", str(rare), "--out", str(out), "--model", "resnet10t", "--image-size", "16",
            "--batch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress", "--valid-fold", "1",
            "--sampler", "balanced", "--pos-fraction", "0.001", "--epoch-samples", "32"]  # fmt: skip
    with deadline(120):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "0 of an epoch's 32 images would be positive" in err and len(err.strip().splitlines()) == 1, err  # fmt: skip
    assert not out.exists()  # refused in load_data, before config.json is written


def test_balanced_runs_record_the_prior_correction_and_evaluate_applies_it(rare, tmp_path, capsys):
    """A `--sampler balanced --pos-fraction 0.5` run records the prior correction, which equals the
    hand-computed log-odds shift logit(natural) - logit(drawn) per label (drawn: 32 of 64 draws
    positive for `any`, a subtype at that times its share among the positives); evaluate adds it
    to every logit, so the corrected mean prediction of `any` is closer to the natural prevalence
    than the uncorrected one; `--no-prior-correction` leaves the logits as trained."""
    from ich_prep import LABELS

    out = tmp_path / "run"
    argv = ["fit", "--shards", str(rare), "--out", str(out), "--model", "resnet10t", "--image-size", "16",
            "--batch-size", "8", "--epochs", "2", "--workers", "0", "--no-progress", "--valid-fold", "1",
            "--sampler", "balanced", "--pos-fraction", "0.5", "--epoch-samples", "64", "--no-report"]  # fmt: skip
    with deadline(300):
        assert main(argv) == 0
    assert "prior correction: validation, evaluate and predict add" in capsys.readouterr().out

    y = Build(rare).labels([0]).astype(float)

    def logit(p):
        p = np.clip(p, 1e-4, 1 - 1e-4)
        return np.log(p / (1 - p))

    natural, drawn = y.mean(0), 32 / 64 * y[y[:, 0] == 1].mean(0)
    assert drawn[0] == 0.5 and natural[0] < 0.25
    shift = load_checkpoint(out / "best.pt")["logit_adjustment"]
    np.testing.assert_allclose(shift, logit(natural) - logit(drawn), rtol=1e-12)
    assert shift[0] == pytest.approx(np.log(natural[0] / (1 - natural[0])))  # logit(0.5) = 0

    preds = {}
    for name, extra in (("on", []), ("off", ["--no-prior-correction"])):
        args = ["evaluate", "--checkpoint", str(out / "best.pt"), "--shards", str(rare), "--fold", "1",
                "--out", str(tmp_path / f"{name}.parquet"), "--no-report", "--workers", "0", "--no-progress"]  # fmt: skip
        assert main(args + extra) == 0
        m = json.loads(capsys.readouterr().out)
        assert m["prior_correction"] == (shift if name == "on" else None)
        frame = pd.read_parquet(tmp_path / f"{name}.parquet").sort_values("image_id")
        preds[name] = frame[[f"pred_{k}" for k in LABELS]].to_numpy()
    np.testing.assert_allclose(logit(preds["on"]) - logit(preds["off"]), np.broadcast_to(shift, preds["on"].shape), atol=2e-3)  # fmt: skip
    valid_any = Build(rare).labels([1])[:, 0].mean()
    assert abs(preds["on"][:, 0].mean() - valid_any) < abs(preds["off"][:, 0].mean() - valid_any)
    assert preds["off"][:, 0].mean() > 0.3  # trained at 50%: inflated without the correction


def test_no_prior_correction_with_seq_is_one_line(tmp_path, capsys):
    """`predict --seq --no-prior-correction` would silently do nothing (the sequence stage reads
    the logits embed wrote): one line, exit 2, before any file is read."""
    args = ["predict", "--checkpoint", str(tmp_path / "a.pt"), "--seq", str(tmp_path / "s.pt"),
            "--shards", str(tmp_path), "--out", str(tmp_path / "s.csv"), "--no-prior-correction"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-prior-correction" in err and "--seq" in err
