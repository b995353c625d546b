"""A synthetic RSNA-like head-CT dataset: HU phantoms with labelled hemorrhages, written as DICOM.

Drawing is pure numpy (`draw_slice` makes HU), `encode_hu` maps HU to stored values the way one
real series would store them, and `write_synthetic` writes the files, the labels CSV and the
storage quirks of the real data. Everything follows from `seed`; the same seed gives the same bytes.

A bleed is a blob along its series (`Bleed`: centre slice and reach), placed anywhere along it:
its cross-section is largest mid-way and tapers, smaller and fainter, towards both ends (partial
volume: at a tapering end a 5 mm slice holds blood in part of its thickness, so its voxels average
blood with brain, down to about half-way from brain to blood), so its end slices are ambiguous on
their own, and a slice's rank says nothing about its label. A slice is
labelled with exactly the subtypes whose blood is drawn on it (at least MIN_BLEED_MM2 of it).

Mimics make a slice's neighbours matter, as they do on real CT: about MIMIC_RATE of all slices
carry one hyperdensity of blood density and a bleed's shape (the partial volume of bone near the
skull base, a calcification) on that slice alone. On its own slice it looks like a bleed's thin
end; only the neighbours tell them apart (a bleed continues on the next slice, a mimic does not).
Mimics are never labelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ich_prep import LABELS
from ich_prep.errors import UserError
from ich_prep.location import file_in_the_way, what_is
from ich_prep.read_dicom import quiet_rsna_uids

SUBTYPES = LABELS[1:]
CSV_ORDER = (*SUBTYPES, "any")  # the Kaggle row order within one image
MIN_BLEED_MM2 = 30.0  # a bleed smaller than this after overlaps is not drawn, so never labelled
AIR, CSF, BLOOD = -1000.0, 6.0, 72.0
# a thin end is up to FAINT HU fainter (partial volume: a 5 mm slice through a bleed's tapering end
# holds blood in part of its thickness, averaged with brain); ventricular blood is darker
FAINT, IVH_DARKER = 22.0, 6.0
OEDEMA = 1.35  # the oedema around a parenchymal bleed is this much larger in every direction
EXTENT = {  # a bleed's reach either side of its centre: 1 slice + this share of the series
    "epidural": (0.12, 0.22),
    "subdural": (0.2, 0.35),
    "intraparenchymal": (0.1, 0.2),
    "intraventricular": (0.15, 0.3),
    "subarachnoid": (0.15, 0.35),
}
MIMIC_RATE = 0.3  # share of slices with one single-slice, never labelled, bleed-like hyperdensity
MIMIC_SCALE = (0.35, 0.75)  # its cross-section factor: the size and density of a bleed's thin end
PLACE = 0.9  # a bleed's centre may lie up to PLACE x its reach beyond either end of the series
FORMS = ("signed16", "unsigned12", "wrap12")
# standard normal at 256 equally likely levels: noise from one random byte a pixel, 6x faster
NORMAL_LEVELS = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)


class SynthError(UserError, ValueError):
    """A synthetic set that cannot be written as asked (a count below 1, --out not a folder)."""


@dataclass(frozen=True)
class Head:
    """One series' anatomy in mm: outer skull half-axes, skull, offset from image centre, tilt."""

    a: float
    b: float
    skull: float
    cx: float
    cy: float
    tilt: float
    gap: float  # head-to-table distance
    sulci: int = 19  # number of sulci around the convexity, the same on every slice
    phase: tuple[float, float, float] = (0.0, 0.0, 0.0)  # where the sulci lie and how they wind


@dataclass(frozen=True)
class Bleed:
    """A hemorrhage of one subtype: a blob centred at slice `kc`, reaching `hz` slices either side.

    Its cross-section on slice k is scaled by `taper((k - kc) / hz)`: whole mid-way, shrinking
    like an ellipsoid's towards both ends, nothing beyond. Shape numbers are normalised.
    """

    subtype: str
    kc: float
    hz: float
    angle: float
    size: float
    width: float
    pos: tuple[float, float] = (0.0, 0.0)

    def reach(self) -> float:
        """How far (in units of hz) the bleed shows on a slice: its oedema reaches further."""
        return OEDEMA if self.subtype == "intraparenchymal" else 1.0


