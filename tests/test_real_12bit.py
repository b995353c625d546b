"""The RSNA 12-bit wrap-around fix (transform.stored_to_hu) on a real slice that needs it."""

from __future__ import annotations

import tarfile

import numpy as np
import pydicom

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.read_dicom import quiet_rsna_uids, read_slice
from ich_prep.shards import decode_image
from ich_prep.transform import AIR_HU, header_to_hu

SOURCE = "Riku-Sasaki_kaggle-rsna-intracranial-hemorrhage-detection/series_ID_44cfc8e964/ID_0002a38ad.dcm"  # fmt: skip


def wrap_like_the_affected_files(src, dst) -> np.ndarray:
    """Write `dst`: the real slice `src` (BitsStored 12, PixelRepresentation 0, intercept -1024)
    stored the way the known affected RSNA files are: values offset for -1000 (stored = HU mod
    4096, air at 3096) under a RescaleIntercept of 1, all else as the file had it. Returns its HU,
    clipped to -1000 below as such a file cannot store less."""
    with quiet_rsna_uids():
        ds = pydicom.dcmread(src)
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    ds.PixelData = (np.clip(hu, -1000, 3095) % 4096).astype(np.uint16).tobytes()
    ds.RescaleIntercept = "1"
    ds.save_as(dst)
    return np.clip(hu, -1000, 3095)


def _images(out) -> list[np.ndarray]:
    images = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".npy.gz"):
                    images.append(decode_image(tar.extractfile(m).read(), "npy.gz"))
    return images


def test_a_wrapped_12_bit_real_slice_compiles_like_its_original(real_samples, tmp_path):
    """None of the 109 real samples has the bug (INVENTORY.md: every BitsStored-12 file has
    RescaleIntercept -1024 or -1000), so this test builds one byte for byte like the known affected
    files from a real one (series ID_44cfc8e964, BitsStored 12, PixelRepresentation 0, Implicit
    VR): the same file with only PixelData and RescaleIntercept rewritten (stored = HU mod 4096,
    intercept "1"). Read as DICOM says (stored + 1) it is nonsense (air at +3097 HU); the fix gives
    the original's HU (air clipped at -1000), and `ich-prep build` compiles both files to the same
    image bytes (every window clips air below -1000 the same)."""
    with quiet_rsna_uids():
        heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(real_samples.rglob("*.dcm"))]  # fmt: skip
    twelve = {float(h.RescaleIntercept) for h in heads if (h.BitsStored, h.PixelRepresentation) == (12, 0)}  # fmt: skip
    assert len(heads) == 109 and twelve == {-1024.0, -1000.0}  # none triggers the fix
    src = real_samples / SOURCE
    (tmp_path / "orig").mkdir()
    (tmp_path / "wrapped").mkdir()
    (tmp_path / "orig" / src.name).write_bytes(src.read_bytes())
    expected = wrap_like_the_affected_files(src, tmp_path / "wrapped" / src.name)

    with quiet_rsna_uids():
        a, b = pydicom.dcmread(src), pydicom.dcmread(tmp_path / "wrapped" / src.name)
    changed = {e.keyword for e in a if e.tag in b and a[e.tag].value != b[e.tag].value}
    assert changed == {"PixelData", "RescaleIntercept"} and {e.tag for e in a} == {e.tag for e in b}  # fmt: skip
    assert (a.BitsStored, a.PixelRepresentation, b.file_meta.TransferSyntaxUID) == (12, 0, a.file_meta.TransferSyntaxUID)  # fmt: skip

    stored, header = read_slice(tmp_path / "wrapped" / src.name)
    naive = stored.astype(np.float64) * header["rescale_slope"] + header["rescale_intercept"]
    assert header["rescale_intercept"] > -100 and np.median(naive[:16, :16]) > 3000  # air wrapped
    hu = header_to_hu(stored, header)
    np.testing.assert_array_equal(hu, np.maximum(expected, AIR_HU).astype(np.float32))

    images = []
    for name in ("orig", "wrapped"):
        cfg = BuildConfig(dicom_dir=str(tmp_path / name), size=128, crop="slice")
        build(cfg, tmp_path / f"out_{name}", jobs=1, progress=False)
        images.append(_images(tmp_path / f"out_{name}"))
    assert len(images[0]) == len(images[1]) == 1
    assert images[0][0].std() > 10  # a real head, not a blank image
    np.testing.assert_array_equal(images[0][0], images[1][0])
