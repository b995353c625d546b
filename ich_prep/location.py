"""A path or a URL: the one place both CLIs open, read, list and write files.

Reading: a local path (regular files only: a FIFO or device is refused before a byte is read),
an http(s) URL (the standard library's urllib, so streaming from a web server needs no extra
package) or any fsspec URL (s3://, gs://, memory://, ...). Files are read as sequential streams,
never copied to local disk first; whole-file reads take a byte limit.

Writing is atomic for readers: bytes go to `<name>.partial`, then a rename (os.replace locally, the
file system's move on fsspec; on object stores the final object appears whole). `atomic_file`
does this for one local file (checkpoints, metrics, submissions, predictions); `Store` for a build
folder that may be a URL. Inputs are listed with their size and mtime (`list_inputs`).
"""

from __future__ import annotations

import errno
import hashlib
import html.parser
import io
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec

from ich_prep.errors import NotRegularFile

TIMEOUT_S = 60.0
MAX_LISTING_BYTES = 16 * 1024 * 1024


def is_url(root: str | os.PathLike) -> bool:
    return "://" in str(root)


def join(root: str | os.PathLike, name: str) -> str:
    """root + '/' + name for local paths and URLs alike."""
    root = str(root)
    return root.rstrip("/") + "/" + name if is_url(root) else str(Path(root) / name)


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
        return _read_all(f, limit, url)


def _read_all(f: BinaryIO, limit: int | None, what) -> bytes:
    data = f.read(limit + 1) if limit else f.read()
    if limit and len(data) > limit:
        raise ValueError(f"{what} is larger than {limit} bytes; refusing to read it")
    return data


