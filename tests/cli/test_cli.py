"""CLI behaviour: machine output on stdout only, one-line errors with non-zero exits, nothing half-written."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from loradar_cli.cli.app import app
from loradar_cli.errors import EXIT_CODES

runner = CliRunner()


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from loradar_cli.cli.app import app; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_list_json_is_the_only_stdout(tiny):
    store, base, adapter, _ = tiny
    result = invoke("list", "--store", str(store.root), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [b["name"] for b in data["bases"]] == [base.name]
    assert [a["name"] for a in data["adapters"]] == [adapter.name]


def test_show_json(tiny):
    store, _, adapter, _ = tiny
    result = invoke("show", adapter.name, "--store", str(store.root), "--json")
    assert json.loads(result.stdout)["lora"]["targets"] == adapter.lora.targets


def test_eval_json_parses_and_matches_library(tiny):
    store, base, adapter, model = tiny
    result = invoke(
        "eval",
        "--store",
        str(store.root),
        "--adapter",
        adapter.name,
        "--attack",
        "fgsm",
        "--eps",
        "8/255",
        "--limit",
        "40",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["base"] == base.name and [r["model"] for r in report["rows"]] == ["base", adapter.name]
    assert report["attacks"]["fgsm"]["eps"] == pytest.approx(8 / 255)
    from loradar_cli.data import load_data

    data = load_data("digits", "test", limit=40, channels=1, size=16)
    expected = (model.eval()(data.x).argmax(1) == data.y).float().mean().item()
    assert report["rows"][1]["clean"] == pytest.approx(expected)
    for row in report["rows"]:
        assert row["worst_case"] <= min(row["clean"], row["attacks"]["fgsm"])


def test_attack_writes_a_set_that_eval_reads(tiny, tmp_path):
    store, base, _, _ = tiny
    out = tmp_path / "sets" / "fgsm.safetensors"
    result = invoke(
        "attack",
        "--store",
        str(store.root),
        "--base",
        base.name,
        "--attack",
        "fgsm",
        "--eps",
        "0.1",
        "--limit",
        "16",
        "--out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    from loradar_cli.advset import load_adv_set

    adv = load_adv_set(out)
    assert adv.attack == "fgsm" and len(adv.y) == 16 == summary["n"]
    assert adv.info["config"]["config"]["eps"] == pytest.approx(0.1)
    result = invoke(
        "eval",
        "--store",
        str(store.root),
        "--base",
        base.name,
        "--adv-set",
        str(out),
        "--limit",
        "16",
        "--json",
        "--quiet",
    )
    row = json.loads(result.stdout)["rows"][0]
    assert row["adv_sets"]["fgsm.safetensors"] == pytest.approx(summary["target_accuracy"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--base", "nope"], "no base 'nope'"),
        (["eval", "--base", "tiny", "--attack", "pgd", "--eps", "-1"], "--eps must be >= 0"),
        (["eval", "--base", "tiny", "--attack", "pgd", "--eps", "eight"], "fraction such as 8/255"),
        (["eval", "--base", "tiny", "--attack", "nosuch"], "valid: apgd"),
        (["eval", "--base", "tiny", "--data", "mnist:/does/not/exist"], "not found"),
        (["eval", "--base", "tiny", "--adv-set", "/does/not/exist.safetensors"], "does not exist"),
        (["finetune", "--name", "x", "--model", "not_a_model_xyz"], "unknown timm model"),
        (["train", "--base", "tiny", "--attack", "pgd", "--name", "ad"], "already exists"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(tiny, args, message):
    store = tiny[0]
    result = invoke(*args, "--store", str(store.root))
    assert result.exit_code in set(EXIT_CODES.values())
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_wrong_base_and_corrupt_adapter_leave_store_unchanged(tiny):
    from tests.conftest import make_base

    store, _, adapter, _ = tiny
    make_base(store, "other", seed=3)
    before = sorted(p.name for p in store.root.rglob("*"))
    result = invoke("eval", "--store", str(store.root), "--base", "other", "--adapter", adapter.name)
    assert result.exit_code == EXIT_CODES["IncompatibleError"] and "trained on base 'tiny'" in result.stderr
    (store.adapter_dir(adapter.name) / "adapter_model.safetensors").write_bytes(b"garbage")
    result = invoke("eval", "--store", str(store.root), "--adapter", adapter.name)
    assert result.exit_code == EXIT_CODES["CorruptError"] and "does not match its sha256" in result.stderr
    assert sorted(p.name for p in store.root.rglob("*")) == before


def test_adapter_names_from_stdin(tiny):
    store, _, adapter, _ = tiny
    result = invoke(
        "eval",
        "--store",
        str(store.root),
        "--adapter",
        "-",
        "--limit",
        "8",
        "--json",
        "--quiet",
        input=f"{adapter.name}\n",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows"][1]["model"] == adapter.name
