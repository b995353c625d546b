"""A path or a URL: the one place both CLIs open, read, list and write files.

Reading: a local path (regular files only: a FIFO or device is refused before a byte is read),
an http(s) URL (the standard library's urllib, so streaming from a web server needs no extra
package) or any fsspec URL (s3://, gs://, memory://, ...). Files are read as sequential streams,
never copied to local disk first; whole-file reads take a byte limit.

Writing is atomic for readers, and never goes through a link or into an existing entry: bytes go
to a new private file `<name>.<random>.partial` (created O_CREAT | O_EXCL | O_NOFOLLOW by
`tempfile.mkstemp`), then a rename over `<name>`, refused when `<name>` is anything but a regular
file (a link, a folder, a FIFO). `atomic_open` / `atomic_file` are the one local writer (shards,
the build's metadata and ledger, checkpoints, metrics, submissions, predictions); `Store` is a
build folder that may be a URL, and refuses a link at any path component inside it. Inputs are
listed with their size and mtime (`list_inputs`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec

from ich_prep.errors import NotOurs, NotRegularFile
from ich_prep.web import http_listing, http_range, open_http, paced

WORK = "_work"  # a build's ledger folder; a local Store writes its temporaries there when present
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: new files get 0o666 & ~umask, as open() would give them


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
        return paced(open_http(url), url)
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
        data = http_range(url, offset, length)
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
        with open_http(url, "HEAD") as r:
            n = r.headers.get("Content-Length")
        return int(n) if n is not None and n.isdigit() else None
    fs, path = _fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(url)
    return int(fs.size(path))


def list_names(root: str | os.PathLike) -> list[str] | None:
    """Entries directly in `root` (folders end in '/'); None when a URL cannot be listed."""
    root = str(root)
    if not is_url(root):
        return sorted(
            e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in os.scandir(root)
        )
    if _is_http(root):
        return http_listing(root)
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
    """The nearest of `path`'s parent folders (and `path` itself when `itself`) that is there and
    is not a folder (a file, a FIFO, a link to nothing): what stops `path` from being created as a
    file (or a folder); None if none. `what_is` says what it is."""
    path = Path(path)
    for p in (path, *path.parents) if itself else path.parents:
        if os.path.lexists(p) and not p.is_dir():
            return p
    return None


def what_is(path: str | os.PathLike) -> str:
    """'a file', 'a FIFO', 'a symlink' ... or 'a symlink to nothing': what is at `path`."""
    if os.path.islink(path) and not os.path.exists(path):
        return "a symlink to nothing"
    return f"a {entry_kind(path) or 'file'}"


def entry_kind(path: str | os.PathLike) -> str | None:
    """What is at `path`, not following a link: None when nothing or a regular file, else
    'symlink', 'folder', 'FIFO', 'socket' or 'device'."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (or a file above it)
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symlink"
    return "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"  # fmt: skip


def refuse_unless_file(path: str | os.PathLike, what: str = "") -> None:
    """NotOurs when `path` is a link, folder, FIFO, socket or device (never written through,
    replaced or deleted); a regular file or nothing passes."""
    kind = entry_kind(path)
    if kind is not None:
        raise NotOurs(
            f"{what}{path} is a {kind}, not a file this tool wrote; it is never written through, "
            "replaced or deleted: move it away or choose another output path"
        )


def temp_target(name: str) -> str | None:
    """The file name a temporary of ours (`<name>.<8 random>.partial`) is for, else None."""
    m = re.fullmatch(r"(.+)\.[A-Za-z0-9_]{8}\.partial", name)
    return m.group(1) if m else None


@contextmanager
def _temporary(path: Path, tmp_dir: str | os.PathLike | None) -> Iterator[tuple[int, Path]]:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=tmp_dir or path.parent)  # fmt: skip
    tmp = Path(tmp)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        yield fd, tmp
        refuse_unless_file(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, tmp_dir: str | os.PathLike | None = None) -> Iterator[BinaryIO]:  # fmt: skip
    """Yields a new file (read-write, binary) created O_CREAT | O_EXCL | O_NOFOLLOW under a private
    temporary name `<name>.<random>.partial` in `tmp_dir` (default: `path`'s folder, which must be
    on the same file system), so nothing that exists is written through or reused. On success it
    is renamed to `path` (a reader sees the old file or the whole new one), refused (NotOurs) if a
    link, folder or other non-file is at `path`; on any exception or Ctrl-C it is removed."""
    path = Path(path)
    with _temporary(path, tmp_dir) as (fd, tmp):
        with os.fdopen(fd, "w+b") as f:
            f.raw.name = str(tmp)  # errors name the file, not the descriptor
            yield f


