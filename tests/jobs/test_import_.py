"""Importing PEFT LoRA folders and fitted checkpoints: PEFT is the oracle for the logits; every mismatch is named."""

import json

import pytest
import torch

from loradar_cli.errors import IncompatibleError, InvalidValueError
from loradar_cli.jobs.import_ import import_base, import_peft
from loradar_cli.loading import load_model
from tests.conftest import make_base

peft = pytest.importorskip("peft")


def peft_folder(store, tmp_path, **config):
    """A LoRA that PEFT itself creates on the base's timm model, trains one SGD step, and saves."""
    import timm

    base = store.load_base("tiny")
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    net.load_state_dict(base.state)
    torch.manual_seed(0)
    settings = {"r": 2, "lora_alpha": 4, "target_modules": ["layer1.0.conv1", "layer3.0.conv1"]} | config
    model = peft.get_peft_model(net, peft.LoraConfig(**settings)).eval()  # eval: BatchNorm statistics stay the base's
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 10
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimiser.step()
    folder = tmp_path / "peft-adapter"
    model.save_pretrained(str(folder))
    return folder, model.eval()


@pytest.mark.parametrize(
    "config",
    [
        {"modules_to_save": ["fc"]},
        {"rank_pattern": {"layer3.0.conv1": 3}, "alpha_pattern": {"layer1.0.conv1": 1.5}, "use_rslora": True},
        {"target_modules": r"layer\d\.0\.conv1", "lora_dropout": 0.1},
    ],
    ids=["head", "patterns-rslora", "regex"],
)
def test_imported_peft_adapter_gives_peft_logits(store, tmp_path, config):
    make_base(store)
    folder, theirs = peft_folder(store, tmp_path, **config)
    meta = import_peft(store, folder, base="tiny", name="imp", attack="pgd")
    assert meta.recipe == "imported" and meta.attack == "pgd"
    assert meta.recipe_config["origin"] == str(folder.resolve())
    assert set(meta.recipe_config["sha256"]) == {"adapter_config.json", "adapter_model.safetensors"}
    ours = load_model(store, "tiny", "imp")
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        expected = theirs(ours.normalize(x))
        assert not torch.allclose(expected, load_model(store, "tiny")(x), atol=1e-4)  # the adapter matters
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_every_mismatch_with_the_base_is_named(store, tmp_path):
    make_base(store)
    folder, _ = peft_folder(store, tmp_path, modules_to_save=["fc"])
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"r": 3, "modules_to_save": ["conv1"]}))
    with pytest.raises(IncompatibleError) as err:
        import_peft(store, folder, base="tiny", name="bad")
    message = err.value.one_line()
    assert "layer1.0.conv1: rank 2 in the tensors, 3 in the config" in message
    assert "layer3.0.conv1: rank 2 in the tensors, 3 in the config" in message
    assert "modules_to_save 'conv1' is not the classifier head 'fc'" in message
    (folder / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["layer1.0.conv1"]}))
    with pytest.raises(IncompatibleError, match=r"layer3\.0\.conv1: has factors but target_modules does not match it"):
        import_peft(store, folder, base="tiny", name="bad")
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(IncompatibleError, match="use_dora"):
        import_peft(store, folder, base="tiny", name="bad")
    assert store.adapter_names() == []


def test_peft_adapter_for_another_shape_is_refused(store, tmp_path):
    import timm
    from safetensors.torch import load_file, save_file

    make_base(store)
    folder, _ = peft_folder(store, tmp_path, modules_to_save=["fc"])
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.fc.weight"] = torch.zeros(7, timm.create_model("test_resnet").num_features)
    tensors["base_model.model.fc.bias"] = torch.zeros(7)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleError, match=r"fc\.weight has shape \(7, \d+\), the base needs \(10, \d+\)"):
        import_peft(store, folder, base="tiny", name="bad")


def test_import_base_round_trips_a_checkpoint(store, tmp_path):
    import timm
    from safetensors.torch import save_file

    net = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    for i, path in enumerate([tmp_path / "w.safetensors", tmp_path / "w.pt"]):
        meta = import_base(
            store,
            path,
            model="test_resnet",
            name=f"b{i}",
            num_classes=4,
            in_chans=1,
            img_size=16,
            mean=[0.5],
            std=[0.2],
        )
        loaded = store.load_base(meta.name)
        assert all(loaded.state[k].equal(v) for k, v in net.state_dict().items())
        assert meta.origin["sha256"] and meta.input_size == (1, 16, 16)
    with pytest.raises(Exception, match="does not fit the model"):
        import_base(
            store, tmp_path / "w.pt", model="test_resnet", name="b9", num_classes=10, in_chans=1, mean=[0.5], std=[0.2]
        )
    with pytest.raises(InvalidValueError, match="--mean/--std need 1 values"):
        import_base(
            store,
            tmp_path / "w.pt",
            model="test_resnet",
            name="b9",
            num_classes=4,
            in_chans=1,
            mean=[0.5, 0.5],
            std=[0.2],
        )
