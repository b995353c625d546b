"""The evaluation report's figures: ROC, precision-recall, calibration (quantile bins) and
confusion matrices, a panel per label and a line (or panel) per run, as PNG bytes (matplotlib's
Agg backend: no display needed). Run names come from untrusted files: `_text` shortens them and
turns off mathtext."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from ich_prep import LABELS  # noqa: E402
from ich_train.predictions import PRED  # noqa: E402

CAL_BINS = 10  # quantile bins of the predicted probability: the calibration plot and the ECE


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


def calibration_figure(frames, names, bins: int = CAL_BINS) -> bytes:
    """Reliability diagram per label: mean predicted probability against observed frequency in
    `bins` quantile bins (each holds a tenth of the images, so a rare label's points spread out),
    the axes zoomed to the points."""
    fig, axes = _grid(f"Calibration (reliability): observed frequency per {bins} quantile bins of predicted probability")  # fmt: skip
    for j, (lab, ax) in enumerate(zip(LABELS, axes, strict=True)):
        top = 0.05
        for frame, name in zip(frames, names, strict=True):
            true, pred = calibration_curve(frame[lab], frame[PRED[j]], n_bins=bins, strategy="quantile")  # fmt: skip
            ax.plot(pred, true, "o-", ms=3, label=_text(name))
            top = max(top, float(pred.max()), float(true.max()))
        top = min(1.0, top * 1.05)
        ax.plot([0, top], [0, top], ":", color="grey", label="perfect")
        ax.set(title=lab, xlabel="predicted probability", ylabel="observed frequency", xlim=(0, top), ylim=(0, top))  # fmt: skip
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
