"""Resuming a build: the output folder's config, its ledger (`_work/`) and its inputs.

`_prepare_out` creates the output or checks that what is there was made by the same config (with
`--overwrite`, deletes what an earlier build of ours wrote: outdir.owned_names); `_load_done`
reuses a shard an earlier run finished from the same inputs (its `_work/<shard>.json` key and tar
hash); `inputs_record` / `_changes` say what a finished build was made from and what changed
since; `_remove_leftovers` deletes the shards of an earlier plan, then the ledger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

from ich_prep.build_plan import STAT_KEY
from ich_prep.config import BuildConfig
from ich_prep.errors import BuildError
from ich_prep.index import INDEX, MAX_INDEX_BYTES, parse_index
from ich_prep.location import (
    InputFile,
    Store,
    open_stream,
    sha256_stream,
)
from ich_prep.manifest import MANIFEST, MAX_MANIFEST_BYTES, recorded
from ich_prep.outdir import (
    WORK,
    ledger_names,
    owned_names,
    remove_ledger,
    remove_owned,
)


def _record(store: Store, name: str) -> dict | None:
    """The ledger record of a shard an earlier run finished (not one only started), or None."""
    rec = f"{WORK}/{name}.json"
    if not store.exists(rec):
        return None
    try:
        done = json.loads(store.read_bytes(rec, MAX_MANIFEST_BYTES))
    except ValueError:
        return None
    return done if isinstance(done, dict) and "shard" in done else None


def _load_done(store: Store, name: str, key: str) -> dict | None:
    """Results of a shard a previous run finished from the same inputs, if its tar is intact."""
    done = _record(store, name)
    if done is None or done.get("key") != key or not store.exists(name):
        return None
    if any(r.get("reason") is None and not {"span", "slice_rank"} <= set(r) for r in done.get("results", [])):  # fmt: skip
        return None  # a ledger from before spans and ranks were recorded: compile the shard again
    if store.size(name) != done["shard"]["bytes"] or store.sha256(name) != done["shard"]["sha256"]:
        return None
    return done


def _differs(theirs: str | None, cfg: BuildConfig) -> str:
    """What differs between the config a folder records and `cfg`, flag by flag."""
    try:
        old = json.loads(theirs) if theirs is not None else None
    except ValueError:
        old = None
    if not isinstance(old, dict):
        return "its recorded config cannot be read"
    return "; ".join(BuildConfig.differences(old, cfg.to_dict())) or "recorded differently"


def _prepare_out(store: Store, cfg: BuildConfig, overwrite: bool) -> None:
    """Create the output, or check that what is there was made by the same config; with
    `overwrite`, delete what an earlier build of ours wrote there (owned_names), nothing else."""
    state = f"{WORK}/config.json"
    ours = json.dumps(cfg.to_dict(), sort_keys=True)
    owned, foreign = owned_names(store)
    if not owned and foreign:
        raise BuildError(
            f"--out {store} holds files that no ich-prep build wrote ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder for --out"
        )
    if owned:
        theirs = None
        with contextlib.suppress(ValueError):  # unreadable: a different config, said so
            if store.exists(state):
                theirs = store.read_bytes(state, MAX_MANIFEST_BYTES).decode()
            elif store.exists(MANIFEST):
                m = recorded(store)
                theirs = json.dumps(m.config if m is not None else None, sort_keys=True)
        if theirs != ours and not overwrite:
            raise BuildError(
                f"{store} already holds a build with a different config ({_differs(theirs, cfg)}); "
                "run with the same settings to resume it, choose another --out, or pass "
                "--overwrite to replace it"
            )
        if overwrite:
            if foreign:
                raise BuildError(
                    f"--overwrite: {store} also holds files no ich-prep build wrote "
                    f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); nothing was "
                    "deleted: move them away or choose another --out"
                )
            remove_owned(store, owned)
    store.makedirs(WORK)
    store.write_bytes(state, ours.encode())


def inputs_record(cfg: BuildConfig, inputs: list[InputFile]) -> dict:
    """What the build was made from, as the manifest records it: the number of .dcm entries, a
    sha256 over their paths, sizes and mtimes, and the labels CSV's sha256."""
    h = hashlib.sha256()
    for f in inputs:
        h.update(
            f"{f.path}\t{f.size}\t{f.mtime_ns}\t{int(f.regular)}\n".encode(
                "utf-8", "surrogateescape"
            )
        )
    labels = None
    if cfg.labels is not None:
        try:
            with open_stream(cfg.labels) as f:  # a local path: regular files only (no FIFO hang)
                labels = sha256_stream(f)
        except OSError as e:
            raise BuildError(
                f"--labels {cfg.labels} cannot be read ({e}); give the RSNA labels CSV file"
            ) from e
    return {"files": len(inputs), "files_sha256": h.hexdigest(), "labels_sha256": labels}


def _changes(store: Store, was: dict, now: dict, inputs: list[InputFile]) -> str:
    """A few words naming what changed between a finished build's inputs and today's."""
    parts = []
    if was.get("labels_sha256") != now["labels_sha256"]:
        parts.append("the labels CSV changed")
    if was.get("files_sha256") != now["files_sha256"]:
        data = store.read_bytes(INDEX, MAX_INDEX_BYTES)
        old = parse_index(data, f"{store}/{INDEX}", STAT_KEY).dropna()
        old = {r.path: (int(r.file_size), int(r.file_mtime_ns)) for r in old.itertuples()}
        cur = {f.path: (f.size, f.mtime_ns) for f in inputs}
        for what, names in (
            ("new", [p for p in cur if p not in old]),
            ("changed", [p for p in cur if p in old and old[p] != cur[p]]),
            ("gone", [p for p in old if p not in cur]),
        ):
            if names:
                parts.append(f"{len(names)} {what} file(s) (e.g. {', '.join(names[:3])})")
        if len(parts) == (was.get("labels_sha256") != now["labels_sha256"]):
            parts.append(f"the .dcm files under --dicom-dir differ ({now['files']} now, {was.get('files')} then)")  # fmt: skip
    return "; ".join(parts)


def _remove_leftovers(store: Store, shards: set[str]) -> None:
    """Delete the shards earlier runs of this build wrote (each named by a ledger record) that
    this plan does not have (written before the inputs changed), then the ledger. Only regular
    files the ledger names: a file we did not name stays."""
    for rec in ledger_names(store):
        name = rec.removesuffix(".json")
        if name != rec and name.endswith(".tar") and name not in shards and store.is_file(name):
            store.remove(name)
    remove_ledger(store)