def taper(d: float) -> float:
    """Cross-section factor of an ellipsoid at normalised distance d from its centre (0 beyond 1)."""
    return math.sqrt(1.0 - d * d) if abs(d) < 1.0 else 0.0


def blood_hu(b: Bleed, s: float) -> float:
    """The bleed's density where its cross-section factor is s: fainter at its thin ends."""
    return BLOOD - FAINT * (1.0 - s) - (IVH_DARKER if b.subtype == "intraventricular" else 0.0)


def mimic_hu(s: float) -> float:
    """A mimic's density at cross-section factor s: that of a bleed's end of the same size."""
    return BLOOD - FAINT * (1.0 - s)


def plan_mimics(rng, n: int) -> list[list[tuple[Bleed, float]]]:
    """Per slice of a series of n, its mimics: with probability MIMIC_RATE one (Bleed, s), the
    shape of a random subtype's bleed at a thin end's cross-section factor s."""
    out = []
    for _ in range(n):
        if rng.random() >= MIMIC_RATE:
            out.append([])
            continue
        shape = _plan_bleeds(rng, 1, SUBTYPES[int(rng.integers(len(SUBTYPES)))])[0]
        out.append([(shape, float(rng.uniform(*MIMIC_SCALE)))])
    return out


def _noise(rng, shape, sd: float) -> np.ndarray:
    """Gaussian-like noise (float32, `sd` HU, within 2.9 sd) of the given shape."""
    return (sd * NORMAL_LEVELS)[rng.integers(0, 256, shape, dtype=np.uint8)]


def _ellipse(u, v, cu, cv, ra, rb, ang=0.0):
    if ang == 0.0:
        return ((u - cu) / ra) ** 2 + ((v - cv) / rb) ** 2 <= 1.0
    c, s = math.cos(ang), math.sin(ang)
    du, dv = u - cu, v - cv
    return ((c * du + s * dv) / ra) ** 2 + ((-s * du + c * dv) / rb) ** 2 <= 1.0


def bleed_mask(b: Bleed, s: float, g: dict) -> np.ndarray:
    """Boolean mask of one bleed's cross-section (factor 0 < s <= 1) on a slice.

    `g` holds the anatomy grids made by `draw_slice`. Each subtype keeps its look and shrinks
    with s: a parenchymal ellipse (fixed size in mm), a biconvex epidural lens and a subdural
    crescent along the inner skull (thinner and shorter), sulcal subarachnoid blood over a
    narrower arc (and less of the fissure), intraventricular blood filling less of the horn.
    """
    u, v, brain, r = g["u"], g["v"], g["brain"], g["r"]
    if b.subtype == "intraparenchymal":
        ra = b.size * s * g["a_mid"]
        return _ellipse(u, v, b.pos[0] * g["a_in"], b.pos[1] * g["b_in"], ra, ra * 0.8, b.angle)
    if b.subtype == "intraventricular":  # blood settles in the dependent (posterior) horns
        return g["vent"] & (v > g["vent_v"] + g["vent_b"] * (1 - s * (1 - b.pos[1])))
    d = np.abs(g["phi"] - ((b.angle + math.pi) % (2 * math.pi) - math.pi))
    dphi = np.minimum(d, 2 * math.pi - d)  # angular distance to the bleed's centre
    mm = g["a_mid"] / g["a_in"]  # thickness in mm, not shrinking with the head towards the top
    if b.subtype == "epidural":  # biconvex lens: thickest mid-way, both margins convex
        t = b.size * s * mm * np.clip(1 - (dphi / (b.width * s)) ** 2, 0, None)
        return brain & (1 - r < t)
    if b.subtype == "subdural":  # thin crescent along the inner skull, tapering ends
        w = b.width * math.sqrt(s)
        t = b.size * s * mm * np.sqrt(np.sqrt(np.clip(1 - (dphi / w) ** 2, 0, None)))
        return brain & (1 - r < t)
    sah = brain & (g["sulc"] > math.cos(g["n_sulci"] * 5.0 / g["r_mm"] / 2)) & (dphi < b.width * s)
    if b.size > 0.5:  # half of them also fill the interhemispheric fissure
        sah |= brain & (np.abs(u) < 1.8) & (v < -(1 - 0.7 * s) * g["b_in"])
    return sah


