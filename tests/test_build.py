"""Whole builds: shards, index, manifest; bad inputs; resume; config guard."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from ich_prep import LABELS
from ich_prep.build import BuildError, build
from ich_prep.cli import main
from ich_prep.config import BuildConfig
from ich_prep.shards import decode_image, encode_image, sha256_file
from tests.conftest import csv_rows, phantom_hu, write_hu


def cfg_for(dicom_dir, labels=None, **kw) -> BuildConfig:
    kw.setdefault("size", 64)
    kw.setdefault("shard_size", 5)
    kw.setdefault("folds", 3)
    return BuildConfig(
        dicom_dir=str(dicom_dir), labels=None if labels is None else str(labels), **kw
    )


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_build_writes_shards_index_manifest(dataset, tmp_path):
    """A clean build writes fold-named shards, an index row per image and a manifest with hashes."""
    dicom_dir, labels, truth = dataset
    res = build(cfg_for(dicom_dir, labels), tmp_path / "out", jobs=1, progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m == res.manifest and m["counts"]["ok"] == len(truth) and m["counts"]["error"] == 0
    for s in m["shards"]:
        p = tmp_path / "out" / s["name"]
        assert s["name"].startswith(f"train-f{s['fold']}-") and sha256_file(p) == s["sha256"]
        assert p.stat().st_size == s["bytes"]
    assert not (tmp_path / "out" / "_work").exists()
    assert (
        (tmp_path / "out" / "README.md")
        .read_text()
        .startswith("# RSNA intracranial hemorrhage shards")
    )


def test_plain_webdataset_and_pandas_read_it(dataset, tmp_path):
    """Stock webdataset .decode() and pandas read the output with no project code; labels match."""
    dicom_dir, labels, truth = dataset
    build(cfg_for(dicom_dir, labels), tmp_path / "out", jobs=1, progress=False)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    urls = sorted(glob.glob(str(tmp_path / "out" / "*.tar")))
    seen = {}
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        img, meta = s["npy.gz"], s["json"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        row = index.set_index("image_id").loc[s["__key__"]]
        assert Path(s["__url__"]).name == row["shard"] and meta["fold"] == row["fold"]
        seen[s["__key__"]] = meta["labels"]
    assert seen == truth
    assert index[list(LABELS)].astype(int).values.tolist() == [truth[i] for i in index["image_id"]]


def test_folds_are_whole_shards_and_patient_grouped(dataset, tmp_path):
    """Each shard holds one fold; each patient one fold; every shard mixes patients when it can."""
    dicom_dir, labels, _ = dataset
    build(cfg_for(dicom_dir, labels), tmp_path / "out", jobs=1, progress=False)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert (index.groupby("shard")["fold"].nunique() == 1).all()
    assert (index.groupby("patient_id")["fold"].nunique() == 1).all()
    assert index["slice_rank"].between(0, 3).all()


def test_every_bad_input_accounted_for(tmp_path):
    """Each kind of bad input lands in the index with its reason; ok + error = inputs."""
    d = tmp_path / "train"
    lines = []
    good = []
    for i in range(4):
        write_hu(d / f"ID_good{i}.dcm", phantom_hu(64), patient=f"ID_p{i}", z=float(i))
        lines += csv_rows(f"ID_good{i}")
        good.append(f"ID_good{i}")
    write_hu(d / "ID_trunc.dcm", phantom_hu(64)).write_bytes(
        (d / "ID_good0.dcm").read_bytes()[:2000]
    )
    (d / "ID_text.dcm").write_text("not dicom")
    write_hu(d / "ID_nopix.dcm", phantom_hu(64), with_pixels=False)
    write_hu(d / "ID_mr.dcm", phantom_hu(64), modality="MR")
    write_hu(d / "ID_noint.dcm", phantom_hu(64), intercept=None)
    write_hu(d / "ID_conflict.dcm", phantom_hu(64))
    write_hu(d / "ID_partial.dcm", phantom_hu(64))
    write_hu(d / "ID_anybad.dcm", phantom_hu(64))
    write_hu(d / "ID_nolabel.dcm", phantom_hu(64))
    for i in ["ID_trunc", "ID_text", "ID_nopix", "ID_mr", "ID_noint", "ID_conflict", "ID_nofile"]:
        lines += csv_rows(i)
    lines += ["ID_conflict_epidural,1", "ID_good1_subdural,0"]  # conflicting; identical duplicate
    lines += csv_rows("ID_partial")[:3] + csv_rows("ID_anybad", {"subdural": 1})
    lines += ["not_an_id,1"]
    csv = tmp_path / "labels.csv"
    csv.write_text("ID,Label\n" + "\n".join(lines) + "\n")
    res = build(cfg_for(d, csv), tmp_path / "out", jobs=1, progress=False)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("image_id")
    expected = {
        "ID_trunc": "unreadable",
        "ID_text": "unreadable",
        "ID_nopix": "no_pixel_data",
        "ID_mr": "not_ct",
        "ID_noint": "missing_tag",
        "ID_conflict": "conflicting_labels",
        "ID_partial": "missing_labels",
        "ID_anybad": "any_mismatch",
        "ID_nolabel": "unlabeled_file",
        "ID_nofile": "missing_file",
        "not_an_id": "malformed_csv_id",
    }
    assert index.loc[list(expected), "reason"].to_dict() == expected
    from ich_prep.build import BUILD_REASONS
    from ich_prep.read_dicom import REASONS

    assert set(index["reason"].dropna()) <= set(REASONS) | set(BUILD_REASONS)
    assert (index.loc[good, "status"] == "ok").all()
    assert index["detail"].notna().sum() == len(expected)
    c = res.manifest["counts"]
    assert c["ok"] + c["error"] == c["inputs"] == len(index) == len(good) + len(expected)
    assert c["duplicate_rows_dropped"] == 1


def test_test_split_without_labels(tmp_path):
    """No --labels: test-NNNNN.tar shards, fold -1, labels null."""
    for i in range(3):
        write_hu(tmp_path / "test" / f"ID_t{i}.dcm", phantom_hu(64), z=float(i))
    res = build(cfg_for(tmp_path / "test"), tmp_path / "out", jobs=1, progress=False)
    assert [s["name"] for s in res.manifest["shards"]] == ["test-00000.tar"]
    s = next(
        iter(wds.WebDataset(str(tmp_path / "out" / "test-00000.tar"), shardshuffle=False).decode())
    )
    assert s["json"]["labels"] is None and s["json"]["fold"] == -1
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert index["any"].isna().all() and (index["fold"] == -1).all()


def test_rerun_same_config_is_noop_and_other_config_refused(dataset, tmp_path):
    """Same config: nothing to do; another config: a clear refusal unless overwrite."""
    dicom_dir, labels, _ = dataset
    build(cfg_for(dicom_dir, labels), tmp_path / "out", jobs=1, progress=False)
    before = tree_bytes(tmp_path / "out")
    assert build(cfg_for(dicom_dir, labels), tmp_path / "out", jobs=1, progress=False).summary[
        "already_complete"
    ]
    assert tree_bytes(tmp_path / "out") == before
    with pytest.raises(BuildError, match="different config"):
        build(cfg_for(dicom_dir, labels, size=32), tmp_path / "out", jobs=1, progress=False)
    res = build(
        cfg_for(dicom_dir, labels, size=32),
        tmp_path / "out",
        jobs=1,
        progress=False,
        overwrite=True,
    )
    assert res.manifest["config"]["size"] == 32


def test_output_is_deterministic_across_jobs(dataset, tmp_path):
    """One worker or two: byte-identical output."""
    dicom_dir, labels, _ = dataset
    build(cfg_for(dicom_dir, labels), tmp_path / "a", jobs=1, progress=False)
    build(cfg_for(dicom_dir, labels), tmp_path / "b", jobs=2, progress=False)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_kill_9_then_resume_is_byte_identical(tmp_path):
    """kill -9 mid-build, run the same command again: no redone shards lost, same bytes as a clean run."""
    from tests.conftest import make_dataset

    dicom_dir, labels, _ = make_dataset(tmp_path / "data", n_patients=10, slices=6, size=128)
    args = ["build", "--dicom-dir", str(dicom_dir), "--labels", str(labels), "--size", "64", "--shard-size", "2", "--folds", "3", "--jobs", "1", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ich_prep", *args, "--out", str(out)]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(str(out / "_work" / "*.tar.json"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(glob.glob(str(out / "_work" / "*.tar.json")))
    assert 3 <= finished < 30, "the kill must land mid-build"
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"shards resumed: {finished}" in rerun.stdout or "shards resumed:" in rerun.stdout
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize(
    ("kw", "kept"),
    [({"limit": 10}, 8), ({"limit": 10, "seed": 3}, 8), ({"fraction": 0.5}, 12), ({"limit": 3}, 4)],
)
def test_limit_takes_whole_series(dataset, tmp_path, kw, kept):
    """--limit / --fraction keep whole series (6 series of 4 slices here), seeded, at most the
    target unless the first series drawn alone is larger; the manifest records what was kept.
    (Before: --limit 10 kept 10 single slices from most series, ranked 0..n-1 over what was left.)"""
    dicom_dir, labels, _ = dataset
    res = build(cfg_for(dicom_dir, labels, **kw), tmp_path / "out", jobs=1, progress=False)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert res.manifest["counts"]["inputs"] == kept == res.manifest["counts"]["ok"]
    per_series = index.groupby("series_id")["slice_rank"].apply(sorted)
    assert all(r == [0, 1, 2, 3] for r in per_series), per_series
    assert res.manifest["counts"]["subset"] == {
        "images": kept, "of_images": 24, "series": kept // 4, "of_series": 6, "patients": kept // 4,
        "csv_rows_without_file_left_out": 0,
    }  # fmt: skip


def test_limit_draws_files_not_csv_rows_without_one(dataset, tmp_path):
    """A labels CSV naming 100 images with no file (the real samples' CSV names 1044, 50 with
    files): --limit draws series of files and leaves those rows out (counted), instead of a subset
    of mostly missing_file rows with nothing compiled."""
    dicom_dir, labels, _ = dataset
    extra = [f"ID_nofile{i:04d}_{k},0" for i in range(100) for k in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")]  # fmt: skip
    labels.write_text(labels.read_text() + "\n".join(extra) + "\n")
    res = build(cfg_for(dicom_dir, labels, limit=10), tmp_path / "out", jobs=1, progress=False)
    c = res.manifest["counts"]
    assert c["ok"] == c["inputs"] == 8 and c["subset"]["csv_rows_without_file_left_out"] == 100
    from ich_prep.info import format_info, info

    assert "(whole series: 2 of 6, 8 of 24 files)" in format_info(info(tmp_path / "out"))


def test_limit_on_real_samples_keeps_whole_series(real_samples, tmp_path):
    """Real RSNA slices (a 33- and a 36-slice series, a 3-slice piece of a test series, singles):
    a --limit build keeps whole series, each with the ranks, length and crop box it has in the
    full build, for several seeds."""
    full = build(cfg_for(real_samples, size=32, shard_size=40), tmp_path / "full", jobs=2, progress=False)  # fmt: skip
    ref = pd.read_parquet(tmp_path / "full" / "index.parquet").set_index("image_id")
    ref = ref[ref["status"] == "ok"]
    assert full.manifest["counts"]["ok"] == len(ref) > 90
    cols = ["series_id", "slice_rank", "series_len", "crop_y0", "crop_y1", "crop_x0", "crop_x1"]
    sizes = []
    for seed in range(3):
        out = tmp_path / f"limit{seed}"
        res = build(cfg_for(real_samples, size=32, shard_size=40, limit=40, seed=seed), out, jobs=2, progress=False)  # fmt: skip
        got = pd.read_parquet(out / "index.parquet").set_index("image_id")
        got = got[got["status"] == "ok"]
        assert len(got) <= 40 or got["series_id"].nunique() == 1
        pd.testing.assert_frame_equal(got[cols], ref.loc[got.index, cols], check_dtype=False)
        for sid in got["series_id"].unique():  # every slice of each kept series
            assert set(got.index[got["series_id"] == sid]) == set(ref.index[ref["series_id"] == sid])  # fmt: skip
        sizes.append(res.manifest["counts"]["subset"]["series"])
    assert max(sizes) > 1


def test_max_errors_sets_exit_code(tmp_path, capsys):
    """More failures than --max-errors: exit 3 after writing everything."""
    write_hu(tmp_path / "d" / "ID_ok.dcm", phantom_hu(64))
    (tmp_path / "d" / "ID_bad.dcm").write_text("x")
    base = ["build", "--dicom-dir", str(tmp_path / "d"), "--size", "32", "--jobs", "1", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "o1"), "--max-errors", "0"]) == 3
    assert (tmp_path / "o1" / "manifest.json").exists()
    assert main([*base, "--out", str(tmp_path / "o2"), "--max-errors", "1"]) == 0
    assert "unreadable: 1" in capsys.readouterr().out


@pytest.mark.parametrize("encoding", ["npy.gz", "png", "npy", "jpg"])
def test_encodings_roundtrip(encoding):
    """Lossless encodings decode to the same pixels; jpg stays close."""
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img[8:24] = 128
    back = decode_image(encode_image(img, encoding), encoding)
    if encoding == "jpg":
        assert np.abs(back[8:24].astype(int) - 128).mean() < 3
    else:
        np.testing.assert_array_equal(back, img)


def test_real_rsna_samples(real_samples, tmp_path):
    """Real RSNA slices: every file accounted for, labels equal the CSV, head inside the crop, plausible HU."""
    csv = (
        real_samples
        / "Riku-Sasaki_kaggle-rsna-intracranial-hemorrhage-detection"
        / "labels_extracted.csv"
    )
    res = build(
        cfg_for(real_samples, csv, size=128, shard_size=16),
        tmp_path / "out",
        jobs=2,
        progress=False,
    )
    index = pd.read_parquet(tmp_path / "out" / "index.parquet").set_index("image_id")
    n_files = len(list(real_samples.rglob("*.dcm")))
    assert res.manifest["counts"]["inputs"] == n_files == 109
    assert res.manifest["counts"]["ok"] == 64
    assert set(index.loc[index["status"] == "error", "reason"]) == {"unlabeled_file"}
    truth = pd.read_csv(csv)
    truth[["image_id", "subtype"]] = truth["ID"].str.rsplit("_", n=1, expand=True)
    wide = truth.pivot(index="image_id", columns="subtype", values="Label")[list(LABELS)]
    ok = index[index["status"] == "ok"]
    assert (ok[list(LABELS)].astype(int) == wide.loc[ok.index]).all().all()
    # Crop box inside the slice around a head-sized region. The two labelled slices above the head
    # (ID_0000950d7, ID_be2584ff9: only the curved head rest) have no head box of their own; under
    # --crop series (the default) they take their series' box (tests/test_series_crop.py has
    # --crop slice, where they keep the whole slice).
    boxed = ok[ok["crop_y0"].notna()]
    assert set(ok.index) == set(boxed.index)
    assert ((boxed["crop_y1"] - boxed["crop_y0"]) > 60).all() and (
        boxed["crop_y1"] <= boxed["rows"]
    ).all()
    # Brain tissue at plausible HU for both storage forms: median of the brain-window channel
    # over the head's centre lies between 0 and 80 HU (0..255 in the L40/W80 window).
    from ich_prep.read_dicom import read_slice
    from ich_prep.transform import header_to_hu

    medians: dict[tuple[int, int], list[float]] = {}
    for image_id in ok.index:
        stored, h = read_slice(real_samples / ok.at[image_id, "path"])
        hu = header_to_hu(stored, h)
        if image_id not in boxed.index:
            continue
        y0, y1, x0, x1 = (
            int(ok.at[image_id, c]) for c in ["crop_y0", "crop_y1", "crop_x0", "crop_x1"]
        )
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        centre = hu[cy - 20 : cy + 20, cx - 20 : cx + 20]
        soft = centre[(centre > -100) & (centre < 200)]
        if soft.size > 400:
            medians.setdefault((h["bits_stored"], h["pixel_representation"]), []).append(
                float(np.median(soft))
            )
        assert hu.min() >= -1024 and (hu[:5, :5] <= -900).all()
    assert set(medians) == {(12, 0), (16, 1)}
    for form, values in medians.items():
        assert 15 < np.median(values) < 60, (form, values)  # grey/white matter is ~20-45 HU


def test_synthetic_set_builds_with_its_quirks(tmp_path):
    """The synthetic set compiles: only the corrupt file fails, duplicates are dropped, all 3 storage forms give air at 0."""
    from ich_prep.synth import write_synthetic

    info = write_synthetic(tmp_path / "data", patients=6, seed=2, slices_per_series=4)
    res = build(
        cfg_for(info["train_dir"], info["labels_csv"]), tmp_path / "out", jobs=1, progress=False
    )
    c = res.manifest["counts"]
    assert c["errors_by_reason"] == {"unreadable": len(info["corrupt"])}
    assert c["duplicate_rows_dropped"] == info["duplicate_rows"]
    assert c["ok"] == info["train_images"] - len(info["corrupt"])
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert index.loc[index["status"] == "ok", "crop_y0"].notna().all()
    for s in wds.WebDataset(
        sorted(glob.glob(str(tmp_path / "out" / "*.tar"))), shardshuffle=False
    ).decode():
        img = s["npy.gz"]
        assert (
            img[:2, :2] == 0
        ).all()  # corners are air in every window, whatever the storage form
        assert img[..., 0].max() == 255  # brain window saturates on the skull


def test_gzip_bomb_refused():
    """A tiny .npy.gz member that inflates past any plausible image is refused, not inflated."""
    import gzip

    bomb = gzip.compress(b"\0" * (60 * 2**20))
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="inflates past"):
        decode_image(bomb, "npy.gz")


def test_spacing_mm_build_records_config_and_scales(dataset, tmp_path):
    """--spacing-mm 1.0: a 77-pixel head at 0.5 mm (38 mm) fills ~38 of 64 pixels; the manifest says 1.0."""
    dicom_dir, labels, _ = dataset
    res = build(
        cfg_for(dicom_dir, labels, spacing_mm=1.0), tmp_path / "out", jobs=1, progress=False
    )
    assert res.manifest["config"]["spacing_mm"] == 1.0
    s = next(
        iter(
            wds.WebDataset(
                sorted(glob.glob(str(tmp_path / "out" / "*.tar"))), shardshuffle=False
            ).decode()
        )
    )
    bone = s["npy.gz"][..., 2]
    cols = np.flatnonzero((bone > 80).any(axis=0))  # skull ring, above air in the bone window
    assert 36 <= cols[-1] - cols[0] + 1 <= 40  # without --spacing-mm it would fill all 64
