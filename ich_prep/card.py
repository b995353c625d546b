"""The dataset card (README.md) written beside the shards: what it is and how to load it.

Built from the manifest alone, so it never disagrees with it. The python snippets in it run as
they are once THIS_FOLDER is replaced by the folder's path (tests/test_card.py runs them).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ich_prep import LABELS
from ich_prep.config import BuildConfig
from ich_prep.shards import shard_glob

if TYPE_CHECKING:  # the card is written by manifest.write_build: no import back
    from ich_prep.manifest import Build, ShardEntry


def _human(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20)):
        if n >= 2**k:
            return f"{n / 2**k:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _labels_table(counts: dict) -> list[str]:
    ok = max(1, counts["ok"])
    rows = ["| label | positives | prevalence |", "|---|---:|---:|"]
    rows += [
        f"| {k} | {counts['positives'][k]} | {counts['positives'][k] / ok:.3f} |" for k in LABELS
    ]
    return rows


def _split_section(cfg: BuildConfig, counts: dict, shards: tuple[ShardEntry, ...]) -> list[str]:
    per_fold = counts["per_fold"]
    n_shards = {}
    for s in shards:
        n_shards[str(s.fold)] = n_shards.get(str(s.fold), 0) + 1
    return [
        "## Split",
        "",
        f"{cfg.folds} folds, grouped by patient (no patient is in two folds) and stratified over "
        "the six labels by iterative stratification of patient-level label vectors, seed "
        f"{cfg.seed}. Shards are named `train-f{{fold}}-{{n:05d}}.tar`: a fold is a set of whole "
        "shards, so selecting folds is selecting file names. Within a fold each series is whole in "
        "one shard, its slices in slice order, and the series are in a seeded random order, so a "
        "shard holds many patients' series. To train on single slices, read samples by their "
        "span (index columns shard_offset, shard_length) in a shuffled order, as `ich-train fit` "
        "does, or shuffle with a large buffer: streaming a shard gives runs of one series.",
        "",
        "| fold | images | shards |",
        "|---:|---:|---:|",
        *[f"| {k} | {v} | {n_shards.get(k, 0)} |" for k, v in per_fold.items()],
    ]


def dataset_card(build: Build) -> str:
    """Markdown text built from the manifest alone (so it never disagrees with it), opened as a
    manifest.Build: its typed config and the image layout that config gives."""
    cfg, counts, shards = build.config, build.counts, build.shards
    layout = cfg.layout
    windows = ", ".join(f"{w.name} (L{w.center:g}/W{w.width:g})" for w in cfg.windows)
    n_bytes = sum(s.bytes for s in shards)
    enc = cfg.encoding
    h, w, c = layout.shape
    train = cfg.split == "train"
    lines = [
        f"# RSNA intracranial hemorrhage shards ({build.split})",
        "",
        f"Compiled by `ich_prep` {build.tool_version} (shard format "
        f"{build.format_version}) from head-CT DICOM slices of the RSNA 2019 Intracranial "
        f"Hemorrhage Detection data. Each sample is one slice: a {h}x{w}x{c} {layout.dtype} image "
        f"(channel i = window i: {windows}), encoded as `{enc}`, plus a json of metadata"
        + (" and labels" if train else "")
        + ". The format is specified in docs/shard-format.md of ich-toolkit.",
        "",
        (
            "Every slice of a series is cropped with one box (the robust union of its slices' head "
            "boxes), so neighbouring slices align pixel for pixel; a slice of another shape or "
            "pixel spacing than its series keeps its own box (`crop_fallback` in the manifest's counts)."
            if cfg.crop == "series"
            else "Each slice is cropped to its own head box, so scale and centre vary from slice to slice."
        )
        + " The index's `crop_y0`..`crop_x1` give each slice's box in its original pixels.",
        "",
        "Below, THIS_FOLDER stands for this folder's path, or its URL prefix when it is served "
        "over http(s) or stored in an object store.",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=1, sort_keys=True),
        "```",
        "",
        "## Counts",
        "",
        f"- inputs: {counts['inputs']}, ok: {counts['ok']}, errors: {counts['error']}"
        " (every input has an index row; error rows carry `reason` and `detail`)",
        f"- shards: {len(shards)}, {_human(n_bytes)}, "
        f"{n_bytes / max(1, counts['ok']) / 1024:.1f} KiB per image",
    ]
    if counts["errors_by_reason"]:
        lines.append(
            "- errors by reason: "
            + ", ".join(f"{k} {v}" for k, v in counts["errors_by_reason"].items())
        )
    if train and counts.get("positives"):
        lines += ["", "## Labels", "", *_labels_table(counts), ""]
        lines += _split_section(cfg, counts, shards)
    lines += [*_check_section(), *_ich_train_section(cfg), *_webdataset_section(cfg)]
    lines += [*_index_section(train), *_hf_section(cfg), *_privacy_section()]
    return "\n".join(lines)


def _check_section() -> list[str]:
    """How to check a received build."""
    return [
        "",
        "## Check what you received",
        "",
        "```bash",
        "ich-prep verify THIS_FOLDER    # re-hash every shard, check every sample and index row",
        "ich-prep info THIS_FOLDER      # config, counts per fold, label prevalence, errors",
        "ich-prep preview THIS_FOLDER --n 64 --out preview.png   # contact sheet of samples",
        "```",
    ]


def _ich_train_section(cfg: BuildConfig) -> list[str]:
    """Loading it with ich-train."""
    train = cfg.split == "train"
    return [
        "",
        "## Load it",
        "",
        "With ich-train:",
        "",
        "```bash",
        (
            f"ich-train fit --shards THIS_FOLDER --valid-fold {cfg.folds - 1} --out runs/exp1"
            if train
            else "ich-train predict --checkpoint runs/exp1/best.pt --shards THIS_FOLDER --out submission.csv"
        ),
        "```",
    ]


def _webdataset_section(cfg: BuildConfig) -> list[str]:
    """Loading it with plain webdataset."""
    enc, train, (h, w, c) = cfg.encoding, cfg.split == "train", cfg.layout.shape
    grey = c == 1 and enc in ("png", "jpg")  # webdataset's "l8" decodes these to (h, w)
    pattern, layout = shard_glob(cfg.split), cfg.layout
    return [
        "",
        "With plain webdataset (no project code; `only=` decodes just the two fields this format "
        "defines, so no other member type is ever unpickled). Plain webdataset and Hugging Face "
        "`datasets` do not bound member sizes or gzip inflation (a 1 MiB member can inflate to "
        "gigabytes): on a build you did not make yourself, run `ich-prep verify` first; ich-prep "
        "and ich-train read through a bounded reader.",
        "",
        "```python",
        "import glob",
        "",
        "import webdataset as wds",
        "",
        f'urls = sorted(glob.glob("THIS_FOLDER/{pattern}"))'
        + ('  # one fold: "THIS_FOLDER/train-f0-*.tar"' if train else ""),
        f'ds = wds.WebDataset(urls, shardshuffle=False).decode("{grey and "l8" or "rgb8"}", only=["{enc}", "json"])',
        f'for image, meta in ds.to_tuple("{enc}", "json"):',
        f"    pass  # image: {layout.dtype} {(h, w) if grey else (h, w, c)}; meta: "
        + ("labels (any, epidural, ...), fold, ids" if train else "ids, geometry"),
        "```",
        "",
        "Over http(s), give webdataset the shard URLs instead (`THIS_FOLDER/<name>` for each "
        "shard name in manifest.json); it streams them with curl.",
    ]


def _index_section(train: bool) -> list[str]:
    """Reading the index with pandas or DuckDB."""
    return [
        "",
        "The index with pandas or DuckDB (one row per input; `status == 'ok'` rows are the samples):",
        "",
        "```python",
        "import pandas as pd",
        "",
        'index = pd.read_parquet("THIS_FOLDER/index.parquet")',
        'ok = index[index["status"] == "ok"]',
        (
            'prevalence = ok.groupby("fold")[["any", "subdural"]].mean()'
            if train
            else 'images_per_shard = ok.groupby("shard").size()'
        ),
        "```",
        "",
        "```sql",
        "-- duckdb",
        (
            "SELECT fold, count(*) AS images, avg(\"any\") AS any_rate FROM 'THIS_FOLDER/index.parquet' "
            "WHERE status = 'ok' GROUP BY fold ORDER BY fold;"
            if train
            else "SELECT reason, count(*) FROM 'THIS_FOLDER/index.parquet' GROUP BY reason;"
        ),
        "```",
    ]


def _hf_section(cfg: BuildConfig) -> list[str]:
    """Loading it with Hugging Face datasets."""
    pattern = shard_glob(cfg.split)
    return [
        "",
        "With Hugging Face `datasets` (its `webdataset` loader gunzips `.npy.gz` and loads it as an "
        "array; `png`/`jpg` become images):",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("webdataset", data_files={{"train": "THIS_FOLDER/{pattern}"}}, '
        'split="train", streaming=True)',
        "```",
    ]


def _privacy_section() -> list[str]:
    """What identifiers it keeps."""
    return [
        "",
        "## Privacy",
        "",
        "Only the RSNA pseudonymous ids (image, patient, study, series), slice geometry and labels "
        "are kept; no names, birth dates, accession numbers, institution or other DICOM "
        "identifiers. The config above records the paths the build read from on the build machine.",
        "",
    ]
