"""jobs.merge: ΔW-space and test-time scored merges, checked against independent computations."""

import numpy as np
import pytest
import torch

from loradar_cli.data import load_data
from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.jobs.merge import TTSOptions, merge_adapters
from loradar_cli.loading import load_model
from loradar_cli.ops.merge import MERGE_METHODS, augment_support, tts_scores
from tests.jobs.conftest import NAMES, base_plus, delta_of, head_of


def test_one_hot_linear_merge_reproduces_the_first_adapter(pool, x):
    meta, report = merge_adapters(pool, ["a", "b"], name="m10", method="linear", weights=[1, 0])
    with torch.no_grad():
        expected, got = load_model(pool, "tiny", "a")(x), load_model(pool, "tiny", "m10")(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(head_of(pool, "m10")["weight"], head_of(pool, "a")["weight"])
    assert meta.parents == ["a", "b"] and meta.attack is None and meta.recipe is None
    assert meta.combination["method"] == "linear" and meta.combination["weights"] == [1.0, 0.0]
    assert all(info["rank"] == 2 for info in report.layers.values())


def test_merging_two_equals_base_plus_both_deltas(pool, x):
    meta, _ = merge_adapters(pool, ["a", "b"], name="m11", method="linear", weights=[1, 1])
    da, db = delta_of(pool, "a"), delta_of(pool, "b")
    h0, ha, hb = head_of(pool, None), head_of(pool, "a"), head_of(pool, "b")
    head = {p: ha[p] + hb[p] - h0[p] for p in h0}  # task arithmetic on the heads: h0 + Σ wᵢ(hᵢ − h0)
    expected_model = base_plus(pool, {k: da[k] + db[k] for k in da}, head)
    with torch.no_grad():
        torch.testing.assert_close(load_model(pool, "tiny", "m11")(x), expected_model(x), atol=1e-4, rtol=1e-4)
    assert meta.lora.rank_pattern == dict.fromkeys(da, 4)
    assert all(meta.lora.alpha_of(k) == meta.lora.rank_of(k) for k in da)  # scale 1


def test_cat_merge_is_exact_with_summed_rank(pool, x):
    merge_adapters(pool, ["a", "b"], name="mlin", method="linear", weights=[0.3, 0.7])
    meta, _ = merge_adapters(pool, ["a", "b"], name="mcat", method="cat", weights=[0.3, 0.7])
    assert set(meta.lora.rank_pattern.values()) == {4}
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(pool, "tiny", "mcat")(x), load_model(pool, "tiny", "mlin")(x), atol=1e-5, rtol=1e-5
        )


def test_merge_at_lower_rank_keeps_the_stated_energy(pool):
    _, report = merge_adapters(pool, ["a", "b"], name="mr1", method="linear", weights=[0.5, 0.5], rank=1)
    da, db = delta_of(pool, "a"), delta_of(pool, "b")
    stored = delta_of(pool, "mr1")
    for layer, delta in da.items():
        m = (0.5 * delta + 0.5 * db[layer]).flatten(1).numpy()
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        assert report.layers[layer]["rank"] == 1
        assert report.layers[layer]["energy"] == pytest.approx(s[0] ** 2 / (s**2).sum(), rel=1e-6)
        np.testing.assert_allclose(stored[layer].flatten(1).numpy(), s[0] * np.outer(u[:, 0], vt[0]), atol=1e-5)


def test_ties_merge_stores_the_ties_of_the_members_deltas(pool, x):
    _, report = merge_adapters(pool, ["a", "b"], name="mties", method="ties", density=0.5)
    assert report.weights == [1.0, 1.0] and report.density == 0.5
    ha, hb = head_of(pool, "a"), head_of(pool, "b")
    torch.testing.assert_close(head_of(pool, "mties")["weight"], (ha["weight"] + hb["weight"]) / 2)  # heads averaged
    da, db, stored = delta_of(pool, "a"), delta_of(pool, "b"), delta_of(pool, "mties")
    for layer in da:
        ties = _numpy_ties([da[layer].numpy(), db[layer].numpy()], 0.5).reshape(da[layer].shape[0], -1)
        k = report.layers[layer]["rank"]  # TIES output is full rank: stored as its best rank-k approximation
        u, s, vt = np.linalg.svd(ties, full_matrices=False)
        assert k == 4 and report.layers[layer]["energy"] == pytest.approx((s[:k] ** 2).sum() / (s**2).sum())
        best = (u[:, :k] * s[:k]) @ vt[:k]
        np.testing.assert_allclose(stored[layer].reshape(best.shape).numpy(), best, atol=1e-5)


