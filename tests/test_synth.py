"""The synthetic RSNA-like dataset: readable by the project's own readers, labelled, quirky."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from ich_prep import LABELS
from ich_prep.errors import UserError
from ich_prep.labels import read_labels
from ich_prep.read_dicom import ImageError, quiet_rsna_uids, read_header, read_slice
from ich_prep.synth import MIN_BLEED_MM2, SynthError, encode_hu, write_synthetic
from ich_prep.transform import head_box, stored_to_hu

KAGGLE_ORDER = [
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """One small dataset shared by the tests that only read it."""
    return write_synthetic(tmp_path_factory.mktemp("synth"), patients=8, seed=3)


@pytest.fixture(scope="module")
def slices(synth):
    """(image_id, stored, header, HU) of every readable file, train and test."""
    out = []
    for folder in (synth["train_dir"], synth["test_dir"]):
        for path in sorted(Path(folder).glob("*.dcm")):
            if path.stem in synth["corrupt"]:
                continue
            stored, h = read_slice(path)
            hu = stored_to_hu(
                stored, h["rescale_slope"], h["rescale_intercept"], h["bits_stored"],
                h["pixel_representation"], h["pixel_padding_value"],
            )  # fmt: skip
            out.append((path.stem, stored, h, hu))
    return out


@pytest.fixture(scope="module")
def labels(synth):
    return read_labels(synth["labels_csv"])


def _raw(synth):
    with quiet_rsna_uids():
        return [
            pydicom.dcmread(p, stop_before_pixels=True)
            for folder in (synth["train_dir"], synth["test_dir"])
            for p in sorted(Path(folder).glob("*.dcm"))
            if p.stem not in synth["corrupt"]
        ]


def _brain_fraction(hu, box):
    """Share of the head box in the brain's 15..50 HU."""
    y0, y1, x0, x1 = box
    inner = hu[y0:y1, x0:x1]
    return float(((inner > 15) & (inner < 50)).mean())


def test_layout_and_counts(synth):
    """Train and test folders hold ID_<9 hex>.dcm files in the numbers the summary reports."""
    train = sorted(Path(synth["train_dir"]).glob("*.dcm"))
    test = sorted(Path(synth["test_dir"]).glob("*.dcm"))
    assert len(train) == synth["train_images"] and len(test) == synth["test_images"]
    assert synth["test_images"] >= 2 * 6
    assert all(len(p.stem) == 12 and p.stem.startswith("ID_") for p in train + test)
    assert not {p.stem for p in train} & {p.stem for p in test}


def test_every_file_reads_except_the_corrupt_one(synth, slices):
    """All files but the one corrupt train file go through read_header and read_slice."""
    assert len(slices) == synth["train_images"] + synth["test_images"] - 1
    (corrupt,) = synth["corrupt"]
    path = Path(synth["train_dir"]) / f"{corrupt}.dcm"
    with pytest.raises(ImageError) as err:
        read_slice(path)
    assert err.value.reason == "unreadable"
    assert read_header(Path(synth["train_dir"]) / f"{slices[0][0]}.dcm")["rows"] >= 64


def test_headers_look_like_rsna(synth):
    """Ids, modality, photometry and geometry follow the real RSNA header layout."""
    for ds in _raw(synth):
        assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert len(ds.PatientID) == 11 and len(ds.SeriesInstanceUID) == 13
        assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
        assert ds.BitsAllocated == 16 and ds.SamplesPerPixel == 1
        assert 0.4 < float(ds.PixelSpacing[0]) < 1.0


def test_series_have_5mm_spaced_slices(slices):
    """Each series' z positions are distinct and 5 mm apart."""
    by_series: dict[str, list[float]] = {}
    for _, _, h, _ in slices:
        by_series.setdefault(h["series_id"], []).append(h["z_position"])
    for zs in by_series.values():
        assert np.allclose(np.diff(sorted(zs)), 5.0, atol=1e-3)


