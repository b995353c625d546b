"""`ich-prep preview`: a contact sheet of decoded samples, filtered by label and fold."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from ich_prep.cli import main
from ich_prep.manifest import load_manifest
from ich_prep.preview import GAP, PreviewError, candidates, collect, tile
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
    got = collect(str(built), load_manifest(built), rows, n=64)
    assert len(got) == int((index["subdural"] == 1).sum()) > 0
    assert all(int(s["row"]["subdural"]) == 1 for s in got)


def test_fold_filter_and_n(built, index):
    """--fold 2 --n 3: three samples, all of fold 2."""
    got = collect(str(built), load_manifest(built), candidates(index, fold=2), n=3)
    assert len(got) == 3 and {int(s["row"]["fold"]) for s in got} == {2}


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
