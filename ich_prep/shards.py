"""The shard format: one sample = image + json metadata, keyed by image id; written and read here.

The encoding registry (`CODECS`: member suffix -> encode / bounded decode), bounded json, the tar
writer (`write_shard`: a temporary name, renamed only when complete, so a partial shard never looks
finished; a fixed tar mtime and owner make the bytes reproducible) and the one bounded tar reader
(`iter_samples`) that verify, preview, the trainer and the tests use.

The tar layout is webdataset's (members `<key>.<field>` in key order, read by webdataset as is),
written with the standard library's tarfile: importing webdataset imports torch (~500 MB per
worker), and ich_prep never imports torch.
"""

from __future__ import annotations

import functools
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import cv2
import numpy as np
from isal import igzip, isal_zlib

from ich_prep.config import CV2_CHANNELS, ImageLayout
from ich_prep.location import Store, read_range, sha256_file, sha256_stream  # noqa: F401 (sha256_file: re-exported)

TAR_MTIME = 0.0  # fixed so that identical content gives identical bytes
MAX_JSON_BYTES = 64 * 1024  # a sample's json is a few hundred bytes; anything far larger is refused
MAX_IMAGE_BYTES = 4096 * 4096 * 3 + 1024  # largest plausible decoded image (.npy header included)
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # any member, without a layout to bound it more tightly
SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # what a shard or member may be called
# The names a build gives its shards: `train-f<fold>-<n>.tar` (a fold is a set of whole shards, so
# selecting folds is selecting file names) or `test-<n>.tar`; `shard_name` makes them.
SHARD_NAME = re.compile(r"(train-f\d+|test)-\d{5}\.tar")
SHARD_SUFFIX = ".tar"


def shard_name(split: str, fold: int, n: int) -> str:
    """The file name of shard `n` of `fold` (a training build) or of a test build."""
    return f"{f'train-f{int(fold)}' if split == 'train' else 'test'}-{n:05d}{SHARD_SUFFIX}"


def shard_glob(split: str) -> str:
    """A glob matching the shards of a build of `split` (the card's loading snippets)."""
    return f"{'train-f*' if split == 'train' else 'test-*'}{SHARD_SUFFIX}"


def is_shard_file(name: object) -> bool:
    """Whether a manifest may list `name` as a shard: a flat, safe `<name>.tar` file name (a
    reader never leaves the build's folder)."""
    return (
        isinstance(name, str)
        and bool(SAFE_FILE_NAME.fullmatch(name))
        and name.endswith(SHARD_SUFFIX)
    )


def _encode_npy(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(img), allow_pickle=False)
    return buf.getvalue()


def _encode_npy_gz(img: np.ndarray) -> bytes:
    # ISA-L deflate: standard gzip bytes (stock webdataset/gzip read them), ~4x faster than zlib
    # level 1 and smaller at level 2 (benchmarks/bench_encoding.py).
    return igzip.compress(_encode_npy(img), compresslevel=2, mtime=0)


def _cv2_encoder(ext: str, params: list[int]):
    def encode(img: np.ndarray) -> bytes:
        ok, b = cv2.imencode(ext, img[..., ::-1], params)  # RGB order on disk
        if not ok:
            raise ValueError(f"cv2 could not encode a {img.shape} image as {ext}")
        return b.tobytes()

    return encode


def _decode_npy(data: bytes, limit: int, channels: int = 3) -> np.ndarray:
    if len(data) > limit:
        raise ValueError(f".npy of {len(data)} bytes is over the {limit}-byte limit; refused")
    return _load_npy(data)


def _decode_npy_gz(data: bytes, limit: int, channels: int = 3) -> np.ndarray:
    return _load_npy(gunzip(data, limit))


def _decode_cv2(kind: str):
    def decode(data: bytes, limit: int, channels: int = 3) -> np.ndarray:
        if channels not in CV2_CHANNELS[kind]:
            raise ValueError(f"a {kind} build holds 1 or 3 channels, its layout says {channels}")
        h, w, c = declared_dims(data, kind)
        if not (0 < h and 0 < w and h * w * channels <= limit):
            raise ValueError(
                f"{kind} header declares {h}x{w}, over the {limit}-byte limit; refused"
            )
        if c != channels:  # a grey image in a colour build (or the reverse) is not ours
            raise ValueError(f"{kind} header declares {c} channels, the build's layout {channels}")
        flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        if arr is None:
            raise ValueError(f"not a decodable {kind} image")
        return arr[..., None] if channels == 1 else arr[..., ::-1]

    return decode


