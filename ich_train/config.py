"""TrainConfig: one frozen dataclass per run. The CLI builds it, config.json and every checkpoint
record it, and a resumed run is compared against it."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass

from ich_prep.errors import UserError

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
        "report",
    }
)
LOSSES = ("bce", "asl")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # fp16: with loss scaling (GradScaler)
LOADERS = ("auto", "stream", "spans")  # auto: spans when the build's index records them
SAMPLERS = ("natural", "balanced")  # balanced: --pos-fraction of 'any' positives per epoch
# --context with --sampler balanced, refused by TrainConfig and by data.create_train_stream
CONTEXT_BALANCED = "--context reads every slice once per pass with its neighbours, --sampler balanced draws single images any number of times: drop one of them"  # fmt: skip


MAX_IMAGE_SIZE = 4096  # ich-prep's largest --size
MAX_CONTEXT = 8  # --context: neighbours on each side, 17 slices a stack (ich_train.context)
MAX_SEED = 2**32 - 1  # numpy's seeded generators take 0..2**32-1


# Every count of a training run, (lowest, highest): what the CLI's parser accepts (int_range)
# and what TrainConfig checks. Sane, not tight: 64 loader workers per process feed ~100,000 img/s;
# a shuffle buffer of 100,000 samples holds ~6 GB.
COUNTS = {
    "workers": (0, 64),
    "batch_size": (1, 4096),
    "valid_batch_size": (1, 8192),
    "epochs": (1, 10_000),
    "accum_steps": (1, 1024),
    "shuffle_buffer": (1, 100_000),
    "epoch_samples": (1, 10**9),
    "checkpoint_every": (0, 10**9),
    "average_last": (0, 10_000),
    "seed": (0, MAX_SEED),
    "image_size": (16, MAX_IMAGE_SIZE),
}
OPTIONAL_COUNTS = {"valid_batch_size", "epoch_samples", "image_size"}  # None: a default


class ConfigError(UserError, ValueError):
    """A TrainConfig that cannot run, or a resume whose config differs in a field that matters.
    A ValueError too, so callers that caught ValueError before still do."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_number(name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    """ConfigError naming the flag unless `value` is a finite number in the range."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        if math.isinf(hi):
            allowed = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            allowed = f"a number in {left}{lo:g}, {hi:g}{right}"
        raise ConfigError(f"{_flag(name)} must be {allowed}, got {value!r}")


