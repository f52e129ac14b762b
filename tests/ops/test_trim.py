"""ops.trim: ΔW trimming reports and AMT's full-weight singular-value trim."""

import math

import numpy as np
import pytest
import torch

from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.ops.merge import factors_to_delta
from loradar_cli.ops.trim import full_weight_trim, lowrank_or_dense, trim_delta, trim_deltas


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank(out: int, inn: int, r: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(out, r, generator=g, dtype=torch.float64) @ torch.randn(r, inn, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(("shape", "keep", "q"), [((10, 7), 0.5, 3), ((6, 3, 2, 2), 0.7, 4), ((9, 9), 1.0, 9)])
def test_full_weight_trim_keeps_exactly_q_singular_values(shape, keep, q):
    w0 = torch.randn(*shape, generator=_gen(0), dtype=torch.float64)
    delta = _low_rank(shape[0], math.prod(shape[1:]), 2, seed=1).reshape(shape)
    new_delta, info = full_weight_trim(w0, delta, keep)
    assert info.q == q and info.min_dim == min(shape[0], math.prod(shape[1:]))
    assert new_delta.shape == delta.shape and new_delta.dtype == delta.dtype
    original = np.linalg.svd((w0 + delta).reshape(shape[0], -1).numpy(), compute_uv=False)
    trimmed = np.linalg.svd((w0 + new_delta).reshape(shape[0], -1).numpy(), compute_uv=False)
    assert int((trimmed > 1e-6 * trimmed[0]).sum()) == q
    np.testing.assert_allclose(trimmed[:q], original[:q], rtol=1e-9)
    assert info.energy == pytest.approx(float((original[:q] ** 2).sum() / (original**2).sum()), rel=1e-12)


def test_full_weight_trim_float32_and_floor_guard():
    w0 = torch.randn(100, 100, generator=_gen(2))
    delta = torch.zeros(100, 100)
    new_delta, info = full_weight_trim(w0, delta, 0.29)  # 0.29·100 = 28.999… in floating point
    assert info.q == 29 and new_delta.dtype == torch.float32
    s = torch.linalg.svdvals((w0 + new_delta).double())
    assert int((s > 1e-5 * s[0]).sum()) == 29


def test_full_weight_trim_rejects_bad_inputs():
    w0 = torch.randn(7, 5, generator=_gen(3))
    with pytest.raises(InvalidValueError, match="keeps no singular value"):
        full_weight_trim(w0, torch.zeros(7, 5), 0.1)
    with pytest.raises(InvalidValueError):
        full_weight_trim(w0, torch.zeros(7, 5), 1.5)
    with pytest.raises(IncompatibleError):
        full_weight_trim(w0, torch.zeros(5, 7), 0.5)


def test_lowrank_or_dense():
    delta = _low_rank(8, 6, 2, seed=4)
    found = lowrank_or_dense(delta, max_rank=2)
    assert found is not None
    factors, info = found
    assert info.rank == 2
    torch.testing.assert_close(factors_to_delta(factors), delta)
    w0 = torch.randn(8, 6, generator=_gen(5), dtype=torch.float64)
    trimmed, _ = full_weight_trim(w0, delta, 0.5)
    assert lowrank_or_dense(trimmed, max_rank=2) is None


def test_trim_delta_and_report():
    g = _gen(6)
    deltas = {"fc": torch.randn(9, 7, generator=g), "conv": torch.randn(5, 2, 3, 3, generator=g)}
    factors, report = trim_deltas(deltas, rank=3)
    for name, delta in deltas.items():
        s = np.linalg.svd(delta.double().reshape(delta.shape[0], -1).numpy(), compute_uv=False)
        assert report[name].rank == 3 and report[name].original_rank == min(s.size, 7)
        assert report[name].energy == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-9)
        assert factors[name].a.shape[0] == 3 and factors[name].scale == 1.0
        rebuilt = factors_to_delta(factors[name]).double()
        err = float((rebuilt - delta.double()).norm() / delta.double().norm())
        assert err == pytest.approx(report[name].rel_error, rel=1e-4)
    single, info = trim_delta(deltas["fc"], energy=1.0)
    assert info.rank == 7
    torch.testing.assert_close(factors_to_delta(single), deltas["fc"], rtol=1e-5, atol=1e-5)
    with pytest.raises(IncompatibleError, match="'conv'"):
        trim_deltas(deltas, rank=2, groups={"conv": 5})
