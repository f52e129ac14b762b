"""LoRA initialisations: kaiming starts at ΔW = 0; svd and cluster keep the function and match references."""

import numpy as np
import pytest
import timm
import torch
from torch import nn

from loradar_cli.lora.init import LORA_INITS, init_lora, kmeans
from loradar_cli.lora.inject import inject_lora, lora_layers, select_targets
from loradar_cli.lora.layers import LoraConv2d, LoraLinear
from loradar_cli.lora.spec import LoraSpec


def _vit(init: str, r: int = 4, lora_alpha: float = 8.0):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=5, img_size=16, patch_size=4).eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    spec = LoraSpec(r=r, lora_alpha=lora_alpha, targets=select_targets(model, "attn-mlp"))
    init_lora(inject_lora(model, spec), init)
    return model, x, before


@pytest.mark.parametrize("init", LORA_INITS.names())
def test_every_initialisation_preserves_the_function(init):
    model, x, before = _vit(init)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_kaiming_starts_at_zero_delta_and_svd_cluster_do_not_touch_the_base():
    model, _, _ = _vit("kaiming")
    assert all(torch.count_nonzero(layer.delta_weight()) == 0 for layer in lora_layers(model).values())
    for init in ("svd", "cluster"):
        model, _, _ = _vit(init)
        for layer in lora_layers(model).values():
            assert layer.lora_B.weight.abs().sum() > 0 and layer.lora_A0 is not None
            assert not layer.lora_A0.requires_grad and not layer.lora_B0.requires_grad


def test_svd_product_is_the_top_r_part_of_a_linear_weight_with_any_scale():
    torch.manual_seed(1)
    base = nn.Linear(12, 9)
    layer = LoraLinear(base, r=3, lora_alpha=12.0)  # s = 4: the factors absorb 1/s
    LORA_INITS.get("svd")(layer, None)
    u, s, vt = np.linalg.svd(base.weight.detach().double().numpy(), full_matrices=False)
    top = (u[:, :3] * s[:3]) @ vt[:3]
    product = (layer.lora_B.weight @ layer.lora_A.weight).detach().double().numpy() * layer.scaling
    np.testing.assert_allclose(product, top, atol=1e-5)


def test_kmeans_matches_scikit_learn_on_planted_clusters():
    sklearn = pytest.importorskip("sklearn.cluster")
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=gen, dtype=torch.float64) * 10
    rows = centres.repeat_interleave(5, 0) + 0.1 * torch.randn(20, 6, generator=gen, dtype=torch.float64)
    ours, assign = kmeans(rows, 4, generator=torch.Generator().manual_seed(3))
    ref = sklearn.KMeans(n_clusters=4, n_init=10, random_state=0).fit(rows.numpy())
    order = [int(np.argmin(((ref.cluster_centers_ - c.numpy()) ** 2).sum(1))) for c in ours]
    assert sorted(order) == [0, 1, 2, 3]
    np.testing.assert_allclose(ours.numpy(), ref.cluster_centers_[order], atol=1e-9)
    np.testing.assert_array_equal(np.array(order)[assign.numpy()], ref.labels_)


def test_cluster_init_is_a_lloyd_fixed_point_of_a_conv_kernel():
    torch.manual_seed(2)
    base = nn.Conv2d(4, 16, 3, padding=1)
    layer = LoraConv2d(base, r=3, lora_alpha=3.0)
    LORA_INITS.get("cluster")(layer, torch.Generator().manual_seed(0))
    w = base.weight.detach().double().flatten(1).numpy()
    centres = layer.lora_A.weight.detach().double().flatten(1).numpy()
    one_hot = layer.lora_B.weight.detach().flatten(1).numpy()
    assert set(np.unique(one_hot)) <= {0.0, 1.0} and (one_hot.sum(1) == 1).all()
    assign = one_hot.argmax(1)
    nearest = ((w[:, None, :] - centres[None]) ** 2).sum(2).argmin(1)
    np.testing.assert_array_equal(assign, nearest)  # every row sits in its nearest centre's cluster
    for j in range(3):
        np.testing.assert_allclose(centres[j], w[assign == j].mean(0), atol=1e-6)  # centres are the means
