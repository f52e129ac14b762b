import json

import pytest
import torch

from loradar_cli.errors import CorruptError, ExistsError, IncompatibleError, InvalidValueError, NotFoundError
from loradar_cli.loading import load_model
from loradar_cli.store.manifest import MANIFEST
from loradar_cli.store.store import ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS
from tests.conftest import make_adapter, make_base


def test_round_trip_reproduces_logits_exactly(tiny):
    store, base, adapter, model = tiny
    x = torch.rand(4, 1, 16, 16)
    reloaded = load_model(store, base.name, adapter.name)
    assert torch.equal(model.eval()(x), reloaded(x))
    assert not torch.equal(load_model(store, base.name)(x), reloaded(x))


def test_layout_is_peft_and_metadata_validates(tiny):
    store, _, adapter, _ = tiny
    folder = store.adapter_dir(adapter.name)
    assert {p.name for p in folder.iterdir()} == {ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_META, MANIFEST}
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == adapter.lora.targets
    assert config["modules_to_save"] == ["fc"]
    assert len(adapter.tensors_sha256) == 64 and adapter.base_fingerprint == store.base_meta("tiny").fingerprint


def test_peft_loads_loradar_adapter_with_identical_logits(tiny):
    peft = pytest.importorskip("peft")
    import timm

    store, base, adapter, model = tiny
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    net.load_state_dict(store.load_base(base.name).state)
    peft_model = peft.PeftModel.from_pretrained(net, str(store.adapter_dir(adapter.name))).eval()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        ours = model.eval()(x)
        theirs = peft_model(model.normalize(x))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_wrong_base_is_refused(tiny):
    store, _, adapter, _ = tiny
    make_base(store, "other", seed=5)
    with pytest.raises(IncompatibleError, match="trained on base 'tiny'"):
        load_model(store, "other", adapter.name)


@pytest.mark.parametrize("victim", [ADAPTER_WEIGHTS, ADAPTER_META])
def test_corrupt_files_are_reported(tiny, victim):
    store, base, adapter, _ = tiny
    path = store.adapter_dir(adapter.name) / victim
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CorruptError):
        load_model(store, base.name, adapter.name)


def test_tampered_tensors_fail_checksum(tiny):
    from safetensors.torch import load_file, save_file

    store, _base, adapter, _ = tiny
    path = store.adapter_dir(adapter.name) / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(path))
    with pytest.raises(CorruptError, match="sha256"):
        store.load_adapter(adapter.name)


def test_existing_name_needs_overwrite_and_failed_write_leaves_nothing(tiny):
    store, base, adapter, _ = tiny
    with pytest.raises(ExistsError, match="already exists") as err:
        make_adapter(store, base.name, adapter.name)
    assert "--overwrite" in err.value.one_line()
    make_adapter(store, base.name, adapter.name + "2")
    before = sorted(p.name for p in store.root.iterdir())

    class Boom(dict):
        def items(self):
            yield ADAPTER_META, b"{}"
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.write_entry("adapter", "half", Boom())
    assert sorted(p.name for p in store.root.iterdir()) == before


def test_missing_and_invalid_names(store):
    with pytest.raises(NotFoundError, match="no adapter 'nope'") as err:
        store.adapter_meta("nope")
    assert "store is empty" in err.value.one_line()
    with pytest.raises(InvalidValueError):
        store.adapter_dir("../escape")
    with pytest.raises(InvalidValueError, match="reserved"):
        store.adapter_dir("bases")
