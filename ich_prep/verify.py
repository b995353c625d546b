"""Check a build (folder or URL) against its manifest: every problem found, counted, and named.

`verify(root)` re-hashes every shard while streaming it once, reads every sample's members
(safe names only), parses each image's header, and checks that index rows and samples map one to
one. `quick=True` checks file sizes and counts only. The result is a Report: a list of Problems
(kind, where, message) that the CLI prints and tests inspect.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pandas as pd
import pyarrow as pa

from ich_prep import LABELS
from ich_prep.config import BuildConfig
from ich_prep.index import (
    INDEX,
    MAX_INDEX_BYTES,
    check_index,
    index_spans,
    parse_index,
    series_ranks,
)
from ich_prep.location import (
    HashingReader,
    file_size,
    is_url,
    join,
    list_names,
    open_stream,
    read_bytes,
)
from ich_prep.manifest import (
    CARD,
    MANIFEST,
    Build,
    FormatError,
    ShardEntry,
    index_mismatches,
    open_build,
)
from ich_prep.sample import SampleError, decode_sample, index_labels
from ich_prep.shards import SHARD_SUFFIX, iter_samples
from ich_prep.terminal import for_terminal

COPY_AGAIN = "copy it again from the source build"


@dataclass(frozen=True)
class Problem:
    """One thing wrong: kind (missing, truncated, altered, extra, ...), the file or row, and why."""

    kind: str
    where: str
    message: str


@dataclass
class Report:
    root: str
    quick: bool
    problems: list[Problem] = field(default_factory=list)
    listed: int = 0  # shards in the manifest
    shards: int = 0  # shards found and read (quick: found)
    samples: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, where: str, message: str) -> None:
        self.problems.append(Problem(kind, where, message))

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "by_kind": self.by_kind()}


@dataclass
class _ShardResult:
    """What streaming one shard found: problems, keys in order, whether the tar parsed to the end."""

    problems: list[Problem] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    found: bool = False
    parsed: bool = False
    bytes: int = 0
    samples: int = 0


def _size_problem(name: str, got: int | None, want: int) -> Problem | None:
    if got is None or got == want:
        return None
    if got < want:
        return Problem(
            "truncated",
            name,
            f"{name} is {got} bytes, manifest says {want}: cut short; {COPY_AGAIN}",
        )
    return Problem(
        "altered", name, f"{name} is {got} bytes, manifest says {want}: changed; {COPY_AGAIN}"
    )


def _index_size_problem(got: int | None, want: int) -> Problem | None:
    if got is None or got == want:
        return None
    return Problem(
        "altered",
        INDEX,
        f"{INDEX} is {got} bytes, {MANIFEST} says {want}: truncated or changed; {COPY_AGAIN}",
    )


def _check_sample(s, name: str, fold: int, cfg: BuildConfig, rows: dict, spans: dict) -> list[Problem]:  # fmt: skip
    """Member safety, the span a range read of the sample uses, then the readers' decode
    (sample.decode_sample: the image of the manifest's layout, the json's schema and its
    agreement with the index row `rows[key]`)."""
    enc, layout = cfg.encoding, cfg.layout
    where = f"{name}:{s.key}"
    out = [Problem("unsafe_member", where, f"{name}: {why}") for why in s.problems + s.skipped]
    if s.key in spans and spans[s.key] != (s.offset, s.length):
        o, n = spans[s.key]
        out.append(Problem("index", where, f"{INDEX} puts {s.key} at bytes {o}+{n} of {name}, it is at {s.offset}+{s.length}: a range read would get other bytes; rebuild"))  # fmt: skip
    try:
        decode_sample(s.key, s.fields, enc, layout, {"fold": fold, **rows.get(s.key, {})})
    except SampleError as e:
        out += [Problem(kind, where, f"{name}: sample {s.key}: {why}") for kind, why in e.problems]
    return out


def _link(root: str, name: str) -> Problem | None:
    """A local build file that is a symbolic link: refused, never read (it can point anywhere)."""
    path = join(root, name)
    if is_url(root) or not os.path.islink(path):
        return None
    return Problem(
        "link", name, f"{name} is a symlink (to {os.readlink(path)}), not a file of the build; "
        "it is not read: replace it with the file it should be, or copy the build again",
    )  # fmt: skip


def _check_shard(
    root: str, entry: ShardEntry, cfg: BuildConfig, rows: dict, spans: dict, quick: bool
) -> _ShardResult:
    """Size, then (unless quick) one streaming pass: sha256, members, image headers, json."""
    name, r = entry.name, _ShardResult()
    url = join(root, name)
    if (link := _link(root, name)) is not None:
        r.problems.append(link)
        return r
    try:
        size = file_size(url)
    except FileNotFoundError:
        r.problems.append(
            Problem("missing", name, f"{name} is listed in {MANIFEST} ({entry.samples} samples) but not found; {COPY_AGAIN}")
        )  # fmt: skip
        return r
    except OSError as e:
        r.problems.append(Problem("unreadable", name, f"{name}: {e}"))
        return r
    r.found = True
    p = _size_problem(name, size, entry.bytes)
    if p is not None:
        r.problems.append(p)
        if p.kind == "truncated":
            return r  # the missing tail is the whole story; its samples are not reported one by one
    if quick:
        r.bytes, r.samples = size or 0, entry.samples
        return r
    try:
        with open_stream(url) as raw:
            reader = HashingReader(raw)
            held = entry.bytes if size is None else size  # a server may not say
            for s in iter_samples(reader, cfg.encoding, cfg.layout, entry.samples, size=held):
                r.keys.append(s.key)
                r.problems += _check_sample(s, name, entry.fold, cfg, rows, spans)
            reader.drain()
        r.parsed, r.samples = True, len(r.keys)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        r.problems.append(
            Problem("truncated" if "end of" in str(e).lower() else "altered", name,
                    f"{name} is not a readable tar after {len(r.keys)} samples ({e}); {COPY_AGAIN}")
        )  # fmt: skip
        return r
    r.bytes = reader.n
    if p is None and reader.sha.hexdigest() != entry.sha256:
        r.problems.append(
            Problem("altered", name, f"{name}: sha256 differs from {MANIFEST} (same size, changed bytes); {COPY_AGAIN}")
        )  # fmt: skip
    if len(r.keys) != entry.samples:
        r.problems.append(
            Problem("count", name, f"{name} holds {len(r.keys)} samples, {MANIFEST} says {entry.samples}")
        )  # fmt: skip
    return r


def _check_index(build: Build, report: Report) -> pd.DataFrame | None:
    """index.parquet: size (and sha256 unless quick), its columns (index.check_index, the
    readers' check), then counts against the manifest."""
    root, url = build.root, build.url(INDEX)
    if (link := _link(root, INDEX)) is not None:
        report.problems.append(link)
        return None
    try:
        if report.quick:
            p = _index_size_problem(file_size(url), build.index_bytes)
            index = parse_index(read_bytes(url, MAX_INDEX_BYTES), url)
        else:
            data = read_bytes(url, MAX_INDEX_BYTES)
            p = _index_size_problem(len(data), build.index_bytes)
            if p is None and hashlib.sha256(data).hexdigest() != build.index_sha256:
                p = Problem(
                    "altered", INDEX, f"{INDEX}: sha256 differs from {MANIFEST}; {COPY_AGAIN}"
                )
            index = parse_index(data, url)
    except FileNotFoundError:
        report.add("missing", INDEX, f"{INDEX} not found; {COPY_AGAIN}")
        return None
    except (pa.ArrowException, OSError, ValueError) as e:  # FormatError is a ValueError
        report.add(
            "index", INDEX, f"{INDEX} cannot be read ({type(e).__name__}: {e}); {COPY_AGAIN}"
        )
        return None
    if p is not None:
        report.problems.append(p)
    try:
        check_index(index, INDEX)
    except FormatError as e:
        report.add("index", INDEX, str(e))
        return None
    for kind, where, message in index_mismatches(build, index):
        report.add(kind, where, message)
    return index


def _index_rows(ok: pd.DataFrame) -> dict[str, dict]:
    """image id -> the fields its json must repeat of its ok index row: labels (when the index
    has the label columns), series_id, slice_rank and slice_position (when it has those,
    non-null)."""
    cols: dict[str, list] = {}
    if all(k in ok.columns for k in LABELS):
        cols["labels"] = index_labels(ok)
    for c in ("series_id", "slice_rank", "slice_position"):
        if c in ok.columns and ok[c].notna().all():
            cols[c] = ok[c].tolist()
    return {i: {c: v[j] for c, v in cols.items()} for j, i in enumerate(ok["image_id"])}


def _extra_files(root: str, build: Build, report: Report) -> None:
    names = list_names(root)
    if names is None:
        report.notes.append(f"{root} cannot be listed; extra files were not looked for")
        return
    expected = {MANIFEST, INDEX, CARD} | {s.name for s in build.shards}
    for n in names:
        if n in expected:
            continue
        hint = (
            "a stray shard: `*.tar` globs (plain webdataset, HF datasets) would read it"
            if n.endswith(SHARD_SUFFIX)
            else "a leftover of an unfinished build"
            if n.endswith(".partial") or n == "_work/"
            else "not part of this build"
        )
        report.add("extra", n, f"{n} is not in {MANIFEST} ({hint}); remove it")


def verify(root: str, quick: bool = False, jobs: int = 1) -> Report:
    """Check the build at `root` (folder or URL prefix); `jobs` shards are streamed at once."""
    root = str(root)
    report = Report(root, quick)
    if (link := _link(root, MANIFEST)) is not None:
        report.problems.append(link)
        return report
    try:
        build = open_build(root)
    except (FormatError, OSError) as e:
        report.add("manifest", MANIFEST, str(e))
        return report
    cfg = build.config
    _extra_files(root, build, report)
    index = _check_index(build, report)
    rows: dict[str, dict] = {}  # image id -> what its json must repeat of the index
    spans: dict[str, tuple[int, int]] = {}
    expected: dict[str, set[str]] = {}
    if index is not None:
        ok = index[index["status"] == "ok"]
        expected = {k: set(v) for k, v in ok.groupby("shard")["image_id"]}
        rows = _index_rows(ok)
        try:
            spans = index_spans(ok)
        except FormatError as e:
            report.add("index", INDEX, str(e))
        if {"series_id", "slice_rank"} <= set(ok.columns) and ok[["series_id", "slice_rank"]].notna().all(axis=None):  # fmt: skip
            try:  # the check ich-train makes before --context, embed and predict --seq
                series_ranks(ok)
            except FormatError as e:
                report.add("index", INDEX, str(e))
        if not spans and "shard_offset" in ok and ok["shard_offset"].isna().any():
            report.add("index", INDEX, f"{INDEX}: {int(ok['shard_offset'].isna().sum())} ok rows have no span (shard_offset); the index is damaged, rebuild")  # fmt: skip
    shards = build.shards
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda e: _check_shard(root, e, cfg, rows, spans, quick), shards))
    seen: dict[str, str] = {}
    for entry, r in zip(shards, results, strict=True):
        name = entry.name
        report.problems += r.problems
        report.listed += 1
        report.shards += r.found
        report.samples += r.samples
        report.bytes += r.bytes
        for k in r.keys:
            if k in seen:
                report.add("duplicate_sample", f"{name}:{k}", f"sample {k} is in {seen[k]} and again in {name}")  # fmt: skip
            seen.setdefault(k, name)
        if quick or not r.parsed or index is None:
            continue
        keys = set(r.keys)
        for k in sorted(expected.get(name, set()) - keys):
            report.add("missing_sample", f"{INDEX} row {k}", f"{INDEX} row {k} says shard {name}, which has no sample {k}")  # fmt: skip
        for k in sorted(keys - expected.get(name, set())):
            report.add("extra_sample", f"{name}:{k}", f"{name} holds sample {k}, which has no ok row for this shard in {INDEX}")  # fmt: skip
    if quick:
        report.notes.append("quick: sizes and counts only (no sha256, no sample reading)")
    return report


def format_report(report: Report, limit: int = 50) -> str:
    """Human text: one line per problem (at most `limit` per kind; a message quotes names from the
    build, shown by terminal.for_terminal), then a summary line."""
    lines, shown = [], Counter()
    for p in report.problems:
        shown[p.kind] += 1
        if shown[p.kind] <= limit:
            lines.append(f"  {p.kind.upper():<16} {for_terminal(p.message)}")
    for kind, n in shown.items():
        if n > limit:
            lines.append(f"  ... and {n - limit} more {kind} problems (--json lists all)")
    lines += [f"  note: {for_terminal(n)}" for n in report.notes]
    head = f"{report.root}: OK" if report.ok else f"{report.root}: {len(report.problems)} problems"
    found = f"{report.shards} of {report.listed} shards found"
    summary = (
        f"{found}, sizes and counts checked (quick)"
        if report.quick
        else f"{found}; {report.samples} samples read, {report.bytes / 2**20:.1f} MiB hashed; "
        "members, image headers and index rows checked"
    )
    return "\n".join([head, *lines, summary])


def report_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=1)
