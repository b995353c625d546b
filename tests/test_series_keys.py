"""A missing SeriesInstanceUID never merges scans (issue 23): real builds of the quoted cases, and
a property test over many generated mixtures of scans with and without the id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.info import format_info, info
from tests.conftest import phantom_hu, write_hu


def _build(dicom_dir: Path, out: Path) -> pd.DataFrame:
    cfg = BuildConfig(dicom_dir=str(dicom_dir), size=32, shard_size=50)
    build(cfg, out, jobs=1, progress=False)
    return pd.read_parquet(out / "index.parquet")


def _scan(d: Path, name: str, n: int, **kw) -> list[str]:
    """n slices 5 mm apart of one scan, image ids ID_<name>_<k>."""
    ids = [f"ID_{name}_{k}" for k in range(n)]
    for k, i in enumerate(ids):
        write_hu(d / f"{i}.dcm", phantom_hu(64), z=5.0 * k, **kw)
    return ids


def test_two_studies_of_one_patient_without_series_uid_stay_apart(tmp_path):
    """Same patient, two studies, neither with a SeriesInstanceUID: two series, each ranked on
    its own (on 926e4d8 one series '' with the slices of both interleaved by z)."""
    d = tmp_path / "d"
    a = _scan(d, "a", 3, series="", patient="ID_p1", study="ID_st1", frame="1.2.3")
    b = _scan(d, "b", 3, series="", patient="ID_p1", study="ID_st2", frame="1.2.3")
    index = _build(d, tmp_path / "out").set_index("image_id")
    assert index.loc[a, "series_id"].nunique() == 1 and index.loc[b, "series_id"].nunique() == 1
    assert index.loc[a[0], "series_id"] != index.loc[b[0], "series_id"]
    assert (index.loc[a + b, "series_id"].str.startswith("nouid-")).all()
    assert index.loc[a, "slice_rank"].tolist() == [0, 1, 2] == index.loc[b, "slice_rank"].tolist()
    assert (index.loc[a + b, "series_source"] == "derived").all()


def test_two_patients_without_series_uid_in_one_fold_stay_apart(tmp_path):
    """Two different patients without SeriesInstanceUID (nor a frame of reference) in one fold
    (a test build): never one series; with nothing to key them on, each file is its own series,
    marked `file` in the index and counted by `ich-prep info`."""
    d = tmp_path / "d"
    a = _scan(d, "a", 2, series="", patient="ID_p1", study="ID_st1")
    b = _scan(d, "b", 2, series="", patient="ID_p2", study="ID_st2")
    c = _scan(d, "c", 2, series="ID_se9", patient="ID_p3")
    out = tmp_path / "out"
    index = _build(d, out).set_index("image_id")
    assert index.loc[a + b, "series_id"].nunique() == 4
    assert (index.loc[a + b, "series_len"] == 1).all()
    assert (index.loc[a + b, "series_source"] == "file").all()
    assert (index.loc[c, "series_source"] == "uid").all() and (index.loc[c, "series_id"] == "ID_se9").all()  # fmt: skip
    got = info(out)["series"]
    assert got["without_uid"] == {"derived": 0, "file": 4}
    assert "without SeriesInstanceUID: 4 slices" in format_info(info(out))


def test_two_scans_of_one_volume_without_series_uid_split_per_file(tmp_path):
    """Two reconstructions of one volume (same patient, study, frame of reference, orientation,
    positions) without SeriesInstanceUID tie at every position: each file becomes its own series
    rather than one series of twins."""
    d = tmp_path / "d"
    a = _scan(d, "a", 3, series="", patient="ID_p1", study="ID_st1", frame="1.2.3")
    b = _scan(d, "b", 3, series="", patient="ID_p1", study="ID_st1", frame="1.2.3")
    index = _build(d, tmp_path / "out").set_index("image_id")
    assert index.loc[a + b, "series_id"].nunique() == 6
    assert (index.loc[a + b, "series_source"] == "file").all()


@pytest.mark.parametrize("seed", range(40))
def test_series_keys_never_merge_scans(seed):
    """Property: generated mixtures of scans (patients, studies, frames of reference, orientations,
    series numbers, some with and some without SeriesInstanceUID, ids missing at random, positions
    that interleave or tie): a key holds slices of two scans only when neither has a uid, they
    agree on every header that could tell them apart (patient, study, frame, normal, series
    number, the first three present) and no two of their slices share a position; a scan with its
    uid keeps it; a scan without one, alone with its headers, stays one `derived` series."""
    from ich_prep.split import series_keys

    rng = np.random.default_rng(seed)
    rows = []
    for scan in range(int(rng.integers(2, 9))):
        has_uid = rng.random() < 0.4
        pick = lambda *v: v[rng.integers(0, len(v))]  # noqa: E731
        attrs = (pick("", "ID_pA", "ID_pB"), pick("", "ID_s1", "ID_s2"), pick("", "1.1", "1.2"),
                 pick("0.000,0.000,1.000", "0.000,0.423,0.906"), pick("", "1", "2"))  # fmt: skip
        start, step = float(pick(0.0, 2.5)), float(pick(5.0, 2.5))
        for k in range(int(rng.integers(1, 6))):
            rows.append((scan, f"ID_se{scan}" if has_uid else "", *attrs, start + step * k, f"f{scan}_{k}.dcm"))  # fmt: skip
    cols = list(map(np.array, zip(*rows, strict=True)))
    scan, series, pos = cols[0], cols[1].astype(object), cols[7]
    attrs = np.array(["|".join(r[2:7]) for r in rows])
    present = np.array([all(r[2:5]) for r in rows])
    keys, source = series_keys(*cols[2:4], series, *cols[4:7], pos, cols[8])
    assert (keys[series != ""] == series[series != ""]).all()
    assert set(source) <= {"uid", "derived", "file"}
    for key in set(keys):
        m = keys == key
        if len(set(scan[m])) > 1:
            assert (series[m] == "").all() and len(set(attrs[m])) == 1 and present[m].all(), rows
            assert len(set(pos[m])) == m.sum(), rows
    for s in set(scan[series == ""]):
        m = scan == s
        group = (attrs == attrs[m][0]) & (series == "")
        if present[m][0] and (group == m).all() and len(set(pos[m])) == m.sum():
            assert len(set(keys[m])) == 1 and (source[m] == "derived").all()


def test_real_samples_keep_their_series_uids(real_samples, tmp_path):
    """On the 109 real slices every series key is its SeriesInstanceUID, and no slice has a tied
    position (pydicom finds no repeated ImagePositionPatient among them either): `ich-prep info`
    reports zeros, never a false fallback."""
    out = tmp_path / "out"
    build(BuildConfig(dicom_dir=str(real_samples), size=32, shard_size=50), out, jobs=2, progress=False)  # fmt: skip
    assert info(out)["series"] == {"without_uid": {"derived": 0, "file": 0}, "tied": {"series": 0, "slices": 0}}  # fmt: skip
    index = pd.read_parquet(out / "index.parquet")
    ok = index[index["status"] == "ok"]
    assert (ok["series_source"] == "uid").all() and not ok["series_id"].str.startswith("nouid-").any()  # fmt: skip