def test_csv_parses_with_only_the_duplicates_dropped(synth, labels):
    """read_labels finds no errors; only the identical duplicate rows go."""
    assert labels.errors.empty
    assert labels.stats["duplicate_rows_dropped"] == synth["duplicate_rows"] == 3
    assert labels.stats["labelled_images"] == synth["train_images"]
    train_ids = {p.stem for p in Path(synth["train_dir"]).glob("*.dcm")}
    assert set(labels.labels.index) == train_ids


def test_csv_rows_follow_the_kaggle_format(synth):
    """Header ID,Label, then six rows per image in the Kaggle subtype order."""
    lines = Path(synth["labels_csv"]).read_text().splitlines()
    assert lines[0] == "ID,Label"
    first = lines[1].rsplit("_", 1)[0]
    assert [line.split(",")[0] for line in lines[1:7]] == [f"{first}_{s}" for s in KAGGLE_ORDER]
    assert len(lines) - 1 == 6 * synth["train_images"] + synth["duplicate_rows"]


def test_every_subtype_occurs_and_positives_are_balanced(synth, labels):
    """Each subtype labels some slices; 30-60% of slices are any-positive."""
    counts = labels.labels.sum()
    assert all(counts[s] >= 1 for s in LABELS)
    assert counts.to_dict() == synth["positives"]
    assert 0.3 <= counts["any"] / len(labels.labels) <= 0.6


def test_labelled_bleeds_are_visible(slices, labels):
    """Positive slices hold a blood-density area; negative slices have next to none."""
    lab = labels.labels
    for image_id, _, h, hu in slices:
        if image_id not in lab.index:
            continue
        blood_mm2 = ((hu >= 55) & (hu <= 95)).sum() * h["pixel_spacing_x"] ** 2
        if lab.at[image_id, "any"]:
            assert blood_mm2 > 0.8 * MIN_BLEED_MM2, image_id
        else:
            assert blood_mm2 < 10, image_id


def test_phantom_values_are_plausible_hu(slices):
    """Decoded slices show air, brain and bone; the head box leaves the table out."""
    for image_id, _, _, hu in slices:
        box = head_box(hu)
        assert box is not None, image_id
        assert _brain_fraction(hu, box) > 0.3, image_id
        y1 = box[1]
        assert hu.max() > 700 and np.median(hu[:5, :5]) == pytest.approx(-1024, abs=30)
        assert (hu[y1 + 1 :] > 0).sum() > 0, f"{image_id}: no scanner table below the head"


def test_wrap_bug_files_decode_to_correct_hu(slices):
    """BitsStored 12 + intercept > -100 files give brain ~30 HU and air -1000 after the fix."""
    wrapped = [s for s in slices if s[2]["bits_stored"] == 12 and s[2]["rescale_intercept"] > -100]
    assert wrapped
    for image_id, stored, h, hu in wrapped:
        naive = stored * h["rescale_slope"] + h["rescale_intercept"]
        assert naive.min() >= 0 and np.median(naive) > 3000, image_id  # air wrapped to ~3096
        assert np.median(hu) == pytest.approx(-1000, abs=20), image_id
        assert _brain_fraction(hu, head_box(hu)) > 0.3, image_id


@pytest.mark.parametrize("form", ["signed16", "unsigned12", "wrap12"])
def test_encode_hu_round_trips_through_stored_to_hu(form):
    """stored_to_hu(encode_hu(HU)) gives back the HU inside the FOV and air outside."""
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 3000, (64, 64)).astype(np.float32)
    fov = np.ones_like(hu, bool)
    fov[:4] = False
    stored, tags = encode_hu(hu, fov, form)
    back = stored_to_hu(
        stored, 1.0, float(tags["RescaleIntercept"]), tags["BitsStored"],
        tags["PixelRepresentation"],
    )  # fmt: skip
    np.testing.assert_array_equal(back[fov], np.rint(hu[fov]))
    assert np.all(back[~fov] <= -1000)
    assert stored.min() >= (-2000 if form == "signed16" else 0) and stored.max() < 4096


