"""The dataset card (README.md) written beside the shards: what it is and how to load it."""

from __future__ import annotations

from ich_prep import LABELS


def dataset_card(manifest: dict) -> str:
    """Markdown text built from the manifest alone (so it never disagrees with it)."""
    cfg, counts = manifest["config"], manifest["counts"]
    windows = ", ".join(f"{w['name']} (L{w['center']:g}/W{w['width']:g})" for w in cfg["windows"])
    n_bytes = sum(s["bytes"] for s in manifest["shards"])
    enc = cfg["encoding"]
    lines = [
        f"# RSNA intracranial hemorrhage shards ({manifest['split']})",
        "",
        f"Compiled by `ich_prep` {manifest['tool_version']} (shard format {manifest['format_version']}) from "
        f"head-CT DICOM slices of the RSNA 2019 Intracranial Hemorrhage Detection data. Each sample is one "
        f"slice: a {cfg['size']}x{cfg['size']}x3 uint8 image (channels = windows {windows}), encoded as "
        f"`{enc}`, plus a json of metadata and labels. Format: docs/shard-format.md of ich-toolkit.",
        "",
        "## Config",
        "",
        "```json",
        __import__("json").dumps(cfg, indent=1, sort_keys=True),
        "```",
        "",
        "## Counts",
        "",
        f"- inputs: {counts['inputs']}, ok: {counts['ok']}, errors: {counts['error']}",
        f"- shards: {len(manifest['shards'])}, {n_bytes / 2**20:.1f} MiB, {n_bytes / max(1, counts['ok']) / 1024:.1f} KiB per image",
    ]
    if counts["errors_by_reason"]:
        lines.append(
            "- errors by reason: "
            + ", ".join(f"{k} {v}" for k, v in counts["errors_by_reason"].items())
        )
    if counts.get("positives"):
        lines += ["", "| label | positives | prevalence |", "|---|---|---|"]
        for k in LABELS:
            p = counts["positives"][k]
            lines.append(f"| {k} | {p} | {p / max(1, counts['ok']):.3f} |")
        lines += [
            "",
            "## Split",
            "",
            f"{cfg['folds']} folds, grouped by patient (no patient in two folds) and stratified over the six labels "
            f"by iterative stratification on patient-level label vectors, seed {cfg['seed']}. Shards are named "
            "`train-f{fold}-{n:05d}.tar`, so a fold is a set of whole shards. Images per fold: "
            + ", ".join(f"fold {k}: {v}" for k, v in counts["per_fold"].items())
            + ".",
        ]
    lines += [
        "",
        "## Load it",
        "",
        "With ich-train:",
        "",
        "```bash",
        "ich-train fit --shards THIS_FOLDER --valid-fold 4 --out runs/exp1",
        "```",
        "",
        "With plain webdataset (no project code):",
        "",
        "```python",
        "import glob, webdataset as wds",
        "urls = sorted(glob.glob('THIS_FOLDER/*.tar'))",
        "for s in wds.WebDataset(urls, shardshuffle=False).decode():",
        f"    image, meta = s['{enc}'], s['json']  # image: uint8 array or PIL image; meta['labels']",
        "```",
        "",
        "The index with pandas or DuckDB:",
        "",
        "```python",
        "import pandas as pd",
        "index = pd.read_parquet('THIS_FOLDER/index.parquet')",
        "print(index.groupby('fold')[['any', 'subdural']].mean())",
        "# duckdb: SELECT fold, avg(\"any\") FROM 'THIS_FOLDER/index.parquet' GROUP BY fold",
        "```",
        "",
        "With Hugging Face datasets (its `webdataset` loader):",
        "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset('webdataset', data_files={'train': 'THIS_FOLDER/*.tar'}, split='train', streaming=True)",
        "```",
        "",
        "## Privacy",
        "",
        "Only the RSNA pseudonymous ids (image, patient, study, series) and geometry are kept; no names, dates "
        "or other DICOM identifiers.",
        "",
    ]
    return "\n".join(lines)
