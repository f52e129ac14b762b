"""ops.identify_adaptive: the extra-logit objective, and the adaptive attack hiding the family on a tiny model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loradar_cli.attacks import build_attack
from loradar_cli.errors import InvalidValueError
from loradar_cli.ops.identify import fit_identifier
from loradar_cli.ops.identify_adaptive import EvadeIdentifier, hidden_probability
from loradar_cli.ops.identify_features import FeatureInputs, compute_features

GROUPS = ("residual", "frequency")


def _tiny_classifier(seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net.eval()


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Smooth random images in [0.2, 0.8] (low residual energy, so a sign attack's noise is easy to see)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 2, 2, generator=gen)
    return 0.2 + 0.6 * F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)


def _probabilities(identifier, name):
    """Identifier class probabilities from one member's probabilities and the input (input features only)."""

    def fn(probs, x):
        return identifier.predict_proba(compute_features(GROUPS, FeatureInputs(probs[name][None], x)))

    return fn


def test_extra_logit_adds_softplus_of_the_identifier_term_to_the_cross_entropy():
    """CE over [z, e] = CE(z, y) − w·log q for every label (q: the hidden classes' total), computed independently."""
    torch.manual_seed(0)
    z = torch.randn(5, 4)
    class_probs = torch.softmax(torch.randn(5, 3), dim=-1)
    decision = nn.Identity()
    evade = EvadeIdentifier(decision, {}, lambda probs, x: class_probs, hidden=[1, 2], weight=0.7)
    out = evade(z)
    q = class_probs[:, 1] + class_probs[:, 2]
    for label in range(4):
        y = torch.full((5,), label)
        expected = F.cross_entropy(z, y, reduction="none") - 0.7 * q.log()
        torch.testing.assert_close(F.cross_entropy(out, y, reduction="none"), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :4], z)


def test_hidden_probability_and_bad_settings():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(hidden_probability(probs, [0, 1]), torch.tensor([0.8, 1e-6]))
    with pytest.raises(InvalidValueError):
        hidden_probability(probs, [])
    with pytest.raises(InvalidValueError):
        EvadeIdentifier(nn.Identity(), {}, lambda p, x: probs, hidden=[0], weight=-1.0)
    z = torch.randn(2, 3)
    assert torch.equal(EvadeIdentifier(nn.Identity(), {}, lambda p, x: probs, hidden=[0], weight=0.0)(z), z)


def test_adaptive_pgd_lowers_the_identifiers_probability_of_pgd_at_the_same_budget():
    """An identifier fitted to tell clean from PGD inputs; PGD through EvadeIdentifier keeps the eps budget and
    leaves the identifier less sure it is PGD than plain PGD does (could fail if the term had no effect)."""
    model = _tiny_classifier(0)
    x_fit, x_test = _smooth_images(96, 1), _smooth_images(48, 2)
    pgd = build_attack("pgd", eps=0.06, alpha=0.01, steps=10, seed=0)

    def features(x):
        with torch.no_grad():
            probs = model(x).softmax(-1)[None]
        return compute_features(GROUPS, FeatureInputs(probs, x))

    y_fit = model(x_fit).argmax(-1).detach()
    adv_fit = pgd(model, x_fit, y_fit)
    identifier = fit_identifier(
        torch.cat([features(x_fit), features(adv_fit)]), ["clean"] * len(x_fit) + ["pgd"] * len(x_fit)
    )
    pgd_index = identifier.classes.index("pgd")
    evade = EvadeIdentifier(model, {"m": model}, _probabilities(identifier, "m"), hidden=[pgd_index], weight=10.0)
    y = model(x_test).argmax(-1).detach()
    plain, adaptive = pgd(model, x_test, y), pgd(evade, x_test, y)
    assert (adaptive - x_test).abs().max() <= 0.06 + 1e-6
    q_plain = identifier.predict_proba(features(plain))[:, pgd_index]
    q_adaptive = identifier.predict_proba(features(adaptive))[:, pgd_index]
    assert q_plain.mean() > 0.9, q_plain.mean()  # the identifier sees plain PGD
    assert q_adaptive.mean() < q_plain.mean() - 0.2, (q_adaptive.mean(), q_plain.mean())


def test_fia_taps_the_same_member_layers_through_the_objective_as_through_the_decision():
    """FIA's loss does not see the identifier term: through EvadeIdentifier it must equal FIA on the decision."""
    from loradar_cli.jobs.ensemble_vote import MeanLogits

    members = [_tiny_classifier(1), _tiny_classifier(2)]
    decision = MeanLogits(members)
    evade = EvadeIdentifier(decision, {}, lambda probs, x: torch.full((len(x), 2), 0.5), hidden=[0], weight=1.0)
    x = _smooth_images(6, 3)
    y = decision(x).argmax(-1).detach()
    fia = build_attack("fia", eps=0.05, steps=3, layer="1", seed=0)
    torch.testing.assert_close(
        fia(evade, x, y), build_attack("fia", eps=0.05, steps=3, layer="1", seed=0)(decision, x, y)
    )
