"""combine: merges, trims, ensemble votes and attack identification on stored adapters, checked independently."""

import json

import numpy as np
import pytest
import torch

from loradar_cli.advset import AdvSet, save_adv_set
from loradar_cli.combine import (
    TTSOptions,
    adapter_models,
    ensemble_probs,
    fit_identifier_from_sets,
    identify_sets,
    load_identifier,
    merge_adapters,
    trim_adapter,
    vote_sets,
)
from loradar_cli.data import load_data
from loradar_cli.errors import CorruptError, IncompatibleError, InvalidValueError
from loradar_cli.loading import load_model
from loradar_cli.lora.inject import PEFT_PREFIX
from loradar_cli.lora.layers import LoraLayer
from loradar_cli.ops.identify import identify_rule
from loradar_cli.ops.merge import augment_support, tts_scores
from loradar_cli.store.store import Store
from tests.conftest import make_adapter, make_base

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Store:
    """Base 'tiny' with random adapters a (pgd), b (fgsm), c (roa); base 'other' with adapter x."""
    store = Store(tmp_path_factory.mktemp("combine") / "store")
    make_base(store)
    for i, (name, attack) in enumerate(zip(NAMES, ("pgd", "fgsm", "roa"), strict=True)):
        make_adapter(store, "tiny", name, seed=i + 1, attack=attack)
    make_base(store, "other", seed=5)
    make_adapter(store, "other", "x", seed=6)
    make_adapter(store, "tiny", "half", targets="layer1.0.conv1", seed=7)
    return store


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def _delta(store: Store, name: str) -> dict[str, torch.Tensor]:
    """ΔW = alpha/r·B·A per layer, straight from the stored factors (independent of the library's helpers)."""
    adapter = store.load_adapter(name)
    spec = adapter.meta.lora
    out = {}
    for layer in spec.targets:
        a = adapter.tensors[f"{PEFT_PREFIX}{layer}.lora_A.weight"].double()
        b = adapter.tensors[f"{PEFT_PREFIX}{layer}.lora_B.weight"].double()
        out[layer] = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:]) * spec.alpha_of(layer) / spec.rank_of(layer)
    return out


def _head(store: Store, name: str | None) -> dict[str, torch.Tensor]:
    if name is None:
        state = store.load_base("tiny").state
        return {"weight": state["fc.weight"], "bias": state["fc.bias"]}
    tensors = store.load_adapter(name).tensors
    return {p: tensors[f"{PEFT_PREFIX}fc.{p}"] for p in ("weight", "bias")}


