"""Shared attack maths: model-mode handling, input gradients, projections and random starts.

Every helper works on batches `[B, C, H, W]` in [0, 1] with per-sample norms, and takes gradients w.r.t. the
input only (`torch.autograd.grad`), so parameter `.grad` is never touched.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]

_TINY = 1e-12  # guards divisions by per-sample norms that can be exactly zero


def ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy: per-sample input gradients do not shrink with the batch size."""
    return F.cross_entropy(logits, y, reduction="sum")


def grad_wrt(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Gradient of the scalar `fn(x)` w.r.t. `x` alone (a fresh leaf, so no parameter gradient is stored)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(fn(x), x)
    return grad.detach()


def input_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = ce_sum) -> Tensor:
    """d loss_fn(model(x), y) / dx, `[B, C, H, W]`; the default loss is CE summed over the batch."""
    return grad_wrt(x, lambda inp: loss_fn(model(inp), y))


def losses_grad_logits(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-sample losses `[B]`, gradient of their sum w.r.t. `x`, logits), all from one forward and backward."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        losses = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), grad.detach(), logits.detach()


def eot_input_grad(model: nn.Module, x: Tensor, y: Tensor, samples: int = 1) -> Tensor:
    """`input_grad` averaged over `samples` passes (EOT, see `eot_losses_grad_logits`); one pass when 1."""
    grad = input_grad(model, x, y)
    for _ in range(samples - 1):
        grad += input_grad(model, x, y)
    return grad / samples if samples > 1 else grad


def eot_losses_grad_logits(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], samples: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """`losses_grad_logits` averaged over `samples` forward/backward passes: Expectation over Transformation.

    Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security: Circumventing Defenses to
    Adversarial Examples", ICML 2018, arXiv:1802.00420, section 4.3: against a randomised model, ascend the
    expected loss, whose gradient is the mean of the per-draw gradients. Losses and logits are averaged too (the
    reference APGD keeps the last draw's), so step-size decisions and "fooled" see the expectation as well.
    """
    losses, grad, logits = losses_grad_logits(model, x, y, loss_fn)
    for _ in range(samples - 1):
        more = losses_grad_logits(model, x, y, loss_fn)
        losses, grad, logits = losses + more[0], grad + more[1], logits + more[2]
    return (losses / samples, grad / samples, logits / samples) if samples > 1 else (losses, grad, logits)


def ce_each(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy `[B]`."""
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample z_y - max_{j != y} z_j `[B]`: negative exactly when the point is misclassified."""
    z_y = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return z_y - others.amax(1)


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """Untargeted DLR loss `[B]`: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3), pi sorting the logits descending.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks", ICML 2020, arXiv:2003.01690, eq. (6); shift- and scale-invariant in the logits.
    """
    top = logits.sort(dim=1, descending=True).values
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + _TINY)


def dlr_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR loss `[B]`: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (arXiv:2003.01690, eq. (7))."""
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + _TINY)


def per_sample(t: Tensor) -> Tensor:
    """Reshape a per-sample statistic `[B]` to broadcast against `[B, ...]` of the same rank as images."""
    return t.view(-1, 1, 1, 1)


def l2_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm over all non-batch dimensions, `[B]`."""
    return t.flatten(1).norm(p=2, dim=1)


def normalize_l2(t: Tensor) -> Tensor:
    """Scale each sample to unit L2 norm (all-zero samples stay zero)."""
    return t / l2_norm(t).clamp_min(_TINY).view(-1, *([1] * (t.dim() - 1)))


def clamp01(x: Tensor) -> Tensor:
    """Clip to the valid pixel range."""
    return x.clamp(0.0, 1.0)


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the L-inf ball of radius `eps` around `x`, intersected with [0, 1]."""
    return clamp01(torch.min(torch.max(x_adv, x - eps), x + eps))


def project_l2(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the per-sample L2 ball of radius `eps` around `x`, then clip to [0, 1] (clipping only shrinks)."""
    delta = x_adv - x
    factor = (eps / l2_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
    return clamp01(x + delta * per_sample(factor))


_POINT_STREAMS: ContextVar[list[torch.Generator] | None] = ContextVar("point_streams", default=None)


@contextmanager
def point_streams(seeds: Sequence[int]) -> Iterator[None]:
    """Inside the block, noise for a batch of `len(seeds)` points draws point i's part from a generator seeded by
    `seeds[i]` (on the CPU), so a point's random start does not depend on the other points of its batch.

    Training seeds each point by (run seed, epoch, point index): its starts are then the same whether the batch is
    split over processes or a run resumed from a checkpoint. Draws of another leading size use `generator`.
    """
    token = _POINT_STREAMS.set([torch.Generator().manual_seed(int(s) % 2**63) for s in seeds])
    try:
        yield
    finally:
        _POINT_STREAMS.reset(token)


def _noise(shape: torch.Size, x: Tensor, generator: torch.Generator | None, normal: bool) -> Tensor:
    """U[0, 1) or N(0, 1) noise of `shape` on `x`'s device and dtype, per point inside `point_streams`."""
    draw = torch.randn if normal else torch.rand
    streams = _POINT_STREAMS.get()
    if streams is not None and len(shape) and shape[0] == len(streams):
        return torch.stack([draw(shape[1:], generator=g) for g in streams]).to(x.device, x.dtype)
    return draw(shape, generator=generator, device=x.device, dtype=x.dtype)


def uniform(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) noise shaped like `x`, drawn from `generator` (global RNG when None)."""
    return _noise(x.shape, x, generator, normal=False)


def gaussian(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, 1) noise shaped like `x`, drawn from `generator` (global RNG when None)."""
    return _noise(x.shape, x, generator, normal=True)


def random_init_linf(x: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """Uniform start in the L-inf ball (Madry et al.), clipped to [0, 1]."""
    return clamp01(x + (uniform(x, generator) * 2 - 1) * eps)


def random_init_l2(x: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """Start at a uniformly random direction with radius U[0, eps] (torchattacks' PGDL2 convention), clipped."""
    direction = normalize_l2(gaussian(x, generator))
    radius = _noise(x.shape[:1], x, generator, normal=False) * eps
    return clamp01(x + direction * per_sample(radius))


@torch.no_grad()
def attack_strength(model: nn.Module, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (misclassified, CE loss) used to rank candidate adversarial examples."""
    logits = model(x_adv)
    return logits.argmax(1) != y, F.cross_entropy(logits, y, reduction="none")


def best_of_restarts(model: nn.Module, y: Tensor, run: Callable[[], Tensor], restarts: int) -> Tensor:
    """Run `run()` `restarts` times and keep, per sample, a misclassified result, else the highest-loss one."""
    best = run()
    if restarts == 1:
        return best
    best_wrong, best_loss = attack_strength(model, best, y)
    for _ in range(restarts - 1):
        cand = run()
        wrong, loss = attack_strength(model, cand, y)
        better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        best = torch.where(per_sample(better), cand, best)
        best_wrong, best_loss = torch.where(better, wrong, best_wrong), torch.where(better, loss, best_loss)
    return best
