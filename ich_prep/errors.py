"""User errors: one base class, caught once per CLI and printed as one line (exit 2).

A `UserError` message says what is wrong, which file or flag, and how to fix it. Anything that is
not a UserError is a bug (or an I/O failure the CLI reports on its own line), never the user's fault.
The exit codes of `ich-prep` follow (the README lists them too).
"""

from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_FAILED = 1  # an I/O error (disk full, permission, network), or `verify` found problems
EXIT_USER = 2  # a UserError or a usage error: nothing was built; fix the flag or file named
EXIT_MAX_ERRORS = 3  # the build finished, but more inputs failed than --max-errors allows
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)


class UserError(Exception):
    """A mistake the user can fix: a bad flag, a missing or malformed input, a busy output folder."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors in one line, like every other error (exit 2). Both CLIs."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"{self.prog}: {message} (see {self.prog} --help)\n")


def at_least(lo: int):
    """An argparse type: a whole number >= lo."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}")
        return n

    return parse
