"""ROA: rectangular occlusion attack, a physically realisable sticker.

Wu, Tong, Vorobeychik, "Defending Against Physically Realizable Attacks on Image Classification",
ICLR 2020, arXiv:1909.09552; official code `tongwu2020/phattacks` (`ROA/ROA.py`).
Threat model ("patch"): one axis-aligned h x w rectangle per sample; pixels outside it are unchanged, pixels
inside are free in [0, 1]. `eps` (default 1, i.e. unconstrained as in the paper) optionally bounds the
L-inf change inside the rectangle; `eps = 0` returns `x`.

Choices:
* Grid positions are `row = 0, s, ..., ` up to and *including* `H - h` (likewise columns). The official code's
  `range((size - h) // s)` omits the last row and column of positions, so a sticker can never touch the
  bottom/right border; we keep them (this is also what `avg_pool2d` computes for the gradient scores).
* The exhaustive fallback to a random position fires when >= 90 % of the positions tie with the best loss
  or the best loss is 0 [code; the code counts ties with the running maximum, we count ties with the final one].
* `height`/`width` left unset scale the CIFAR-10 default 5 x 5 with the image: round(5 / 32 * side),
  i.e. 5 at 32 px and 35 at 224 px (about 2.4 % of the image). unverified for ImageNet-size inputs.
* Defaults [code, CIFAR-10 DOA training]: stride 1, alpha 0.05, 30 steps, C = 20 gradient candidates. The
  official evaluation uses 150 steps and C = 50.
"""

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.attacks._functional import input_grad, per_sample, project_linf
from loradar_cli.attacks.base import Attack, AttackConfig, ThreatModel, Tracker, register_attack, tracked_ascent
from loradar_cli.errors import InvalidValueError

GREY = 0.5  # sticker colour before the inside-rectangle PGD, 127.5/255 in the official code


class ROAConfig(AttackConfig):
    """ROA options; rectangle sizes in pixels, `max_batch` caps images per forward pass in the search."""

    eps: float = Field(1.0, ge=0)
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    stride: int = Field(1, ge=1)
    search: Literal["gradient", "exhaustive"] = "gradient"
    candidates: int = Field(20, ge=1)
    alpha: float = Field(0.05, gt=0)
    steps: int = Field(30, ge=1)
    max_batch: int = Field(1024, ge=1)


def _scaled_side(side: int) -> int:
    """The CIFAR-10 5-pixel sticker side scaled to an image side, half rounded up."""
    return max(1, int(side * 5 / 32 + 0.5))


