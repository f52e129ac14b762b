"""store.kinds: each kind's files are parsed and checked by its own rule; a change to any part is refused; every
kind (folder kinds and pools) lists, reads, renames and removes its entries through the same `Store` calls."""

import json

import pytest
import torch
from safetensors.torch import load, save

from loradar_cli.errors import CorruptError, ExistsError, NotFoundError
from loradar_cli.store.kinds import ENTRY_KINDS, KINDS, check_entry_files
from loradar_cli.store.pools import PoolManifest, save_pool
from tests.conftest import make_adapter, make_base


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


def _make_base(store, name):
    make_base(store, name)


def _make_adapter(store, name):
    make_adapter(store, "b", name)


def _make_identifier(store, name):
    meta = {"base": "b", "base_fingerprint": store.base_meta("b").fingerprint, "members": ["a", ":x"], "classes": ["c"]}
    store.save_identifier(name, meta, {"weight": torch.ones(2, 3)})


def _make_pool(store, name):
    save_pool(store.root, PoolManifest(name=name, key="eps", values=["1", "2"], members=["a", "a"]))


# kind -> (how to write an entry of it, the links its entry has: (relation, (kind, name)))
MAKERS = {
    "base": (_make_base, []),
    "adapter": (_make_adapter, [("base", ("base", "b"))]),
    "identifier": (_make_identifier, [("base", ("base", "b")), ("member", ("adapter", "a"))]),
    "pool": (_make_pool, [("member", ("adapter", "a"))]),
}


def test_every_entry_kind_has_a_contract_case():
    assert set(MAKERS) == set(ENTRY_KINDS)


def _stored_name(store, kind: str, name: str) -> str:
    """The name recorded in the entry's metadata file, read from disk without the store."""
    path = store.entry_path(kind, name)
    meta_file = path / KINDS[kind].meta_file if kind in KINDS else path
    return json.loads(meta_file.read_text())["name"]


@pytest.mark.parametrize("kind", list(MAKERS))
def test_each_kind_lists_reads_renames_and_removes_its_entries(store, kind):
    make, links = MAKERS[kind]
    make_base(store, "b")
    make_adapter(store, "b", "a")
    before = {k: store.names(k) for k in ENTRY_KINDS}
    make(store, "e")
    make(store, "t")
    assert store.names(kind) == sorted({*before[kind], "e", "t"}) and store.has(kind, "e")
    assert store.meta(kind, "e").name == "e" == _stored_name(store, kind, "e")
    assert sorted((r.relation, r.target) for r in store.references() if r.source == (kind, "e")) == sorted(links)
    assert store.kinds_of("e") == [kind] and store.resolve_kind("e") == kind

    with pytest.raises(ExistsError, match=f"{kind} 't' already exists"):
        store.rename(kind, "e", "t")
    assert store.meta(kind, "e").name == "e" and store.meta(kind, "t").name == "t"

    assert store.rename(kind, "e", "f") == []
    assert not store.has(kind, "e") and not store.entry_path(kind, "e").exists()
    assert store.meta(kind, "f").name == "f" == _stored_name(store, kind, "f")
    assert sorted((r.relation, r.target) for r in store.references() if r.source == (kind, "f")) == sorted(links)
    assert store.names(kind) == sorted({*before[kind], "f", "t"})

    assert store.remove(kind, "f") == []
    assert not store.has(kind, "f") and not store.entry_path(kind, "f").exists()
    assert store.names(kind) == sorted({*before[kind], "t"})
    assert {k: store.names(k) for k in ENTRY_KINDS if k != kind} == {k: v for k, v in before.items() if k != kind}
    assert store.leftovers() == []
    with pytest.raises(NotFoundError):
        store.remove(kind, "f")
    with pytest.raises(NotFoundError):
        store.meta(kind, "f")