MAX_RATE = (
    100.0  # --lr and --weight-decay of fit and seq fit: 1e300 overflows float32 in the optimizer
)


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
    opt: str = "adamw"  # fused AdamW; or any timm optimizer name (radam, sgd, lamb, ...)
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
    loader: str = "auto"
    # natural: every training sample once per pass; balanced: each epoch draws pos_fraction of
    # its samples positive for 'any' (ich_train.sampler; read by the span loader)
    sampler: str = "natural"
    pos_fraction: float | None = None
    # 2.5D: each sample is slices rank-K..rank+K of its series (ich_train.context), with every
    # window, or with only `context_window` of each
    context: int = 0
    context_window: str | None = None
    seed: int = 0
    # auto: bf16 autocast where the GPU runs it natively, fp16 + loss scaling on other GPUs, fp32
    # on CPU (ich_train.engine.resolve_precision; checkpoints record what it chose)
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    workers: int = 4
    # optimizer steps between last.pt saves inside an epoch (0: at epoch ends only)
    checkpoint_every: int = 0
    device: str = "auto"
    progress: bool = True
    report: bool = True  # at the end: best.pt's validation predictions and report folder
    # keep epoch<N>.pt for the last `average_last` epochs and write avg.pt, their mean weights with
    # batch-norm statistics recomputed on training batches (ich_train.average); 0: off
    average_last: int = 0

    def __post_init__(self):
        self._check_counts()
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.opt != "adamw":
            from ich_train.optim import optimizer_names

            if self.opt not in optimizer_names():
                raise ConfigError(
                    f"--opt {self.opt!r} is not a timm optimizer; one of adamw (default, fused), "
                    "radam, sgd, momentum, lamb, lion, ... (timm.optim.list_optimizers())"
                )
        if self.loader not in LOADERS:
            raise ConfigError(f"--loader must be one of {LOADERS}, got {self.loader!r}")
        self._check_sampler()
        self._check_context()
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
        if self.average_last and not 2 <= self.average_last <= self.epochs:
            raise ConfigError(
                f"--average-last must be 0 (off) or 2 to --epochs ({self.epochs}), got {self.average_last}"
            )
        self._check_numbers()

    def _check_counts(self) -> None:
        """Every count (COUNTS) a whole number in its range, or None where the field allows it: a
        config loaded from a run folder gets the check the CLI's parser makes (int_range)."""
        for name, (lo, hi) in COUNTS.items():
            value = getattr(self, name)
            whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if not (value is None and name in OPTIONAL_COUNTS) and not (
                whole and lo <= value <= hi
            ):
                raise ConfigError(f"{_flag(name)} must be a whole number from {lo} to {hi}, got {value!r}")  # fmt: skip

    def _check_context(self) -> None:
        if not (isinstance(self.context, int) and 0 <= self.context <= MAX_CONTEXT):
            raise ConfigError(f"--context must be 0 (single slices) to {MAX_CONTEXT}, got {self.context!r}")  # fmt: skip
        if self.context_window is not None and not self.context:
            raise ConfigError("--context-window picks one window of each neighbour; give --context K >= 1 too")  # fmt: skip
        if self.context and self.sampler == "balanced":
            raise ConfigError(CONTEXT_BALANCED)

    def _check_sampler(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "natural":
            if self.pos_fraction is not None:
                raise ConfigError(
                    "--pos-fraction only applies with --sampler balanced (the natural sampler "
                    "keeps the data's own share of positives)"
                )
            return
        if self.pos_fraction is None:
            raise ConfigError(
                "--sampler balanced needs --pos-fraction F: the share of images positive for "
                "'any' drawn per epoch, in (0, 1), e.g. 0.5"
            )
        _check_number("pos_fraction", self.pos_fraction, 0, 1, lo_open=True, hi_open=True)
        if self.loader == "stream":
            raise ConfigError(
                "--sampler balanced reads the drawn samples by their index spans; it cannot run "
                "with --loader stream (use --loader auto or spans)"
            )

    def _check_numbers(self) -> None:
        """Every numeric flag finite and in its range: `--lr nan` or a negative decay would
        otherwise train into NaN (or nonsense) and fail far from the flag that caused it."""
        inf = math.inf
        for name, lo, hi, kw in (
            ("lr", 0, MAX_RATE, {"lo_open": True}),
            ("min_lr_ratio", 0, 1, {}),
            ("weight_decay", 0, MAX_RATE, {}),
            ("grad_clip", 0, inf, {}),
            ("drop_rate", 0, 1, {"hi_open": True}),
            ("asl_gamma_pos", 0, inf, {}),
            ("asl_gamma_neg", 0, inf, {}),
            ("asl_clip", 0, 1, {"hi_open": True}),
            ("hflip", 0, 1, {}),
            ("rotate_deg", 0, 180, {}),
            ("scale", 0, 1, {"hi_open": True}),
            ("shift", 0, 1, {}),
            ("brightness", 0, 1, {}),
            ("contrast", 0, 1, {}),
            ("noise", 0, 1, {}),
        ):
            _check_number(name, getattr(self, name), lo, hi, **kw)
        for v in self.pos_weight or ():
            _check_number("pos_weight", v, 0, inf)

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
        fields = "; ".join(f"{_flag(k)}: run has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"cannot resume {current.out}: the config differs in fields that change training "
            f"({fields}); pass the run's original values (see its config.json) or start a new run "
            "with another --out"
        )
