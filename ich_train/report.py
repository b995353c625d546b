"""The evaluation report: per-label metrics (scikit-learn; the competition metric is ours), ROC, PR,
confusion and calibration plots, and one self-contained report.html, from out-of-fold predictions.

`write_report(frames, names, out_dir, metas, threshold)` is the one entry point (evaluate and
`ich-train report`). Predictions are read bounded (`read_predictions`) and every input string is
HTML-escaped: a predictions file, its metadata and the run names are untrusted.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import stat
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    average_precision_score,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from ich_prep import LABELS, parquet_read  # noqa: E402
from ich_prep.errors import UserError  # noqa: E402
from ich_prep.location import (  # noqa: E402
    atomic_open,
    file_in_the_way,
    open_local,
    read_bytes,
    temp_target,
)
from ich_train.metrics import LABEL_WEIGHTS, label_log_loss, weighted_log_loss  # noqa: E402

META_KEY = b"ich_train"  # Parquet key-value metadata: {"run", "config", "build", "checkpoint"}
MAX_BYTES = 512 * 1024 * 1024
MAX_ROWS = 2_000_000  # RSNA stage 2 train has 752,803 images
MAX_INFLATED = 2 * 1024 * 1024 * 1024
MAX_META = 1024 * 1024
MAX_ID_BYTES = 128 * 1024 * 1024  # decoded image ids (RSNA's are 12 characters)
SPECIFICITIES = (0.90, 0.95)
SAFE_NAME = re.compile(r"[\w.+-]{1,60}")  # a run name taken from a predictions file's metadata
PRED = [f"pred_{k}" for k in LABELS]
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
}


class ReportError(UserError, ValueError):
    """Predictions that cannot be reported: unreadable, malformed, or runs that do not compare."""


# ---- reading and writing predictions


def predictions_frame(ids, fold: int, labels, probs) -> pd.DataFrame:
    """The out-of-fold table evaluate, fit and seq evaluate write: image_id, fold, the six labels
    (int8) and pred_<label> probabilities, from (N, 6) label and probability arrays."""
    frame = pd.DataFrame({"image_id": list(ids), "fold": fold})
    for j, lab in enumerate(LABELS):
        frame[lab] = np.asarray(labels)[:, j].astype(np.int8)
    for j, lab in enumerate(LABELS):
        frame[f"pred_{lab}"] = np.asarray(probs)[:, j]
    return frame


def write_predictions(path, frame: pd.DataFrame, meta: dict) -> None:
    """The out-of-fold Parquet, with `meta` (run name, config, build identity) in its metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    extra = {META_KEY: json.dumps(meta, default=str).encode()}
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **extra}), path)


def read_predictions(path) -> tuple[pd.DataFrame, dict]:
    """(checked predictions, metadata dict) of the Parquet at `path`, bounded in bytes, rows,
    decompressed size and column types before anything is decoded, and image ids in decoded
    bytes (a dictionary page can repeat one long id a million times); a local path must be a
    regular file."""
    try:
        data = read_bytes(path, MAX_BYTES)
    except (FileNotFoundError, ValueError) as e:
        raise ReportError(f"{path}: {e}; pass the Parquet ich-train evaluate wrote") from None
    try:
        _check_footer(parquet_read.footer(io.BytesIO(data)), path)
        table = parquet_read.read_table(io.BytesIO(data), ["image_id", "fold", *LABELS, *PRED], ["image_id"])  # fmt: skip
        table = parquet_read.decode_strings(table, ["image_id"], MAX_ID_BYTES)
        frame = table.replace_schema_metadata(None).to_pandas()  # pandas' own metadata unread
        raw = (table.schema.metadata or {}).get(META_KEY, b"{}")
    except ReportError:
        raise
    except parquet_read.TooLarge as e:
        raise ReportError(f"{path}: its image ids would take {e.size} bytes decoded (limit {e.limit}); pass the Parquet ich-train evaluate wrote") from None  # fmt: skip
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ReportError(f"{path} is not a readable Parquet file ({type(e).__name__}: {str(e)[:200]})") from None  # fmt: skip
    return check_predictions(frame, path), _meta(raw)


