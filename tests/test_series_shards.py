"""Series-aware shards: slice order along the slice normal, gap-free ranks, duplicate positions,
each series whole and in order in one shard, several series per shard, determinism."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.read_dicom import read_header
from tests.conftest import phantom_hu, write_hu

TILT = math.radians(25)
ROW = (1.0, 0.0, 0.0)
COL = (0.0, math.cos(TILT), -math.sin(TILT))
NORMAL = (0.0, math.sin(TILT), math.cos(TILT))  # ROW x COL


def tilted(k: float, shift: float = 0.0) -> tuple[float, float, float]:
    """ImagePositionPatient of slice k (2.5 mm apart along NORMAL), moved `shift` mm in-plane."""
    return tuple(-125 * r + (2.5 * k) * n + shift * c for r, n, c in zip(ROW, NORMAL, COL, strict=True))  # fmt: skip


def cfg(dicom_dir, labels=None, **kw) -> BuildConfig:
    kw = {"size": 32, "shard_size": 8, "folds": 2, **kw}
    return BuildConfig(
        dicom_dir=str(dicom_dir), labels=None if labels is None else str(labels), **kw
    )


def shard_samples(out: Path) -> list[tuple[str, dict]]:
    """(shard name, json) of every sample, shards by name, samples in tar order."""
    found = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for ti in tar:
                if ti.name.endswith(".json"):
                    found.append((tar_path.name, json.loads(tar.extractfile(ti).read())))
    return found


def index_of(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "index.parquet").set_index("image_id")


def check_series_layout(out: Path, shard_size: int) -> pd.DataFrame:
    """Every ok slice once; each series in exactly one shard, contiguous, ranks 0..n-1 in tar
    order matching the index; a shard over shard_size holds one series. Returns the samples."""
    index = index_of(out)
    rows = [{"shard": s, "pos": i, **m} for i, (s, m) in enumerate(shard_samples(out))]
    got = pd.DataFrame(rows)
    ok = index[index["status"] == "ok"]
    assert sorted(got["image_id"]) == sorted(ok.index)
    for series, g in got.groupby("series_id"):
        assert g["shard"].nunique() == 1, series
        assert g["pos"].diff().dropna().eq(1).all(), f"{series} is not contiguous"
        assert g["slice_rank"].tolist() == list(range(len(g))), series
        assert (np.diff(g["slice_position"]) >= 0).all(), series
        idx = ok.loc[g["image_id"]]
        assert idx["slice_rank"].tolist() == g["slice_rank"].tolist()
        assert (idx["series_len"] == len(g)).all() and (idx["shard"] == g["shard"].iloc[0]).all()
    per_shard = got.groupby("shard")["series_id"].agg(["size", "nunique"])
    assert ((per_shard["size"] <= shard_size) | (per_shard["nunique"] == 1)).all()
    return got


def test_tilted_series_is_ordered_along_the_normal_not_by_z(tmp_path):
    """A tilted-gantry series whose slices also move in-plane: z alone gives the reverse order;
    the shards and ranks follow the position along the normal."""
    d = tmp_path / "dcm"
    ids = ["ID_c3", "ID_a1", "ID_e5", "ID_b2", "ID_f6", "ID_d4"]  # k = 0..5; not id order
    for k, image_id in enumerate(ids):
        write_hu(d / f"{image_id}.dcm", phantom_hu(64), position=tilted(k, shift=6.0 * k), orientation=[*ROW, *COL])  # fmt: skip
    z = [tilted(k, shift=6.0 * k)[2] for k in range(len(ids))]
    assert (np.diff(z) < 0).all()  # z alone would order the series backwards
    out = tmp_path / "out"
    build(cfg(d), out, jobs=1, progress=False)
    got = check_series_layout(out, 8)
    assert got["image_id"].tolist() == ids
    index = index_of(out)
    assert index.loc[ids, "slice_rank"].tolist() == list(range(6))
    assert index.loc[ids, "slice_position"].to_numpy() == pytest.approx(2.5 * np.arange(6))
    assert not index["duplicate_position"].any()
    assert json.loads((out / "manifest.json").read_text())["counts"]["orientation_fallback"] == 0


def test_ties_by_instance_number_then_id_and_duplicates_marked(tmp_path):
    """Three slices at one position order by InstanceNumber (a missing one last), two without
    one by id; all five are marked duplicate_position, the others not."""
    d = tmp_path / "dcm"
    slices = [  # (id, position index k, InstanceNumber)
        ("ID_00", 0, None),
        ("ID_05", 1, 3),
        ("ID_03", 1, 1),
        ("ID_01", 1, None),
        ("ID_09", 2, None),
        ("ID_07", 2, None),
        ("ID_08", 3, 1),
    ]
    for image_id, k, inst in slices:
        write_hu(d / f"{image_id}.dcm", phantom_hu(64), position=tilted(k), orientation=[*ROW, *COL], instance=inst)  # fmt: skip
    out = tmp_path / "out"
    build(cfg(d), out, jobs=1, progress=False)
    got = check_series_layout(out, 8)
    assert got["image_id"].tolist() == ["ID_00", "ID_03", "ID_05", "ID_01", "ID_07", "ID_09", "ID_08"]  # fmt: skip
    index = index_of(out)
    dup = index["duplicate_position"]
    assert dup[dup].index.tolist() == ["ID_01", "ID_03", "ID_05", "ID_07", "ID_09"]
    assert index.loc["ID_05", "instance_number"] == 3 and pd.isna(index.loc["ID_01", "instance_number"])  # fmt: skip


def test_no_rank_gap_after_a_file_that_fails_at_compile_time(tmp_path):
    """Slices whose header reads but whose pixel data is cut fail while compiling; the others'
    ranks still run 0..n-1 with no gap (in the index and in each sample's json)."""
    d = tmp_path / "dcm"
    for k in range(6):
        p = write_hu(d / f"ID_s{k}.dcm", phantom_hu(64), position=tilted(k), orientation=[*ROW, *COL])  # fmt: skip
        if k in (0, 3):
            p.write_bytes(p.read_bytes()[:-1000])  # cut inside PixelData
            assert read_header(p)["slice_position"] == pytest.approx(2.5 * k)
    out = tmp_path / "out"
    build(cfg(d), out, jobs=1, progress=False)
    index = index_of(out)
    bad = index.loc[["ID_s0", "ID_s3"]]
    assert (bad["status"] == "error").all() and (bad["reason"] == "unreadable").all()
    assert bad[["slice_rank", "series_len", "duplicate_position"]].isna().all().all()
    good = ["ID_s1", "ID_s2", "ID_s4", "ID_s5"]
    assert index.loc[good, "slice_rank"].tolist() == [0, 1, 2, 3]
    assert (index.loc[good, "series_len"] == 4).all()
    got = check_series_layout(out, 8)
    assert got["image_id"].tolist() == good


@pytest.fixture(scope="module")
def synth_builds(tmp_path_factory):
    """A synthetic set (several series per patient for some, one truncated slice) built twice with
    one seed (1 and 2 workers) and once with another seed; and its test split."""
    from ich_prep.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    info = write_synthetic(root / "data", patients=14, seed=3, slices_per_series=5)
    outs = {}
    for name, seed, jobs in (("a", 0, 1), ("b", 0, 2), ("c", 1, 2)):
        outs[name] = root / name
        build(cfg(info["train_dir"], info["labels_csv"], shard_size=12, seed=seed), outs[name], jobs=jobs, progress=False)  # fmt: skip
    outs["test"] = root / "test"
    build(cfg(info["test_dir"], shard_size=12), outs["test"], jobs=2, progress=False)
    return info, outs


def test_synthetic_build_has_each_series_whole_in_one_shard(synth_builds):
    """Every series contiguous and in slice order in exactly one shard, in a train and a test
    build; shards hold several series of several patients; the truncated slice's series has no
    rank gap."""
    info, outs = synth_builds
    for name in ("a", "test"):
        got = check_series_layout(outs[name], 12)
        per_shard = got.groupby("shard").agg(
            series=("series_id", "nunique"), patients=("patient_id", "nunique")
        )
        assert (per_shard["series"] >= 2).sum() >= len(per_shard) // 2
        assert per_shard["patients"].max() >= 2
    index = index_of(outs["a"])
    assert (index.groupby("patient_id")["series_id"].nunique() >= 2).any()
    (corrupt,) = info["corrupt"]
    series = index.loc[corrupt, "series_id"]
    assert index.loc[corrupt, "status"] == "error" and pd.isna(index.loc[corrupt, "slice_rank"])
    rest = index[(index["series_id"] == series) & (index["status"] == "ok")]
    assert sorted(rest["slice_rank"]) == [0, 1, 2, 3] and (rest["series_len"] == 4).all()


def test_series_layout_is_deterministic_and_seeded(synth_builds):
    """Same inputs and seed: byte-identical output whatever the workers; another seed: another
    series order (same series, same slice order within each)."""
    _, outs = synth_builds

    def tree(out):
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}

    assert tree(outs["a"]) == tree(outs["b"])
    a, c = shard_samples(outs["a"]), shard_samples(outs["c"])
    assert [m["image_id"] for _, m in a] != [m["image_id"] for _, m in c]

    def slices_by_series(samples):
        by = {}
        for _, m in samples:
            by.setdefault(m["series_id"], []).append(m["image_id"])
        return by

    assert slices_by_series(a) == slices_by_series(c)


