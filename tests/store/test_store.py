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


# ---------------------------------------------------------------------------------------------- integrity
def _rewrite_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path.write_text(json.dumps(data))


def _rehash(folder):
    """Rewrite manifest.json to match the files now there (what a careful tamperer would do)."""
    import hashlib

    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in manifest["files"]}
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("kind", "filename", "change"),
    [
        ("adapter", ADAPTER_META, {"lora.lora_alpha": 64.0}),
        ("adapter", ADAPTER_CONFIG, {"lora_alpha": 64.0}),
        ("base", "base.json", {"mean": [0.9]}),
        ("base", "base.json", {"std": [0.01]}),
    ],
)
def test_edited_metadata_is_refused(tiny, kind, filename, change):
    store, base, adapter, _ = tiny
    name = adapter.name if kind == "adapter" else base.name
    path = store.entry_dir(kind, name) / filename
    _rewrite_json(path, **change)
    with pytest.raises(CorruptError, match="sha256"):
        load_model(store, base.name, adapter.name)


def test_tensors_rewritten_with_their_recorded_hash_are_refused(tiny):
    from safetensors.torch import load_file, save_file

    from loradar_cli.models import weights_fingerprint

    store, _base, adapter, _ = tiny
    folder = store.adapter_dir(adapter.name)
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 3
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    _rewrite_json(folder / ADAPTER_META, tensors_sha256=weights_fingerprint(tensors))
    with pytest.raises(CorruptError, match="manifest"):
        store.load_adapter(adapter.name)


def test_config_disagreement_nan_and_wrong_rank_are_refused_even_when_rehashed(tiny):
    from safetensors.torch import load_file, save_file

    from loradar_cli.models import weights_fingerprint

    store, _, adapter, _ = tiny
    folder = store.adapter_dir(adapter.name)
    _rewrite_json(folder / ADAPTER_CONFIG, lora_alpha=64.0)
    _rehash(folder)
    with pytest.raises(CorruptError, match=r"disagrees with loradar\.json on lora_alpha"):
        store.load_adapter(adapter.name)
    (folder / ADAPTER_CONFIG).write_text(
        json.dumps(json.loads((folder / ADAPTER_CONFIG).read_text()) | {"lora_alpha": 4.0})
    )
    _rehash(folder)
    store.load_adapter(adapter.name)  # consistent again
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    for bad, match in [(float("nan"), "NaN"), (None, "rank")]:
        changed = dict(tensors)
        changed[key] = tensors[key].clone().fill_(bad) if bad is not None else tensors[key][:, :1].contiguous()
        save_file(changed, str(folder / ADAPTER_WEIGHTS))
        _rewrite_json(folder / ADAPTER_META, tensors_sha256=weights_fingerprint(changed))
        _rehash(folder)
        with pytest.raises(CorruptError, match=match):
            store.load_adapter(adapter.name)


def test_modes_follow_the_umask(store):
    import os
    import stat

    old = os.umask(0o002)
    try:
        make_base(store)
    finally:
        os.umask(old)
    paths = [store.root, store.root / "bases", *(store.root / "bases").rglob("*")]
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o775 if path.is_dir() else 0o664), (path, oct(mode))


def test_symlinked_kind_folder_is_never_followed(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store.root.mkdir(parents=True)
    (store.root / "bases").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CorruptError, match="symbolic link"):
        make_base(store)
    assert list(outside.iterdir()) == [] and store.base_names() == []


