"""ops.merge: exact ΔW-space merges, TIES on a hand example, SVD re-factoring, AMT test-time scores."""

import math

import numpy as np
import pytest
import torch

from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.lora.state import LoraFactors, factors_to_delta
from loradar_cli.ops.merge import (
    cat_merge,
    check_compatible,
    linear_merge,
    merge_heads,
    refactor,
    ties_merge,
)
from loradar_cli.ops.tts import _translate, augment_support, tts_scores


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {"blocks.0.fc": torch.randn(6, 5, generator=g), "conv1": torch.randn(4, 3, 3, 3, generator=g)}


def _low_rank(out: int, inn: int, r: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = _gen(seed)
    return (
        torch.randn(out, r, generator=g, dtype=torch.float64) @ torch.randn(r, inn, generator=g, dtype=torch.float64)
    ).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_linear_merge_one_hot_weights_reproduce_first_adapter_bit_exactly():
    adapters = [_adapter(0), _adapter(1), _adapter(2)]
    merged = linear_merge(adapters, [1.0, 0.0, 0.0])
    for key, value in adapters[0].items():
        assert torch.equal(merged[key], value)
        assert merged[key].dtype == value.dtype


def test_linear_merge_is_weighted_sum_in_delta_space():
    a, b = _adapter(0), _adapter(1)
    summed = linear_merge([a, b], [1.0, 1.0])
    weighted = linear_merge([a, b], [0.3, -0.7])
    for key in a:
        torch.testing.assert_close(summed[key], a[key] + b[key])
        expected = 0.3 * a[key].double().numpy() - 0.7 * b[key].double().numpy()
        np.testing.assert_allclose(weighted[key].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_check_compatible_names_first_mismatch():
    a, b = _adapter(0), _adapter(1)
    with pytest.raises(IncompatibleError, match="conv1"):
        check_compatible([a, {"blocks.0.fc": b["blocks.0.fc"]}])
    with pytest.raises(IncompatibleError, match=r"blocks\.0\.fc.*\(6, 4\)"):
        check_compatible([a, {**b, "blocks.0.fc": torch.zeros(6, 4)}], names=["a", "b"])
    with pytest.raises(IncompatibleError, match="extra"):
        check_compatible([a, {**b, "extra": torch.zeros(1)}])
    with pytest.raises(InvalidValueError):
        linear_merge([a, b], [1.0])


@pytest.mark.parametrize("shape", [(12, 9), (8, 3, 3, 3)])
def test_refactor_full_rank_reconstructs_and_finds_numerical_rank(shape):
    out, inn = shape[0], math.prod(shape[1:])
    delta = _low_rank(out, inn, 3, seed=1).reshape(shape)
    a, b, info = refactor(delta)
    assert info.rank == 3 and info.original_rank == 3
    if len(shape) == 4:
        assert a.shape == (3, *shape[1:]) and b.shape == (out, 3, 1, 1)
        rebuilt = factors_to_delta(LoraFactors(a, b))
    else:
        assert a.shape == (3, inn) and b.shape == (out, 3)
        rebuilt = b @ a
    assert _rel(rebuilt, delta) <= 1e-5
    assert info.energy == pytest.approx(1.0, abs=1e-9)


def test_refactor_lower_rank_keeps_numpy_energy_and_is_balanced():
    delta = torch.randn(12, 9, generator=_gen(3), dtype=torch.float64)
    s = np.linalg.svd(delta.numpy(), compute_uv=False)
    a, b, info = refactor(delta, rank=4)
    expected = float((s[:4] ** 2).sum() / (s**2).sum())
    assert info.rank == 4 and info.original_rank == 9
    assert info.energy == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(np.linalg.svd((b @ a).numpy(), compute_uv=False)[:4], s[:4], rtol=1e-10)
    assert _rel(b @ a, delta) == pytest.approx(math.sqrt(1 - expected), rel=1e-9)
    torch.testing.assert_close(a @ a.T, b.T @ b)  # both diag(σ): balanced split


def test_refactor_energy_picks_smallest_rank_reaching_target():
    delta = torch.randn(10, 8, generator=_gen(4), dtype=torch.float64)
    s = np.linalg.svd(delta.numpy(), compute_uv=False)
    cum = np.cumsum(s**2) / (s**2).sum()
    _, _, info = refactor(delta, energy=0.9)
    k = info.rank
    assert cum[k - 1] >= 0.9 and cum[k - 2] < 0.9
    assert info.energy == pytest.approx(cum[k - 1], rel=1e-12)
    _, _, capped = refactor(delta, rank=2, energy=0.9)
    assert capped.rank == 2


def test_refactor_validates_inputs():
    with pytest.raises(IncompatibleError):
        refactor(torch.zeros(4, 2, 3, 3), groups=2)
    with pytest.raises(InvalidValueError):
        refactor(torch.ones(3, 3), rank=0)
    with pytest.raises(InvalidValueError):
        refactor(torch.ones(3, 3), energy=1.5)
    _, _, info = refactor(torch.zeros(3, 4))
    assert info.rank == 1 and info.original_rank == 0


def _grouped_delta_numpy(a: np.ndarray, b: np.ndarray, groups: int) -> np.ndarray:
    """Independent grouped ΔW: output channel o (group o // (out/g)) reads rank channels of its group."""
    r, cin, kh, kw = a.shape
    out = b.shape[0]
    rg = r // groups
    delta = np.zeros((out, cin, kh, kw))
    for o in range(out):
        grp = o // (out // groups)
        for j in range(rg):
            delta[o] += b[o, j, 0, 0] * a[grp * rg + j]
    return delta


@pytest.mark.parametrize("groups", [1, 2])
def test_cat_merge_is_exact_for_linear_and_grouped_conv(groups):
    g = _gen(5)
    ranks, scales, weights = [2, 4], [0.5, 2.0], [0.7, -1.3]
    factors = []
    for r, s in zip(ranks, scales, strict=True):
        factors.append(
            {
                "fc": (torch.randn(r, 5, generator=g), torch.randn(6, r, generator=g), s),
                "conv": (
                    torch.randn(r, 4 // groups, 3, 3, generator=g),
                    torch.randn(4, r // groups, 1, 1, generator=g),
                    s,
                ),
            }
        )
    merged = cat_merge(factors, weights)
    assert merged["fc"].a.shape[0] == sum(ranks) and merged["conv"].a.shape[0] == sum(ranks)
    fc_expected = sum(
        w * s * (f["fc"][1].numpy() @ f["fc"][0].numpy()) for f, w, s in zip(factors, weights, scales, strict=True)
    )
    conv_expected = sum(
        w * s * _grouped_delta_numpy(f["conv"][0].numpy(), f["conv"][1].numpy(), groups)
        for f, w, s in zip(factors, weights, scales, strict=True)
    )
    np.testing.assert_allclose(factors_to_delta(merged["fc"]).numpy(), fc_expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(factors_to_delta(merged["conv"]).numpy(), conv_expected, rtol=1e-5, atol=1e-5)


def test_ties_merge_hand_example():
    t1 = torch.tensor([[3.0, -1.0, 0.5, 2.0, -4.0]])
    t2 = torch.tensor([[-2.0, 5.0, 1.0, -1.0, -3.0]])
    t3 = torch.tensor([[1.0, -6.0, 2.0, 0.5, 1.0]])
    deltas = [{"w": t1}, {"w": t2}, {"w": t3}]
    # density 0.4 keeps 2 of 5 per task: [3,0,0,0,-4], [0,5,0,0,-3], [0,-6,2,0,0]; signs of sums: + - + + -.
    out = ties_merge(deltas, [1.0, 1.0, 1.0], density=0.4)
    torch.testing.assert_close(out["w"], torch.tensor([[3.0, -6.0, 2.0, 0.0, -3.5]]))
    # weight 0.5 on t2 before trimming: [0,2.5,0,0,-1.5]; entry 4 averages -4 and -1.5.
    out = ties_merge(deltas, [1.0, 0.5, 1.0], density=0.4, scale=2.0)
    torch.testing.assert_close(out["w"], 2.0 * torch.tensor([[3.0, -6.0, 2.0, 0.0, -2.75]]))
    with pytest.raises(InvalidValueError):
        ties_merge(deltas, [1.0, 1.0, 1.0], density=0.0)


def test_ties_with_full_density_and_agreeing_signs_is_the_mean():
    a, b = torch.rand(3, 4, generator=_gen(6)), torch.rand(3, 4, generator=_gen(7))
    out = ties_merge([{"w": a}, {"w": b}], [1.0, 1.0], density=1.0)
    torch.testing.assert_close(out["w"], (a + b) / 2)


def test_merge_heads_weighted_sum_and_shape_check():
    h1 = {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}
    h2 = {"weight": 2 * torch.ones(3, 4), "bias": torch.ones(3)}
    out = merge_heads([h1, h2], [0.25, 0.75])
    torch.testing.assert_close(out["weight"], torch.full((3, 4), 1.75))
    torch.testing.assert_close(out["bias"], torch.full((3,), 0.75))
    with pytest.raises(IncompatibleError, match="head #1"):
        merge_heads([h1, {"weight": torch.ones(5, 4), "bias": torch.zeros(5)}], [0.5, 0.5])


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(x * y for x, y in zip(u, v, strict=True))
    return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))


def _tts_by_hand(clean, labels, aug, lam, beta):
    classes = sorted(set(labels))
    n = len(classes)
    result = []
    for p in range(len(clean)):
        protos = {}
        for c in classes:
            rows = [clean[p][s] for s in range(len(labels)) if labels[s] == c]
            protos[c] = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
        c_sum = v_sum = 0.0
        for c in classes:
            members = [s for s in range(len(labels)) if labels[s] == c]
            own = sum(_cos(aug[p][s], protos[c]) for s in members) / len(members)
            other = sum(sum(_cos(aug[p][s], protos[o]) for o in classes if o != c) / (n - 1) for s in members)
            c_sum, v_sum = c_sum + own / n, v_sum + other / len(members) / n
        score = lam * c_sum - (1 - lam) * v_sum
        result.append((c_sum, v_sum, score, math.exp(-beta * (1 - score))))
    return result


@pytest.mark.parametrize(("labels", "top_k"), [([0, 0, 0, 1], 2), ([2, 0, 1, 1, 0], 1)])
def test_tts_scores_match_hand_computation(labels, top_k):
    g = _gen(8)
    clean = torch.randn(3, len(labels), 4, generator=g)
    aug = clean + 0.5 * torch.randn(3, len(labels), 4, generator=g)
    res = tts_scores(clean, torch.tensor(labels), aug, lam=0.6, beta=1.5, top_k=top_k)
    hand = _tts_by_hand(clean.tolist(), labels, aug.tolist(), 0.6, 1.5)
    for i, (c, v, score, raw) in enumerate(hand):
        assert res.compactness[i] == pytest.approx(c, rel=1e-5)
        assert res.divergence[i] == pytest.approx(v, rel=1e-5, abs=1e-7)
        assert res.score[i] == pytest.approx(score, rel=1e-5, abs=1e-7)
        assert res.raw_weight[i] == pytest.approx(raw, rel=1e-5)
    top = sorted(range(3), key=lambda i: -hand[i][3])[:top_k]
    assert res.selected == sorted(top)
    assert sum(res.weight) == pytest.approx(1.0)
    for i in range(3):
        expected = hand[i][3] / sum(hand[j][3] for j in top) if i in top else 0.0
        assert res.weight[i] == pytest.approx(expected, rel=1e-5)
        if i not in top:
            assert res.weight[i] == 0.0
    assert type(res).model_validate_json(res.model_dump_json()) == res


def test_tts_scores_rejects_single_class():
    x = torch.randn(2, 3, 4)
    with pytest.raises(InvalidValueError, match="2 classes"):
        tts_scores(x, [1, 1, 1], x)


def test_augment_support_is_deterministic_bounded_and_can_skip():
    x = torch.rand(4, 3, 16, 16, generator=_gen(9))
    y1 = augment_support(x, _gen(1))
    y2 = augment_support(x, _gen(1))
    assert torch.equal(y1, y2)
    assert y1.shape == x.shape and y1.min() >= 0 and y1.max() <= 1
    assert not torch.equal(y1, x)
    assert torch.equal(augment_support(x, _gen(1), prob=0.0), x)
    skip_seed = next(s for s in range(1000) if float(torch.rand(1, generator=_gen(s))) >= 0.9)
    assert torch.equal(augment_support(x, _gen(skip_seed)), x)


def test_translate_matches_numpy_shift_with_zero_fill():
    x = torch.rand(3, 2, 5, 6, generator=_gen(10))
    sh, sw = torch.tensor([1, -2, 0]), torch.tensor([0, 1, -3])
    out = _translate(x, sh, sw).numpy()
    xn = x.numpy()
    for b in range(3):
        expected = np.zeros_like(xn[b])
        for i in range(5):
            for j in range(6):
                si, sj = i + int(sh[b]), j + int(sw[b])
                if 0 <= si < 5 and 0 <= sj < 6:
                    expected[:, i, j] = xn[b, :, si, sj]
        np.testing.assert_array_equal(out[b], expected)