def _head_grid(shape, spacing, head, k):
    """Head-frame coordinates (mm) over the head's bounding box, and that box as slices."""
    a, b = head.a * k + 5, head.b * k + 5
    c, s = math.cos(head.tilt), math.sin(head.tilt)
    hw, hh = math.hypot(a * c, b * s) / spacing, math.hypot(a * s, b * c) / spacing
    r0, c0 = (shape[0] - 1) / 2 + head.cy / spacing, (shape[1] - 1) / 2 + head.cx / spacing
    rs = slice(max(0, int(r0 - hh)), min(shape[0], int(r0 + hh) + 2))
    cs = slice(max(0, int(c0 - hw)), min(shape[1], int(c0 + hw) + 2))
    y = ((np.arange(rs.start, rs.stop, dtype=np.float32) - r0) * spacing)[:, None]
    x = ((np.arange(cs.start, cs.stop, dtype=np.float32) - c0) * spacing)[None, :]
    return c * x + s * y, -s * x + c * y, (rs, cs)


def draw_slice(shape, spacing, head, frac, bleeds, rng, mimics=()):
    """HU (H, W) float32, FOV mask (H, W) and the visible subtypes of one slice with their areas.

    `frac` is the slice height in the series (0 bottom, 1 top; the head shrinks towards the top);
    `bleeds` are (Bleed, d) pairs, d = (k - kc) / hz the slice's distance from the bleed's centre
    in units of its reach along the series. A subtype is visible, and returned with its area in
    pixels, when at least MIN_BLEED_MM2 of its cross-section is drawn; otherwise none of it is.
    `mimics` are (Bleed, s) pairs drawn at a thin end's density where no blood is, never returned.
    """
    t = 0.05 + 0.7 * frac
    k = math.sqrt(1 - t * t)
    u, v, box = _head_grid(shape, spacing, head, k)
    a_out, b_out = head.a * k, head.b * k
    a_in, b_in = a_out - head.skull, b_out - head.skull
    un, vn = u / a_in, v / b_in
    r = np.sqrt(un * un + vn * vn)
    phi = np.arctan2(vn, un)
    brain = r <= 1.0
    out = np.full(u.shape, AIR, np.float32)
    out[_ellipse(u, v, 0, 0, a_out + 4, b_out + 4)] = 30.0  # scalp
    skull = _ellipse(u, v, 0, 0, a_out, b_out)
    bone = 1050 + _noise(rng, int(skull.sum()), 160.0)
    out[skull] = np.clip(bone, 700, 1500)
    out[brain] = np.where(r[brain] > 0.82, 37.0, 29.0)  # cortex ribbon, white matter
    n_sulci, ph = head.sulci, head.phase
    band = brain & (r > 1 - 0.17 * (0.75 + 0.25 * np.sin(4 * phi + ph[2])))
    sulc = np.where(band, np.cos(n_sulci * phi + ph[0] + 0.6 * np.sin(3 * phi + ph[1])), -1)
    r_mm = math.sqrt(a_in * b_in)
    g = {"u": u, "v": v, "r": r, "phi": phi, "brain": brain, "a_in": a_in, "b_in": b_in}
    g.update(sulc=sulc, n_sulci=n_sulci, r_mm=r_mm, a_mid=head.a - head.skull)
    out[sulc > math.cos(n_sulci * 1.5 / r_mm / 2)] = CSF
    out[brain & (r > 0.985)] = CSF
    out[brain & (np.abs(u) < 0.8) & (np.abs(v) > 0.45 * b_in)] = CSF  # interhemispheric fissure
    vf = float(np.clip((0.95 - t) / 0.5, 0.0, 1.0))
    g.update(vent=np.zeros(u.shape, bool), vent_v=3.0, vent_b=max(vf, 1e-3) * 0.3 * head.b)
    if vf > 0.1:
        va, vb = vf * 0.075 * head.a, vf * 0.3 * head.b
        g["vent"] = _ellipse(u, v, -9, 3, va, vb, -0.15) | _ellipse(u, v, 9, 3, va, vb, 0.15)
        out[g["vent"] & brain] = CSF
    for bl, d in bleeds:  # oedema around a parenchymal bleed, also beyond its ends; never labelled
        if bl.subtype == "intraparenchymal" and abs(d) < OEDEMA:
            rim = replace(bl, size=bl.size * OEDEMA)
            out[bleed_mask(rim, taper(d / OEDEMA), g) & brain] = 20.0
    cut = [(bl, taper(d)) for bl, d in bleeds if abs(d) < 1.0]
    masks = [(bl, sc, bleed_mask(bl, sc, g) & brain) for bl, sc in cut]
    min_px = MIN_BLEED_MM2 / spacing**2
    while True:  # drop bleeds too small or mostly hidden by later ones until all that stay show
        owner = np.full(u.shape, -1, np.int16)
        for i, (_, _, m) in enumerate(masks):
            owner[m] = i
        areas = np.bincount(owner[owner >= 0], minlength=len(masks))
        if (areas >= min_px).all():
            break
        masks = [bm for bm, n in zip(masks, areas, strict=True) if n >= min_px]
    for i, (bl, sc, _) in enumerate(masks):
        out[owner == i] = blood_hu(bl, sc)
    for mb, sc in mimics:
        out[bleed_mask(mb, sc, g) & brain & (owner < 0)] = mimic_hu(sc)
    hu = np.full(shape, AIR, np.float32)
    hu[box] = out
    rows, cols = shape
    y = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing)[:, None]
    x = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * spacing)[None, :]
    top = head.cy + head.b + 4 + head.gap - 0.0025 * x**2  # the table, curved like a cradle
    for off, val in ((0.0, 150.0), (9.0, 40.0)):
        hu[(y >= top + off) & (y < top + off + 2.0) & (np.abs(x) < 105)] = val
    hu += _noise(rng, shape, 5.0)
    fov = x**2 + y**2 <= (min(rows, cols) / 2 * spacing) ** 2
    return hu, fov, {bl.subtype: int(n) for (bl, _, _), n in zip(masks, areas, strict=True)}


