"""Shard image encoding and decoding: lossless round trips, and hostile .npy members refused."""

import io

import numpy as np
import pytest

from ich_prep.shards import decode_image, encode_image


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (40, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["npy", "npy.gz", "png"])
def test_lossless_encodings_round_trip(image, encoding):
    """npy, npy.gz and png give back the exact uint8 (H, W, 3) array."""
    out = decode_image(encode_image(image, encoding), encoding)
    assert out.dtype == np.uint8 and np.array_equal(out, image)


def test_npy_of_another_shape_decodes_after_a_cached_header(image):
    """Two shapes in a row: each decodes to its own shape (the header cache is keyed by bytes)."""
    a, b = image, image[:20, :16].copy()
    assert decode_image(encode_image(a, "npy"), "npy").shape == (40, 32, 3)
    assert decode_image(encode_image(b, "npy"), "npy").shape == (20, 16, 3)


def test_truncated_npy_is_refused_with_sizes(image):
    """An .npy member cut short names how many bytes it holds against what its header says."""
    data = encode_image(image, "npy")[:-7]
    with pytest.raises(ValueError, match=r"holds \d+ bytes, its header says \(40, 32, 3\)"):
        decode_image(data, "npy")


def test_fortran_order_and_object_arrays_are_refused(image, tmp_path):
    """A Fortran-order array and a pickled object array are refused; the pickle is never run."""
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(image))
    with pytest.raises(ValueError, match="C-order"):
        decode_image(buf.getvalue(), "npy")
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    np.save(buf, np.array([Boom(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_image(buf.getvalue(), "npy")
    assert not marker.exists()


def test_not_an_npy_file_is_refused():
    """Bytes without the .npy magic are refused by name."""
    with pytest.raises(ValueError, match="bad magic"):
        decode_image(b"PK\x03\x04 not numpy at all", "npy")


class Boom:
    """Unpickling this creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))
