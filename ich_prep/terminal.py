"""Text for a terminal: the one place where both CLIs print, so nothing read can drive the terminal.

Ids, member names, file names, index details and JSON values come from builds and DICOM files
that others made. `for_terminal` shows every character `str.isprintable` refuses as a Python
escape (`\\x1b`, `\\u202e`): C0 and C1 control characters (ESC, CSI, BEL, backspace, carriage
return, newline), Unicode format characters (bidi overrides and isolates U+202A..U+202E,
U+2066..U+2069, zero-width characters), surrogates, line and paragraph separators. `echo` prints
through it, one line of ours at a time; `installed` (while a CLI runs) sends Python warnings and last-resort log
records through it too. Every `print` of `ich_prep` and `ich_train` is an `echo`
(tests/test_terminal.py checks the source).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def for_terminal(text: object) -> str:
    """`text` as one line that shows, and cannot drive, a terminal: every character that is not
    printable (newlines included) as its escape."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _escape(c) for c in s)


def echo(text: object = "", file=None) -> None:
    """print(text) with each of its lines (split at our newlines) made safe by for_terminal."""
    lines = str(text).split("\n")
    print(
        "\n".join(for_terminal(line) for line in lines), file=sys.stdout if file is None else file
    )


class _SafeHandler(logging.StreamHandler):
    """logging's last resort (WARNING and up to the current sys.stderr), each line for_terminal."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.stderr, as logging's own last resort

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(for_terminal(line) for line in super().format(record).split("\n"))


@contextlib.contextmanager
def installed():
    """While the block runs, route Python warnings and last-resort log records (a library
    warning quoting a DICOM value) through for_terminal, to stderr; restored afterwards, since
    main() also runs in-process (tests, other programs). Both CLIs' run_cli use it."""

    def show(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
        echo(text, file=sys.stderr if file is None else file)

    handler = _SafeHandler()
    handler.setLevel(logging.WARNING)
    before = warnings.showwarning, logging.lastResort
    warnings.showwarning, logging.lastResort = show, handler
    try:
        yield
    finally:
        warnings.showwarning, logging.lastResort = before
