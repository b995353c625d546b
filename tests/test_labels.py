"""The labels CSV: pivot to one row per image, and every problem counted with its reason."""

import pytest

from ich_prep import LABELS
from ich_prep.errors import UserError
from ich_prep.labels import LabelsError, read_labels
from tests.conftest import csv_rows as rows


def write_csv(tmp_path, lines):
    p = tmp_path / "labels.csv"
    p.write_text("ID,Label\n" + "\n".join(lines) + "\n")
    return str(p)


def test_pivot_fixed_order(tmp_path):
    """Rows in Kaggle order pivot to columns in LABELS order."""
    t = read_labels(
        write_csv(tmp_path, rows("ID_a1", {"subdural": 1, "any": 1}) + rows("ID_b2", {}))
    )
    assert list(t.labels.columns) == list(LABELS)
    assert t.labels.loc["ID_a1"].tolist() == [1, 0, 0, 0, 0, 1]
    assert t.labels.loc["ID_b2"].sum() == 0 and t.errors.empty


def test_identical_duplicates_dropped(tmp_path):
    """An identical repeated row is dropped and counted, not an error."""
    lines = rows("ID_a1", {}) + ["ID_a1_epidural,0"]
    t = read_labels(write_csv(tmp_path, lines))
    assert t.stats["duplicate_rows_dropped"] == 1 and t.errors.empty and len(t.labels) == 1


def test_conflicting_duplicates_reported(tmp_path):
    """Two different labels for one subtype make the image an error 'conflicting_labels'."""
    t = read_labels(
        write_csv(tmp_path, rows("ID_a1", {}) + ["ID_a1_epidural,1"] + rows("ID_b2", {}))
    )
    assert t.errors.set_index("image_id").loc["ID_a1", "reason"] == "conflicting_labels"
    assert "ID_a1" not in t.labels.index and "ID_b2" in t.labels.index


def test_malformed_id(tmp_path):
    """An ID that is not ID_<image>_<subtype> is reported with its line number."""
    t = read_labels(write_csv(tmp_path, rows("ID_a1", {}) + ["garbage_row,0"]))
    err = t.errors.iloc[0]
    assert (
        err["reason"] == "malformed_csv_id"
        and "line 8" in err["detail"]
        and err["image_id"] == "garbage_row"
    )


def test_malformed_label(tmp_path):
    """A label other than 0/1 makes the image an error."""
    lines = rows("ID_a1", {})
    lines[0] = "ID_a1_epidural,0.5"
    t = read_labels(write_csv(tmp_path, lines))
    assert t.errors.iloc[0]["reason"] == "malformed_label" and t.labels.empty


def test_missing_subtypes(tmp_path):
    """An image with only some of its six rows is 'missing_labels' naming what is absent."""
    t = read_labels(write_csv(tmp_path, rows("ID_a1", {})[:4]))
    err = t.errors.iloc[0]
    assert err["reason"] == "missing_labels" and "subdural" in err["detail"]


def test_any_contradiction(tmp_path):
    """any=0 with a positive subtype (or any=1 with none) is 'any_mismatch'."""
    t = read_labels(write_csv(tmp_path, rows("ID_a1", {"subdural": 1}) + rows("ID_b2", {"any": 1})))
    assert sorted(t.errors["image_id"]) == ["ID_a1", "ID_b2"]
    assert set(t.errors["reason"]) == {"any_mismatch"}


def test_real_subset_counts(real_samples):
    """The real RSNA labels subset parses to its documented counts (1044 images, 84 any)."""
    csv = (
        real_samples
        / "Riku-Sasaki_kaggle-rsna-intracranial-hemorrhage-detection"
        / "stage_2_train_subset.csv"
    )
    t = read_labels(str(csv))
    assert len(t.labels) == 1044 and t.labels["any"].sum() == 84 and t.errors.empty


