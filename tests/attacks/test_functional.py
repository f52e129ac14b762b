"""Shared helpers: input-only gradients, per-sample projections and restarts."""

import torch
from torch import Tensor, nn

from loradar_cli.attacks._functional import (
    best_of_restarts,
    ce_each,
    eot_input_grad,
    eot_losses_grad_logits,
    input_grad,
    point_streams,
    project_l2,
    project_linf,
    random_init_l2,
    random_init_linf,
)


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


class RandomLinear(nn.Module):
    """Logits (W + noise) x: each pass draws fresh noise, so each pass has its own input gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 12))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ (self.w + torch.randn_like(self.w)).T


def test_eot_averages_loss_gradient_and_logits_over_the_draws() -> None:
    model, x, y = RandomLinear(), torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(7)
    losses, grad, logits = eot_losses_grad_logits(model, x, y, ce_each, samples=4)
    torch.manual_seed(7)  # the same four draws, each differentiated by hand: d CE / dx = (softmax - onehot) W
    draws = [model.w.detach() + torch.randn_like(model.w) for _ in range(4)]
    flat = x.flatten(1)
    each = [flat @ w.T for w in draws]
    onehot = nn.functional.one_hot(y, 3).float()
    by_hand = [((z.softmax(1) - onehot) @ w).view_as(x) for z, w in zip(each, draws, strict=True)]
    assert torch.allclose(grad, torch.stack(by_hand).mean(0), atol=1e-5)
    assert torch.allclose(logits, torch.stack(each).mean(0), atol=1e-5)
    assert torch.allclose(losses, torch.stack([ce_each(z, y) for z in each]).mean(0), atol=1e-5)
    assert not torch.allclose(by_hand[0], by_hand[1], atol=1e-3), "the draws must differ for the test to mean much"
    assert model.w.grad is None
    torch.manual_seed(7)
    assert torch.allclose(eot_input_grad(model, x, y, samples=4), grad, atol=1e-5), "summed CE, same draws"


def test_eot_on_a_deterministic_model_is_one_plain_pass() -> None:
    model, x, y = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    assert torch.equal(eot_input_grad(model, x, y, samples=1), input_grad(model, x, y))
    assert torch.allclose(eot_input_grad(model, x, y, samples=3), input_grad(model, x, y), atol=1e-6)
