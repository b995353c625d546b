"""The frozen build configuration: the CLI builds it, the manifest records it, a resume compares it."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass

from ich_prep.errors import UserError

# (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),  # grey/white matter and fresh blood (~50-70 HU) separate
    "subdural": (80.0, 200.0),  # wider: thin extra-axial blood next to bone stays visible
    "bone": (600.0, 2800.0),  # skull and fractures; blood vs bone edge for epidurals
    "soft-tissue": (40.0, 400.0),
}
DEFAULT_WINDOWS = ("brain", "subdural", "bone")

# Sample field name (a file extension, so webdataset decodes it with no custom code) per encoding.
ENCODINGS: dict[str, str] = {
    "npy.gz": "lossless: raw uint8 .npy, gzip (ISA-L level 2) (default: smallest lossless, fastest decode measured)",
    "png": "lossless: PNG (1 or 3 windows), zlib level 1 (opens in any image viewer)",
    "npy": "lossless: raw uint8 .npy (no decode cost, 192 KiB per 256x256x3 image)",
    "jpg": "lossy: JPEG quality 95 (1 or 3 windows; about 21 KiB per image)",
}
DEFAULT_ENCODING = "npy.gz"

# How the head crop box is chosen (BuildConfig.crop). A manifest without `crop` was written before
# series crops existed, when every slice was cropped to its own box: it reads as "slice".
CROPS: dict[str, str] = {
    "series": "one box per series, the robust union of its slices' head boxes (neighbours align pixel for pixel)",
    "slice": "each slice cropped to its own head box (scale and centre vary from slice to slice)",
}
DEFAULT_CROP = "series"
LEGACY_CROP = "slice"

# Sane ranges for the numeric settings (inclusive). Outside them a build is a mistake: a 0.001 mm
# spacing asks for a 145 GB image, numpy's seeded generators take 0..2**32-1, and so on.
SIZE_RANGE = (16, 4096)  # output side in pixels
SPACING_RANGE_MM = (0.1, 10.0)  # CT pixel spacing is 0.2-1 mm; 10 mm is already a 25-pixel head
MAX_FOLDS = 100
MAX_SHARD_SIZE = 100_000  # samples per shard: one task holds one shard's results in memory
MAX_SEED = 2**32 - 1
MAX_WINDOWS = 8  # channels per image (the layout's); 3 is the RSNA habit, 1 or 5 are choices
CV2_CHANNELS = {"png": (1, 3), "jpg": (1, 3)}  # what cv2 writes and reads back as uint8 grey/RGB


class ConfigError(UserError, ValueError):
    """A build setting out of range or malformed; the message names the flag and what it allows.
    A ValueError too, so callers that caught ValueError before still do."""


@dataclass(frozen=True)
class Window:
    """One display window: HU values in [center - width/2, center + width/2] map to 0..255."""

    name: str
    center: float
    width: float


def parse_windows(spec: str | tuple[str, ...] | list[str]) -> tuple[Window, ...]:
    """Parse 'brain,subdural,bone' or explicit 'C/W' pairs such as '40/80,80/200,600/2800'."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in items:
        item = raw.strip()
        if item in WINDOW_PRESETS:
            c, w = WINDOW_PRESETS[item]
            out.append(Window(item, c, w))
            continue
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", item)
        if not m or float(m.group(2)) <= 0:
            raise ConfigError(
                f"--windows: {item!r} is neither a preset ({', '.join(WINDOW_PRESETS)}) "
                "nor a CENTER/WIDTH pair with a positive width, e.g. 40/80"
            )
        out.append(Window(f"c{m.group(1)}w{m.group(2)}", float(m.group(1)), float(m.group(2))))
    if not 1 <= len(out) <= MAX_WINDOWS:
        raise ConfigError(
            f"--windows: give 1 to {MAX_WINDOWS} windows (one per image channel), got {len(out)}: {spec!r}"
        )
    return tuple(out)


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bytes of a build's output (runtime knobs such as --jobs are not here)."""

    dicom_dir: str
    labels: str | None = None
    size: int = 256
    windows: tuple[Window, ...] = parse_windows(DEFAULT_WINDOWS)
    spacing_mm: float | None = None
    folds: int = 5
    seed: int = 0
    shard_size: int = 1000
    encoding: str = DEFAULT_ENCODING
    limit: int | None = None
    fraction: float | None = None
    crop: str = DEFAULT_CROP

    def __post_init__(self):
        def bad(flag: str, allowed: str, value) -> ConfigError:
            return ConfigError(f"{flag} must be {allowed}, got {value!r}")

        def whole(flag: str, value, lo: int, hi: int | None = None) -> None:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if not ok or value < lo or (hi is not None and value > hi):
                allowed = f"a whole number from {lo} to {hi}" if hi else f"a whole number >= {lo}"
                raise bad(flag, allowed, value)

        if self.encoding not in ENCODINGS:
            raise ConfigError(
                f"--encoding {self.encoding!r} is unknown; choose one of {', '.join(ENCODINGS)}"
            )
        n = len(self.windows)
        if n not in CV2_CHANNELS.get(self.encoding, (n,)):
            raise ConfigError(
                f"--encoding {self.encoding} stores 1 or 3 channels, and --windows gives {n}; "
                "use --encoding npy.gz (any number of channels) or 1 or 3 windows"
            )
        if self.crop not in CROPS:
            raise ConfigError(f"--crop {self.crop!r} is unknown; choose one of {', '.join(CROPS)}")
        whole("--size", self.size, *SIZE_RANGE)
        if self.labels is not None:
            whole("--folds", self.folds, 2, MAX_FOLDS)
        whole("--seed", self.seed, 0, MAX_SEED)
        whole("--shard-size", self.shard_size, 1, MAX_SHARD_SIZE)
        if self.limit is not None:
            whole("--limit", self.limit, 1)
        if self.fraction is not None and not (
            isinstance(self.fraction, numbers.Real) and 0 < self.fraction <= 1
        ):
            raise bad("--fraction", "in (0, 1] (e.g. 0.1 for a tenth)", self.fraction)
        if self.spacing_mm is not None:
            lo, hi = SPACING_RANGE_MM
            sp = self.spacing_mm
            if not (isinstance(sp, numbers.Real) and math.isfinite(sp) and lo <= sp <= hi):
                raise bad("--spacing-mm", f"a pixel spacing from {lo} to {hi} mm", sp)

    @property
    def split(self) -> str:
        """'train' when labels are given, else 'test'."""
        return "train" if self.labels is not None else "test"

    def to_dict(self) -> dict:
        """Plain json types (lists, not tuples), as stored in manifest.json."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @staticmethod
    def differences(old: dict, new: dict) -> list[str]:
        """Each setting two configs (as to_dict gives them) set differently, as its flag with
        both values: `--size 64 (now 32)`; a field no flag sets is named as it is."""

        def show(key: str, v) -> str:
            if v is None:
                return "not set"
            if key == "windows" and isinstance(v, list):
                return ",".join(str(w.get("name")) if isinstance(w, dict) else repr(w) for w in v)  # fmt: skip
            return str(v)

        keys = sorted(set(old) | set(new), key=lambda k: (k not in new, list(new).index(k) if k in new else 0))  # fmt: skip
        return [
            f"--{k.replace('_', '-')} {show(k, old.get(k))} (now {show(k, new.get(k))})"
            for k in keys
            if old.get(k) != new.get(k)
        ]

    @property
    def layout(self) -> ImageLayout:
        """The shape of every image in the build: size x size, one uint8 channel per window."""
        names = tuple(w.name for w in self.windows)
        return ImageLayout(self.size, self.size, len(names), names)

    @classmethod
    def from_dict(cls, d: dict) -> BuildConfig:
        """The config a manifest records, every field's type and range checked (ConfigError)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config is a {type(d).__name__}, not an object")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown or "dicom_dir" not in d:
            raise ConfigError(f"config has unknown fields {sorted(unknown)} or no dicom_dir")
        d = dict(d)
        d["windows"] = _windows_from(d.get("windows", [dataclasses.asdict(w) for w in parse_windows(DEFAULT_WINDOWS)]))  # fmt: skip
        d.setdefault("crop", LEGACY_CROP)  # written before series crops: cropped per slice
        for key in ("dicom_dir", "encoding", "crop"):
            if key in d and not isinstance(d[key], str):
                raise ConfigError(f"config {key} is {d[key]!r}, not a string")
        if d.get("labels") is not None and not isinstance(d["labels"], str):
            raise ConfigError(f"config labels is {d['labels']!r}, not a string or null")
        return cls(**d)


