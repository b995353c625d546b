"""Per-image arithmetic against hand-computed answers."""

import numpy as np
import pytest

from ich_prep.transform import (
    AIR_HU,
    MAX_RESAMPLED_PX,
    compile_image,
    crop_to_square,
    fit_to_canvas,
    head_box,
    resampled_side,
    resize,
    stored_to_hu,
    window,
)
from tests.conftest import phantom_hu


def test_signed_16bit_to_hu():
    """HU = stored * slope + intercept; FOV padding (-2000 stored, -3024 HU) becomes air."""
    stored = np.array([[-2000, 0, 1064, 2024]])
    hu = stored_to_hu(stored, 1.0, -1024.0, 16, 1)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, [[AIR_HU, -1024, 40, 1000]])


def test_twelve_bit_quirk_fixed():
    """BitsStored 12, unsigned, intercept > -100: add 1000, wrap at 4096, intercept -1000."""
    stored = np.array([[0, 40, 3100, 3095, 2000]])
    hu = stored_to_hu(stored, 1.0, 1.0, 12, 0)
    # 0 -> 1000-1000 = 0; 40 -> 40; 3100 -> 4100-4096=4 -> -996; 3095 -> 4095-1000 = 3095; 2000 -> 2000
    np.testing.assert_array_equal(hu, [[0, 40, -996, 3095, 2000]])


def test_twelve_bit_normal_intercept_untouched():
    """A 12-bit unsigned slice with the usual intercept -1024 is converted plainly."""
    hu = stored_to_hu(np.array([[0, 1064]]), 1.0, -1024.0, 12, 0)
    np.testing.assert_array_equal(hu, [[-1024, 40]])


def test_pixel_padding_value_is_air():
    """Stored values equal to PixelPaddingValue become air even when they would read as tissue."""
    hu = stored_to_hu(np.array([[63536 - 65536, 1064]]), 1.0, -1024.0, 16, 1, padding_value=-2000)
    np.testing.assert_array_equal(hu, [[AIR_HU, 40]])
    hu = stored_to_hu(np.array([[1000, 1064]]), 1.0, -1024.0, 16, 1, padding_value=1000)
    np.testing.assert_array_equal(hu, [[AIR_HU, 40]])


def test_slope_applied():
    """A slope of 2 doubles stored values before the intercept."""
    np.testing.assert_array_equal(stored_to_hu(np.array([[10]]), 2.0, -10.0, 16, 1), [[10]])


@pytest.mark.parametrize(
    "hu, expected",
    [(0, 0), (40, 128), (80, 255), (-10, 0), (100, 255), (20, 64)],
)
def test_window_brain(hu, expected):
    """Brain window L40/W80: 0 HU -> 0, 80 HU -> 255, halfway rounds half up."""
    out = window(np.array([[hu]], np.float32), 40, 80)
    assert out.dtype == np.uint8
    assert out[0, 0] == expected


def test_head_box_ignores_specks_and_table():
    """The box covers the largest tissue component, not noise or a thin table line."""
    hu = np.full((100, 100), -1000.0, np.float32)
    hu[20:60, 30:70] = 40.0  # head
    hu[5, 5] = 500.0  # speck
    hu[90:92, 10:90] = 100.0  # 2-pixel table line, removed by the opening
    assert head_box(hu) == (20, 60, 30, 70)


def test_head_box_none_on_air():
    """A slice of air has no head."""
    assert head_box(np.full((64, 64), -1000.0, np.float32)) is None


def test_crop_to_square_centres_box():
    """A 2x4 box is padded to 4x4 with air rows above and below, the box centred."""
    hu = np.arange(36, dtype=np.float32).reshape(6, 6)
    sq = crop_to_square(hu, (2, 4, 1, 5))
    assert sq.shape == (4, 4)
    np.testing.assert_array_equal(sq[0], [AIR_HU] * 4)
    np.testing.assert_array_equal(sq[1], hu[2, 1:5])
    np.testing.assert_array_equal(sq[2], hu[3, 1:5])
    np.testing.assert_array_equal(sq[3], [AIR_HU] * 4)


