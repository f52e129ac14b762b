"""timm models with normalisation inside: every model in loradar takes images in [0, 1].

A *base* is a fitted timm model plus what is needed to rebuild it exactly (timm name, kwargs, input size,
mean/std) and a sha256 fingerprint of its weights that adapters are bound to.
"""

import hashlib
import logging
import math
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loradar_cli.errors import CorruptError, InvalidValueError, NotFoundError
from loradar_cli.signals import import_held


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers are not persistent so checkpoints hold only the timm weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Normalize -> timm model. `model` is the plain timm module, so LoRA names match PEFT's on that model."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))


# kwargs loradar sets itself (or through a dedicated option): a --model-kwarg may not override them
RESERVED_KWARGS = {
    "num_classes": "the data's classes set it",
    "in_chans": "use --in-chans",
    "pretrained": "use --pretrained",
    "checkpoint_path": "use --checkpoint FILE",
    "pretrained_cfg": "use --pretrained",
    "pretrained_cfg_overlay": "use --checkpoint FILE",
    "features_only": "loradar needs a classifier",
}
HUB_HOST = "huggingface.co"


def check_model_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse kwargs loradar owns, and check the common numeric ones (rates in [0, 1), img_size whole >= 1)."""
    out = dict(kwargs)
    for key, value in out.items():
        if key in RESERVED_KWARGS:
            raise InvalidValueError(f"model kwarg {key} is set by loradar", hint=RESERVED_KWARGS[key])
        if key.endswith("_rate") and not _is_number(value, lambda v: 0 <= v < 1):
            raise InvalidValueError(f"model kwarg {key} must be a number in [0, 1), got {value!r}")
        if key == "img_size":
            sides = value if isinstance(value, (list, tuple)) and len(value) == 2 else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sides):
                raise InvalidValueError(f"model kwarg img_size must be a whole number >= 1 (or two), got {value!r}")
    return out


def _is_number(value: Any, test: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and test(value)


def create_timm_model(
    name: str, *, num_classes: int, in_chans: int, pretrained: bool = False, kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """timm.create_model with one-line errors: unknown names, rejected kwargs, pretrained weights out of reach."""
    timm = import_held("timm")

    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise NotFoundError(f"unknown timm model {name!r}", hint=f"similar: {', '.join(close)}" if close else None)
    kwargs = check_model_kwargs(kwargs or {})
    try:
        with _hub(pretrained):
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as err:  # timm and its builders raise TypeError, ValueError, AssertionError, RuntimeError, ...
        detail = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if pretrained and isinstance(err, OSError):
            raise NotFoundError(
                f"cannot get timm's pretrained weights for {name!r} ({detail[:160]})",
                hint="--pretrained needs network access or the Hugging Face cache; --checkpoint FILE uses local weights",
            ) from None
        raise InvalidValueError(f"timm model {name!r} rejected its arguments: {detail[:200]}") from None


@contextmanager
def _hub(pretrained: bool) -> Iterator[None]:
    """Quiet Hugging Face Hub downloads; offline (cache only, no minute of retries) when the hub is unreachable."""
    if not pretrained:
        yield
        return
    import huggingface_hub.constants as hub

    logger = logging.getLogger("huggingface_hub")
    offline, level = hub.HF_HUB_OFFLINE, logger.level
    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
    except OSError:
        hub.HF_HUB_OFFLINE = True
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = offline
        logger.setLevel(level)


def pretrained_stats(model: nn.Module, in_chans: int) -> tuple[list[float], list[float]] | None:
    """mean/std from timm's pretrained_cfg, averaged to one channel for grayscale inputs."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if not mean or not std:
        return None
    if in_chans == len(mean):
        return list(mean), list(std)
    if in_chans == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return None


def weights_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and raw bytes: identifies a base's exact weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_checkpoint(path: Path) -> dict[str, Tensor]:
    """Weights from safetensors, or from .pt/.pth through torch.load(weights_only=True) only."""
    if not path.is_file():
        raise NotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in (".pt", ".pth", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            if not isinstance(state, dict):
                raise CorruptError(f"{path} does not hold a state dict")
            return state
    except (CorruptError, NotFoundError):
        raise
    except Exception as err:
        raise CorruptError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    raise InvalidValueError(f"checkpoint {path} must be .safetensors, .pt or .pth")


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Strict load with one readable line on mismatch."""
    try:
        result = model.load_state_dict(dict(state), strict=False)
    except RuntimeError as err:
        raise CorruptError(f"{source} does not fit the model: {str(err).splitlines()[1:2] or err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CorruptError(
            f"{source} does not fit the model: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model
