"""timm classifiers with 6 outputs, and ImageNet weights from a local file or from timm's own
pretrained tags (`timm:TAG`, through the Hugging Face cache: offline with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from ich_prep import LABELS
from ich_prep.errors import UserError
from ich_train.checkpoint import load_failure, safe_torch_load

TIMM_PREFIX = "timm:"  # --pretrained timm:efficientnet_b0.ra_in1k: timm's weights for that tag
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")  # checked in this order
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile


class PretrainedError(UserError, ValueError):
    """A --pretrained file that is missing, unreadable, or does not fit the model."""


class UnknownModelError(UserError, ValueError):
    """A --model name timm does not have."""


def check_model_name(name: str) -> None:
    """UnknownModelError naming the fix unless timm has a model `name` (tags like .a1_in1k allowed)."""
    if not (isinstance(name, str) and timm.is_model(name)):
        raise UnknownModelError(
            f"--model {name!r} is not a timm model; list them with "
            "`python -c 'import timm; print(timm.list_models())'`"
        )


def create_model(
    name: str, pretrained: str | None = None, drop_rate: float = 0.0, in_chans: int = 3
) -> nn.Module:
    """timm model `name` with a 6-label head taking `in_chans` input channels (the build's image
    layout), randomly initialised unless `pretrained` (a local file)."""
    check_model_name(name)
    model = timm.create_model(
        name, pretrained=False, num_classes=len(LABELS), drop_rate=drop_rate, in_chans=in_chans
    )
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def model_spec(name: str, in_chans: int = 3, drop_rate: float = 0.0) -> dict:
    """What rebuilds a model: the constructor arguments of build_model, stored in every checkpoint."""
    return {"name": name, "in_chans": int(in_chans), "drop_rate": float(drop_rate), "num_classes": len(LABELS)}  # fmt: skip


def build_model(spec: dict, pretrained: str | None = None) -> nn.Module:
    """The one way fit, evaluate/predict/embed and bench make a model: from a model_spec (a
    checkpoint's, checked: it may come from anyone) and, for a new run, --pretrained weights."""
    name, chans = spec.get("name"), spec.get("in_chans")
    drop, classes = spec.get("drop_rate", 0.0), spec.get("num_classes", len(LABELS))
    if not (isinstance(chans, int) and 1 <= chans <= 1024 and isinstance(drop, (int, float)) and 0 <= drop < 1 and classes == len(LABELS)):  # fmt: skip
        raise UnknownModelError(f"model spec {str(spec)[:200]} is not one ich-train writes (in_chans 1..1024, drop_rate in [0, 1), {len(LABELS)} classes)")  # fmt: skip
    return create_model(name, pretrained, float(drop), chans)


def init_head(model: nn.Module, prior) -> bool:
    """Start the classifier at the prior: bias = the log-odds of `prior` (each label's training
    frequency), weights = 0, so the untrained model predicts exactly the prior and its first loss
    is the prior baseline's. The weights matter as much as the bias: timm initialises
    EfficientNet's head uniform in +-1/sqrt(outputs), +-0.41 for 6 labels (0.03 for ImageNet's
    1000), which made efficientnet_b0's first-epoch training loss 0.71-1.11 against a prior of
    0.45 and its validation loss diverge on the synthetic demo set. Zero weights learned better
    there than nn.Linear's +-1/sqrt(inputs) (fold 2, 6 epochs: 0.354 vs ~0.40 by epoch 4); the
    trunk gets its first gradient one step later. False (nothing changed) when the head is not a
    linear layer with one output per label."""
    head = model.get_classifier()
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if not (isinstance(bias, torch.Tensor) and isinstance(weight, torch.Tensor)) or tuple(bias.shape) != (len(LABELS),):  # fmt: skip
        return False
    p = torch.as_tensor(prior, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        bias.copy_(torch.log(p / (1 - p)).to(bias.dtype))
        weight.zero_()
    return True


def zero_init_residuals(model: nn.Module) -> int:
    """Start every residual block at the identity: the scale (gamma) of the last batch norm on its
    residual branch set to 0, for a model trained from scratch. timm does this for its ResNets
    (`zero_init_last`, Goyal et al. 2017) but not for the EfficientNet / MobileNet family, whose
    blocks with a skip (`has_skip`) then start as a deep stack of random branches: efficientnet_b0
    from scratch stayed at the prior on the demo's set where resnet18 learned (docs/training.md,
    "Learning on small data"). Returns the number of blocks changed (0 for ResNets: timm did it)."""
    n = 0
    for m in model.modules():
        if getattr(m, "has_skip", False) is True:
            norms = [c for c in m.children() if isinstance(c, nn.modules.batchnorm._BatchNorm)]
            if norms and norms[-1].weight is not None:
                with torch.no_grad():
                    norms[-1].weight.zero_()
                n += 1
    return n


def weights_config(model: nn.Module, pretrained: str | None = None) -> dict:
    """The pretrained config (mean, std, first_conv, ...) of the weights a model starts from: the
    tag's own for `timm:TAG` (timm's registry, in the installed timm: no hub access), which may
    differ from its architecture's default tag (timm:resnet18d.ra4_e3600_r224_in1k expects
    0.5/0.5, resnet18d's default ImageNet's); else the model's (its architecture's default)."""
    if isinstance(pretrained, str) and pretrained.startswith(TIMM_PREFIX):
        cfg = timm.models.get_pretrained_cfg(pretrained[len(TIMM_PREFIX) :], allow_unregistered=False)  # fmt: skip
        if cfg is not None:
            return cfg.to_dict()
    return dict(getattr(model, "pretrained_cfg", None) or {})


def normalization(
    model: nn.Module, channels: int = 3, pretrained: str | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per input channel: those the weights were trained with (weights_config: the
    --pretrained timm:TAG's, else the model family's, ImageNet by default) when they have
    `channels` values; repeated when `channels` is a multiple of them (a --context stack of
    3-window slices: timm's adapt_input_conv repeats the RGB filters the same way); else their
    averages repeated `channels` times."""
    cfg = weights_config(model, pretrained)
    mean = [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))]
    std = [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))]
    if len(mean) == len(std) and channels % len(mean) == 0:
        mean, std = mean * (channels // len(mean)), std * (channels // len(std))
    if len(mean) != channels or len(std) != channels:
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return tuple(mean), tuple(std)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(
            f"--pretrained {path} is not a file; download the weights and pass their local path"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = safe_torch_load(path)  # weights_only=True: never unpickled
    except Exception as e:  # anything a foreign file makes the readers raise
        raise PretrainedError(
            f"--pretrained {path} is not a weights file: {load_failure(e)}; pass a .safetensors "
            "file or a timm/torch .pth state dict"
        ) from e
    if path.suffix != ".safetensors":
        for key in _WRAPPERS:
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict):
        raise PretrainedError(
            f"--pretrained {path} holds a {type(sd).__name__}, not a state dict; pass a "
            ".safetensors file or a timm/torch .pth state dict"
        )
    out = {}
    for k, v in sd.items():
        if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
            continue
        for prefix in _PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def arch_of(name: str) -> str:
    """The architecture of a timm model name or pretrained tag: 'efficientnet_b0.ra_in1k' -> 'efficientnet_b0'."""
    return name.split(".", 1)[0]


def timm_state_dict(tag: str, model_name: str) -> dict[str, torch.Tensor]:
    """The weights timm loads for its pretrained tag `tag` (e.g. 'efficientnet_b0.ra_in1k'), read
    through timm and huggingface_hub the way timm users expect: from the Hugging Face cache
    (HF_HOME, HF_HUB_CACHE), offline when HF_HUB_OFFLINE=1, downloaded otherwise."""
    if arch_of(tag) != arch_of(model_name):
        raise PretrainedError(
            f"--pretrained {TIMM_PREFIX}{tag} is for {arch_of(tag)}, not --model {model_name}; "
            f"pass a tag of {arch_of(model_name)} (see `timm.list_pretrained('{arch_of(model_name)}*')`)"
        )
    try:
        known = timm.is_model(tag) and timm.models.get_pretrained_cfg(tag, allow_unregistered=False)
    except RuntimeError:  # 'Invalid pretrained tag'
        known = False
    if not known:
        raise PretrainedError(
            f"--pretrained {TIMM_PREFIX}{tag}: timm has no pretrained tag {tag!r}; list them with "
            f"`python -c \"import timm; print(timm.list_pretrained('{arch_of(model_name)}*'))\"`"
        )
    try:
        return timm.create_model(tag, pretrained=True).state_dict()
    except Exception as e:  # offline without the file, no network, a damaged cache entry, ...
        raise PretrainedError(
            f"--pretrained {TIMM_PREFIX}{tag}: timm could not load its weights "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); fetch them "
            f"once with network (`python -c \"import timm; timm.create_model('{tag}', "
            'pretrained=True)"`) so they are in the Hugging Face cache (HF_HOME), or pass a local file'
        ) from e


def _adapted_stem(model: nn.Module, sd: dict, own: dict) -> dict[str, torch.Tensor]:
    """The first convolution's weights (timm's pretrained_cfg 'first_conv') adapted to the model's
    input channels with timm's adapt_input_conv, when only its input-channel count differs: a
    3-channel ImageNet stem for a (2K+1) x windows 2.5D input, or a one-window build."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    key = f"{first}.weight" if isinstance(first, str) else None
    if key not in sd or key not in own:
        return {}
    w, target = sd[key], own[key]
    if w.ndim != 4 or w.shape == target.shape or w.shape[0] != target.shape[0] or w.shape[2:] != target.shape[2:]:  # fmt: skip
        return {}
    return {key: timm.models.adapt_input_conv(target.shape[1], w.float()).to(target.dtype)}


def load_pretrained(model: nn.Module, spec: str | Path, min_fraction: float = 0.5) -> dict:
    """Copy every tensor whose name and shape match (the 1000-class head is skipped); the stem is
    adapted to the model's input channels (timm's adapt_input_conv), not dropped. `spec` is a
    local file or `timm:TAG` (timm_state_dict).

    Refuses weights that cover less than `min_fraction` of the model's tensors: they are for
    another architecture. Returns {'loaded', 'adapted', 'skipped', 'missing'} name lists.
    """
    spec = str(spec)
    if spec.startswith(TIMM_PREFIX):
        sd = timm_state_dict(spec[len(TIMM_PREFIX) :], model.default_cfg.get("architecture", ""))
    else:
        sd = read_state_dict(spec)
    own = model.state_dict()
    loaded = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    adapted = _adapted_stem(model, sd, own)
    loaded.update(adapted)
    if len(loaded) < min_fraction * len(own):
        raise PretrainedError(
            f"--pretrained {spec} matches only {len(loaded)} of {len(own)} tensors of this model; "
            "it holds weights for another architecture: pass weights for the --model you chose"
        )
    model.load_state_dict(loaded, strict=False)
    return {
        "loaded": sorted(loaded),
        "adapted": sorted(adapted),
        "skipped": sorted(set(sd) - set(loaded)),
        "missing": sorted(set(own) - set(loaded)),
    }
