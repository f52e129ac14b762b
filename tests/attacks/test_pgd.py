"""PGD behaviour on a fitted digits MLP, against hand-written references and torchattacks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loradar_cli.attacks import build_attack

from ._oracle import torchattacks
from .conftest import Digits, InputNoise, expected_accuracy


def reference_pgd_linf(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, noise: Tensor
) -> Tensor:
    """Textbook L-inf PGD, one sample at a time, uniform start x + (2u - 1) eps from the given noise u."""
    out = []
    for i in range(len(x)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        adv = (xi + (noise[i : i + 1] * 2 - 1) * eps).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), yi), adv)
            adv = torch.min(torch.max(adv.detach() + alpha * grad.sign(), xi - eps), xi + eps).clamp(0, 1)
        out.append(adv)
    return torch.cat(out)


def reference_pgd_l2(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, direction: Tensor, radius: Tensor
) -> Tensor:
    """Textbook L2 PGD, one sample at a time, started at radius * direction / ||direction||."""
    out = []
    for i in range(len(x)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        adv = (xi + direction[i : i + 1] / direction[i].norm() * radius[i]).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), yi), adv)
            delta = adv.detach() + alpha * grad / grad.norm() - xi
            delta = delta * min(1.0, eps / delta.norm().item())
            adv = (xi + delta).clamp(0, 1)
        out.append(adv)
    return torch.cat(out)


def test_pgd_beats_fgsm_and_collapses_accuracy(digits: Digits) -> None:
    clean = digits.accuracy(digits.x)
    fgsm = digits.accuracy(build_attack("fgsm", eps=0.15)(digits.model, digits.x, digits.y))
    pgd = digits.accuracy(build_attack("pgd", eps=0.15, alpha=0.15 / 4, seed=0)(digits.model, digits.x, digits.y))
    assert clean > 0.9
    assert pgd < fgsm - 0.05
    assert pgd < 0.15


def test_pgd_linf_equals_per_sample_reference(digits: Digits) -> None:
    model = copy.deepcopy(digits.model).double()
    x, y = digits.x[:8].double(), digits.y[:8]
    eps, alpha, steps, seed = 0.1, 0.03, 5, 3
    ours = build_attack("pgd", eps=eps, alpha=alpha, steps=steps, seed=seed)(model, x, y)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    assert torch.equal(ours, reference_pgd_linf(model, x, y, eps, alpha, steps, noise))


def test_pgd_l2_matches_per_sample_reference(digits: Digits) -> None:
    model = copy.deepcopy(digits.model).double()
    x, y = digits.x[:8].double(), digits.y[:8]
    eps, alpha, steps, seed = 1.0, 0.3, 5, 4
    ours = build_attack("pgd-l2", eps=eps, alpha=alpha, steps=steps, seed=seed)(model, x, y)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    radius = torch.rand(len(x), generator=gen, dtype=x.dtype) * eps
    expected = reference_pgd_l2(model, x, y, eps, alpha, steps, direction, radius)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
    norms = (ours - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-9).all() and (norms > 0.9 * eps).all(), "steps add up to 1.5 eps: projection binds"


def test_pgd_l2_lowers_accuracy(digits: Digits) -> None:
    x_adv = build_attack("pgd-l2", eps=1.0, alpha=0.25, seed=0)(digits.model, digits.x, digits.y)
    assert digits.accuracy(x_adv) < digits.accuracy(digits.x) - 0.4


def test_without_random_start_pgd_is_deterministic_and_starts_at_x(digits: Digits) -> None:
    one_step = build_attack("pgd", eps=0.1, alpha=0.1, steps=1, random_start=False)
    fgsm = build_attack("fgsm", eps=0.1)
    assert torch.equal(one_step(digits.model, digits.x, digits.y), fgsm(digits.model, digits.x, digits.y))


@pytest.mark.parametrize("name", ["pgd", "pgd-l2"])
def test_restarts_never_weaken_the_attack(name: str, digits: Digits) -> None:
    eps = 0.08 if name == "pgd" else 0.6
    x, y = digits.x, digits.y
    single = build_attack(name, eps=eps, steps=3, seed=5)(digits.model, x, y)
    multi = build_attack(name, eps=eps, steps=3, restarts=4, seed=5)(digits.model, x, y)
    with torch.no_grad():
        wrong_single = digits.model(single).argmax(1) != y
        wrong_multi = digits.model(multi).argmax(1) != y
    assert (wrong_multi | ~wrong_single).all(), "a sample fooled by the first restart must stay fooled"
    assert wrong_multi.sum() > wrong_single.sum()


def test_robust_accuracy_close_to_torchattacks(digits: Digits) -> None:
    """Within 1 point of torchattacks' PGD or lower, on the same model, data and budget."""
    ta = torchattacks()
    eps, alpha = 0.1, 0.025
    ours = digits.accuracy(build_attack("pgd", eps=eps, alpha=alpha, seed=0)(digits.model, digits.x, digits.y))
    torch.manual_seed(0)
    theirs = digits.accuracy(ta.PGD(digits.model, eps=eps, alpha=alpha, steps=10)(digits.x, digits.y))
    assert ours < digits.accuracy(digits.x) - 0.5
    assert ours <= theirs + 0.01, (ours, theirs)


def test_eot_lowers_robust_accuracy_of_a_randomised_model(digits: Digits) -> None:
    """Athalye et al. (arXiv:1802.00420): against input noise, averaged gradients find stronger examples."""
    model = InputNoise(digits.model, sigma=0.2)
    accuracy = {}
    for eot in (1, 20):
        torch.manual_seed(0)  # the model's noise
        x_adv = build_attack("pgd", eps=0.06, alpha=0.015, steps=10, seed=0, eot=eot)(model, digits.x, digits.y)
        assert (x_adv - digits.x).abs().amax() <= 0.06 + 1e-6
        accuracy[eot] = expected_accuracy(model, x_adv, digits.y)
    assert accuracy[20] < accuracy[1] - 0.015, accuracy  # sign steps shrug off much of the noise: a small gain
