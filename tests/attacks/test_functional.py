"""Shared helpers: mode restore on errors, input-only gradients, per-sample projections and restarts."""

import pytest
import torch
from torch import Tensor, nn

from loradar_cli.attacks._functional import (
    best_of_restarts,
    input_grad,
    model_mode,
    point_streams,
    project_l2,
    project_linf,
    random_init_l2,
    random_init_linf,
)


def test_model_mode_restores_each_module_even_on_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(), nn.Linear(2, 2)))
    model.train()
    model[1].eval()
    with pytest.raises(RuntimeError), model_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
        raise RuntimeError
    assert [m.training for m in model.modules()] == [True, True, False, False, False]


def test_input_grad_is_per_sample_and_leaves_parameters_alone() -> None:
    model = nn.Linear(3, 2)
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 0, 1])
    grad = input_grad(model, x, y)
    single = input_grad(model, x[:1], y[:1])
    torch.testing.assert_close(grad[:1], single)  # summed loss: no 1/B scaling
    assert all(p.grad is None for p in model.parameters())


def test_projections_respect_balls_and_keep_inner_points() -> None:
    x = torch.rand(3, 2, 4, 4)
    far = torch.rand(3, 2, 4, 4)
    assert (project_linf(far, x, 0.1) - x).abs().max() <= 0.1 + 1e-7
    l2 = (project_l2(far, x, 0.5) - x).flatten(1).norm(dim=1)
    assert (l2 <= 0.5 + 1e-6).all()
    near = (x + 1e-3 * torch.randn_like(x)).clamp(0, 1)
    torch.testing.assert_close(project_l2(near, x, 0.5), near)
    for start in (random_init_linf(x, 0.1), random_init_l2(x, 0.5)):
        assert start.min() >= 0 and start.max() <= 1 and not torch.equal(start, x)
    assert ((random_init_l2(x, 0.5) - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()


def test_best_of_restarts_prefers_misclassified_then_higher_loss() -> None:
    model = nn.Flatten()  # logits = the two "pixels"
    y = torch.tensor([0, 0])
    runs = iter(
        [
            torch.tensor([[0.9, 0.1], [0.9, 0.1]]).view(2, 2, 1, 1),  # both correct
            torch.tensor([[0.2, 0.8], [0.6, 0.4]]).view(2, 2, 1, 1),  # sample 0 fooled; sample 1 higher loss
            torch.tensor([[0.4, 0.6], [0.8, 0.2]]).view(2, 2, 1, 1),  # fooled but lower loss; sample 1 weaker
        ]
    )

    def run() -> Tensor:
        return next(runs)

    best = best_of_restarts(model, y, run, restarts=3)
    torch.testing.assert_close(best.flatten(1), torch.tensor([[0.2, 0.8], [0.6, 0.4]]))


def test_point_streams_give_each_point_its_start_whatever_its_batch() -> None:
    """Inside `point_streams` a point's noise depends on its seed only: split batches give the whole batch's starts."""
    from loradar_cli.attacks import build_attack

    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    seeds = [11, 12, 13, 14, 15, 16]
    with point_streams(seeds):
        whole = torch.cat([random_init_linf(x, 0.1), random_init_l2(x, 0.5)])
    with point_streams(seeds[::2]):
        even = torch.cat([random_init_linf(x[::2], 0.1), random_init_l2(x[::2], 0.5)])
    with point_streams(seeds[1::2]):
        odd = torch.cat([random_init_linf(x[1::2], 0.1), random_init_l2(x[1::2], 0.5)])
    assert torch.equal(whole[:6][::2], even[:3]) and torch.equal(whole[:6][1::2], odd[:3])
    assert torch.equal(whole[6:][::2], even[3:]) and torch.equal(whole[6:][1::2], odd[3:])  # successive draws too
    assert not torch.equal(whole[0] - x[0], whole[1] - x[1])  # distinct seeds, distinct starts
    assert ((whole[:6] - x).abs().amax() <= 0.1 + 1e-6) and ((whole[:6] - x).abs().amax() > 0.05)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    pgd = build_attack("pgd", eps=0.1, alpha=0.02, steps=2)  # unseeded: without streams, the global RNG
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with point_streams(seeds):
        full = pgd(model, x, y)
    with point_streams(seeds[:2]):
        head = pgd(model, x[:2], y[:2])
    torch.testing.assert_close(full[:2], head, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    a = random_init_linf(x, 0.1)
    with point_streams(seeds[:2]):  # another leading size: the usual generator
        torch.manual_seed(0)
        b = random_init_linf(x, 0.1)
    assert torch.equal(a, b)
