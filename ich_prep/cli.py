"""`ich-prep` command line: build, synth, verify, info, preview. `main(argv=None)` for tests."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ich_prep import __version__


def _jobs(value: str) -> int:
    n = int(value)
    return n if n > 0 else (os.cpu_count() or 1)


# ---------------------------------------------------------------- build


def add_build(sub) -> None:
    from ich_prep.config import DEFAULT_ENCODING, DEFAULT_WINDOWS, ENCODINGS, WINDOW_PRESETS

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
        help="parallel workers (default: all cores)",
    )
    p.add_argument("--size", type=int, default=256, help="output side in pixels (default 256)")
    p.add_argument(
        "--windows",
        default=",".join(DEFAULT_WINDOWS),
        help=f"3 windows: presets ({', '.join(WINDOW_PRESETS)}) or CENTER/WIDTH pairs (default brain,subdural,bone)",
    )
    p.add_argument(
        "--spacing-mm",
        type=float,
        help="resample to this pixel spacing first (common physical scale)",
    )
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--encoding",
        choices=list(ENCODINGS),
        default=DEFAULT_ENCODING,
        help="image encoding in the shards",
    )
    p.add_argument(
        "--limit", type=int, help="compile a seeded random subset of N images (prototyping)"
    )
    p.add_argument(
        "--fraction",
        type=float,
        help="compile a seeded random fraction of the images (prototyping)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing build made with another config",
    )
    p.add_argument(
        "--max-errors",
        type=int,
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
    from ich_prep.build import BuildError, build
    from ich_prep.config import BuildConfig, parse_windows

    try:
        cfg = BuildConfig(
            dicom_dir=args.dicom_dir,
            labels=args.labels,
            size=args.size,
            windows=parse_windows(args.windows),
            spacing_mm=args.spacing_mm,
            folds=args.folds,
            seed=args.seed,
            shard_size=args.shard_size,
            encoding=args.encoding,
            limit=args.limit,
            fraction=args.fraction,
        )
    except ValueError as e:
        print(f"ich-prep build: {e}", file=sys.stderr)
        return 2
    client = None
    backend = None
    if args.backend == "dask":
        try:
            from dask.distributed import Client
        except ImportError:
            print(
                "ich-prep build: --backend dask needs the dask extra: pip install 'ich-toolkit[dask]'",
                file=sys.stderr,
            )
            return 2
        if not args.scheduler:
            print(
                "ich-prep build: --backend dask needs --scheduler tcp://HOST:PORT", file=sys.stderr
            )
            return 2
        client = Client(args.scheduler)
        backend = "dask"
    try:
        res = build(
            cfg,
            args.out,
            jobs=args.jobs,
            overwrite=args.overwrite,
            progress=not args.quiet,
            backend=backend,
        )
    except BuildError as e:
        print(f"ich-prep build: {e}", file=sys.stderr)
        return 2
    finally:
        if client is not None:
            client.close()
    print_summary(res)
    if args.max_errors is not None and res.manifest["counts"]["error"] > args.max_errors:
        print(
            f"ich-prep build: {res.manifest['counts']['error']} inputs failed, more than --max-errors {args.max_errors}",
            file=sys.stderr,
        )
        return 3
    return 0


def print_summary(res) -> None:
    from ich_prep import LABELS

    c, s = res.manifest["counts"], res.summary
    if s.get("already_complete"):
        print(
            f"{res.out}: already complete with this config (manifest.json present); nothing to do"
        )
    print(f"images ok: {c['ok']}   failed: {c['error']}   inputs: {c['inputs']}")
    for reason, n in c["errors_by_reason"].items():
        print(f"  {reason}: {n}")
    if c.get("positives"):
        print("positives: " + ", ".join(f"{k} {c['positives'][k]}" for k in LABELS))
    n_bytes = sum(sh["bytes"] for sh in res.manifest["shards"])
    print(
        f"shards: {len(res.manifest['shards'])}   bytes: {n_bytes / 2**20:.1f} MiB ({n_bytes / max(1, c['ok']) / 1024:.1f} KiB/image)"
    )
    if "wall_s" in s:
        print(
            f"wall: {s['wall_s']:.1f} s   {s['images_per_s']:.1f} images/s   (shards resumed: {s['resumed_shards']})"
        )
    print(f"output: {res.out}")


# ---------------------------------------------------------------- synth


def add_synth(sub) -> None:
    p = sub.add_parser(
        "synth", help="write a small synthetic RSNA-like dataset (real DICOM files + labels CSV)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int, default=24)
    p.add_argument("--slices", type=int, default=6, help="slices per series")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=do_synth)


def do_synth(args) -> int:
    from ich_prep.synth import write_synthetic

    info = write_synthetic(
        args.out, patients=args.patients, seed=args.seed, slices_per_series=args.slices
    )
    print(json.dumps(info, indent=1, default=str))
    return 0


# ---------------------------------------------------------------- verify


def add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a build (folder or URL) against its manifest: hashes, samples, index rows",
    )
    p.add_argument("root", metavar="DIR_OR_URL", help="build folder or URL prefix")
    p.add_argument("--quick", action="store_true", help="file sizes and counts only (no hashing)")
    p.add_argument("--jobs", type=_jobs, default=1, help="shards streamed at once (default 1)")
    p.add_argument("--json", action="store_true", help="print the full report as json")
    p.set_defaults(func=do_verify)


def do_verify(args) -> int:
    from ich_prep.verify import format_report, report_json, verify

    report = verify(args.root, quick=args.quick, jobs=args.jobs)
    print(report_json(report) if args.json else format_report(report))
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
    from ich_prep.manifest import FormatError

    try:
        d = info(args.root)
    except (FormatError, OSError) as e:
        print(f"ich-prep info: {e}", file=sys.stderr)
        return 2
    print(json.dumps(d, indent=1) if args.json else format_info(d))
    return 0


# ---------------------------------------------------------------- preview


def add_preview(sub) -> None:
    from ich_prep import LABELS

    p = sub.add_parser(
        "preview", help="contact sheet PNG of decoded samples: id, labels, each window"
    )
    p.add_argument("root", metavar="DIR_OR_URL", help="build folder or URL prefix")
    p.add_argument("--n", type=int, default=64, help="samples to show (default 64)")
    p.add_argument("--out", default="preview.png", help="PNG to write (default preview.png)")
    p.add_argument("--label", choices=LABELS, help="only samples positive for this label")
    p.add_argument("--fold", type=int, help="only samples of this fold")
    p.add_argument("--seed", type=int, default=0, help="which samples (default 0)")
    p.add_argument("--panel", type=int, default=96, help="pixels per window panel (default 96)")
    p.set_defaults(func=do_preview)


def do_preview(args) -> int:
    from ich_prep.manifest import FormatError
    from ich_prep.preview import PreviewError, preview, write_png

    try:
        sheet, n = preview(args.root, args.n, args.label, args.fold, args.seed, args.panel)
        write_png(args.out, sheet)
    except (FormatError, PreviewError, OSError) as e:
        print(f"ich-prep preview: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {n} samples, {sheet.shape[1]}x{sheet.shape[0]} px")
    return 0


# ---------------------------------------------------------------- main


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ich-prep", description="Compile RSNA ICH head-CT DICOMs into WebDataset shards."
    )
    parser.add_argument("--version", action="version", version=f"ich-prep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_build, add_synth, add_verify, add_info, add_preview):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
