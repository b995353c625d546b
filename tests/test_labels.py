"""The labels CSV: pivot to one row per image, and every problem counted with its reason."""

from ich_prep import LABELS
from ich_prep.labels import read_labels
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
