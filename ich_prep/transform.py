"""Per-image arithmetic: stored values -> HU -> head crop -> square -> resize -> uint8 windows.

Pure functions over numpy arrays; no I/O, no globals. Shapes: (H, W) for one slice,
(size, size, 3) for the compiled image.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

AIR_HU = -1024.0
# The largest side a slice is resampled to with --spacing-mm (float32: 256 MiB). A 512-pixel RSNA
# slice at 0.5 mm resampled to 0.25 mm is 1024; a spacing 100x too fine asks for tens of GB.
MAX_RESAMPLED_PX = 8192
# Anything above this is tissue for the head mask: skin and fat are about -100..0 HU, air -1000.
TISSUE_HU = -300.0


def stored_to_hu(
    stored: np.ndarray,
    slope: float,
    intercept: float,
    bits_stored: int,
    pixel_representation: int,
    padding_value: int | None = None,
) -> np.ndarray:
    """Stored values (H, W) int -> Hounsfield units (H, W) float32, with the RSNA fixes.

    The 12-bit quirk: some RSNA slices store 12-bit unsigned values (BitsStored 12,
    PixelRepresentation 0) with RescaleIntercept > -100 although their values are offset for
    -1000; the known fix adds 1000, wraps values >= 4096 back by 4096 and uses intercept -1000.
    Padding outside the circular field of view (PixelPaddingValue, raw -2000, or anything that
    lands below air such as -3024 HU) is set to air so it never counts as tissue.
    """
    pad = stored == padding_value if padding_value is not None else None
    if bits_stored == 12 and pixel_representation == 0 and intercept > -100:
        x = stored.astype(np.int32) + 1000
        x[x >= 4096] -= 4096
        intercept = -1000.0
        hu = x.astype(np.float32)
    else:
        hu = stored.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # a huge slope: refused by check_hu
        hu *= np.float32(slope)
        hu += np.float32(intercept)
    np.maximum(hu, np.float32(AIR_HU), out=hu)
    if pad is not None:
        hu[pad] = AIR_HU
    return hu


def header_to_hu(stored: np.ndarray, header: dict) -> np.ndarray:
    """stored_to_hu with the rescale and storage fields of a read_dicom header dict."""
    return stored_to_hu(
        stored,
        header["rescale_slope"],
        header["rescale_intercept"],
        header["bits_stored"],
        header["pixel_representation"],
        header.get("pixel_padding_value"),
    )


def box_step(shape: tuple[int, ...]) -> int:
    """Subsampling step of head_box: about 128 pixels a side."""
    return max(1, min(shape) // 128)


def head_box(
    hu: np.ndarray, min_area_frac: float = 0.01, min_fill: float = 0.3
) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, y1, x0, x1), end-exclusive, of the head in an HU slice (H, W).

    Tissue = HU > TISSUE_HU on a view subsampled to about 128 pixels a side (the box needs no
    more precision than a few pixels, and this makes it ~10x cheaper); a 3x3 opening removes
    noise, then the largest connected component that fills at least `min_fill` of its own box
    counts (a head section is roughly elliptic, fill ~0.75; a curved head rest is a thin arc,
    fill ~0.1) and is not a thin line (a straight table edge).
    None if nothing covers `min_area_frac` of the slice (a slice of air above the head).
    """
    step = box_step(hu.shape)
    return box_of_subsampled(hu[::step, ::step], step, hu.shape, min_area_frac, min_fill)


# What Hounsfield units a head slice can hold (check_hu). Real CT lies in about [-1024, 3071]
# (12-bit scanners; anything below air is clipped to air); metal on an extended scale goes
# higher, but only over a small part of a head. A rescale that puts most of the head box above
# MAX_HEAD_HU (RescaleSlope 1e30: a binary 0/255 image), or makes the slice one value (1e-30:
# all air), gives no Hounsfield units. On the 109 real RSNA samples: no head-box pixel above
# 3071 HU, every slice spanning at least 1285 HU.
MAX_HEAD_HU = 3071.0
MAX_HIGH_FRACTION = 0.5  # of the head box's pixels (the whole slice's when it has no head box)
MIN_SPAN_HU = (
    20.0  # max - min over the slice: less is a constant image (CT noise in air spans more)
)