@contextmanager
def atomic_file(path: str | os.PathLike, tmp_dir: str | os.PathLike | None = None) -> Iterator[Path]:  # fmt: skip
    """atomic_open for writers that take a path (torch.save, to_parquet): yields the path of the
    new, empty temporary file to write (it exists: open it with 'wb', not 'xb')."""
    path = Path(path)
    with _temporary(path, tmp_dir) as (fd, tmp):
        os.close(fd)
        yield tmp


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
    """A build folder. `Store(path_or_url)`; names are relative ('train-f0-00000.tar', '_work/x').

    Locally, no path component of a name inside the folder may be a symbolic link: every
    operation refuses one (NotOurs, naming it) before it is followed. Writes go through
    `atomic_open` (temporaries in `_work/` when that folder exists); `remove` deletes a regular
    file or an empty folder, never a link or a folder's contents."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.local = not is_url(root)
        if self.local:
            self.fs, self.path = None, os.path.abspath(self.root)
        else:
            self.fs, self.path = fsspec.core.url_to_fs(self.root)

    def _p(self, name: str) -> str:
        if not self.local:
            return f"{self.path.rstrip('/')}/{name}"
        p = self.path
        for part in filter(None, name.split("/")):
            p = os.path.join(p, part)
            if entry_kind(p) == "symlink":
                raise NotOurs(
                    f"{p} is a symlink inside --out {self.root}; nothing inside a build folder is "
                    "read, written or deleted through a link: remove the link or choose another --out"
                )
        return p

    def __str__(self) -> str:
        return self.root

    def exists(self, name: str = "") -> bool:
        return os.path.exists(self._p(name)) if self.local else self.fs.exists(self._p(name))

    def makedirs(self, name: str = "") -> None:
        if self.local:
            p = self._p(name)
            if name and os.path.lexists(p) and entry_kind(p) != "folder":
                refuse_unless_file(p)  # a FIFO, socket or device
                raise NotOurs(f"{p} is a file where a folder of ours belongs; move it away or choose another --out")  # fmt: skip
            os.makedirs(p, exist_ok=True)
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

    def is_folder(self, name: str) -> bool:
        """Whether `name` is a folder (locally: not a link to one)."""
        if self.local:
            folder, base = os.path.split(name)
            return entry_kind(os.path.join(self._p(folder), base)) == "folder"
        return self.fs.isdir(self._p(name))

    def is_file(self, name: str) -> bool:
        """Whether `name` is a regular file (locally: not a link, folder, FIFO, ...)."""
        if self.local:  # the folders above it must not be links; it may be one (then False)
            folder, base = os.path.split(name)
            p = os.path.join(self._p(folder), base)
            return os.path.lexists(p) and entry_kind(p) is None
        return self.fs.isfile(self._p(name))

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

    @contextmanager
    def open_new(self, name: str) -> Iterator[BinaryIO]:
        """A new file to write (read-write, binary) that becomes `name` when the block ends, at
        once for readers; on an exception nothing is left. Locally: atomic_open, with the
        temporary in `_work/` when the build has one (so a killed writer leaves it there, with the
        ledger); on a URL: a local temporary file, uploaded as `<name>.partial`, then moved."""
        if self.local:
            work = os.path.join(self.path, WORK)
            tmp_dir = work if os.path.isdir(self._p(WORK)) else None
            with atomic_open(self._p(name), tmp_dir) as f:
                yield f
            return
        with tempfile.NamedTemporaryFile(suffix=".partial") as f:
            yield f
            f.flush()
            self.fs.put_file(f.name, self._p(name + ".partial"))
            self.fs.mv(self._p(name + ".partial"), self._p(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: a reader sees the old file or the whole new one."""
        with self.open_new(name) as f:
            f.write(data)

    def remove(self, name: str) -> None:
        """Delete a regular file; nothing if absent. Locally a link, a folder, a FIFO or anything
        else is refused (NotOurs): never deleted, and a folder's contents never."""
        p = self._p(name)
        if self.local:
            if os.path.lexists(p):
                refuse_unless_file(p)
                os.unlink(p)
        elif self.fs.isfile(p):
            self.fs.rm_file(p)

    def remove_empty_folder(self, name: str) -> None:
        """Delete the folder `name` if it exists and is empty (os.rmdir: never its contents)."""
        p = self._p(name)
        if self.local:
            if entry_kind(p) == "folder" and not os.listdir(p):
                os.rmdir(p)
        elif self.fs.isdir(p) and not self.fs.ls(p):
            self.fs.rmdir(p)


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