BAD_FILES = {
    "wrong header": (b"Id,Lbl\nID_a1_epidural,0\n", "line 1 (the header) is 'Id,Lbl'"),
    "no Label column": (b"ID\nID_a1_epidural\n", "line 1 (the header) is 'ID'"),
    "no header": (b"ID_a1_epidural,0\nID_a1_any,0\n", "line 1 (the header) is 'ID_a1_epidural,0'"),
    "0 bytes": (b"", "the file is empty"),
    "blank lines only": (b"\n\n", "the file is empty"),
    "header only": (b"ID,Label\n", "there is a header but no rows"),
    "1 field": (b"ID,Label\nID_a1_epidural,0\nID_a1_any\n", "line 3 has 1 field(s), not 2: 'ID_a1_any'"),
    "3 fields": (b"ID,Label\nID_a1_epidural,0,1\n", "line 2 has 3 field(s), not 2"),
    "not UTF-8": (b"ID,Label\nID_a1_epidural,0\nID_a1_a\xffny,0\n", "line 3 has a byte that is not UTF-8 (0xff at column 8)"),
    "not UTF-8 header": (b"\xffID,Label\nID_a1_epidural,0\n", "line 1 has a byte that is not UTF-8"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_not_a_labels_csv_is_one_clear_error(tmp_path, case):
    """A file that is not ID,Label rows: LabelsError (a UserError and a ValueError) naming the
    file, the line when one is to blame, and the expected format; never a pyarrow traceback."""
    content, says = BAD_FILES[case]
    p = tmp_path / "labels.csv"
    p.write_bytes(content)
    with pytest.raises(LabelsError) as e:
        read_labels(str(p))
    msg = str(e.value)
    assert msg.startswith(f"--labels {p}: ") and says in msg, msg
    assert "ID,Label" in msg and "ID_63eb1e259_epidural,0" in msg and "\n" not in msg
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_bad_row_deep_in_a_big_file_is_found_by_line(tmp_path):
    """A 3-field row in a later pyarrow block is reported with its own line number."""
    lines = [line for i in range(400) for line in rows(f"ID_{i:05x}", {})]
    lines.insert(2000, "ID_zz_any,0,extra")
    p = write_csv(tmp_path, lines)
    with pytest.raises(LabelsError, match="line 2002 has 3 field"):
        read_labels(p, block_size=4096)


def test_bom_and_crlf_are_fine(tmp_path):
    """A UTF-8 BOM (Excel) and CRLF line ends parse like the plain file."""
    p = tmp_path / "labels.csv"
    p.write_bytes(b"\xef\xbb\xbfID,Label\r\n" + "\r\n".join(rows("ID_a1", {})).encode() + b"\r\n")
    t = read_labels(str(p))
    assert t.errors.empty and list(t.labels.index) == ["ID_a1"]


@pytest.mark.parametrize("size", [70_000, 200_000, 2_000_000, 20_000_000])
@pytest.mark.parametrize("column", ["ID", "Label"])
@pytest.mark.parametrize("row", [1, 30])
def test_a_huge_field_is_one_clear_error_or_a_bounded_error_row(tmp_path, size, column, row):
    """One field of 70 KB to 20 MB (in the id or the label, early or late): never a csv/pyarrow
    traceback (was: `_csv.Error: field larger than field limit` from the line locator). Either
    a LabelsError naming the line (one line of text, short), or an error row whose detail is
    short: nothing of the field is copied whole."""
    lines = [line for i in range(10) for line in rows(f"ID_{i:05x}", {})]
    huge = "x" * size
    lines[row] = f"ID_{huge}_any,0" if column == "ID" else f"ID_00001_any,{huge}"
    p = write_csv(tmp_path, lines)
    try:
        t = read_labels(p)
    except LabelsError as e:
        msg = str(e)
        assert f"line {row + 2} " in msg and "\n" not in msg and len(msg) < 500, msg[:600]
        return
    assert len(t.errors) >= 1
    assert t.errors["detail"].str.len().max() < 500
    assert t.errors["image_id"].str.len().max() < 500