def encode_hu(hu: np.ndarray, fov: np.ndarray, form: str) -> tuple[np.ndarray, dict]:
    """HU (H, W) -> stored values (H, W) and the storage tags of one series' storage form.

    signed16: int16, intercept -1024, outside the FOV raw -2000. unsigned12: uint16 0..4095,
    intercept -1024. wrap12: the RSNA bug, values offset for -1000 with an intercept of 0 or 1, so
    stored = HU mod 4096 (air stored as 3096); `transform.stored_to_hu` recovers the HU.
    """
    h = np.rint(hu).astype(np.int32)
    if form == "signed16":
        stored = np.where(fov, np.clip(h, -1024, 3071) + 1024, -2000).astype(np.int16)
        return stored, {"BitsStored": 16, "PixelRepresentation": 1, "RescaleIntercept": "-1024"}
    if form == "unsigned12":
        stored = np.where(fov, np.clip(h + 1024, 0, 4095), 0).astype(np.uint16)
        return stored, {"BitsStored": 12, "PixelRepresentation": 0, "RescaleIntercept": "-1024"}
    stored = (np.where(fov, np.clip(h, -1000, 3095), -1000) % 4096).astype(np.uint16)
    return stored, {"BitsStored": 12, "PixelRepresentation": 0, "RescaleIntercept": "1"}


