"""Series crops (--crop series, the default): one box per series from the robust union of its
slices' head boxes, so neighbours align pixel for pixel; --crop slice keeps per-slice boxes."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

import ich_prep.build as build_mod
import ich_prep.build_worker as build_worker
from benchmarks.bench_crop import adjacent_disagreement, summary
from ich_prep.build import build, shard_key
from ich_prep.cli import main
from ich_prep.config import BuildConfig, ConfigError
from ich_prep.read_dicom import quiet_rsna_uids, read_slice
from ich_prep.transform import (
    compile_cropped,
    compile_image,
    compile_stored,
    head_box,
    header_to_hu,
    series_box,
    series_head_box,
    stored_head_box,
)
from tests.conftest import phantom_hu, write_hu

BOX = ["crop_y0", "crop_y1", "crop_x0", "crop_x1"]

# ---------------------------------------------------------------- the rule, on tiny inputs


def test_series_box_leaves_out_outliers_hand_computed():
    """Five boxes and a slice with no head: median area 1600 (pixels^2), median centre (30, 30),
    median side 40. The 4x4 fragment (area 16 < 0.1 * 1600) and the 64x64 box (4096 > 2 * 1600)
    are outliers; the union of the other three is (8, 52, 10, 50)."""
    boxes = [
        (10, 50, 10, 50),  # area 1600, centre (30, 30)
        (12, 48, 12, 48),  # 1296
        (8, 52, 10, 50),  # 1760
        None,  # air above the head
        (0, 4, 60, 64),  # a stray fragment: area 16
        (0, 64, 0, 64),  # the head merged with the table: area 4096
    ]
    assert series_box(boxes) == (8, 52, 10, 50)
    # the plain union would have been the whole 64x64 slice
    assert series_box(boxes, small=0, large=np.inf, shift=np.inf) == (0, 64, 0, 64)


def test_series_box_leaves_out_a_displaced_box():
    """A box of normal size whose centre lies 54 px from the median centre (more than 0.25 x the
    median side 40) is left out."""
    a, far = (10, 50, 10, 50), (30, 70, 60, 100)
    assert series_box([a, a, a, far]) == a
    assert series_box([a, a, a, far], shift=2.0) == (10, 70, 10, 100)


def test_series_box_edge_cases():
    """No head anywhere: None (crop nothing); one box: itself; every box an outlier (two heads'
    worth of disagreement): the union of all."""
    assert series_box([]) is None and series_box([None, None]) is None
    assert series_box([None, (3, 9, 4, 8)]) == (3, 9, 4, 8)
    assert series_box([(0, 10, 0, 10), (100, 110, 100, 110)]) == (0, 110, 0, 110)


def test_series_head_box_of_tiny_hu_slices():
    """HU in, box out: concentric heads of three sizes and a slice of air give the largest head's box."""
    hus = [phantom_hu(64, r) for r in (0.3, 0.4, 0.35)] + [np.full((64, 64), -1000.0)]
    assert series_head_box(hus) == head_box(hus[1]) == (7, 58, 7, 58)


def test_compile_cropped_with_the_own_box_is_compile_image():
    """--crop slice's path: compile_image is head_box then compile_cropped, bytes unchanged."""
    hu = phantom_hu(96, 0.3).astype(np.float32)
    windows = [(40, 80), (80, 200), (600, 2800)]
    img, box = compile_image(hu, windows, 48)
    assert np.array_equal(compile_cropped(hu, box, windows, 48), img)
    other = compile_cropped(hu, (0, 96, 0, 96), windows, 48)
    assert other.shape == img.shape and not np.array_equal(other, img)


