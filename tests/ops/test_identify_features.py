"""ops.identify_features: each input statistic on synthetic inputs against an independent numpy computation."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from loradar_cli.errors import IncompatibleError, NotFoundError
from loradar_cli.ops.identify_features import (
    IDENTIFY_FEATURES,
    FeatureInputs,
    compute_features,
    feature_names,
    median_residual,
    patch_concentration,
    plateau_stats,
)

EPS = 0.1


def _fgsm_like(seed: int = 0, size: int = 16) -> torch.Tensor:
    """A flat grey image plus an FGSM-like ±EPS sign perturbation on every pixel [1, 1, size, size]."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (1, 1, size, size), generator=g).float() * 2 - 1
    return 0.5 + EPS * signs


def _pgd_like(seed: int = 0, size: int = 16) -> torch.Tensor:
    """The same grey image with a perturbation spread uniformly in [−EPS, EPS] (iterated, projected steps)."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + EPS * (2 * torch.rand(1, 1, size, size, generator=g) - 1)


def test_median_residual_matches_scipy():
    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    expected = x.numpy() - ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="mirror")
    np.testing.assert_allclose(median_residual(x).numpy(), expected, atol=1e-6)
    spike = torch.zeros(1, 1, 8, 8)
    spike[0, 0, 3, 4] = 0.7  # one outlier in a 3×3 window: the median is the background
    assert torch.equal(median_residual(spike), spike)


def _plateau_reference(x: np.ndarray) -> list[float]:
    """plateau_stats written out with numpy loops over neighbour pairs."""
    img = x[0, 0]
    steps = [abs(img[i, j + 1] - img[i, j]) for i in range(img.shape[0]) for j in range(img.shape[1] - 1)]
    steps += [abs(img[i + 1, j] - img[i, j]) for i in range(img.shape[0] - 1) for j in range(img.shape[1])]
    levels = np.rint(np.array(steps) * 255).astype(int)
    moving = levels[levels > 0]
    counts = np.bincount(moving, minlength=256)
    top = np.sort(counts)[::-1][:3]
    values = img.ravel()
    return [
        len(moving) / len(steps),
        top[0] / max(len(moving), 1),
        top.sum() / max(len(moving), 1),
        counts.argmax() / 255,
        len(np.unique(np.round(values, 6))) / values.size,
        float(np.mean(np.abs(values * 255 - np.rint(values * 255)) < 1e-3)),
    ]


@pytest.mark.parametrize("make", [_fgsm_like, _pgd_like])
def test_plateau_stats_match_numpy(make):
    x = make(seed=3)
    np.testing.assert_allclose(plateau_stats(x)[0].numpy(), _plateau_reference(x.numpy()), atol=1e-6)


def test_sign_plateau_has_one_step_size_of_two_eps():
    fgsm = plateau_stats(_fgsm_like())[0].tolist()
    pgd = plateau_stats(_pgd_like())[0].tolist()
    assert fgsm[1] == pytest.approx(1.0)  # every non-zero neighbour step is 2ε
    assert fgsm[3] == pytest.approx(round(2 * EPS * 255) / 255)
    assert fgsm[4] == pytest.approx(2 / 256)  # two distinct values: 0.5 ± ε
    assert pgd[1] < 0.1 and pgd[4] > 0.9
    flat = plateau_stats(torch.full((1, 1, 16, 16), 0.5))[0].tolist()
    assert flat[0] == 0.0 and flat[1] == 0.0 and flat[5] == 0.0  # 0.5 is not on the 1/255 grid


def test_patch_concentration_finds_a_pasted_rectangle():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 10:14, 20:24] = torch.rand(4, 4, generator=g)  # a 4×4 sticker
    energy = median_residual(x).abs().sum(dim=1)
    peak, ratio = patch_concentration(energy, 4)
    e = energy[0].numpy()
    windows = [e[i : i + 4, j : j + 4].mean() for i in range(29) for j in range(29)]
    assert peak.item() == pytest.approx(math.log(max(windows) + 1e-6), abs=1e-5)
    assert ratio.item() == pytest.approx(math.log((max(windows) + 1e-6) / (e.mean() + 1e-6)), abs=1e-5)
    spread = median_residual(_pgd_like(size=32)).abs().sum(dim=1)
    assert ratio.item() > math.log(20) > patch_concentration(spread, 4)[1].item()


def _row(groups: list[str], inputs: FeatureInputs) -> dict[str, float]:
    """The first input's features by column name."""
    return dict(zip(feature_names(groups, inputs), compute_features(groups, inputs)[0].tolist(), strict=True))


def test_frequency_features_put_a_checkerboard_in_the_top_band():
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = (0.5 + 0.25 * (-1.0) ** (i + j)).reshape(1, 1, 16, 16)
    inputs = FeatureInputs(torch.full((1, 1, 2), 0.5), checker)
    row = _row(["frequency"], inputs)
    assert row["frequency.band_0.5_inf"] == pytest.approx(0.0, abs=1e-5)  # log share 1
    assert row["frequency.band_0.0_0.125"] < -10
    # 4-neighbour Laplacian of ±0.25 alternation is ∓2 inside; borders replicate to smaller magnitudes
    assert math.exp(row["frequency.lap_logenergy"]) == pytest.approx(_laplacian_energy(checker[0, 0].numpy()), 1e-5)


def _laplacian_energy(img: np.ndarray) -> float:
    p = np.pad(img, 1, mode="edge")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * img
    return float((lap**2).mean() + 1e-6)


def test_member_groups_hand_case():
    probs = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.6, 0.4]]])  # members 0, 1, base
    inputs = FeatureInputs(probs, base_index=2, member_names=("a", "b", "base"))
    row = _row(["disagreement", "log-odds"], inputs)
    p, q = np.array([0.9, 0.1]), np.array([0.2, 0.8])
    skl = 0.5 * (np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p)))
    assert row["disagreement.skl_a_b"] == pytest.approx(math.log1p(skl), rel=1e-5)
    assert (row["disagreement.changes_a"], row["disagreement.changes_b"]) == (0.0, 1.0)  # base predicts class 0
    assert row["log-odds.logodds_b"] == pytest.approx(math.log(0.8 / 0.2), rel=1e-5)
    assert compute_features(["probs"], inputs).shape == (1, 6)


def test_registry_and_missing_inputs():
    assert {"residual", "plateau", "patch", "frequency", "probs", "disagreement"} <= set(IDENTIFY_FEATURES.names())
    with pytest.raises(NotFoundError, match="valid: "):
        compute_features(["nope"], FeatureInputs(torch.full((1, 1, 2), 0.5)))
    with pytest.raises(IncompatibleError):
        compute_features(["residual"], FeatureInputs(torch.full((1, 1, 2), 0.5)))


@pytest.mark.parametrize("group", ["residual", "patch", "frequency", "probs", "disagreement", "log-odds"])
def test_features_pass_gradients_to_an_adaptive_attacker(group):
    """Groups other than plateau are differentiable in the input and the members' probabilities."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 12, 12, generator=g).requires_grad_()
    logits = torch.randn(2, 3, 4, generator=g).requires_grad_()
    probs = (logits + x.mean(dim=(1, 2, 3))[None, :, None]).softmax(dim=-1)
    compute_features([group], FeatureInputs(probs, x, base_index=1)).sum().backward()
    grad = x.grad if IDENTIFY_FEATURES.get(group).needs_input else logits.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