def test_real_series_whole_and_in_position_order(real_samples, tmp_path):
    """The real samples: the two complete series (36 and 33 slices) each fill one shard in order
    of their (tilted) slice position; the single slices share shards."""
    out = tmp_path / "out"
    build(cfg(real_samples, size=32, shard_size=16), out, jobs=2, progress=False)
    got = check_series_layout(out, 16)
    sizes = got.groupby("series_id").size()
    assert sizes["ID_e17326e0bd"] == 36 and sizes["ID_44cfc8e964"] == 33
    for series in ("ID_e17326e0bd", "ID_44cfc8e964"):
        shard = got.loc[got["series_id"] == series, "shard"].iloc[0]
        assert (got.loc[got["shard"] == shard, "series_id"] == series).all()
    assert got.groupby("shard")["series_id"].nunique().max() >= 2
    index = index_of(out)
    assert (index["status"] == "ok").all() and not index["duplicate_position"].any()
    tilted_series = index.loc[index["series_id"] == "ID_44cfc8e964"]
    by_z = tilted_series.sort_values("z_position")["slice_rank"].tolist()
    assert by_z == list(range(33))  # no in-plane shift in this series: z agrees with the normal
    assert json.loads((out / "manifest.json").read_text())["counts"]["orientation_fallback"] == 0
