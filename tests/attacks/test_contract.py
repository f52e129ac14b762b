"""Invariants every registered attack must satisfy (new attacks are picked up from the registry)."""

import pickle

import pytest
import torch
from torch import Tensor, nn

from loradar_cli.attacks import ATTACKS, Attack, attack_names, build_attack
from loradar_cli.errors import InvalidValueError, NotFoundError

from .conftest import changed_box

# Shortened schedules keep the suite fast; options an attack does not have are left out.
FAST = {"steps": 3, "ensemble": 3, "restarts": 2, "candidates": 3, "queries": 5, "targets": 2}
ITERATIONS = {"queries": 50, "targets": 2, "steps": 10}  # caps iteration counts that make default configs slow


def fast_attack(name: str, **options: object) -> Attack:
    fields = ATTACKS.get(name).config_cls.model_fields
    return build_attack(name, **{k: v for k, v in FAST.items() if k in fields}, **options)


def assert_within_threat_model(attack: Attack, x_adv: Tensor, x: Tensor) -> None:
    delta = x_adv - x
    if attack.threat_model == "linf":
        assert delta.abs().max() <= attack.config.eps + 1e-6
    elif attack.threat_model == "l2":
        assert (delta.flatten(1).norm(dim=1) <= attack.config.eps + 1e-5).all()
    else:
        h, w = attack.patch_size(x.shape[2], x.shape[3])
        for box in changed_box(x_adv, x):
            assert box is not None and box[0] <= h and box[1] <= w


def test_every_module_of_the_package_registers_its_attack() -> None:
    """Attacks register by existing: each public module of loradar_cli.attacks contributes one name."""
    import pkgutil

    import loradar_cli.attacks as package

    modules = [
        m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_") and m.name != "base"
    ]
    registered_modules = {cls.__module__.rsplit(".", 1)[1] for cls in map(ATTACKS.get, ATTACKS.names())}
    assert registered_modules == set(modules)
    assert tuple(attack_names()) == tuple(ATTACKS.names())


@pytest.mark.parametrize("name", ATTACKS.names())
def test_output_contract(name: str, resnet: nn.Module, images: tuple[Tensor, Tensor]) -> None:
    x, _ = images
    with torch.no_grad():
        y = resnet(x).argmax(1)  # points classified right: a minimal-distortion attack leaves wrong ones as they are
    x_before = x.clone()
    attack = fast_attack(name, seed=0)
    x_adv = attack(resnet, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x, x_before), "the input must not be modified in place"
    assert not torch.equal(x_adv, x), "the attack must perturb the input"
    assert_within_threat_model(attack, x_adv, x)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_default_config_within_threat_model(name: str, resnet: nn.Module, images: tuple[Tensor, Tensor]) -> None:
    x, y = images[0][:2], images[1][:2]
    cls = ATTACKS.get(name)
    budget = {k: v for k, v in ITERATIONS.items() if k in cls.config_cls.model_fields}  # defaults for all else
    attack = cls(cls.config_cls(**budget))
    assert_within_threat_model(attack, attack(resnet, x, y), x)


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if "eps" in ATTACKS.get(n).config_cls.model_fields])
def test_eps_zero_returns_input(name: str, resnet: nn.Module, images: tuple[Tensor, Tensor]) -> None:
    x, y = images
    assert torch.equal(fast_attack(name, eps=0.0)(resnet, x, y), x)


@pytest.mark.parametrize("start", ["train", "eval"])
@pytest.mark.parametrize("name", ATTACKS.names())
def test_eval_mode_during_attack_and_flags_restored(
    name: str, start: str, resnet: nn.Module, images: tuple[Tensor, Tensor]
) -> None:
    resnet.train(start == "train")
    resnet.layer1.train(start != "train")  # a submodule deliberately in the other mode
    before = {n: m.training for n, m in resnet.named_modules()}
    running_mean = resnet.bn1.running_mean.clone()
    seen: list[bool] = []
    handle = resnet.bn1.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    try:
        fast_attack(name, seed=0)(resnet, *images)
    finally:
        handle.remove()
    assert seen and not any(seen), "BatchNorm must run in eval mode while the attack runs"
    assert {n: m.training for n, m in resnet.named_modules()} == before
    assert torch.equal(resnet.bn1.running_mean, running_mean)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_no_parameter_grad(name: str, resnet: nn.Module, images: tuple[Tensor, Tensor]) -> None:
    assert all(p.requires_grad for p in resnet.parameters())
    fast_attack(name, seed=0)(resnet, *images)
    assert all(p.grad is None for p in resnet.parameters())


