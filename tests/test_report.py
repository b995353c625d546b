"""The evaluation report (ich_train.report, `ich-train report`): numbers equal scikit-learn's, the
folder and its self-contained report.html, several runs side by side, hostile predictions files."""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from ich_prep import LABELS
from ich_prep.errors import UserError
from ich_train import predictions, report
from ich_train.cli import main
from ich_train.infer import evaluate as cnn_evaluate
from ich_train.metrics import weighted_log_loss
from tests.test_seq import cnn_runs  # noqa: F401 - the module-scoped fixture
from tests.test_train_cli_errors import one_error_line
from tests.train_fixtures import deadline

PNGS = ["roc.png", "pr.png", "calibration.png", *(f"confusion_{lab}.png" for lab in LABELS)]
META = {
    "run": "b0",
    "source": {"checkpoint": "runs/b0/best.pt", "epoch": 3},
    "config": {"model": "efficientnet_b0", "lr": 0.001, "sampler": "balanced", "pos_fraction": 0.5},
    "build": {"fingerprint": "f" * 64, "index_sha256": "a" * 64, "config.size": 256},
}


def table(n: int = 40, seed: int = 0, fold: int = 2, skill: float = 0.3) -> pd.DataFrame:
    """A predictions table as evaluate writes it; epidural has no positive (one class)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"image_id": [f"ID_{i:04d}" for i in range(n)], "fold": fold})
    for lab in LABELS:
        frame[lab] = (rng.random(n) < 0.3).astype(np.int8)
    frame["epidural"] = np.int8(0)
    for lab in LABELS:
        frame[f"pred_{lab}"] = np.clip(frame[lab] * skill + rng.random(n) * (1 - skill), 0, 1)
    return frame


def written(
    tmp_path: Path, frame: pd.DataFrame, name: str = "oof_fold2.parquet", meta=META
) -> Path:
    path = tmp_path / name
    report.write_predictions(path, frame, meta)
    return path


# ---- numbers


def test_every_number_equals_scikit_learn():
    """Each label's log loss, AUC, AP, precision/recall/F1/specificity at the F1-maximising threshold
    and sensitivity at specificity 0.90/0.95 equal scikit-learn's own calls; the threshold's F1 is
    the best of all candidate thresholds; a one-class label is NaN; the mean row's log loss is the
    competition's weighted log loss."""
    frame = report.check_predictions(table(), "t")
    rows = report.run_rows(frame, "r")
    for j, lab in enumerate(LABELS):
        y, p, row = frame[lab].to_numpy(), frame[f"pred_{lab}"].to_numpy(), rows[j]
        assert row["label"] == lab and row["prevalence"] == pytest.approx(y.mean())
        assert row["log_loss"] == pytest.approx(log_loss(y, p, labels=[0, 1]))
        if lab == "epidural":
            keys = ("roc_auc", "average_precision", "threshold", "f1", "sens_at_spec90")
            assert all(math.isnan(row[k]) for k in keys)
            continue
        assert row["roc_auc"] == pytest.approx(roc_auc_score(y, p))
        assert row["average_precision"] == pytest.approx(average_precision_score(y, p))
        pred = p >= row["threshold"]
        assert row["precision"] == pytest.approx(precision_score(y, pred))
        assert row["recall"] == pytest.approx(recall_score(y, pred))
        assert row["f1"] == pytest.approx(f1_score(y, pred))
        assert row["f1"] == pytest.approx(max(f1_score(y, p >= t) for t in np.unique(p)))
        tn, fp, _, _ = confusion_matrix(y, pred).ravel()
        assert row["specificity"] == pytest.approx(tn / (tn + fp))
        fpr, tpr, _ = roc_curve(y, p)
        assert row["sens_at_spec90"] == pytest.approx(tpr[fpr <= 0.1 + 1e-12].max())
        assert row["sens_at_spec95"] == pytest.approx(tpr[fpr <= 0.05 + 1e-12].max())
    y, p = frame[list(LABELS)].to_numpy(), frame[report.PRED].to_numpy()
    mean = rows[-1]
    assert mean["label"] == "mean" and mean["log_loss"] == pytest.approx(weighted_log_loss(y, p))
    assert mean["roc_auc"] == pytest.approx(np.mean([r["roc_auc"] for r in rows[:6] if r["label"] != "epidural"]))  # fmt: skip


