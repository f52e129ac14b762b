"""ops.identify: the LoRADAR rule on cases with known answers, features, the calibrated identifier, metrics."""

import math

import numpy as np
import pytest
import torch

from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError
from loradar_cli.ops.identify import (
    UNKNOWN,
    IdentifierModel,
    accuracy,
    balanced_accuracy,
    calibrate_rejection,
    clean_confidence_stats,
    confusion_matrix,
    fit_identifier,
    identify_relative,
    identify_rule,
    identity_feature_names,
    identity_features,
    per_class_scores,
    relative_confidence,
    select_feature_groups,
    stratified_split,
)

LABELS = ["clean", "pgd", "fia"]


def _probs(confidences: list[list[float]]) -> torch.Tensor:
    """probs [K, B, 2] whose max over classes is the given confidence per adapter and input."""
    conf = torch.tensor(confidences)
    return torch.stack([conf, 1 - conf], dim=-1)


def test_identify_rule_known_answers():
    probs = _probs(
        [
            [0.55, 0.90, 0.60, 0.70],  # adapter 0: clean
            [0.60, 0.70, 0.62, 0.50],  # adapter 1: pgd
            [0.95, 0.50, 0.65, 0.72],  # adapter 2: fia
        ]
    )
    # input 0: fia leads by 0.35; input 1: clean adapter leads by 0.2; input 2: lead 0.03 <= 0.1; input 3: lead 0.02.
    assert identify_rule(probs, LABELS, clean_index=0) == ["fia", "clean", "unknown", "unknown"]
    assert identify_rule(probs, LABELS, margin=0.01, clean_index=0)[2:] == ["fia", "fia"]
    assert identify_rule(probs, ["base", "pgd", "fia"], clean_label="none", clean_index=0)[1] == "none"
    assert identify_rule(probs, LABELS)[1] == "clean"  # without clean_index the adapter's own label
    assert identify_rule(probs[:1], ["pgd"], margin=0.5) == ["pgd"] * 4


def test_identify_rule_validates():
    with pytest.raises(InvalidValueError):
        identify_rule(_probs([[0.9], [0.1]]), LABELS)
    with pytest.raises(InvalidValueError):
        identify_rule(_probs([[0.9], [0.1]]), ["a", "b"], clean_index=2)


def test_identity_features_hand_case():
    probs = torch.tensor([[[0.5, 0.5, 0.0]], [[0.2, 0.7, 0.1]], [[1 / 3, 1 / 3, 1 / 3]]])
    feats = identity_features(probs)
    names = identity_feature_names(3)
    assert feats.shape == (1, len(names)) == (1, 12)
    row = dict(zip(names, feats[0].tolist(), strict=True))
    assert row["maxprob_0"] == pytest.approx(0.5) and row["margin_0"] == pytest.approx(0.0)
    assert row["entropy_0"] == pytest.approx(math.log(2))
    assert row["entropy_2"] == pytest.approx(math.log(3))
    assert row["margin_1"] == pytest.approx(0.5)
    entropy_1 = -(0.2 * math.log(0.2) + 0.7 * math.log(0.7) + 0.1 * math.log(0.1))
    assert row["entropy_1"] == pytest.approx(entropy_1)
    # predictions 0, 1, 0 (argmax takes the first of tied maxima)
    assert (row["agree_0_1"], row["agree_0_2"], row["agree_1_2"]) == (0.0, 1.0, 0.0)


def _clusters(n_per: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0, 0, 1, 0, 5], [0, 3.0, 0, 1, 0, 5], [0, 0, 3.0, 1, 0, 5]])
    feats = torch.cat([c + 0.6 * torch.randn(n_per, 6, generator=g) for c in centres])
    feats[:, 3] = 1.0  # a constant feature (zero spread) must not break standardisation
    labels = [name for name in ("pgd", "fia", "clean") for _ in range(n_per)]
    return feats, labels


def test_fit_identifier_learns_separable_set_and_round_trips():
    x, y = _clusters(60, seed=0)
    model = fit_identifier(x, y, epochs=150, lr=0.05, weight_decay=1e-3, seed=0)
    assert model.classes == ["clean", "fia", "pgd"]
    x_test, y_test = _clusters(40, seed=1)
    assert accuracy(y_test, model.predict(x_test)) >= 0.95
    restored = IdentifierModel.from_tensors(model.state_dict(), list(model.classes))
    assert restored.predict(x_test) == model.predict(x_test)
    torch.testing.assert_close(restored.predict_proba(x_test), model.predict_proba(x_test), rtol=0, atol=0)
    again = fit_identifier(x, y, epochs=150, lr=0.05, weight_decay=1e-3, seed=0)
    assert torch.equal(again.weight, model.weight)


