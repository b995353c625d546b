"""TrainConfig: one frozen dataclass per run. The CLI builds it, config.json and every checkpoint
record it, and a resumed run is compared against it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

# Fields that may differ between a run and its resume: where things are and how fast they go,
# never what is learned. `shards` may move (local folder -> URL); the data itself is compared
# through the index checksum stored in the checkpoint.
RUNTIME_FIELDS = frozenset(
    {
        "shards",
        "out",
        "workers",
        "compile",
        "progress",
        "valid_batch_size",
        "pretrained",
        "device",
        "checkpoint_every",
    }
)
LOSSES = ("bce", "asl")
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A TrainConfig that cannot run, or a resume whose config differs in a field that matters."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Batch size is per process (per GPU)."""

    shards: str
    out: str
    valid_fold: int = 4
    train_folds: tuple[int, ...] | None = None  # None: every labelled fold except valid_fold
    model: str = "efficientnet_b0"
    pretrained: str | None = None  # local .safetensors / .pth file with ImageNet weights
    image_size: int | None = None  # None: the shards' size; smaller sizes are resized on device
    epochs: int = 5
    epoch_samples: int | None = None  # None: every training sample once per epoch (index count)
    batch_size: int = 64
    valid_batch_size: int | None = None  # None: 2 x batch_size
    accum_steps: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    drop_rate: float = 0.0
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: no EMA
    loss: str = "bce"
    pos_weight: tuple[float, ...] | None = None  # one value, or one per label
    asl_gamma_pos: float = 0.0
    asl_gamma_neg: float = 4.0
    asl_clip: float = 0.05
    augment: bool = True
    hflip: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    shift: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    noise: float = 0.02
    shuffle_buffer: int = 1000
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    workers: int = 4
    # optimizer steps between last.pt saves inside an epoch (0: at epoch ends only)
    checkpoint_every: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1 or self.accum_steps < 1:
            raise ConfigError("--batch-size and --accum-steps must be at least 1")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"--image-size must be at least 16, got {self.image_size}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.pos_weight is not None and len(self.pos_weight) not in (1, 6):
            raise ConfigError(
                f"--pos-weight takes 1 value or 6 (one per label), got {len(self.pos_weight)}"
            )
        if self.train_folds is not None and self.valid_fold in self.train_folds:
            raise ConfigError(
                f"--valid-fold {self.valid_fold} is also in --train-folds {list(self.train_folds)}; "
                "drop it from --train-folds"
            )
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"--warmup-frac must be in [0, 1), got {self.warmup_frac}")
        if not 0 <= self.ema < 1:
            raise ConfigError(
                f"--ema must be in [0, 1) (e.g. 0.999; 0 turns it off), got {self.ema}"
            )
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")

    @property
    def eval_batch_size(self) -> int:
        return self.valid_batch_size or 2 * self.batch_size

    def to_dict(self) -> dict:
        """Plain json-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of to_dict; unknown keys (from a newer version) are refused by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; upgrade ich-toolkit to read them")
        d = dict(d)
        for key in ("train_folds", "pos_weight"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def config_mismatch(saved: dict, current: TrainConfig) -> dict[str, tuple]:
    """{field: (saved, current)} for fields that matter (not RUNTIME_FIELDS) and differ."""
    now = current.to_dict()
    defaults = TrainConfig(shards="", out="").to_dict()
    out = {}
    for key, value in now.items():
        if key in RUNTIME_FIELDS:
            continue
        old = saved.get(key, defaults[key])  # a field added later: the old run had its default
        if old != value:
            out[key] = (old, value)
    return out


def check_resumable(saved: dict, current: TrainConfig) -> None:
    """Refuse to resume when a field that changes what is learned differs, naming the fix."""
    diff = config_mismatch(saved, current)
    if diff:
        lines = "\n".join(
            f"  --{k.replace('_', '-')}: run has {a!r}, now {b!r}" for k, (a, b) in diff.items()
        )
        raise ConfigError(
            f"cannot resume {current.out}: the config differs in fields that change training:\n{lines}\n"
            "pass the run's original values (see its config.json) or start a new run with another --out"
        )
