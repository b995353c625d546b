"""`ich-train report` against hostile inputs found by trying them: a predictions file whose ids
decode to far more bytes than the file holds, columns of the wrong type, and an --out folder that
holds someone else's files (never overwritten, never written through a link)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ich_prep import LABELS
from ich_train import predictions
from ich_train.cli import main
from tests.test_report import table, written
from tests.test_train_cli_errors import one_error_line


def _dictionary_bomb(path, n: int, id_len: int) -> None:
    """n rows all holding one id of id_len characters, dictionary-encoded: a tiny file whose ids
    decode to n x id_len bytes (no Arrow schema stored, so a plain reader decodes them)."""
    ids = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["x" * id_len]))
    cols = {"image_id": ids, "fold": pa.array(np.zeros(n, np.int64))}
    cols |= {lab: pa.array(np.zeros(n, np.int8)) for lab in LABELS}
    cols |= {f"pred_{lab}": pa.array(np.zeros(n)) for lab in LABELS}
    pq.write_table(pa.table(cols), path, compression="zstd", store_schema=False)


def test_ids_that_decode_past_the_limit_are_refused_before_decoding(tmp_path, capsys, monkeypatch):
    """Before: a 260 KB file of 1M rows x one 2,000-character id made `report` decode 2 GB of
    ids (4 GB resident) before saying the ids repeat; 10,000 characters would exhaust the machine.
    Now the ids are read as a dictionary and their decoded size is checked first (here with the
    limit lowered so the test stays small)."""
    path = tmp_path / "bomb.parquet"
    _dictionary_bomb(path, 20_000, 100)
    assert path.stat().st_size < 20_000
    monkeypatch.setattr(predictions, "MAX_ID_BYTES", 1_000_000)
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 2
    line = one_error_line(capsys, "report")
    assert "image ids would take 2000000 bytes decoded (limit 1000000)" in line
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize(
    ("column", "array", "says"),
    [
        ("pred_any", pa.array(["0.5"] * 40), "'pred_any' must hold finite probabilities in [0, 1] (the file has string)"),
        ("any", pa.array([[0]] * 40), "'any' must hold integers 0 or 1 (the file has list<"),
        ("image_id", pa.array(np.arange(40)), "image_id must be unique, non-null strings (the file has int64)"),
        ("fold", pa.array(["2"] * 40), "fold must hold integer folds (the file has string)"),
    ],
)  # fmt: skip
def test_column_types_are_checked_from_the_footer(tmp_path, capsys, column, array, says):
    """A column of the wrong type is named with the type the file declares, before it is read."""
    t = pa.Table.from_pandas(table(), preserve_index=False)
    path = tmp_path / "typed.parquet"
    pq.write_table(t.set_column(t.column_names.index(column), column, array), path)
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 2
    assert says in one_error_line(capsys, "report")


def _previous_report(tmp_path):
    a = written(tmp_path, table(), "a.parquet")
    assert main(["report", str(a), "--out", str(tmp_path / "rep")]) == 0
    return a, tmp_path / "rep"


def test_an_out_folder_of_other_files_is_never_written(tmp_path, capsys):
    """Before: any folder holding a file named report.html was taken for a previous report, and
    report.html, roc.png and metrics.csv in it were replaced (a web folder's own page lost). Now
    --out must be new, empty or hold only what a report writes, its report.html ours: else one
    line, exit 2, nothing touched."""
    a = written(tmp_path, table(), "a.parquet")
    site = tmp_path / "site"
    site.mkdir()
    mine = {"report.html": "<html>my page</html>", "index.html": "mine", "roc.png": "my png"}
    for name, text in mine.items():
        (site / name).write_text(text)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "report.html").write_text("<html>someone else's report</html>")
    for folder, says in ((site, "holding other files (index.html)"), (alone, "no report.html of ich-train")):  # fmt: skip
        assert main(["report", str(a), "--out", str(folder)]) == 2
        assert says in one_error_line(capsys, "report")
    assert {n: (site / n).read_text() for n in mine} == mine and os.listdir(alone) == ["report.html"]  # fmt: skip
    assert (alone / "report.html").read_text() == "<html>someone else's report</html>"


def test_a_previous_report_is_rewritten_but_not_one_with_other_files_or_links(tmp_path, capsys):
    """A previous report is rewritten in place; one that has gained a file of someone else, a
    link named like one of its files, or a link at a `.partial` name (before: written through,
    replacing the file it pointed at) is refused and nothing outside it changes."""
    a, rep = _previous_report(tmp_path)
    capsys.readouterr()
    assert main(["report", str(a), "--out", str(rep), "--threshold", "0.5"]) == 0
    assert "threshold fixed at 0.5" in (rep / "report.html").read_text()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("notes.txt", "report.html.partial", "roc.png"):
        if name == "notes.txt":
            (rep / name).write_text("someone's notes")
        else:
            (rep / name).unlink(missing_ok=True)
            (rep / name).symlink_to(victim)
        assert main(["report", str(a), "--out", str(rep)]) == 2, name
        assert f"holding other files ({name})" in one_error_line(capsys, "report")
        assert victim.read_text() == "precious"
        (rep / name).unlink()
    assert main(["report", str(a), "--out", str(rep)]) == 0  # the roc.png link removed: ours again
    assert (rep / "roc.png").stat().st_size > 0 and victim.read_text() == "precious"


def test_a_leftover_partial_file_is_never_written_through(tmp_path):
    """A temporary file a killed run left (a regular file, perhaps a hard link to another file)
    is never reused: each write makes a new private one, so what it was linked to is unchanged."""
    a, rep = _previous_report(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("keep me")
    for name in ("metrics.csv.partial", "metrics.csv.abcd1234.partial"):
        os.link(other, rep / name)
    assert main(["report", str(a), "--out", str(rep)]) == 0
    assert other.read_text() == "keep me" and (rep / "metrics.csv").stat().st_nlink == 1


def test_out_inside_a_file_is_one_line(tmp_path, capsys):
    """Before: `--out file/sub` was an I/O error (exit 1) after the report was computed."""
    a = written(tmp_path, table(), "a.parquet")
    assert main(["report", str(a), "--out", str(a / "sub")]) == 2
    assert f"{a} is a file, not a folder" in one_error_line(capsys, "report")


def _damaged_id(tmp_path) -> str:
    """A predictions file (uncompressed) whose first image id holds a byte that is not UTF-8."""
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(written(tmp_path, table())), plain, compression="none")
    data = bytearray(plain.read_bytes())
    data[data.find(b"ID_0000") + 3] = 0xFF
    plain.write_bytes(bytes(data))
    return str(plain)


def test_damaged_pages_and_pandas_metadata_are_one_line_or_ignored(tmp_path, capsys):
    """Found by flipping bytes: an id that is not UTF-8 was read into the report; pandas metadata
    naming an unknown dtype was a TypeError traceback (it is not read now); a file without an
    image_id column stays one line."""
    assert main(["report", _damaged_id(tmp_path), "--out", str(tmp_path / "r1")]) == 2
    assert "not a readable Parquet file (ArrowInvalid" in one_error_line(capsys, "report")
    t = pa.Table.from_pandas(table(), preserve_index=False)
    meta = {
        **t.schema.metadata,
        b"pandas": b'{"columns": [{"name": "fold", "numpy_type": "intC"}]}',
    }
    pq.write_table(t.replace_schema_metadata(meta), tmp_path / "pandas.parquet")
    assert main(["report", str(tmp_path / "pandas.parquet"), "--out", str(tmp_path / "r2")]) == 0
    pq.write_table(t.drop(["image_id"]), tmp_path / "noid.parquet")
    assert main(["report", str(tmp_path / "noid.parquet"), "--out", str(tmp_path / "r3")]) == 2
    assert "has no column image_id" in one_error_line(capsys, "report")
