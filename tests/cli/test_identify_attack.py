"""CLI of identify-attack: held-out fit report, per-class scores and unknown column, plot path, mode registry."""

import json

import pytest
import torch
from typer.testing import CliRunner

from loradar_cli.cli.app import app
from tests.conftest import make_adapter, make_base

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Base 'tiny' with adapters a (pgd), b (fgsm); a 'fgsm' set of digits with a ±0.3 sign perturbation."""
    from loradar_cli.advset import AdvSet, save_adv_set
    from loradar_cli.data import load_data
    from loradar_cli.store.store import Store

    folder = tmp_path_factory.mktemp("cli-identify")
    store = Store(folder / "store")
    make_base(store)
    make_adapter(store, "tiny", "a", seed=1, attack="pgd")
    make_adapter(store, "tiny", "b", seed=2, attack="fgsm")
    for split in ("val", "test"):
        data = load_data("digits", split, limit=24, channels=1, size=16)
        signs = torch.randint(0, 2, data.x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        save_adv_set(folder / f"{split}-fgsm.safetensors", AdvSet((data.x + 0.3 * signs).clamp(0, 1), data.y, "fgsm"))
    return folder


def invoke(root, *args: str):
    return runner.invoke(app, [*args, "--store", str(root / "store")])


def test_fit_reports_held_out_next_to_training_then_predict_reports_per_class(root, tmp_path):
    val, test = str(root / "val-fgsm.safetensors"), str(root / "test-fgsm.safetensors")
    fit = invoke(root, "fit-identifier", "a", "b", "--adv-set", val, "--data", "digits", "--limit", "24",
                 "--epochs", "100", "--name", "idc", "--json")  # fmt: skip
    assert fit.exit_code == 0, fit.stderr
    report = json.loads(fit.stdout)
    held = report["held_out"]
    assert held["n"] == 12 and report["training"]["n_fit"] == 36  # a quarter of each class held out
    assert held["confusion"]["columns"][-1] == "unknown" and held["confusion"]["rows"] == ["clean", "fgsm"]
    assert sum(map(sum, held["confusion"]["matrix"])) == 12
    # the ±0.3 sign plateau is trivially separable: the held-out part must be right
    assert report["held_out_accuracy"] == 1.0
    plot = tmp_path / "cm.png"
    pred = invoke(root, "identify-attack", "--identifier", "idc", "--adv-set", test, "--data", "digits",
                  "--limit", "24", "--plot", str(plot))  # fmt: skip
    assert pred.exit_code == 0, pred.stderr
    assert f"confusion matrix plot: {plot}" in " ".join(pred.stderr.split()) and plot.stat().st_size > 0
    assert "precision" in pred.stderr and pred.stdout == ""
    as_json = json.loads(
        invoke(
            root,
            "identify-attack",
            "--identifier",
            "idc",
            "--adv-set",
            test,
            "--data",
            "digits",
            "--limit",
            "24",
            "--json",
        ).stdout
    )
    matrix = as_json["confusion"]["matrix"]
    recall = {row: line[as_json["confusion"]["columns"].index(row)] / sum(line)
              for row, line in zip(as_json["confusion"]["rows"], matrix, strict=True)}  # fmt: skip
    assert {k: v["recall"] for k, v in as_json["per_class"].items()} == pytest.approx(recall)
    assert as_json["mode"] == "calibrated" and as_json["features"]
    closed = json.loads(
        invoke(root, "identify-attack", "--identifier", "idc", "--no-reject", "--adv-set", test, "--json").stdout
    )
    assert closed["reject"] is False and closed["unknown_rate"] == 0.0
    assert closed["confusion"]["matrix"][0][-1] == 0  # nothing in the unknown column


def test_fit_human_output_labels_held_out_and_training(root):
    val = str(root / "val-fgsm.safetensors")
    fit = invoke(root, "fit-identifier", "a", "b", "--adv-set", val, "--data", "digits", "--limit", "24",
                 "--epochs", "50", "--features", "plateau,confidence", "--name", "idh")  # fmt: skip
    assert fit.exit_code == 0, fit.stderr
    assert fit.stdout == "idh\n"
    text = " ".join(fit.stderr.split())
    assert "training accuracy (inputs it was fitted on, n=36)" in text and "held-out accuracy (n=12" in text
    shown = json.loads((root / "store" / "identifiers" / "idh" / "identifier.json").read_text())
    assert shown["feature_groups"] == ["plateau", "confidence"] and shown["schema_version"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["identify-attack", "a", "b", "--mode", "best", "--data", "digits"], "valid: calibrated, relative-rule, rule"),
        (["identify-attack", "a", "b", "--mode", "relative-rule"], "--data SPEC and/or --adv-set"),
        (["fit-identifier", "a", "--name", "x", "--data", "digits", "--features", "nope"], "valid: "),
    ],
)
def test_bad_input_is_one_line(root, args, message):
    from loradar_cli.errors import EXIT_CODES

    result = invoke(root, *args)
    assert result.exit_code in {EXIT_CODES["InvalidValueError"], EXIT_CODES["NotFoundError"]}, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_features_lists_the_registry():
    from loradar_cli.ops.identify_features import IDENTIFY_FEATURES

    result = runner.invoke(app, ["fit-identifier", "--list-features"])
    assert result.exit_code == 0
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == IDENTIFY_FEATURES.names()
