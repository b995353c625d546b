"""manifest.json: written last and atomically, read from a folder or URL, version-checked; and
`open_build`, the one way every reader (verify, info, preview, ich-train) opens a build.

`open_build(root)` gives a frozen `Build`: the typed config and image layout, the shard entries
(`ShardEntry`), the counts, and the index (ich_prep.index: INDEX_SCHEMA), read lazily, bounded and
checked (`Build.index`). Nothing outside this module reads manifest.json's keys.

URLs: http(s):// is read with the standard library (no aiohttp needed); other schemes (s3://, ...)
through fsspec. See ich_prep.location for the streaming and the safety rules.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import pandas as pd

from ich_prep import FORMAT_VERSION, LABELS, __version__, card, location
from ich_prep.config import BuildConfig, ConfigError, ImageLayout
from ich_prep.errors import FormatError
from ich_prep.index import INDEX as INDEX
from ich_prep.index import INDEX_COLUMNS, REQUIRED_COLUMNS, check_index
from ich_prep.index import MAX_INDEX_BYTES as MAX_INDEX_BYTES
from ich_prep.index import SPAN_COLUMNS as SPAN_COLUMNS
from ich_prep.index import index_spans as index_spans
from ich_prep.index import parse_index as parse_index
from ich_prep.index import series_ranks as series_ranks
from ich_prep.location import Store, join
from ich_prep.shards import is_shard_file

MANIFEST = "manifest.json"
CARD = "README.md"  # the dataset card
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # a manifest of ~1,000 shards is ~200 KiB
SHA256 = re.compile(r"[0-9a-f]{64}")


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """Whole file from a local path or URL (http(s)://, s3://, ...), refusing more than `limit` bytes."""
    try:
        return location.read_bytes(url, limit)
    except ValueError as e:
        raise FormatError(str(e)) from e


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def write_build(
    store: Store,
    cfg: BuildConfig,
    index: pd.DataFrame,
    shards: list[dict],
    inputs: dict | None = None,
    extra_counts: dict | None = None,
) -> dict:
    """The last step of every build (ich-prep's, and the test fixtures'): index.parquet, the
    dataset card, then manifest.json, last and atomically (a folder without it is not a build).
    `shards` are write_shard's entries plus 'split' and 'fold'. Returns the manifest."""
    buf = io.BytesIO()
    index.to_parquet(buf, index=False)
    data = buf.getvalue()
    store.write_bytes(INDEX, data)
    ok = index[index["status"] == "ok"]
    labelled = cfg.labels is not None
    counts = {
        "inputs": len(index),
        "ok": len(ok),
        "error": int((index["status"] == "error").sum()),
        "errors_by_reason": dict(sorted(Counter(index["reason"].dropna()).items())),
        "positives": {k: int(ok[k].sum()) for k in LABELS} if labelled else None,
        "per_fold": {str(k): int(v) for k, v in sorted(Counter(ok["fold"]).items())},
        **(extra_counts or {}),
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": "ich_prep",
        "tool_version": __version__,
        "config": cfg.to_dict(),
        "inputs": inputs,
        "split": cfg.split,
        "counts": counts,
        "index": {"name": INDEX, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "image": layout_record(cfg),
        "order": ORDER,
        "shards": shards,
    }
    store.write_bytes(CARD, card.dataset_card(Build.of(store.root, manifest)).encode())
    store.write_bytes(MANIFEST, dumps(manifest))
    return manifest


def check_version(version: str, where: str) -> None:
    """Same major version reads; a newer major is refused with the fix."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError as e:
        raise FormatError(f"{where}: format_version {version!r} is not a version number") from e
    ours = int(FORMAT_VERSION.split(".")[0])
    if major > ours:
        raise FormatError(
            f"{where}: shard format {version} is newer than this ich-toolkit reads ({FORMAT_VERSION}); "
            "upgrade ich-toolkit to read it"
        )
    if major < ours:
        raise FormatError(
            f"{where}: shard format {version} is too old for this ich-toolkit ({FORMAT_VERSION}: "
            "series in slice order, per-series crops, sample spans); rebuild it: `ich-prep build "
            "--dicom-dir DICOMS [--labels CSV] --out THIS_FOLDER --overwrite` (its manifest's "
            "config names the DICOMs and the CSV)"
        )


# What format 2 guarantees about where a sample is, declared in every manifest.
ORDER = {
    "series": "contiguous: within a fold (or a test build) each series is whole in one shard",
    "slices": "slice order: position along the slice normal (ImagePositionPatient on the cross "
    "product of ImageOrientationPatient), ties by InstanceNumber then image id; slice_rank 0..n-1",
    "spans": "index.parquet shard_offset/shard_length: one range read fetches one sample",
    "crop": "config.crop: series = one box for every slice of a series (neighbours align), "
    "slice = each slice's own head box; index crop_y0..crop_x1 = the box used",
}


def layout_record(cfg: BuildConfig) -> dict:
    """The image layout as the manifest declares it (`image`): what every image of the build is."""
    lay = cfg.layout
    return {"height": lay.height, "width": lay.width, "channels": lay.channels,
            "channel_names": list(lay.channel_names), "dtype": lay.dtype}  # fmt: skip


def load_manifest(root: str | os.PathLike) -> dict:
    """Parsed manifest.json of a finished build at `root` (folder or URL prefix), version-checked."""
    url = join(root, MANIFEST)
    try:
        data = read_bytes(url, MAX_MANIFEST_BYTES)
    except FileNotFoundError as e:
        raise FormatError(
            f"{url} not found: {root} is not a finished ich-prep build (run `ich-prep build`)"
        ) from e
    except OSError as e:
        raise FormatError(f"{url} cannot be read ({e}); copy the build again") from e
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"{url} is not valid json: {str(e)[:200]}") from e
    if not isinstance(manifest, dict):
        raise FormatError(f"{url} is not a json object")
    check_version(manifest.get("format_version", "0"), url)
    check_shard_names(manifest, url)
    check_entries(manifest, url)
    cfg = build_config(manifest, url)
    if manifest.get("image") != layout_record(cfg):
        raise FormatError(f"{url}: the declared image layout {str(manifest.get('image'))[:200]} is not what its config makes ({layout_record(cfg)}); the manifest is damaged, rebuild")  # fmt: skip
    return manifest


def build_config(manifest: dict, where: str = MANIFEST) -> BuildConfig:
    """The manifest's config, typed and validated (FormatError naming the field otherwise)."""
    if "config" not in manifest:
        raise FormatError(f"{where} has no 'config'; not an ich-prep build, or a damaged one: rebuild it")  # fmt: skip
    try:
        return BuildConfig.from_dict(manifest["config"])
    except (ConfigError, TypeError) as e:
        raise FormatError(f"{where}: config: {str(e)[:200]}; rebuild the build") from e


def _count(v) -> bool:
    return type(v) is int and v >= 0


def check_entries(manifest: dict, where: str) -> None:
    """Every shard entry has a unique name, samples/bytes >= 0, an int fold, a 64-hex sha256; the
    counts and the index entry are numbers where readers use them."""
    names = set()
    for e in manifest["shards"]:
        bad = [k for k in ("samples", "bytes") if not _count(e.get(k))]
        bad += [] if type(e.get("fold")) is int else ["fold"]
        bad += [] if SHA256.fullmatch(str(e.get("sha256"))) else ["sha256"]
        if bad or e["name"] in names:
            what = f"bad {', '.join(bad)}" if bad else "listed twice"
            raise FormatError(f"{where}: shard entry {e['name']} has {what}; the manifest is damaged, copy it again or rebuild")  # fmt: skip
        names.add(e["name"])
    counts, index = manifest.get("counts"), manifest.get("index")
    if not (isinstance(counts, dict) and all(_count(counts.get(k)) for k in ("inputs", "ok", "error"))):  # fmt: skip
        raise FormatError(f"{where}: 'counts' lacks whole numbers inputs/ok/error; the manifest is damaged")  # fmt: skip
    if not (isinstance(index, dict) and _count(index.get("bytes")) and SHA256.fullmatch(str(index.get("sha256")))):  # fmt: skip
        raise FormatError(f"{where}: 'index' lacks its bytes and sha256; the manifest is damaged")


def check_shard_names(manifest: dict, where: str) -> None:
    """Shard names are flat file names: a manifest cannot point a reader outside its folder."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise FormatError(f"{where}: 'shards' is not a list")
    for s in shards:
        name = s.get("name") if isinstance(s, dict) else None
        if not is_shard_file(name):
            raise FormatError(
                f"{where}: shard name {name!r} is not a plain <name>.tar file name; refusing it"
            )


def load_index(
    root: str | os.PathLike,
    columns: list[str] | None = None,
    manifest: dict | None = None,
    optional: tuple[str, ...] = (),
) -> pd.DataFrame:
    """index.parquet of the build at `root` (folder or URL prefix), bounded before it is
    materialised: at most MAX_INDEX_BYTES on disk, MAX_INDEX_ROWS rows (exactly the manifest's
    `counts.inputs` when `manifest` is given) and MAX_INDEX_INFLATED bytes once decompressed, as the
    Parquet footer declares them; a local path must be a regular file. `columns` must all be
    there; `optional` ones are read when the index has them."""
    url = join(root, INDEX)
    data = _read_index_bytes(url)
    want = None if manifest is None else (manifest.get("counts") or {}).get("inputs")
    return parse_index(data, url, columns, want, optional)


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it (check_entries: a flat `<name>.tar`, counts >= 0, a
    whole-number fold, -1 in a test build, a 64-hex sha256)."""

    name: str
    samples: int
    bytes: int
    sha256: str
    fold: int
    split: str | None


@dataclass(frozen=True)
class Build:
    """A finished build, opened (`open_build`): its manifest read once, bounded and checked
    (load_manifest), as typed fields; the index read when first asked for (`index`)."""

    root: str
    config: BuildConfig
    shards: tuple[ShardEntry, ...]
    counts: Mapping[str, object]
    format_version: str
    tool: str  # "ich_prep"
    tool_version: str
    index_bytes: int
    index_sha256: str
    record: Mapping[str, object] = field(repr=False)  # the manifest as written: build identity
    # the index frames read so far, by column set (the one mutable part: a cache)
    _indexes: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, root: str | os.PathLike, manifest: dict, where: str = MANIFEST) -> Build:
        """The handle of a manifest already parsed (`load_manifest`, or `write_build`'s own)."""
        cfg = build_config(manifest, where)
        shards = tuple(
            ShardEntry(
                e["name"],
                int(e["samples"]),
                int(e["bytes"]),
                str(e["sha256"]),
                int(e["fold"]),
                e.get("split"),
            )  # fmt: skip
            for e in manifest["shards"]
        )
        return cls(
            root=str(root),
            config=cfg,
            shards=shards,
            counts=MappingProxyType(manifest["counts"]),
            format_version=str(manifest.get("format_version")),
            tool=str(manifest.get("tool", "?")),
            tool_version=str(manifest.get("tool_version", "?")),
            index_bytes=int(manifest["index"]["bytes"]),
            index_sha256=str(manifest["index"]["sha256"]),
            record=MappingProxyType(manifest),
        )

    @property
    def layout(self) -> ImageLayout:
        return self.config.layout

    @property
    def split(self) -> str:
        return self.config.split

    @property
    def recorded_config(self) -> dict:
        """The config as the manifest records it (a copy): what a checkpoint's build identity is
        made of, unchanged by how this version reads it."""
        return json.loads(json.dumps(self.record["config"]))

    @property
    def inputs(self) -> Mapping | None:
        """What the build was made from (build.inputs_record), None in a fixture's build."""
        return self.record.get("inputs")

    def url(self, name: str) -> str:
        return join(self.root, name)

    def index(self, columns: list[str] | None = None, optional: tuple[str, ...] = ()) -> pd.DataFrame:  # fmt: skip
        """index.parquet (REQUIRED_COLUMNS and `columns`, which must be there, and the `optional` ones it has;
        every column when None; all named in INDEX_SCHEMA), read once per column set: bounded
        (load_index: exactly `counts.inputs` rows) and checked against INDEX_SCHEMA
        (index.check_index)."""
        if columns is not None:  # every reader reads the REQUIRED_COLUMNS
            columns = [*REQUIRED_COLUMNS, *(c for c in columns if c not in REQUIRED_COLUMNS)]
        key = (None if columns is None else tuple(columns), tuple(optional))
        unknown = {*(key[0] or ()), *optional} - set(INDEX_COLUMNS)
        if unknown:  # a reader's mistake, not the build's
            raise ValueError(f"no index column {sorted(unknown)} in INDEX_SCHEMA")
        if key not in self._indexes:
            url = self.url(INDEX)
            want = self.counts.get("inputs")
            data = _read_index_bytes(url)
            frame = parse_index(data, url, columns, want, optional)
            check_index(frame, f"{self.root}: {INDEX}")
            self._indexes[key] = frame
        return self._indexes[key]


def _read_index_bytes(url: str) -> bytes:
    try:
        return read_bytes(url, MAX_INDEX_BYTES)
    except FileNotFoundError as e:
        raise FormatError(f"{url} not found; copy the whole build folder or rebuild it") from e
    except OSError as e:
        raise FormatError(f"{url} cannot be read ({e}); copy it again or rebuild") from e


def open_build(root: str | os.PathLike) -> Build:
    """The build at `root` (folder or URL prefix): its manifest loaded and checked (load_manifest)."""
    return Build.of(str(root), load_manifest(root), join(root, MANIFEST))


@dataclass(frozen=True)
class Recorded:
    """What the manifest in an output folder records, read leniently for a build about to write
    there (`recorded`): the config and inputs as written, the shard names it lists."""

    config: object
    inputs: Mapping
    shards: tuple[str, ...]
    record: dict = field(repr=False)


def recorded(store: Store) -> Recorded | None:
    """The folder's manifest as Recorded; None when there is none or it is not a json object
    (never an error; bounded)."""
    try:
        m = json.loads(store.read_bytes(MANIFEST, MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(m, dict):
        return None
    shards = m.get("shards") if isinstance(m.get("shards"), list) else []
    names = tuple(s["name"] for s in shards if isinstance(s, dict) and isinstance(s.get("name"), str))  # fmt: skip
    inputs = m.get("inputs") if isinstance(m.get("inputs"), dict) else {}
    return Recorded(m.get("config"), inputs, names, m)


def index_mismatches(build: Build, index: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Where the index disagrees with the manifest, as (kind, where, message): row counts, one ok
    row per image, each shard's ok rows equal to its `samples` and all of its fold, no ok row in
    a shard the manifest does not list. The one check verify reports and the trainer refuses on."""
    out = []
    c = build.counts
    ok = index[index["status"] == "ok"]
    if c.get("inputs") != len(index) or c.get("ok") != len(ok):
        out.append(("count", INDEX, f"{INDEX} has {len(index)} rows ({len(ok)} ok), {MANIFEST} says {c.get('inputs')} ({c.get('ok')} ok)"))  # fmt: skip
    for image_id in ok["image_id"][ok["image_id"].duplicated()].unique()[:50]:
        out.append(("duplicate_row", f"{INDEX} row {image_id}", f"{INDEX}: image {image_id} has more than one ok row"))  # fmt: skip
    per_shard = ok["shard"].value_counts().to_dict()
    folds = ok.groupby("shard")["fold"].unique().to_dict()
    for s in build.shards:
        n = per_shard.get(s.name, 0)
        if n != s.samples:
            out.append(("count", s.name, f"{INDEX} has {n} ok rows for {s.name}, {MANIFEST} says {s.samples} samples"))  # fmt: skip
        if s.name in folds and sorted(int(f) for f in folds[s.name]) != [s.fold]:
            out.append(("index", s.name, f"{INDEX} rows of {s.name} are fold {sorted(int(f) for f in folds[s.name])}, {MANIFEST} says fold {s.fold}"))  # fmt: skip
    listed = {s.name for s in build.shards}
    for row in ok[~ok["shard"].isin(listed)].head(50).itertuples():
        out.append(("missing_sample", f"{INDEX} row {row.image_id}", f"{INDEX} row {row.image_id} points to shard {row.shard!r}, which {MANIFEST} does not list"))  # fmt: skip
    return out
