"""A contact sheet of decoded samples: `ich-prep preview`.

Each tile shows one sample's windows side by side (grey levels, left to right in channel order, as
many as the build's image layout has channels) under its image id, fold and positive labels, so a
person can check the crop and the windows at a glance. Samples are chosen from the index across
the whole build (seeded, the folds in turn: `spread`), and only the shards holding them are
streamed. With a series id, that series is drawn as a strip in slice order instead. A sample whose
image is not the layout's shape is skipped (verify names it), and the sheet is bounded in memory
before anything is read.
"""

from __future__ import annotations

import math
import tarfile
from contextlib import closing

import cv2
import numpy as np
import pandas as pd

from ich_prep import LABELS
from ich_prep.config import ImageLayout, Window
from ich_prep.errors import UserError
from ich_prep.location import atomic_open, open_stream
from ich_prep.manifest import Build, open_build
from ich_prep.sample import SampleError, decode_sample
from ich_prep.shards import iter_samples
from ich_prep.terminal import for_terminal

FONT = cv2.FONT_HERSHEY_SIMPLEX
SCALE = 0.38
LINE_H = 13
GAP = 2
BG = (24, 24, 24)
WHITE, RED, GREEN, GREY = (235, 235, 235), (80, 80, 255), (120, 220, 120), (170, 170, 170)  # BGR
MAX_PANEL = 1024  # pixels per window panel (a 1024 panel shows every pixel of a 1024 image)
MAX_SHEET_BYTES = 1024**3  # the sheet and the images decoded for it, at most
INDEX_COLUMNS = ["image_id", "fold", "shard", "status", *LABELS]
SHORT = {"epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
         "subarachnoid": "SAH", "subdural": "SDH"}  # fmt: skip


class PreviewError(UserError, ValueError):
    """Nothing to show for the filters asked."""


def candidates(
    index: pd.DataFrame, label: str | None = None, fold: int | None = None
) -> pd.DataFrame:
    """ok rows, positive for `label` and in `fold` when given."""
    rows = index[index["status"] == "ok"]
    if fold is not None:
        rows = rows[rows["fold"] == fold]
    if label is not None:
        if label not in LABELS:
            raise PreviewError(f"--label {label!r} is not one of {', '.join(LABELS)}")
        if rows[label].isna().all():
            raise PreviewError(f"--label {label}: this build has no labels (a test set?)")
        rows = rows[rows[label].fillna(0).astype(int) == 1]
    if rows.empty:
        want = " ".join(
            f"--{k} {v}" for k, v in (("label", label), ("fold", fold)) if v is not None
        )
        raise PreviewError(f"no sample matches {want or 'this build'}; try other filters")
    return rows


def spread(rows: pd.DataFrame, seed: int = 0) -> list[str]:
    """Every image id of `rows` in a seeded order that takes the folds in turn (each fold's ids
    shuffled), so the first n of it sample the whole build, every fold alike."""
    rng = np.random.default_rng(seed)
    folds = [g["image_id"].to_numpy() for _, g in rows.groupby("fold", sort=True)]
    folds = [ids[rng.permutation(len(ids))] for ids in folds]
    longest = max((len(ids) for ids in folds), default=0)
    return [str(ids[i]) for i in range(longest) for ids in folds if i < len(ids)]


def collect(build: Build, rows: pd.DataFrame, n: int, seed: int = 0) -> list[dict]:
    """Up to `n` samples among `rows`, chosen across the whole build (`spread`), in that order:
    image, meta row. Streams only the shards that hold the chosen ones; a chosen sample that
    cannot be read is replaced by the next in the order (one more pass over the shards)."""
    listed = {s.name: (s.samples, s.bytes, s.fold) for s in build.shards}
    rows = rows[rows["shard"].isin(listed)]
    info = rows.drop_duplicates("image_id").set_index("image_id")  # verify names a duplicate
    order = spread(info.reset_index(), seed)
    found: dict[str, dict] = {}
    for wanted in (order[:n], order[n:]):
        if len(found) >= n or not wanted:
            break
        shard_of = info.loc[wanted, "shard"]
        for name in sorted(set(shard_of)):
            ids = set(shard_of.index[shard_of == name]) - set(found)
            for key, img in _stream(build, name, listed[name], ids):
                found[key] = {"image_id": key, "image": img, "row": info.loc[key]}
                if len(found) >= n:
                    break
            if len(found) >= n:
                break
    return [found[i] for i in order if i in found]


def _stream(build: Build, name: str, entry: tuple[int, int, int], ids: set[str]):
    """(key, image) of the sound samples of shard `name` among `ids`, streamed until all are
    found; nothing more from a damaged or unreadable shard (verify names it)."""
    enc, layout = build.config.encoding, build.layout
    samples, size, fold = entry
    left = set(ids)
    try:
        with (
            open_stream(build.url(name)) as f,
            closing(iter_samples(f, enc, layout, samples, size=size)) as it,
        ):
            for s in it:
                img = _image(s, ids, enc, layout, fold)
                if img is not None:
                    yield s.key, img
                    left.discard(s.key)
                    if not left:
                        return
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return


