"""`ich-prep preview`: a contact sheet of decoded samples, filtered by label and fold."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from ich_prep.cli import main
from ich_prep.manifest import open_build
from ich_prep.preview import GAP, MAX_PANEL, PreviewError, candidates, check_size, collect, tile
from ich_prep.shards import decode_image
from tests.sharing_fixtures import build_synthetic, shard_members


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("preview"))


@pytest.fixture(scope="module")
def index(built):
    return pd.read_parquet(built / "index.parquet")


def test_cli_writes_a_png(built, tmp_path, capsys):
    """--n 8 --out grid.png writes a PNG that decodes, and says how many samples it shows."""
    out = tmp_path / "grid.png"
    assert main(["preview", str(built), "--n", "8", "--out", str(out)]) == 0
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 300
    assert f"wrote {out}: 8 samples" in capsys.readouterr().out


def test_label_filter_shows_only_positives(built, index):
    """--label subdural: every sample shown is subdural-positive."""
    rows = candidates(index, label="subdural")
    got = collect(open_build(built), rows, n=64)
    assert len(got) == int((index["subdural"] == 1).sum()) > 0
    assert all(int(s["row"]["subdural"]) == 1 for s in got)


def test_fold_filter_and_n(built, index):
    """--fold 2 --n 3: three samples, all of fold 2."""
    got = collect(open_build(built), candidates(index, fold=2), n=3)
    assert len(got) == 3 and {int(s["row"]["fold"]) for s in got} == {2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_samples_come_from_every_fold(built, index, seed):
    """A build of 3 folds (several shards each): --n 3 shows one sample of each fold and --n 6 two
    of each, whatever the seed, not the first shards streamed; the seed picks which."""
    b, rows = open_build(built), candidates(index)
    assert index["fold"].nunique() == 3 and len(b.shards) > 3
    got = collect(b, rows, n=3, seed=seed)
    assert sorted(int(s["row"]["fold"]) for s in got) == [0, 1, 2]
    six = [int(s["row"]["fold"]) for s in collect(b, rows, n=6, seed=seed)]
    assert sorted(six) == [0, 0, 1, 1, 2, 2]
    other = collect(b, rows, n=6, seed=seed + 10)
    assert {s["image_id"] for s in other} != {s["image_id"] for s in collect(b, rows, n=6, seed=seed)}  # fmt: skip


def test_no_match_is_a_clear_error(built, tmp_path, capsys):
    """Filters matching nothing: exit 2 naming the filters."""
    assert main(["preview", str(built), "--fold", "7", "--out", str(tmp_path / "x.png")]) == 2
    assert "no sample matches --fold 7" in capsys.readouterr().err


def test_tile_shows_each_window_as_a_panel(built, index):
    """The three panels of a tile are the sample's three channels, left to right."""
    name, data = shard_members(built / "train-f0-00000.tar")[0]
    img = decode_image(data, "npy.gz")
    row = index.set_index("image_id").loc[name.split(".")[0]]
    t = tile({"image_id": row.name, "image": img, "row": row}, panel=64, labelled=True)
    panels = t[-64:]
    for c in range(3):
        x = c * (64 + GAP)
        assert np.array_equal(panels[:, x : x + 64, 0], img[..., c])


def test_unknown_label_is_refused(index):
    """A label outside the six is refused with the list of valid ones."""
    with pytest.raises(PreviewError, match="not one of any, epidural"):
        candidates(index, label="ischemic")


@pytest.mark.parametrize("flags", [["--panel", "0"], ["--panel", "-5"], ["--panel", "100000"],
                                   ["--n", "0"], ["--n", "-3"], ["--seed", "-1"]])  # fmt: skip
def test_out_of_range_flags_are_one_line(built, tmp_path, capsys, flags):
    """--panel 0, negative or 100000 (a 90 GB tile), --n 0 or negative, --seed -1: exit 2 with one
    line naming the flag, no traceback and no PNG written."""
    out = tmp_path / "x.png"
    assert main(["preview", str(built), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("ich-prep preview") and flags[0] in err and not out.exists()


def test_huge_n_shows_what_the_build_holds(built, tmp_path, capsys):
    """--n 100000 on a small build: every sample once (the bound counts the samples there are)."""
    out = tmp_path / "x.png"
    assert main(["preview", str(built), "--n", "100000", "--panel", "16", "--out", str(out)]) == 0
    ok = int((pd.read_parquet(built / "index.parquet")["status"] == "ok").sum())
    assert f"{ok} samples" in capsys.readouterr().out


def test_sheet_memory_is_bounded_before_reading(built):
    """The tiles, sheet and decoded images of --n samples at --panel must fit MAX_SHEET_BYTES:
    refused from the flags and the layout alone."""
    layout = open_build(built).layout
    check_size(64, 96, layout)
    check_size(40, MAX_PANEL, layout)
    for n, panel in ((100_000, 96), (60, MAX_PANEL)):
        with pytest.raises(PreviewError, match="lower --n or --panel"):
            check_size(n, panel, layout)


def test_tile_has_a_panel_per_channel(index):
    """A layout of 2 channels makes 2 panels (tile follows the image, not an assumed 3)."""
    row = index[index["status"] == "ok"].set_index("image_id").iloc[0]
    img = np.zeros((32, 32, 2), np.uint8)
    t = tile({"image_id": row.name, "image": img, "row": row}, panel=32, labelled=True)
    assert t.shape[1] == 2 * 32 + GAP


def test_series_strip_shows_one_series_in_slice_order(built, index, tmp_path, capsys):
    """--series ID: one column per slice in slice_rank order, one row per window; each panel is
    that slice's window, resized; --series with --label, or an unknown series, is one line."""
    from ich_prep.preview import LINE_H, series_strip

    ok = index[index["status"] == "ok"]
    sid = ok.groupby("series_id")["image_id"].count().idxmax()
    rows = ok[ok["series_id"] == sid].sort_values("slice_rank")
    assert len(rows) >= 3
    out = tmp_path / "strip.png"
    assert main(["preview", str(built), "--series", sid, "--panel", "32", "--out", str(out)]) == 0
    assert f"wrote {out}: {len(rows)} samples" in capsys.readouterr().out
    b = open_build(built)
    cfg = b.config
    got = {s["image_id"]: s for s in collect(b, rows, len(rows))}
    samples = [got[i] for i in rows["image_id"]]
    sheet = series_strip(samples, cfg.windows, 32, "")
    png = cv2.imread(str(out))  # the CLI's strip: the same below its title line
    assert png.shape[1] == sheet.shape[1] and np.array_equal(
        png[-(sheet.shape[0] - 8) :], sheet[8:]
    )
    top, head, pad = 8, LINE_H * 2 + 4, 4
    label_w = max(60, 7 * max(len(w.name) for w in cfg.windows))
    for j, s in enumerate(samples):  # column j is the slice of rank j
        assert int(s["row"]["slice_rank"]) == j
        for c in range(3):
            y, x = top + head + c * (32 + GAP), pad + label_w + j * (32 + GAP)
            want = cv2.resize(s["image"][..., c], (32, 32), interpolation=cv2.INTER_AREA)
            assert np.array_equal(sheet[y : y + 32, x : x + 32, 0], want)
    for argv, says in (
        (["--series", sid, "--label", "any"], "--series draws one whole series: drop --label and --fold"),
        (["--series", "ID_nope"], "--series 'ID_nope': no readable slice of that series"),
    ):  # fmt: skip
        assert main(["preview", str(built), *argv, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
