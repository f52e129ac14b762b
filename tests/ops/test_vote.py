"""ops.vote: hand-made probability tables (with ties), weights, and batched vs naive loop equality."""

import numpy as np
import pytest
import torch

from loradar_cli.errors import InvalidValueError
from loradar_cli.ops.vote import VOTE_METHODS, majority_vote, reliability_weights, soft_vote, vote, weighted_vote

# K = 4 adapters, B = 3 inputs, C = 3 classes.
PROBS = torch.tensor(
    [
        # input 0: predictions 0, 0, 1, 2 -> class 0 wins the count
        # input 1: predictions 0, 1, 0, 1 -> tie 0/1; summed P(0) = 1.8 < P(1) = 1.9 -> 1
        # input 2: predictions 2, 2, 1, 1 -> tie 1/2; summed P(1) = 2.2 > P(2) = 1.4 -> 1
        [[0.5, 0.3, 0.2], [0.5, 0.4, 0.1], [0.40, 0.0, 0.60]],
        [[0.6, 0.2, 0.2], [0.3, 0.6, 0.1], [0.35, 0.1, 0.55]],
        [[0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.0, 1.0, 0.0]],
        [[0.1, 0.1, 0.8], [0.5, 0.6, -0.1], [0.05, 1.1, -0.15]],
    ]
)


def test_majority_vote_hand_table_with_ties():
    assert majority_vote(PROBS).tolist() == [0, 1, 1]


def test_majority_tie_on_summed_probability_keeps_lower_class():
    probs = torch.tensor([[[0.6, 0.4]], [[0.4, 0.6]]])
    assert majority_vote(probs).tolist() == [0]


def test_soft_and_weighted_vote_hand_table():
    probs = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.3, 0.7]]])
    assert soft_vote(probs).tolist() == [1]  # mean P(1) = 0.533
    assert weighted_vote(probs, [2.0, 1.0, 1.0]).tolist() == [0]  # 0.5·0.9 + 0.25·0.2 + 0.25·0.3 = 0.575
    assert weighted_vote(probs, [1.0, 1.0, 1.0]).tolist() == soft_vote(probs).tolist()
    assert vote(probs, "weighted", [0.0, 1.0, 0.0]).tolist() == [1]


@pytest.mark.parametrize("weights", [[1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0], [float("nan"), 1.0, 1.0]])
def test_weighted_vote_rejects_bad_weights(weights):
    with pytest.raises(InvalidValueError):
        weighted_vote(torch.rand(3, 2, 4), weights)


def test_vote_dispatch_errors():
    with pytest.raises(InvalidValueError, match=", ".join(VOTE_METHODS.names())):
        vote(PROBS, "borda")
    with pytest.raises(InvalidValueError, match="weight"):
        vote(PROBS, "weighted")
    with pytest.raises(InvalidValueError):
        vote(torch.rand(3, 4), "soft")


def _naive(probs: list, method: str, weights: list[float]) -> list[int]:
    k, b, c = len(probs), len(probs[0]), len(probs[0][0])
    out = []
    for j in range(b):
        if method == "majority":
            counts = [0] * c
            for i in range(k):
                row = probs[i][j]
                counts[row.index(max(row))] += 1
            best = max(counts)
            sums = [sum(probs[i][j][cls] for i in range(k)) if counts[cls] == best else -1e9 for cls in range(c)]
            out.append(sums.index(max(sums)))
        else:
            w = weights if method == "weighted" else [1.0] * k
            total = sum(w)
            scores = [sum(w[i] / total * probs[i][j][cls] for i in range(k)) for cls in range(c)]
            out.append(scores.index(max(scores)))
    return out


@pytest.mark.parametrize("method", ["majority", "weighted", "soft"])
def test_batched_equals_naive_loop(method):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 64, 4, generator=g) * 2, dim=-1).double()
    weights = torch.rand(5, generator=g).tolist()
    expected = _naive(probs.tolist(), method, weights)
    assert vote(probs, method, weights if method == "weighted" else None).tolist() == expected


def test_reliability_weights():
    metrics = [{"val_robust_acc": 0.2, "val_acc": 0.9}, {"val_robust_acc": 0.6, "val_acc": 0.8}]
    rel = reliability_weights(metrics)
    assert rel.key == "val_robust_acc" and not rel.uniform_fallback
    assert rel.weights == pytest.approx([0.25, 0.75])
    rel = reliability_weights([{"val_acc": 0.5}, {"val_robust_acc": 0.5, "val_acc": 1.5}])
    assert rel.key == "val_acc" and rel.weights == pytest.approx([0.25, 0.75])
    rel = reliability_weights([{"val_acc": 0.5}, {}, {"val_acc": 0.1}])
    assert rel.uniform_fallback and rel.key is None and rel.weights == pytest.approx([1 / 3] * 3)
    rel = reliability_weights([{"val_acc": 0.0}, {"val_acc": 0.0}])
    assert rel.uniform_fallback and rel.weights == [0.5, 0.5]


def _numpy_mean_argmax(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.einsum("k,kbc->bc", weights / weights.sum(), probs).argmax(-1)


@pytest.mark.parametrize("method", VOTE_METHODS.names())
def test_every_vote_method_is_a_permutation_invariant_decision(method):
    """Contract over the registry: labels [B] in range, unanimity wins, voter order does not matter."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.rand(5, 7, 4, generator=gen, dtype=torch.float64).softmax(-1)
    weights = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    pred = vote(probs, method, weights)
    assert pred.shape == (7,) and pred.dtype == torch.long and bool(((pred >= 0) & (pred < 4)).all())
    order = torch.randperm(5, generator=gen)
    assert torch.equal(vote(probs[order], method, weights[order]), pred)
    unanimous = torch.nn.functional.one_hot(torch.tensor([2, 0, 3]), 4).double().expand(5, 3, 4) * 0.7 + 0.075
    assert vote(unanimous, method, weights).tolist() == [2, 0, 3]


def test_soft_and_weighted_votes_match_numpy():
    gen = torch.Generator().manual_seed(4)
    probs = torch.rand(4, 50, 6, generator=gen, dtype=torch.float64).softmax(-1)
    weights = torch.rand(4, generator=gen, dtype=torch.float64)
    assert vote(probs, "soft").numpy().tolist() == _numpy_mean_argmax(probs.numpy(), np.ones(4)).tolist()
    expected = _numpy_mean_argmax(probs.numpy(), weights.numpy())
    assert vote(probs, "weighted", weights).numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("shape", [(3, 4), (0, 2, 3), (2, 4, 0)])
def test_votes_refuse_probabilities_that_are_not_k_b_c(shape):
    with pytest.raises(InvalidValueError, match=r"expected probabilities \[K, B, C\], got shape"):
        majority_vote(torch.ones(shape))
