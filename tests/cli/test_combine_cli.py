"""CLI of merge, trim, ensemble-vote, identify-attack and fit-identifier: names on stdout, pipes through '-', one-line errors."""

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from loradar_cli.cli.app import app
from loradar_cli.errors import EXIT_CODES
from tests.conftest import make_adapter, make_base

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A store with base 'tiny' and adapters a (pgd), b (fgsm); base 'other' with adapter x; a small fgsm set."""
    from loradar_cli.advset import AdvSet, save_adv_set
    from loradar_cli.data import load_data
    from loradar_cli.store.store import Store

    folder = tmp_path_factory.mktemp("cli-combine")
    store = Store(folder / "store")
    make_base(store)
    make_adapter(store, "tiny", "a", seed=1, attack="pgd")
    make_adapter(store, "tiny", "b", seed=2, attack="fgsm")
    make_base(store, "other", seed=5)
    make_adapter(store, "other", "x", seed=6)
    data = load_data("digits", "test", limit=16, channels=1, size=16)
    noisy = (data.x + 0.3 * torch.randn(data.x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    save_adv_set(folder / "fgsm.safetensors", AdvSet(noisy, data.y, "fgsm"))
    return folder


def invoke(root, *args: str, input: str | None = None):
    return runner.invoke(app, [*args, "--store", str(root / "store")], input=input)


def test_merge_pipes_into_trim(root):
    merged = invoke(root, "merge", "a", "b", "--method", "linear", "--weights", "0.5,0.5", "--name", "m")
    assert merged.exit_code == 0, merged.stderr
    assert merged.stdout == "m\n" and "weight" in merged.stderr
    trimmed = invoke(root, "trim", "-", "--rank", "2", "--name", "t", input=merged.stdout)
    assert trimmed.exit_code == 0, trimmed.stderr
    assert trimmed.stdout == "t\n"
    shown = json.loads(invoke(root, "show", "t", "--json").stdout)
    assert shown["parents"] == ["m"] and shown["combination"]["rank"] == 2
    assert set(shown["lora"]["rank_pattern"].values()) == {2}
    merged_meta = json.loads(invoke(root, "show", "m", "--json").stdout)
    assert merged_meta["parents"] == ["a", "b"] and merged_meta["combination"]["weights"] == [0.5, 0.5]


def test_merge_json_pipes_and_tts_prints_scores(root):
    result = invoke(
        root, "merge", "a", "b", "--method", "tts", "--support", "digits", "--shots", "2", "--name", "mt", "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [row["adapter"] for row in report["scores"]] == ["a", "b"]
    assert {"compactness", "divergence", "score", "weight"} <= set(report["scores"][0])
    assert sum(report["weights"]) == pytest.approx(1.0)
    trimmed = invoke(root, "trim", "-", "--energy", "0.95", "--name", "mt-e", "--json", input=result.stdout)
    assert trimmed.exit_code == 0, trimmed.stderr
    assert json.loads(trimmed.stdout)["parent"] == "mt"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["merge", "a", "x", "--name", "bad"], "different bases"),
        (["merge", "a", "b", "--method", "tts", "--name", "bad"], "needs a support set"),
        (["merge", "a", "b", "--weights", "1,zero", "--name", "bad"], "comma-separated numbers"),
        (["merge", "a", "b", "--method", "svd", "--name", "bad"], "unknown merge method"),
        (["trim", "a", "--name", "bad"], "--rank or --energy"),
        (["trim", "a", "--rank", "1", "--full-weight", "--name", "bad"], "cannot be combined"),
        (["trim", "a", "--full-weight", "--layers", "nomatch", "--name", "bad"], "matches --layers"),
        (["ensemble-vote", "a", "b"], "--data SPEC and/or --adv-set"),
        (["ensemble-vote", "a", "b", "--data", "digits", "--method", "best"], "unknown ensemble method"),
        (["ensemble-vote", "a", "b", "--data", "digits", "--identifier", "idn"], "route only"),
        (["eval", "--members", "a,b"], "needs --vote METHOD or --route"),
        (["eval", "--vote", "best", "--members", "a,b"], "unknown ensemble method"),
        (["identify-attack", "a", "b", "--mode", "calibrated", "--data", "digits"], "needs --identifier"),
        (["identify-attack", "a", "b", "--mode", "calibrated", "--identifier", "nope"], "no identifier 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(root, args, message):
    result = invoke(root, *args)
    assert result.exit_code in set(EXIT_CODES.values())
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_eval_adds_vote_and_route_rows_attacked_through_their_decision(root):
    result = invoke(
        root,
        "eval",
        "--adapter",
        "a",
        "--members",
        "a,b",
        "--vote",
        "majority",
        "--route",
        "--attack",
        "fgsm",
        "--eps",
        "0.1",
        "--limit",
        "12",
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["model"] for r in report["rows"]] == ["base", "a", "vote:majority", "route"]
    assert [r["attacked"] for r in report["rows"]] == ["white-box"] * 2 + ["mean logits + soft vote", "routed decision"]
    assert report["members"] == ["a", "b"]
    for row in report["rows"]:
        assert 0 <= row["worst_case"] <= min(row["clean"], row["attacks"]["fgsm"])


def test_trim_reads_exactly_one_name(root):
    result = invoke(root, "trim", "-", "--rank", "1", "--name", "bad", input="a\nb\n")
    assert result.exit_code in set(EXIT_CODES.values()) and "one adapter" in result.stderr


def test_ensemble_vote_json_and_table(root, tmp_path):
    out = tmp_path / "preds.json"
    args = [
        "ensemble-vote",
        "a",
        "b",
        "--data",
        "digits",
        "--limit",
        "12",
        "--adv-set",
        str(root / "fgsm.safetensors"),
        "--method",
        "majority",
        "--method",
        "soft",
        "--method",
        "route",
        "--compare",
        "m",
    ]
    result = invoke(root, *args, "--json", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report["sets"]) == ["clean", "fgsm.safetensors"]
    assert set(report["sets"]["clean"]["accuracy"]) == {"majority", "soft", "route"}
    assert set(report["sets"]["clean"]["adapters"]) == {"a", "b", "m"}
    assert (
        len(json.loads(out.read_text())["sets"]["fgsm.safetensors"]["methods"]["route"]) == 12
    )  # --limit applies to every set
    table = invoke(root, *args)
    assert table.exit_code == 0 and table.stdout == ""
    assert "majority vote" in table.stderr and "route" in table.stderr


def test_identify_attack_rule_then_fit_and_calibrated(root):
    adv = str(root / "fgsm.safetensors")
    rule = invoke(
        root,
        "identify-attack",
        "a",
        "b",
        "--mode",
        "rule",
        "--data",
        "digits",
        "--limit",
        "8",
        "--adv-set",
        adv,
        "--json",
    )
    assert rule.exit_code == 0, rule.stderr
    report = json.loads(rule.stdout)
    assert report["mode"] == "rule" and report["labels"] == {"a": "pgd", "b": "fgsm", ":base": "clean"}
    assert sum(map(sum, report["confusion"]["matrix"])) == 8 + 8  # --limit applies to every set
    fit = invoke(
        root,
        "fit-identifier",
        "a",
        "b",
        "--adv-set",
        adv,
        "--data",
        "digits",
        "--limit",
        "16",
        "--epochs",
        "100",
        "--name",
        "idn",
    )
    assert fit.exit_code == 0, fit.stderr
    assert fit.stdout == "idn\n"
    calibrated = invoke(
        root, "identify-attack", "--mode", "calibrated", "--identifier", "idn", "--adv-set", adv, "--json"
    )
    assert calibrated.exit_code == 0, calibrated.stderr
    report = json.loads(calibrated.stdout)
    assert report["classes"] == ["clean", "fgsm"] and report["sets"]["fgsm.safetensors"]["n"] == 16
    table = invoke(root, "identify-attack", "a", "b", "--adv-set", adv)
    assert table.exit_code == 0 and "confusion matrix" in table.stderr


def test_identify_attack_and_fit_identifier_are_plain_commands(root):
    """Two registered commands and no command group (no default-subcommand parsing to break on a Typer update)."""
    registered = {info.name: info.callback.__name__ for info in app.registered_commands}
    assert {"identify-attack", "fit-identifier"} <= set(registered) and not app.registered_groups
    assert registered["identify-attack"] != registered["fit-identifier"]
    result = runner.invoke(app, ["identify-attack"])  # no arguments: the help, as the group gave
    assert "Usage: loradar identify-attack" in result.output


def test_plot_without_matplotlib_is_a_one_line_error(root, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = invoke(root, "identify-attack", "a", "b", "--data", "digits", "--plot", str(tmp_path / "cm.png"))
    assert result.exit_code in set(EXIT_CODES.values()) and "needs matplotlib" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cm.png").exists()


def test_plot_draws_the_confusion_matrix(root, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    path = tmp_path / "cm.png"
    result = invoke(
        root,
        "identify-attack",
        "a",
        "b",
        "--data",
        "digits",
        "--limit",
        "8",
        "--adv-set",
        str(root / "fgsm.safetensors"),
        "--plot",
        str(path),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # drawn cells and labels, not a blank canvas
    assert json.loads(result.stdout)["confusion"]["rows"]  # the plot does not replace the JSON on stdout