@pytest.mark.parametrize("name", ATTACKS.names())
def test_seed_determinism_and_global_rng_untouched(name: str, resnet: nn.Module, images: tuple[Tensor, Tensor]) -> None:
    state = torch.random.get_rng_state()
    first = fast_attack(name, seed=123)(resnet, *images)
    assert torch.equal(torch.random.get_rng_state(), state), "a seeded attack must not draw from the global RNG"
    assert torch.equal(fast_attack(name, seed=123)(resnet, *images), first)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_works_under_no_grad(name: str, resnet: nn.Module, images: tuple[Tensor, Tensor]) -> None:
    x, _ = images
    with torch.no_grad():
        y = resnet(x).argmax(1)  # as in test_output_contract
    attack = fast_attack(name, seed=0)
    with torch.no_grad():
        x_adv = attack(resnet, x, y)
    assert torch.equal(x_adv, fast_attack(name, seed=0)(resnet, x, y))
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_describe_round_trips_and_object_is_frozen(name: str) -> None:
    attack = fast_attack(name, seed=7)
    meta = attack.describe()
    assert meta["name"] == name and meta["threat_model"] in ("linf", "l2", "patch")
    assert build_attack(meta["name"], **meta["config"]) == attack
    assert pickle.loads(pickle.dumps(attack)) == attack
    with pytest.raises(AttributeError):
        attack.config = attack.config  # type: ignore[misc]


def test_build_attack_errors_are_one_line() -> None:
    with pytest.raises(InvalidValueError) as unknown:
        build_attack("pgd", epsilon=0.1)
    assert "epsilon" in unknown.value.message and "eps" in unknown.value.message.split("valid:")[1]
    with pytest.raises(InvalidValueError) as negative:
        build_attack("pgd", eps=-0.1, steps=0)
    message = negative.value.message
    assert "\n" not in message and "eps" in message and "steps" in message
    with pytest.raises(NotFoundError, match=r"valid: .*fgsm"):
        build_attack("nope")


def test_rejects_inputs_outside_contract(resnet: nn.Module, images: tuple[Tensor, Tensor]) -> None:
    x, y = images
    attack = build_attack("fgsm")
    with pytest.raises(InvalidValueError, match=r"\[0, 1\]"):
        attack(resnet, x * 2, y)
    with pytest.raises(InvalidValueError, match="labels"):
        attack(resnet, x, y[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ATTACKS.names())
def test_cuda_device_and_seeded_generator(name: str, resnet: nn.Module, images: tuple[Tensor, Tensor]) -> None:
    model, (x, y) = resnet.cuda(), (t.cuda() for t in images)
    x_adv = fast_attack(name, seed=0)(model, x, y)
    assert x_adv.device == x.device and torch.equal(fast_attack(name, seed=0)(model, x, y), x_adv)
    assert_within_threat_model(fast_attack(name, seed=0), x_adv, x)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_until_fooled_flags_describe_the_examples_and_early_stop_changes_nothing(name: str, digits) -> None:
    """Flags equal the model's verdict on the returned examples; stopping fooled points early gives equal flags."""
    if name == "roa":
        pytest.skip("ROA's default sticker does not fit 8x8 digits; covered by the resnet contract tests")
    x, y = digits.x[:40], digits.y[:40]
    eps = {"linf": 0.06, "l2": 0.4, "patch": 1.0}[ATTACKS.get(name).threat_model]
    stop_x, stop = fast_attack(name, eps=eps, seed=0).until_fooled(digits.model, x, y, early_stop=True)
    full_x, full = fast_attack(name, eps=eps, seed=0).until_fooled(digits.model, x, y, early_stop=False)
    with torch.no_grad():
        assert torch.equal(stop, digits.model(stop_x).argmax(1) != y)
        assert torch.equal(full, digits.model(full_x).argmax(1) != y)
    assert torch.equal(stop, full) and stop.any() and not stop.all()
    assert torch.equal(stop_x[stop], full_x[full]), "both keep each point's first fooling example"
    assert_within_threat_model(fast_attack(name, eps=eps), stop_x, x)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_active_points_get_the_same_result_whoever_else_is_attacked(
    name: str, resnet: nn.Module, images: tuple[Tensor, Tensor]
) -> None:
    x, y = images
    active = torch.tensor([True, False, True, False])
    part_x, part = fast_attack(name, seed=0).until_fooled(resnet, x, y, active=active, early_stop=False)
    all_x, every = fast_attack(name, seed=0).until_fooled(resnet, x, y, early_stop=False)
    assert torch.equal(part_x[~active], x[~active]) and not part[~active].any(), "inactive points are left alone"
    torch.testing.assert_close(part_x[active], all_x[active], rtol=0, atol=1e-6)
    assert torch.equal(part[active], every[active])