def test_stored_paths_convert_only_what_they_use_and_give_the_same_bytes():
    """The build works from stored values: the head box converts only head_box's subsampled view,
    compile_stored only the pixels inside the box. Same answers as converting the whole slice
    first, for the 12-bit quirk (hand-checked at the end),
    a padding value and a plain signed slice."""
    hu = phantom_hu(200, 0.3)
    plain = np.round(hu + 1024).astype(np.int16)
    padded = plain.copy()
    padded[:, :20] = -2000
    quirk = (np.round(hu + 1024).astype(np.int32) % 4096).astype(np.uint16)
    headers = [
        dict(rescale_slope=1.0, rescale_intercept=-1024.0, bits_stored=16, pixel_representation=1),
        dict(
            rescale_slope=1.0,
            rescale_intercept=-1024.0,
            bits_stored=16,
            pixel_representation=1,
            pixel_padding_value=-2000,
        ),  # fmt: skip
        dict(rescale_slope=1.0, rescale_intercept=0.0, bits_stored=12, pixel_representation=0),
    ]
    windows = [(40, 80), (80, 200), (600, 2800)]
    for stored, h in zip((plain, padded, quirk), headers, strict=True):
        h.update(pixel_spacing_y=0.5, pixel_spacing_x=0.5)
        full = header_to_hu(stored, h)
        box = head_box(full)
        assert box is not None and stored_head_box(stored, h) == box
        for b in (box, None, (10, 150, 30, 190)):
            assert np.array_equal(compile_stored(stored, h, b, windows, 64), compile_cropped(full, b, windows, 64))  # fmt: skip
    # the 12-bit quirk by hand: stored 24 -> (24 + 1000) * 1 - 1000 = 24 HU; 3100 -> 4100 wraps to 4
    # -> 4 - 1000 = -996 HU
    assert header_to_hu(np.array([[24, 3100]], np.uint16), headers[2]).tolist() == [[24.0, -996.0]]


# ---------------------------------------------------------------- builds of real DICOM files


def disk_slice(radius: int, n: int = 96, centre=(48, 46), marker=(40, 52)) -> np.ndarray:
    """HU (n, n): a disk of brain (40 HU) of `radius` px around `centre`, a 4x4 bone marker
    (1000 HU) at the same place in every slice, air elsewhere."""
    yy, xx = np.mgrid[:n, :n]
    hu = np.full((n, n), -1000.0)
    hu[np.hypot(yy - centre[0], xx - centre[1]) < radius] = 40.0
    hu[marker[0] : marker[0] + 4, marker[1] : marker[1] + 4] = 1000.0
    return hu


RADII = (40, 36, 30, 24, 34)


def write_disk_series(d: Path, radii=RADII, series="ID_se00000001") -> list[str]:
    ids = []
    for k, r in enumerate(radii):
        image_id = f"ID_{series[-4:]}{k:02d}"
        write_hu(d / f"{image_id}.dcm", disk_slice(r), series=series, z=5.0 * k)
        ids.append(image_id)
    return ids


