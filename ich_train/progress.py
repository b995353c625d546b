"""Progress of a long loop (an epoch, a validation, an embedding pass): a tqdm bar when stderr is a
terminal; otherwise (a log file, a pipe, `make demo | tee`) a plain line every EVERY_S seconds, so a
log stays readable instead of holding one very long line of carriage returns.

    epoch 3: step 40/120 (33%), 0:12 elapsed, ~0:24 left, loss=0.4123, img_s=125

Each line goes through ich_prep.terminal.echo. `ICH_PROGRESS_EVERY_S` (seconds, 0 to 86400)
changes the interval of those lines; `--no-progress` turns both off.
"""

from __future__ import annotations

import math
import os
import sys
import time

from tqdm import tqdm

from ich_prep.terminal import echo
from ich_train.config import ConfigError

EVERY_S = 30.0
ENV = "ICH_PROGRESS_EVERY_S"


def every_s() -> float:
    """The seconds between two progress lines: ICH_PROGRESS_EVERY_S or EVERY_S."""
    raw = os.environ.get(ENV)
    if raw is None or raw == "":
        return EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 86400:
        raise ConfigError(
            f"{ENV}={raw[:20]!r}: give the seconds between progress lines, 0 to 86400"
        )
    return value


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Lines:
    """tqdm's update / set_postfix / close, written as a line every `every` seconds."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every: float = EVERY_S, file=None):  # fmt: skip
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = self.start = initial
        self.file = file
        self.postfix = ""
        self.t0 = self.last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= self.every and (self.n < self.total or not self.total):
            self.last = now
            echo(self.line(now), file=self.file if self.file is not None else sys.stderr)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        done = self.n - self.start
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = (self.total - self.n) * elapsed / done if done > 0 and self.total else None
        eta = f", ~{_clock(left)} left" if left is not None else ""
        tail = f", {self.postfix}" if self.postfix else ""
        of = f"/{self.total}" if self.total else ""
        return f"{self.desc}: {self.unit} {self.n}{of}{pct}, {_clock(elapsed)} elapsed{eta}{tail}"  # fmt: skip

    def close(self) -> None:
        pass  # the caller's own line (the epoch's metrics) follows


def bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A progress bar over `total` units: tqdm on a terminal, Lines otherwise, nothing when
    not `enabled`."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return Lines(total, desc, unit, initial, every_s())


def track(iterable, desc: str, unit: str, enabled: bool = True):
    """Iterate `iterable` under bar(): one update per item (of len(iterable), 0 when unknown)."""
    try:
        total = len(iterable)
    except TypeError:
        total = 0
    b = bar(total, desc, unit, enabled)
    try:
        for item in iterable:
            yield item
            b.update(1)
    finally:
        b.close()
