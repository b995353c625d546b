"""A tar member declaring more bytes than its shard holds (a pax `size=10**12` in a 40 KB shard):
every reader (verify over a folder and over HTTP with --jobs 2, the trainer's reader, preview)
refuses it at once instead of skipping past the end of the file for as long as the size says."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from ich_prep.preview import collect
from ich_prep.shards import MAX_MEMBER_BYTES, iter_samples, sha256_file
from ich_train.data import Build, ShardError, read_shard
from tests.sharing_fixtures import manifest_of, rewrite_manifest, serve, shard_members
from tests.train_fixtures import make_build

DECLARED = [10**12, 2**40 + 3, MAX_MEMBER_BYTES + 1, 10**6, 50_000]  # all past a ~40 KB shard


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("sizes") / "b", folds=2, per_shard=6, size=16)


def declare(folder: Path, which: int, size: int, pax: bool = True) -> str:
    """The first shard again, its member `which` declaring `size` bytes (in a pax header, or in
    the member's own GNU base-256 header), manifest size and hash recomputed."""
    name = manifest_of(folder)["shards"][0]["name"]
    members = shard_members(folder / name)
    raw = io.BytesIO()
    fmt = tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for i, (n, data) in enumerate(members):
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            if i == which and pax:
                ti.pax_headers = {"size": str(size)}
            tar.addfile(ti, io.BytesIO(data))
    data = bytearray(raw.getvalue())
    if not pax:  # member `which`'s size field in base-256, its header checksum recomputed
        with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r") as tar:
            off = tar.getmembers()[which].offset
        data[off + 124 : off + 136] = b"\x80" + size.to_bytes(11, "big")
        data[off + 148 : off + 156] = b" " * 8
        data[off + 148 : off + 155] = b"%06o\x00" % sum(data[off : off + 512])
    (folder / name).write_bytes(bytes(data))
    m = manifest_of(folder)
    for s in m["shards"]:
        if s["name"] == name:
            s["bytes"], s["sha256"] = (folder / name).stat().st_size, sha256_file(folder / name)
    rewrite_manifest(folder, m)
    return name


def run_limited(args: list[str], seconds: float = 60) -> subprocess.CompletedProcess:
    """`python -m ich_prep ARGS` in its own process group, killed whole on every exit path; a
    run that outlives `seconds` fails the test as a hang."""
    proc = subprocess.Popen([sys.executable, "-m", "ich_prep", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ich-prep {' '.join(args)} still running after {seconds} s: hung")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.parametrize("pax", [True, False], ids=["pax", "base256"])
def test_verify_refuses_a_member_declaring_10_to_the_12_bytes_at_once(made, tmp_path, pax):
    """The reported case: verify of a folder, --jobs 2, ends (was: never) and names the member."""
    import shutil

    folder = shutil.copytree(made, tmp_path / "b")
    name = declare(folder, 2, 10**12, pax)
    assert (folder / name).stat().st_size < 100_000
    t0 = time.monotonic()
    r = run_limited(["verify", str(folder), "--jobs", "2"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "declares 1000000000000 bytes" in r.stdout and name in r.stdout, r.stdout
    assert time.monotonic() - t0 < 60


def test_verify_over_http_refuses_it_at_once(made, tmp_path):
    """The same shard served by a real HTTP server on 127.0.0.1: verify --jobs 2 ends at once."""
    import shutil

    folder = shutil.copytree(made, tmp_path / "b")
    declare(folder, 2, 10**12)
    with serve(folder) as (url, _):
        r = run_limited(["verify", url, "--jobs", "2"])
    assert r.returncode == 1 and "declares 1000000000000 bytes" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("size", DECLARED)
@pytest.mark.parametrize("which", [0, 1, 3])
def test_every_reader_refuses_a_size_past_the_end(made, tmp_path, size, which):
    """Declared sizes from 50 KB to 2**40, on an image, a json or a later member: the bounded
    reader (what verify, the trainer and preview share) raises at once; the trainer's reader
    says ShardError; verify reports the shard; preview skips it."""
    import shutil

    from ich_prep.verify import verify

    folder = shutil.copytree(made, tmp_path / "b")
    name = declare(folder, which, size)
    b = Build(str(folder))
    shard = next(s for s in b.shards if s.name == name)
    t0 = time.monotonic()
    with open(folder / name, "rb") as f, pytest.raises(ValueError, match="declares"):
        list(iter_samples(f, b.encoding, b.layout, shard.samples, size=shard.bytes))
    with pytest.raises(ShardError, match="declares"):
        list(read_shard(shard, b.encoding))
    report = verify(str(folder), jobs=2)
    assert any("declares" in p.message and p.where == name for p in report.problems)
    rows = b.ok[b.ok["shard"] == name]
    assert len(collect(b.manifest, rows, len(rows))) < len(rows)
    assert time.monotonic() - t0 < 30


def test_a_slow_drip_server_is_cut_off(monkeypatch):
    """A 127.0.0.1 server that keeps the connection alive with a byte now and then (each gap under
    the idle timeout) is refused once the stream has averaged under the minimum rate, instead of
    holding the reader forever (read_bytes, as verify and info read manifests and indexes)."""
    import http.server
    import socketserver
    import threading
    import time

    from ich_prep import location, web

    stop = threading.Event()

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not stop.is_set():  # bounded: the test stops it
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(web, "PACE_AFTER_S", 1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(OSError, match="refused as stalled"):
            location.read_bytes(f"http://127.0.0.1:{server.server_address[1]}/manifest.json", 10**6)
        assert time.monotonic() - t0 < 20
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
