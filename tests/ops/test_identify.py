"""ops.identify: the LoRADAR rule on cases with known answers, features, the calibrated identifier, metrics."""

import math

import pytest
import torch

from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError
from loradar_cli.ops.identify import (
    IdentifierModel,
    accuracy,
    confusion_matrix,
    fit_identifier,
    identify_rule,
    identity_feature_names,
    identity_features,
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
