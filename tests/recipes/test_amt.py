"""AMT: SVD start equals the base, rank-2r storage equals the trained model (loradar and PEFT), and the
factor perturbation has norm γ·‖w‖ per tensor and is gone after the optimiser step."""

import pytest
import torch

from loradar_cli.attacks import build_attack
from loradar_cli.data import load_data
from loradar_cli.errors import ExistsError
from loradar_cli.jobs.train import train_and_store_adapter
from loradar_cli.loading import build_model, load_model
from loradar_cli.lora.init import init_lora
from loradar_cli.lora.inject import inject_lora, lora_layers
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.recipes import build_recipe
from loradar_cli.recipes.amt import lora_factors
from loradar_cli.recipes.loop import TrainConfig, adapter_train_mode
from tests.conftest import make_base


def _svd_model(store, targets="convs", r=3):
    base = store.base_meta("tiny") if store.has_base("tiny") else make_base(store)
    model = build_model(store.load_base(base.name))
    names = (
        [n for n, m in model.model.named_modules() if isinstance(m, torch.nn.Conv2d)] if targets == "convs" else targets
    )
    spec = LoraSpec(r=r, lora_alpha=r, targets=names, head="fc")
    init_lora(inject_lora(model.model, spec), "svd")
    return base, model


def test_svd_start_reproduces_the_base_and_holds_the_top_singular_triplets(store):
    base, model = _svd_model(store)
    plain = build_model(store.load_base(base.name))
    x = load_data("digits", "test", limit=16, channels=1, size=16).x
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    for name, layer in lora_layers(model.model).items():
        w = plain.model.get_submodule(name).weight.detach().double().flatten(1).numpy()
        import numpy as np

        u, s, vt = np.linalg.svd(w, full_matrices=False)
        top = (u[:, :3] * s[:3]) @ vt[:3]
        ba = (layer.lora_B.weight.flatten(1) @ layer.lora_A.weight.flatten(1)).double().detach().numpy()
        np.testing.assert_allclose(ba, top, atol=1e-5)  # the trainable product is the principal part of W0


@pytest.mark.parametrize(("r", "targets"), [(2, "convs"), (12, "all")])
def test_stored_rank_2r_adapter_reproduces_the_trained_model_in_loradar_and_peft(store, r, targets):
    """Stored as [B, -B0]·[A; A0] (rank 2r); with r = 12 the 1-channel stem conv (d_in = 9) cannot hold 2r = 24, so
    its ΔW is re-factored at rank 9, and the adapter still loads and reproduces the trained model."""
    peft = pytest.importorskip("peft")
    import timm

    base = make_base(store)
    config = TrainConfig(recipe="amt", epochs=1, batch_size=16, lr=2e-2, seed=1, select="last")
    meta = train_and_store_adapter(
        store, "m", base=base.name, attack="pgd", data="digits", attack_options={"eps": 0.1, "steps": 2},
        config=config, r=r, targets=targets, limit=32, val_limit=8,
    )  # fmt: skip
    assert meta.lora.r == 2 * r and meta.recipe_config["trained_rank"] == r  # [B, -B0]·[A; A0]
    if targets == "all":
        assert meta.lora.rank_of("conv1.0") == 9  # min(16 out, 1·3·3 in)
    ours = load_model(store, base.name, "m")
    x = load_data("digits", "test", limit=8, channels=1, size=16).x
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    net.load_state_dict(store.load_base(base.name).state)
    theirs = peft.PeftModel.from_pretrained(net, str(store.adapter_dir("m"))).eval()
    plain = build_model(store.load_base(base.name))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ours.normalize(x)), ours(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours(x), plain(x), atol=1e-3)  # it trained away from the base