def test_storage_quirks_are_present(synth, slices):
    """12-bit unsigned, 16-bit signed with -2000 padding, odd sizes and odd tag strings occur."""
    heads = [h for _, _, h, _ in slices]
    assert any(h["bits_stored"] == 12 and h["rescale_intercept"] == -1024 for h in heads)
    assert any(s[2]["pixel_representation"] == 1 and s[1].min() == -2000 for s in slices)
    assert any((h["rows"], h["cols"]) != (512, 512) for h in heads)
    raw = _raw(synth)
    assert any(ds["WindowCenter"].VM > 1 for ds in raw)
    assert any(ds["RescaleIntercept"].value.original_string == "-1024.000000" for ds in raw)
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in raw}
    assert syntaxes == {pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian}
    assert len({h["series_id"] for h in heads}) > len({h["patient_id"] for h in heads})


def _tree(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    """Two runs with one seed write identical files; another seed writes different ones."""
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_synthetic(tmp_path / name, patients=2, seed=seed, slices_per_series=3)
    a, b, c = (_tree(tmp_path / name) for name in "abc")
    assert a == b
    assert set(a) != set(c)


def test_quirks_off_gives_plain_storage(tmp_path):
    """quirks=False: no corrupt file, no duplicate rows, all 512x512 signed 16-bit."""
    s = write_synthetic(tmp_path, patients=2, slices_per_series=2, quirks=False)
    assert s["corrupt"] == [] and s["duplicate_rows"] == 0
    assert s["forms"] == {"signed16": s["forms"]["signed16"], "unsigned12": 0, "wrap12": 0}
    for p in list(Path(s["train_dir"]).glob("*.dcm")) + list(Path(s["test_dir"]).glob("*.dcm")):
        h = read_header(p)
        assert (h["rows"], h["cols"], h["bits_stored"], h["pixel_representation"]) == (
            512,
            512,
            16,
            1,
        )
    assert read_labels(s["labels_csv"]).stats["duplicate_rows_dropped"] == 0


@pytest.mark.parametrize(
    "kw, word",
    [({"patients": 0}, "--patients"), ({"slices_per_series": 0}, "--slices"),
     ({"patients": -1}, "--patients"), ({"seed": -1}, "--seed")],
)  # fmt: skip
def test_impossible_counts_refused_before_writing(tmp_path, kw, word):
    """0 patients or 0 slices: a SynthError naming the flag (was a numpy traceback); nothing written."""
    with pytest.raises(SynthError, match=f"{word} must be at least") as e:
        write_synthetic(tmp_path / "s", **kw)
    assert isinstance(e.value, UserError) and not (tmp_path / "s").exists()


def test_out_that_is_a_file_refused(tmp_path):
    """--out naming an existing file: a SynthError, and the file is left as it was."""
    (tmp_path / "f").write_text("keep")
    with pytest.raises(SynthError, match="is an existing file"):
        write_synthetic(tmp_path / "f", patients=1)
    assert (tmp_path / "f").read_text() == "keep"


def test_smallest_set_writes(tmp_path):
    """One patient with one slice per series is a valid (tiny) set."""
    s = write_synthetic(tmp_path, patients=1, slices_per_series=1)
    assert s["train_images"] >= 1 and read_labels(s["labels_csv"]).errors.empty


def test_synth_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    """A second synth into the same folder would leave a CSV that covers half the files: refused."""
    from ich_prep.cli import main

    assert main(["synth", "--out", str(tmp_path / "s"), "--patients", "2", "--slices", "2"]) == 0
    before = sorted(p.name for p in (tmp_path / "s" / "stage_2_train").iterdir())
    argv = [
        "synth",
        "--out",
        str(tmp_path / "s"),
        "--patients",
        "2",
        "--slices",
        "2",
        "--seed",
        "1",
    ]
    capsys.readouterr()
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "s" / "stage_2_train").iterdir()) == before
