"""The evaluation report: per-label metrics (scikit-learn; the competition metric is ours), ROC, PR,
confusion and calibration plots, and one self-contained report.html, from out-of-fold predictions.

`write_report(frames, names, out_dir, metas, threshold)` is the one entry point (evaluate and
`ich-train report`). Predictions are read bounded (ich_train.predictions, re-exported here) and every
input string is HTML-escaped: a predictions file, its metadata and the run names are untrusted.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from ich_prep import LABELS
from ich_prep.location import atomic_open, file_in_the_way, open_local, temp_target, what_is
from ich_train.metrics import LABEL_WEIGHTS, label_log_loss, weighted_log_loss
from ich_train.predictions import PRED, ReportError
from ich_train.predictions import check_predictions as check_predictions  # re-exported
from ich_train.predictions import predictions_frame as predictions_frame  # re-exported
from ich_train.predictions import read_predictions as read_predictions  # re-exported
from ich_train.predictions import write_predictions as write_predictions  # re-exported
from ich_train.report_figures import CAL_BINS, figures

SPECIFICITIES = (0.90, 0.95)
SAFE_NAME = re.compile(r"[\w.+-]{1,60}")  # a run name taken from a predictions file's metadata
METRICS = {  # column -> heading in the HTML table and the terminal
    "prevalence": "prev",
    "positives": "pos",
    "log_loss": "log loss",
    "roc_auc": "ROC-AUC",
    "average_precision": "AP",
    "threshold": "thr",
    "precision": "prec",
    "recall": "recall",
    "f1": "F1",
    "specificity": "spec",
    "sens_at_spec90": "sens@spec.90",
    "sens_at_spec95": "sens@spec.95",
    "brier": "Brier",
    "ece": "ECE",
}


def folds_of(frame: pd.DataFrame) -> list[int]:
    return sorted(int(k) for k in frame["fold"].unique())


def _folds_text(folds: list[int]) -> str:
    return f"fold {folds[0]}" if len(folds) == 1 else f"folds {', '.join(map(str, folds))}"


def check_comparable(frames: list[pd.DataFrame], names: list[str]) -> None:
    """ReportError unless every run scored the same folds, the same images and the same labels."""
    first = frames[0]
    for frame, name in zip(frames[1:], names[1:], strict=True):
        if folds_of(frame) != folds_of(first):
            raise ReportError(f"run {name!r} is {_folds_text(folds_of(frame))[:80]}, run {names[0]!r} {_folds_text(folds_of(first))[:80]}: compare runs on the same folds, or pool one run's folds by giving its files one name (--names NAME)")  # fmt: skip
        if len(frame) != len(first) or not frame["image_id"].equals(first["image_id"]):
            raise ReportError(f"runs {names[0]!r} and {name!r} scored different images ({len(first)} and {len(frame)}): compare runs evaluated on the same build and fold")  # fmt: skip
        if not frame[list(LABELS)].equals(first[list(LABELS)]):
            raise ReportError(f"runs {names[0]!r} and {name!r} have different labels for the same images: compare runs evaluated on the same build")  # fmt: skip


# ---- numbers (scikit-learn)


def f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising F1 on (y, p) (predict positive when p >= it); NaN with one class."""
    if len(np.unique(y)) < 2:
        return math.nan
    precision, recall, thresholds = precision_recall_curve(y, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    return float(thresholds[int(np.argmax(f1))])


def sensitivity_at_specificity(y: np.ndarray, p: np.ndarray, specificity: float) -> float:
    """The highest sensitivity (TPR) of any threshold with specificity >= `specificity`."""
    if len(np.unique(y)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(y, p)
    return float(tpr[fpr <= 1 - specificity + 1e-12].max())


def at_threshold(y: np.ndarray, p: np.ndarray, t: float) -> dict:
    """Precision, recall, F1, specificity and the confusion matrix at `t` (all NaN when t is)."""
    if math.isnan(t):
        return {"precision": math.nan, "recall": math.nan, "f1": math.nan, "specificity": math.nan, "confusion": None}  # fmt: skip
    pred = (p >= t).astype(int)
    prec, rec, f1, _ = precision_recall_fscore_support(
        y, pred, average="binary", labels=[0, 1], zero_division=np.nan
    )
    cm = confusion_matrix(y, pred, labels=[0, 1])
    tn, fp = cm[0]
    spec = tn / (tn + fp) if tn + fp else math.nan
    return {"precision": prec, "recall": rec, "f1": f1, "specificity": float(spec), "confusion": cm}  # fmt: skip


def quantile_bins(p: np.ndarray, bins: int = CAL_BINS) -> np.ndarray:
    """Each prediction's bin: `bins` bins of equal counts of p, the bins scikit-learn's
    calibration_curve(strategy='quantile') uses (uniform bins put every prediction of a rare label
    in the first)."""
    edges = np.percentile(p, np.linspace(0, 100, bins + 1))
    return np.searchsorted(edges[1:-1], p)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = CAL_BINS) -> float:
    """Sum over quantile bins of (share of images) x |observed frequency - mean prediction|, i.e.
    |positives - summed probability| per bin over all images."""
    ids = quantile_bins(p, bins)
    gap = np.bincount(ids, weights=y, minlength=bins) - np.bincount(ids, weights=p, minlength=bins)
    return float(np.abs(gap).sum() / len(p))


def label_metrics(y: np.ndarray, p: np.ndarray, threshold: float | None = None) -> dict:
    """Every number of one label's row: prevalence, log loss, ROC-AUC, AP, the threshold (F1-max
    unless given) and the metrics at it, sensitivity at specificity 0.90 / 0.95, Brier score and
    expected calibration error (quantile bins)."""
    two = len(np.unique(y)) == 2
    t = f1_threshold(y, p) if threshold is None else float(threshold)
    row = {
        "n": len(y),
        "positives": int(y.sum()),
        "prevalence": float(y.mean()),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "roc_auc": float(roc_auc_score(y, p)) if two else math.nan,
        "average_precision": float(average_precision_score(y, p)) if two else math.nan,
        "threshold": t,
        **at_threshold(y, p, t),
        "brier": float(brier_score_loss(y, p, labels=[0, 1])),
        "ece": expected_calibration_error(y, p),
    }
    for s in SPECIFICITIES:
        row[f"sens_at_spec{round(s * 100)}"] = sensitivity_at_specificity(y, p, s)
    return row


def run_rows(frame: pd.DataFrame, name: str, threshold: float | None = None) -> list[dict]:
    """One row per label plus a `mean` row (metrics averaged over labels where defined; log loss =
    the competition's weighted log loss, any x2)."""
    y, p = frame[list(LABELS)].to_numpy(np.int64), frame[PRED].to_numpy(np.float64)
    rows = [{"run": name, "label": lab, **label_metrics(y[:, j], p[:, j], threshold)} for j, lab in enumerate(LABELS)]  # fmt: skip
    mean = {"run": name, "label": "mean", "n": len(y), "positives": math.nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column of NaN
        for key in METRICS:
            if key not in mean:
                mean[key] = float(np.nanmean([r[key] for r in rows]))
    mean["log_loss"], mean["threshold"] = weighted_log_loss(y, p), math.nan
    return [*rows, mean]


def metrics_table(frames: list[pd.DataFrame], names: list[str], threshold: float | None = None) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """(long table: one row per run and label, {(run, label): confusion matrix or None}). Its
    `fold` column is the fold scored; runs of several folds have their pooled rows (fold
    "pooled": every image of every fold as one set, the cross-validation score) and each fold's."""
    folds = folds_of(frames[0])
    rows = [{**r, "fold": "pooled" if len(folds) > 1 else str(folds[0])} for f, n in zip(frames, names, strict=True) for r in run_rows(f, n, threshold)]  # fmt: skip
    confusion = {(r["run"], r["label"]): r.pop("confusion", None) for r in rows}
    if len(folds) > 1:
        for f, n in zip(frames, names, strict=True):
            rows += [{**r, "fold": str(k)} for k in folds for r in run_rows(f[f["fold"] == k], n, threshold)]  # fmt: skip
        for r in rows:
            r.pop("confusion", None)
    table = pd.DataFrame(rows, columns=["run", "fold", "label", "n", *METRICS])
    return table.astype({"positives": "Int64"}), confusion


def main_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the report's main table: the pooled ones when the runs span several folds."""
    pooled = table["fold"] == "pooled"
    return table[pooled] if pooled.any() else table


def fold_summary(table: pd.DataFrame) -> pd.DataFrame | None:
    """Per run: each fold's images, weighted log loss, AUC any, mean Brier and ECE, the mean over
    the folds and the pooled figures; None for a report of one fold."""
    if not (table["fold"] == "pooled").any():
        return None
    mean = table[table["label"] == "mean"].set_index(["run", "fold"])
    out = mean[["n", "log_loss", "brier", "ece"]].assign(auc_any=table[table["label"] == "any"].set_index(["run", "fold"])["roc_auc"])  # fmt: skip
    out = out.reset_index()
    runs = []
    for run, part in out.groupby("run", sort=False):
        folds = part[part["fold"] != "pooled"]
        avg = {"run": run, "fold": "mean of folds", "n": folds["n"].sum(), **folds[["log_loss", "brier", "ece", "auc_any"]].mean().to_dict()}  # fmt: skip
        runs.append(pd.concat([folds, pd.DataFrame([avg]), part[part["fold"] == "pooled"]]))
    return pd.concat(runs, ignore_index=True).rename(columns={"n": "images", "log_loss": "weighted log loss", "brier": "Brier (mean)", "ece": "ECE (mean)", "auc_any": "AUC any"})  # fmt: skip


def format_table(table: pd.DataFrame) -> str:
    """The table for a terminal: labels down, metrics across (one row per run within a label);
    pooled folds: the pooled rows, then the per-fold summary."""
    folds = fold_summary(table)
    table = main_rows(table)
    t = table.rename(columns=METRICS)
    t["pos"] = [("" if pd.isna(v) else str(v)) for v in t["pos"]]
    order = {lab: i for i, lab in enumerate([*LABELS, "mean"])}
    t = t.sort_values(["label", "run"], key=lambda c: c.map(order) if c.name == "label" else c, kind="stable")  # fmt: skip
    keep = ["label", *METRICS.values()] if table["run"].nunique() == 1 else ["label", "run", *METRICS.values()]  # fmt: skip
    text = t[keep].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="n/a")
    if folds is None:
        return text
    per_fold = folds.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="n/a")
    return (
        f"pooled over {table['n'].iloc[0]} images of every fold:\n{text}\n\nper fold:\n{per_fold}"
    )


