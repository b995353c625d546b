"""--context K over real builds: a missing slice is a gap (the stack repeats the slice, as at the
series' end), and a slice at a tied position is never stacked with its twin (issue 20, items 3-4).
Builds without slice_position (older ones) keep stacking by rank: tests/test_context.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.info import format_info, info
from ich_prep.split import neighbour_ranks
from ich_train.context import Context, series_positions
from ich_train.data import Build, EvalStream
from tests.conftest import csv_rows, phantom_hu, write_hu


def test_neighbour_ranks_by_hand():
    """Ranks of each stack: clamped by rank without positions (as before); a step > 1.5x the
    median spacing ends the series there; tied positions are one place, a twin never a neighbour."""
    assert neighbour_ranks(3, 1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]
    gap = neighbour_ranks(5, 1, [0.0, 5.0, 10.0, 20.0, 25.0])
    assert gap.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 4], [3, 4, 4]]
    assert neighbour_ranks(5, 2, [0.0, 5.0, 10.0, 15.0, 40.0])[3].tolist() == [1, 2, 3, 3, 3]
    tied = neighbour_ranks(6, 1, [0.0, 5.0, 5.0, 10.0, 15.0, 15.0])
    assert tied.tolist() == [[0, 0, 1], [0, 1, 3], [0, 2, 3], [1, 3, 4], [3, 4, 4], [3, 5, 5]]
    assert neighbour_ranks(3, 1, [0.0, 1e-4, 2e-4]).tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    assert neighbour_ranks(1, 2, [7.0]).tolist() == [[0, 0, 0, 0, 0]]


def _slice(k: int) -> np.ndarray:
    """A head whose brain HU encodes k, so each slice's image differs."""
    hu = phantom_hu(64)
    hu[hu == 40.0] = 5.0 + 7.0 * k
    return hu


@pytest.fixture(scope="module")
def gap_build(tmp_path_factory) -> Path:
    """One series: z = 0, 5, 10, 15, 20, 25, 30 mm where the 15 mm slice has no label row (an
    error row: the gap), plus a slice at 20 mm twice (two images, one position)."""
    tmp = tmp_path_factory.mktemp("gaps")
    d, lines = tmp / "d", []
    z = {"ID_s0": 0, "ID_s1": 5, "ID_s2": 10, "ID_gone": 15, "ID_s4": 20, "ID_twin": 20, "ID_s5": 25, "ID_s6": 30}  # fmt: skip
    for k, (image_id, pos) in enumerate(z.items()):
        write_hu(d / f"{image_id}.dcm", _slice(k), z=float(pos), series="ID_se1", patient="ID_p1")
        if image_id != "ID_gone":
            lines += csv_rows(image_id)
    (tmp / "labels.csv").write_text("ID,Label\n" + "\n".join(lines) + "\n")
    cfg = BuildConfig(dicom_dir=str(d), labels=str(tmp / "labels.csv"), size=32, folds=2)
    build(cfg, tmp / "out", jobs=1, progress=False)
    return tmp / "out"


def _stacks(root: Path, k: int):
    b = Build(str(root))
    alone = {i: im for x in EvalStream(b.shards, b.encoding, 64) for i, im in zip(x["id"], x["image"].numpy(), strict=True)}  # fmt: skip
    ctx = Context(k)
    stacks = {i: im for x in EvalStream(b.shards, b.encoding, 64, context=ctx, positions=series_positions(b.ok)) for i, im in zip(x["id"], x["image"].numpy(), strict=True)}  # fmt: skip
    return alone, stacks


def _of(alone: dict, *ids: str) -> np.ndarray:
    return np.concatenate([alone[i] for i in ids], -1)


def test_a_missing_slice_is_a_gap_not_a_neighbour(gap_build):
    """The 10 mm slice's next neighbour is not the 20 mm one (10 mm on, twice the series' median
    spacing): the slice is repeated, as at the series' end; likewise the 20 mm slices' previous."""
    alone, stacks = _stacks(gap_build, 1)
    assert set(alone) == {"ID_s0", "ID_s1", "ID_s2", "ID_s4", "ID_twin", "ID_s5", "ID_s6"}
    assert np.array_equal(stacks["ID_s1"], _of(alone, "ID_s0", "ID_s1", "ID_s2"))
    assert np.array_equal(stacks["ID_s2"], _of(alone, "ID_s1", "ID_s2", "ID_s2"))
    assert np.array_equal(stacks["ID_s5"][..., 3:], _of(alone, "ID_s5", "ID_s6"))
    alone2, stacks2 = _stacks(gap_build, 2)
    assert np.array_equal(stacks2["ID_s1"], _of(alone2, "ID_s0", "ID_s0", "ID_s1", "ID_s2", "ID_s2"))  # fmt: skip


def test_tied_positions_are_never_stacked_together(gap_build):
    """ID_s4 and ID_twin lie at 20 mm: each stack holds the slice itself, the 25 mm slice after it,
    and before it the slice itself (the 10 mm one lies beyond the gap), never the twin."""
    alone, stacks = _stacks(gap_build, 1)
    index = Build(str(gap_build)).ok.set_index("image_id")
    assert index.loc[["ID_s4", "ID_twin"], "slice_position"].tolist() == [20.0, 20.0]
    for me in ("ID_s4", "ID_twin"):
        assert np.array_equal(stacks[me], _of(alone, me, me, "ID_s5")), me
    assert np.array_equal(stacks["ID_s5"], _of(alone, "ID_s4", "ID_s5", "ID_s6"))  # lowest rank
    tied = info(gap_build)["series"]["tied"]
    assert tied == {"series": 1, "slices": 2}
    assert "tied positions: 2 slices in 1 series" in format_info(info(gap_build))


def test_an_edited_position_is_refused(gap_build):
    """slice_position is read and checked with the series columns (manifest.series_ranks): a
    missing or infinite position is one ContextError naming the column, never a stack."""
    from ich_train.context import ContextError

    ok = Build(str(gap_build)).ok
    for bad in (np.nan, np.inf):
        edited = ok.assign(slice_position=ok["slice_position"].where(ok.index != ok.index[1], bad))
        with pytest.raises(ContextError, match="slice_position holds values that are not finite"):
            series_positions(edited)
