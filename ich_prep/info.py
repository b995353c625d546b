"""What a build holds, from its manifest and index alone (no shard is opened): `ich-prep info`."""

from __future__ import annotations

import dataclasses

import pandas as pd

from ich_prep import LABELS
from ich_prep.index import INDEX
from ich_prep.manifest import Build, FormatError, open_build
from ich_prep.terminal import for_terminal

INFO_COLUMNS = ["image_id", "split", "fold", "shard", "status", "reason", "detail", *LABELS]


def info_rows(index: pd.DataFrame, where: str, labelled: bool) -> pd.DataFrame:
    """The INFO_COLUMNS of an index Build.index has checked (index.check_index: the columns
    every reader needs, each of its INDEX_SCHEMA type), a labelled build's labels required;
    split, reason and detail None where an index lacks them."""
    missing = [k for k in LABELS if labelled and k not in index.columns]
    if missing:
        raise FormatError(f"{where} has no column {', '.join(missing)}; the index is damaged, copy it again or rebuild")  # fmt: skip
    index = index[[c for c in INFO_COLUMNS if c in index.columns]].copy()
    for c in ("split", "reason", "detail"):
        if c not in index.columns:
            index[c] = None
    return index


def series_counts(index: pd.DataFrame) -> dict:
    """Of the ok rows: slices whose series key is not a SeriesInstanceUID (`series_source`
    derived / file: split.series_keys) and series / slices with tied positions
    (`duplicate_position`, never stacked as each other's neighbours); zeros where an older index
    lacks the column."""
    ok = index[index["status"] == "ok"]
    source = ok["series_source"].astype(str) if "series_source" in ok else pd.Series([], dtype=str)
    tied = ok["duplicate_position"].eq(True) if "duplicate_position" in ok else pd.Series(False, index=ok.index)  # fmt: skip
    series = ok["series_id"].astype(str)[tied].nunique() if "series_id" in ok else 0
    return {
        "without_uid": {k: int((source == k).sum()) for k in ("derived", "file")},
        "tied": {"series": int(series), "slices": int(tied.sum())},
    }


def info(root: str, examples: int = 3) -> dict:
    """Format, config, counts per split and fold, label prevalence per fold, bytes, errors."""
    root = str(root)
    b = open_build(root)
    cfg, counts = b.config, dict(b.counts)
    layout, build_split = cfg.layout, cfg.split
    labelled = build_split == "train"
    full = b.index()
    index = info_rows(full, f"{root}: {INDEX}", labelled)
    series = series_counts(full)
    index["split"] = index["split"].fillna(build_split)
    ok = index[index["status"] == "ok"]
    shard_bytes = {s.name: s.bytes for s in b.shards}
    groups = _groups(b, ok, shard_bytes)
    prevalence = _prevalence(ok) if labelled else {}
    errors = index[index["status"] == "error"]
    by_reason = errors["reason"].value_counts().sort_index().to_dict()
    ex = {
        str(r): errors.loc[errors["reason"] == r, "detail"].head(examples).tolist()
        for r in by_reason
    }
    index_bytes = b.index_bytes
    return {
        "root": root,
        "format_version": b.format_version,
        "tool": f"{b.tool} {b.tool_version}",
        "split": build_split,
        "config": {
            "size": cfg.size,
            "encoding": cfg.encoding,
            "windows": [dataclasses.asdict(w) for w in cfg.windows],
            "spacing_mm": cfg.spacing_mm,
            "folds": cfg.folds,
            "seed": cfg.seed,
            "shard_size": cfg.shard_size,
            "limit": cfg.limit,
            "fraction": cfg.fraction,
        },
        "image": {
            "height": layout.height,
            "width": layout.width,
            "channels": layout.channels,
            "channel_names": list(layout.channel_names),
            "dtype": layout.dtype,
        },
        "counts": {"inputs": len(index), "ok": len(ok), "error": len(errors)},
        "groups": groups,
        "series": series,
        "prevalence": prevalence,
        "bytes": {
            "shards": sum(shard_bytes.values()),
            "index": index_bytes,
            "total": sum(shard_bytes.values()) + index_bytes,
        },
        "errors": {"by_reason": {str(k): int(v) for k, v in by_reason.items()}, "examples": ex},
        "manifest_counts": counts,
    }


