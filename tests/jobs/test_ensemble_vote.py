"""jobs.ensemble_vote: votes and routing on stored adapters equal hand computations on naive outputs."""

import json

import numpy as np
import pytest
import torch

from loradar_cli.data import load_data
from loradar_cli.errors import InvalidValueError
from loradar_cli.jobs.ensemble_vote import vote_sets
from loradar_cli.loading import load_model
from loradar_cli.lora.layers import LoraLayer
from loradar_cli.members import adapter_models, ensemble_probs
from tests.jobs.conftest import NAMES, naive_probs


def test_ensemble_batched_path_equals_a_naive_unmerged_loop(pool, x):
    models = adapter_models(pool, None, list(NAMES))
    assert not any(isinstance(m, LoraLayer) for model in models for m in model.modules())  # ΔW folded in once
    torch.testing.assert_close(
        ensemble_probs(models, x, batch_size=5), naive_probs(pool, NAMES, x), atol=1e-5, rtol=1e-5
    )


def _hand_votes(probs: np.ndarray, weights: list[float]) -> dict[str, np.ndarray]:
    _, n, c = probs.shape
    preds = probs.argmax(-1)
    majority = []
    for j in range(n):
        counts = np.bincount(preds[:, j], minlength=c)
        tied = np.flatnonzero(counts == counts.max())
        majority.append(tied[np.argmax(probs[:, j, tied].sum(0))])
    route = probs.max(-1).argmax(0)
    return {
        "majority": np.array(majority),
        "soft": probs.mean(0).argmax(-1),
        "weighted": np.einsum("k,kbc->bc", np.array(weights) / sum(weights), probs).argmax(-1),
        "route": preds[route, np.arange(n)],
    }


def test_vote_and_route_accuracies_match_a_hand_computation(pool, tmp_path):
    out = tmp_path / "preds.json"
    weights = [0.6, 0.3, 0.1]
    report = vote_sets(
        pool,
        list(NAMES),
        methods=["majority", "weighted", "soft", "route"],
        weights=weights,
        data="digits",
        limit=40,
        out=out,
    )
    data = load_data("digits", "test", limit=40, channels=1, size=16)
    probs = naive_probs(pool, NAMES, data.x).double().numpy()
    hand = _hand_votes(probs, weights)
    y = data.y.numpy()
    row = report.sets["clean"]
    assert row.routed_to is not None and sum(row.routed_to.values()) == row.n == 40
    for method, pred in hand.items():
        assert row.accuracy[method] == pytest.approx(float((pred == y).mean())), method
    for i, name in enumerate(NAMES):
        assert row.adapters[name] == pytest.approx(float((probs[i].argmax(-1) == y).mean()))
    saved = json.loads(out.read_text())["sets"]["clean"]
    assert saved["y"] == y.tolist() and saved["methods"]["majority"] == hand["majority"].tolist()
    assert saved["routed_to"] == [NAMES[i] for i in probs.max(-1).argmax(0)]
    assert report.weighting is not None and report.weighting["source"] == "--weights"


def test_weighted_vote_defaults_to_stored_reliability(pool):
    report = vote_sets(pool, ["a", "b"], methods=["weighted"], data="digits", limit=4)
    assert report.weighting == {"weights": [0.5, 0.5], "source": "metrics.val_robust_acc"}
    assert list(report.model_dump()["sets"]["clean"]) == ["n", "attack", "accuracy", "adapters"]  # no route
    with pytest.raises(InvalidValueError, match="--data SPEC and/or --adv-set"):
        vote_sets(pool, ["a", "b"])


def test_ensemble_classifier_decides_like_the_vote_on_naive_probs(pool, x):
    from loradar_cli.jobs.ensemble_vote import load_ensemble

    weights = [0.2, 0.5, 0.3]
    ensemble = load_ensemble(pool, list(NAMES), methods=["majority", "weighted", "soft", "route"], weights=weights)
    hand = _hand_votes(naive_probs(pool, NAMES, x).double().numpy(), weights)
    for method, expected in hand.items():
        scores = ensemble.classifier(method)(x)
        assert scores.sum(-1).eq(1).all()  # one-hot decisions
        assert scores.argmax(-1).tolist() == expected.tolist(), method


def test_surrogate_is_the_mean_of_member_logits_and_has_gradients(pool, x):
    from loradar_cli.jobs.ensemble_vote import load_ensemble

    classifier = load_ensemble(pool, ["a", "c"], methods=["majority"]).classifier("majority")
    surrogate = classifier.surrogate()
    expected = torch.stack([load_model(pool, "tiny", n)(x) for n in ("a", "c")]).mean(0)
    inp = x.clone().requires_grad_(True)
    logits = surrogate(inp)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(logits.logsumexp(-1).sum(), inp)
    assert grad.abs().sum() > 0
    assert all(any(m is n for n in classifier.nets) for m in surrogate.members)  # shared, not copied