@pytest.mark.parametrize("gamma", [5e-3, 0.1])
def test_factor_perturbation_has_radius_gamma_and_is_removed_after_the_step(store, gamma):
    _, model = _svd_model(store, r=2)
    recipe = build_recipe("amt", {"gamma": gamma})
    factors = lora_factors(model.model)
    before = [w.detach().clone() for w in factors]
    data = load_data("digits", "train", limit=8, channels=1, size=16)
    adapter_train_mode(model)
    out = recipe.step(model, data.x, data.y, build_attack("pgd", eps=0.1, steps=2))
    for w, w0 in zip(factors, before, strict=True):
        assert (w.detach() - w0).norm().item() == pytest.approx(gamma * w0.norm().item(), rel=1e-4)
    optimizer = torch.optim.SGD(factors, lr=0.0)
    out.loss.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in factors)
    optimizer.step()
    recipe.after_step(model)
    assert all(torch.equal(w, w0) for w, w0 in zip(factors, before, strict=True))


def test_the_loss_is_taken_at_the_perturbed_factors(store):
    """With γ > 0 the gradient differs from the unperturbed one (the ascent step is not a no-op)."""
    grads = []
    for gamma in (0.0, 0.1):
        _, model = _svd_model(store, r=2)
        torch.manual_seed(0)
        data = load_data("digits", "train", limit=8, channels=1, size=16)
        adapter_train_mode(model)
        out = build_recipe("amt", {"gamma": gamma}).step(model, data.x, data.y, build_attack("fgsm", eps=0.1))
        grads.append(torch.autograd.grad(out.loss, lora_factors(model.model)[0])[0])
    assert not torch.allclose(grads[0], grads[1])


def test_pool_trains_one_member_per_budget_and_merge_accepts_it(store):
    from typer.testing import CliRunner

    from loradar_cli.cli.app import app
    from loradar_cli.jobs.train import train_pool
    from loradar_cli.store.pools import load_pool, pool_path

    base = make_base(store)
    config = TrainConfig(recipe="amt", epochs=1, batch_size=16, seed=0)
    values = [("0.05", 0.05), ("1/10", 0.1)]
    manifest, members = train_pool(
        store, "P", "eps", values, attack="pgd", attack_options={"steps": 2}, base=base.name, data="digits",
        config=config, r=2, limit=16, val_limit=8,
    )  # fmt: skip
    assert manifest == load_pool(store.root, "P") and manifest.members == ["P-eps-0.05", "P-eps-1_10"]
    for meta, eps in zip(members, (0.05, 0.1), strict=True):
        assert meta.attack_config["config"]["eps"] == pytest.approx(eps)
        assert meta.attack_config["config"]["alpha"] == pytest.approx(eps / 4)
    # a pool run interrupted after its members: --resume keeps the stored members and writes the manifest
    pool_path(store.root, "P").unlink()
    again, kept = train_pool(
        store, "P", "eps", values, attack="pgd", attack_options={"steps": 2}, base=base.name, data="digits",
        config=config, r=2, limit=16, val_limit=8, resume=True,
    )  # fmt: skip
    assert again.members == manifest.members and [m.created_at for m in kept] == [m.created_at for m in members]
    # resumed once more after the manifest was written: the same pool, nothing retrained; other members are refused
    third, kept = train_pool(
        store, "P", "eps", values, attack="pgd", attack_options={"steps": 2}, base=base.name, data="digits",
        config=config, r=2, limit=16, val_limit=8, resume=True,
    )  # fmt: skip
    assert third == load_pool(store.root, "P") and [m.created_at for m in kept] == [m.created_at for m in members]
    with pytest.raises(ExistsError):
        train_pool(
            store, "P", "eps", values[:1], attack="pgd", attack_options={"steps": 2}, base=base.name, data="digits",
            config=config, r=2, limit=16, val_limit=8, resume=True,
        )  # fmt: skip
    out = CliRunner().invoke(app, ["merge", "P", "--name", "pm", "--store", str(store.root), "--json"])
    assert out.exit_code == 0, out.output
    assert store.adapter_meta("pm").parents == manifest.members
