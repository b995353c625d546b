"""User errors: one base class, caught once per CLI and printed as one line (exit 2).

A `UserError` message says what is wrong, which file or flag, and how to fix it. Anything that is
not a UserError is a bug (or an I/O failure the CLI reports on its own line), never the user's fault.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: a bad flag, a missing or malformed input, a busy output folder."""
