"""The recipe sweep's commands and table, without training: every generated command parses under the real CLI."""

import json
from pathlib import Path

import pytest
import typer

from benchmarks import recipes_runs as runs
from benchmarks import recipes_table as table
from loradar_cli.cli._common import parse_fraction
from loradar_cli.cli.app import app
from loradar_cli.names import RECIPES


def parse(args: list[str]) -> dict:
    """The parameters the real CLI parses from `args` (the command is not run)."""
    command = typer.main.get_command(app).commands[args[0]]  # type: ignore[attr-defined]
    return command.make_context(args[0], [*args[1:], "--store", "/nonexistent", "--json", "-q"]).params


def sweep(*argv: str):
    """The preset and job queues of `python -m benchmarks.recipes_runs STORE OUT ARGV`."""
    args = runs.parser().parse_args(["/store", "/out", *argv])
    preset = runs.preset_of(args)
    return preset, runs.queues(args, preset)


@pytest.mark.parametrize(("eps", "divisor"), [("8/255", 4), ("2/255", 8), ("0.1", 8), ("0.3", 4)])
def test_scaled_keeps_notation_and_value(eps: str, divisor: int) -> None:
    out = runs.scaled(eps, divisor)
    assert ("/" in out) == ("/" in eps)
    assert parse_fraction(out) == pytest.approx(parse_fraction(eps) / divisor, rel=1e-9)


def test_sweep_recipes_are_the_registry() -> None:
    assert sorted(runs.RECIPES) == sorted(RECIPES)


def test_mnist_preset_keeps_the_earlier_sweep() -> None:
    preset, queues = sweep()
    assert [len(q) for q in queues] == [1 + len(RECIPES) + 2, 1 + len(RECIPES)]  # the ablation joins the first eps
    params = parse(runs.recipe_command(preset, "trades", "0.3", runs.run_name("rec", "trades", "0.3")))
    expected = {"base": "mnist-base", "recipe": "trades", "name": "rec-trades-0.3", "eps": "0.3", "steps": 7,
                "targets": "all", "rank": 16, "lr": 1e-2, "epochs": 3, "limit": 4000, "resume": True}  # fmt: skip
    assert {k: params[k] for k in expected} == expected
    assert parse_fraction(params["alpha"]) == pytest.approx(0.3 / 4)
    assert params["data"].startswith("mnist:")


def test_cifar10_preset_keeps_eps_as_given_and_the_default_lr() -> None:
    preset, queues = sweep("--preset", "cifar10", "--pool-eval-eps", "")
    assert preset.eps == ("2/255", "8/255")
    default_lr = parse(["train", "--base", "b", "--attack", "pgd", "--name", "n"])["lr"]
    for queue, eps in zip(queues, preset.eps, strict=True):
        assert [job[0] for job in queue] == [runs.base_run] + [runs.recipe_run] * len(RECIPES)
        for job in queue[1:]:
            recipe = job[4]
            params = parse(runs.recipe_command(preset, recipe, eps, runs.run_name("rec", recipe, eps)))
            assert (params["base"], params["eps"], params["lr"]) == ("c10-base", eps, default_lr)
            assert parse_fraction(params["alpha"]) == pytest.approx(parse_fraction(eps) / 4)
            assert params["data"].startswith("cifar10:") and "/" not in params["name"]
    evaluation = parse(["eval", "--base", "c10-base", *runs.eval_args(preset.data, "8/255", 500)])
    assert evaluation["eps"] == "8/255" and evaluation["limit"] == 500
    alpha = dict(opt.split("=") for opt in evaluation["attack_opt"])["pgd.alpha"]
    assert parse_fraction(alpha) == pytest.approx(8 / 255 / 8)


def test_overrides_reach_the_commands() -> None:
    preset, queues = sweep("--recipes", "mart,amt", "--eps", "0.1", "--lr", "1e-3", "--epochs", "2",
                           "--train-limit", "2000", "--no-base-row", "--pool-eval-eps", "",
                           "--recipe-opt", "beta=3", "--prefix", "lr3")  # fmt: skip
    assert [[job[4] for job in q] for q in queues] == [["mart", "amt"]]
    options = queues[0][0][-1]
    params = parse(runs.recipe_command(preset, "mart", "0.1", runs.run_name("lr3", "mart", "0.1"), options))
    assert (params["lr"], params["epochs"], params["limit"], list(params["recipe_opt"])) == (1e-3, 2, 2000, ["beta=3"])
    assert params["name"] == "lr3-mart-0.1"
    assert runs.preset_of(runs.parser().parse_args(["/s", "/o", "--lr", "default"])).lr is None


def test_pool_command_parses() -> None:
    preset, queues = sweep("--preset", "cifar10", "--pool-recipe", "pgd-at", "--eps", "")
    assert [(job[0], job[-1]) for job in queues[0]] == [(runs.pool_run, "pgd-at"), (runs.variants_run, "pgd-at")]
    params = parse(runs.pool_command(preset, "pgd-at", "pool-pgd-at"))
    assert params["pool"] == "eps=" + ",".join(preset.pool_eps) and params["recipe"] == "pgd-at"


def _doc(recipe: str, eps, lr: str | None, clean: float, worst: float) -> dict:
    words = ["loradar", "train", "--base", "b", *(["--lr", lr] if lr else []), "--store", "s"]
    train = {"command": " ".join(words), "report": {"metrics": {"best_epoch": 2.0},
             "combination": {"history": [{"seconds": 10.0}, {"seconds": 30.0}]}}}  # fmt: skip
    rows = [{"model": recipe, "clean": clean, "attacks": {"pgd": worst + 0.01}, "worst_case": worst, "n": 500}]
    return {"recipe": recipe, "eps": eps, "train": train, "eval": {"report": {"rows": rows}}}


def test_table_rows_print_eps_as_given_and_sort_by_value(tmp_path: Path, capsys, monkeypatch) -> None:
    docs = {"mart-8_255": _doc("mart", "8/255", None, 0.5, 0.2), "mart-2_255": _doc("mart", "2/255", "1e-3", 0.6, 0.3),
            "old": _doc("trades", 0.1, "1e-2", 0.9, 0.8)}  # fmt: skip
    for name, doc in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    assert table.recipe_row(docs["mart-2_255"]) == ["mart", "2/255", "1e-3", "60.0", "31.0", "30.0", "20", "2", "500"]
    assert table.recipe_row(docs["mart-8_255"])[2] == "default"
    monkeypatch.setattr("sys.argv", ["recipes_table", str(tmp_path)])
    table.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert [line.split(" | ")[1] for line in lines] == ["2/255", "8/255", "0.1"]
