"""manifest.json and index.parquet: write atomically, read from a folder or URL, check the version.

URLs: http(s):// is read with the standard library (no aiohttp needed); other schemes (s3://, ...)
through fsspec. See ich_prep.remote for the streaming and the safety rules.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd

from ich_prep import FORMAT_VERSION, remote
from ich_prep.remote import open_stream  # noqa: F401  (re-exported: streaming open of a shard)

MANIFEST = "manifest.json"
INDEX = "index.parquet"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # a manifest of ~1,000 shards is ~200 KiB
MAX_INDEX_BYTES = 4 * 1024**3  # the full RSNA index (~750k rows) is ~50 MB


class FormatError(ValueError):
    """A shard folder this version cannot read (missing manifest, newer format, damaged json)."""


def join(root: str | os.PathLike, name: str) -> str:
    """root + '/' + name for local paths and URLs alike."""
    root = str(root)
    return root.rstrip("/") + "/" + name if "://" in root else str(Path(root) / name)


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """Whole file from a local path or URL (http(s)://, s3://, ...), refusing more than `limit` bytes."""
    try:
        return remote.read_bytes(url, limit)
    except ValueError as e:
        raise FormatError(str(e)) from e


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


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
            f"{where}: shard format {version} is too old for this ich-toolkit ({FORMAT_VERSION}); rebuild it"
        )


def load_manifest(root: str | os.PathLike) -> dict:
    """Parsed manifest.json of a finished build at `root` (folder or URL prefix), version-checked."""
    url = join(root, MANIFEST)
    try:
        data = read_bytes(url, MAX_MANIFEST_BYTES)
    except FileNotFoundError as e:
        raise FormatError(
            f"{url} not found: {root} is not a finished ich-prep build (run `ich-prep build`)"
        ) from e
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        raise FormatError(f"{url} is not valid json: {e}") from e
    if not isinstance(manifest, dict):
        raise FormatError(f"{url} is not a json object")
    check_version(manifest.get("format_version", "0"), url)
    check_shard_names(manifest, url)
    return manifest


def check_shard_names(manifest: dict, where: str) -> None:
    """Shard names are flat file names: a manifest cannot point a reader outside its folder."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise FormatError(f"{where}: 'shards' is not a list")
    for s in shards:
        name = s.get("name") if isinstance(s, dict) else None
        if not (
            isinstance(name, str)
            and remote.SAFE_FILE_NAME.fullmatch(name)
            and name.endswith(".tar")
        ):
            raise FormatError(
                f"{where}: shard name {name!r} is not a plain <name>.tar file name; refusing it"
            )


def load_index(root: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """index.parquet of the build at `root` (folder or URL prefix)."""
    url = join(root, INDEX)
    if "://" in str(root):
        return pd.read_parquet(io.BytesIO(read_bytes(url, MAX_INDEX_BYTES)), columns=columns)
    return pd.read_parquet(url, columns=columns)