def _check_footer(pf: pq.ParquetFile, path) -> None:
    meta, schema = pf.metadata, pf.schema_arrow
    inflated = parquet_read.inflated_bytes(pf)
    if meta.num_rows > MAX_ROWS or inflated > MAX_INFLATED:
        raise ReportError(f"{path} declares {meta.num_rows} rows ({inflated} bytes decompressed); the limits are {MAX_ROWS} rows and {MAX_INFLATED} bytes: refused")  # fmt: skip
    missing = [c for c in ("image_id", "fold", *LABELS, *PRED) if c not in schema.names]
    if missing:
        raise ReportError(f"{path} has no column {', '.join(missing)}; pass the Parquet ich-train evaluate wrote")  # fmt: skip
    need = {"image_id": "image_id must be unique, non-null strings", "fold": "fold must be one integer fold"}  # fmt: skip
    need |= {c: f"label column {c!r} must hold integers 0 or 1" for c in LABELS}
    need |= {c: f"column {c!r} must hold finite probabilities in [0, 1]" for c in PRED}
    for col, what in need.items():
        t = schema.field(col).type
        t = t.value_type if pa.types.is_dictionary(t) else t
        ok = {"image_id": pa.types.is_string(t) or pa.types.is_large_string(t), "fold": pa.types.is_integer(t)}  # fmt: skip
        if not ok.get(col, pa.types.is_integer(t) if col in LABELS else pa.types.is_floating(t)):
            raise ReportError(f"{path}: {what} (the file has {t}); pass the Parquet ich-train evaluate wrote")  # fmt: skip


def _meta(raw: bytes) -> dict:
    """The metadata dict, or {} when it is absent, too large or not a JSON object."""
    try:
        meta = json.loads(raw) if len(raw) <= MAX_META else {}
    except (ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def check_predictions(frame: pd.DataFrame, where) -> pd.DataFrame:
    """ReportError unless `frame` has string ids (unique), one integer fold, 0/1 integer labels and
    finite probabilities in [0, 1]; returns it sorted by image_id."""

    def bad(what: str) -> ReportError:
        return ReportError(f"{where}: {what}; pass the Parquet ich-train evaluate wrote")

    if len(frame) == 0:
        raise bad("no rows")
    ids = frame["image_id"]
    if not pd.api.types.is_string_dtype(ids) or ids.isna().any() or ids.duplicated().any():
        raise bad("image_id must be unique, non-null strings")
    if not pd.api.types.is_integer_dtype(frame["fold"]) or frame["fold"].nunique() != 1:
        raise bad(f"fold must be one integer fold (found {frame['fold'].nunique()} values, dtype {frame['fold'].dtype})")  # fmt: skip
    for col in LABELS:
        if not pd.api.types.is_integer_dtype(frame[col]) or not frame[col].isin((0, 1)).all():
            raise bad(f"label column {col!r} must hold integers 0 or 1 (dtype {frame[col].dtype})")
    for col in PRED:
        p = frame[col]
        if not pd.api.types.is_float_dtype(p) or not (np.isfinite(p) & p.between(0, 1)).all():
            raise bad(f"column {col!r} must hold finite probabilities in [0, 1] (dtype {p.dtype})")
    return frame.sort_values("image_id", ignore_index=True)


def check_comparable(frames: list[pd.DataFrame], names: list[str]) -> None:
    """ReportError unless every run scored the same fold, the same images and the same labels."""
    first = frames[0]
    for frame, name in zip(frames[1:], names[1:], strict=True):
        if frame["fold"].iloc[0] != first["fold"].iloc[0]:
            raise ReportError(f"run {name!r} is fold {frame['fold'].iloc[0]}, run {names[0]!r} fold {first['fold'].iloc[0]}: compare runs on the same fold")  # fmt: skip
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


def label_metrics(y: np.ndarray, p: np.ndarray, threshold: float | None = None) -> dict:
    """Every number of one label's row: prevalence, log loss, ROC-AUC, AP, the threshold (F1-max
    unless given) and the metrics at it, sensitivity at specificity 0.90 / 0.95."""
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
    """(long table: one row per run and label, {(run, label): confusion matrix or None})."""
    rows = [r for f, n in zip(frames, names, strict=True) for r in run_rows(f, n, threshold)]
    confusion = {(r["run"], r["label"]): r.pop("confusion", None) for r in rows}
    table = pd.DataFrame(rows, columns=["run", "label", "n", *METRICS])
    return table.astype({"positives": "Int64"}), confusion


def format_table(table: pd.DataFrame) -> str:
    """The table for a terminal: labels down, metrics across (one row per run within a label)."""
    t = table.rename(columns=METRICS)
    t["pos"] = [("" if pd.isna(v) else str(v)) for v in t["pos"]]
    order = {lab: i for i, lab in enumerate([*LABELS, "mean"])}
    t = t.sort_values(["label", "run"], key=lambda c: c.map(order) if c.name == "label" else c, kind="stable")  # fmt: skip
    keep = ["label", *METRICS.values()] if table["run"].nunique() == 1 else ["label", "run", *METRICS.values()]  # fmt: skip
    return t[keep].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="n/a")


