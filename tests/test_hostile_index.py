"""A hostile index.parquet in an otherwise good build (the manifest's index size, hash and input
count follow it, so only the index lies): garbage pandas metadata, a string column whose
dictionary repeats one long value for every row, columns no index has. Every reader of a build
(ich-prep verify and info, ich-train fit, Build) gives one clear answer, never a traceback; a
dictionary bomb is refused before it is decoded; a normal build reads exactly as before."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ich_prep import index as index_module
from ich_prep.cli import main as prep
from ich_prep.manifest import FormatError, dumps, parse_index
from ich_prep.shards import sha256_file
from ich_train.cli import main as train
from ich_train.data import INDEX_COLUMNS, OPTIONAL_COLUMNS, Build
from tests.sharing_fixtures import build_synthetic
from tests.train_fixtures import make_build

SIZE = 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("index") / "b", folds=2, per_shard=8, size=SIZE)


@pytest.fixture
def root(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "b"))


def rewrite_index(root: Path, table: pa.Table, **write_options) -> None:
    """`table` as the build's index.parquet, the manifest's index bytes, sha256 and input count
    (the row count readers check) following it."""
    path = root / "index.parquet"
    pq.write_table(table, path, **write_options)
    m = json.loads((root / "manifest.json").read_text())
    m["counts"]["inputs"] = table.num_rows
    m["index"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (root / "manifest.json").write_bytes(dumps(m))


def with_pandas_metadata(root: Path, raw: bytes) -> None:
    t = pq.read_table(root / "index.parquet")
    rewrite_index(root, t.replace_schema_metadata({**t.schema.metadata, b"pandas": raw}))


def dictionary_bomb(root: Path, rows: int, length: int) -> None:
    """image_id: one `length`-character id on each of `rows` rows (the other columns repeat the
    build's rows), dictionary-encoded and zstd-compressed, without the Arrow schema: a plain
    reader decodes rows x length bytes from a file of a few KB."""
    t = pq.read_table(root / "index.parquet")
    t = t.take(np.arange(rows) % t.num_rows)
    ids = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array(["x" * length]))  # fmt: skip
    t = t.set_column(t.column_names.index("image_id"), "image_id", ids)
    rewrite_index(root, t, compression="zstd", store_schema=False)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _entry(name: str, numpy_type: str) -> dict:
    return {"name": name, "field_name": name, "pandas_type": "int32", "numpy_type": numpy_type, "metadata": None}  # fmt: skip


INT32_IDS = json.dumps({"index_columns": [], "columns": [_entry("image_id", "Int32")]}).encode()
DEEP_ATTRS = b'{"index_columns": [], "columns": [], "attributes": {"x": %s}}' % _deep(600).encode()
# Before the fix (pandas metadata passed to pyarrow's to_pandas as it was), each of these but
# not-json was a traceback in verify, info, fit and Build. Now the metadata is rebuilt from the
# column dtypes it declares: what is not what pandas writes is refused; an index or attrs, which
# no reader uses, are left out (HARMLESS: the build reads as it is).
GARBAGE = {
    "columns-5": b'{"columns": 5}',  # KeyError: 'index_columns'
    "list": b"[]",  # TypeError: list indices must be integers or slices, not str
    "not-json": b"not json",  # already one line (JSONDecodeError is a ValueError)
    "deep": _deep(100_000).encode(),  # RecursionError while decoding the JSON
    "index-column": b'{"index_columns": ["image_id"], "columns": []}',  # KeyError: 'image_id'
    "int32-ids": INT32_IDS,  # TypeError: Expected array of Int32 type, got large_string instead
    "deep-attrs": DEEP_ATTRS,  # read, then RecursionError in the next pandas operation
}
HARMLESS = {"index-column", "deep-attrs"}


def in_process(capsys, fn, argv: list[str]) -> tuple[int, str, str]:
    rc = fn(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def one_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(command + ": "), err
    return lines[0]


def fit_argv(root: Path, out: Path) -> list[str]:
    return ["fit", "--shards", str(root), "--out", str(out), "--model", "resnet10t", "--image-size", str(SIZE),
            "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress", "--valid-fold", "0"]  # fmt: skip


def prep_refuses(root: Path, capsys, says: str) -> None:
    """verify reports an index problem saying `says` (exit 1, nothing on stderr); info ends in
    one stderr line saying it (exit 2)."""
    rc, out, err = in_process(capsys, prep, ["verify", str(root)])
    assert rc == 1 and not err and re.search("index.parquet cannot be read .*" + says, out), out
    rc, _, err = in_process(capsys, prep, ["info", str(root)])
    assert rc == 2 and re.search(says, one_line(err, "ich-prep info"))


def every_reader_refuses(root: Path, tmp_path: Path, capsys, says: str) -> None:
    """prep_refuses, fit ends in one stderr line saying `says` (exit 2), Build: FormatError."""
    prep_refuses(root, capsys, says)
    rc, _, err = in_process(capsys, train, fit_argv(root, tmp_path / "run"))
    assert rc == 2 and re.search(says, one_line(err, "ich-train fit"))
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(FormatError, match=says):
        Build(str(root))


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_pandas_metadata_is_one_line_for_every_reader(root, tmp_path, capsys, case):
    with_pandas_metadata(root, GARBAGE[case])
    if case in HARMLESS:
        assert in_process(capsys, prep, ["verify", str(root)])[0] == 0
        index = Build(str(root)).index
        assert index.attrs == {} and "image_id" in index.columns
        return
    every_reader_refuses(root, tmp_path, capsys, "pandas metadata")


def test_a_dictionary_bomb_is_refused_before_decoding(root, tmp_path, capsys, monkeypatch):
    """1,000 rows x one 1,000-character id: refused from the decoded size its dictionary and
    indices add up to, against a limit lowered to 999,999 bytes (the real one is 2 GiB)."""
    dictionary_bomb(root, 1000, 1000)
    monkeypatch.setattr(index_module, "MAX_INDEX_TEXT", 999_999)
    every_reader_refuses(root, tmp_path, capsys, r"would take \d+ bytes decoded \(limit 999999\)")
    # all text columns together: 1,000 x (the id + 25 bytes of shard, status and split)
    monkeypatch.setattr(index_module, "MAX_INDEX_TEXT", 1_025_000)  # read, then checked
    rc, out, _ = in_process(capsys, prep, ["verify", str(root)])
    assert rc == 1 and f"image {'x' * 1000} has more than one ok row" in out


# the CLI run by `python -m`, then its peak resident size (VmHWM: this process's own, from its
# exec; ru_maxrss would carry the parent's over)
PEAK = """import runpy, sys
try:
    runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
finally:
    print("peak_kib", [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0])
"""


def real_cli(module: str, *argv: str) -> tuple[int, str, str, int]:
    """`python -m module argv...` in a fresh process: (exit code, stdout, stderr, peak RSS KiB)."""
    r = subprocess.run([sys.executable, "-c", PEAK, module, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    out, _, peak = r.stdout.rpartition("peak_kib ")
    return r.returncode, out, r.stderr, int(peak)


@pytest.mark.slow  # every real command on a 2 GB bomb: not in `make test-fast`
def test_the_real_commands_on_a_2_GB_dictionary_bomb(root, tmp_path):
    """1,100 rows x one 2,000,000-character id: a 3 KB index that decodes to 2.2 GB of ids (over
    the real 2 GiB limit). Before, each command decoded them: verify peaked at 6.6 GB resident
    (22 s), info at 6.6 GB and printed the build as fine, fit at 7.2 GB before refusing the
    counts. Now each refuses it from its dictionary and indices, its whole process far below
    the size of the ids (verify and info ~150 MB, fit ~0.9 GB with torch), and exits cleanly."""
    dictionary_bomb(root, 1100, 2_000_000)
    assert (root / "index.parquet").stat().st_size < 16 * 1024
    says = r"text columns would take 2200\d{6} bytes decoded \(limit 2147483648\)"
    runs = [("ich_prep", "verify", str(root)), ("ich_prep", "info", str(root)), ("ich_train", *fit_argv(root, tmp_path / "run"))]  # fmt: skip
    for module, *argv in runs:
        rc, out, err, peak = real_cli(module, *argv)
        assert peak < 2 * 1024**2, f"{argv[0]} peaked at {peak} KiB"  # < the ids alone (2.05 GiB)
        if argv[0] == "verify":
            assert rc == 1 and not err and re.search(says, out), (out, err)
        else:
            assert rc == 2 and re.search(says, one_line(err, f"ich-{module[4:]} {argv[0]}")), err


def test_the_real_commands_on_garbage_pandas_metadata(root):
    """verify and info in fresh processes: one answer, a clean exit (no reader thread left to
    abort the interpreter); fit is checked in process above, and in a fresh one with the bomb."""
    with_pandas_metadata(root, GARBAGE["columns-5"])
    says = "its pandas metadata has no list of column entries"
    rc, out, err, _ = real_cli("ich_prep", "verify", str(root))
    assert rc == 1 and not err and says in out, (out, err)
    rc, _, err, _ = real_cli("ich_prep", "info", str(root))
    assert rc == 2 and says in one_line(err, "ich-prep info")


def _timestamps(t: pa.Table) -> pa.Table:
    return t.append_column("t", pa.array(np.zeros(t.num_rows, "M8[s]")))


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda t: t.append_column("x", pa.array([["a"]] * t.num_rows)), r"column x \(list<"),
        (_timestamps, r"column t \(timestamp"),
        (lambda t: t.append_column("image_id", t.column("image_id")), "names a column twice"),
    ],
    ids=["list-column", "timestamp-column", "image_id-twice"],
)
def test_columns_no_index_has_are_refused_from_the_footer(root, capsys, edit, says):
    """A nested column (its values could be a dictionary bomb too), a type no index holds, a
    column named twice: verify and info (which read every column) refuse them before reading
    any; the trainer reads its own columns only, and so the extra ones never."""
    rewrite_index(root, edit(pq.read_table(root / "index.parquet")))
    prep_refuses(root, capsys, says)
    if "twice" in says:
        with pytest.raises(FormatError, match=says):
            Build(str(root))
    else:
        assert len(Build(str(root)).index) == 16


def test_many_dictionary_encoded_number_columns_are_bounded(root, capsys, monkeypatch):
    """Number columns are dictionary-encoded too (RLE indices of one value: a few bytes for any
    row count), so the footer's sizes do not bound them: 8 bytes a row for each column does.
    10,000 rows x 100 zero int64 columns against a limit lowered to 1 MB, in verify and info
    (the readers of every column)."""
    t = pq.read_table(root / "index.parquet")
    t = t.take(np.arange(10_000) % t.num_rows)
    for i in range(100):
        t = t.append_column(f"n{i}", pa.array(np.zeros(t.num_rows, np.int64)))
    rewrite_index(root, t)
    assert parse_index((root / "index.parquet").read_bytes(), "u").shape == t.shape
    monkeypatch.setattr(index_module, "MAX_INDEX_INFLATED", 1_000_000)
    meta = pq.ParquetFile(root / "index.parquet").metadata  # what the footer declares: under it
    assert sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) < 1_000_000
    prep_refuses(root, capsys, r"declares 10000 rows \(\d+ bytes decompressed\)")


def old_read(data: bytes, columns: list[str] | None = None) -> pd.DataFrame:
    """How parse_index read an index before: pyarrow's defaults, pandas metadata as written."""
    return pq.ParquetFile(io.BytesIO(data)).read(columns=columns).to_pandas()


@pytest.mark.parametrize("kind", ["ich-prep", "fixture-series", "fixture-test"])
def test_normal_builds_read_exactly_as_before(tmp_path, kind):
    """Same values, dtypes (nullable Int32/Int64/boolean where pandas wrote them), columns and
    index as the old read, for every column and for the trainer's columns; only df.attrs (the
    build's label stats, also in the manifest's counts, read by nobody) is no longer carried."""
    if kind == "ich-prep":
        root = build_synthetic(tmp_path)  # the real builder: error rows, series, crops, spans
    else:
        root = make_build(tmp_path / "b", folds=2, per_shard=6, size=SIZE, series_len=3, error_rows=1, test=kind == "fixture-test")  # fmt: skip
    data = (root / "index.parquet").read_bytes()
    new, old = parse_index(data, "u"), old_read(data)
    pd.testing.assert_frame_equal(new, old, check_exact=True)
    assert new.columns.equals(old.columns) and list(new.dtypes) == list(old.dtypes)
    if kind == "ich-prep":
        assert {"Int32", "Int64", "boolean"} <= {str(d) for d in new.dtypes}
    optional = [c for c in OPTIONAL_COLUMNS if c in old.columns]
    pd.testing.assert_frame_equal(
        parse_index(data, "u", list(INDEX_COLUMNS), optional=OPTIONAL_COLUMNS),
        old_read(data, [*INDEX_COLUMNS, *optional]),
        check_exact=True,
    )


def test_the_index_is_read_without_reader_threads(base, monkeypatch):
    """As the predictions and embeddings readers: no pre-buffering, no use_threads (a thread
    pyarrow starts late can abort the interpreter at exit)."""
    seen = []

    class Spy(pq.ParquetFile):
        def __init__(self, *a, **kw):
            seen.append(("pre_buffer", kw.get("pre_buffer", True)))
            super().__init__(*a, **kw)

        def read(self, *a, **kw):
            seen.append(("use_threads", kw.get("use_threads", True)))
            return super().read(*a, **kw)

    monkeypatch.setattr(pq, "ParquetFile", Spy)
    Build(str(base))
    assert seen and all(v is False for _, v in seen), seen