def read_range(url: str | os.PathLike, offset: int, length: int) -> bytes:
    """Exactly `length` bytes from `offset` (ValueError if the file ends first): a local seek, an
    http(s) Range request (a server that ignores Range is read up to the range, bounded), or
    fsspec's cat_file."""
    url = str(url)
    if not is_url(url):
        with open_local(url) as f:
            f.seek(offset)
            data = f.read(length)
    elif _is_http(url):
        req = urllib.request.Request(
            url,
            headers={"User-Agent": "ich-prep", "Range": f"bytes={offset}-{offset + length - 1}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:  # noqa: S310 (http(s) only)
                if r.status != 206:  # the whole file came: skip to the range, bounded
                    while offset and (skipped := len(r.read(min(offset, 1 << 20)))):
                        offset -= skipped
                data = r.read(length)
        except urllib.error.URLError as e:
            raise OSError(f"{url}: {getattr(e, 'reason', e)}") from e
    else:
        fs, path = _fs(url)
        data = fs.cat_file(path, start=offset, end=offset + length)
    if len(data) != length:
        raise ValueError(f"{url} ends before byte {offset + length}; refused")
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


def sha256_stream(f, chunk: int = 1 << 20) -> str:
    """sha256 of a binary file object, read in 1 MiB blocks."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a local regular file."""
    with open_local(path) as f:
        return sha256_stream(f)


# ---------------------------------------------------------------- atomic writes


def file_in_the_way(path: str | os.PathLike, itself: bool = False) -> Path | None:
    """The nearest of `path`'s parent folders (and `path` itself when `itself`) that exists and
    is not a folder: what stops `path` from being created as a file (or a folder); None if none."""
    path = Path(path)
    for p in (path, *path.parents) if itself else path.parents:
        if p.exists() and not p.is_dir():
            return p
    return None


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields `<path>.partial` to write; on success it is renamed to `path` (a reader sees the old
    file or the whole new one), on any exception or Ctrl-C it is removed and nothing is left."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    # a link (or anything) left at the .partial name would be written through: start from nothing
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


# ---------------------------------------------------------------- a build folder or URL


class Store:
    """A build folder. `Store(path_or_url)`; names are relative ('train-f0-00000.tar', '_work/x')."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.local = not is_url(root)
        if self.local:
            self.fs, self.path = None, os.path.abspath(self.root)
        else:
            self.fs, self.path = fsspec.core.url_to_fs(self.root)

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name) if self.local else f"{self.path.rstrip('/')}/{name}"

    def __str__(self) -> str:
        return self.root

    def exists(self, name: str = "") -> bool:
        return os.path.exists(self._p(name)) if self.local else self.fs.exists(self._p(name))

    def makedirs(self, name: str = "") -> None:
        if self.local:
            os.makedirs(self._p(name), exist_ok=True)
        else:
            self.fs.makedirs(self._p(name), exist_ok=True)

    def listdir(self, name: str = "") -> list[str]:
        """Entry names (not paths) directly under `name`; [] if it does not exist."""
        if not self.exists(name):
            return []
        if self.local:
            return sorted(os.listdir(self._p(name)))
        return sorted(
            p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(name), detail=False)
        )

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """The whole file (a local one only if regular), refusing more than `limit` bytes."""
        if self.local:
            return read_bytes(self._p(name), limit)
        with self.fs.open(self._p(name), "rb") as f:
            return _read_all(f, limit, name)

    def size(self, name: str) -> int:
        return os.path.getsize(self._p(name)) if self.local else int(self.fs.size(self._p(name)))

    def sha256(self, name: str) -> str:
        with open_local(self._p(name)) if self.local else self.fs.open(self._p(name), "rb") as f:
            return sha256_stream(f)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: a reader sees the old file or the whole new one."""
        if self.local:
            with atomic_file(self._p(name)) as tmp:
                tmp.write_bytes(data)
        else:
            tmp = self._p(name + ".partial")
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, self._p(name))

    def local_file(self, name: str) -> str:
        """A local path to write `name` to before `commit(name, path)` moves it into place."""
        if self.local:
            return self._p(name + ".partial")
        fd, tmp = tempfile.mkstemp(suffix=".partial")
        os.close(fd)
        return tmp

    def commit(self, name: str, local_path: str) -> None:
        """Move a finished local file into place as `name`, atomically for readers."""
        if self.local:
            os.replace(local_path, self._p(name))
            return
        self.fs.put_file(local_path, self._p(name + ".partial"))
        self.fs.mv(self._p(name + ".partial"), self._p(name))
        os.unlink(local_path)

    def remove(self, name: str) -> None:
        """Delete a file or a folder (recursively); nothing if absent."""
        p = self._p(name)
        if self.local:
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.unlink(p)
        elif self.fs.exists(p):
            self.fs.rm(p, recursive=True)


@dataclass(frozen=True)
class InputFile:
    """One input below a root: its relative path and what says whether it changed since the last
    run (size and modification time; a URL's mtime, LastModified or ETag when the store has one)."""

    path: str
    size: int
    mtime_ns: int
    regular: bool  # a regular file (FIFOs, devices, sockets and broken links are not opened)


def _stamp_ns(info: dict) -> int:
    """A store's modification stamp as an int: mtime / LastModified / created, else an ETag hash."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            v = v.timestamp()
        try:
            return int(float(v) * 1e9)
        except (TypeError, ValueError):
            continue
    etag = str(info.get("ETag") or info.get("etag") or "")
    return int.from_bytes(hashlib.sha256(etag.encode()).digest()[:7], "big") if etag else 0


def _walk_local(root: str, suffix: str):
    """os.scandir walk (no symlinked folders followed) yielding InputFile for names ending in suffix."""
    stack = [root]
    while stack:
        top = stack.pop()
        with os.scandir(top) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.name.lower().endswith(suffix):
                    rel = os.path.normpath(os.path.relpath(e.path, root))
                    try:
                        st = e.stat()  # follows a symlink to a file; a broken link fails
                    except OSError:
                        yield InputFile(rel, -1, 0, False)
                        continue
                    yield InputFile(rel, st.st_size, st.st_mtime_ns, stat.S_ISREG(st.st_mode))


def list_inputs(root: str, suffix: str) -> list[InputFile]:
    """Every entry ending in `suffix` below root (folder or URL), sorted by relative path, with its
    size and mtime; one stat per file (a few seconds for 875k files on a local disk)."""
    if not is_url(root):
        return sorted(_walk_local(root, suffix), key=lambda f: f.path)
    fs, path = fsspec.core.url_to_fs(root)
    base = path.rstrip("/") + "/"
    out = []
    for p, info in fs.find(path, detail=True).items():
        if p.lower().endswith(suffix) and p.startswith(base):
            regular = info.get("type", "file") == "file"
            out.append(
                InputFile(p[len(base) :], int(info.get("size") or 0), _stamp_ns(info), regular)
            )
    return sorted(out, key=lambda f: f.path)


def list_files(root: str, suffix: str) -> list[str]:
    """Relative paths of every file ending in `suffix` below root (folder or URL), sorted."""
    return [f.path for f in list_inputs(root, suffix)]


def is_dir(root: str) -> bool:
    if not is_url(root):
        return os.path.isdir(root)
    fs, path = fsspec.core.url_to_fs(root)
    return fs.isdir(path)
