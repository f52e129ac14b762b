"""jobs.attack_target: sets crafted against an ensemble's decision, the adaptive attacker, and eval's adaptive row."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loradar_cli.advset import load_adv_set
from loradar_cli.attacks import build_attack
from loradar_cli.data import load_data
from loradar_cli.errors import InvalidValueError
from loradar_cli.identifier import load_identifier
from loradar_cli.jobs.attack import craft_adv_set
from loradar_cli.jobs.attack_target import (
    ADAPTIVE_ROUTE,
    AttackTarget,
    EnsembleSpec,
    EvasionSpec,
    build_target,
    craft_against,
)
from loradar_cli.jobs.ensemble_vote import Decision, EnsembleClassifier, RoutedLogits
from loradar_cli.jobs.fit_identifier import fit_identifier_from_sets
from loradar_cli.loading import load_model
from loradar_cli.ops.identify_adaptive import EvadeIdentifier


class _Fixed(nn.Module):
    """Ignores its input; its logits name a fixed class per point."""

    def __init__(self, classes: list[int]) -> None:
        super().__init__()
        self.classes = torch.tensor(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.classes, 3).float()


class _Lambda(nn.Module):
    """A module around a function (attacks take modules)."""

    def __init__(self, fn, models) -> None:
        super().__init__()
        self.fn, self.models = fn, nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _Judge(nn.Module):
    """Predicts class 0 for inputs equal to 0 and class 1 otherwise (per point)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = (x.flatten(1).abs().sum(1) > 0).long()
        return F.one_hot(moved, 3).float()


def test_craft_against_keeps_per_point_the_first_example_that_fools_the_judge():
    """Target one moves points 0 and 1 (fooling the judge), target two moves point 2: each keeps its first fooler."""
    x, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    first, second = _Fixed([0, 0, 0]), _Fixed([0, 0, 0])

    def attack(model, inp, labels):
        out = inp.clone()
        for i in [0, 1] if model is first else [1, 2]:
            out[i] = 0.5 if model is first else 0.25
        return out

    target = AttackTarget(_Judge(), {"one": first, "two": second})
    x_adv = craft_against(attack, target, x, y)
    assert x_adv[:, 0, 0, 0].tolist() == [0.5, 0.5, 0.25]
    single = AttackTarget(_Judge(), {"one": first})
    assert craft_against(attack, single, x, y)[:, 0, 0, 0].tolist() == [0.5, 0.5, 0.0]


def test_set_crafted_against_the_soft_vote_is_fgsm_through_both_surrogates_judged_by_the_vote(pool, tmp_path):
    """The set equals FGSM through an independent mean of logits, then (where the vote still holds) through an
    independent log mean probability; its recorded accuracy is the soft vote's on it."""
    path = tmp_path / "soft.safetensors"
    _, acc = craft_adv_set(
        pool, path, base="tiny", attack="fgsm", data="digits", attack_options={"eps": 0.1}, limit=20,
        ensemble=EnsembleSpec(["a", "b"], "soft"),
    )  # fmt: skip
    data = load_data("digits", "test", limit=20, channels=1, size=16)
    models = [load_model(pool, "tiny", n).eval() for n in ("a", "b")]

    def soft_vote(inp):
        return torch.stack([m(inp).softmax(-1) for m in models]).mean(0)

    fgsm = build_attack("fgsm", eps=0.1)
    through_mean = fgsm(_Lambda(lambda inp: torch.stack([m(inp) for m in models]).mean(0), models), data.x, data.y)
    through_soft = fgsm(_Lambda(lambda inp: soft_vote(inp).log(), models), data.x, data.y)
    with torch.no_grad():
        fooled = soft_vote(through_mean).argmax(-1) != data.y
        expected = torch.where(fooled[:, None, None, None], through_mean, through_soft)
        expected_acc = (soft_vote(expected).argmax(-1) == data.y).float().mean().item()
    adv = load_adv_set(path)
    torch.testing.assert_close(adv.x, expected, atol=1e-6, rtol=0)
    assert acc == pytest.approx(expected_acc)
    assert adv.info["target"]["decision"] == "soft" and adv.info["target"]["through"] == ["mean logits", "soft vote"]


