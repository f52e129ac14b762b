"""CLI of store management: export/import bundles, rm, mv, verify, list and show over every kind."""

import io
import json
import shutil
import tarfile
import zipfile

import pytest
from typer.testing import CliRunner

from loradar_cli.cli.app import app
from loradar_cli.errors import EXIT_CODES
from loradar_cli.store.store import Store
from tests.conftest import make_adapter, make_base

runner = CliRunner()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store: base 'tiny', adapters a (pgd) and b (fgsm), their linear merge 'm', an identifier 'who' on a, b."""
    from loradar_cli.jobs.merge import merge_adapters

    store = Store(tmp_path_factory.mktemp("store-cli") / "store")
    make_base(store)
    make_adapter(store, "tiny", "a", seed=1, attack="pgd")
    make_adapter(store, "tiny", "b", seed=2, attack="fgsm")
    merge_adapters(store, ["a", "b"], name="m", method="linear", weights=[0.25, 0.75])
    base = store.base_meta("tiny")
    store.save_identifier(
        "who", {"members": ["a", "b", ":base"], "base": "tiny", "base_fingerprint": base.fingerprint}, _ident_tensors()
    )
    return store.root


def _ident_tensors():
    import torch

    return {"weight": torch.arange(12.0).reshape(3, 4)}


@pytest.fixture
def root(template, tmp_path):
    shutil.copytree(template, tmp_path / "store")
    return tmp_path / "store"


def invoke(root, *args: str):
    return runner.invoke(app, [*args, "--store", str(root)])


def files_of(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("suffix", [".tar", ".zip", ".tar.gz"])
def test_export_import_round_trip_is_bit_exact_and_keeps_provenance(root, tmp_path, suffix):
    bundle = tmp_path / f"m{suffix}"
    out = invoke(root, "export", "m", "--out", str(bundle), "--json")
    assert out.exit_code == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["entries"] == ["base tiny", "adapter a", "adapter b", "adapter m"]
    empty = tmp_path / "empty"
    result = invoke(empty, "import", str(bundle))
    assert result.exit_code == 0, result.stderr
    source, copy = files_of(root), files_of(empty)
    exported = {k for k in source if not k.startswith("identifiers/") and k != "loradar-store.json"}
    assert {k: copy[k] for k in exported} == {k: source[k] for k in exported}
    assert json.loads(copy["m/loradar.json"])["parents"] == ["a", "b"]
    assert invoke(empty, "verify").exit_code == 0
    again = invoke(empty, "import", str(bundle))  # identical entries are skipped, not duplicated or refused
    assert again.exit_code == 0 and "already present, identical: adapter m" in again.stderr


def _tamper_member(bundle, out, member, change):
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for info in src:
            data = src.extractfile(info).read()
            if info.name == member:
                data, info = change(data, info)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def _flip(data, info):
    return data[:100] + bytes([data[100] ^ 1]) + data[101:], info


def _escape(data, info):
    info = tarfile.TarInfo("adapters/../../evil/adapter_model.safetensors")
    return data, info


@pytest.mark.parametrize("change", [_flip, _escape], ids=["flipped-byte", "path-traversal"])
def test_damaged_or_escaping_bundle_is_refused_with_nothing_written(root, tmp_path, change):
    bundle, bad = tmp_path / "a.tar", tmp_path / "bad.tar"
    assert invoke(root, "export", "a", "--out", str(bundle)).exit_code == 0
    _tamper_member(bundle, bad, "adapters/a/adapter_model.safetensors", change)
    target = tmp_path / "target"
    result = invoke(target, "import", str(bad))
    assert result.exit_code == EXIT_CODES["CorruptError"] and result.stderr.count("\n") <= 2, result.stderr
    assert ("sha256" if change is _flip else "outside its entry folder") in result.stderr
    assert not target.exists() and not (tmp_path / "evil").exists()


def test_zip_with_a_symlink_member_is_refused(root, tmp_path):
    bad = tmp_path / "link.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        info = zipfile.ZipInfo("adapters/a/adapter_model.safetensors")
        info.external_attr = (0o120777) << 16
        archive.writestr(info, "/etc/passwd")
    result = invoke(tmp_path / "t", "import", str(bad))
    assert (
        result.exit_code == EXIT_CODES["CorruptError"]
        and "not a regular file" in result.stderr
        and not (tmp_path / "t").exists()
    )


def test_bundle_for_a_different_base_is_refused_with_nothing_written(root, tmp_path):
    bundle = tmp_path / "a.tar"
    assert invoke(root, "export", "a", "--no-base", "--out", str(bundle)).exit_code == 0
    with tarfile.open(bundle) as archive:
        assert not [m for m in archive.getnames() if m.startswith("bases/")]
    other = Store(tmp_path / "other")
    make_base(other, "tiny", seed=7)  # same name, other weights
    before = files_of(other.root)
    result = invoke(other.root, "import", str(bundle))
    assert result.exit_code == EXIT_CODES["IncompatibleError"] and "trained on base 'tiny' with sha256" in result.stderr
    assert files_of(other.root) == before
    lonely = invoke(tmp_path / "none", "import", str(bundle))
    assert (
        lonely.exit_code == EXIT_CODES["IncompatibleError"]
        and "neither in the bundle nor in the store" in lonely.stderr
    )


def test_rm_of_a_merge_parent_is_refused_and_force_names_the_orphans(root):
    refused = invoke(root, "rm", "a")
    assert refused.exit_code == EXIT_CODES["IncompatibleError"]
    assert "adapter 'm' uses it as parent" in refused.stderr and "identifier 'who' uses it as member" in refused.stderr
    assert Store(root).has_adapter("a")
    forced = invoke(root, "rm", "a", "--force", "--json")
    assert forced.exit_code == 0, forced.stderr
    orphans = {(o["kind"], o["name"], o["relation"]) for o in json.loads(forced.stdout)["orphans"]}
    assert orphans == {("adapter", "m", "parent"), ("identifier", "who", "member")}
    assert not Store(root).has_adapter("a")
    assert invoke(root, "rm", "m", "who", "b").exit_code == 0  # removed together: no outside dependents
    assert Store(root).adapter_names() == []


def test_mv_renames_every_kind_and_refuses_to_break_links(root):
    assert "base 'tiny'" not in invoke(root, "mv", "who", "whom").stderr
    store = Store(root)
    assert store.identifier_names() == ["whom"] and store.load_identifier("whom")[0]["name"] == "whom"
    refused = invoke(root, "mv", "tiny", "small")
    assert refused.exit_code == EXIT_CODES["IncompatibleError"] and "adapter 'a' uses it as base" in refused.stderr
    assert invoke(root, "mv", "m", "merged").exit_code == 0
    assert store.load_adapter("merged").meta.name == "merged"
    taken = invoke(root, "mv", "a", "b")
    assert taken.exit_code == EXIT_CODES["ExistsError"] and "already exists" in taken.stderr
    assert invoke(root, "verify").exit_code == 0


def test_verify_reports_each_problem_on_its_own_line(root):
    from safetensors.torch import load_file, save_file

    store = Store(root)
    path = store.adapter_dir("a") / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(path))
    (store.adapter_dir("b") / "adapter_config.json").unlink()
    stale = root / ".tmp-c-deadbeef"
    stale.mkdir()
    result = invoke(root, "verify")
    assert result.exit_code == EXIT_CODES["LoradarError"]
    lines = result.stdout.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("adapter a:") and "adapter_model.safetensors does not match its sha256" in lines[0]
    assert lines[1].startswith("adapter b:") and "adapter_config.json is missing" in lines[1]
    assert lines[2].startswith(str(stale)) and "leftover" in lines[2]
    fixed = invoke(root, "verify", "--fix")
    assert not stale.exists() and len(fixed.stdout.splitlines()) == 2


def test_list_names_on_stdout_filters_and_uncut_table(root):
    long_name = "a-very-long-adapter-name-that-would-not-fit-in-eighty-columns-x"
    make_adapter(Store(root), "tiny", long_name, seed=3, attack="fgsm")
    result = invoke(root, "list")
    assert result.exit_code == 0
    assert result.stdout.split() == ["tiny", "a", long_name, "b", "m", "who"]
    assert long_name in result.stderr  # the piped table keeps whole cells
    assert invoke(root, "list", "--attack", "fgsm").stdout.split() == [long_name, "b"]
    assert invoke(root, "list", "--recipe", "linear").stdout.split() == ["m"]
    assert invoke(root, "list", "--kind", "identifier").stdout.split() == ["who"]
    data = json.loads(invoke(root, "list", "--json", "--kind", "adapter").stdout)
    assert [a["metrics"]["val_robust_acc"] for a in data["adapters"] if a["name"] == "a"] == [0.5]
    (root / ".tmp-x-12345678").mkdir()
    (root / ".tmp-x-12345678" / "loradar.json").write_text("{")
    (root / "b" / "loradar.json").write_text("{")
    damaged = invoke(root, "list")
    assert damaged.exit_code == 0 and "b" not in damaged.stdout.split() and "skipped: adapter b" in damaged.stderr


def test_show_prints_lineage_and_identifiers(root):
    shown = invoke(root, "show", "m")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["parents"] == ["a", "b"]
    tree = shown.stderr
    assert "linear, weight 0.25: adapter a" in tree and "linear, weight 0.75: adapter b" in tree
    assert "attack pgd" in tree and "base tiny" in tree
    ident = json.loads(invoke(root, "show", "who", "--json").stdout)
    assert ident["members"] == ["a", "b", ":base"]


def test_a_store_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    for args in (["list"], ["verify"], ["show", "a"]):
        result = invoke(path, *args)
        assert result.exit_code == EXIT_CODES["InvalidValueError"] and "is not a folder" in result.stderr, (
            args,
            result.stderr,
        )


def test_import_of_a_peft_folder_names_the_adapter_on_stdout(root, tmp_path):
    pytest.importorskip("peft")
    from tests.jobs.test_import_ import peft_folder

    folder, _ = peft_folder(Store(root), tmp_path)
    missing = invoke(root, "import", str(folder))
    assert missing.exit_code == EXIT_CODES["InvalidValueError"] and "needs --base" in missing.stderr
    result = invoke(root, "import", str(folder), "--base", "tiny", "--name", "from-peft")
    assert result.exit_code == 0 and result.stdout == "from-peft\n", result.stderr
    shown = json.loads(invoke(root, "show", "from-peft", "--json").stdout)
    assert shown["recipe"] == "imported" and shown["attack"] is None
    assert invoke(root, "list", "--recipe", "imported").stdout == "from-peft\n"
