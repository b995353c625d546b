"""http(s) reads with the standard library (no aiohttp): a response (`open_http`), the pace rule
every stream is held to (`paced`: after PACE_AFTER_S a stream must have averaged MIN_BYTES_PER_S,
so a dripping server cannot hold a reader), a range read (`http_range`) and a server's folder
listing (`http_listing`). ich_prep.location, the one path-or-URL layer, calls them.
"""

from __future__ import annotations

import html.parser
import io
import time
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT_S = 60.0
# A server that keeps sending, slowly, is cut off too: after PACE_AFTER_S seconds a stream must
# have averaged MIN_BYTES_PER_S (one byte every 59 s passes the idle timeout, never this).
PACE_AFTER_S = 60.0
MIN_BYTES_PER_S = 1024.0
MAX_LISTING_BYTES = 16 * 1024 * 1024


def open_http(url: str, method: str = "GET"):
    """urllib response (a sequential binary stream); a 404 becomes FileNotFoundError."""
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "ich-prep"})
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)  # noqa: S310 (http(s) only)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise FileNotFoundError(f"{url}: HTTP {e.code} {e.reason}") from e
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise OSError(f"{url}: {e.reason}") from e


class _Paced(io.RawIOBase):
    """An http(s) response read one receive at a time (read1), refused with OSError once, after
    PACE_AFTER_S, it has averaged less than MIN_BYTES_PER_S: a slow drip cannot hold a reader."""

    def __init__(self, response, url: str):
        self.response, self.url, self.got = response, url, 0
        self.start = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.response.read1(len(b))
        self.got += len(data)
        elapsed = time.monotonic() - self.start
        if data and elapsed > PACE_AFTER_S and self.got < MIN_BYTES_PER_S * elapsed:
            raise OSError(f"{self.url}: the server sent {self.got} bytes in {elapsed:.0f} s, under {MIN_BYTES_PER_S:.0f} bytes/s; refused as stalled")  # fmt: skip
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.response.close()
        super().close()


def paced(response, url: str) -> io.BufferedReader:
    """An http(s) response as a buffered stream held to the pace rule (_Paced)."""
    return io.BufferedReader(_Paced(response, url))


def http_range(url: str, offset: int, length: int) -> bytes:
    """Up to `length` bytes from `offset` of an http(s) URL: a Range request, paced; a server
    that ignores Range is read up to the range, bounded (location.read_range checks the length)."""
    req = urllib.request.Request(
        url,
        headers={"User-Agent": "ich-prep", "Range": f"bytes={offset}-{offset + length - 1}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:  # noqa: S310 (http(s) only)
            stream = paced(r, url)
            if r.status != 206:  # the whole file came: skip to the range, bounded
                while offset and (skipped := len(stream.read(min(offset, 1 << 20)))):
                    offset -= skipped
            return stream.read(length)
    except urllib.error.URLError as e:
        raise OSError(f"{url}: {getattr(e, 'reason', e)}") from e


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def http_listing(root: str) -> list[str] | None:
    """The entries a server's directory index lists (python -m http.server, nginx autoindex,
    Apache), read paced and bounded (MAX_LISTING_BYTES); None when it has none."""
    try:
        with open_http(root.rstrip("/") + "/") as r:
            if "html" not in r.headers.get("Content-Type", ""):
                return None
            page = paced(r, root).read(MAX_LISTING_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    p = _Links()
    p.feed(page)
    names = set()
    for href in p.hrefs:
        name = urllib.parse.unquote(urllib.parse.urlsplit(href).path)
        if name and "/" not in name.rstrip("/") and not name.startswith((".", "?")):
            names.add(name)
    return sorted(names)
