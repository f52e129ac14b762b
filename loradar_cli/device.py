"""Where a job runs: the device (`auto|cpu|cuda|cuda:N|mps`, env LORADAR_DEVICE), its precision and memory format.

`Engine` is the one object a job receives for this: it moves models and batches to the device, opens autocast
regions (`torch.autocast`) and builds the loss scaler fp16 needs (`torch.amp.GradScaler`), as PyTorch's automatic
mixed precision recipe does (https://pytorch.org/docs/stable/amp.html). Nothing here falls back silently: a device
that is not there is a `NotFoundError`, one line at the CLI.
"""

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from loradar_cli.distributed import World, single_process
from loradar_cli.errors import InvalidValueError, NotFoundError
from loradar_cli.registry import Registry

DEVICE_ENV = "LORADAR_DEVICE"
DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"

PRECISIONS: Registry[torch.dtype] = Registry("precision")
PRECISIONS.register("fp32")(torch.float32)
PRECISIONS.register("bf16")(torch.bfloat16)
PRECISIONS.register("fp16")(torch.float16)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | None = None) -> torch.device:
    """`spec`, else LORADAR_DEVICE, else auto (cuda, then mps, then cpu); a device that is not there is an error."""
    text = (spec or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InvalidValueError(f"unknown device {text!r}; valid: {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise InvalidValueError(f"unsupported device {text!r}; valid: {DEVICE_CHOICES}")
    _check_present(device)
    return device


def _check_present(device: torch.device) -> None:
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NotFoundError(f"device {device} is not available: torch sees no CUDA device", hint=_hint())
        if device.index is not None and device.index >= count:
            raise NotFoundError(f"device {device} is not available: torch sees {count} CUDA device(s)", hint=_hint())
    elif device.type == "mps" and not _mps_available():
        raise NotFoundError("device mps is not available: torch.backends.mps.is_available() is False", hint=_hint())


def _hint() -> str:
    return f"use --device cpu or auto (or set {DEVICE_ENV})"


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a precision name; fp16 and bf16 must be usable on `device`."""
    dtype = PRECISIONS.get(precision)
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidValueError(f"--precision bf16 is not supported by {torch.cuda.get_device_name(device)}")
    return dtype


@dataclass(frozen=True)
class Engine:
    """Device, precision, memory format, loader workers and process group of one job."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    channels_last: bool = False
    workers: int = 0
    world: World = field(default_factory=single_process)

    def __post_init__(self) -> None:
        check_precision(self.precision, self.device)
        if self.workers < 0:
            raise InvalidValueError(f"--workers must be >= 0, got {self.workers}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS.get(self.precision)

    @property
    def pin_memory(self) -> bool:
        """Page-locked host batches make host-to-GPU copies asynchronous; they only help CUDA."""
        return self.device.type == "cuda"

    def model(self, model: nn.Module) -> nn.Module:
        """Move a model to the device (NHWC weights with channels_last), in place; returns it."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def batch(self, x: Tensor) -> Tensor:
        """Move a batch to the device; images `[B, C, H, W]` become NHWC with channels_last."""
        x = x.to(self.device, non_blocking=self.pin_memory)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> AbstractContextManager[Any]:
        """An autocast region in this engine's precision (a no-op for fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scaler(self) -> "torch.amp.GradScaler":
        """A gradient scaler, active only for fp16 (bf16 has fp32's exponent range and needs none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def describe(self) -> dict[str, Any]:
        """JSON-ready: device, precision, memory format, workers and world size."""
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "workers": self.workers,
            "world_size": self.world.size,
        }

    def record(self, wall: float, images: int) -> dict[str, Any]:
        """`describe()` plus wall seconds and images per second of a job that processed `images` images."""
        return {**self.describe(), "wall_s": round(wall, 3), "images_per_s": round(images / max(wall, 1e-9), 2)}


_ACTIVE: ContextVar["Engine | None"] = ContextVar("loradar_engine", default=None)


@contextmanager
def using(engine: Engine) -> Iterator[Engine]:
    """Make `engine` the active one for jobs that take no engine argument (the combination jobs)."""
    token = _ACTIVE.set(engine)
    try:
        yield engine
    finally:
        _ACTIVE.reset(token)


def active_engine() -> Engine:
    """The engine of the enclosing `using` block, else the CPU."""
    return _ACTIVE.get() or Engine()


def engine_for(
    device: str | None = None, precision: str = "fp32", *, channels_last: bool = False, workers: int = 0
) -> Engine:
    """Resolve a device spec and, under torchrun, join the process group (one GPU per local rank on CUDA)."""
    from loradar_cli.distributed import init_from_env

    resolved = resolve_device(device)
    world = init_from_env(resolved)
    if resolved.type == "cuda" and world.size > 1:
        resolved = torch.device("cuda", world.local_rank)
        _check_present(resolved)
    return Engine(resolved, precision, channels_last, workers, world)
