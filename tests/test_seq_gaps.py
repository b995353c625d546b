"""The sequence stage sees the series' real geometry (issue 20, item 3): `embed` carries each
slice's slice_position, and a missing slice is a gap to the sequence model as it is to --context
(split.neighbour_ranks' 1.5x rule), through real builds, a real CNN fit and real embeddings. Files
without positions still train, on slice ranks, with a warning; checkpoints record which."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_train.cli import main
from ich_train.config import TrainConfig
from ich_train.embed import embed
from ich_train.seq_data import SLICE_EXTRA, as_positions, collate, read_embeddings
from ich_train.train import fit as cnn_fit
from tests.conftest import csv_rows, write_hu
from tests.test_context_gaps import _slice
from tests.test_train_cli_errors import one_error_line

Z = (0, 5, 10, 15, 20, 25, 30)  # mm; slice 3 (15 mm) of series 1 is the one left out


@pytest.fixture(scope="module")
def gap_runs(tmp_path_factory):
    """Two patients of one 7-slice series each (z = 0..30 mm), built twice: with every label,
    and with series 1's 15 mm slice lacking its label rows (left out: the gap). One CNN fitted on
    the full build (validated on fold 0) embeds both builds."""
    tmp = tmp_path_factory.mktemp("seq_gaps")
    d, lines = tmp / "dicom", {}
    for p in (1, 2):
        for k, z in enumerate(Z):
            image_id = f"ID_p{p}z{z:02d}"
            write_hu(d / f"{image_id}.dcm", _slice(k + 10 * p), z=float(z), series=f"ID_se{p}", patient=f"ID_p{p}")  # fmt: skip
            lines[image_id] = csv_rows(image_id, {"any": int(k in (2, 3, 4)), "subdural": int(k in (2, 3, 4))})  # fmt: skip
    roots = {}
    for name, gone in (("full", None), ("gap", "ID_p1z15")):
        rows = [r for i, rs in lines.items() if i != gone for r in rs]
        (tmp / f"{name}.csv").write_text("ID,Label\n" + "\n".join(rows) + "\n")
        cfg = BuildConfig(dicom_dir=str(d), labels=str(tmp / f"{name}.csv"), size=32, folds=2)
        build(cfg, tmp / name, jobs=1, progress=False)
        roots[name] = tmp / name
    cnn_fit(TrainConfig(shards=str(roots["full"]), out=str(tmp / "cnn"), model="resnet10t", image_size=32,
                        batch_size=4, epochs=1, workers=0, progress=False, valid_fold=0))  # fmt: skip
    ckpt = str(tmp / "cnn" / "last.pt")
    for name, root in roots.items():
        embed([ckpt], str(root), str(tmp / f"{name}.parquet"), workers=0, progress=False)
    return tmp


def _inputs(path, series_id: str, positions: str = "mm") -> dict[str, np.ndarray]:
    series = as_positions([s for s in read_embeddings(str(path))[0] if s.series_id == series_id], positions, "test")  # fmt: skip
    x = collate(series)["x"][0].numpy()
    return dict(zip(series[0].ids, x, strict=True))


def test_a_missing_slice_is_a_gap_to_the_sequence_model(gap_runs):
    """Series 1 without its 15 mm slice: the 10 and 20 mm slices' inputs differ from the full
    series' (no neighbour difference across the gap, the gap reads 2 median spacings), every other
    slice's are the same (features, differences, position in mm, gaps). Before (slice ranks, as
    an embeddings file without positions gives): the 20 mm slice was the 10 mm one's next."""
    frame = pd.read_parquet(gap_runs / "gap.parquet").set_index("image_id")
    assert frame.loc["ID_p1z20", "slice_position"] == 20.0 and "ID_p1z15" not in frame.index
    full = _inputs(gap_runs / "full.parquet", "ID_se1")
    gap = _inputs(gap_runs / "gap.parquet", "ID_se1")
    d = (len(gap["ID_p1z10"]) - SLICE_EXTRA) // 3
    assert set(full) - set(gap) == {"ID_p1z15"}
    for image_id in ("ID_p1z00", "ID_p1z05", "ID_p1z25", "ID_p1z30"):
        np.testing.assert_allclose(gap[image_id], full[image_id], atol=1e-3, err_msg=image_id)
    before, after = gap["ID_p1z10"], gap["ID_p1z20"]
    assert not np.abs(before[2 * d : 3 * d]).any() and not np.abs(after[d : 2 * d]).any()
    assert np.abs(full["ID_p1z10"][2 * d : 3 * d]).any()
    assert before[-1] == 2.0 and after[-2] == 2.0 and full["ID_p1z10"][-1] == 1.0
    assert after[-3] == pytest.approx(20 / 30) == full["ID_p1z20"][-3]
    by_rank = _inputs(gap_runs / "gap.parquet", "ID_se1", "rank")
    assert by_rank["ID_p1z10"][-1] == 1.0 and np.abs(by_rank["ID_p1z10"][2 * d : 3 * d]).any()
    other, other_full = (_inputs(gap_runs / f"{b}.parquet", "ID_se2") for b in ("gap", "full"))
    np.testing.assert_allclose(np.stack(list(other.values())), np.stack(list(other_full.values())), atol=1e-3)  # fmt: skip


def test_checkpoints_record_their_positions_and_files_without_them_warn(gap_runs, tmp_path, capsys):  # fmt: skip
    """seq fit records the inputs it used (layout, positions 'mm'); an embeddings file without
    slice_position (written before it) still trains, on slice ranks, with one warning on stderr,
    and records 'rank'; the mm model refuses that file in one line, the rank model takes the mm
    file (its positions dropped, as it learned); a checkpoint from before slice spacing is one line."""
    mm = gap_runs / "gap.parquet"
    old = tmp_path / "old.parquet"
    pq.write_table(pq.read_table(mm).drop(["slice_position"]), old)
    fit = ["--valid-fold", "0", "--epochs", "1", "--hidden", "8", "--protocol", "per-cnn"]
    assert main(["seq", "fit", "--features", str(mm), "--out", str(tmp_path / "mm"), *fit]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["seq", "fit", "--features", str(old), "--out", str(tmp_path / "rank"), *fit]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --features") and "slice ranks" in err[0]
    for run, positions in (("mm", "mm"), ("rank", "rank")):
        ck = torch.load(tmp_path / run / "best.pt", weights_only=True)
        assert ck["slice_inputs"] == {"layout": "f,f-prev,f-next,logits,position,gap_prev,gap_next", "positions": positions}  # fmt: skip
    ev = ["seq", "evaluate", "--fold", "0"]
    assert main([*ev, "--checkpoint", str(tmp_path / "mm" / "best.pt"), "--features", str(old), "--out", str(tmp_path / "a.parquet")]) == 2  # fmt: skip
    assert "has no slice positions" in one_error_line(capsys, "seq evaluate")
    assert main([*ev, "--checkpoint", str(tmp_path / "rank" / "best.pt"), "--features", str(mm), "--out", str(tmp_path / "b.parquet")]) == 0  # fmt: skip
    capsys.readouterr()
    ck = torch.load(tmp_path / "mm" / "best.pt", weights_only=True)
    torch.save({k: v for k, v in ck.items() if k != "slice_inputs"}, tmp_path / "older.pt")
    assert main([*ev, "--checkpoint", str(tmp_path / "older.pt"), "--features", str(mm), "--out", str(tmp_path / "c.parquet")]) == 2  # fmt: skip
    assert "trained on other per-slice inputs" in one_error_line(capsys, "seq evaluate")