def _plan_bleeds(rng, n, primary) -> list[Bleed]:
    """Bleeds of one positive series of n slices: `primary`, and now and then other subtypes.

    Each is a blob along the series reaching `hz` slices either side of its centre `kc`
    (1 slice plus EXTENT's share of the series), placed anywhere: its centre lies from PLACE * hz
    before the first slice to PLACE * hz after the last, so a slice's rank does not tell whether
    it shows a bleed, and a bleed can be cut by either end of the series.
    """
    chosen = [primary] + [s for s in SUBTYPES if s != primary and rng.random() < 0.2]
    out = []
    base = rng.uniform(0, 2 * np.pi)
    for st in chosen:
        lo, hi = EXTENT[st]
        hz = 1.0 + rng.uniform(lo, hi) * (n - 1)
        kc = rng.uniform(-PLACE * hz, n - 1 + PLACE * hz)
        offset = {"epidural": 0.0, "subdural": np.pi, "subarachnoid": np.pi / 2}.get(st, 0.0)
        angle = base + offset + rng.uniform(-0.4, 0.4)
        size, width = {
            "epidural": (rng.uniform(0.17, 0.25), rng.uniform(0.4, 0.6)),
            "subdural": (rng.uniform(0.08, 0.11), rng.uniform(0.9, 1.4)),
            "intraparenchymal": (rng.uniform(0.13, 0.22), 0.0),
            "intraventricular": (0.0, 0.0),
            "subarachnoid": (rng.random(), rng.uniform(0.6, 1.0)),
        }[st]
        rad, ang = rng.uniform(0.1, 0.45), rng.uniform(0, 2 * np.pi)
        pos = (rad * math.cos(ang), rad * math.sin(ang))
        if st == "intraventricular":
            pos = (0.0, rng.uniform(-0.5, 0.1))
        out.append(Bleed(st, float(kc), float(hz), float(angle), float(size), float(width), pos))
    return out


def _hexid(rng, digits: int, used: set) -> str:
    while True:
        s = "ID_" + format(int(rng.integers(0, 16**digits)), f"0{digits}x")
        if s not in used:
            used.add(s)
            return s


def _series_tags(rng, form: str, decimal: bool) -> dict:
    """Slope, windows and (where a series overrides encode_hu's) intercept, as strings."""
    if form == "signed16" and decimal:
        return {"RescaleIntercept": "-1024.000000", "RescaleSlope": "1.000000",
                "WindowCenter": "35.000000", "WindowWidth": "135.000000"}  # fmt: skip
    if form == "signed16":
        return {"RescaleSlope": "1", "WindowCenter": "30", "WindowWidth": "80"}
    wc = f"{int(rng.choice([36, 40])):05d}"
    tags = {"RescaleSlope": "1", "WindowCenter": [wc, wc], "WindowWidth": ["00080", "00080"]}
    return tags | ({"RescaleIntercept": str(rng.choice(["0", "1"]))} if form == "wrap12" else {})


