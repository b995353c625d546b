"""`ich-prep` command line: build, synth, verify, info, preview. `main(argv=None)` for tests.

Every way a command can stop ends in one line on stderr and an exit code (errors.EXIT_*): a
UserError (a bad flag or input; exit 2) and an I/O error or Ctrl-C (exit 1 / 130) are caught once,
in `main`; a usage error argparse finds is one line too (exit 2).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import threading
from urllib.parse import urlsplit

from ich_prep import __version__
from ich_prep.errors import (
    EXIT_MAX_ERRORS,
    OneLineParser,
    UserError,
    at_least,
    int_range,
    run_cli,
)
from ich_prep.location import is_url
from ich_prep.terminal import echo

SCHEDULER_TIMEOUT_S = 10.0  # connecting to a dask scheduler that accepted the TCP connection


MAX_JOBS = 1024  # worker processes (a dask cluster's included); check_jobs bounds local ones
MAX_SEED = 2**32 - 1


def _jobs(value: str) -> int:
    try:
        return int_range(1, MAX_JOBS)(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(
            f"{e} (worker processes; leave --jobs out to use all {os.cpu_count() or 1} cores)"
        ) from None


def check_jobs(jobs: int, backend: str) -> None:
    """Local workers beyond 4 per core only cost memory (and a huge count never starts)."""
    cores = os.cpu_count() or 1
    if backend != "dask" and jobs > 4 * cores:
        raise UserError(
            f"--jobs {jobs} is more than 4 worker processes per core on this {cores}-core machine; "
            f"use --jobs {cores} (the default), or --backend dask to spread work over a cluster"
        )


def _absolute(path: str) -> str:
    """A local path made absolute and normal, so `./x`, `x/` and `$PWD/x` name the same build
    input (the config records it; a resume compares it). URLs are kept as they are."""
    return path if is_url(path) else os.path.abspath(path)


# ---------------------------------------------------------------- build


def add_build(sub) -> None:
    from ich_prep.config import (
        CROPS,
        DEFAULT_CROP,
        DEFAULT_ENCODING,
        DEFAULT_WINDOWS,
        ENCODINGS,
        MAX_WINDOWS,
        WINDOW_PRESETS,
    )

    p = sub.add_parser(
        "build", help="compile DICOMs into WebDataset shards + index.parquet + manifest.json"
    )
    p.add_argument(
        "--dicom-dir",
        required=True,
        help="folder or fsspec URL (s3://, file://...) with the .dcm slices (searched recursively)",
    )
    p.add_argument("--labels", help="RSNA labels CSV (ID,Label); omit for an unlabelled test set")
    p.add_argument("--out", required=True, help="output folder or fsspec URL, e.g. shards/train")
    p.add_argument(
        "--jobs",
        type=_jobs,
        default=os.cpu_count() or 1,
        help="parallel workers, at least 1 (default: all cores)",
    )
    p.add_argument(
        "--size", type=int, default=256, help="output side in pixels, 16 to 4096 (default 256)"
    )
    p.add_argument(
        "--windows",
        default=",".join(DEFAULT_WINDOWS),
        help=f"1 to {MAX_WINDOWS} windows, one channel each: presets ({', '.join(WINDOW_PRESETS)}) or CENTER/WIDTH pairs (default brain,subdural,bone)",
    )
    p.add_argument(
        "--spacing-mm",
        type=float,
        help="resample to this pixel spacing first, 0.1 to 10 mm (common physical scale)",
    )
    p.add_argument(
        "--crop",
        choices=list(CROPS),
        default=DEFAULT_CROP,
        help="series: one head box per series, so neighbouring slices align pixel for pixel "
        "(default); slice: each slice cropped to its own head box",
    )
    p.add_argument("--folds", type=int, default=5, help="2 to 100 (default 5)")
    p.add_argument("--seed", type=int, default=0, help="0 to 2**32-1 (default 0)")
    p.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard, 1 to 100000 (default 1000)"
    )
    p.add_argument(
        "--encoding",
        choices=list(ENCODINGS),
        default=DEFAULT_ENCODING,
        help="image encoding in the shards",
    )
    p.add_argument(
        "--limit",
        type=int,
        help="compile a seeded random subset of whole series, at most N >= 1 images (prototyping)",
    )
    p.add_argument(
        "--fraction",
        type=float,
        help="compile a seeded random subset of whole series, at most a fraction in (0, 1] of the "
        "images (prototyping)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing build made with another config",
    )
    p.add_argument(
        "--max-errors",
        type=at_least(0),
        help="exit non-zero when more inputs than this fail (default: never)",
    )
    p.add_argument(
        "--backend",
        choices=["loky", "dask"],
        default="loky",
        help="joblib backend (dask: a dask.distributed cluster)",
    )
    p.add_argument(
        "--scheduler", help="dask scheduler address tcp://HOST:PORT (with --backend dask)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=do_build)


def do_build(args) -> int:
    from ich_prep.build import build
    from ich_prep.config import BuildConfig, parse_windows

    check_jobs(args.jobs, args.backend)
    cfg = BuildConfig(
        dicom_dir=_absolute(args.dicom_dir),
        labels=None if args.labels is None else _absolute(args.labels),
        size=args.size,
        windows=parse_windows(args.windows),
        spacing_mm=args.spacing_mm,
        folds=args.folds,
        seed=args.seed,
        shard_size=args.shard_size,
        encoding=args.encoding,
        limit=args.limit,
        fraction=args.fraction,
        crop=args.crop,
    )
    check_build_paths(args.dicom_dir, args.labels, args.out)
    if args.scheduler and args.backend != "dask":
        raise UserError(f"--scheduler {args.scheduler} needs --backend dask")
    client = connect_dask(args.scheduler) if args.backend == "dask" else None
    try:
        res = build(
            cfg,
            args.out,
            jobs=args.jobs,
            overwrite=args.overwrite,
            progress=not args.quiet,
            backend="dask" if client is not None else None,
        )
    finally:
        if client is not None:
            client.close()
    print_summary(res)
    failed = res.build.counts["error"]
    if args.max_errors is not None and failed > args.max_errors:
        why = f"{failed} inputs failed, more than --max-errors {args.max_errors}"
        echo(f"ich-prep build: {why}", file=sys.stderr)
        return EXIT_MAX_ERRORS
    return 0


def _has_file(root: str, suffix: str) -> bool:
    """Whether any entry below a local folder ends in `suffix` (case-insensitive); stops at the
    first one, so it costs one directory read on a real data set and a full walk only when none."""
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.name.lower().endswith(suffix):
                        return True
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue  # an unreadable sub-folder: the build itself reports what it cannot read
    return False


def check_build_paths(dicom_dir: str, labels: str | None, out: str) -> None:
    """Refuse, before anything is written, local paths that cannot work (URLs are left to build)."""
    if not is_url(dicom_dir):
        if not os.path.exists(dicom_dir):
            raise UserError(
                f"--dicom-dir {dicom_dir} is not a folder (it does not exist); give the folder that holds the .dcm slices"  # fmt: skip
            )
        if not os.path.isdir(dicom_dir):
            raise UserError(
                f"--dicom-dir {dicom_dir} is not a folder but a file; give the folder that holds the .dcm slices"  # fmt: skip
            )
        if not _has_file(dicom_dir, ".dcm"):
            raise UserError(
                f"--dicom-dir {dicom_dir} holds no .dcm files (searched recursively); check the path"
            )
    if labels is not None and not is_url(labels):
        if not os.path.exists(labels):
            raise UserError(
                f"--labels {labels} does not exist; give the labels CSV (e.g. stage_2_train.csv), "
                "or leave --labels out for an unlabelled test set"
            )
        if os.path.isdir(labels):
            raise UserError(
                f"--labels {labels} is a folder; give the labels CSV file in it (e.g. stage_2_train.csv)"  # fmt: skip
            )
    from ich_prep.outdir import check_out_path

    check_out_path(out)


def connect_dask(address: str | None):
    """A dask.distributed Client for --scheduler, or a UserError within seconds saying why not."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise UserError(
            "--backend dask needs the dask extra: pip install 'ich-toolkit[dask]'"
        ) from None
    if not address:
        raise UserError("--backend dask needs --scheduler tcp://HOST:PORT")
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if scheme in ("tcp", "tls"):  # a plain TCP check first: refused at once, not after 30 s
        url = urlsplit(address if "://" in address else f"tcp://{address}")
        try:
            host, port = url.hostname, url.port or 8786
        except ValueError:
            host = port = None
        if not host:
            raise UserError(f"--scheduler {address} is not an address like tcp://HOST:PORT")
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as e:
            raise UserError(
                f"--scheduler {address}: cannot reach a dask scheduler there ({_os_error(e)}); "
                "start one (`dask scheduler`) or check HOST:PORT"
            ) from None
    # Client's own timeout covers the TCP connect, not the handshake: a port that accepts and
    # then stays silent (not a dask scheduler) would hang it forever, so it gets a deadline too.
    got: dict = {}

    def connect() -> None:
        try:
            got["client"] = Client(address, timeout=SCHEDULER_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - reported below, in the calling thread
            got["error"] = e

    t = threading.Thread(target=connect, name="ich-prep-dask-connect", daemon=True)
    t.start()
    t.join(SCHEDULER_TIMEOUT_S + 5)
    if "client" in got:
        return got["client"]
    why = _one_line(str(got["error"])) if "error" in got else f"no answer in {SCHEDULER_TIMEOUT_S + 5:g} s"  # fmt: skip
    raise UserError(
        f"--scheduler {address}: no dask scheduler answered ({why}); "
        "check HOST:PORT (the scheduler's port, 8786 by default) and that `dask scheduler` runs there"
    )


def print_summary(res) -> None:
    from ich_prep import LABELS

    b, s = res.build, res.summary
    c = b.counts
    if s.get("already_complete"):
        echo(f"{res.out}: already complete with this config (manifest.json present); nothing to do")
    echo(f"images ok: {c['ok']}   failed: {c['error']}   inputs: {c['inputs']}")
    for reason, n in c["errors_by_reason"].items():
        echo(f"  {reason}: {n}")
    if c.get("positives"):
        echo("positives: " + ", ".join(f"{k} {c['positives'][k]}" for k in LABELS))
    n_bytes = sum(sh.bytes for sh in b.shards)
    echo(
        f"shards: {len(b.shards)}   bytes: {n_bytes / 2**20:.1f} MiB ({n_bytes / max(1, c['ok']) / 1024:.1f} KiB/image)"
    )
    if "wall_s" in s:
        echo(
            f"wall: {s['wall_s']:.1f} s   {s['images_per_s']:.1f} images/s   (shards resumed: {s['resumed_shards']})"
        )
    if s.get("changed_shards"):
        echo(
            f"inputs changed since the interrupted run: {s['changed_shards']} finished shards compiled again"
        )
    echo(f"output: {res.out}")


# ---------------------------------------------------------------- synth


def add_synth(sub) -> None:
    p = sub.add_parser(
        "synth", help="write a small synthetic RSNA-like dataset (real DICOM files + labels CSV)"
    )
    p.add_argument("--out", required=True, help="folder to write (created if absent)")
    p.add_argument(
        "--patients", type=int_range(1, 100_000), default=24, help="1 to 100000 (default 24)"
    )
    p.add_argument(
        "--slices",
        type=int_range(1, 1000),
        default=6,
        help="slices per series, 1 to 1000 (default 6)",
    )
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0)
    p.add_argument(
        "--json", action="store_true", help="print the summary as JSON (paths, counts, quirks)"
    )
    p.set_defaults(func=do_synth)


