"""Kaggle submission CSV: header `ID,Label`, rows `ID_<image>_<subtype>`, 6 per image, every image
of the test index exactly once, probabilities in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ich_prep import LABELS
from ich_prep.errors import UserError
from ich_prep.location import atomic_file, file_in_the_way, what_is


class SubmissionError(UserError, ValueError):
    """Predictions that cannot make a complete, valid submission, or an --out that cannot hold one."""


def check_out_file(path: str | Path, flag: str = "--out", example: str = "submission.csv") -> None:
    """SubmissionError unless `path` can become a file: not a folder, no file where a parent folder
    must be. Checked before any work, so a mistake costs nothing and leaves nothing."""
    path = Path(path)
    if path.is_dir():
        raise SubmissionError(
            f"{flag} {path} is a folder; give a file path such as {path / example}"
        )
    parent = file_in_the_way(path)
    if parent is not None:
        raise SubmissionError(
            f"{flag} {path}: {parent} is {what_is(parent)}, not a folder; choose another {flag}"
        )


def submission_frame(image_ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """Long format: for each image, one row per label in LABELS order."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(image_ids), len(LABELS)):
        raise SubmissionError(
            f"probabilities {probs.shape} do not match {len(image_ids)} images x {len(LABELS)} labels"
        )
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise SubmissionError("probabilities must be finite and in [0, 1]")
    ids = np.asarray(image_ids, dtype=object)
    grid = ids[:, None] + "_" + np.asarray(LABELS, dtype=object)[None, :]
    return pd.DataFrame({"ID": grid.ravel(), "Label": probs.ravel()})


def align_to_index(
    index: pd.DataFrame, ids: list[str], probs: np.ndarray, fill: np.ndarray
) -> tuple[list[str], np.ndarray, int]:
    """Predictions in index order, one per distinct index image; images the build could not read
    (status 'error', no sample) get `fill`. Returns (ids, probs, number filled)."""
    pred = pd.DataFrame(np.asarray(probs), index=pd.Index(ids, name="image_id"))
    if pred.index.has_duplicates:
        raise SubmissionError("an image was predicted twice; the shards hold duplicate samples")
    wanted = pd.Index(index["image_id"]).drop_duplicates()
    extra = pred.index.difference(wanted)
    if len(extra):
        raise SubmissionError(
            f"{len(extra)} predicted images are not in the index (e.g. {extra[0]}); shards and index disagree"
        )
    ok = set(index.loc[index["status"] == "ok", "image_id"])
    missing_ok = [i for i in ok if i not in pred.index]
    if missing_ok:
        raise SubmissionError(
            f"{len(missing_ok)} readable images were not predicted (e.g. {missing_ok[0]}); shards incomplete"
        )
    out = pred.reindex(wanted)
    filled = out.isna().any(axis=1)
    out.loc[filled] = np.asarray(fill, dtype=np.float64)
    return list(out.index), out.to_numpy(), int(filled.sum())


def write_submission(path: str | Path, image_ids: list[str], probs: np.ndarray) -> Path:
    """The CSV written to a temporary name, then renamed: a failure or Ctrl-C leaves no file."""
    path = Path(path)
    check_out_file(path)
    frame = submission_frame(image_ids, probs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return path


def check_submission(path: str | Path, image_ids) -> None:
    """Raise SubmissionError unless `path` is a complete submission for exactly `image_ids`."""
    df = pd.read_csv(path, dtype={"ID": str})
    if list(df.columns) != ["ID", "Label"]:
        raise SubmissionError(f"{path}: header is {list(df.columns)}, expected ['ID', 'Label']")
    want = {f"{i}_{lab}" for i in set(image_ids) for lab in LABELS}
    if df["ID"].duplicated().any():
        raise SubmissionError(
            f"{path}: duplicate IDs, e.g. {df.loc[df['ID'].duplicated(), 'ID'].iloc[0]}"
        )
    if set(df["ID"]) != want:
        raise SubmissionError(
            f"{path}: IDs do not match the test index ({len(set(df['ID']) ^ want)} differ)"
        )
    if not df["Label"].between(0, 1).all():
        raise SubmissionError(f"{path}: labels outside [0, 1]")