def test_fit_to_canvas_pads_and_crops():
    """Smaller images are centred on air, larger ones centre-cropped."""
    small = np.ones((2, 2), np.float32)
    out = fit_to_canvas(small, 4)
    assert out.sum() == 4 + 12 * AIR_HU and out[1:3, 1:3].sum() == 4
    big = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(fit_to_canvas(big, 2), big[1:3, 1:3])


def test_resize_constant_stays_constant():
    """Area resampling of a constant image keeps its value."""
    out = resize(np.full((512, 512), 40.0, np.float32), 256)
    assert out.shape == (256, 256) and np.allclose(out, 40.0)


def test_compile_image_shape_and_channels():
    """A slice compiles to (size, size, 3) uint8 with one channel per window."""
    hu = np.full((128, 96), -1000.0, np.float32)
    hu[20:100, 10:80] = 40.0
    img, box = compile_image(hu, [(40, 80), (80, 200), (600, 2800)], 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert box == (20, 100, 10, 80)
    assert img[16, 16].tolist() == [128, 77, 77]  # 40 HU: 40*255/80, 60*255/200, 840*255/2800
    assert img[0, 0].tolist() == [0, 0, 0]  # padding is air


def test_spacing_mm_keeps_physical_scale():
    """With --spacing-mm, the same 100 mm head fills the same pixels at any pixel spacing."""
    sizes = []
    for spacing, n in [(0.5, 256), (1.0, 128)]:
        hu = np.full((n, n), -1000.0, np.float32)
        side = int(100 / spacing)
        o = (n - side) // 2
        hu[o : o + side, o : o + side] = 40.0
        img, _ = compile_image(hu, [(40, 80)] * 3, 128, (spacing, spacing), spacing_mm=1.0)
        sizes.append(int((img[..., 0] > 100).sum()))
    assert abs(sizes[0] - sizes[1]) <= 0.03 * sizes[0]
    assert abs(sizes[0] - 100 * 100) <= 0.05 * 100 * 100


def test_resize_close_to_exact_area_average():
    """The fast two-step shrink stays within a few HU of cv2's exact area average on a CT-like image."""
    import cv2

    rng = np.random.default_rng(0)
    hu = cv2.GaussianBlur(rng.normal(40, 200, (430, 430)).astype(np.float32), (0, 0), 3)
    exact = cv2.resize(hu, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(resize(hu, 256) - exact).mean() < 3.0


@pytest.mark.parametrize("spacing_mm", [0.001, 0.006])
def test_resampling_past_the_size_bound_is_refused_before_allocating(spacing_mm):
    """--spacing-mm 0.001 on 0.5 mm pixels asked for a 64,000-pixel square (16 GB) of a 128-pixel
    head (about 100 pixels wide); now a ValueError naming the sizes, before anything is allocated."""
    with pytest.raises(ValueError, match="pixels a side"):
        compile_image(
            phantom_hu(128).astype(np.float32),
            [(40, 80)] * 3,
            64,
            (0.5, 0.5),
            spacing_mm=spacing_mm,
        )


@pytest.mark.parametrize("spacing_mm", [float("inf"), float("nan"), 0.0, -1.0, 1e6])
def test_resampling_to_less_than_a_pixel_is_refused(spacing_mm):
    """A spacing that shrinks the head under one pixel (inf gave a 1-pixel image, status ok), or
    that is not a positive number: ValueError."""
    with pytest.raises(ValueError, match="pixels a side"):
        compile_image(
            phantom_hu(128).astype(np.float32),
            [(40, 80)] * 3,
            64,
            (0.5, 0.5),
            spacing_mm=spacing_mm,
        )


def test_resampled_side_within_bounds():
    """The resampled side is side * pixel / spacing, rounded; the bound itself is allowed."""
    assert resampled_side(512, 0.5, 1.0) == 256
    assert resampled_side(512, 0.5, 0.25) == 1024
    assert resampled_side(MAX_RESAMPLED_PX, 1.0, 1.0) == MAX_RESAMPLED_PX
    with pytest.raises(ValueError):
        resampled_side(MAX_RESAMPLED_PX + 1, 1.0, 1.0)