def synth_summary(out: str, info: dict) -> list[str]:
    """What `ich-prep synth` wrote, for a person: the sets, the positives, the planted quirks."""
    from ich_prep.synth import MIMIC_RATE

    pat, ser, per = info["patients"], info["series"], info["slices_per_series"]
    pos = ", ".join(f"{k} {v}" for k, v in info["positives"].items())
    forms = ", ".join(f"{k} {v}" for k, v in info["forms"].items())
    bad = ", ".join(info["corrupt"]) or "none"
    return [
        f"wrote a synthetic set to {out} ({per} slices per series)",
        f"  train: {pat['train']} patients, {ser['train']} series, {info['train_images']} slices"
        f" in {info['train_dir']}, labels in {info['labels_csv']}",
        f"  test:  {pat['test']} patients, {ser['test']} series, {info['test_images']} slices"
        f" in {info['test_dir']} (unlabelled)",
        f"  positive train slices: {pos}",
        "  planted, as in the real data (a build must cope):",
        f"    series per pixel storage form: {forms} (wrap12: the RSNA 12-bit bug)",
        f"    series with a decimal rescale: {info['decimal_rescale']}, of a size other than"
        f" 512x512: {info['odd_sizes']}",
        f"    truncated (unreadable) slices: {bad}; duplicated label rows: {info['duplicate_rows']}",
        f"    unlabelled one-slice bleed mimics: on about {MIMIC_RATE:.0%} of slices",
    ]