def test_six_rows_by_hand():
    """y = 0 0 0 1 1 1, p = .1 .4 .6 .3 .7 .9: F1 is best (0.8) at threshold 0.7 (precision 1,
    recall 2/3, specificity 1); at a fixed 0.5 two of three negatives are below it (specificity
    2/3, precision 2/3); 7 of 9 positive-negative pairs are ordered (AUC 7/9); no false positive
    above 0.7, so sensitivity at specificity 0.90 and 0.95 is 2/3."""
    y, p = np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.4, 0.6, 0.3, 0.7, 0.9])
    best = report.label_metrics(y, p)
    assert best["threshold"] == 0.7 and best["f1"] == pytest.approx(0.8)
    assert (best["precision"], best["recall"], best["specificity"]) == pytest.approx((1, 2 / 3, 1))
    assert best["roc_auc"] == pytest.approx(7 / 9)
    assert best["sens_at_spec90"] == best["sens_at_spec95"] == pytest.approx(2 / 3)
    fixed = report.label_metrics(y, p, threshold=0.5)
    assert (fixed["specificity"], fixed["precision"], fixed["recall"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))  # fmt: skip
    assert fixed["confusion"].tolist() == [[2, 1], [1, 2]]


def test_sensitivity_at_exactly_the_specificity_by_hand():
    """10 negatives, one of them (0.95) above both positives' lower one (0.9): specificity 0.90
    allows that one false positive (both positives found), 0.95 allows none (only 0.99 found)."""
    y = np.array([0] * 10 + [1, 1])
    p = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95, 0.9, 0.99])
    assert report.sensitivity_at_specificity(y, p, 0.90) == 1.0
    assert report.sensitivity_at_specificity(y, p, 0.95) == 0.5


def test_brier_and_expected_calibration_error_by_hand(tmp_path):
    """y = 0 0 1 1, p = .1 .2 .3 .4: Brier = (.01 + .04 + .49 + .36) / 4 = .225; two quantile bins
    {.1, .2} (observed 0, predicted .15) and {.3, .4} (observed 1, predicted .35): ECE = .5 x .15 +
    .5 x .65 = .4. At a 2% prevalence (200 distinct predictions, 10 bins of 20) the ECE is the mean
    gap of scikit-learn's quantile calibration curve; metrics.csv and report.html carry both."""
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    row = report.label_metrics(y, p)
    assert row["brier"] == pytest.approx(0.225) and report.expected_calibration_error(y, p, bins=2) == pytest.approx(0.4)  # fmt: skip
    rng = np.random.default_rng(0)
    p = rng.permutation(np.linspace(0.001, 0.2, 200))
    y = (rng.random(200) < p).astype(int)
    true, pred = calibration_curve(y, p, n_bins=10, strategy="quantile")
    assert len(true) == 10 and report.expected_calibration_error(y, p) == pytest.approx(np.abs(true - pred).mean())  # fmt: skip
    frame = report.check_predictions(table(), "t")
    t = report.write_report([frame], ["b0"], tmp_path / "rep", [META]).set_index("label")
    csv = pd.read_csv(tmp_path / "rep" / "metrics.csv").set_index("label")
    y, p = frame["any"].to_numpy(), frame["pred_any"].to_numpy()
    assert csv.loc["any", "brier"] == pytest.approx(((p - y) ** 2).mean())
    assert csv.loc["any", "ece"] == pytest.approx(report.expected_calibration_error(y, p))
    assert csv.loc["mean", "brier"] == pytest.approx(csv.loc[list(LABELS), "brier"].mean())
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "expected calibration error over 10 quantile bins" in page
    assert f"{t.loc['any', 'ece']:.4f}" in page and f"{t.loc['mean', 'brier']:.4f}" in page


# ---- the folder and report.html


def test_report_folder_is_self_contained(tmp_path):
    """metrics.csv, 9 PNGs and report.html; every image is an embedded PNG data URI, nothing
    refers to a file or URL, there is no script; the table, the prevalence, the threshold rule,
    the config, the build identity and the sampler note are in the page."""
    frame = report.check_predictions(table(), "t")
    t = report.write_report([frame], ["b0"], tmp_path / "rep", [META])
    for name in ["metrics.csv", "report.html", *PNGS]:
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    csv = pd.read_csv(tmp_path / "rep" / "metrics.csv")
    assert csv["roc_auc"].tolist() == pytest.approx(t["roc_auc"].tolist(), nan_ok=True)
    assert math.isnan(csv.set_index("label").loc["epidural", "roc_auc"])
    page = (tmp_path / "rep" / "report.html").read_text()
    srcs = re.findall(r"<img[^>]*\bsrc=\"([^\"]*)\"", page)
    assert len(srcs) == len(PNGS) == page.count("<img")
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<script" not in page.lower()
    any_auc = t.set_index("label").loc["any", "roc_auc"]
    assert f"{any_auc:.3f}" in page and "efficientnet_b0" in page and "f" * 64 in page
    assert "natural prevalence" in page and "maximising F1" in page
    assert f"any {frame['any'].mean():.4f}" in page


