"""ROA: the sticker lands where the loss is, stays one rectangle, and the search rules hold."""

import pytest
import torch
from torch import Tensor, nn

from benchmarks import Counting
from loradar_cli.attacks import ROAConfig, build_attack
from loradar_cli.attacks.roa import GREY, grid_shape, rectangle_size
from loradar_cli.errors import InvalidValueError

from .conftest import changed_box


class PlantedRegion(nn.Module):
    """Two-class model whose class-0 logit is 10 x the mean of one h x w region: grey there hurts the most."""

    def __init__(self, top: int, left: int, h: int, w: int) -> None:
        super().__init__()
        self.region = (slice(top, top + h), slice(left, left + w))

    def forward(self, x: Tensor) -> Tensor:
        logit = 10 * x[:, :, self.region[0], self.region[1]].mean(dim=(1, 2, 3))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


class Constant(nn.Module):
    """Logits that ignore the input (zero gradient, equal loss at every sticker position)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], 2) + 0 * x.sum(dim=(1, 2, 3))[:, None]


def bright_images(batch: int = 3, size: int = 16) -> tuple[Tensor, Tensor]:
    x = 0.75 + 0.25 * torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return x, torch.zeros(batch, dtype=torch.long)


def changed_corner(x_adv: Tensor, x: Tensor) -> list[tuple[int, int]]:
    """Per sample, (top, left) of the changed pixels."""
    corners = []
    for changed in (x_adv != x).any(dim=1):
        corners.append((int(changed.any(dim=1).nonzero().min()), int(changed.any(dim=0).nonzero().min())))
    return corners


@pytest.mark.parametrize("search", ["exhaustive", "gradient"])
@pytest.mark.parametrize("corner", [(6, 9), (13, 12)])  # (13, 12) is the last grid position for 3 x 4 in 16 x 16
def test_search_finds_planted_region(search: str, corner: tuple[int, int]) -> None:
    x, y = bright_images()
    model = PlantedRegion(*corner, 3, 4)
    attack = build_attack("roa", height=3, width=4, search=search, steps=3, candidates=5, max_batch=64)
    x_adv = attack(model, x, y)
    assert changed_corner(x_adv, x) == [corner] * len(x)
    assert changed_box(x_adv, x) == [(3, 4)] * len(x)
    assert (model(x_adv)[:, 0] < model(x)[:, 0]).all(), "PGD inside the sticker must push the true logit down"


def test_exhaustive_chunking_does_not_change_the_result() -> None:
    x, y = bright_images()
    model = PlantedRegion(2, 5, 3, 3)
    small = build_attack("roa", height=3, width=3, search="exhaustive", steps=2, max_batch=1)(model, x, y)
    large = build_attack("roa", height=3, width=3, search="exhaustive", steps=2, max_batch=10_000)(model, x, y)
    assert torch.equal(small, large)


def test_flat_loss_falls_back_to_seeded_random_positions() -> None:
    x, y = torch.ones(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)
    attack = build_attack("roa", height=3, width=3, search="exhaustive", steps=2, seed=0)
    x_adv = attack(Constant(), x, y)
    corners = changed_corner(x_adv, x)
    assert len(set(corners)) > 1, "ties everywhere must give random positions, not always the first one"
    assert torch.equal(x_adv[x_adv != x], torch.full_like(x_adv[x_adv != x], GREY)), "zero gradient: stays grey"
    assert torch.equal(
        build_attack("roa", height=3, width=3, search="exhaustive", steps=2, seed=0)(Constant(), x, y), x_adv
    )


def test_eps_bounds_the_change_inside_the_sticker() -> None:
    x, y = bright_images()
    x_adv = build_attack("roa", eps=0.1, height=3, width=3, steps=3)(PlantedRegion(4, 4, 3, 3), x, y)
    assert 0 < (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert all(box is not None and box[0] <= 3 and box[1] <= 3 for box in changed_box(x_adv, x))


def test_rectangle_size_scales_with_image_and_rejects_oversize() -> None:
    assert rectangle_size(ROAConfig(), 32, 32) == (5, 5)
    assert rectangle_size(ROAConfig(), 224, 224) == (35, 35)
    assert rectangle_size(ROAConfig(height=7, width=2), 32, 32) == (7, 2)
    assert grid_shape(32, 32, 5, 5, 1) == (28, 28)
    assert grid_shape(224, 224, 70, 70, 10) == (16, 16)
    with pytest.raises(InvalidValueError, match="does not fit"):
        rectangle_size(ROAConfig(height=40), 32, 32)


def test_early_stop_gives_the_same_flags_with_less_work(digits) -> None:
    """A point fooled by a sticker iterate keeps it and leaves the PGD; the flags equal the run to the end."""
    x, y = digits.x[:60], digits.y[:60]
    counted = Counting(digits.model)
    results, seen = {}, {}
    for early in (True, False):
        counted.seen = 0
        attack = build_attack("roa", height=2, width=2, eps=0.5, steps=20, alpha=0.05, candidates=4, seed=0)
        results[early] = attack.until_fooled(counted, x, y, early_stop=early)
        seen[early] = counted.seen
    (stop_x, stop), (full_x, full) = results[True], results[False]
    assert torch.equal(stop, full) and stop.any() and not stop.all()
    assert torch.equal(stop_x, full_x), "fooled points keep their first fooling iterate, the others the last one"
    with torch.no_grad():
        assert torch.equal(stop, digits.model(stop_x).argmax(1) != y)
    assert changed_box(stop_x[stop], x[stop]) and all(h <= 2 and w <= 2 for h, w in changed_box(stop_x, x))
    assert seen[True] < 0.9 * seen[False], seen


def test_exhaustive_fallback_draws_do_not_depend_on_the_other_active_points() -> None:
    """Flat losses send every point to a random position, drawn for the whole batch, so a subset gets the same."""
    x, y = bright_images(batch=6)
    attack = build_attack("roa", height=3, width=3, search="exhaustive", steps=1, seed=3)
    active = torch.tensor([False, True, False, True, True, False])
    part_x, _ = attack.until_fooled(Constant(), x, y, active=active, early_stop=False)
    all_x, _ = build_attack("roa", height=3, width=3, search="exhaustive", steps=1, seed=3).until_fooled(
        Constant(), x, y, early_stop=False
    )
    assert torch.equal(part_x[~active], x[~active])
    assert changed_corner(part_x[active], x[active]) == changed_corner(all_x[active], x[active])
    assert len(set(changed_corner(all_x, x))) > 1, "the positions are random, not one fixed fallback"