def do_synth(args) -> int:
    from ich_prep.synth import write_synthetic

    info = write_synthetic(
        args.out, patients=args.patients, seed=args.seed, slices_per_series=args.slices
    )
    if args.json:
        echo(json.dumps(info, indent=1, default=str))
    else:
        for line in synth_summary(args.out, info):
            echo(line)
    return 0


# ---------------------------------------------------------------- verify


def add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a build (folder or URL) against its manifest: hashes, samples, index rows",
    )
    p.add_argument("root", metavar="DIR_OR_URL", help="build folder or URL prefix")
    p.add_argument("--quick", action="store_true", help="file sizes and counts only (no hashing)")
    p.add_argument(
        "--jobs",
        type=int_range(1, 256),
        default=1,
        help="shards streamed at once, 1 to 256 (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print the full report as json")
    p.set_defaults(func=do_verify)


def do_verify(args) -> int:
    from ich_prep.verify import format_report, report_json, verify

    report = verify(args.root, quick=args.quick, jobs=args.jobs)
    echo(report_json(report) if args.json else format_report(report))
    return 0 if report.ok else 1


# ---------------------------------------------------------------- info


def add_info(sub) -> None:
    p = sub.add_parser(
        "info", help="format, config, counts per fold, label prevalence, bytes, errors of a build"
    )
    p.add_argument("root", metavar="DIR_OR_URL", help="build folder or URL prefix")
    p.add_argument("--json", action="store_true", help="print as json")
    p.set_defaults(func=do_info)


