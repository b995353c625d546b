"""The dataset card: its python snippets run as printed, its numbers match, its privacy claim holds."""

from __future__ import annotations

import gzip
import importlib.util
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import webdataset as wds

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.manifest import Build, build_config, layout_record
from ich_prep.read_dicom import quiet_rsna_uids
from ich_prep.synth import write_synthetic
from tests.conftest import make_dataset
from tests.sharing_fixtures import build_synthetic, manifest_of, serve


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("card"))


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def run_snippets(folder: Path) -> list[dict]:
    """Exec each python block of folder/README.md with THIS_FOLDER replaced; HF `datasets` blocks
    are skipped only when that package is not installed. Returns each block's namespace."""
    card = (folder / "README.md").read_text()
    out = []
    for code in python_blocks(card):
        if "from datasets import" in code and importlib.util.find_spec("datasets") is None:
            continue
        ns: dict = {}
        exec(compile(code.replace("THIS_FOLDER", str(folder)), "README.md", "exec"), ns)
        out.append(ns)
    return out


def test_webdataset_and_pandas_snippets_run(built):
    """The card's plain-webdataset loop yields uint8 images and labels; its pandas snippet runs."""
    wds_ns, pd_ns = run_snippets(built)[:2]
    assert wds_ns["image"].shape == (64, 64, 3) and wds_ns["image"].dtype == np.uint8
    assert len(wds_ns["meta"]["labels"]) == 6
    index = pd.read_parquet(built / "index.parquet")
    want = index[index["status"] == "ok"].groupby("fold")[["any", "subdural"]].mean()
    pd.testing.assert_frame_equal(pd_ns["prevalence"], want)


def test_png_build_snippets_run(tmp_path):
    """With png encoding the same snippets give uint8 arrays (decoded by webdataset, no project code)."""
    folder = build_synthetic(tmp_path, encoding="png")
    ns = run_snippets(folder)[0]
    assert ns["image"].shape == (64, 64, 3) and ns["image"].dtype == np.uint8


@pytest.mark.parametrize(("encoding", "shape"), [("png", (64, 64)), ("npy.gz", (64, 64, 1))])
def test_one_window_build_snippets_run(tmp_path, encoding, shape):
    """A one-window build: the card's loop decodes grey images, of the shape its comment says."""
    folder = build_synthetic(tmp_path, encoding=encoding, windows="brain")
    ns = run_snippets(folder)[0]
    assert ns["image"].shape == shape and ns["image"].dtype == np.uint8
    assert f"image: uint8 {shape}" in (folder / "README.md").read_text()


def test_test_set_card_snippets_run(tmp_path):
    """An unlabelled build's card loads `test-*.tar` and points at `ich-train predict`."""
    info = write_synthetic(tmp_path / "syn", patients=4, seed=1, slices_per_series=2)
    cfg = BuildConfig(dicom_dir=info["test_dir"], size=32, shard_size=4)
    build(cfg, tmp_path / "out", jobs=1, progress=False)
    wds_ns, pd_ns = run_snippets(tmp_path / "out")[:2]
    assert wds_ns["meta"]["labels"] is None and pd_ns["images_per_shard"].sum() > 0
    assert "ich-train predict" in (tmp_path / "out" / "README.md").read_text()


def test_only_the_hf_snippet_is_skipped(built):
    """Every python block runs except, when `datasets` is absent, the Hugging Face one."""
    blocks = python_blocks((built / "README.md").read_text())
    skipped = importlib.util.find_spec("datasets") is None
    assert len(run_snippets(built)) == len(blocks) - skipped == 3 - skipped


def test_card_numbers_match_the_manifest(built):
    """The label table and the per-fold table carry the manifest's counts."""
    card, m = (built / "README.md").read_text(), manifest_of(built)
    for k, v in m["counts"]["positives"].items():
        assert f"| {k} | {v} | {v / m['counts']['ok']:.3f} |" in card
    for fold, n in m["counts"]["per_fold"].items():
        assert re.search(rf"^\| {fold} \| {n} \| \d+ \|$", card, flags=re.M)


def test_plain_webdataset_streams_shard_urls(built, monkeypatch):
    """As the card says: webdataset reads the shards from http URLs with no project code."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    names = [s["name"] for s in manifest_of(built)["shards"]]
    with serve(built) as (url, _):
        ds = wds.WebDataset([f"{url}/{n}" for n in names], shardshuffle=False)
        keys = [s["__key__"] for s in ds.decode(only=["json"])]
    assert len(keys) == manifest_of(built)["counts"]["ok"]


def test_no_patient_identifiers_in_the_output(tmp_path):
    """Name, birth date, accession number and institution in the DICOMs appear nowhere in the build."""
    dicom_dir, labels, _ = make_dataset(tmp_path / "data", n_patients=3, slices=2, size=64)
    phi = {"PatientName": "Doe^John", "PatientBirthDate": "19700101",
           "AccessionNumber": "ACC98765", "InstitutionName": "St Elsewhere Hospital"}  # fmt: skip
    for p in dicom_dir.glob("*.dcm"):
        with quiet_rsna_uids():
            ds = pydicom.dcmread(p)
            for tag, value in phi.items():
                setattr(ds, tag, value)
            ds.save_as(p)
    cfg = BuildConfig(dicom_dir=str(dicom_dir), labels=str(labels), size=32, folds=2)
    build(cfg, tmp_path / "out", jobs=1, progress=False)
    needles = [b"Doe^John", b"John", b"19700101", b"ACC98765", b"Elsewhere"]
    blobs = []
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            blobs.append(f.read_bytes())
            if f.suffix == ".tar":
                with tarfile.open(f) as tar:
                    for ti in tar:
                        data = tar.extractfile(ti).read()
                        blobs.append(gzip.decompress(data) if ti.name.endswith(".gz") else data)
    assert len(blobs) > 10 and b"Doe^John" in (dicom_dir / "ID_000000000.dcm").read_bytes()
    assert not [n for n in needles for b in blobs if n in b]


def test_card_describes_the_typed_layout(built):
    """The card's image shape and channel names come from the typed config's layout: a 48-pixel
    build with explicit C/W windows says 48x48x3 and names those windows."""
    from ich_prep.card import dataset_card

    m = manifest_of(built)
    m["config"].update(size=48, windows=[{"name": "c40w80", "center": 40, "width": 80},
                                         {"name": "c80w200", "center": 80, "width": 200},
                                         {"name": "c600w2800", "center": 600, "width": 2800}])  # fmt: skip
    m["image"] = layout_record(build_config(m))
    card = dataset_card(Build.of(built, m))
    assert "a 48x48x3 uint8 image (channel i = window i: c40w80 (L40/W80), c80w200" in card
    assert "# image: uint8 (48, 48, 3)" in card and '"size": 48' in card