def _numpy_ties(deltas: list[np.ndarray], density: float) -> np.ndarray:
    """TIES (Yadav et al., NeurIPS 2023) on one layer, written independently: trim, elect sign, disjoint mean."""
    flat = np.stack([d.reshape(-1) for d in deltas])
    k = max(1, int(density * flat.shape[1] + 1e-9))
    trimmed = np.zeros_like(flat)
    for i, row in enumerate(flat):
        keep = np.argsort(-np.abs(row), kind="stable")[:k]
        trimmed[i, keep] = row[keep]
    sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == sign
    count = agree.sum(0)
    merged = np.where(count > 0, (trimmed * agree).sum(0) / np.maximum(count, 1), 0.0)
    return merged.reshape(deltas[0].shape)


@pytest.mark.parametrize("method", MERGE_METHODS.names())
def test_every_merge_method_stores_a_valid_adapter(pool, x, method):
    """Contract over the registry: one-hot weights give the first adapter back; scored methods give a valid merge."""
    spec = MERGE_METHODS.get(method)
    options = {"tts": TTSOptions(support="digits", shots=2)} if spec.scored else {"weights": [1, 0], "density": 1.0}
    meta, report = merge_adapters(pool, ["a", "b"], name=f"contract-{method}", method=method, **options)
    assert meta.parents == ["a", "b"] and meta.combination["method"] == method
    with torch.no_grad():
        got = load_model(pool, "tiny", meta.name)(x)
        if spec.scored:
            weights = report.weights
            assert len(weights) == 2 and all(w >= 0 for w in weights) and sum(weights) == pytest.approx(1.0)
            da, db = delta_of(pool, "a"), delta_of(pool, "b")
            expected = {k: weights[0] * da[k] + weights[1] * db[k] for k in da}
            for layer, delta in delta_of(pool, meta.name).items():
                torch.testing.assert_close(delta, expected[layer], atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(got, load_model(pool, "tiny", "a")(x), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_incompatible_adapters_are_refused(pool):
    with pytest.raises(IncompatibleError, match="different bases"):
        merge_adapters(pool, ["a", "x"], name="bad")
    with pytest.raises(IncompatibleError, match="half"):
        merge_adapters(pool, ["a", "half"], name="bad")
    with pytest.raises(InvalidValueError, match="1 weights for 2 adapters"):
        merge_adapters(pool, ["a", "b"], name="bad", weights=[1.0])
    with pytest.raises(InvalidValueError, match="needs a support set"):
        merge_adapters(pool, ["a", "b"], name="bad", method="tts")
    assert not pool.has_adapter("bad")


def test_tts_weights_match_an_independent_scoring(pool, x):
    opts = TTSOptions(support="digits", shots=3, top_k=2, seed=4)
    meta, report = merge_adapters(pool, list(NAMES), name="mtts", method="tts", tts=opts)
    data = load_data("digits", "val", seed=4, channels=1, size=16)
    keep, seen = [], {}
    for i, label in enumerate(data.y.tolist()):
        if seen.get(label, 0) < 3:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    xs, ys = data.x[keep], data.y[keep]
    xs_aug = augment_support(xs, torch.Generator().manual_seed(4))

    def features(model, images):
        net = model.model
        return net.forward_head(net.forward_features(model.normalize(images)), pre_logits=True)

    with torch.no_grad():
        models = [load_model(pool, "tiny", n) for n in NAMES]
        clean = torch.stack([features(m, xs) for m in models])
        aug = torch.stack([features(m, xs_aug) for m in models])
    expected = tts_scores(clean, ys, aug, top_k=2)
    assert report.weights == pytest.approx(expected.weight, abs=1e-6)
    assert sum(w == 0.0 for w in report.weights) == 1  # top-2 of 3: the third is exactly zero
    assert [r["score"] for r in report.scores] == pytest.approx(expected.score, abs=1e-6)
    assert meta.combination["support"]["n"] == len(ys) == 30
    merge_adapters(pool, list(NAMES), name="mtts-lin", method="linear", weights=report.weights)
    with torch.no_grad():
        torch.testing.assert_close(load_model(pool, "tiny", "mtts")(x), load_model(pool, "tiny", "mtts-lin")(x))


def test_merge_report_holds_its_method_s_fields_and_is_the_stored_combination(pool):
    """The report's JSON has density for ties only and no tts fields unscored; the stored combination equals it."""
    meta, report = merge_adapters(pool, ["a", "b"], name="report-lin", method="linear", weights=[0.5, 0.5])
    dumped = report.model_dump(mode="json")
    assert list(dumped) == ["name", "method", "parents", "weights", "layers", "rank", "head"]
    assert meta.combination == {k: v for k, v in dumped.items() if k not in ("name", "parents")}
    meta, report = merge_adapters(pool, ["a", "b"], name="report-ties", method="ties", density=0.5)
    assert report.model_dump()["density"] == 0.5 == meta.combination["density"]
    assert "scores" not in report.model_dump() and "tts" not in meta.combination