def _groups(b: Build, ok: pd.DataFrame, shard_bytes: dict[str, int]) -> list[dict]:
    """Images, shards and bytes of each (split, fold) of the ok rows."""
    shards_of: dict[tuple[str, int], list[str]] = {}
    for s in b.shards:
        shards_of.setdefault((str(s.split or b.split), s.fold), []).append(s.name)
    groups = []
    for (split, fold), part in ok.groupby(["split", "fold"], sort=True):
        names = shards_of.get((split, int(fold)), [])
        groups.append({"split": split, "fold": int(fold), "images": len(part), "shards": len(names),
                       "bytes": sum(shard_bytes[n] for n in names)})  # fmt: skip
    return groups


def _prevalence(ok: pd.DataFrame) -> dict:
    """Each label's share of positives per fold and over all ok rows ({} without rows)."""
    if not len(ok):
        return {}
    lab = ok[["fold", *LABELS]].astype({k: "float64" for k in LABELS})
    out = {}
    for fold, part in lab.groupby("fold", sort=True):
        out[str(int(fold))] = {k: round(float(part[k].mean()), 4) for k in LABELS}
    out["all"] = {k: round(float(lab[k].mean()), 4) for k in LABELS}
    return out


def _mib(n: int) -> str:
    """Bytes for people: KiB below 1 MiB, else MiB or GiB."""
    for unit, k in (("GiB", 30), ("MiB", 20)):
        if n >= 2**k:
            return f"{n / 2**k:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _kept(counts: dict) -> str:
    """What a --limit / --fraction build kept (counts.subset; absent in builds before it)."""
    k = counts.get("subset")
    if not isinstance(k, dict) or not all(type(k.get(f)) is int for f in ("series", "of_series", "images", "of_images")):  # fmt: skip
        return ""
    return f" (whole series: {k['series']} of {k['of_series']}, {k['images']} of {k['of_images']} files)"  # fmt: skip


def _series_line(s: dict) -> str:
    """One line on the series keys and tied positions (series_counts)."""
    w, t = s["without_uid"], s["tied"]
    return (
        f"series: without SeriesInstanceUID: {w['derived'] + w['file']} slices ({w['derived']} "
        f"keyed on patient/study/frame/orientation, {w['file']} one series per file); tied "
        f"positions: {t['slices']} slices in {t['series']} series (2.5D skips a twin)"
    )


def format_info(d: dict) -> str:
    """Plain-text tables for a terminal."""
    c, im = d["config"], d["image"]
    windows = ", ".join(f"{w['name']} L{w['center']:g}/W{w['width']:g}" for w in c["windows"])
    subset = (
        f"; subset: limit {c['limit']}, fraction {c['fraction']}{_kept(d['manifest_counts'])}"
        if c["limit"] is not None or c["fraction"] is not None
        else ""
    )
    spacing = f"{c['spacing_mm']} mm" if c["spacing_mm"] else "native"
    lines = [
        f"{d['root']}",
        f"format {d['format_version']} ({d['tool']}), split {d['split']}",
        f"images: {im['height']}x{im['width']}x{im['channels']} {im['dtype']}, encoding {c['encoding']}; "
        f"windows (channels): {windows}",
        f"spacing: {spacing}; folds {c['folds']}, seed {c['seed']}, "
        f"shard size {c['shard_size']}{subset}",
        "",
        f"{'split':<6} {'fold':>4} {'images':>8} {'shards':>6} {'size':>10}",
    ]
    for g in d["groups"]:
        lines.append(
            f"{g['split']:<6} {g['fold']:>4} {g['images']:>8} {g['shards']:>6} {_mib(g['bytes']):>10}"
        )
    b = d["bytes"]
    lines.append(
        f"{'all':<6} {'':>4} {d['counts']['ok']:>8} {sum(g['shards'] for g in d['groups']):>6} {_mib(b['shards']):>10}"
    )
    if d["prevalence"]:
        cols = list(d["prevalence"])
        lines += [
            "",
            "label prevalence per fold",
            f"{'label':<17}" + "".join(f"{k:>8}" for k in cols),
        ]
        for k in LABELS:
            lines.append(f"{k:<17}" + "".join(f"{d['prevalence'][f][k]:>8.3f}" for f in cols))
    lines += [
        "",
        f"bytes: shards {_mib(b['shards'])} + index {_mib(b['index'])} = {_mib(b['total'])} "
        f"({b['shards'] / max(1, d['counts']['ok']) / 1024:.1f} KiB per image)",
        _series_line(d["series"]),
        f"errors: {d['counts']['error']} of {d['counts']['inputs']} inputs",
    ]
    for reason, n in d["errors"]["by_reason"].items():  # index text: shown by for_terminal
        lines.append(f"  {for_terminal(reason)}: {n}")
        lines += [f"    e.g. {for_terminal(e)}" for e in d["errors"]["examples"][reason]]
    return "\n".join(lines)
