"""The synthetic RSNA-like dataset: readable by the project's own readers, labelled, quirky."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from ich_prep import LABELS
from ich_prep import synth as synth_module
from ich_prep.errors import UserError
from ich_prep.labels import read_labels
from ich_prep.read_dicom import ImageError, quiet_rsna_uids, read_header, read_slice
from ich_prep.synth import (
    MIN_BLEED_MM2,
    SUBTYPES,
    Bleed,
    SynthError,
    blood_hu,
    draw_slice,
    encode_hu,
    taper,
    write_synthetic,
)
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
    """Positive slices hold a blood-density area; negative slices have next to none, except the
    share of them that carry a mimic (MIMIC_RATE, drawn at a thin end's density).

    Blood is 72 HU down to about 50 at a bleed's thin ends (ventricular blood 6 HU darker), brain
    at most 37 HU plus noise: a 3x3 median takes the noise out, so 48-100 HU after it is blood (or
    a mimic) and nothing else, and each labelled slice has most of its bleed's area there.
    """
    lab = labels.labels
    dense = []
    for image_id, _, h, hu in slices:
        if image_id not in lab.index:
            continue
        med = cv2.medianBlur(hu.astype(np.float32), 3)
        blood_mm2 = ((med >= 48) & (med <= 100)).sum() * h["pixel_spacing_x"] ** 2
        if lab.at[image_id, "any"]:
            assert blood_mm2 > 0.8 * MIN_BLEED_MM2, image_id
        else:
            dense.append(blood_mm2 >= 10)
    assert len(dense) > 20 and 0.05 < np.mean(dense) < synth_module.MIMIC_RATE + 0.15


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
    """Two runs with one seed write identical files (bleeds and labels included); another seed
    writes different ones."""
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_synthetic(tmp_path / name, patients=2, seed=seed, slices_per_series=6)
    a, b, c = (_tree(tmp_path / name) for name in "abc")
    assert a == b
    assert set(a) != set(c)
    assert read_labels(tmp_path / "a" / "stage_2_train.csv").labels["any"].sum() >= 2


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
    with pytest.raises(SynthError, match="is a file, not a folder"):
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


# ---------------------------------------------------------------- bleeds along the series

TRACE_SLICES = 8


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """write_synthetic on ~180 train series of 8 slices, each slice's blood pixels counted.

    Blood is painted with a code per subtype (10000 + 1000 x its index) instead of its HU, so
    every drawn bleed pixel is found and named exactly; the DICOM writer only records the slice
    (id, series, z). Returns the summary and, per slice in writing order, a dict with the ids,
    z, the pixel count per subtype, what draw_slice reported, and the bleeds it was given.
    """
    rows, draw = [], synth_module.draw_slice

    def counting_draw(shape, spacing, head, frac, bleeds, rng, mimics=()):
        hu, fov, seen = draw(shape, spacing, head, frac, bleeds, rng, mimics)
        code = np.rint((hu[hu > 5000] - 10000) / 1000).astype(int)
        counts = {SUBTYPES[c]: int(n) for c, n in enumerate(np.bincount(code, minlength=5)) if n}
        rows.append({"counts": counts, "seen": dict(seen), "bleeds": [b for b, _ in bleeds],
                     "mimics": list(mimics)})  # fmt: skip
        return hu, fov, seen

    def recording_write(path, image_id, ser, z, stored, tags):
        rows[-1].update(image_id=image_id, series=ser["series"], z=z)
        path.write_bytes(b"DICM")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth_module, "draw_slice", counting_draw)
        mp.setattr(synth_module, "_write_dicom", recording_write)
        mp.setattr(
            synth_module, "blood_hu", lambda b, s: 10000.0 + 1000 * SUBTYPES.index(b.subtype)
        )
        info = write_synthetic(tmp_path_factory.mktemp("traced"), patients=160, seed=11,
                               slices_per_series=TRACE_SLICES, test_patients=0)  # fmt: skip
    return info, rows


def _by_series(rows) -> dict[str, list[dict]]:
    """Slices grouped by series, each list in z order (the order the builder ranks them in)."""
    out = defaultdict(list)
    for row in rows:
        out[row["series"]].append(row)
    return {sid: sorted(sl, key=lambda r: r["z"]) for sid, sl in out.items()}


def _runs(rows):
    """(subtype, its visible area per slice of the series, the Bleed) for every bleed drawn."""
    for sl in _by_series(rows).values():
        bleeds = {b for r in sl for b in r["bleeds"]}
        for b in bleeds:
            areas = [r["counts"].get(b.subtype, 0) for r in sl]
            if any(areas):
                yield b.subtype, areas, b


def test_labels_match_the_blood_pixels_exactly(traced):
    """A slice is positive for a subtype exactly when it holds that subtype's blood pixels.

    The CSV's label of every train image, subtype by subtype, is whether its slice has pixels
    painted as that subtype's blood; `any` whether it has any blood; the areas draw_slice reports
    are the painted counts, each at least MIN_BLEED_MM2; a negative slice has no blood pixel.
    """
    info, rows = traced
    lab = read_labels(info["labels_csv"]).labels
    assert len(rows) == info["train_images"] == len(lab) > 1000
    negatives = 0
    for row in rows:
        assert row["counts"] == row["seen"], row["image_id"]
        got = lab.loc[row["image_id"]]
        for st in SUBTYPES:
            assert got[st] == (row["counts"].get(st, 0) > 0), (row["image_id"], st)
        assert got["any"] == bool(row["counts"])
        negatives += not row["counts"]
    assert 0.3 < 1 - negatives / len(rows) < 0.6


def test_a_bleed_spans_neighbouring_slices(traced):
    """Each bleed shows on consecutive slices of its series; most on several, none with gaps."""
    spans = []
    for st, areas, _ in _runs(traced[1]):
        shown = np.flatnonzero(areas)
        assert (np.diff(shown) == 1).all(), (st, areas)
        spans.append(len(shown))
    spans = np.array(spans)
    assert len(spans) > 150
    assert (spans >= 2).mean() > 0.75 and (spans >= 3).mean() > 0.5 and spans.max() >= 6
    for st in SUBTYPES:
        assert np.mean([len(np.flatnonzero(a)) for s, a, _ in _runs(traced[1]) if s == st]) > 2


def test_bleed_areas_rise_then_fall(traced):
    """A bleed not cut by the series' ends grows to its widest slice and shrinks after it.

    Its area per slice never falls before its largest slice nor rises after it, and its first
    and last slices (the thin ends, the ones ambiguous on their own) are smaller than the
    largest, typically well under half of it.
    """
    whole, end_share = defaultdict(int), []
    for st, areas, _ in _runs(traced[1]):
        shown = np.flatnonzero(areas)
        if shown[0] == 0 or shown[-1] == TRACE_SLICES - 1 or len(shown) < 3:
            continue  # cut by an end of the series, or too short to have a middle
        a = np.array(areas)[shown[0] : shown[-1] + 1]
        top = int(np.argmax(a))
        assert (np.diff(a[: top + 1]) >= 0).all() and (np.diff(a[top:]) <= 0).all(), (st, a)
        assert a[0] < a[top] and a[-1] < a[top], (st, a)
        end_share += [a[0] / a[top], a[-1] / a[top]]
        whole[st] += 1
    assert all(whole[st] >= 3 for st in SUBTYPES), dict(whole)
    assert np.median(end_share) < 0.5


def test_thin_ends_are_fainter():
    """Blood is densest where a bleed is widest, fainter towards its ends (partial volume with
    brain: at its thinnest end about half-way from cortex, 37 HU, to blood); never brain-like."""
    for st in SUBTYPES:
        b = Bleed(st, 3.0, 2.0, 0.0, 0.2, 0.5)
        hu = [blood_hu(b, taper(d)) for d in (0.0, 0.5, 0.9, 0.99)]
        assert hu == sorted(hu, reverse=True) and hu[0] - hu[-1] > 16, (st, hu)
        assert 40 < min(hu) < 55, (st, hu)


def _auc(y: np.ndarray, x: np.ndarray) -> float:
    """Probability that a positive's x exceeds a negative's (ties count half): ROC AUC."""
    from scipy.stats import rankdata

    r, n1 = rankdata(x), int(y.sum())
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def test_position_does_not_predict_the_label(traced):
    """A slice's place in its series (rank / (len - 1), from z) says nothing about `any`.

    Bleeds are placed anywhere along a series, reaching past either end, so AUC(position ->
    any) is near 0.5 and the positive rate is about the same at the ends as in the middle.
    """
    info, rows = traced
    lab = read_labels(info["labels_csv"]).labels
    pos, y = [], []
    for sl in _by_series(rows).values():
        for rank, row in enumerate(sl):
            pos.append(rank / (len(sl) - 1))
            y.append(bool(lab.at[row["image_id"], "any"]))
    pos, y = np.array(pos), np.array(y)
    assert 0.4 < _auc(y, pos) < 0.6
    ends, middle = y[(pos < 0.25) | (pos > 0.75)].mean(), y[(pos >= 0.25) & (pos <= 0.75)].mean()
    assert abs(ends - middle) < 0.08, (ends, middle)


def test_mimics_look_like_thin_ends_on_one_slice_and_are_never_labelled(traced):
    """About MIMIC_RATE of slices carry a mimic, on that slice alone, positive or negative; a
    slice with a mimic and no bleed is labelled negative, and its mimic is drawn at blood density
    in the brain, as dense as a bleed's thin end (so one slice cannot tell them apart)."""
    info, rows = traced
    lab = read_labels(info["labels_csv"]).labels
    with_mimic = np.array([bool(r["mimics"]) for r in rows])
    assert abs(with_mimic.mean() - synth_module.MIMIC_RATE) < 0.05
    only = [r for r in rows if r["mimics"] and not r["counts"]]
    assert len(only) > 100 and not lab.loc[[r["image_id"] for r in only]].to_numpy().any()
    for shape, s in (m for r in only[:50] for m in r["mimics"]):
        assert synth_module.MIMIC_SCALE[0] <= s <= synth_module.MIMIC_SCALE[1]
        assert synth_module.mimic_hu(s) == blood_hu(replace(shape, subtype="subdural"), s)


def test_a_mimic_is_drawn_at_blood_density_and_not_reported():
    """draw_slice paints a mimic's pixels at its density inside the brain and reports no subtype."""
    head = synth_module.Head(70.0, 88.0, 7.0, 0.0, -8.0, 0.0, 12.0)
    shape = Bleed("intraparenchymal", 0.0, 1.0, 0.3, 0.2, 0.0, (0.2, 0.1))
    plain, _, seen0 = draw_slice((256, 256), 0.95, head, 0.5, [], np.random.default_rng(1))
    hu, _, seen = draw_slice(
        (256, 256), 0.95, head, 0.5, [], np.random.default_rng(1), [(shape, 0.6)]
    )
    assert seen == seen0 == {}
    changed = np.abs(hu - plain) > 1e-3  # the same noise on both: only the mimic differs
    assert changed.sum() * 0.95**2 > 30  # a visible blob of more than 30 mm^2
    assert abs(np.median(hu[changed]) - synth_module.mimic_hu(0.6)) < 1.0  # noise: median 0
    assert np.median(plain[changed]) < 40  # drawn over brain, not over bone or air