def samples(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """image id -> (uint8 image, json) of every sample of a build (npy.gz encoding)."""
    found = {}
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                img = np.load(io.BytesIO(gzip.decompress(members[f"{key}.npy.gz"])))
                found[key] = (img, json.loads(data))
    return found


def marker_at(img: np.ndarray) -> tuple[float, float]:
    """Centre of mass of the bone marker (brain window saturated, 255) in an output image."""
    y, x = np.nonzero(img[..., 0] >= 250)
    return float(y.mean()), float(x.mean())


def index_of(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "index.parquet").set_index("image_id")


def boxes_in(index: pd.DataFrame) -> dict[str, tuple | None]:
    return {
        i: None if pd.isna(r.crop_y0) else tuple(int(getattr(r, c)) for c in BOX)
        for i, r in index[index["status"] == "ok"].iterrows()
    }


def test_series_crop_aligns_neighbours_pixel_for_pixel(tmp_path):
    """Heads of five sizes around one centre, a marker at one place: under --crop series every
    slice has the largest head's box (index and json) and the marker lands on the same output
    pixels in every image; under --crop slice each slice has its own box and the marker moves."""
    d = tmp_path / "dcm"
    ids = write_disk_series(d)
    got = {}
    for crop in ("series", "slice"):
        out = tmp_path / crop
        res = build(BuildConfig(dicom_dir=str(d), size=64, crop=crop), out, jobs=1, progress=False)
        assert res.manifest["config"]["crop"] == crop and res.manifest["counts"]["crop_fallback"] == 0  # fmt: skip
        got[crop] = (boxes_in(index_of(out)), samples(out))
    boxes, imgs = got["series"]
    own = {i: head_box(header_to_hu(*read_slice(d / f"{i}.dcm"))) for i in ids}
    assert set(boxes.values()) == {own[ids[0]]}  # the largest head's box: it holds the others
    assert all(imgs[i][1]["crop_box"] == list(own[ids[0]]) for i in ids)
    markers = {marker_at(imgs[i][0]) for i in ids}
    assert len(markers) == 1
    frames = [imgs[i][0] for i in ids]  # the same original pixel, the same output pixel
    assert all(np.array_equal(f[20:30, 30:40], frames[0][20:30, 30:40]) for f in frames)
    boxes, imgs = got["slice"]
    assert boxes == own and len(set(own.values())) == len(ids)
    ys = [marker_at(imgs[i][0])[0] for i in ids]
    assert max(ys) - min(ys) > 3


def test_odd_shape_or_spacing_falls_back_to_its_own_box_and_a_bad_slice_is_its_own_row(tmp_path, monkeypatch):  # fmt: skip
    """In one series: a slice of another shape and one of another pixel spacing are cropped with
    their own head box (counted in counts.crop_fallback); a slice whose pixel data is cut is its
    own error row; the other slices share one box and ranks run without a gap. Holding only two
    slices' HU (the rest read again) gives the same bytes."""
    d = tmp_path / "dcm"
    ids = write_disk_series(d, radii=(40, 36, 30, 24, 34, 32))
    small = d / "ID_000106.dcm"  # another shape, between slices 1 and 2
    write_hu(small, disk_slice(20, n=64, centre=(32, 32), marker=(30, 30)), z=7.5)
    with quiet_rsna_uids():
        ds = pydicom.dcmread(d / f"{ids[3]}.dcm")
        ds.PixelSpacing = [0.6, 0.6]
        ds.save_as(d / f"{ids[3]}.dcm")
    cut = d / f"{ids[4]}.dcm"
    cut.write_bytes(cut.read_bytes()[:-1000])
    out = tmp_path / "out"
    res = build(BuildConfig(dicom_dir=str(d), size=64), out, jobs=1, progress=False)
    assert res.manifest["counts"]["crop_fallback"] == 2
    index = index_of(out)
    assert index.loc[ids[4], "status"] == "error" and index.loc[ids[4], "reason"] == "unreadable"
    boxes = boxes_in(index)
    for odd in ("ID_000106", ids[3]):
        assert boxes[odd] == head_box(header_to_hu(*read_slice(d / f"{odd}.dcm")))
    common = {boxes[i] for i in (ids[0], ids[1], ids[2], ids[5])}
    assert common == {head_box(header_to_hu(*read_slice(d / f"{ids[0]}.dcm")))}
    ok = index[index["status"] == "ok"].sort_values("slice_rank")
    assert ok["slice_rank"].tolist() == list(range(6)) and (ok["series_len"] == 6).all()
    assert ok.index.tolist() == [ids[0], ids[1], "ID_000106", ids[2], ids[3], ids[5]]
    monkeypatch.setattr(build_worker, "SERIES_HOLD_BYTES", 2 * 96 * 96 * 2)  # two stored slices
    build(BuildConfig(dicom_dir=str(d), size=64), tmp_path / "held2", jobs=1, progress=False)
    assert tree(tmp_path / "held2") == tree(out)


def test_spacing_mm_with_series_crop(tmp_path):
    """--spacing-mm with series crops: one box for the series, heads at their physical size
    (0.5 mm pixels resampled to 1 mm: a disk of radius r pixels, 2r wide, is r output pixels
    wide), and the marker on the same output pixels in every slice."""
    d = tmp_path / "dcm"
    ids = write_disk_series(d)
    out = tmp_path / "out"
    build(BuildConfig(dicom_dir=str(d), size=64, spacing_mm=1.0), out, jobs=1, progress=False)
    assert len(set(boxes_in(index_of(out)).values())) == 1
    imgs = samples(out)
    assert len({marker_at(imgs[i][0]) for i in ids}) == 1
    for image_id, r in zip(ids, RADII, strict=True):
        img = imgs[image_id][0][..., 0]
        cols = np.nonzero((img > 60).any(axis=0))[0]
        assert abs((cols.max() - cols.min() + 1) - r) <= 2, (image_id, r)


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    from ich_prep.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth_crop")
    return root, write_synthetic(root / "data", patients=6, seed=4, slices_per_series=5)


def tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_synthetic_build_one_box_per_series_deterministic(synth_set, monkeypatch):
    """The synthetic set (odd sizes, storage forms, a truncated slice): one box per series in the
    index and every sample's json; byte-identical with 1 or 2 workers and when every slice is read
    twice instead of held (SERIES_HOLD_BYTES = 0)."""
    root, info = synth_set
    cfg = BuildConfig(dicom_dir=info["train_dir"], labels=info["labels_csv"], size=48, folds=2, shard_size=8)  # fmt: skip
    build(cfg, root / "a", jobs=2, progress=False)
    monkeypatch.setattr(build_worker, "SERIES_HOLD_BYTES", 0)
    res = build(cfg, root / "b", jobs=1, progress=False)
    assert tree(root / "a") == tree(root / "b")
    assert res.manifest["counts"]["crop_fallback"] == 0
    index = index_of(root / "a")
    ok = index[index["status"] == "ok"]
    assert ok["crop_y0"].notna().all()
    assert (ok.groupby("series_id")[BOX].nunique() == 1).all().all()
    for image_id, (_, meta) in samples(root / "a").items():
        assert meta["crop_box"] == [int(ok.loc[image_id, c]) for c in BOX]
    assert ok["series_id"].nunique() < len(ok)  # several slices per series


def test_crop_slice_reproduces_per_slice_boxes(synth_set):
    """--crop slice: every slice's box is its own head_box, as before series crops."""
    root, info = synth_set
    cfg = BuildConfig(dicom_dir=info["test_dir"], size=48, crop="slice")
    build(cfg, root / "slice", jobs=2, progress=False)
    index = index_of(root / "slice")
    boxes = boxes_in(index)
    for image_id, box in boxes.items():
        hu = header_to_hu(*read_slice(Path(info["test_dir"]) / index.loc[image_id, "path"]))
        assert box == head_box(hu), image_id
    assert len(set(boxes.values())) > index["series_id"].nunique()


def test_crop_is_in_the_config_and_a_change_recompiles(synth_set):
    """crop is validated, in to_dict/from_dict (a manifest without it reads as 'slice', as older
    builds cropped), in every shard's key; a build into the same folder with the other crop is
    refused without --overwrite and recompiles with it."""
    root, info = synth_set
    assert BuildConfig(dicom_dir="d").crop == "series"
    with pytest.raises(ConfigError, match="--crop"):
        BuildConfig(dicom_dir="d", crop="volume")
    cfg = BuildConfig(dicom_dir=info["test_dir"], size=32, crop="slice")
    assert BuildConfig.from_dict(cfg.to_dict()) == cfg
    legacy = {k: v for k, v in cfg.to_dict().items() if k != "crop"}
    assert BuildConfig.from_dict(legacy).crop == "slice"
    with pytest.raises(ConfigError):
        BuildConfig.from_dict({**cfg.to_dict(), "crop": 3})
    part = pd.DataFrame({c: [1] for c in build_mod.KEY_COLUMNS})
    series = BuildConfig(dicom_dir=info["test_dir"], size=32)
    assert shard_key(part, cfg) != shard_key(part, series)
    out = root / "recompile"
    build(cfg, out, jobs=1, progress=False)
    before = boxes_in(index_of(out))
    with pytest.raises(build_mod.BuildError, match="different config"):
        build(series, out, jobs=1, progress=False)
    res = build(series, out, jobs=1, progress=False, overwrite=True)
    assert res.summary["resumed_shards"] == 0 and boxes_in(index_of(out)) != before


def test_cli_crop_flag(synth_set, capsys):
    """ich-prep build --crop slice|series reaches the manifest; another value is refused (exit 2)."""
    root, info = synth_set
    out = root / "cli"
    args = ["build", "--dicom-dir", info["test_dir"], "--out", str(out), "--size", "32", "--quiet"]
    assert main([*args, "--crop", "slice", "--jobs", "1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["crop"] == "slice"
    assert main([*args, "--crop", "volume"]) == 2
    assert "--crop" in capsys.readouterr().err


# ---------------------------------------------------------------- the real samples


def test_real_samples_series_vs_slice_crop(real_samples, tmp_path):
    """On the real RSNA samples: --crop slice gives each slice its own head box (the two slices
    above the head none); --crop series one box per series that holds every slice's own box.
    Prints the adjacent-slice disagreement under both (benchmarks/bench_crop.py has the rest)."""
    got = {}
    for crop in ("slice", "series"):
        out = tmp_path / crop
        res = build(BuildConfig(dicom_dir=str(real_samples), size=256, crop=crop), out, jobs=2, progress=False)  # fmt: skip
        assert res.manifest["counts"]["crop_fallback"] == 0
        got[crop] = pd.read_parquet(out / "index.parquet")
    own = boxes_in(got["slice"].set_index("image_id"))
    assert {i for i, b in own.items() if b is None} == {"ID_0000950d7", "ID_be2584ff9", "ID_40a6d2d77"}  # fmt: skip
    for image_id in ("ID_0002a38ad", "ID_47cb66839"):
        path = real_samples / got["slice"].set_index("image_id").loc[image_id, "path"]
        assert own[image_id] == head_box(header_to_hu(*read_slice(path)))
    series = got["series"].set_index("image_id")
    assert (series.groupby("series_id")[BOX].nunique() <= 1).all().all()
    boxes = boxes_in(series)
    for image_id, b in own.items():
        s = boxes[image_id]
        if b is not None:
            assert s[0] <= b[0] and s[1] >= b[1] and s[2] <= b[2] and s[3] >= b[3], image_id
    d = {crop: adjacent_disagreement(got[crop], 256) for crop in got}
    whole = {crop: v[v["series_len"] >= 10] for crop, v in d.items()}
    for crop, v in whole.items():
        print(f"\nreal samples, whole series, --crop {crop}: {summary(v)}")
    assert len(whole["slice"]) == 67
    assert whole["slice"]["scale"].median() > 0.01 and whole["slice"]["centre"].median() > 1
    assert (d["series"][["scale", "centre"]] == 0).all().all()


def test_tar_member_json_matches_index_box(tmp_path):
    """The json's crop_box is the box the index records (whole-slice crops: null in both)."""
    d = tmp_path / "dcm"
    write_disk_series(d)
    write_hu(d / "ID_air.dcm", np.full((96, 96), -1000.0), series="ID_se00000002")
    out = tmp_path / "out"
    build(BuildConfig(dicom_dir=str(d), size=32), out, jobs=1, progress=False)
    index = index_of(out)
    with tarfile.open(next(out.glob("*.tar"))) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    for meta in metas:
        row = index.loc[meta["image_id"]]
        want = None if pd.isna(row["crop_y0"]) else [int(row[c]) for c in BOX]
        assert meta["crop_box"] == want
    assert index.loc["ID_air", "crop_y0"] is pd.NA