@pytest.fixture(scope="module")
def ident(pool, adv_files):
    """An identifier 'ida' fitted on FGSM and PGD sets crafted against the base."""
    fit_identifier_from_sets(
        pool, ["a", "b"], name="ida", adv_sets=adv_files, data="digits", split="val", limit=24, epochs=150,
        features=["confidence", "residual"],
    )  # fmt: skip
    return load_identifier(pool, "ida")


def test_evasion_targets_hide_the_attack_family_and_refuse_unknown_ones(pool, ident):
    spec = EnsembleSpec(["a", "b"], "route", "ida")
    target = build_target(pool, "tiny", ensemble=spec, evade=EvasionSpec("ida", "pgd", 2.0))
    (name, model), = target.targets.items()  # fmt: skip
    assert name == "routed decision + evading ida" and isinstance(model, EvadeIdentifier)
    assert model.hidden == [ident.meta.classes.index("pgd")] and model.weight == 2.0
    assert isinstance(model.decision, RoutedLogits) and target.info["evades"]["family"] == "pgd"
    with pytest.raises(InvalidValueError, match="clean, fgsm, pgd"):
        build_target(pool, "tiny", ensemble=spec, evade=EvasionSpec("ida", "roa"))
    with pytest.raises(InvalidValueError, match="not both"):
        build_target(pool, "tiny", adapter="a", ensemble=spec)


def test_eval_adaptive_route_row_is_fgsm_on_the_routed_loss_plus_the_identifier_term(pool, ident):
    """eval --route --identifier adds the adaptive row: FGSM on CE(routed logits) − log q(attack classes),
    computed here from the routed decision and the identifier's probabilities, judged by route."""
    from loradar_cli.jobs.evaluate import EnsembleRows, evaluate_models

    rows = evaluate_models(
        pool, base="tiny", adapters=[], data="digits", attacks={"fgsm": {"eps": 0.1}}, limit=30,
        ensemble=EnsembleRows(["a", "b"], ["route"], identifier="ida"),
    )  # fmt: skip
    assert [r.model for r in rows] == ["route", ADAPTIVE_ROUTE]
    assert rows[1].attacked == "routed decision + evading ida"
    data = load_data("digits", "test", limit=30, channels=1, size=16)
    names = ["a", "b"]
    members = [load_model(pool, "tiny", n).eval() for n in names]
    readers = {"a": members[0], "b": members[1], ":base": load_model(pool, "tiny").eval()}
    decision = Decision("route", tuple(names), router=ident)
    routed = RoutedLogits(members, decision, extra={":base": readers[":base"]})
    attack_classes = [i for i, c in enumerate(ident.meta.classes) if c != "clean"]
    x = data.x.clone().requires_grad_(True)
    probs = {n: m(x).softmax(-1) for n, m in readers.items()}
    q = ident.probabilities(probs, x)[:, attack_classes].sum(1).clamp(1e-6, 1 - 1e-6)
    loss = F.cross_entropy(routed(x), data.y, reduction="sum") - q.log().sum()
    (grad,) = torch.autograd.grad(loss, x)
    x_adv = (data.x + 0.1 * grad.sign()).clamp(0, 1)
    route = EnsembleClassifier(dict(zip(names, members, strict=True)) | {":base": readers[":base"]}, decision)
    with torch.no_grad():
        clean_ok = route(data.x).argmax(-1) == data.y
        adv_ok = route(x_adv).argmax(-1) == data.y
    assert rows[1].clean == pytest.approx(clean_ok.float().mean().item())
    assert rows[1].worst_case == pytest.approx((clean_ok & adv_ok).float().mean().item())
