"""Fixtures for the attack tests: an untrained timm test_resnet and a tiny MLP fitted to sklearn digits."""

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@pytest.fixture(scope="package", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the test machine's few cores are shared, and oversubscription is far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_resnet(seed: int = 0) -> nn.Module:
    """timm test_resnet, 10 classes, random weights (parameters require grad)."""
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=3)


def changed_box(x_adv: Tensor, x: Tensor) -> list[tuple[int, int] | None]:
    """Per sample, (height, width) of the bounding box of changed pixels (any channel), None if unchanged."""
    boxes = []
    for changed in (x_adv != x).any(dim=1):
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        boxes.append(
            None if rows.numel() == 0 else (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
        )
    return boxes


@pytest.fixture
def resnet() -> nn.Module:
    return make_resnet()


@pytest.fixture
def images() -> tuple[Tensor, Tensor]:
    """4 random 16x16 RGB images in [0, 1] with labels."""
    gen = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)


@dataclass(frozen=True)
class Digits:
    model: nn.Module  # eval mode, [B, 1, 8, 8] in [0, 1] -> 10 logits
    x: Tensor  # held-out images
    y: Tensor

    def accuracy(self, x: Tensor) -> float:
        with torch.no_grad():
            return (self.model(x).argmax(1) == self.y).float().mean().item()


@pytest.fixture(scope="package")
def digits() -> Digits:
    """An MLP fitted to sklearn digits in about a second (held-out accuracy about 95 %)."""
    return fit_digits()


def fit_digits() -> Digits:
    """An MLP fitted to sklearn digits in about a second (held-out accuracy about 95 %)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:1600]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    model.eval()
    digits = Digits(model, x[test], y[test])
    assert digits.accuracy(digits.x) > 0.9
    return digits


class InputNoise(nn.Module):
    """A randomised defence: Gaussian noise added to the input on every forward pass, eval mode included."""

    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


def expected_accuracy(model: nn.Module, x: Tensor, y: Tensor, passes: int = 8, seed: int = 1) -> float:
    """Accuracy of a randomised model averaged over `passes` seeded draws."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return torch.stack([(model(x).argmax(1) == y).float() for _ in range(passes)]).mean().item()
