"""combine.ensemble: votes and routing on stored adapters equal hand computations on naive outputs."""

import json

import numpy as np
import pytest
import torch

from loradar_cli.combine import (
    adapter_models,
    ensemble_probs,
    vote_sets,
)
from loradar_cli.data import load_data
from loradar_cli.errors import InvalidValueError
from loradar_cli.lora.layers import LoraLayer
from tests.combine.conftest import NAMES, naive_probs


def test_ensemble_batched_path_equals_a_naive_unmerged_loop(pool, x):
    models = adapter_models(pool, None, list(NAMES))
    assert not any(isinstance(m, LoraLayer) for model in models for m in model.modules())  # ΔW folded in once
    torch.testing.assert_close(ensemble_probs(models, x, batch_size=5), naive_probs(pool, NAMES, x),
                               atol=1e-5, rtol=1e-5)


def _hand_votes(probs: np.ndarray, weights: list[float]) -> dict[str, np.ndarray]:
    _, n, c = probs.shape
    preds = probs.argmax(-1)
    majority = []
    for j in range(n):
        counts = np.bincount(preds[:, j], minlength=c)
        tied = np.flatnonzero(counts == counts.max())
        majority.append(tied[np.argmax(probs[:, j, tied].sum(0))])
    route = probs.max(-1).argmax(0)
    return {"majority": np.array(majority), "soft": probs.mean(0).argmax(-1),
            "weighted": np.einsum("k,kbc->bc", np.array(weights) / sum(weights), probs).argmax(-1),
            "route": preds[route, np.arange(n)]}


def test_vote_and_route_accuracies_match_a_hand_computation(pool, tmp_path):
    out = tmp_path / "preds.json"
    weights = [0.6, 0.3, 0.1]
    report = vote_sets(pool, list(NAMES), methods=["majority", "weighted", "soft", "route"], weights=weights,
                       data="digits", limit=40, out=out)
    data = load_data("digits", "test", limit=40, channels=1, size=16)
    probs = naive_probs(pool, NAMES, data.x).double().numpy()
    hand = _hand_votes(probs, weights)
    y = data.y.numpy()
    row = report["sets"]["clean"]
    for method, pred in hand.items():
        assert row["accuracy"][method] == pytest.approx(float((pred == y).mean())), method
    for i, name in enumerate(NAMES):
        assert row["adapters"][name] == pytest.approx(float((probs[i].argmax(-1) == y).mean()))
    saved = json.loads(out.read_text())["sets"]["clean"]
    assert saved["y"] == y.tolist() and saved["methods"]["majority"] == hand["majority"].tolist()
    assert saved["routed_to"] == [NAMES[i] for i in probs.max(-1).argmax(0)]
    assert report["weighting"]["source"] == "--weights"


def test_weighted_vote_defaults_to_stored_reliability(pool):
    report = vote_sets(pool, ["a", "b"], methods=["weighted"], data="digits", limit=4)
    assert report["weighting"] == {"weights": [0.5, 0.5], "source": "metrics.val_robust_acc"}
    with pytest.raises(InvalidValueError, match="--data SPEC and/or --adv-set"):
        vote_sets(pool, ["a", "b"])