# ---- report.html (self-contained: CSS inline, images as data URIs, no script, no link)

CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0;font-size:12px}td,th{border:1px solid #ccc;padding:2px 4px}
th{background:#eef}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.mean td{font-weight:bold}
table.diff td{background:#fff6d5}
.kv{columns:3 300px;font-size:12px;margin:6px 0}.kv div{break-inside:avoid;padding:1px 0}.note{background:#f4f8ff;border-left:4px solid #69c;padding:6px 10px}
.wrap{overflow-x:auto}img{max-width:100%;height:auto}.cm img{max-width:32%;display:inline-block}
code{word-break:break-all}"""
HTML_HEAD = "<!DOCTYPE html><html><head><meta charset=utf-8><title>ICH evaluation report"  # how a folder is known as a report


def _e(value) -> str:
    """Any input value as escaped text (dicts and lists as JSON), cut at 300 characters."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return html.escape(text if len(text) <= 300 else text[:297] + "...", quote=True)


def _num(v, digits: int = 4) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else _e(str(v))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _cell(v, metric: str) -> str:
    return f'<td class="num">{_num(v, 4 if metric in ("log_loss", "brier", "ece") else 3)}</td>'


SHARED = ("prevalence", "positives")  # the same for every run (same fold, same labels)
GROUPS = {
    "Threshold-free": (
        "log_loss",
        "roc_auc",
        "average_precision",
        "sens_at_spec90",
        "sens_at_spec95",
    ),
    "At the threshold": ("threshold", "precision", "recall", "f1", "specificity"),
    f"Calibration (Brier score; expected calibration error over {CAL_BINS} quantile bins)": (
        "brier",
        "ece",
    ),
}


def metrics_html(table: pd.DataFrame, names: list[str], metrics) -> str:
    """Labels down; prevalence once, then a column group per metric with a column per run."""
    span = " rowspan=2" if len(names) > 1 else ""
    head = f"<tr><th{span}>label</th>" + "".join(f"<th{span}>{_e(METRICS[m])}</th>" for m in SHARED)
    head += "".join(f"<th colspan={len(names)}>{_e(METRICS[m])}</th>" for m in metrics) + "</tr>"
    if len(names) > 1:
        head += "<tr>" + "".join(f"<th>{_e(n)}</th>" for _ in metrics for n in names) + "</tr>"
    body = []
    for lab in [*LABELS, "mean"]:
        rows = table[table["label"] == lab].set_index("run")
        cells = "".join(_cell(rows.loc[names[0], m], m) for m in SHARED)
        cells += "".join(_cell(rows.loc[n, m], m) for m in metrics for n in names)
        body.append(f'<tr class="{"mean" if lab == "mean" else ""}"><th>{_e(lab)}</th>{cells}</tr>')
    return f'<div class="wrap"><table>{head}{"".join(body)}</table></div>'


def config_html(metas: list[dict], names: list[str], key: str) -> str:
    """Each run's `key` dict (source, build or config): the entries that differ between runs as a
    table with a column per run, the shared ones as a compact key: value list."""
    dicts = [m.get(key) if isinstance(m.get(key), dict) else {} for m in metas]
    keys = sorted({str(k) for d in dicts for k in d})[:200]
    if not keys:
        return f"<p>no {_e(key)} recorded in the predictions file</p>"
    values = {k: [_e(d.get(k, "")) for d in dicts] for k in keys}
    differ = [k for k in keys if len(set(values[k])) > 1]
    out = ""
    if differ:
        head = "<tr><th>differs</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"
        rows = "".join(f"<tr><th>{_e(k)}</th>" + "".join(f"<td><code>{v}</code></td>" for v in values[k]) + "</tr>" for k in differ)  # fmt: skip
        out += f'<div class="wrap"><table class="diff">{head}{rows}</table></div>'
    same = "".join(f"<div><b>{_e(k)}</b> <code>{values[k][0]}</code></div>" for k in keys if k not in differ)  # fmt: skip
    return out + (f'<div class="kv">{same}</div>' if same else "")


def worst_html(frame: pd.DataFrame, n: int = 10) -> str:
    """The images with the largest weighted log loss: where to look first."""
    y, p = frame[list(LABELS)].to_numpy(np.float64), frame[PRED].to_numpy(np.float64)
    loss = label_log_loss(y, p) @ LABEL_WEIGHTS / LABEL_WEIGHTS.sum()
    head = (
        "<tr><th>image</th><th>loss</th>" + "".join(f"<th>{lab}</th>" for lab in LABELS) + "</tr>"
    )
    rows = []
    for i in np.argsort(-loss, kind="stable")[:n]:
        cells = "".join(f'<td class="num">{int(y[i, j])} / {p[i, j]:.2f}</td>' for j in range(len(LABELS)))  # fmt: skip
        rows.append(f'<tr><td><code>{_e(frame["image_id"].iloc[i])}</code></td><td class="num">{loss[i]:.3f}</td>{cells}</tr>')  # fmt: skip
    return f'<div class="wrap"><table>{head}{"".join(rows)}</table></div>'


def notes(table: pd.DataFrame, metas: list[dict], names: list[str], threshold: float | None) -> list[str]:  # fmt: skip
    """Plain-text notes: prevalence, the threshold rule, and a balanced sampler's effect."""
    first = table[table["run"] == names[0]].set_index("label")
    prev = ", ".join(f"{lab} {first.loc[lab, 'prevalence']:.4f} ({int(first.loc[lab, 'positives'])})" for lab in LABELS)  # fmt: skip
    out = [f"prevalence of the scored images (positives): {prev}"]
    if threshold is None:
        out.append("threshold per label: the one maximising F1 on the scored images (optimistic: chosen on the data it scores)")  # fmt: skip
    else:
        out.append(f"threshold fixed at {threshold} for every label")
    for name, meta in zip(names, metas, strict=True):
        cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        sampler = cfg.get("sampler")
        if sampler not in (None, "", "none", "natural", "uniform"):
            out.append(f"run {name} trained with sampler {sampler} (pos fraction {cfg.get('pos_fraction', '?')}); the validation fold was scored at its natural prevalence above")  # fmt: skip
    out.append("log loss: per label (scikit-learn); mean row: the competition's weighted log loss (any x2). Other mean cells: mean over labels with both classes (Brier and ECE: over all labels)")  # fmt: skip
    out.append(f"calibration: Brier score = mean squared error of the probability (scikit-learn); ECE = sum over {CAL_BINS} quantile bins of (share of images) x |observed frequency - mean prediction|")  # fmt: skip
    return out


def folds_html(table: pd.DataFrame) -> str:
    """The per-fold figures beside the pooled ones (fold_summary), or "" for one fold."""
    folds = fold_summary(table)
    if folds is None:
        return ""
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in folds.columns) + "</tr>"
    rows = "".join("<tr>" + "".join(f"<th>{_e(str(v))}</th>" if c in ("run", "fold") else _cell(v, "log_loss") for c, v in r.items()) + "</tr>" for r in folds.to_dict("records"))  # fmt: skip
    note = "pooled: every fold's held-out predictions scored as one set (the cross-validation score); mean of folds: the average of the per-fold figures"  # fmt: skip
    return f'<h2>Per fold</h2><p class="note">{note}</p><div class="wrap"><table>{head}{rows}</table></div>'


def render_html(table, names, metas, pngs: dict[str, bytes], worst: list[str], threshold, folds: list[int]) -> str:  # fmt: skip
    """The whole report.html as one string: `table` all of metrics_table's rows."""
    per_fold, table = folds_html(table), main_rows(table)
    images, n = int(table["n"].iloc[0]), len(names)
    scored = _folds_text(folds) + (" pooled" if len(folds) > 1 else "")
    runs = ", ".join(_e(x) for x in names)
    note = "".join(f'<p class="note">{_e(t)}</p>' for t in notes(table, metas, names, threshold))
    matrices = "".join(_img(pngs[f"confusion_{lab}.png"], lab) for lab in LABELS)
    parts = [
        f"{HTML_HEAD}: {runs}</title><style>{CSS}</style></head><body>",  # fmt: skip
        f"<h1>ICH evaluation report</h1><p>{n} run(s): <b>{runs}</b>; {_e(scored)}, {images} images</p>",
        "<h2>Runs</h2>" + config_html(metas, names, "source"),
        "<h3>Build</h3>" + config_html(metas, names, "build"),
        "<h3>Config</h3>" + config_html(metas, names, "config"),
        "<h2>Metrics</h2>" + note,
        "".join(f"<h3>{g}</h3>" + metrics_html(table, names, ms) for g, ms in GROUPS.items()),
        per_fold,
        "<h2>ROC</h2>" + _img(pngs["roc.png"], "ROC curves"),
        "<h2>Precision-recall</h2>" + _img(pngs["pr.png"], "precision-recall curves"),
        "<h2>Calibration</h2>" + _img(pngs["calibration.png"], "calibration"),
        f'<h2>Confusion matrices</h2><div class="cm">{matrices}</div>',
        "<h2>Largest errors</h2><p>cells: label / predicted probability</p>"
        + "".join(f"<h3>{_e(name)}</h3>{w}" for name, w in zip(names, worst, strict=True)),
        "</body></html>\n",
    ]
    return "\n".join(parts)


# ---- the report folder


REPORT_FILES = ("metrics.csv", "report.html", "roc.png", "pr.png", "calibration.png", *(f"confusion_{lab}.png" for lab in LABELS))  # fmt: skip


def check_out_dir(out: Path) -> None:
    """ReportError unless `out` is absent, empty or a previous report: a folder holding only the
    files a report writes (regular files, no links), its report.html one of ours. Anything else
    there is someone else's, never overwritten."""
    out = Path(out)
    p = file_in_the_way(out, itself=True)
    if p == out:
        raise ReportError(f"--out {out} is {what_is(p)}; give a folder for the report")
    if p is not None:
        raise ReportError(f"--out {out}: {p} is {what_is(p)}, not a folder; choose another --out")
    if out.is_symlink():  # a link to a folder: the report would be written into what it points at
        raise ReportError(f"--out {out} is a symlink to a folder; give the folder itself, or a new one")  # fmt: skip
    names = sorted(os.listdir(out)) if out.is_dir() else []
    if not names:
        return
    ours = {*REPORT_FILES, *(f"{n}.partial" for n in REPORT_FILES)}
    foreign = [n for n in names if (n not in ours and temp_target(n) not in REPORT_FILES) or not stat.S_ISREG(os.lstat(out / n).st_mode)]  # fmt: skip
    if foreign or not _is_our_page(out / "report.html"):
        what = (
            f"other files ({', '.join(foreign[:3])})" if foreign else "no report.html of ich-train"
        )
        raise ReportError(f"--out {out} is a folder holding {what}; give a new or empty folder (or a previous report's)")  # fmt: skip


def _is_our_page(path: Path) -> bool:
    try:
        with open_local(path) as f:
            return f.read(len(HTML_HEAD)) == HTML_HEAD.encode()
    except OSError:
        return False


def _write(path: Path, data: bytes) -> None:
    """`data` to `path` through a new private temporary file (atomic_open: never through a link)."""
    with atomic_open(path) as f:
        f.write(data)


def report_dir_for(predictions) -> Path:
    """oof_fold0.parquet -> report_fold0/ beside it; x.parquet -> x_report/."""
    p = Path(predictions)
    stem = p.stem
    return p.with_name("report" + stem[3:] if stem.startswith("oof") else stem + "_report")


def write_report(frames: list[pd.DataFrame], names: list[str], out_dir, metas: list[dict], threshold: float | None = None) -> pd.DataFrame:  # fmt: skip
    """metrics.csv, the PNGs and report.html in `out_dir`; returns the metrics table. `frames` are
    checked predictions (check_predictions), one per run (of one fold, or several pooled:
    pool_runs), `metas` each run's {"config", "build"}."""
    if len(set(names)) != len(names) or not all(names):
        raise ReportError(f"run names must be distinct and non-empty: {', '.join(map(repr, names))}")  # fmt: skip
    check_comparable(frames, names)
    out = Path(out_dir)
    check_out_dir(out)
    table, confusion = metrics_table(frames, names, threshold)
    pngs = figures(frames, names, main_rows(table), confusion)
    worst = [worst_html(f) for f in frames]
    page = render_html(table, names, metas, pngs, worst, threshold, folds_of(frames[0]))
    out.mkdir(parents=True, exist_ok=True)
    # report.html first: a folder a stopped run leaves is still known as a report (check_out_dir)
    for name, data in [("report.html", page.encode()), *pngs.items(), ("metrics.csv", table.to_csv(index=False).encode())]:  # fmt: skip
        _write(out / name, data)
    return table


def run_meta(ckpt: dict, checkpoint, shards, tta=()) -> dict:
    """What a predictions file records about its run: name, source, config, build identity."""
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    build = data.get("build") if isinstance(data.get("build"), dict) else {}
    config = build.get("config") if isinstance(build.get("config"), dict) else {}
    identity = {"fingerprint": data.get("fingerprint"), "format_version": build.get("format_version"), "index_sha256": build.get("index_sha256")}  # fmt: skip
    identity |= {f"config.{k}": v for k, v in config.items()}
    return {
        "run": Path(checkpoint).resolve().parent.name or "run",
        "source": {
            "checkpoint": str(checkpoint),
            "epoch": ckpt["epoch"] + 1 if isinstance(ckpt.get("epoch"), int) else None,
            "evaluated_on": str(shards),
            "tta": list(tta),
        },
        "config": ckpt.get("config", {}),
        "build": {k: v for k, v in identity.items() if v is not None},
    }


def pool_runs(paths: list[str], runs: list[tuple[pd.DataFrame, dict]], names: list[str]) -> tuple[list[pd.DataFrame], list[str], list[dict]]:  # fmt: skip
    """(frames, names, metas) of the runs: the files given one name are the folds of one run,
    pooled into one frame. ReportError when a fold or an image is in two of them: one run's
    out-of-fold predictions hold each image once."""
    frames, metas = [], []
    groups = list(dict.fromkeys(names))
    for name in groups:
        mine = [i for i, n in enumerate(names) if n == name]
        seen: dict[int, str] = {}
        for i in mine:
            for k in folds_of(runs[i][0]):
                if k in seen:
                    raise ReportError(f"run {name!r}: fold {k} is in both {seen[k]} and {paths[i]}; give each fold's predictions once")  # fmt: skip
                seen[k] = paths[i]
        pooled = pd.concat([runs[i][0].assign(_file=paths[i]) for i in mine], ignore_index=True)
        twice = pooled[pooled["image_id"].duplicated(keep=False)]
        if len(twice):
            a, b = twice.iloc[0], twice[twice["image_id"] == twice["image_id"].iloc[0]].iloc[1]
            raise ReportError(f"run {name!r}: image {str(a['image_id'])[:40]!r} is in fold {a['fold']} ({a['_file']}) and fold {b['fold']} ({b['_file']}); the folds of one run's split hold each image once: pass the out-of-fold predictions of one build")  # fmt: skip
        frames.append(pooled.drop(columns="_file").sort_values("image_id", ignore_index=True))
        metas.append(_pooled_meta([runs[i][1] for i in mine], [paths[i] for i in mine]))
    return frames, groups, metas


def _pooled_meta(metas: list[dict], paths: list[str]) -> dict:
    """One run's metadata from its folds' files: each key's value where the files agree, else
    their values joined with " / " (the checkpoint, the validation fold)."""
    if len(metas) == 1:
        return metas[0]

    def merged(key: str) -> dict:
        ds = [m.get(key) if isinstance(m.get(key), dict) else {} for m in metas]
        keys = list(dict.fromkeys(k for d in ds for k in d))[:200]
        return {k: ds[0].get(k) if all(d.get(k) == ds[0].get(k) for d in ds) else " / ".join(str(d.get(k, "")) for d in ds) for k in keys}  # fmt: skip

    return {"source": {"predictions": " / ".join(map(str, paths)), **merged("source")}, "config": merged("config"), "build": merged("build")}  # fmt: skip


def default_names(paths: list[str], metas: list[dict]) -> list[str]:
    """Run names: the recorded run names (plain ones only: they come from the file), else the
    parent folders, else the file stems, the first of these that are distinct."""
    for names in (
        [
            str(m.get("run", "")) if SAFE_NAME.fullmatch(str(m.get("run", ""))) else ""
            for m in metas
        ],
        [Path(os.path.abspath(p)).parent.name for p in paths],
        [Path(p).stem for p in paths],
    ):
        if all(names) and len(set(names)) == len(names):
            return names
    return [f"run{i + 1}" for i in range(len(paths))]