def _base_plus(store: Store, deltas: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The plain base model with ΔW added to its weights and the head replaced."""
    model = load_model(store, "tiny")
    with torch.no_grad():
        for layer, delta in deltas.items():
            weight = model.model.get_submodule(layer).weight
            weight.copy_((weight.double() + delta).float())
        model.model.fc.weight.copy_(head["weight"])
        model.model.fc.bias.copy_(head["bias"])
    return model


def _effective_weight(model: torch.nn.Module, layer: str) -> torch.Tensor:
    module = model.model.get_submodule(layer)
    if isinstance(module, LoraLayer):
        return (module.base_layer.weight + module.delta_weight()).detach()
    return module.weight.detach()


@torch.no_grad()
def _naive_probs(store: Store, names, x: torch.Tensor) -> torch.Tensor:
    """[K, N, C]: each adapter's unmerged LoRA model, one input at a time."""
    out = []
    for name in names:
        model = load_model(store, "tiny", name)
        out.append(torch.cat([model(x[i:i + 1]).softmax(-1) for i in range(len(x))]))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ merge


def test_one_hot_linear_merge_reproduces_the_first_adapter(pool, x):
    meta, report = merge_adapters(pool, ["a", "b"], name="m10", method="linear", weights=[1, 0])
    with torch.no_grad():
        expected, got = load_model(pool, "tiny", "a")(x), load_model(pool, "tiny", "m10")(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(_head(pool, "m10")["weight"], _head(pool, "a")["weight"])
    assert meta.parents == ["a", "b"] and meta.attack is None and meta.recipe is None
    assert meta.combination["method"] == "linear" and meta.combination["weights"] == [1.0, 0.0]
    assert all(info["rank"] == 2 for info in report["layers"].values())


def test_merging_two_equals_base_plus_both_deltas(pool, x):
    meta, _ = merge_adapters(pool, ["a", "b"], name="m11", method="linear", weights=[1, 1])
    da, db = _delta(pool, "a"), _delta(pool, "b")
    h0, ha, hb = _head(pool, None), _head(pool, "a"), _head(pool, "b")
    head = {p: ha[p] + hb[p] - h0[p] for p in h0}  # task arithmetic on the heads: h0 + Σ wᵢ(hᵢ − h0)
    expected_model = _base_plus(pool, {k: da[k] + db[k] for k in da}, head)
    with torch.no_grad():
        torch.testing.assert_close(load_model(pool, "tiny", "m11")(x), expected_model(x), atol=1e-4, rtol=1e-4)
    assert meta.lora.rank_pattern == dict.fromkeys(da, 4)
    assert all(meta.lora.alpha_of(k) == meta.lora.rank_of(k) for k in da)  # scale 1


def test_cat_merge_is_exact_with_summed_rank(pool, x):
    merge_adapters(pool, ["a", "b"], name="mlin", method="linear", weights=[0.3, 0.7])
    meta, _ = merge_adapters(pool, ["a", "b"], name="mcat", method="cat", weights=[0.3, 0.7])
    assert set(meta.lora.rank_pattern.values()) == {4}
    with torch.no_grad():
        torch.testing.assert_close(load_model(pool, "tiny", "mcat")(x), load_model(pool, "tiny", "mlin")(x),
                                   atol=1e-5, rtol=1e-5)


def test_merge_at_lower_rank_keeps_the_stated_energy(pool):
    _, report = merge_adapters(pool, ["a", "b"], name="mr1", method="linear", weights=[0.5, 0.5], rank=1)
    da, db = _delta(pool, "a"), _delta(pool, "b")
    stored = _delta(pool, "mr1")
    for layer, delta in da.items():
        m = (0.5 * delta + 0.5 * db[layer]).flatten(1).numpy()
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        assert report["layers"][layer]["rank"] == 1
        assert report["layers"][layer]["energy"] == pytest.approx(s[0] ** 2 / (s**2).sum(), rel=1e-6)
        np.testing.assert_allclose(stored[layer].flatten(1).numpy(), s[0] * np.outer(u[:, 0], vt[0]), atol=1e-5)


def test_ties_merge_stores_a_valid_adapter(pool, x):
    meta, report = merge_adapters(pool, ["a", "b"], name="mties", method="ties", density=0.5)
    assert report["weights"] == [1.0, 1.0] and report["density"] == 0.5
    ha, hb = _head(pool, "a"), _head(pool, "b")
    torch.testing.assert_close(_head(pool, "mties")["weight"], (ha["weight"] + hb["weight"]) / 2)  # heads averaged
    assert all(info["rank"] <= 4 for info in report["layers"].values())
    with torch.no_grad():
        assert torch.isfinite(load_model(pool, "tiny", meta.name)(x)).all()


def test_incompatible_adapters_are_refused(pool):
    with pytest.raises(IncompatibleError, match="different bases"):
        merge_adapters(pool, ["a", "x"], name="bad")
    with pytest.raises(IncompatibleError, match="half"):
        merge_adapters(pool, ["a", "half"], name="bad")
    with pytest.raises(InvalidValueError, match="2 finite weights"):
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
    assert report["weights"] == pytest.approx(expected.weight, abs=1e-6)
    assert sum(w == 0.0 for w in report["weights"]) == 1  # top-2 of 3: the third is exactly zero
    assert [r["score"] for r in report["scores"]] == pytest.approx(expected.score, abs=1e-6)
    assert meta.combination["support"]["n"] == len(ys) == 30
    merge_adapters(pool, list(NAMES), name="mtts-lin", method="linear", weights=report["weights"])
    with torch.no_grad():
        torch.testing.assert_close(load_model(pool, "tiny", "mtts")(x), load_model(pool, "tiny", "mtts-lin")(x))


# ------------------------------------------------------------------------------------------------ trim


def test_trim_by_rank_and_by_energy_report_what_they_kept(pool):
    _, report = trim_adapter(pool, "a", out_name="a-r1", rank=1)
    for layer, delta in _delta(pool, "a").items():
        s = np.linalg.svd(delta.flatten(1).numpy(), compute_uv=False)
        assert report["layers"][layer]["rank"] == 1
        assert report["layers"][layer]["energy"] == pytest.approx(s[0] ** 2 / (s**2).sum(), rel=1e-6)
    merge_adapters(pool, ["a", "b"], name="m4", method="cat", weights=[1, 1])
    meta, report = trim_adapter(pool, "m4", out_name="m4-e90", energy=0.9)
    for layer, delta in _delta(pool, "m4").items():
        s = np.linalg.svd(delta.flatten(1).numpy(), compute_uv=False)
        cum = np.cumsum(s**2) / (s**2).sum()
        k = int(np.searchsorted(cum, 0.9) + 1)
        assert report["layers"][layer]["rank"] == meta.lora.rank_of(layer) == k
        assert report["layers"][layer]["energy"] == pytest.approx(cum[k - 1], rel=1e-6) and cum[k - 1] >= 0.9
    assert meta.parents == ["m4"] and meta.combination["mode"] == "svd"
    with pytest.raises(InvalidValueError, match="--rank or --energy"):
        trim_adapter(pool, "a", out_name="nothing")


def test_full_weight_trim_keeps_floor_p_min_d_singular_values(pool):
    meta, report = trim_adapter(pool, "a", out_name="a-fw", full_weight=True, keep=0.5, layers_regex=r"layer[13]\.")
    base = load_model(pool, "tiny")
    trimmed = load_model(pool, "tiny", "a-fw")
    deltas = _delta(pool, "a")
    assert set(report["layers"]) == {"layer1.0.conv1", "layer3.0.conv1"}
    for layer, delta in deltas.items():
        w0 = base.model.get_submodule(layer).weight.double()
        full = (w0 + delta).flatten(1)
        got = _effective_weight(trimmed, layer).double().flatten(1)
        if layer not in report["layers"]:
            torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
            continue
        q = int(0.5 * min(full.shape))
        s_full, s_got = torch.linalg.svdvals(full), torch.linalg.svdvals(got)
        assert report["layers"][layer]["q"] == q
        assert int((s_got > 1e-4 * s_got[0]).sum()) == q
        torch.testing.assert_close(s_got[:q], s_full[:q], atol=1e-4, rtol=1e-4)
    # 32×288 keeps 16 of 32 triplets: trimmed(W) − W0 has rank ≤ 16 + 2, cheaper as factors; 48×48 keeps 24 of
    # 48: rank ≤ 26 > 48·48/96, so it is stored dense
    assert {k: v["storage"] for k, v in report["layers"].items()} == {"layer1.0.conv1": "lora", "layer3.0.conv1": "dense"}
    assert meta.dense_deltas == ["layer3.0.conv1"] and meta.attack == "pgd"


def test_full_weight_trim_stores_a_dense_delta_where_not_low_rank(pool):
    meta, report = trim_adapter(pool, "a", out_name="a-dense", full_weight=True, keep=0.1, layers_regex="layer3")
    layer = "layer3.0.conv1"
    assert meta.dense_deltas == [layer] and layer not in meta.lora.targets
    assert report["layers"][layer]["storage"] == "dense" and "PEFT" in meta.combination["dense_deltas"]
    got = _effective_weight(load_model(pool, "tiny", "a-dense"), layer).double().flatten(1)
    s = torch.linalg.svdvals(got)
    assert int((s > 1e-4 * s[0]).sum()) == int(0.1 * 48)
    _, again = trim_adapter(pool, "a-dense", out_name="a-dense-r2", rank=2)  # dense layers are trimmed too
    assert again["layers"][layer]["rank"] == 2


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


# ------------------------------------------------------------------------------------------------ ensembles


def test_ensemble_batched_path_equals_a_naive_unmerged_loop(pool, x):
    models = adapter_models(pool, None, list(NAMES))
    assert not any(isinstance(m, LoraLayer) for model in models for m in model.modules())  # ΔW folded in once
    torch.testing.assert_close(ensemble_probs(models, x, batch_size=5), _naive_probs(pool, NAMES, x),
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
    probs = _naive_probs(pool, NAMES, data.x).double().numpy()
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


# ------------------------------------------------------------------------------------------------ identification


@pytest.fixture(scope="module")
def loud(pool) -> str:
    """An adapter 'loud' (attack roa) whose head is scaled ×1000: it is (almost) certain on every input."""
    adapter = pool.load_adapter("a")
    tensors = {k: (v * 1000 if k.startswith(f"{PEFT_PREFIX}fc.") else v) for k, v in adapter.tensors.items()}
    pool.save_adapter(adapter.meta.model_copy(update={"name": "loud", "attack": "roa"}), tensors)
    return "loud"


def test_identify_rule_on_constructed_cases(pool, loud, tmp_path):
    data = load_data("digits", "test", limit=10, channels=1, size=16)
    roa_set = save_adv_set(tmp_path / "roa.safetensors", AdvSet(data.x, data.y, "roa"))
    report = identify_sets(pool, ["b", loud], data="digits", limit=10, adv_sets=[roa_set])
    assert report["sets"]["clean"]["predicted"] == {"roa": 10}
    assert report["sets"]["roa.safetensors"]["accuracy"] == 1.0
    assert report["accuracy"] == 0.5
    assert report["confusion"] == {"labels": ["clean", "roa"], "matrix": [[0, 10], [0, 10]]}
    as_clean = identify_sets(pool, ["b", loud], clean=loud, data="digits", limit=10)
    assert as_clean["sets"]["clean"]["predicted"] == {"clean": 10} and as_clean["accuracy"] == 1.0
    undecided = identify_sets(pool, ["b", loud], margin=1.0, data="digits", limit=10)
    assert undecided["sets"]["clean"]["predicted"] == {"unknown": 10}


@pytest.fixture(scope="module")
def adv_files(pool, tmp_path_factory):
    """FGSM and PGD sets crafted against the base (small, fast)."""
    from loradar_cli.workflows import craft_adv_set

    folder = tmp_path_factory.mktemp("sets")
    paths = []
    for attack, options in (("fgsm", {"eps": 0.3}), ("pgd", {"eps": 0.3, "steps": 3})):
        path = folder / f"{attack}.safetensors"
        craft_adv_set(pool, path, base="tiny", attack=attack, data="digits", attack_options=options, limit=24)
        paths.append(path)
    return paths


def test_identify_rule_end_to_end_matches_the_rule_on_naive_probs(pool, adv_files):
    report = identify_sets(pool, ["a", "b"], adv_sets=adv_files, margin=0.05)
    from loradar_cli.advset import load_adv_set

    for path in adv_files:
        adv = load_adv_set(path)
        probs = torch.cat([_naive_probs(pool, ["a", "b"], adv.x), load_model(pool, "tiny")(adv.x).softmax(-1)[None]])
        expected = identify_rule(probs, ["pgd", "fgsm", "clean"], margin=0.05, clean_index=2)
        counts = {k: expected.count(k) for k in sorted(set(expected))}
        assert report["sets"][path.name]["predicted"] == counts


def test_calibrated_identifier_fit_predict_round_trip_and_route(pool, adv_files, tmp_path):
    meta, fitted = fit_identifier_from_sets(pool, ["a", "b"], name="idf", adv_sets=adv_files, data="digits",
                                            split="val", limit=24, epochs=150)
    assert fitted["classes"] == ["clean", "fgsm", "pgd"] and meta.members == ["a", "b", ":base"]
    assert (pool.root / "identifiers" / "idf" / "identifier.json").is_file()
    report = identify_sets(pool, [], mode="calibrated", identifier="idf", adv_sets=adv_files, data="digits",
                           split="val", limit=24)
    assert report["accuracy"] == pytest.approx(fitted["accuracy"])
    assert report["confusion"] == fitted["confusion"]
    ident = load_identifier(pool, "idf")
    vote_sets(pool, ["a", "b"], methods=["route"], identifier="idf", adv_sets=adv_files[:1],
                       out=tmp_path / "route.json")
    from loradar_cli.advset import load_adv_set

    adv = load_adv_set(adv_files[0])
    members = [*adapter_models(pool, None, ["a", "b"]), load_model(pool, "tiny")]
    models = dict(zip(["a", "b", ":base"], ensemble_probs(members, adv.x), strict=True))
    attacks = ident.predict(models)
    confident = torch.stack([models["a"], models["b"]]).max(-1).values.argmax(0).tolist()
    expected = [{"pgd": "a", "fgsm": "b"}.get(atk, ["a", "b"][c]) for atk, c in zip(attacks, confident, strict=True)]
    saved = json.loads((tmp_path / "route.json").read_text())["sets"]["fgsm.safetensors"]
    assert saved["routed_to"] == expected
    with pytest.raises(IncompatibleError, match="fitted on adapters"):
        identify_sets(pool, ["b", "a"], mode="calibrated", identifier="idf", data="digits", limit=4)
    (pool.identifier_dir("idf") / "identifier.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptError):
        load_identifier(pool, "idf")
