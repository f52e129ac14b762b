"""jobs.trim: singular-value trims report and keep exactly what they were asked to."""

import numpy as np
import pytest
import torch

from loradar_cli.errors import InvalidValueError
from loradar_cli.jobs.merge import merge_adapters
from loradar_cli.jobs.trim import trim_adapter
from loradar_cli.loading import load_model
from tests.jobs.conftest import delta_of, effective_weight


def test_trim_by_rank_and_by_energy_report_what_they_kept(pool):
    _, report = trim_adapter(pool, "a", out_name="a-r1", rank=1)
    for layer, delta in delta_of(pool, "a").items():
        s = np.linalg.svd(delta.flatten(1).numpy(), compute_uv=False)
        assert report.layers[layer]["rank"] == 1
        assert report.layers[layer]["energy"] == pytest.approx(s[0] ** 2 / (s**2).sum(), rel=1e-6)
    merge_adapters(pool, ["a", "b"], name="m4", method="cat", weights=[1, 1])
    meta, report = trim_adapter(pool, "m4", out_name="m4-e90", energy=0.9)
    for layer, delta in delta_of(pool, "m4").items():
        s = np.linalg.svd(delta.flatten(1).numpy(), compute_uv=False)
        cum = np.cumsum(s**2) / (s**2).sum()
        k = int(np.searchsorted(cum, 0.9) + 1)
        assert report.layers[layer]["rank"] == meta.lora.rank_of(layer) == k
        assert report.layers[layer]["energy"] == pytest.approx(cum[k - 1], rel=1e-6) and cum[k - 1] >= 0.9
    assert meta.parents == ["m4"] and meta.combination["mode"] == "svd"
    with pytest.raises(InvalidValueError, match="--rank or --energy"):
        trim_adapter(pool, "a", out_name="nothing")


def test_full_weight_trim_keeps_floor_p_min_d_singular_values(pool):
    meta, report = trim_adapter(pool, "a", out_name="a-fw", full_weight=True, keep=0.5, layers_regex=r"layer[13]\.")
    base = load_model(pool, "tiny")
    trimmed = load_model(pool, "tiny", "a-fw")
    deltas = delta_of(pool, "a")
    assert set(report.layers) == {"layer1.0.conv1", "layer3.0.conv1"}
    for layer, delta in deltas.items():
        w0 = base.model.get_submodule(layer).weight.double()
        full = (w0 + delta).flatten(1)
        got = effective_weight(trimmed, layer).double().flatten(1)
        if layer not in report.layers:
            torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
            continue
        q = int(0.5 * min(full.shape))
        s_full, s_got = torch.linalg.svdvals(full), torch.linalg.svdvals(got)
        assert report.layers[layer]["q"] == q
        assert int((s_got > 1e-4 * s_got[0]).sum()) == q
        torch.testing.assert_close(s_got[:q], s_full[:q], atol=1e-4, rtol=1e-4)
    # 32×288 keeps 16 of 32 triplets: trimmed(W) − W0 has rank ≤ 16 + 2, cheaper as factors; 48×48 keeps 24 of
    # 48: rank ≤ 26 > 48·48/96, so it is stored dense
    assert {k: v["storage"] for k, v in report.layers.items()} == {
        "layer1.0.conv1": "lora",
        "layer3.0.conv1": "dense",
    }
    assert meta.dense_deltas == ["layer3.0.conv1"] and meta.attack == "pgd"


def test_full_weight_trim_stores_a_dense_delta_where_not_low_rank(pool):
    meta, report = trim_adapter(pool, "a", out_name="a-dense", full_weight=True, keep=0.1, layers_regex="layer3")
    layer = "layer3.0.conv1"
    assert meta.dense_deltas == [layer] and layer not in meta.lora.targets
    assert report.layers[layer]["storage"] == "dense" and "PEFT" in meta.combination["dense_deltas"]
    got = effective_weight(load_model(pool, "tiny", "a-dense"), layer).double().flatten(1)
    s = torch.linalg.svdvals(got)
    assert int((s > 1e-4 * s[0]).sum()) == int(0.1 * 48)
    _, again = trim_adapter(pool, "a-dense", out_name="a-dense-r2", rank=2)  # dense layers are trimmed too
    assert again.layers[layer]["rank"] == 2


def test_peft_loads_an_adapter_with_per_layer_ranks_and_alphas(pool, x):
    peft = pytest.importorskip("peft")
    import timm

    meta, _ = trim_adapter(pool, "a", out_name="a-fw1", full_weight=True, keep=0.5, layers_regex="layer1")
    assert meta.lora.rank_of("layer1.0.conv1") > 2 and meta.lora.alpha_of("layer2.0.conv1") == 4.0
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    net.load_state_dict(pool.load_base("tiny").state)
    theirs = peft.PeftModel.from_pretrained(net, str(pool.adapter_dir("a-fw1"))).eval()
    ours = load_model(pool, "tiny", "a-fw1")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ours.normalize(x)), ours(x), atol=1e-5, rtol=1e-5)


def test_trim_report_holds_its_mode_s_fields_and_is_the_stored_combination(pool):
    """svd reports rank and energy, full-weight keep and layers_regex; the stored combination is the report."""
    meta, report = trim_adapter(pool, "a", out_name="a-report-svd", rank=2)
    dumped = report.model_dump(mode="json")
    assert list(dumped) == ["name", "parent", "layers", "mode", "rank", "energy"] and dumped["energy"] is None
    assert meta.combination == {"method": "trim", **{k: v for k, v in dumped.items() if k not in ("name", "parent")}}
    meta, report = trim_adapter(pool, "a", out_name="a-report-fw", full_weight=True, keep=0.9)
    assert list(report.model_dump()) == ["name", "parent", "layers", "mode", "keep", "layers_regex"]
    assert meta.combination["keep"] == 0.9 and "rank" not in meta.combination