def test_symlinked_entry_is_not_listed_or_read(tiny, tmp_path):
    import shutil

    store, _, adapter, _ = tiny
    shutil.copytree(store.adapter_dir(adapter.name), tmp_path / "elsewhere")
    (store.root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert "linked" not in store.adapter_names()
    with pytest.raises(CorruptError, match="symbolic link"):
        store.adapter_meta("linked")


# ---------------------------------------------------------------------------------------------- faults
def test_leftovers_are_ignored_by_readers_and_cleaned_by_the_next_writer(tiny):
    store, base, adapter, _ = tiny
    (store.root / ".tmp-half-abc12345").mkdir()
    (store.root / ".tmp-half-abc12345" / ADAPTER_META).write_text("{")
    (store.root / "bases" / ".tmp-tiny-zz").mkdir()
    assert store.adapter_names() == [adapter.name] and store.base_names() == [base.name]
    make_adapter(store, base.name, "next")
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    assert (store.root / "bases" / ".tmp-tiny-zz").exists()  # another kind's folder: its writer cleans it


def test_entry_left_aside_by_a_killed_overwrite_is_put_back(tiny):
    import os

    store, base, adapter, _ = tiny
    before = store.load_adapter(adapter.name).tensors
    aside = store.root / f".old-{adapter.name}-k1ll3d00"
    aside.mkdir()
    os.replace(store.adapter_dir(adapter.name), aside / "entry")  # state after a kill mid-swap
    assert adapter.name not in store.adapter_names()
    make_adapter(store, base.name, "other")  # any writer of the kind recovers it
    after = store.load_adapter(adapter.name).tensors
    assert all(after[k].equal(v) for k, v in before.items()) and not aside.exists()


def test_overwrite_swaps_atomically_and_leaves_nothing(tiny):
    store, _base, adapter, _ = tiny
    old = store.load_adapter(adapter.name).tensors
    meta = store.adapter_meta(adapter.name)
    new = {k: v + 1 for k, v in old.items()}
    store.save_adapter(meta, new, overwrite=True)
    loaded = store.load_adapter(adapter.name).tensors
    assert all(loaded[k].equal(v) for k, v in new.items())
    assert sorted(p.name for p in store.root.iterdir() if p.name.startswith(".")) == []


def test_a_name_claimed_by_another_process_is_refused(tiny):
    import subprocess
    import sys

    from loradar_cli.store.lock import lock_path

    store, base, adapter, _ = tiny
    path = lock_path(store.root, "adapter", "busy")
    code = (
        "import sys, time; from pathlib import Path; from loradar_cli.store import lock; "
        f"lock.claim(Path({str(path)!r}), 'x'); print('held', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ExistsError, match=f"being written by another loradar process \\(pid {holder.pid}\\)"):
            store.check_free("adapter", "busy")
        with pytest.raises(ExistsError, match="being written by another"):
            make_adapter(store, base.name, "busy")
        store.check_free("adapter", "free")  # another name is not disturbed
        make_adapter(store, base.name, "free")
    finally:
        holder.kill()
        holder.wait()
    assert path.exists()  # a killed holder leaves its (unlocked) file ...
    make_adapter(store, base.name, "busy")  # ... which does not block the next writer, who removes it
    assert not (store.root / ".locks").exists()
    assert store.adapter_names() == sorted([adapter.name, "busy", "free"])


# ---------------------------------------------------------------------------------------------- identifiers
def test_identifiers_keep_their_own_fields_and_are_checked(store):
    from loradar_cli.models import weights_fingerprint

    make_base(store)
    tensors = {"weight": torch.randn(3, 4), "bias": torch.zeros(3)}
    meta = {"members": ["a", ":base"], "mode": "calibrated", "classes": ["clean", "pgd", "fgsm"], "extra": {"k": 1}}
    meta["tensors_sha256"] = weights_fingerprint(tensors)
    store.save_identifier("who", meta, tensors)
    raw, loaded = store.load_identifier("who")
    assert raw == {"name": "who", **meta} and all(loaded[k].equal(v) for k, v in tensors.items())
    assert store.identifier_names() == ["who"]
    with pytest.raises(InvalidValueError, match="members"):
        store.save_identifier("bad", {"mode": "rule"}, tensors)
    with pytest.raises(CorruptError, match="NaN"):
        store.save_identifier("nan", {"members": ["a"]}, {"w": torch.tensor([float("nan")])})
    _rewrite_json(store.identifier_dir("who") / "identifier.json", classes=["pgd", "clean", "fgsm"])
    with pytest.raises(CorruptError, match="sha256"):
        store.load_identifier("who")