# ---- figures (matplotlib Agg, PNG bytes)


def _text(s) -> str:
    """An untrusted string for a matplotlib label: short, no mathtext."""
    s = str(s)
    return ((s[:40] + "...") if len(s) > 43 else s).replace("$", r"\$")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return buf.getvalue()


def _grid(title: str):
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.6))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.25, hspace=0.35)
    fig.suptitle(title)
    return fig, axes.ravel()


def curve_figure(frames, names, table, kind: str) -> bytes:
    """ROC (kind 'roc') or precision-recall ('pr') curves: a panel per label, a line per run."""
    fig, axes = _grid("ROC curves" if kind == "roc" else "Precision-recall curves")
    for j, (lab, ax) in enumerate(zip(LABELS, axes, strict=True)):
        for frame, name in zip(frames, names, strict=True):
            y, p = frame[lab].to_numpy(), frame[PRED[j]].to_numpy()
            row = table[(table["run"] == name) & (table["label"] == lab)].iloc[0]
            if len(np.unique(y)) < 2:
                ax.text(0.5, 0.5, "one class only", ha="center", transform=ax.transAxes)
                continue
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, label=f"{_text(name)} AUC {row['roc_auc']:.3f}")
            else:
                prec, rec, _ = precision_recall_curve(y, p)
                ax.plot(rec, prec, label=f"{_text(name)} AP {row['average_precision']:.3f}")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ":", color="grey")
            ax.set(xlabel="1 - specificity", ylabel="sensitivity")
        else:
            ax.axhline(frames[0][lab].mean(), ls=":", color="grey", label="prevalence")
            ax.set(xlabel="recall", ylabel="precision")
        ax.set(title=lab, xlim=(0, 1), ylim=(0, 1.02))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    return _png(fig)