def _image(s, wanted: set[str], enc: str, layout: ImageLayout, fold: int) -> np.ndarray | None:
    """The sample's image if it is one of `wanted` and sound (sample.decode_sample, verify's and
    the trainer's decode: the layout's image, a json of its key and `fold`, the shard's); None
    for a damaged sample (verify names it)."""
    if s.key not in wanted or s.problems:
        return None
    try:
        return decode_sample(s.key, s.fields, enc, layout, {"fold": fold})[0]
    except SampleError:
        return None


def _text(img, s: str, x: int, y: int, color) -> None:
    cv2.putText(img, for_terminal(s), (x, y), FONT, SCALE, color, 1, cv2.LINE_AA)


def _fit(s: str, width: int) -> list[str]:
    """Wrap comma-separated words into lines that fit `width` pixels."""
    lines, cur = [], ""
    for word in s.split(", "):
        trial = f"{cur}, {word}" if cur else word
        if cv2.getTextSize(trial, FONT, SCALE, 1)[0][0] <= width or not cur:
            cur = trial
        else:
            lines.append(cur + ",")
            cur = word
    return [*lines, cur]


def _tile_width(channels: int, panel: int) -> int:
    return channels * panel + (channels - 1) * GAP


def tile(sample: dict, panel: int, labelled: bool) -> np.ndarray:
    """One sample: caption (id, fold, positives) above its windows (channels) as grey panels."""
    img, row = sample["image"], sample["row"]
    channels = img.shape[2]
    w = _tile_width(channels, panel)
    pos = [k for k in LABELS if labelled and pd.notna(row[k]) and int(row[k]) == 1]
    caption = _fit(", ".join(pos) if pos else ("negative" if labelled else "unlabelled"), w - 6)
    head = LINE_H * (1 + len(caption)) + 4
    t = np.full((head + panel, w, 3), BG, np.uint8)
    _text(t, f"{sample['image_id']}  fold {int(row['fold'])}", 3, LINE_H, WHITE)
    for i, line in enumerate(caption):
        _text(t, line, 3, LINE_H * (i + 2), RED if pos else (GREEN if labelled else GREY))
    for c in range(channels):
        shrink = img.shape[0] > panel
        g = cv2.resize(
            img[..., c],
            (panel, panel),
            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
        )
        x = c * (panel + GAP)
        t[head:, x : x + panel] = g[..., None]
    return t


def contact_sheet(
    samples: list[dict],
    windows: tuple[Window, ...],
    panel: int = 96,
    labelled: bool = True,
    title: str = "",
) -> np.ndarray:
    """Tiles in a near-square grid under a legend naming the windows; BGR uint8."""
    tiles = [tile(s, panel, labelled) for s in samples]
    th = max(t.shape[0] for t in tiles)
    tw = tiles[0].shape[1]
    cols = max(1, min(len(tiles), round(math.sqrt(len(tiles) * th / tw))))
    rows = math.ceil(len(tiles) / cols)
    pad = 6
    legend = "panels, left to right: " + " | ".join(
        f"{w.name} L{w.center:g}/W{w.width:g}" for w in windows
    )
    width = cols * (tw + pad) + pad
    lines = _fit(title, width - 2 * pad) if title else []
    lines += _fit(legend.replace(" | ", ", "), width - 2 * pad)
    top = LINE_H * len(lines) + 8
    sheet = np.full((top + rows * (th + pad) + pad, width, 3), BG, np.uint8)
    for i, line in enumerate(lines):
        _text(sheet, line, pad, LINE_H * (i + 1), WHITE)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = top + pad + r * (th + pad), pad + c * (tw + pad)
        sheet[y : y + t.shape[0], x : x + tw] = t
    return sheet


