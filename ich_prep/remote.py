"""Read a build from wherever it lives, safely: a folder, an http(s) URL prefix, or any fsspec URL.

http(s) goes through the standard library (urllib), so streaming from a web server needs no extra
package; other schemes (s3://, gs://, memory://, ...) go through fsspec and its matching package.
Every file is read as a sequential stream: nothing is copied to local disk first.

Tar members are read in stream mode ('r|') and only regular files with flat, relative names are
accepted; sizes are bounded before anything is read into memory, gzip is inflated with a bound, and
nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import html.parser
import io
import os
import re
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from ich_prep.config import ImageLayout
from ich_prep.errors import NotRegularFile
from ich_prep.shards import MAX_JSON_BYTES, decode_image

TIMEOUT_S = 60.0
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a 1024x1024x3 raw image is 3 MiB; far larger is hostile
MAX_LISTING_BYTES = 16 * 1024 * 1024
SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # what a shard or member may be called


def is_url(root: str | os.PathLike) -> bool:
    return "://" in str(root)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _is_http(url: str) -> bool:
    return is_url(url) and _scheme(url) in ("http", "https")


def _http(url: str, method: str = "GET"):
    """urllib response (a sequential binary stream); a 404 becomes FileNotFoundError."""
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "ich-prep"})
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)  # noqa: S310 (http(s) only)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise FileNotFoundError(f"{url}: HTTP {e.code} {e.reason}") from e
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise OSError(f"{url}: {e.reason}") from e


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def open_local(path: str | os.PathLike) -> BinaryIO:
    """A local file opened for reading only if it is a regular file: opened non-blocking (a FIFO
    cannot hang the open), then checked with fstat before a byte is read. OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file (a FIFO, device, socket or folder); refused", str(path))  # fmt: skip
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_stream(url: str | os.PathLike) -> BinaryIO:
    """A sequential binary stream of a local file or URL. Raises FileNotFoundError when absent;
    a local path that is not a regular file raises OSError before anything is read."""
    url = str(url)
    if not is_url(url):
        return open_local(url)
    if _is_http(url):
        return _http(url)
    fs, path = _fs(url)
    return fs.open(path, "rb")


def read_bytes(url: str | os.PathLike, limit: int | None = None) -> bytes:
    """Whole file, refusing more than `limit` bytes (ValueError) before reading them all."""
    with open_stream(url) as f:
        data = f.read(limit + 1) if limit else f.read()
    if limit and len(data) > limit:
        raise ValueError(f"{url} is larger than {limit} bytes; refusing to read it")
    return data


def file_size(url: str | os.PathLike) -> int | None:
    """Size in bytes (None when a server does not say). Raises FileNotFoundError when absent."""
    url = str(url)
    if not is_url(url):
        st = os.stat(url)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file; refused", url)
        return st.st_size
    if _is_http(url):
        with _http(url, "HEAD") as r:
            n = r.headers.get("Content-Length")
        return int(n) if n is not None and n.isdigit() else None
    fs, path = _fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(url)
    return int(fs.size(path))


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def list_names(root: str | os.PathLike) -> list[str] | None:
    """Entries directly in `root` (folders end in '/'); None when a URL cannot be listed."""
    root = str(root)
    if not is_url(root):
        return sorted(
            e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in os.scandir(root)
        )
    if _is_http(root):
        try:  # a server's directory index (python -m http.server, nginx autoindex, Apache)
            with _http(root.rstrip("/") + "/") as r:
                if "html" not in r.headers.get("Content-Type", ""):
                    return None
                page = r.read(MAX_LISTING_BYTES).decode("utf-8", "replace")
        except OSError:
            return None
        p = _Links()
        p.feed(page)
        names = set()
        for href in p.hrefs:
            name = urllib.parse.unquote(urllib.parse.urlsplit(href).path)
            if name and "/" not in name.rstrip("/") and not name.startswith((".", "?")):
                names.add(name)
        return sorted(names)
    fs, path = _fs(root)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotImplementedError):
        return None
    return sorted(
        e["name"].rstrip("/").rsplit("/", 1)[-1] + ("/" if e.get("type") == "directory" else "")
        for e in entries
    )


# ---------------------------------------------------------------- hashing while streaming


class HashingReader(io.RawIOBase):
    """Wraps a stream; sha256 and byte count of everything read through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n) if n is not None and n >= 0 else self.f.read()
        self.sha.update(b)
        self.n += len(b)
        return b

    def readinto(self, buf) -> int:
        b = self.read(len(buf))
        buf[: len(b)] = b
        return len(b)

    def drain(self) -> None:
        """Read to the end (the tar padding after the last member)."""
        while self.read(1 << 20):
            pass


# ---------------------------------------------------------------- safe tar members


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
    if ti.size > MAX_MEMBER_BYTES:
        return f"member {name!r} is {ti.size} bytes, over the {MAX_MEMBER_BYTES}-byte limit"
    return None


@dataclass
class Sample:
    """One key's members as read from a shard: the format's fields, what was wrong with them
    (`problems`: readers refuse the sample), and members of other kinds skipped unread."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def iter_samples(
    stream: BinaryIO,
    encoding: str,
    layout: ImageLayout | None = None,
    max_members: int | None = None,
) -> Iterator[Sample]:
    """Samples of an uncompressed tar stream, grouped by key; the one bounded reader of shards.

    Only regular members with flat names are read; a json member over MAX_JSON_BYTES, an image
    member over what one image of `layout` can take (layout.max_bytes; MAX_MEMBER_BYTES without a
    layout) and unsafe members are problems, never read into memory;
    members of other kinds are skipped unread; more than `max_members` members stop the read with
    ValueError. Tar errors (truncation, broken headers, a compressed tar) propagate as
    tarfile.TarError / EOFError / OSError.
    """
    limits = {"json": MAX_JSON_BYTES, encoding: MAX_MEMBER_BYTES if layout is None else layout.max_bytes}  # fmt: skip
    cur: Sample | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # "r|": no transparent decompression
        for n, ti in enumerate(tar, 1):
            if max_members is not None and n > max_members:
                raise ValueError(f"more than {max_members} tar members; refused")
            key, _, ext = ti.name.partition(".")
            if cur is not None and key != cur.key:
                yield cur
                cur = None
            if cur is None:
                cur = Sample(key)
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
    return decode_image(data, encoding, layout.max_bytes)
