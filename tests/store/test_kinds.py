"""store.kinds: each kind's files are parsed and checked by its own rule; a change to any part is refused."""

import json

import pytest
import torch
from safetensors.torch import load, save

from loradar_cli.errors import CorruptError
from loradar_cli.store.kinds import KINDS, check_entry_files


def _files(store, kind: str, name: str) -> dict[str, bytes]:
    return {f: (store.entry_dir(kind, name) / f).read_bytes() for f in KINDS[kind].files}


def _retensor(data: bytes, change) -> bytes:
    tensors = load(data)
    key = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[key] = change(tensors[key].clone())
    return save(tensors)


def test_stored_entries_pass_their_kind_s_checks(tiny):
    store, base, adapter, _ = tiny
    meta, state = check_entry_files("base", base.name, _files(store, "base", base.name), store.base_dir(base.name))
    assert meta == store.base_meta(base.name) and set(state) == set(store.load_base(base.name).state)
    meta, tensors = check_entry_files("adapter", adapter.name, _files(store, "adapter", adapter.name), store.root)
    assert meta == store.adapter_meta(adapter.name) and set(tensors) == set(store.load_adapter(adapter.name).tensors)


@pytest.mark.parametrize(
    ("kind", "message"),
    [("base", "do not match their recorded sha256 fingerprint"), ("adapter", "do not match their recorded sha256")],
)
def test_changed_weights_are_refused_by_their_kind_s_hash(tiny, kind, message):
    store, base, adapter, _ = tiny
    name = base.name if kind == "base" else adapter.name
    files = _files(store, kind, name)
    weights = KINDS[kind].weights_file
    files[weights] = _retensor(files[weights], lambda t: t + 1e-3)
    with pytest.raises(CorruptError, match=message):
        check_entry_files(kind, name, files, store.root)


def test_an_adapter_s_peft_config_must_agree_and_its_files_be_complete(tiny):
    store, _, adapter, _ = tiny
    files = _files(store, "adapter", adapter.name)
    config = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}).encode()
    with pytest.raises(CorruptError, match=r"disagrees with loradar\.json on lora_alpha"):
        check_entry_files("adapter", adapter.name, files, store.root)
    del files["adapter_config.json"]
    with pytest.raises(CorruptError, match=r"adapter_config\.json is missing"):
        check_entry_files("adapter", adapter.name, files, store.root)


def test_an_identifier_with_non_finite_weights_is_refused(store):
    store.save_identifier(
        "who",
        {"base": "tiny", "base_fingerprint": "0" * 64, "members": ["a"], "classes": ["clean", "pgd"]},
        {"weight": torch.ones(2, 3)},
    )
    files = _files(store, "identifier", "who")
    files["identifier.safetensors"] = save({"weight": torch.tensor([[1.0, float("nan"), 0.0]] * 2)})
    with pytest.raises(CorruptError, match="NaN or infinite"):
        check_entry_files("identifier", "who", files, store.root)
