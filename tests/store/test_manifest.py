"""Store format versions: the checked-in format-1 store (tests/data/store-v1, made by loradar 0.1) still loads,
migrates to per-entry manifests on the first write, and stores or entries from a newer version are refused by name.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from loradar_cli.errors import CorruptError, IncompatibleError
from loradar_cli.store.manifest import MANIFEST, STORE_FORMAT, STORE_MARKER
from loradar_cli.store.store import KINDS, Store

V1 = Path(__file__).resolve().parent.parent / "data" / "store-v1"


@pytest.fixture
def v1(tmp_path) -> Store:
    shutil.copytree(V1, tmp_path / "store")
    return Store(tmp_path / "store")


def test_v1_fixture_loads_every_entry_and_peft_agrees(v1):
    peft = pytest.importorskip("peft")
    import timm

    from loradar_cli.loading import load_model

    assert v1.store_format() == 1
    assert v1.base_names() == ["tiny"] and v1.adapter_names() == ["both", "both-r1", "fgsm", "pgd"]
    raw, tensors = v1.load_identifier("who")
    assert raw["members"] == ["pgd", "fgsm", ":base"] and tensors
    base = v1.load_base("tiny")
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in v1.adapter_names():
        ours = load_model(v1, "tiny", name)
        net = timm.create_model("test_resnet", num_classes=10, in_chans=1, **base.meta.model_kwargs)
        net.load_state_dict(base.state)
        theirs = peft.PeftModel.from_pretrained(net, str(v1.adapter_dir(name))).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ours.normalize(x)), ours(x), rtol=1e-5, atol=1e-5)


def test_first_write_migrates_every_entry_without_touching_its_files(v1):
    from loradar_cli.store.verify import verify_store

    before = {p.relative_to(v1.root): p.read_bytes() for p in v1.root.rglob("*") if p.is_file()}
    v1.remove("adapter", "both-r1")
    assert json.loads((v1.root / STORE_MARKER).read_text()) == {"format": STORE_FORMAT}
    for kind in KINDS:
        for name in v1.names(kind):
            assert (v1.entry_dir(kind, name) / MANIFEST).is_file()
    after = {p.relative_to(v1.root): p.read_bytes() for p in v1.root.rglob("*") if p.is_file()}
    kept = {k: v for k, v in before.items() if not str(k).startswith("both-r1/")}
    assert {k: after[k] for k in kept} == kept  # no v1 file rewritten
    assert verify_store(v1) == ([], 5)
    (v1.adapter_dir("pgd") / MANIFEST).unlink()  # a migrated store no longer accepts an entry without one
    with pytest.raises(CorruptError, match=r"no manifest\.json"):
        v1.load_adapter("pgd")


def test_damaged_v1_entry_is_not_blessed_by_migration(v1):
    path = v1.adapter_dir("fgsm") / "loradar.json"
    data = json.loads(path.read_text())
    data["tensors_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    v1.remove("adapter", "both-r1")
    assert not (v1.adapter_dir("fgsm") / MANIFEST).exists()
    with pytest.raises(CorruptError):
        v1.load_adapter("fgsm")


def test_newer_store_entry_or_schema_is_refused_naming_the_version(v1):
    (v1.root / STORE_MARKER).write_text(json.dumps({"format": STORE_FORMAT + 1}))
    with pytest.raises(IncompatibleError, match=f"store format {STORE_FORMAT + 1}") as err:
        v1.load_adapter("pgd")
    assert "upgrade loradar" in err.value.one_line()
    (v1.root / STORE_MARKER).unlink()
    path = v1.adapter_dir("pgd") / "loradar.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"schema_version": 7}))
    with pytest.raises(IncompatibleError, match="schema version 7"):
        v1.adapter_meta("pgd")
    (v1.adapter_dir("fgsm") / MANIFEST).write_text(
        json.dumps({"format": 9, "kind": "adapter", "name": "fgsm", "files": {}})
    )
    with pytest.raises(IncompatibleError, match="store format 9"):
        v1.load_adapter("fgsm")