def calibration_figure(frames, names, bins: int = 10) -> bytes:
    """Reliability diagram per label: mean predicted probability against observed frequency."""
    fig, axes = _grid("Calibration (reliability): observed frequency per bin of predicted probability")  # fmt: skip
    for j, (lab, ax) in enumerate(zip(LABELS, axes, strict=True)):
        for frame, name in zip(frames, names, strict=True):
            true, pred = calibration_curve(frame[lab], frame[PRED[j]], n_bins=bins)
            ax.plot(pred, true, "o-", ms=3, label=_text(name))
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
        ax.set(title=lab, xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))  # fmt: skip
        ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def confusion_figure(label: str, names, table, confusion) -> bytes:
    """One label's confusion matrix at its threshold, a panel per run."""
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for name, ax in zip(names, axes[0], strict=True):
        cm, t = confusion[(name, label)], table[(table["run"] == name) & (table["label"] == label)]["threshold"].iloc[0]  # fmt: skip
        ax.set(title=f"{_text(name)}: {label}", xticks=[0, 1], yticks=[0, 1], xticklabels=["neg", "pos"], yticklabels=["neg", "pos"], xlabel="predicted", ylabel="true")  # fmt: skip
        if cm is None:
            ax.text(0.5, 0.5, "one class only:\nno threshold", ha="center", va="center")
            ax.set(xlim=(-0.5, 1.5), ylim=(1.5, -0.5))
            continue
        ax.imshow(cm, cmap="Blues")
        for (i, k), v in np.ndenumerate(cm):
            ax.text(k, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")  # fmt: skip
        ax.set_xlabel(f"predicted (p >= {t:.3f})")
    fig.tight_layout()
    return _png(fig)


def figures(frames, names, table, confusion) -> dict[str, bytes]:
    """PNG file name -> bytes of every plot."""
    out = {
        "roc.png": curve_figure(frames, names, table, "roc"),
        "pr.png": curve_figure(frames, names, table, "pr"),
        "calibration.png": calibration_figure(frames, names),
    }
    for lab in LABELS:
        out[f"confusion_{lab}.png"] = confusion_figure(lab, names, table, confusion)
    return out


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
    return f'<td class="num">{_num(v, 4 if metric == "log_loss" else 3)}</td>'


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
    out = [f"fold prevalence (positives): {prev}"]
    if threshold is None:
        out.append("threshold per label: the one maximising F1 on this fold (optimistic: chosen on the data it scores)")  # fmt: skip
    else:
        out.append(f"threshold fixed at {threshold} for every label")
    for name, meta in zip(names, metas, strict=True):
        cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        sampler = cfg.get("sampler")
        if sampler not in (None, "", "none", "natural", "uniform"):
            out.append(f"run {name} trained with sampler {sampler} (pos fraction {cfg.get('pos_fraction', '?')}); the validation fold was scored at its natural prevalence above")  # fmt: skip
    out.append("log loss: per label (scikit-learn); mean row: the competition's weighted log loss (any x2). Other mean cells: mean over labels with both classes")  # fmt: skip
    return out


def render_html(table, names, metas, pngs: dict[str, bytes], worst: list[str], threshold, fold: int) -> str:  # fmt: skip
    """The whole report.html as one string."""
    images, n = int(table["n"].iloc[0]), len(names)
    runs = ", ".join(_e(x) for x in names)
    note = "".join(f'<p class="note">{_e(t)}</p>' for t in notes(table, metas, names, threshold))
    matrices = "".join(_img(pngs[f"confusion_{lab}.png"], lab) for lab in LABELS)
    parts = [
        f"{HTML_HEAD}: {runs}</title><style>{CSS}</style></head><body>",  # fmt: skip
        f"<h1>ICH evaluation report</h1><p>{n} run(s): <b>{runs}</b>; fold {fold}, {images} images</p>",
        "<h2>Runs</h2>" + config_html(metas, names, "source"),
        "<h3>Build</h3>" + config_html(metas, names, "build"),
        "<h3>Config</h3>" + config_html(metas, names, "config"),
        "<h2>Metrics</h2>" + note,
        "".join(f"<h3>{g}</h3>" + metrics_html(table, names, ms) for g, ms in GROUPS.items()),
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
    parent = file_in_the_way(out)
    if parent is not None:
        raise ReportError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder for the report")
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
    checked predictions (check_predictions), one per run, `metas` each run's {"config", "build"}."""
    if len(set(names)) != len(names) or not all(names):
        raise ReportError(f"run names must be distinct and non-empty: {', '.join(map(repr, names))}")  # fmt: skip
    check_comparable(frames, names)
    out = Path(out_dir)
    check_out_dir(out)
    table, confusion = metrics_table(frames, names, threshold)
    pngs = figures(frames, names, table, confusion)
    worst = [worst_html(f) for f in frames]
    page = render_html(table, names, metas, pngs, worst, threshold, int(frames[0]["fold"].iloc[0]))
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
