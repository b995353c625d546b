"""The run folder's metrics.csv (one row per epoch) and metrics.png (loss and AUC curves)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ich_prep.location import atomic_file, atomic_open, read_bytes  # noqa: E402
from ich_train.config import ConfigError  # noqa: E402

MAX_METRICS_BYTES = 16 << 20  # a run's metrics.csv: ~400 bytes an epoch


class MetricsLog:
    """Rows of metric dicts, rewritten to CSV (and plotted) after every append."""

    def __init__(self, run_dir: str | Path, keep_before_epoch: int | None = None):
        self.csv = Path(run_dir) / "metrics.csv"
        self.png = Path(run_dir) / "metrics.png"
        self.rows: list[dict] = []
        if keep_before_epoch is not None:  # a resumed run drops rows of epochs it is about to redo
            self.rows = resumed_rows(self.csv, keep_before_epoch)

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))
        frame = pd.DataFrame(self.rows)
        with atomic_file(self.csv) as tmp:  # a Ctrl-C here leaves the previous metrics.csv
            frame.to_csv(tmp, index=False)
        plot_metrics(frame, self.png)


def resumed_rows(csv: Path, keep_before_epoch: int) -> list[dict]:
    """The rows of a resumed run's metrics.csv before `keep_before_epoch` (none when it is absent),
    read bounded from a regular file (a FIFO or /dev/zero in its place cannot hang the resume);
    ConfigError when it is not a CSV with a numeric epoch column."""
    try:
        old = pd.read_csv(io.BytesIO(read_bytes(csv, MAX_METRICS_BYTES)))
        epochs = pd.to_numeric(old["epoch"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"--resume: {csv} is not this run's metrics ({type(e).__name__}: {str(e)[:100]}); "
            "move it aside (the run then logs from the resumed epoch) or start a new --out"
        ) from None
    return old[epochs < keep_before_epoch].to_dict("records")


def plot_metrics(frame: pd.DataFrame, path: str | Path) -> None:
    """Loss curves (train, valid, prior baseline) and validation AUCs against epoch."""
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = frame["epoch"] + 1
    for col, style in (("train_loss", "-o"), ("valid_loss", "-o"), ("prior_loss", "--")):
        if col in frame:
            ax_loss.plot(epochs, frame[col], style, label=col)
    ax_loss.set(xlabel="epoch", ylabel="weighted log loss", title="loss")
    ax_loss.legend()
    for col in ("valid_auc_any", "valid_auc_mean"):
        if col in frame:
            ax_auc.plot(epochs, frame[col], "-o", label=col)
    ax_auc.set(xlabel="epoch", ylabel="ROC-AUC", title="validation AUC")
    ax_auc.legend()
    fig.tight_layout()
    try:
        with atomic_open(path) as f:  # never through a link left at metrics.png
            fig.savefig(f, format="png", dpi=80)
    finally:
        plt.close(fig)
