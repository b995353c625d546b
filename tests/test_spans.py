"""One sample by one range read: the spans write_shard records, read back by read_span from a
local shard, over http(s) (with and without Range support on the server) and from fsspec."""

from __future__ import annotations

import functools
import http.server
import threading
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import pytest

from ich_prep.config import ImageLayout
from ich_prep.location import Store
from ich_prep.shards import iter_samples, max_span, read_span, write_shard

LAYOUT = ImageLayout(24, 24, 3, ("a", "b", "c"))
ENC = "npy.gz"


def _samples(n: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 256, LAYOUT.shape, dtype=np.uint8)
        yield {"__key__": f"ID_{i:04d}", "image": img, "meta": {"image_id": f"ID_{i:04d}", "i": i}}


def _write(root: str, n: int = 7) -> dict:
    spans: dict = {}
    info = write_shard(Store(root), "s.tar", _samples(n), ENC, spans)
    assert info["samples"] == n == len(spans)
    return spans


def _streamed(path: Path) -> dict:
    with open(path, "rb") as f:
        return {
            s.key: s.fields for s in iter_samples(f, ENC, LAYOUT, 100, size=path.stat().st_size)
        }


def test_each_span_is_its_sample_alone(tmp_path):
    """read_span of each recorded span gives that sample's members, byte for byte, as the
    streaming reader reads them; spans tile the shard in order."""
    spans = _write(str(tmp_path))
    want = _streamed(tmp_path / "s.tar")
    for key, (offset, length) in spans.items():
        s = read_span(str(tmp_path / "s.tar"), offset, length, ENC, LAYOUT)
        assert s.key == key and s.fields == want[key] and not s.problems
    ends = [o + n for o, n in spans.values()]
    assert [o for o, _ in spans.values()][1:] == ends[:-1]


def test_hostile_spans_are_refused(tmp_path):
    """A span longer than one sample can be, one covering two samples, one cut short, one past the
    end of the file: ValueError, nothing decoded."""
    spans = _write(str(tmp_path))
    path = str(tmp_path / "s.tar")
    (o0, n0), (_, n1) = spans["ID_0000"], spans["ID_0001"]
    with pytest.raises(ValueError, match="outside"):
        read_span(path, o0, max_span(LAYOUT) + 1, ENC, LAYOUT)
    with pytest.raises(ValueError, match="hold 2 samples"):
        read_span(path, o0, n0 + n1, ENC, LAYOUT)
    with pytest.raises(ValueError, match="not a sample"):
        read_span(path, o0 + 512, n0 - 512, ENC, LAYOUT)
    size = (tmp_path / "s.tar").stat().st_size
    with pytest.raises(ValueError, match="ends before"):
        read_span(path, size - 100, 1000, ENC, LAYOUT)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """What nginx or S3 do with `Range: bytes=a-b`: 206 and those bytes."""

    def log_message(self, fmt, *args):
        self.server.ranges.append(self.headers.get("Range"))

    def do_GET(self):
        rng = self.headers.get("Range")
        if not (rng and self.server.ranged):
            return super().do_GET()
        a, b = (int(v) for v in rng.removeprefix("bytes=").split("-"))
        data = Path(self.translate_path(self.path)).read_bytes()[a : b + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def _serve(folder: Path, ranged: bool):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(folder))
    )
    server.ranged, server.ranges = ranged, []
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("ranged", [True, False], ids=["range-server", "no-range-server"])
def test_spans_over_http(tmp_path, ranged):
    """Over http: one GET with a Range header per sample; a server that ignores Range (python's
    http.server) sends the whole file and the reader skips to the span."""
    spans = _write(str(tmp_path))
    want = _streamed(tmp_path / "s.tar")
    with _serve(tmp_path, ranged) as (url, server):
        for key in ("ID_0003", "ID_0006"):
            offset, length = spans[key]
            s = read_span(f"{url}/s.tar", offset, length, ENC, LAYOUT)
            assert s.key == key and s.fields == want[key]
    assert len(server.ranges) == 2 and all(r.startswith("bytes=") for r in server.ranges)


def test_spans_from_fsspec(tmp_path):
    """memory:// (any fsspec file system): written through Store, read by range."""
    root = f"memory://spans-{tmp_path.name}"
    spans = _write(root)
    local = tmp_path / "s.tar"
    local.write_bytes(fsspec.filesystem("memory").cat_file(f"{root}/s.tar".removeprefix("memory://")))  # fmt: skip
    want = _streamed(local)
    offset, length = spans["ID_0005"]
    assert read_span(f"{root}/s.tar", offset, length, ENC, LAYOUT).fields == want["ID_0005"]


def test_the_streaming_reader_reports_each_samples_span(tmp_path):
    """iter_samples gives every sample the span write_shard recorded (what verify checks the
    index's offsets against)."""
    spans = _write(str(tmp_path))
    with open(tmp_path / "s.tar", "rb") as f:
        size = (tmp_path / "s.tar").stat().st_size
        got = {s.key: (s.offset, s.length) for s in iter_samples(f, ENC, LAYOUT, 100, size=size)}
    assert got == spans


# ---------------------------------------------------------------- spans in a real build


def test_a_build_records_every_samples_span_and_verify_checks_them(tmp_path):
    """ich-prep build writes shard_offset/shard_length for every ok row: each span read alone is
    that sample; verify passes; an index whose span is moved (hash recomputed) is a named problem;
    the trainer's default loader reads the build by spans."""
    import pandas as pd

    from ich_prep.config import BuildConfig
    from ich_prep.manifest import SPAN_COLUMNS, load_manifest
    from ich_prep.shards import sha256_file
    from ich_prep.verify import verify
    from ich_train.data import Build, SpanStream, create_train_stream
    from tests.sharing_fixtures import build_synthetic, manifest_of, rewrite_manifest

    root = build_synthetic(tmp_path)
    cfg = BuildConfig.from_dict(load_manifest(str(root))["config"])
    idx = pd.read_parquet(root / "index.parquet")
    ok = idx[idx["status"] == "ok"]
    assert ok[list(SPAN_COLUMNS)].notna().all(axis=None)
    assert idx.loc[idx["status"] != "ok", list(SPAN_COLUMNS)].isna().all(axis=None)
    for shard, rows in ok.groupby("shard"):
        with open(root / shard, "rb") as f:
            size = (root / shard).stat().st_size
            want = {
                s.key: s.fields for s in iter_samples(f, cfg.encoding, cfg.layout, 100, size=size)
            }
        for r in rows.itertuples():
            s = read_span(str(root / shard), r.shard_offset, r.shard_length, cfg.encoding, cfg.layout)  # fmt: skip
            assert s.key == r.image_id and s.fields == want[r.image_id]
    assert verify(str(root)).ok
    b = Build(root)
    kw = dict(rank=0, world=1, seed=0, shuffle_buffer=4)
    assert type(create_train_stream("auto", b.shards, b.encoding, 2, 1, **kw)) is SpanStream

    victim = ok.index[1]
    idx.loc[victim, "shard_offset"] += 512
    idx.to_parquet(root / "index.parquet", index=False)
    m = manifest_of(root)
    m["index"].update(bytes=(root / "index.parquet").stat().st_size, sha256=sha256_file(root / "index.parquet"))  # fmt: skip
    rewrite_manifest(root, m)
    problems = [p for p in verify(str(root)).problems if p.kind == "index"]
    assert len(problems) == 1 and idx.loc[victim, "image_id"] in problems[0].message
    assert "a range read would get other bytes" in problems[0].message
