"""The output folder of a build: where it may be, what in it is ours, and who is writing it.

- `check_apart(out, dicom_dir, labels)`: refuse an --out that equals, contains or lies inside
  --dicom-dir, or that holds --labels, before anything is created or deleted.
- `owned_names(store)`: the files a build of ours wrote there, named from its own manifest and
  ledger (`_work/`), regular files only, so `--overwrite` deletes those and nothing else
  (`remove_owned`, `remove_ledger`); never a link, never a folder's contents recursively.
- `BuildLock`: one build at a time per folder, with the holder (host, pid, start time) recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ich_prep.errors import UserError
from ich_prep.location import WORK, Store, entry_kind, is_url, refuse_unless_file, temp_target
from ich_prep.manifest import CARD, INDEX, MANIFEST, recorded
from ich_prep.shards import SHARD_NAME

LOCK = ".ich-prep.lock"
MAX_LOCK_BYTES = 4096  # a holder's record is ~100 bytes
# Names our builds give shards, and the files of the ledger `_work/` (a shard's record is
# `_work/<shard>.json`, written before the shard is moved into place).
WORK_FILE_RE = re.compile(rf"(config\.json|headers\.parquet|{SHARD_NAME.pattern}\.json)")


class OutDirError(UserError):
    """--out cannot be used: it overlaps the inputs, holds foreign files, or another build holds it."""


# ---------------------------------------------------------------- where --out may be


def _location(path: str, flag: str = "--out") -> tuple[str, str]:
    """(protocol, absolute path without trailing slash) where fsspec would write `path`: a local
    path, `file://` URL or a cache chained over one (`simplecache::file://`) is resolved through
    symlinks, so every spelling of one folder compares equal. OutDirError for an unknown protocol."""
    if not is_url(path):
        return "file", os.path.realpath(str(path)).rstrip("/") or "/"
    try:
        fs, p = fsspec.core.url_to_fs(str(path))
    except (ValueError, ImportError) as e:
        raise OutDirError(f"{flag} {path}: {e}; give a local path or a URL fsspec knows (s3://, gs://, file://, ...)") from None  # fmt: skip
    fs = getattr(fs, "fs", None) or fs  # a cache (simplecache::, filecache::) writes to its target
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.realpath(p).rstrip("/") or "/"
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto, "/" + p.strip("/")


def check_out_path(out: str) -> None:
    """OutDirError unless `out` can be a build folder: a URL fsspec knows, or a local folder or a
    path that can be created as one (not a file, nothing inside a file, no link to nothing)."""
    if is_url(out):  # a protocol fsspec does not know is refused here; one it cannot load, later
        unknown = [u.split("://")[0] for u in out.split("::") if u.split("://")[0] not in fsspec.available_protocols()]  # fmt: skip
        if unknown:
            raise OutDirError(f"--out {out}: unknown protocol {unknown[0]!r}; give a local path or a URL fsspec knows (s3://, gs://, file://, ...)")  # fmt: skip
        return
    for p in (Path(out), *Path(out).parents):
        if not os.path.lexists(p):
            continue
        if not p.exists():
            raise OutDirError(
                f"--out {out}: {p} is a symlink to {os.readlink(p)}, which does not exist; create "
                "the folder it points to, or choose another --out"
            )
        if not p.is_dir():
            where = "is an existing" if p == Path(out) else f"lies inside {p}, which is a"
            raise OutDirError(
                f"--out {out} {where} {entry_kind(p) or 'file'}, not a folder; choose a folder "
                "path for --out"
            )
        return


def _inside(child: tuple[str, str], parent: tuple[str, str]) -> bool:
    return child[0] == parent[0] and (
        child[1] == parent[1] or child[1].startswith(parent[1].rstrip("/") + "/")
    )


def check_apart(out: str, dicom_dir: str, labels: str | None) -> None:
    """Raise OutDirError if a build into `out` could overwrite or delete an input."""
    o, d = _location(out), _location(dicom_dir, "--dicom-dir")
    if _inside(o, d) or _inside(d, o):
        where = "is" if o == d else ("lies inside" if _inside(o, d) else "contains")
        raise OutDirError(
            f"--out {out} {where} --dicom-dir {dicom_dir}; a build must not write among its "
            "inputs: choose an --out outside the DICOM folder, e.g. shards/train"
        )
    if labels is not None and _inside(_location(labels, "--labels"), o):
        raise OutDirError(
            f"--out {out} holds --labels {labels}; a build must not write beside its inputs: "
            "choose another --out, or move the labels CSV out of it"
        )


# ---------------------------------------------------------------- what is ours


def _json(store: Store, name: str) -> dict | None:
    try:
        d = json.loads(store.read_bytes(name, MAX_LOCK_BYTES))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _ledger_file(name: str) -> bool:
    """A name a build writes in `_work/`: a ledger file, or a temporary of ours (`atomic_open`)."""
    return bool(WORK_FILE_RE.fullmatch(name) or temp_target(name) is not None)


def ledger_names(store: Store) -> list[str]:
    """The ledger's own files in `_work/` (regular files of the names a build writes there)."""
    return [n for n in store.listdir(WORK) if _ledger_file(n) and store.is_file(f"{WORK}/{n}")]