@dataclass(frozen=True)
class Codec:
    """One image encoding: `encode(uint8 (H, W, C)) -> bytes`; `decode(bytes, limit, C) -> array`,
    refusing (ValueError) anything that would take more than `limit` bytes decoded, checked from
    the header before any pixel is decoded (gzip inflation bounded, png/jpg dimensions read first)."""

    encode: Callable[[np.ndarray], bytes]
    decode: Callable[[bytes, int, int], np.ndarray]


# The encoding registry: member suffix -> codec (config.ENCODINGS describes each for the CLI).
CODECS: dict[str, Codec] = {
    "npy.gz": Codec(_encode_npy_gz, _decode_npy_gz),
    "png": Codec(_cv2_encoder(".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]), _decode_cv2("png")),
    "npy": Codec(_encode_npy, _decode_npy),
    "jpg": Codec(_cv2_encoder(".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]), _decode_cv2("jpg")),
}  # fmt: skip


def codec(encoding: str) -> Codec:
    try:
        return CODECS[encoding]
    except KeyError:
        raise ValueError(f"unknown encoding {encoding!r}; one of {sorted(CODECS)}") from None


def encode_image(img: np.ndarray, encoding: str) -> bytes:
    """uint8 (H, W, C) -> bytes in `encoding` (a key of CODECS; png/jpg take C = 1 or 3)."""
    return codec(encoding).encode(img)


@functools.lru_cache(maxsize=64)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) of a C-order .npy header, parsed by numpy's own (literal_eval) reader once per
    distinct header: every image of a build has the same one, and parsing it is a fifth of decoding."""
    f = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(f)
    read = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, fortran_order, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("a .npy of Python objects (would need pickle); refused")
    if fortran_order:
        raise ValueError("a Fortran-order .npy: readers take C-order arrays only; refused")
    return dtype, shape


def _load_npy(raw: bytes) -> np.ndarray:
    """A .npy file's array without going through np.load's per-call header parsing."""
    if raw[:6] != b"\x93NUMPY" or len(raw) < 12:
        raise ValueError("not a .npy file (bad magic)")
    # header length: 2 bytes after the version for format 1.0, 4 bytes for 2.0/3.0
    n = (
        10 + int.from_bytes(raw[8:10], "little")
        if raw[6] == 1
        else 12 + int.from_bytes(raw[8:12], "little")
    )
    try:
        dtype, shape = _npy_layout(raw[:n])
    except (SyntaxError, EOFError) as e:
        raise ValueError(f"not a .npy array ({e})") from e
    count = int(np.prod(shape))
    if len(raw) - n != count * dtype.itemsize:
        raise ValueError(f".npy data holds {len(raw) - n} bytes, its header says {shape} {dtype}")
    return np.frombuffer(raw, dtype, count, offset=n).reshape(shape)


def decode_image(
    data: bytes, encoding: str, limit: int = MAX_IMAGE_BYTES, channels: int = 3
) -> np.ndarray:
    """bytes -> uint8 (H, W, C), channel i = window i, at most `limit` bytes decoded (png/jpg are
    read as `channels`, 1 or 3; npy keeps its own shape, checked against the layout by the
    reader). Never unpickles (object dtypes are refused). npy/npy.gz give a read-only view of the
    inflated bytes (no copy); copy it to write in place."""
    arr = codec(encoding).decode(data, limit, channels)
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(
            f"decoded image has dtype {arr.dtype} shape {arr.shape}, expected uint8 (H, W, C)"
        )
    return np.ascontiguousarray(arr)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


PNG_CHANNELS = {(8, 0): 1, (8, 2): 3}  # (bit depth, colour type) -> channels: 8-bit grey or RGB


def declared_dims(data: bytes, kind: str) -> tuple[int, int, int | None]:
    """(height, width, channels) a png/jpg header declares, read before decoding (so no pixel bomb
    is decoded); channels None for a png other than 8-bit grey or RGB (not one we write)."""
    if kind == "png":
        if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 26:
            raise ValueError("not a png (bad signature or no IHDR)")
        h, w = int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
        return h, w, PNG_CHANNELS.get((data[24], data[25]))
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a jpeg (no SOI marker)")
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise ValueError("damaged jpeg marker stream")
        m = data[i + 1]
        if m == 0xFF:
            i += 1
            continue
        if m in _SOF:
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big"), data[i + 9]  # fmt: skip
        if m == 0x01 or 0xD0 <= m <= 0xD9:
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise ValueError("jpeg has no frame header")


def gunzip(data: bytes, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """Inflate one gzip member, refusing more than `limit` bytes out (a small hostile member cannot
    become gigabytes), a damaged CRC, a truncated stream or trailing bytes. ISA-L: ~3x zlib's speed."""
    d = isal_zlib.decompressobj(wbits=31)
    try:
        raw = d.decompress(data, limit + 1)
    except isal_zlib.error as e:
        raise ValueError(f"gzip data is damaged ({e})") from e
    if len(raw) > limit:
        raise ValueError(f"gzip data inflates past {limit} bytes; refused")
    if not d.eof:
        raise ValueError("gzip data ends early (truncated)")
    if d.unused_data:
        raise ValueError("gzip data has trailing bytes")
    return raw


def decode_json(data: bytes) -> dict:
    """Sample metadata; bounded in size so a hostile shard cannot exhaust memory."""
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(
            f"json member of {len(data)} bytes exceeds the {MAX_JSON_BYTES}-byte limit"
        )
    try:
        return json.loads(data)
    except RecursionError as e:  # "[[[[..." thousands deep
        raise ValueError("json nested too deeply; refused") from e


def encode_meta(meta: dict) -> bytes:
    """A sample's json member, exactly as written (compact, sorted keys)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), TAR_MTIME, 0o444
    ti.uname = ti.gname = "ich"
    tar.addfile(ti, io.BytesIO(data))


def write_tar(f: BinaryIO, samples, encoding: str) -> dict[str, tuple[int, int]]:
    """Write samples ({'__key__', 'image' uint8 (H, W, C), 'meta' dict}) as a tar into the binary
    file `f`. Returns each sample's span, key -> (byte offset, length): its members, headers and
    padding included, so bytes [offset, offset + length) of the shard are a tar that read_span
    reads."""
    spans = {}
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            meta = encode_meta(s["meta"])
            start = tar.offset
            _add(tar, f"{s['__key__']}.{encoding}", encode_image(s["image"], encoding))
            _add(tar, f"{s['__key__']}.json", meta)
            spans[s["__key__"]] = (start, tar.offset - start)
    return spans


def write_shard(store: Store, name: str, samples, encoding: str, spans: dict | None = None) -> dict:
    """write_tar as `name` in a build folder (local or URL), atomically, through `store.open_new`
    (a new private temporary file, renamed only when complete; never through a link). The one
    shard writer (the build's tasks and the test fixtures).

    Returns the manifest's shard entry {'name', 'samples', 'bytes', 'sha256'}; each sample's span
    (write_tar), which the index records, is put in `spans` when given.
    """
    with store.open_new(name) as f:
        written = write_tar(f, samples, encoding)
        # No fsync: the rename is atomic against a killed process; a power cut is what `verify` is for.
        size = f.tell()
        f.seek(0)
        sha = sha256_stream(f)
    info = {"name": name, "samples": len(written), "bytes": size, "sha256": sha}
    if spans is not None:
        spans.update(written)
    return info


# ---------------------------------------------------------------- reading: the one bounded tar reader


def unsafe_member(ti: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None: regular files with flat relative names only."""
    name = ti.name
    if not ti.isreg():
        kind = (
            "symlink"
            if ti.issym()
            else "hard link"
            if ti.islnk()
            else "device"
            if ti.isdev()
            else "folder"
            if ti.isdir()
            else "fifo"
            if ti.isfifo()
            else "special entry"
        )
        return f"member {name!r} is a {kind}; shards hold regular files only"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return f"member {name!r} has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return f"member {name!r} climbs out of the folder ('..')"
    if not SAFE_FILE_NAME.fullmatch(name):
        return f"member {name!r} is not a flat <key>.<field> name"
    return None


def check_declared_size(ti: tarfile.TarInfo, size: int) -> None:
    """ValueError, before the member is read or skipped, when its header (or a pax header) declares
    more bytes than MAX_MEMBER_BYTES or than the stream of `size` bytes has left: tarfile's
    stream mode would otherwise skip past the end of the shard for as long as the size says
    (a 40 KB shard declaring 10**12 bytes never ended)."""
    if ti.size > MAX_MEMBER_BYTES:
        raise ValueError(f"member {ti.name!r} declares {ti.size} bytes, over the {MAX_MEMBER_BYTES}-byte limit; refused")  # fmt: skip
    if ti.offset_data + ti.size > size:
        raise ValueError(f"member {ti.name!r} declares {ti.size} bytes at byte {ti.offset_data}, past the end of the {size}-byte shard; refused")  # fmt: skip


@dataclass
class Sample:
    """One key's members as read from a shard: the format's fields, what was wrong with them
    (`problems`: readers refuse the sample), members of other kinds skipped unread, and the
    sample's span in the stream (offset of its first header, bytes to the end of its last
    member's padding): what the index records for a range read."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    offset: int = 0
    length: int = 0


def max_members(samples: int) -> int:
    """Members a shard of `samples` samples may hold before a reader stops: its 2 per sample,
    with room for a few unexpected ones that verify reports."""
    return 8 * samples + 64


def iter_samples(
    stream: BinaryIO, encoding: str, layout: ImageLayout, samples: int, *, size: int
) -> Iterator[Sample]:
    """Samples of an uncompressed tar stream, grouped by key; the one bounded reader of shards.
    `samples` is the manifest's count for this shard, `size` the bytes the stream holds (the
    shard's size).

    Only regular members with flat names are read; a json member over MAX_JSON_BYTES, an image
    member over what one image of `layout` can take (layout.max_bytes) and unsafe members are
    problems, never read into memory; members of other kinds are skipped unread. More than
    max_members(samples) members, or a member declaring more than MAX_MEMBER_BYTES or more than
    the stream has left (check_declared_size), stop the read at once with ValueError. Tar errors
    (truncation, broken headers, a compressed tar) propagate as tarfile.TarError / EOFError /
    OSError.
    """
    limits = {"json": MAX_JSON_BYTES, encoding: layout.max_bytes}
    most = max_members(samples)
    cur: Sample | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # "r|": no transparent decompression
        for n, ti in enumerate(tar, 1):
            if n > most:
                raise ValueError(f"more than {most} tar members; refused")
            check_declared_size(ti, size)
            key, _, ext = ti.name.partition(".")
            if cur is not None and key != cur.key:
                yield cur
                cur = None
            if cur is None:
                cur = Sample(key, offset=ti.offset)
            cur.length = ti.offset_data + -(-ti.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE - cur.offset  # fmt: skip
            why = unsafe_member(ti)
            if why is None and ext in limits and ti.size > limits[ext]:
                why = f"member {ti.name!r} is {ti.size} bytes, over the {limits[ext]}-byte limit for .{ext}"  # fmt: skip
            if why is None and ext in cur.fields:
                why = f"member {ti.name!r} appears twice in a row"
            if why:
                cur.problems.append(why)
            elif ext not in limits:
                cur.skipped.append(f"unexpected member {ti.name!r} (expected .{encoding}, .json)")
            else:
                cur.fields[ext] = tar.extractfile(ti).read()
        if cur is not None:
            yield cur


# ---------------------------------------------------------------- bounded image decoding


def image_header(data: bytes, encoding: str, layout: ImageLayout) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of an encoded image, decoded within the layout's bound. Raises ValueError;
    never unpickles."""
    arr = decode_bounded(data, encoding, layout)
    return arr.shape, arr.dtype.str.lstrip("|<>=")


def decode_bounded(data: bytes, encoding: str, layout: ImageLayout) -> np.ndarray:
    """decode_image refusing anything larger decoded than one image of `layout` (a small shard
    member cannot become gigabytes: gzip inflation bounded, png/jpg headers read first)."""
    return decode_image(data, encoding, layout.max_bytes, layout.channels)


def max_span(layout: ImageLayout) -> int:
    """The most bytes one sample's span may cover: its two members at their bounds, with a
    512-byte header and up to 511 bytes of padding each."""
    return layout.max_bytes + MAX_JSON_BYTES + 2 * 1024


def read_span(url: str, offset: int, length: int, encoding: str, layout: ImageLayout) -> Sample:
    """One sample read with a single range read of its span (the index's offset and length), from
    a local shard or a URL, through the same bounded reader. ValueError when the span is not
    exactly one sound sample (a span over max_span is refused before it is read)."""
    if not (0 <= offset and 0 < length <= max_span(layout)):
        raise ValueError(f"span {offset}+{length} is outside 1..{max_span(layout)} bytes; refused")
    data = read_range(url, offset, length)
    try:
        got = list(iter_samples(io.BytesIO(data), encoding, layout, 1, size=len(data)))
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{url} bytes {offset}+{length} are not a sample ({e})") from e
    if len(got) != 1:
        raise ValueError(f"{url} bytes {offset}+{length} hold {len(got)} samples, not 1")
    return got[0]
