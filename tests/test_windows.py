"""Builds of 1 to 8 windows: the layout is data (one channel per window), and every reader follows
it: verify, preview, stock webdataset, the trainer (in_chans from the layout)."""

from __future__ import annotations

import glob
import json

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from ich_prep.build import build
from ich_prep.cli import main as prep
from ich_prep.config import BuildConfig, parse_windows
from ich_prep.shards import declared_dims, decode_image
from ich_train.cli import main as train
from ich_train.data import Build, EvalStream
from tests.conftest import make_dataset


def _build(dicom_dir, labels, out, windows: str, encoding: str = "npy.gz"):
    cfg = BuildConfig(dicom_dir=str(dicom_dir), labels=str(labels), size=48, shard_size=8, folds=2,
                      windows=parse_windows(windows), encoding=encoding)  # fmt: skip
    build(cfg, out, jobs=1, progress=False)
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("windows")
    dicom_dir, labels, _ = make_dataset(tmp / "data")
    specs = {
        "three": ("brain,subdural,bone", "npy.gz"),
        "one": ("brain", "npy.gz"),
        "one_png": ("brain", "png"),
        "five": ("brain,subdural,bone,soft-tissue,40/40", "npy.gz"),
    }
    return tmp, {k: _build(dicom_dir, labels, tmp / k, *v) for k, v in specs.items()}


def _images(root) -> dict[str, np.ndarray]:
    b = Build(str(root))
    return {i: img for batch in EvalStream(b.shards, b.encoding, 64) for i, img in zip(batch["id"], batch["image"].numpy(), strict=True)}  # fmt: skip


def test_each_window_is_one_channel_of_the_same_pixels(builds):
    """The manifest declares one channel per window, in order; channel i of every build is the same
    bytes as the 3-window build's channel for that window (same crop, resize and windowing)."""
    _, b = builds
    three = _images(b["three"])
    for name, n, same in (("one", 1, [0]), ("one_png", 1, [0]), ("five", 5, [0, 1, 2])):
        m = json.loads((b[name] / "manifest.json").read_text())
        assert m["image"]["channels"] == n and len(m["image"]["channel_names"]) == n
        imgs = _images(b[name])
        assert imgs.keys() == three.keys()
        for i, img in imgs.items():
            assert img.shape == (48, 48, n)
            assert np.array_equal(img[..., : len(same)], three[i][..., same]), (name, i)
    five = _images(b["five"])
    assert any(not np.array_equal(v[..., 3], v[..., 4]) for v in five.values())


def test_verify_preview_and_stock_webdataset_read_them(builds, capsys):
    tmp, b = builds
    for name in ("one", "one_png", "five"):
        assert prep(["verify", str(b[name])]) == 0, capsys.readouterr()
        assert prep(["preview", str(b[name]), "--n", "4", "--out", str(tmp / f"{name}.png")]) == 0
        assert (tmp / f"{name}.png").stat().st_size > 0
    urls = sorted(glob.glob(str(b["five"] / "*.tar")))
    shapes = {s["npy.gz"].shape for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert shapes == {(48, 48, 5)}
    urls = sorted(glob.glob(str(b["one_png"] / "*.tar")))
    shapes = {s["png"].shape for s in wds.WebDataset(urls, shardshuffle=False).decode("l8")}
    assert shapes == {(48, 48)}


def test_a_png_of_other_channels_than_the_layout_is_refused():
    """A colour png where the layout says 1 channel (or a grey one where it says 3) is refused from
    its header, not converted silently."""
    grey = cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()
    colour = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    assert declared_dims(grey, "png")[2] == 1 and declared_dims(colour, "png")[2] == 3
    assert decode_image(grey, "png", 10**6, 1).shape == (4, 4, 1)
    with pytest.raises(ValueError, match="declares 3 channels, the build's layout 1"):
        decode_image(colour, "png", 10**6, 1)
    with pytest.raises(ValueError, match="declares 1 channels, the build's layout 3"):
        decode_image(grey, "png", 10**6, 3)


@pytest.mark.parametrize("name", ["one", "five"])
def test_fit_and_evaluate_take_the_layouts_channels(builds, name, capsys):
    tmp, b = builds
    out = tmp / f"run_{name}"
    args = ["--shards", str(b[name]), "--valid-fold", "1", "--model", "resnet10t", "--image-size", "32",
            "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress"]  # fmt: skip
    assert train(["fit", *args, "--out", str(out), "--no-report"]) == 0
    ck = torch.load(out / "last.pt", weights_only=True)
    n = {"one": 1, "five": 5}[name]
    assert ck["in_chans"] == n and len(ck["normalize"]["mean"]) == n
    capsys.readouterr()
    ev = ["evaluate", "--checkpoint", str(out / "last.pt"), "--shards", str(b[name]), "--fold", "1",
          "--workers", "0", "--no-progress", "--no-report"]  # fmt: skip
    assert train(ev) == 0 and json.loads(capsys.readouterr().out)["images"] > 0
