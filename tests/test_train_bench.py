"""`ich-train bench` runs end to end at tiny sizes on CPU."""

import re
import shutil

import pytest

from ich_prep.synth import write_synthetic
from ich_train.bench import KaggleDicomDataset
from ich_train.cli import main
from tests.train_fixtures import make_build

TINY = ["--model", "resnet10t", "--batch-size", "4", "--image-size", "32", "--steps", "2", "--warmup", "1",
        "--loader-steps", "3", "--workers", "1", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("raw"), patients=2, seed=0, quirks=False)[
        "train_dir"
    ]


def test_bench_prints_all_rates_ratios_and_decode_cost(tmp_path, capsys, dicoms):
    """With --dicom-dir: (a), (b), (c), b/a, b/c, both loaders alone and the per-image decode time."""
    shards = make_build(tmp_path, folds=2, per_shard=8, size=32)
    assert main(["bench", "--shards", str(shards), "--dicom-dir", str(dicoms), *TINY]) == 0
    out = capsys.readouterr().out
    for pattern in (r"\(a\).* [\d.]+ img/s", r"\(b\).* [\d.]+ img/s\s+b/a = [\d.]+", r"\(c\).* [\d.]+ img/s\s+b/c = [\d.]+",
                    r"shards \(b\): +[\d.]+ img/s", r"DICOMs \(c\): +[\d.]+ img/s +shards/DICOMs = [\d.]+",
                    r"decode cost .* [\d.]+ ms/image"):  # fmt: skip
        assert re.search(pattern, out), (pattern, out)


def test_bench_without_dicoms_skips_the_baseline_with_a_note(tmp_path, capsys):
    """No --dicom-dir: (c) is skipped and says how to enable it."""
    shards = make_build(tmp_path, folds=2, per_shard=8, size=32)
    assert main(["bench", "--shards", str(shards), *TINY]) == 0
    assert "(c) baseline DICOM loader: skipped (pass --dicom-dir" in capsys.readouterr().out


def test_kaggle_baseline_windows_full_size_slices_into_three_channels(dicoms):
    """The baseline loader yields float32 (3, size, size) in [0, 1] per DICOM."""
    from pathlib import Path

    files = sorted(str(p) for p in Path(dicoms).glob("*.dcm"))
    x, _ = KaggleDicomDataset(files, 48)[0]
    assert x.shape == (3, 48, 48) and x.dtype.is_floating_point
    assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_kaggle_baseline_survives_an_unreadable_dicom(tmp_path):
    """A truncated DICOM gives a black image, not a crashed benchmark."""
    bad = tmp_path / "ID_bad.dcm"
    bad.write_bytes(b"DICM" * 10)
    x, _ = KaggleDicomDataset([str(bad)], 32)[0]
    assert x.shape == (3, 32, 32) and float(x.max()) == 0.0


@pytest.mark.slow  # torch.compile: not in `make test-fast`
@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_bench_compiled_model_runs(tmp_path, capsys):
    """--compile benches the torch.compile'd model (compilation falls in the untimed warmup)."""
    shards = make_build(tmp_path, folds=2, per_shard=8, size=32)
    assert main(["bench", "--shards", str(shards), "--compile", *TINY]) == 0
    out = capsys.readouterr().out
    assert "resnet10t (compiled)" in out and re.search(r"b/a = [\d.]+", out)


def test_bench_reports_series_mixing_on_a_series_build(tmp_path, capsys):
    """A build with series: bench prints distinct series per batch and the label autocorrelation
    for a uniform shuffle, the span loader and the stream, of single slices and of --context 1
    stacks; a build without series says why not."""
    shards = make_build(tmp_path / "s", folds=2, per_shard=24, size=32, series_len=6)
    assert main(["bench", "--shards", str(shards), *TINY]) == 0
    out = capsys.readouterr().out
    plain, context = out.split("series mixing with --context 1")
    for name in ("uniform", "spans", "stream"):
        for part in (plain, context):
            assert re.search(rf"{name} +distinct series/batch +[\d.]+ \([\d.]+ of uniform\), any-label autocorrelation [+-][\d.]+", part), out  # fmt: skip
    shards = make_build(tmp_path / "p", folds=2, per_shard=8, size=32)
    assert main(["bench", "--shards", str(shards), *TINY]) == 0
    assert "series mixing: skipped (series mixing needs a labelled build whose index has series_id)" in capsys.readouterr().out  # fmt: skip