@dataclass(frozen=True)
class ImageLayout:
    """What every image of a build is: height x width x channels of `dtype`, channel i named
    channel_names[i] (a window name). Readers take it from the manifest instead of assuming 3."""

    height: int
    width: int
    channels: int
    channel_names: tuple[str, ...]
    dtype: str = "uint8"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def max_bytes(self) -> int:
        """The most one decoded image may take (a .npy header included): the bound every decode gets."""
        return self.height * self.width * self.channels + 65536


def _windows_from(items) -> tuple[Window, ...]:
    """Windows as a manifest records them: a list of 1 to MAX_WINDOWS {name, center, width} with
    finite numbers (the channel names; a name may repeat, as in brain,brain,brain)."""
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_WINDOWS:
        raise ConfigError(
            f"config windows is {str(items)[:80]}, not a list of 1 to {MAX_WINDOWS} windows"
        )
    out = []
    for w in items:
        ok = isinstance(w, dict) and set(w) == {"name", "center", "width"}
        nums = ok and all(isinstance(w[k], numbers.Real) and not isinstance(w[k], bool) and math.isfinite(w[k]) for k in ("center", "width"))  # fmt: skip
        if not (nums and isinstance(w["name"], str) and w["width"] > 0):
            raise ConfigError(f"config window {str(w)[:80]} is not {{name, center, width > 0}}")
        out.append(Window(w["name"], float(w["center"]), float(w["width"])))
    return tuple(out)
