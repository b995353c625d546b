"""User errors: one base class, caught once per CLI and printed as one line (exit 2).

A `UserError` message says what is wrong, which file or flag, and how to fix it. Anything that is
not a UserError is a bug (or an I/O failure the CLI reports on its own line), never the user's fault.
The exit codes of `ich-prep` follow (the README lists them too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ich_prep.terminal import echo, for_terminal, installed

EXIT_OK = 0
EXIT_FAILED = 1  # an I/O error (disk full, permission, network), or `verify` found problems
EXIT_USER = 2  # a UserError or a usage error: nothing was built; fix the flag or file named
EXIT_MAX_ERRORS = 3  # the build finished, but more inputs failed than --max-errors allows
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)


class UserError(Exception):
    """A mistake the user can fix: a bad flag, a missing or malformed input, a busy output folder."""


class NotRegularFile(UserError, OSError):
    """A path that should be a regular file is a FIFO, device, socket or folder: never read.
    Also an OSError, so code that handles unreadable files handles it."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class NotOurs(UserError):
    """An output path where a link, folder, FIFO or other entry not written by us stands: it is
    never written through, replaced or deleted."""


class FormatError(UserError, ValueError):
    """A build this version cannot read (missing manifest, newer format, damaged json or index)."""


class BuildError(UserError):
    """The build cannot start or finish (config mismatch, nothing to build, too many errors)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors in one line, like every other error (exit 2). Both CLIs."""

    def error(self, message: str):
        self.exit(
            EXIT_USER, for_terminal(f"{self.prog}: {message} (see {self.prog} --help)") + "\n"
        )


def int_range(lo: int, hi: int):
    """An argparse type: a whole number from lo to hi. Every count flag of both CLIs (workers,
    jobs, batch sizes, epochs, buffers, steps, ...) is one, so `--workers 100000` is one line and
    exit 2 before anything starts. The bounds are kept on the parser (`.bounds`) for the tests."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not lo <= n <= hi:
            allowed = f"at least {lo}" if hi == sys.maxsize else f"from {lo} to {hi}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {n}")
        return n

    parse.bounds = (lo, hi)
    return parse


def at_least(lo: int):
    """int_range(lo, no practical limit): for numbers that are not counts (a threshold)."""
    return int_range(lo, sys.maxsize)


def run_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    tool: str,
    user_errors: tuple[type[BaseException], ...],
    message: Callable[[BaseException], str],
    io_message: Callable[[OSError, argparse.Namespace], str],
    stopped: Callable[[argparse.Namespace], str],
) -> int:
    """Parse, run the subcommand, and turn every way it can end into an exit code with at most one
    line on stderr: user errors (exit 2), Ctrl-C (130, saying what was kept), I/O errors (1).
    Anything else is a bug and keeps its traceback. Both CLIs' main() are this call; every line
    goes through terminal.echo (so does every warning and last-resort log record)."""
    with installed():
        return _run(parser, argv, tool, user_errors, message, io_message, stopped)


def _run(parser, argv, tool, user_errors, message, io_message, stopped) -> int:  # fmt: skip
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed, one line)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USER)
    # `ich-train seq fit: ...`: a subcommand's own subcommand (dest="subcommand") is named too
    prog = " ".join([tool, args.command, *filter(None, [getattr(args, "subcommand", None)])])
    try:
        return args.func(args)
    except user_errors as e:
        echo(f"{prog}: {message(e)}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        echo(f"\n{prog}: interrupted{stopped(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        echo(f"{prog}: I/O error: {io_message(e, args)}", file=sys.stderr)
        return EXIT_FAILED