def do_info(args) -> int:
    from ich_prep.info import format_info, info

    d = info(args.root)
    echo(json.dumps(d, indent=1) if args.json else format_info(d))
    return 0


# ---------------------------------------------------------------- preview


def add_preview(sub) -> None:
    from ich_prep import LABELS

    p = sub.add_parser(
        "preview", help="contact sheet PNG of decoded samples: id, labels, each window"
    )
    p.add_argument("root", metavar="DIR_OR_URL", help="build folder or URL prefix")
    p.add_argument(
        "--n",
        type=int_range(1, 1_000_000),
        default=64,
        help="samples to show, 1 to 1000000, at most what the build holds (default 64)",
    )
    p.add_argument("--out", default="preview.png", help="PNG to write (default preview.png)")
    p.add_argument("--label", choices=LABELS, help="only samples positive for this label")
    p.add_argument("--fold", type=int, help="only samples of this fold")
    p.add_argument(
        "--seed", type=int_range(0, MAX_SEED), default=0, help="which samples (default 0)"
    )
    p.add_argument(
        "--panel",
        type=int_range(8, 1024),
        default=96,
        help="pixels per window panel, 8 to 1024 (default 96)",
    )
    p.add_argument(
        "--series",
        metavar="SERIES_ID",
        help="draw this series (index column series_id) as a strip in slice order, one row per window",
    )
    p.set_defaults(func=do_preview)


def do_preview(args) -> int:
    from ich_prep.preview import preview, write_png

    sheet, n = preview(args.root, args.n, args.label, args.fold, args.seed, args.panel, args.series)
    write_png(args.out, sheet)
    echo(f"wrote {args.out}: {n} samples, {sheet.shape[1]}x{sheet.shape[0]} px")
    return 0


# ---------------------------------------------------------------- main


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ich-prep", description="Compile RSNA ICH head-CT DICOMs into WebDataset shards."
    )
    parser.add_argument("--version", action="version", version=f"ich-prep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_build, add_synth, add_verify, add_info, add_preview):
        add(sub)
    return parser


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _os_error(e: OSError) -> str:
    """'No space left on device (ENOSPC): /path' from an OSError, whatever raised it."""
    if e.strerror is None:
        return str(e) or type(e).__name__
    code = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
    where = "".join(f"{' -> ' if i else ': '}{f}" for i, f in enumerate((e.filename, e.filename2)) if f is not None)  # fmt: skip
    return f"{e.strerror}{code}{where}"


def _stopped(args) -> str:
    """What a stopped command leaves behind and how to go on."""
    if args.command == "build":
        return (
            f"; finished shards in {args.out} are kept (a .partial file is never used): "
            "run the same command again to resume"
        )
    if args.command == "synth":
        return f"; {args.out} may be incomplete: run the same command again to rewrite it"
    return ""


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        make_parser(),
        argv,
        "ich-prep",
        (UserError,),
        lambda e: _one_line(str(e)),
        lambda e, args: f"{_one_line(_os_error(e))}{_stopped(args)}",
        _stopped,
    )


if __name__ == "__main__":
    sys.exit(main())