class _Mean(torch.nn.Module):
    """Independent mean of member logits."""

    def __init__(self, models):
        super().__init__()
        self.nets = torch.nn.ModuleList(models)

    def forward(self, inp):
        return torch.stack([m(inp) for m in self.nets]).mean(0)


class _LogMeanProb(_Mean):
    """Independent log of the mean member probability (the soft vote, smooth)."""

    def forward(self, inp):
        return torch.stack([m(inp).softmax(-1) for m in self.nets]).mean(0).log()


def test_vote_rows_take_the_worst_case_through_mean_logits_and_soft_vote(pool):
    """eval's soft-vote row equals FGSM crafted against an independent mean of logits and an independent soft
    vote, judged per point by the vote; route rows say they were attacked through the routed decision."""
    from loradar_cli.attacks import build_attack
    from loradar_cli.jobs.evaluate import EnsembleRows, evaluate_models

    rows = evaluate_models(
        pool,
        base="tiny",
        adapters=[],
        data="digits",
        attacks={"fgsm": {"eps": 0.1}},
        limit=30,
        ensemble=EnsembleRows(["a", "b"], ["soft", "route"]),
    )
    assert [r.model for r in rows] == ["vote:soft", "route"]
    assert rows[0].attacked == "mean logits + soft vote" and rows[1].attacked == "routed decision"
    assert [r.target for r in rows[0].records] == ["mean logits", "soft vote"]
    data = load_data("digits", "test", limit=30, channels=1, size=16)
    models = [load_model(pool, "tiny", n).eval() for n in ("a", "b")]
    survives = []
    for surrogate in (_Mean(models), _LogMeanProb(models)):
        x_adv = build_attack("fgsm", eps=0.1)(surrogate, data.x, data.y)
        with torch.no_grad():
            probs = torch.stack([m(x_adv).softmax(-1) for m in models]).double().numpy()
        survives.append(_hand_votes(probs, [1.0, 1.0])["soft"] == data.y.numpy())
    with torch.no_grad():
        clean = _hand_votes(torch.stack([m(data.x).softmax(-1) for m in models]).double().numpy(), [1.0, 1.0])
    worst = (clean["soft"] == data.y.numpy()) & survives[0] & survives[1]
    assert rows[0].worst_case == pytest.approx(float(worst.mean()))
    assert rows[0].worst_case <= min(float(s.mean()) for s in survives)


def test_routed_decision_is_differentiable_and_decides_like_route(pool, x):
    from loradar_cli.jobs.ensemble_vote import load_ensemble

    ensemble = load_ensemble(pool, list(NAMES), methods=["route"])
    (target,) = ensemble.targets("route").values()
    inp = x.clone().requires_grad_(True)
    logits = target(inp)
    hand = _hand_votes(naive_probs(pool, NAMES, x).double().numpy(), [1.0] * 3)["route"]
    assert logits.argmax(-1).tolist() == hand.tolist()
    chosen = naive_probs(pool, NAMES, x).max(-1).values.argmax(0)
    members = torch.stack([load_model(pool, "tiny", n)(x) for n in NAMES])
    torch.testing.assert_close(logits, members[chosen, torch.arange(len(x))], atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long)), inp)
    assert grad.abs().sum() > 0


def _fitted_members(k: int):
    """k MLPs fitted to sklearn digits from different seeds (8x8 inputs in [0, 1]), and held-out data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    members = []
    for seed in range(k):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        opt = torch.optim.Adam(net.parameters(), lr=0.02)
        for _ in range(60):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[:1400]), y[:1400]).backward()
            opt.step()
        members.append(net.eval())
    return members, x[1400:1600], y[1400:1600]


def test_routed_decision_attack_beats_the_mean_logit_attack_on_route():
    from loradar_cli.attacks import build_attack
    from loradar_cli.jobs.ensemble_vote import Decision, EnsembleClassifier, MeanLogits, RoutedLogits

    members, x, y = _fitted_members(3)
    names = ("m0", "m1", "m2")
    decision = Decision("route", names)
    route = EnsembleClassifier(dict(zip(names, members, strict=True)), decision)
    attack = build_attack("pgd", eps=0.06, alpha=0.015, steps=10, seed=0)

    def route_accuracy(target):
        with torch.no_grad():
            return (route(attack(target, x, y)).argmax(-1) == y).float().mean().item()

    through_route, through_mean = route_accuracy(RoutedLogits(members, decision)), route_accuracy(MeanLogits(members))
    with torch.no_grad():
        clean = (route(x).argmax(-1) == y).float().mean().item()
    print(
        f"route accuracy: clean {clean:.3f}, PGD through mean logits {through_mean:.3f}, through route {through_route:.3f}"
    )
    assert clean > 0.9 and through_mean < clean - 0.2
    assert through_route <= through_mean, (through_route, through_mean, clean)
