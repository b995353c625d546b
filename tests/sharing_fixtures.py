"""Helpers for the sharing tests: a small synthetic build, a local HTTP server, damage tools."""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path

from ich_prep.build import build
from ich_prep.config import BuildConfig, parse_windows
from ich_prep.manifest import dumps
from ich_prep.shards import sha256_file
from ich_prep.synth import write_synthetic


def build_synthetic(
    root: Path, encoding: str = "npy.gz", windows: str = "brain,subdural,bone"
) -> Path:
    """Synthetic DICOMs (6 patients x 4 slices, one truncated file) built into root/out."""
    info = write_synthetic(root / "syn", patients=6, seed=0, slices_per_series=4)
    cfg = BuildConfig(
        dicom_dir=info["train_dir"],
        labels=info["labels_csv"],
        size=64,
        shard_size=5,
        folds=3,
        encoding=encoding,
        windows=parse_windows(windows),
    )
    build(cfg, root / "out", jobs=1, progress=False)
    return root / "out"


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def rewrite_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_bytes(dumps(manifest))


def write_members(folder: Path, name: str, members: list[tarfile.TarInfo | tuple[str, bytes]]):
    """Replace shard `name` with these members and fix its size and hash in the manifest, so only
    the members themselves are wrong."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                ti = tarfile.TarInfo(m[0])
                ti.size = len(m[1])
                tar.addfile(ti, io.BytesIO(m[1]))
    (folder / name).write_bytes(buf.getvalue())
    m = manifest_of(folder)
    for s in m["shards"]:
        if s["name"] == name:
            s["bytes"], s["sha256"] = (folder / name).stat().st_size, sha256_file(folder / name)
    rewrite_manifest(folder, m)


def shard_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(ti.name, tar.extractfile(ti).read()) for ti in tar]


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        self.server.requests.append((self.command, self.path))


@contextmanager
def serve(folder: Path):
    """Serve `folder` on 127.0.0.1; yields (url prefix, list of (method, path) requested)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder))
    )
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        server.shutdown()
        server.server_close()