class ImplausibleHU(ValueError):
    """A slice whose rescale gives Hounsfield units no head CT has (check_hu)."""


def check_hu(small: np.ndarray, step: int, box: Box | None) -> None:
    """ImplausibleHU unless the HU view `small` (a slice subsampled by `step`, clipped at air) is
    finite, not one value (MIN_SPAN_HU), and at most MAX_HIGH_FRACTION of `box` (full-resolution
    pixels; None: the whole slice) lies above MAX_HEAD_HU."""
    if not np.isfinite(small).all():
        raise ImplausibleHU("HU overflow float32 (not finite): RescaleSlope is far too large")
    lo, hi = float(small.min()), float(small.max())
    if not hi - lo >= MIN_SPAN_HU:
        raise ImplausibleHU(f"every pixel is {lo:.6g} to {hi:.6g} HU, less than {MIN_SPAN_HU:g} HU apart (a constant image): RescaleSlope is far too small, or the slice holds no image")  # fmt: skip
    if box is not None:
        y0, y1, x0, x1 = box
        small = small[y0 // step : -(-y1 // step), x0 // step : -(-x1 // step)]
    high = float((small > MAX_HEAD_HU).mean())
    if high > MAX_HIGH_FRACTION:
        raise ImplausibleHU(f"{high:.0%} of the head box is above {MAX_HEAD_HU:g} HU, more than any head CT (bone, metal) has; RescaleSlope is far too large")  # fmt: skip


def stored_head_box(stored: np.ndarray, header: dict) -> tuple[int, int, int, int] | None:
    """head_box of header_to_hu(stored, header), converting only the subsampled view it looks at
    (1/16 of a 512x512 slice): the same answer, since the HU conversion is per pixel. Raises
    ImplausibleHU (check_hu, on the same view) for a rescale that gives no Hounsfield units."""
    step = box_step(stored.shape)
    small = header_to_hu(stored[::step, ::step], header)
    box = box_of_subsampled(small, step, stored.shape) if np.isfinite(small).all() else None
    check_hu(small, step, box)
    return box


def box_of_subsampled(
    small: np.ndarray,
    step: int,
    shape: tuple[int, ...],
    min_area_frac: float = 0.01,
    min_fill: float = 0.3,
) -> tuple[int, int, int, int] | None:
    """head_box's work on `small`, HU (h, w) = a slice of `shape` subsampled by `step`."""
    mask = (small > TISSUE_HU).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    x, y, w, h, area = (stats[1:, i] for i in range(5))
    thick = np.minimum(w, h) >= 0.04 * min(small.shape)
    ok = (area >= min_area_frac * small.size) & (area >= min_fill * w * h) & thick
    if not ok.any():
        return None
    b = int(np.argmax(np.where(ok, area, -1)))
    rows, cols = shape[:2]
    # Back to full resolution, widened by one step so the subsampling never clips the head.
    m = 1 if step > 1 else 0
    y0, x0 = max(0, (int(y[b]) - m) * step), max(0, (int(x[b]) - m) * step)
    y1, x1 = min(rows, (int(y[b] + h[b]) + m) * step), min(cols, (int(x[b] + w[b]) + m) * step)
    return y0, y1, x0, x1


def crop_to_square(
    hu: np.ndarray, box: tuple[int, int, int, int] | None, fill: float = AIR_HU
) -> np.ndarray:
    """Crop (H, W) to `box` and pad with `fill` to a square (S, S), the box centred; S = max side."""
    y0, y1, x0, x1 = box if box is not None else (0, hu.shape[0], 0, hu.shape[1])
    crop = hu[y0:y1, x0:x1]
    h, w = crop.shape
    s = max(h, w)
    out = np.full((s, s), fill, dtype=hu.dtype)
    oy, ox = (s - h) // 2, (s - w) // 2
    out[oy : oy + h, ox : ox + w] = crop
    return out


def fit_to_canvas(img: np.ndarray, size: int, fill: float = AIR_HU) -> np.ndarray:
    """Centre (S, S) on a (size, size) canvas: pad with `fill` if smaller, centre-crop if larger."""
    s = img.shape[0]
    out = np.full((size, size), fill, dtype=img.dtype)
    if s <= size:
        o = (size - s) // 2
        out[o : o + s, o : o + s] = img
    else:
        o = (s - size) // 2
        out[:] = img[o : o + size, o : o + size]
    return out


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """(S, S) float32 -> (size, size): area averaging when shrinking, bilinear when enlarging.

    Shrinking by a non-integer factor goes bilinear up to the next multiple of `size`, then area
    by that integer factor: cv2's integer-factor area path is ~4x faster than its general one
    (0.10 vs 0.46 ms for 430 -> 256) and averages the same neighbourhood.
    """
    s = img.shape[0]
    if s == size:
        return img
    if s < size:
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    k = -(-s // size)  # ceil(s / size)
    if s != k * size:
        img = cv2.resize(img, (k * size, k * size), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def resampled_side(side: int, pixel_mm: float, spacing_mm: float) -> int:
    """Side in pixels of a `side`-pixel square of `pixel_mm` mm pixels resampled to `spacing_mm`.

    Raises ValueError when that is not 1 to MAX_RESAMPLED_PX pixels (or not a number): a spacing
    so fine that the image cannot be allocated, or so coarse that the head vanishes to nothing."""
    exact = side * pixel_mm / spacing_mm if spacing_mm > 0 else math.nan
    if not (math.isfinite(exact) and 1 <= round(exact) <= MAX_RESAMPLED_PX):
        raise ValueError(
            f"resampling {side} pixels of {pixel_mm} mm to {spacing_mm} mm gives {exact:.4g} pixels "
            f"a side; refusing anything outside 1..{MAX_RESAMPLED_PX} (check --spacing-mm and "
            "PixelSpacing (0028,0030))"
        )
    return round(exact)


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """HU (H, W) -> uint8 (H, W): lo = center - width/2 maps to 0, lo + width to 255, rounded, clipped."""
    lo = center - width / 2.0
    scale = 255.0 / width
    out = (hu - np.float32(lo)) * np.float32(scale)
    np.clip(out, 0.0, 255.0, out=out)
    out += np.float32(0.5)  # round half up (values are >= 0 here)
    return out.astype(np.uint8)


Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive, in pixels of the original slice

# series_box's outlier rule (see its docstring).
OUTLIER_SMALL = 0.1  # area below this fraction of the series' median box area
OUTLIER_LARGE = 2.0  # area above this multiple of the median area
OUTLIER_SHIFT = 0.25  # centre further than this fraction of the median side from the median centre


def series_box(
    boxes: list[Box | None] | tuple[Box | None, ...],
    small: float = OUTLIER_SMALL,
    large: float = OUTLIER_LARGE,
    shift: float = OUTLIER_SHIFT,
) -> Box | None:
    """One crop box (y0, y1, x0, x1) for a series: the union of its slices' head boxes, outliers left out.

    `boxes` are head_box's answers for the slices of one series (one shape), each a box in pixels
    of the original slice, or None where no head was found. With A the median area (pixels^2) of
    the boxes that exist, (cy, cx) the median of their centres and S the median of their longer
    sides, a box is an outlier, and left out of the union, when
      - its area is below `small` * A (a stray fragment: a cap of skull above the vertex, a piece
        of head rest; the real end slices of a head lie inside the larger sections anyway),
      - its area is above `large` * A (a slice where the head merged with the table or a rest), or
      - its centre lies more than `shift` * S from (cy, cx) (something detected beside the head).
    Slices with no box (air above the head) do not count. The answer is the union (min y0, max
    y1, min x0, max x1) of the remaining boxes; if every box is an outlier (two heads' worth of
    disagreement), the union of all boxes; None when no slice has a box (crop nothing).
    On the two whole real RSNA series of the samples the only outliers are each series' top cap
    (0.07 and 0.03 of the median area), which lies inside the other boxes: the answer is their
    plain union, about 10% wider than the median slice's box.
    """
    found = np.array([b for b in boxes if b is not None], dtype=np.float64).reshape(-1, 4)
    if not len(found):
        return None
    y0, y1, x0, x1 = found.T
    area = (y1 - y0) * (x1 - x0)
    side = np.maximum(y1 - y0, x1 - x0)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    a, s = np.median(area), np.median(side)
    off = np.hypot(cy - np.median(cy), cx - np.median(cx))
    keep = (area >= small * a) & (area <= large * a) & (off <= shift * s)
    use = found[keep] if keep.any() else found
    return (
        int(use[:, 0].min()),
        int(use[:, 1].max()),
        int(use[:, 2].min()),
        int(use[:, 3].max()),
    )


def series_head_box(hus: list[np.ndarray]) -> Box | None:
    """series_box over the head boxes of HU slices (H, W) of one series (all of one shape)."""
    return series_box([head_box(hu) for hu in hus])


def compile_cropped(
    hu: np.ndarray,
    box: Box | None,
    windows: list[tuple[float, float]] | tuple[tuple[float, float], ...],
    size: int,
    pixel_spacing: tuple[float, float] | None = None,
    spacing_mm: float | None = None,
) -> np.ndarray:
    """HU slice (H, W) cropped to `box` ((y0, y1, x0, x1) in its pixels, None = the whole slice)
    -> uint8 image (size, size, len(windows)).

    Without `spacing_mm`: pad the crop to a square (crop_to_square), resize to `size`. With it:
    resample that square so one output pixel is `spacing_mm` mm (`pixel_spacing` in mm, rows and
    columns) and centre it on a size x size canvas, so all heads keep a common physical scale
    (field of view = size * spacing_mm). Slices of one shape and spacing cropped with the same box
    map every original pixel to the same output pixel: that is what makes a series' slices align.
    Resizing happens once, in HU, before windowing: three windows of 256x256, not of 512x512.
    """
    square = crop_to_square(hu, box)
    if spacing_mm is not None and pixel_spacing is not None and np.all(np.isfinite(pixel_spacing)):
        # Rows and columns share the spacing in RSNA data; use the row spacing (0028,0030)[0].
        target = resampled_side(square.shape[0], float(pixel_spacing[0]), spacing_mm)
        scaled = resize(square, target)
        out = fit_to_canvas(scaled, size)
    else:
        out = resize(square, size)
    return np.stack([window(out, c, w) for c, w in windows], axis=-1)


def compile_stored(
    stored: np.ndarray,
    header: dict,
    box: Box | None,
    windows: list[tuple[float, float]] | tuple[tuple[float, float], ...],
    size: int,
    spacing_mm: float | None = None,
) -> np.ndarray:
    """Stored values (H, W) of a slice with its read_dicom `header` -> uint8 image (size, size,
    len(windows)): compile_cropped(header_to_hu(stored, header), box, ...), converting to HU only
    the pixels inside `box` (the conversion is per pixel, so the bytes are the same). The row and
    column spacing come from the header's PixelSpacing (0028,0030)."""
    y0, y1, x0, x1 = box if box is not None else (0, stored.shape[0], 0, stored.shape[1])
    hu = header_to_hu(stored[y0:y1, x0:x1], header)
    spacing = (header["pixel_spacing_y"], header["pixel_spacing_x"])
    return compile_cropped(hu, None, windows, size, spacing, spacing_mm)


def compile_image(
    hu: np.ndarray,
    windows: list[tuple[float, float]] | tuple[tuple[float, float], ...],
    size: int,
    pixel_spacing: tuple[float, float] | None = None,
    spacing_mm: float | None = None,
) -> tuple[np.ndarray, Box | None]:
    """HU slice (H, W) -> (uint8 image (size, size, len(windows)), head box in the input or None):
    the slice cropped to its own head box (`--crop slice`; compile_cropped has the details)."""
    box = head_box(hu)
    return compile_cropped(hu, box, windows, size, pixel_spacing, spacing_mm), box