def series_strip(samples: list[dict], windows: tuple[Window, ...], panel: int, title: str) -> np.ndarray:  # fmt: skip
    """One series in slice order: a column per slice (its rank and positive labels above), a row
    per window, so neighbouring slices sit side by side and their alignment shows; BGR uint8."""
    pad, head = 4, LINE_H * 2 + 4
    label_w = max(60, 7 * max(len(w.name) for w in windows))
    lines = _fit(title, label_w + len(samples) * (panel + GAP) + 2 * pad - 2 * pad) if title else []
    top = LINE_H * len(lines) + 8
    height = top + head + len(windows) * (panel + GAP) + pad
    sheet = np.full((height, label_w + len(samples) * (panel + GAP) + 2 * pad, 3), BG, np.uint8)
    for i, line in enumerate(lines):
        _text(sheet, line, pad, LINE_H * (i + 1), WHITE)
    for c, w in enumerate(windows):
        _text(sheet, w.name, pad, top + head + c * (panel + GAP) + panel // 2, WHITE)
    for j, s in enumerate(samples):
        x, row = pad + label_w + j * (panel + GAP), s["row"]
        pos = [SHORT[k] for k in LABELS[1:] if pd.notna(row.get(k)) and int(row[k]) == 1]
        _text(sheet, str(int(row["slice_rank"])), x, top + LINE_H, WHITE)
        _text(sheet, ",".join(pos)[: max(1, panel // 7)], x, top + 2 * LINE_H, RED)
        img = s["image"]
        for c in range(min(img.shape[2], len(windows))):
            g = cv2.resize(img[..., c], (panel, panel), interpolation=cv2.INTER_AREA)
            y = top + head + c * (panel + GAP)
            sheet[y : y + panel, x : x + panel] = g[..., None]
    return sheet


def series_rows(index: pd.DataFrame, series: str) -> pd.DataFrame:
    """The ok rows of one series, in slice order (slice_rank), or PreviewError naming the fix."""
    if "series_id" not in index or "slice_rank" not in index:
        raise PreviewError("--series: this build's index has no series_id/slice_rank; rebuild it with this ich-prep")  # fmt: skip
    rows = index[(index["status"] == "ok") & (index["series_id"] == series)]
    if rows.empty:
        raise PreviewError(f"--series {series!r}: no readable slice of that series in this build; `ich-prep info` lists the build, the index's series_id column the series")  # fmt: skip
    return rows.sort_values("slice_rank", kind="stable")


def check_size(n: int, panel: int, layout: ImageLayout) -> None:
    """PreviewError unless `n` samples of `layout` at `panel` pixels (the tiles, the sheet and the
    decoded images) fit in MAX_SHEET_BYTES."""
    tile_h = panel + LINE_H * (2 + len(LABELS)) + 4  # the tallest caption: every label on a line
    per_sample = 2 * 3 * tile_h * (_tile_width(layout.channels, panel) + 6) + layout.max_bytes
    if n * per_sample > MAX_SHEET_BYTES:
        raise PreviewError(
            f"--n {n} at --panel {panel} needs about {n * per_sample / 2**20:.0f} MiB, over the "
            f"{MAX_SHEET_BYTES // 2**20} MiB a contact sheet may take; lower --n or --panel"
        )


def preview(
    root: str,
    n: int = 64,
    label: str | None = None,
    fold: int | None = None,
    seed: int = 0,
    panel: int = 96,
    series: str | None = None,
) -> tuple[np.ndarray, int]:
    """(contact sheet BGR, number of samples shown) for the build at `root` (folder or URL); with
    `series`, that series' slices as a strip in slice order instead."""
    root = str(root)
    if n < 1:
        raise PreviewError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise PreviewError(f"--seed must be 0 or more, got {seed}")
    if not 8 <= panel <= MAX_PANEL:
        raise PreviewError(f"--panel must be from 8 to {MAX_PANEL} pixels, got {panel}")
    build = open_build(root)
    cfg = build.config
    labelled = cfg.split == "train"
    index = build.index(INDEX_COLUMNS, optional=("series_id", "slice_rank"))
    if series is not None:
        if label is not None or fold is not None:
            raise PreviewError("--series draws one whole series: drop --label and --fold")
        rows = series_rows(index, series)
        check_size(len(rows), panel, cfg.layout)
        by_id = {s["image_id"]: s for s in collect(build, rows, len(rows), seed)}
        samples = [by_id[i] for i in rows["image_id"] if i in by_id]
        if not samples:
            raise PreviewError(f"none of the {len(rows)} slices of series {series} could be read; run `ich-prep verify {root}`")  # fmt: skip
        title = f"{root}: series {series}, {len(samples)} of {len(rows)} slices in slice order"
        return series_strip(samples, cfg.windows, panel, title), len(samples)
    rows = candidates(index, label, fold)
    check_size(min(n, len(rows)), panel, cfg.layout)
    samples = collect(build, rows, n, seed)
    if not samples:
        raise PreviewError(f"none of the {len(rows)} matching samples could be read; run `ich-prep verify {root}`")  # fmt: skip
    filters = ", ".join(f"{k} {v}" for k, v in (("label", label), ("fold", fold)) if v is not None)
    title = f"{root}: {len(samples)} of {len(rows)} samples" + (f" ({filters})" if filters else "")
    return contact_sheet(samples, cfg.windows, panel, labelled, title), len(samples)


def write_png(path: str, sheet: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise PreviewError(f"cv2 could not encode the {sheet.shape} sheet as png")
    with atomic_open(path) as f:  # never through a link, never into a folder
        f.write(buf.tobytes())