def _write_dicom(path: Path, image_id: str, ser: dict, z: float, stored: np.ndarray, tags: dict):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = image_id
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if ser["explicit"] else ImplicitVRLittleEndian
    meta.ImplementationClassUID, meta.ImplementationVersionName = "1.2.3.4", "ICH_PREP_SYNTH"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPInstanceUID, ds.Modality = image_id, "CT"
    ds.PatientID = ser["patient"]
    ds.StudyInstanceUID = ser["study"]
    ds.SeriesInstanceUID = ser["series"]
    ds.StudyID = ""
    rows, cols = stored.shape
    sp = ser["spacing"]
    ds.ImagePositionPatient = [f"{-cols / 2 * sp:.6f}", f"{-rows / 2 * sp + 10:.6f}", f"{z:.6f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [f"{sp:.6f}", f"{sp:.6f}"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, tags["BitsStored"], tags["BitsStored"] - 1
    ds.PixelRepresentation = tags["PixelRepresentation"]
    ds.WindowCenter, ds.WindowWidth = ser["tags"]["WindowCenter"], ser["tags"]["WindowWidth"]
    ds.RescaleIntercept = ser["tags"].get("RescaleIntercept", tags["RescaleIntercept"])
    ds.RescaleSlope = ser["tags"]["RescaleSlope"]
    ds.add_new(0x7FE00010, "OW", stored.astype(stored.dtype.newbyteorder("<")).tobytes())
    ds.save_as(path, enforce_file_format=True)


def _make_series(rng, patients: int, used: set) -> list[dict]:
    """One series per patient (about one patient in eight has a second study), plain storage."""
    series = []
    for p in range(patients):
        pid, b = _hexid(rng, 8, used), float(rng.uniform(84, 94))
        a, skull = b * float(rng.uniform(0.78, 0.86)), float(rng.uniform(6, 8))
        for _ in range(2 if rng.random() < 0.12 or (p == 1 and patients > 2) else 1):
            pose = rng.uniform([-6, -10, -0.12, 10], [6, -5, 0.12, 14]).tolist()
            head = Head(a, b, skull, *pose)
            ids = {"patient": pid, "study": _hexid(rng, 10, used), "series": _hexid(rng, 10, used)}
            plain = {"form": "signed16", "size": (512, 512), "decimal": False}
            series.append({**ids, "head": head, "z0": rng.uniform(60, 180), **plain})
    return series


def _add_quirks(rng, train: list[dict], test: list[dict]) -> None:
    """Storage forms and odd sizes as in the real data, each at least once in `train`."""
    for s in train + test:
        s["form"] = str(rng.choice(FORMS, p=[0.55, 0.35, 0.10]))
        s["decimal"] = bool(rng.random() < 0.3)
        if rng.random() < 0.12:
            s["size"] = [(256, 256), (460, 460), (512, 560)][int(rng.integers(3))]
    forced = [{"form": "wrap12"}, {"form": "unsigned12"}, {"form": "signed16", "decimal": True},
              {"size": (460, 460)}, {"size": (256, 256)}]  # fmt: skip
    for i, f in zip(rng.permutation(len(train)), forced, strict=False):
        train[int(i)].update(f)


def _write_series(folder: Path, ser: dict, n: int, bleeds: list[Bleed], rng, used: set):
    """Draw, encode and write the n slices of one series; yields (path, {subtype: area px})."""
    ser["tags"] = _series_tags(rng, ser["form"], ser["decimal"])
    ser["explicit"] = ser["form"] == "signed16"
    ser["spacing"] = round(rng.uniform(235, 250) / min(ser["size"]), 6)
    sulci, phase = int(rng.integers(16, 22)), tuple(rng.uniform(0, 2 * np.pi, 3).tolist())
    ser["head"] = replace(ser["head"], sulci=sulci, phase=phase)  # one brain for all its slices
    mimics = plan_mimics(np.random.default_rng(ser["mimic_seed"]), n)  # apart: labels unchanged
    for k in range(n):
        near = [(bl, (k - bl.kc) / bl.hz) for bl in bleeds]  # where this slice cuts each bleed
        near = [(bl, d) for bl, d in near if abs(d) < bl.reach()]
        frac = k / (n - 1) if n > 1 else 0.5
        hu, fov, seen = draw_slice(ser["size"], ser["spacing"], ser["head"], frac, near, rng, mimics[k])  # fmt: skip
        stored, tags = encode_hu(hu, fov, ser["form"])
        image_id = _hexid(rng, 9, used)
        path = folder / f"{image_id}.dcm"
        with quiet_rsna_uids():
            _write_dicom(path, image_id, ser, ser["z0"] + 5 * k, stored, tags)
        yield path, seen


def write_synthetic(
    out: str | Path,
    patients: int = 24,
    seed: int = 0,
    slices_per_series: int = 6,
    test_patients: int | None = None,
    quirks: bool = True,
) -> dict:
    """Write `out/stage_2_train/*.dcm`, `out/stage_2_test/*.dcm` and `out/stage_2_train.csv`.

    Returns the paths, image counts, patients and series per split, slices per series, corrupt
    image ids, duplicated CSV rows, train positives per label, the number of series per storage
    form, with a decimal rescale and of a size other than 512x512 (cli.synth_summary shows it).
    """
    out = Path(out)
    for flag, n, lo in (("--patients", patients, 1), ("--slices", slices_per_series, 1),
                        ("--seed", seed, 0), ("test_patients", test_patients, 0)):  # fmt: skip
        if n is not None and n < lo:
            raise SynthError(f"{flag} must be at least {lo}, got {n}")
    p = file_in_the_way(out, itself=True)
    if p is not None:
        where = "is" if p == out else f"lies inside {p}, which is"
        raise SynthError(f"--out {out} {where} {what_is(p)}, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        raise SynthError(
            f"--out {out} is not empty; synth writes a fresh set (its CSV must match its files): "
            "choose a new or empty folder"
        )
    n_test = max(2, patients // 4) if test_patients is None else test_patients
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    train, test = _make_series(rng, patients, used), _make_series(rng, n_test, used)
    if quirks:
        _add_quirks(np.random.default_rng([seed, 1]), train, test)
    first, n_pos = int(rng.integers(len(SUBTYPES))), 0
    rows, positives, files = [], dict.fromkeys(LABELS, 0), {"train": [], "test": []}
    for split, series in (("train", train), ("test", test)):
        folder = out / f"stage_2_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        negative = set(rng.permutation(len(series))[: round(0.35 * len(series))].tolist())
        for si, ser in enumerate(series):
            srng = np.random.default_rng([seed, 2, int(split == "test"), si])
            ser["mimic_seed"] = [seed, 3, int(split == "test"), si]
            bleeds = []
            if si not in negative:  # primary subtypes cycle, so every subtype occurs early
                bleeds = _plan_bleeds(srng, slices_per_series, SUBTYPES[(first + n_pos) % 5])
                n_pos += 1
            for path, seen in _write_series(folder, ser, slices_per_series, bleeds, srng, used):
                files[split].append(path)
                if split == "train":
                    lab = {st: int(st in seen) for st in SUBTYPES} | {"any": int(bool(seen))}
                    rows.append([f"{path.stem}_{st},{lab[st]}" for st in CSV_ORDER])
                    for key, val in lab.items():
                        positives[key] += val
    lines = [line for image_rows in sorted(rows) for line in image_rows]
    corrupt = []
    if quirks:
        for i in sorted(rng.choice(len(lines), size=min(3, len(lines)), replace=False))[::-1]:
            lines.insert(int(i) + 1, lines[int(i)])  # an identical duplicate row
        victim = files["train"][int(rng.integers(len(files["train"])))]
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 4])  # cut inside PixelData: a truncated copy
        corrupt.append(victim.stem)
    labels_csv = out / "stage_2_train.csv"
    labels_csv.write_text("ID,Label\n" + "".join(line + "\n" for line in lines))
    return {
        "train_dir": str(out / "stage_2_train"),
        "test_dir": str(out / "stage_2_test"),
        "labels_csv": str(labels_csv),
        "train_images": len(files["train"]),
        "test_images": len(files["test"]),
        "patients": {"train": patients, "test": n_test},
        "series": {"train": len(train), "test": len(test)},
        "slices_per_series": slices_per_series,
        "corrupt": corrupt,
        "duplicate_rows": len(lines) - 6 * len(rows),
        "positives": positives,
        "forms": {f: sum(s["form"] == f for s in train + test) for f in FORMS},
        "decimal_rescale": sum(bool(s["decimal"]) for s in train + test),
        "odd_sizes": sum(tuple(s["size"]) != (512, 512) for s in train + test),
    }