def test_two_runs_side_by_side(tmp_path, capsys):
    """`ich-train report A B --names` prints and renders both runs' names and numbers; metrics.csv
    has a row per run and label; a fixed --threshold is used for every label."""
    a = written(tmp_path, table(skill=0.6), "a.parquet")
    b = written(tmp_path, table(skill=0.2), "b.parquet", meta={})
    out = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--out", str(out), "--names", "strong,weak", "--threshold", "0.5"]) == 0  # fmt: skip
    stdout = capsys.readouterr().out
    csv = pd.read_csv(out / "metrics.csv").set_index(["run", "label"])
    assert len(csv) == 2 * 7 and (csv["threshold"].dropna() == 0.5).all()
    page = (out / "report.html").read_text()
    for run in ("strong", "weak"):
        auc = csv.loc[(run, "any"), "roc_auc"]
        assert f"{auc:.3f}" in page and f"{auc:.4f}" in stdout and run in page and run in stdout
    assert csv.loc[("strong", "any"), "roc_auc"] > csv.loc[("weak", "any"), "roc_auc"]
    assert f"report: {out / 'report.html'}" in stdout and "threshold fixed at 0.5" in page


def test_hostile_strings_are_escaped(tmp_path):
    """An image id, config keys and values, and a run name holding markup appear escaped only."""
    frame = table()
    frame.loc[0, "image_id"] = "<script>alert(1)</script>"
    frame.loc[0, "pred_any"] = 1.0 - frame.loc[0, "any"]  # its worst error: listed in the page
    meta = {"config": {"<b>key</b>": '"><img src=x onerror=alert(1)>'}, "build": {"x": ["</table>"]}}  # fmt: skip
    report.write_report([report.check_predictions(frame, "t")], ["<i>run</i>"], tmp_path / "r", [meta])  # fmt: skip
    page = (tmp_path / "r" / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert "&lt;b&gt;key&lt;/b&gt;" in page and "<img src=x" not in page
    assert "<i>run" not in page and "&lt;i&gt;run&lt;/i&gt;" in page
    assert '</table>"' not in page and "&lt;/table&gt;" in page


# ---- hostile predictions files and CLI errors


def hostile(case: str, d: Path) -> Path:
    """A predictions file damaged as `case` says."""
    if case == "fifo":
        os.mkfifo(d / "oof.parquet")  # nobody writes: a blocking read would hang
        return d / "oof.parquet"
    if case == "not parquet":
        (d / "x.parquet").write_text("hello")
        return d / "x.parquet"
    damaged = {
        "missing column": lambda t: t.drop(columns="pred_subdural"),
        "float labels": lambda t: t.astype({"any": "float64"}),
        "probability 2": lambda t: t.assign(pred_any=2.0),
        "fold as float": lambda t: t.assign(fold=1.0),
        "duplicate ids": lambda t: t.assign(image_id="ID_x"),
    }
    return written(d, damaged[case](table()))


CASES = {
    "fifo": "not a regular file",
    "not parquet": "not a readable Parquet",
    "missing column": "no column pred_subdural",
    "float labels": "'any' must hold integers",
    "probability 2": "'pred_any' must hold finite probabilities",
    "fold as float": "fold must hold integer folds",
    "duplicate ids": "unique",
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_predictions_file_is_one_line_exit_2(tmp_path, capsys, case):
    """Each is refused by `ich-train report` in one line (exit 2), without hanging or writing."""
    path, message = hostile(case, tmp_path), CASES[case]
    with deadline(20):
        rc = main(["report", str(path), "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("ich-train report: "), err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "rep").exists()


def test_row_cap_is_checked_from_the_footer(tmp_path, monkeypatch):
    """More rows than MAX_ROWS is refused before the columns are decoded."""
    path = written(tmp_path, table())
    monkeypatch.setattr(predictions, "MAX_ROWS", 39)
    with pytest.raises(report.ReportError, match="declares 40 rows"):
        report.read_predictions(path)


def test_runs_that_do_not_compare_are_refused(tmp_path, capsys):
    """Other fold, other images, an --out holding other files, too few --names, a threshold
    outside [0, 1]: one line each, exit 2."""
    a = written(tmp_path, table())
    cases = {
        "fold 3, run": [str(a), str(written(tmp_path, table(fold=3), "f3.parquet"))],
        "scored different images": [str(a), str(written(tmp_path, table(n=30), "short.parquet"))],
        "holding other files": [str(a), "--out", str(tmp_path)],
        "--names gives 3 names for 2": [str(a), str(a), "--names", "x,y,z"],
        "distinct": [str(a), str(a), "--names", "x,"],
        "fold 2 is in both": [str(a), str(a), "--names", "x,x"],
        "probability in [0, 1]": [str(a), "--threshold", "2"],
    }
    for message, argv in cases.items():
        out = [] if "--out" in argv else ["--out", str(tmp_path / "new")]
        assert main(["report", *argv, *out]) == 2, message
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ich-train report: ") and message in err, err
    assert not (tmp_path / "new").exists()


def test_predictions_file_round_trip_keeps_the_run_metadata(tmp_path):
    """write_predictions records name, config and build; read_predictions returns them and the
    rows sorted by id; damaged metadata reads as {} and default names fall back to folders."""
    frame, meta = report.read_predictions(written(tmp_path, table().iloc[::-1]))
    assert meta == META and frame["image_id"].is_monotonic_increasing
    assert report.default_names(["x/a.parquet"], [meta]) == ["b0"]
    assert report.default_names(["x/a.parquet", "y/a.parquet"], [{"run": "<b>"}, {}]) == ["x", "y"]
    assert predictions._meta(b"[1, 2]") == {} and predictions._meta(b"{" * 100_000) == {}
    assert issubclass(report.ReportError, UserError)


# ---- headless browser (Debian's chromium; skipped where it is not installed, as in CI)


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(tmp_path):
    """report.html opened from disk renders: the screenshot has the page's many colours."""
    from PIL import Image

    frame = report.check_predictions(table(), "t")
    report.write_report([frame], ["b0"], tmp_path / "rep", [META])
    shot = tmp_path / "shot.png"
    cmd = [shutil.which("chromium") or "/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           (tmp_path / "rep" / "report.html").as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 200  # text, table shading and plots; a blank page has 1
    assert max(c for c, _ in colours) < 0.9 * 1200 * 2000  # not one colour almost everywhere


# ---- several folds of one run, pooled


def test_folds_of_one_run_are_pooled_beside_the_per_fold_figures(cnn_runs, tmp_path, capsys):  # noqa: F811
    """The held-out predictions of two fold CNNs, written by `ich-train evaluate`. Before: `ich-train
    report f0 f1` refused them (another fold; a concatenated file: "fold must be one integer
    fold"). Now files given one name are one run: the table is every image of both folds scored
    as one set (equal to scikit-learn and the competition metric on the concatenation), the
    per-fold rows equal each fold's own report, two pooled runs compare, and an image in two folds
    is one line."""
    tmp, build, ckpts = cnn_runs
    files = []
    for fold in (0, 1):
        m = cnn_evaluate(ckpts[fold], str(build), fold, out=str(tmp_path / f"oof_fold{fold}.parquet"), workers=0, progress=False, report=False)  # fmt: skip
        files.append(m["predictions"])
    assert main(["report", *files, "--names", "cnn", "--out", str(tmp_path / "pooled")]) == 0
    stdout = capsys.readouterr().out
    both = pd.concat([pd.read_parquet(f) for f in files])
    y, p = both[list(LABELS)].to_numpy(), both[report.PRED].to_numpy()
    csv = pd.read_csv(tmp_path / "pooled" / "metrics.csv", dtype={"fold": str}).set_index(["fold", "label"])  # fmt: skip
    assert csv.loc[("pooled", "mean"), "log_loss"] == pytest.approx(weighted_log_loss(y, p))
    assert csv.loc[("pooled", "any"), "roc_auc"] == pytest.approx(roc_auc_score(both["any"], both["pred_any"]))  # fmt: skip
    assert csv.loc[("pooled", "any"), "n"] == len(both) == len(pd.read_parquet(build / "index.parquet"))  # fmt: skip
    for fold, f in enumerate(files):
        assert main(["report", f, "--out", str(tmp_path / f"one{fold}")]) == 0
        one = pd.read_csv(tmp_path / f"one{fold}" / "metrics.csv").set_index("label")
        for key in ("log_loss", "roc_auc", "brier", "n"):
            assert csv.loc[(str(fold), "mean"), key] == pytest.approx(one.loc["mean", key], nan_ok=True)  # fmt: skip
    page = (tmp_path / "pooled" / "report.html").read_text()
    assert "folds 0, 1 pooled" in page and "Per fold" in page and "mean of folds" in page
    assert "pooled over" in stdout and "per fold:" in stdout and "mean of folds" in stdout
    capsys.readouterr()
    assert main(["report", *files, *files, "--names", "a,a,b,b", "--out", str(tmp_path / "two")]) == 0  # fmt: skip
    two = pd.read_csv(tmp_path / "two" / "metrics.csv", dtype={"fold": str})
    assert set(two["run"]) == {"a", "b"} and set(two["fold"]) == {"pooled", "0", "1"}
    other_split = pd.read_parquet(files[0]).assign(
        fold=2
    )  # fold 0's images in another split's fold 2
    report.write_predictions(tmp_path / "oof_fold2.parquet", other_split, {})
    capsys.readouterr()
    assert main(["report", *files, str(tmp_path / "oof_fold2.parquet"), "--names", "cnn", "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
    line = one_error_line(capsys, "report")
    assert "is in fold 0" in line and "and fold 2" in line and "each image once" in line
    assert not (tmp_path / "bad").exists()
