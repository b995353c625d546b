"""The frozen build configuration: the CLI builds it, the manifest records it, a resume compares it."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

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
    "png": "lossless: 3-channel PNG, zlib level 1 (opens in any image viewer)",
    "npy": "lossless: raw uint8 .npy (no decode cost, 192 KiB per 256x256x3 image)",
    "jpg": "lossy: JPEG quality 95 (about 21 KiB per image)",
}
DEFAULT_ENCODING = "npy.gz"


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
            raise ValueError(
                f"window {item!r} is neither a preset ({', '.join(WINDOW_PRESETS)}) "
                "nor a CENTER/WIDTH pair with a positive width, e.g. 40/80"
            )
        out.append(Window(f"c{m.group(1)}w{m.group(2)}", float(m.group(1)), float(m.group(2))))
    if len(out) != 3:
        raise ValueError(
            f"need exactly 3 windows (one per image channel), got {len(out)}: {spec!r}"
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

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}; choose one of {list(ENCODINGS)}")
        if self.size < 16:
            raise ValueError(f"--size must be at least 16 pixels, got {self.size}")
        if self.labels is not None and self.folds < 2:
            raise ValueError(f"--folds must be at least 2, got {self.folds}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be positive, got {self.shard_size}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.spacing_mm is not None and self.spacing_mm <= 0:
            raise ValueError(f"--spacing-mm must be positive, got {self.spacing_mm}")

    @property
    def split(self) -> str:
        """'train' when labels are given, else 'test'."""
        return "train" if self.labels is not None else "test"

    def to_dict(self) -> dict:
        """Plain json types (lists, not tuples), as stored in manifest.json."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> BuildConfig:
        d = dict(d)
        d["windows"] = tuple(Window(**w) for w in d["windows"])
        return cls(**d)
