"""FIA: feature-layer choice, hook hygiene, the aggregate gradient, and that it hurts a fitted model."""

import copy

import pytest
import timm
import torch
from torch import Tensor, nn

from loradar_cli.attacks import FIA, FIAConfig, build_attack, default_feature_layer
from loradar_cli.attacks.fia import feature_layers, resolve_layer
from loradar_cli.errors import InvalidValueError, NotFoundError
from loradar_cli.models import ImageClassifier

from .conftest import Digits, make_resnet


def wrap(model: nn.Module) -> nn.Module:
    return ImageClassifier(model, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


@pytest.mark.parametrize(
    ("arch", "kwargs", "expected"),
    [
        ("test_resnet", {}, "layer2"),
        ("test_convnext", {}, "stages.1"),
        ("test_vit", {"img_size": 32}, "blocks.3"),
        ("test_efficientnet", {}, "blocks.2"),  # 5 stages
    ],
)
def test_default_layer_bare_and_wrapped(arch: str, kwargs: dict, expected: str) -> None:
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
    assert default_feature_layer(model) == expected
    assert default_feature_layer(wrap(model)) == f"model.{expected}"


def test_default_layer_falls_back_to_middle_child() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert default_feature_layer(mlp) == "3"
    assert default_feature_layer(wrap(mlp)) == "model.3"


def test_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(NotFoundError) as err:
        resolve_layer(make_resnet(), "layer9")
    assert "layer9" in err.value.message and "layer" in (err.value.hint or "")


def test_hook_removed_after_success_and_failure(images: tuple[Tensor, Tensor]) -> None:
    model = make_resnet()
    x_adv = build_attack("fia", ensemble=2, steps=2, seed=0)(model, *images)
    assert not torch.equal(x_adv, images[0])
    assert all(not m._forward_hooks for m in model.modules())

    class TupleOut(nn.Module):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x, x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair, self.head = TupleOut(), nn.Linear(3 * 4 * 4, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.pair(x)[0].flatten(1))

    net = Net()
    with pytest.raises(InvalidValueError, match="must output a tensor"):
        build_attack("fia", layer="pair", ensemble=2, steps=1)(net, torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))
    assert not net.pair._forward_hooks


def test_aggregate_gradient_is_normalised_logit_gradient_without_dropout(digits: Digits) -> None:
    model, x, y = digits.model, digits.x[:5], digits.y[:5]
    layer = resolve_layer(model, "3")
    feature = model[:4](x).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(model[4:](feature).gather(1, y[:, None]).sum(), feature)
    expected = expected / expected.norm(dim=1, keepdim=True)
    for max_batch in (5, 1000):  # one mask per forward pass, then all masks in one pass
        attack = FIA(FIAConfig(drop_prob=0.0, ensemble=4, max_batch=max_batch))
        (importance,) = attack._aggregate_gradient(model, [layer], x, y, None)
        torch.testing.assert_close(importance, expected)


def test_fia_on_an_ensemble_of_copies_equals_fia_on_the_model(digits: Digits) -> None:
    """Mean logits of two identical members: every tapped layer gets the same share, so the attack is unchanged."""
    from loradar_cli.jobs.ensemble_vote import MeanLogits

    ensemble = MeanLogits([digits.model, copy.deepcopy(digits.model)])
    assert len(feature_layers(ensemble, "3")) == 2
    single = build_attack("fia", eps=0.15, ensemble=6, steps=4, layer="3", seed=0)(
        digits.model, digits.x[:8], digits.y[:8]
    )
    joint = build_attack("fia", eps=0.15, ensemble=6, steps=4, layer="3", seed=0)(ensemble, digits.x[:8], digits.y[:8])
    torch.testing.assert_close(joint, single, atol=1e-5, rtol=0)


def test_fia_lowers_accuracy_of_fitted_model(digits: Digits) -> None:
    x_adv = build_attack("fia", eps=0.15, ensemble=10, seed=0)(digits.model, digits.x, digits.y)
    assert (x_adv - digits.x).abs().max() <= 0.15 + 1e-6
    assert digits.accuracy(x_adv) < digits.accuracy(digits.x) - 0.5


def test_fia_runs_on_a_vit(images: tuple[Tensor, Tensor]) -> None:
    torch.manual_seed(0)
    vit = wrap(timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=16, patch_size=4))
    x, y = images
    x_adv = build_attack("fia", ensemble=2, steps=2, seed=0)(vit, x, y)
    assert 0 < (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert not vit.model.blocks[3]._forward_hooks
