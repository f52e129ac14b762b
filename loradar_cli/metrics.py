"""Predictions and accuracy: the one place training, evaluation and the combination jobs measure a model.

It sits below `recipes`, `evaluation` and the store, so the training loop can score a model without reaching the
store. `Progress` is the one progress-callback type every job accepts.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@contextmanager
def model_mode(model: nn.Module, mode: Literal["eval", "train"]) -> Iterator[nn.Module]:
    """Put every module in `mode` and restore each module's own `training` flag afterwards.

    A model already wholly in `mode` is left alone: `nn.Module.train` recurses in Python, which costs more than
    a small model's forward pass (about 1.5 ms for a timm ViT), and predictions run once per batch.
    """
    want = mode == "train"
    changed = [module for module in model.modules() if module.training != want]
    if changed:
        model.train(want)
    try:
        yield model
    finally:
        for module in changed:
            module.training = not want


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Logits [N, C] on `x`'s device, in eval mode, batched on the model's device; the model's mode is restored."""
    device = next((p.device for p in model.parameters()), x.device)
    with model_mode(model, "eval"):
        if not len(x):
            return x.new_zeros(0)
        return torch.cat([model(x[i : i + batch_size].to(device)).to(x.device) for i in range(0, len(x), batch_size)])


def correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    """Per-point flags: whether the model's top-1 prediction equals the label."""
    if not len(x):
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    return predict_logits(model, x, batch_size).argmax(1) == y


def mean_flag(flags: Tensor) -> float:
    """The fraction of true flags (0 for none): accuracy from per-point correctness."""
    return flags.float().mean().item() if len(flags) else 0.0


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Fraction of `x` the model classifies as `y` (0 for no inputs)."""
    return mean_flag(correct(model, x, y, batch_size))


def prediction_accuracy(pred: Tensor, y: Tensor) -> float:
    """Fraction of predicted labels equal to the true ones (0 for none)."""
    return mean_flag(pred == y)
