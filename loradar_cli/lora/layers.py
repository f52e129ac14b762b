"""LoRA wrappers for nn.Linear and nn.Conv2d with exact merge/unmerge (PEFT's factor layout).

Linear: ΔW = s·B·A with A [r, in], B [out, r]. Conv2d: A is a conv with the base kernel, stride, padding,
dilation, padding_mode and groups ([r, in/g, kh, kw]); B is a grouped 1×1 conv ([out, r/g, 1, 1]); so
ΔW for group g is s·B_g·A_g reshaped to the kernel. s = lora_alpha / r. A starts random, B at zero.

Two optional extras serve recipes whose LoRA does not start at B = 0 (ungrouped layers only):
- a frozen residual pair (A₀, B₀): the layer computes W₀ + s·(B·A − B₀·A₀), i.e. the frozen residual
  W₀ − s·B₀·A₀ plus the trainable product; the branch runs as one rank-2r LoRA [B, −B₀]·[A; A₀], the very
  factors the adapter is stored with, so a reload reproduces the trained logits bit for bit;
- a trainable scalar `lora_scale` α multiplying B (folded into the stored B);
- `generated` factors (A, B), shaped like the layer's own, that replace them (a hypernetwork's output).
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loradar_cli.errors import IncompatibleError


class LoraLayer(nn.Module):
    """Common state of a LoRA wrapper: the frozen base layer, factors A and B, scale and merge flag."""

    base_layer: nn.Module
    lora_A: nn.Module
    lora_B: nn.Module

    def _init_common(self, base_layer: nn.Module, r: int, lora_alpha: float, dropout: float) -> None:
        if r < 1:
            raise IncompatibleError(f"LoRA rank must be >= 1, got {r}")
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True  # False skips the LoRA branch (a training-only branch, as in AutoLoRa)
        self.generated: tuple[Tensor, Tensor] | None = None  # (A, B) produced elsewhere, e.g. by a hypernetwork
        self.register_buffer("lora_A0", None, persistent=False)
        self.register_buffer("lora_B0", None, persistent=False)
        self.register_parameter("lora_scale", None)
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (as PEFT), B zero: the adapted model starts equal to the base, gradients flow."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def plain(self) -> bool:
        """Whether the layer is a plain LoRA (no residual pair, no trainable scale)."""
        return self.lora_A0 is None and self.lora_scale is None and self.generated is None

    def set_residual(self, a0: Tensor, b0: Tensor) -> None:
        """Freeze (A₀, B₀), shaped like (A, B): from now on the layer computes W₀ + s·(B·A − B₀·A₀)."""
        if getattr(self.base_layer, "groups", 1) != 1:
            raise IncompatibleError("a residual LoRA pair needs an ungrouped layer")
        self.lora_A0 = a0.detach().clone().to(self.lora_A.weight)
        self.lora_B0 = b0.detach().clone().to(self.lora_B.weight)

    def add_scale(self, value: float = 1.0) -> nn.Parameter:
        """A trainable scalar α on the product: ΔW = s·α·B·A (plus the residual pair, if any)."""
        weight = self.lora_B.weight
        self.lora_scale = nn.Parameter(torch.full((), float(value), device=weight.device, dtype=weight.dtype))
        return self.lora_scale

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) as the layer applies them: [A; A₀] and [α·B, −B₀] with the extras, else the plain factors."""
        a, b = self.generated if self.generated is not None else (self.lora_A.weight, self.lora_B.weight)
        if self.lora_scale is not None:
            b = b * self.lora_scale
        if self.lora_A0 is not None:
            a = torch.cat([a, self.lora_A0])
            b = torch.cat([b, -self.lora_B0], dim=1)
        return a, b

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def _branch(self, x: Tensor) -> Tensor:
        """B·A·x with the factors of `factors()` (the same kernels a plain layer of that rank runs)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·ΔW into the base weight (forward then skips the LoRA branch)."""
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s·ΔW again, restoring the base weight to float tolerance."""
        if self.merged:
            self.base_layer.weight.sub_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out
        if self.plain:
            return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return out + self._branch(self.lora_dropout(x)) * self.scaling


class LoraLinear(LoraLayer):
    """y = W0·x + b + s·B·A·x."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self._init_common(base_layer, r, lora_alpha, dropout)
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def delta_weight(self) -> Tensor:
        a, b = self.factors()
        return (b @ a) * self.scaling

    def _branch(self, x: Tensor) -> Tensor:
        a, b = self.factors()
        return F.linear(F.linear(x, a), b)


class LoraConv2d(LoraLayer):
    """y = conv(x, W0) + s·conv1x1(conv(x, A), B), with A sharing the base geometry."""

    def __init__(self, base_layer: nn.Conv2d, r: int, lora_alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        groups = base_layer.groups
        if r % groups:
            raise IncompatibleError(
                f"LoRA rank {r} is not divisible by the conv's groups ({groups}); "
                "exclude grouped/depthwise convs or pick a rank that is a multiple of groups"
            )
        self._init_common(base_layer, r, lora_alpha, dropout)
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        self.lora_A = nn.Conv2d(
            base_layer.in_channels,
            r,
            base_layer.kernel_size,
            stride=base_layer.stride,
            padding=base_layer.padding,
            dilation=base_layer.dilation,
            groups=groups,
            bias=False,
            padding_mode=base_layer.padding_mode,
            device=device,
            dtype=dtype,
        )
        self.lora_B = nn.Conv2d(r, base_layer.out_channels, 1, groups=groups, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def delta_weight(self) -> Tensor:
        a, b = self.factors()
        return conv_delta(a, b, self.base_layer.groups) * self.scaling

    def _branch(self, x: Tensor) -> Tensor:
        a, b = self.factors()
        return F.conv2d(self.lora_A._conv_forward(x, a, None), b, None, 1, 0, 1, self.base_layer.groups)


def conv_delta(a: Tensor, b: Tensor, groups: int = 1) -> Tensor:
    """B·A for conv factors A [r, in/g, kh, kw] and B [out, r/g, 1, 1] -> kernel [out, in/g, kh, kw]."""
    r, in_per_group, kh, kw = a.shape
    out = b.shape[0]
    a_g = a.reshape(groups, r // groups, in_per_group * kh * kw)
    b_g = b.reshape(groups, out // groups, r // groups)
    return torch.bmm(b_g, a_g).reshape(out, in_per_group, kh, kw)


def functional_forward(layer: LoraLayer, x: Tensor) -> Tensor:
    """Reference forward with the merged weight W0 + s·ΔW (used by tests and merged evaluation)."""
    base = layer.base_layer
    weight = base.weight + layer.delta_weight()
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    if base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        return F.conv2d(x, weight, base.bias, base.stride, 0, base.dilation, base.groups)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


@contextmanager
def lora_switched(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Every LoRA branch of `model` on or off inside the block, restored afterwards."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = enabled
    try:
        yield model
    finally:
        for layer, flag in zip(layers, saved, strict=True):
            layer.enabled = flag


LORA_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {nn.Linear: LoraLinear, nn.Conv2d: LoraConv2d}