def owned_names(store: Store) -> tuple[list[str], list[str]]:
    """(ours, foreign): entries of the folder a build of ours wrote, and everything else.

    Ours, and only if a regular file (never a link, a folder or a FIFO): with a manifest, the
    manifest, index, card and the shards it lists; with a ledger (`_work/config.json`), the
    manifest, index and card, the shards its records (`_work/<shard>.json`) name, and `_work/`
    itself when it holds nothing but ledger files (`ledger_names`). A file named like a shard that neither lists is not ours. A folder with neither
    holds nothing of ours. The lock is neither (the running build holds it). Raises NotOurs if
    `_work`, the manifest or a ledger file is a link (Store refuses to look through one)."""
    entries = [n for n in store.listdir() if n != LOCK]
    manifest = recorded(store) if MANIFEST in entries and store.is_file(MANIFEST) else None
    work = store.listdir(WORK) if WORK in entries and store.is_folder(WORK) else []
    ledger = "config.json" in work and store.is_file(f"{WORK}/config.json")
    if manifest is None and not ledger:
        return [], entries
    named = set()
    if manifest is not None:
        named |= {MANIFEST, INDEX, CARD}
        named |= {name for name in manifest.shards if SHARD_NAME.fullmatch(name)}
    if ledger:  # an interrupted build: what it has written of its metadata is ours too
        named |= {MANIFEST, INDEX, CARD}
        named |= {n.removesuffix(".json") for n in work if WORK_FILE_RE.fullmatch(n) and n.endswith(".tar.json")}  # fmt: skip
    ours = [n for n in entries if n in named and store.is_file(n)]
    if ledger and len(ledger_names(store)) == len(work):
        ours.append(WORK)  # a ledger holding only files a build writes
    return sorted(ours), [n for n in entries if n not in ours]


def remove_ledger(store: Store) -> None:
    """Delete the ledger's own files in `_work/`, then `_work/` if that left it empty; anything
    else there (a file we did not write) stays, and so does `_work/`."""
    for name in ledger_names(store):
        store.remove(f"{WORK}/{name}")
    store.remove_empty_folder(WORK)


def remove_owned(store: Store, names: list[str]) -> None:
    """Delete entries owned_names called ours: regular files, and `_work/` through remove_ledger."""
    for name in names:
        remove_ledger(store) if name == WORK else store.remove(name)


# ---------------------------------------------------------------- one build at a time


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _describe(h: dict | None) -> str:
    if not h:
        return "holder unknown"
    return f"host {h.get('host')}, pid {h.get('pid')}, started {h.get('started')}"


def _alive_here(h: dict) -> bool:
    """Whether the holder is a live process on this host (pid reuse aside)."""
    if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
        return True  # cannot tell for another host: assume it is running
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BuildLock:
    """Exclusive lock on an output folder for one build.

    Local folders: `fcntl.flock` on `<out>/.ich-prep.lock`, which the kernel releases when the
    holder dies (kill -9 included), so a stale lock is taken over by the next build. The file
    holds the holder's host, pid and start time for the message a second build prints. URLs (no
    flock): the lock object is written if absent; one left by a dead process on this host is taken
    over; one from another host must be removed by hand (the message says which object).
    """

    def __init__(self, store: Store):
        self.store = store
        self.fd: int | None = None
        self.held = False
        self.took_over: dict | None = None  # the holder of a stale lock this one replaced

    def __enter__(self) -> BuildLock:
        self._acquire_local() if self.store.local else self._acquire_url()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _refuse(self, holder: dict | None, extra: str = "") -> OutDirError:
        return OutDirError(
            f"--out {self.store} is in use by another ich-prep build ({_describe(holder)}); "
            f"wait for it to finish or choose another --out{extra}"
        )

    def _acquire_local(self) -> None:
        import fcntl

        path = os.path.join(self.store.path, LOCK)
        refuse_unless_file(path)  # a link, folder or FIFO in its place is not ours
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._refuse(holder) from None
            try:  # the file may have been removed by the previous holder between open and flock
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_holder(fd)
        if not (old and {"host", "pid", "started"} <= set(old)) and os.fstat(fd).st_size:
            # not empty and not a holder's record: someone else's file, never truncated
            os.close(fd)
            raise OutDirError(
                f"--out {self.store} holds {LOCK}, which no ich-prep build wrote (not a lock "
                "holder's record); move it away or choose another --out"
            )
        self.took_over = old or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self.fd = fd
        self.held = True

    def _acquire_url(self) -> None:
        if self.store.exists(LOCK):
            old = _json(self.store, LOCK)
            if old is None or _alive_here(old):
                raise self._refuse(
                    old, f" (if no build is running, delete {self.store.root}/{LOCK})"
                )
            self.took_over = old
        self.store.write_bytes(LOCK, json.dumps(_holder()).encode())
        self.held = True

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order: a waiting build re-checks)."""
        if not self.held:
            return
        self.held = False
        if self.fd is None:
            self.store.remove(LOCK)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.store.path, LOCK))
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict | None:
    try:
        d = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return None
    return d if isinstance(d, dict) else None