def _overlapping(n_clean: int, n_attack: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """1-D overlapping classes: clean ~ N(+1, 1), pgd ~ N(-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([1 + torch.randn(n_clean, 1, generator=g), -1 + torch.randn(n_attack, 1, generator=g)])
    return x, ["clean"] * n_clean + ["pgd"] * n_attack


def test_balanced_fit_equals_an_unweighted_fit_on_the_small_class_repeated():
    x, y = _overlapping(20, 400, seed=0)
    options = {"epochs": 3000, "lr": 0.05, "weight_decay": 0.0}
    balanced = fit_identifier(x, y, balance=True, **options)
    # repeating each clean input 20 times weighs the classes equally without weights (logistic regression with a
    # bias and no decay is invariant to the standardisation, which the repetition changes)
    repeated = fit_identifier(torch.cat([x[:20].repeat(20, 1), x[20:]]), ["clean"] * 400 + y[20:], **options)
    grid = torch.linspace(-3, 3, 61)[:, None]
    torch.testing.assert_close(balanced.predict_proba(grid), repeated.predict_proba(grid), rtol=0, atol=2e-3)
    plain = fit_identifier(x, y, **options)
    x_test, y_test = _overlapping(500, 500, seed=1)
    recall = {m: per_class_scores(y_test, model.predict(x_test))["clean"]["recall"]
              for m, model in (("plain", plain), ("balanced", balanced))}  # fmt: skip
    assert recall["plain"] < 0.5 < recall["balanced"]  # unweighted, the 20 clean inputs are mostly called pgd
    assert balanced_accuracy(y_test, balanced.predict(x_test)) > balanced_accuracy(y_test, plain.predict(x_test))


def test_balance_changes_nothing_when_the_classes_are_equal():
    x, y = _clusters(30, seed=0)
    assert torch.equal(fit_identifier(x, y, epochs=50, balance=True).weight, fit_identifier(x, y, epochs=50).weight)


def test_balanced_accuracy_hand_list():
    true, pred = ["a", "a", "a", "b"], ["a", "a", "a", "a"]
    assert balanced_accuracy(true, pred) == pytest.approx(0.5) and accuracy(true, pred) == pytest.approx(0.75)
    assert balanced_accuracy(["a", "b", "b"], ["a", "b", UNKNOWN]) == pytest.approx((1 + 0.5) / 2)


def test_identifier_shape_checks():
    x, y = _clusters(5, seed=2)
    model = fit_identifier(x, y, epochs=5)
    with pytest.raises(IncompatibleError):
        model.predict(torch.zeros(2, 5))
    with pytest.raises(CorruptError):
        IdentifierModel.from_tensors(model.state_dict(), ["a", "b"])
    with pytest.raises(InvalidValueError, match="2 classes"):
        fit_identifier(x, ["pgd"] * len(y))


def test_confusion_matrix_and_accuracy_hand_list():
    true = ["clean", "pgd", "pgd", "fia", "fia", "fia"]
    pred = ["clean", "pgd", "fia", "fia", "unknown", "fia"]
    labels, matrix = confusion_matrix(true, pred)
    assert labels == ["clean", "fia", "pgd", "unknown"]
    assert matrix == [[1, 0, 0, 0], [0, 2, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]]
    labels, matrix = confusion_matrix(true, pred, ["pgd", "fia", "clean", "unknown"])
    assert matrix[0] == [1, 1, 0, 0] and matrix[1] == [0, 2, 0, 1]
    assert accuracy(true, pred) == pytest.approx(4 / 6)
    with pytest.raises(InvalidValueError, match="unknown"):
        confusion_matrix(true, pred, ["clean", "pgd", "fia"])
    with pytest.raises(InvalidValueError):
        accuracy(true, pred[:-1])


def test_relative_rule_hand_case():
    # members: pgd adapter, fgsm adapter, base (clean member); max probabilities per input
    conf = torch.tensor([[0.90, 0.99, 0.95], [0.99, 0.90, 0.95], [0.999, 0.999, 0.999]], dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], dim=-1)
    odds = lambda p: math.log(p / (1 - p))  # noqa: E731
    mean = torch.tensor([odds(0.9), odds(0.99), odds(0.999)], dtype=torch.float64)
    std = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    scores = relative_confidence(probs, mean, std)
    expected = [[(odds(c) - m) / s for c in row] for row, m, s in zip(conf.tolist(), mean, std, strict=True)]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    # input 0: every member at its usual -> pgd (0), base (2) tie at 0 -> lowest index wins with margin < 0
    # input 1: pgd +2.2 (0.99 vs 0.9), fgsm (0.9 vs 0.99)/2 = -1.1, base 0 -> pgd; input 2: base +0 vs pgd +2.2, ...
    labels = identify_relative(probs, ["pgd", "fgsm", "clean-member"], mean, std, margin=-1.0, clean_index=2)
    best = scores.argmax(dim=0).tolist()
    assert labels == [["pgd", "fgsm", "clean"][i] for i in best]
    assert best[1] == 0
    # the absolute rule on the same inputs is fooled by the base's constant 0.999 on input 0 and 1
    assert identify_rule(probs, ["pgd", "fgsm", "base"], margin=0.0, clean_index=2)[:2] == ["clean", "clean"]
    lead = scores.sort(dim=0, descending=True).values
    margin = float((lead[0] - lead[1]).min()) + 1e-9
    assert UNKNOWN in identify_relative(probs, ["pgd", "fgsm", "base"], mean, std, margin=margin)


def test_clean_confidence_stats_are_mean_and_std_of_log_odds():
    conf = torch.tensor([[0.6, 0.7, 0.8, 0.9]], dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], dim=-1)
    mean, std = clean_confidence_stats(probs)
    odds = np.log(conf.numpy() / (1 - conf.numpy()))[0]
    assert mean.item() == pytest.approx(odds.mean()) and std.item() == pytest.approx(odds.std(ddof=1))
    zero = relative_confidence(probs, mean, std).mean()
    assert zero.item() == pytest.approx(0.0, abs=1e-12)


def test_rejection_answers_unknown_for_a_class_left_out_of_fitting():
    x, y = _clusters(80, seed=0)
    far = torch.tensor([0.0, 0.0, 0.0, 1.0, 6.0, 5.0]) + 0.6 * torch.randn(
        40, 6, generator=torch.Generator().manual_seed(3)
    )
    kept, held = stratified_split(y, 0.25, seed=0)
    model = fit_identifier(x[kept], [y[i] for i in kept], epochs=150)
    model = calibrate_rejection(model, x[kept], [y[i] for i in kept], x[held], quantile=0.99)
    assert model.predict(far) == [UNKNOWN] * 40  # a fourth family, never fitted
    assert model.predict(far, reject=False) != [UNKNOWN] * 40
    x_test, y_test = _clusters(40, seed=1)
    pred = model.predict(x_test)
    assert pred.count(UNKNOWN) <= 6 and accuracy(y_test, pred) >= 0.9
    restored = IdentifierModel.from_tensors(model.state_dict(), model.classes)
    assert restored.predict(far) == [UNKNOWN] * 40 and restored.predict(x_test) == pred
    # the distance is the smallest mean squared z-score to a class, by hand for one row
    z = (x_test[:1] - model.mean) / model.std
    by_hand = min(((z - model.class_mean[c]) / model.class_std[c]).pow(2).mean().item() for c in range(3))
    assert model.distance(x_test[:1]).item() == pytest.approx(by_hand, rel=1e-5)


def test_stratified_split_and_per_class_scores():
    labels = ["a"] * 8 + ["b"] * 4 + ["c"]
    kept, held = stratified_split(labels, 0.25, seed=0)
    assert sorted(kept + held) == list(range(13))
    assert [labels[i] for i in held].count("a") == 2 and [labels[i] for i in held].count("b") == 1
    assert "c" not in [labels[i] for i in held]
    scores = per_class_scores(["a", "a", "b", "b"], ["a", "b", "b", UNKNOWN])
    assert scores["a"] == {"precision": 1.0, "recall": 0.5, "support": 2}
    assert scores["b"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert per_class_scores(["a", "b"], ["b", "b"])["a"]["precision"] is None


def test_select_feature_groups_keeps_the_informative_group():
    x, y = _clusters(40, seed=0)
    noise = torch.randn(len(y), 4, generator=torch.Generator().manual_seed(9))
    groups, history = select_feature_groups({"noise": noise, "signal": x[:, :3]}, y, fit_options={"epochs": 80})
    assert groups[0] == "signal" and history[0]["cv_accuracy"] >= 0.9
    assert [h["groups"] for h in history] == [["signal"], ["signal", "noise"]]  # every round is recorded
    best = max(h["cv_accuracy"] for h in history)
    assert history[len(groups) - 1]["cv_accuracy"] >= best - 0.005  # the shortest prefix near the best


def test_identification_needs_two_classes():
    with pytest.raises(InvalidValueError, match=r"with C >= 2"):
        identify_rule(torch.ones(2, 3, 1), ["pgd", "fgsm"])