def rectangle_size(config: ROAConfig, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the sticker for `height x width` images; rejects stickers larger than the image."""
    h = config.height or _scaled_side(height)
    w = config.width or _scaled_side(width)
    if h > height or w > width:
        raise InvalidValueError(f"ROA rectangle {h}x{w} does not fit in {height}x{width} images")
    return h, w


def grid_shape(height: int, width: int, h: int, w: int, stride: int) -> tuple[int, int]:
    """Number of (rows, columns) of sticker positions, last position included."""
    return (height - h) // stride + 1, (width - w) // stride + 1


def rectangle_mask(top: Tensor, left: Tensor, h: int, w: int, height: int, width: int) -> Tensor:
    """Boolean masks `[*top.shape, height, width]`, True inside the h x w rectangle at (top, left)."""
    rows = torch.arange(height, device=top.device)
    cols = torch.arange(width, device=top.device)
    in_rows = (rows >= top[..., None]) & (rows < top[..., None] + h)
    in_cols = (cols >= left[..., None]) & (cols < left[..., None] + w)
    return in_rows[..., :, None] & in_cols[..., None, :]


@torch.no_grad()
def _grey_losses(
    model: nn.Module, x: Tensor, y: Tensor, top: Tensor, left: Tensor, size: tuple[int, int], max_batch: int
) -> Tensor:
    """Per-sample CE `[K, B]` with a grey sticker at (top[k, b], left[k, b]); K positions batched in chunks."""
    batch, _, height, width = x.shape
    chunk = max(1, max_batch // batch)
    losses = []
    for start in range(0, top.shape[0], chunk):
        mask = rectangle_mask(top[start : start + chunk], left[start : start + chunk], *size, height, width)
        stickered = torch.where(mask[:, :, None], GREY, x[None])  # [k, B, C, H, W]
        logits = model(stickered.flatten(0, 1))
        k = mask.shape[0]
        losses.append(F.cross_entropy(logits, y.repeat(k), reduction="none").view(k, batch))
    return torch.cat(losses)


@register_attack
class ROA(Attack[ROAConfig]):
    """Find a sticker position (gradient or exhaustive search), then run PGD inside the sticker only."""

    name: ClassVar[str] = "roa"
    threat_model: ClassVar[ThreatModel] = "patch"
    config_cls: ClassVar[type[AttackConfig]] = ROAConfig

    def patch_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the sticker this attack places on `height x width` images."""
        return rectangle_size(self.config, height, width)

    def _generate(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        mask = self._sticker(model, x, y, generator)
        x_adv = project_linf(torch.where(mask, GREY, x), x, self.config.eps)
        for _ in range(self.config.steps):
            x_adv = self._inside_step(x_adv, x, input_grad(model, x_adv, y), mask)
        return torch.where(mask, x_adv, x)

    def _generate_tracked(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None, tracker: Tracker
    ) -> Tensor:
        """The search and the sticker PGD on the active points only; a point fooled by an iterate stops there."""
        idx, out = tracker.remaining(), x.clone()
        if not len(idx):
            return out
        mask = self._sticker(model, x[idx], y[idx], generator, draws=(len(x), idx))
        start = project_linf(torch.where(mask, GREY, x[idx]), x[idx], self.config.eps)
        out[idx] = tracked_ascent(
            model, x[idx], y[idx], start, tracker, idx, self.config.steps,
            lambda x_adv, x0, grad, rows: self._inside_step(x_adv, x0, grad, mask[rows]),
        )  # fmt: skip
        return out

    def _sticker(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None,
        draws: tuple[int, Tensor] | None = None,
    ) -> Tensor:
        """Boolean sticker masks `[B, 1, H, W]` at the searched positions (`draws`: see `_exhaustive_search`)."""
        size = self.patch_size(x.shape[2], x.shape[3])
        if self.config.search == "exhaustive":
            index = self._exhaustive_search(model, x, y, size, generator, draws)
        else:
            index = self._gradient_search(model, x, y, size)
        top, left = self._position(index, x, size)
        return rectangle_mask(top, left, *size, x.shape[2], x.shape[3])[:, None]

    def _position(self, index: Tensor, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Flat grid indices -> (top, left) pixel coordinates."""
        _, nx = grid_shape(x.shape[2], x.shape[3], *size, self.config.stride)
        return (index // nx) * self.config.stride, (index % nx) * self.config.stride

    def _exhaustive_search(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        size: tuple[int, int],
        generator: torch.Generator | None,
        draws: tuple[int, Tensor] | None = None,
    ) -> Tensor:
        """Grey-sticker CE at every grid position; arg-max per sample, random where the losses are flat.

        `draws = (n, rows)`: the random positions are drawn for a batch of n points and rows `rows` used, so a
        point's draw does not depend on which others an early-stopping run still attacks.
        """
        ny, nx = grid_shape(x.shape[2], x.shape[3], *size, self.config.stride)
        index = torch.arange(ny * nx, device=x.device)[:, None].expand(-1, x.shape[0])  # [P, B]
        losses = _grey_losses(model, x, y, *self._position(index, x, size), size, self.config.max_batch)
        best, arg = losses.max(dim=0)
        flat = (losses == best).float().mean(dim=0) >= 0.9
        n, rows = draws or (len(x), torch.arange(len(x), device=x.device))
        fallback = torch.randint(ny * nx, (n,), generator=generator, device=x.device)[rows]
        return torch.where(flat | (best == 0), fallback, arg)

    def _gradient_search(self, model: nn.Module, x: Tensor, y: Tensor, size: tuple[int, int]) -> Tensor:
        """Top-C positions by input-gradient energy inside the sticker, then the best grey-sticker CE among them."""
        grad = input_grad(model, x, y)
        grad = grad / per_sample(grad.abs().flatten(1).amax(dim=1).clamp_min(1e-12))
        energy = grad.square().sum(dim=1, keepdim=True)
        scores = F.avg_pool2d(energy, size, stride=self.config.stride).flatten(1) * (size[0] * size[1])  # [B, P]
        top_c = scores.topk(min(self.config.candidates, scores.shape[1]), dim=1).indices.T  # [C, B]
        losses = _grey_losses(model, x, y, *self._position(top_c, x, size), size, self.config.max_batch)
        return top_c.gather(0, losses.argmax(dim=0)[None])[0]

    def _inside_step(self, x_adv: Tensor, x: Tensor, grad: Tensor, mask: Tensor) -> Tensor:
        """One signed-gradient ascent step on CE inside the sticker, clipped to [0, 1] and eps."""
        return project_linf(torch.where(mask, x_adv + self.config.alpha * grad.sign(), x_adv), x, self.config.eps)
