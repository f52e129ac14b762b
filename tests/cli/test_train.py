"""`loradar train`: recipe names and options from the registry, --recipe-opt into provenance, --pool parsing."""

import json

import pytest
from typer.testing import CliRunner

from loradar_cli.cli.app import app
from loradar_cli.cli.train import parse_pool
from loradar_cli.errors import EXIT_CODES, InvalidValueError
from loradar_cli.recipes import RECIPES
from tests.conftest import make_base

runner = CliRunner()


def _train(store, *args: str):
    common = ["train", "--base", "tiny", "--attack", "fgsm", "--eps", "0.05", "--limit", "16", "--val-limit", "8"]
    return runner.invoke(app, [*common, "--epochs", "1", "--store", str(store.root), "--json", "-q", *args])


def test_unknown_recipe_and_option_errors_list_the_registry(store):
    make_base(store)
    result = _train(store, "--name", "x", "--recipe", "nope")
    assert result.exit_code == EXIT_CODES["NotFoundError"] and len(result.stderr.strip().splitlines()) == 1
    assert all(name in result.stderr for name in RECIPES.names())
    result = _train(store, "--name", "x", "--recipe", "trades", "--recipe-opt", "gamma=1")
    assert result.exit_code == EXIT_CODES["InvalidValueError"] and "valid: beta, inner" in result.stderr
    result = _train(store, "--name", "x", "--recipe", "trades", "--recipe-opt", "beta=-1")
    assert (
        result.exit_code == EXIT_CODES["InvalidValueError"] and "beta" in result.stderr and not store.has_adapter("x")
    )


def test_recipe_options_reach_the_recipe_and_its_provenance(store):
    make_base(store)
    result = _train(
        store, "--name", "t", "--recipe", "trades", "--recipe-opt", "beta=3", "--recipe-opt", "inner=attack"
    )
    assert result.exit_code == 0, result.stderr
    meta = json.loads(result.stdout)
    assert meta["recipe"] == "trades"
    assert meta["recipe_config"]["recipe_options"] == {"beta": 3.0, "inner": "attack"}


def test_parse_pool():
    assert parse_pool("eps=1/255, 0.5") == ("eps", [("1/255", 1 / 255), ("0.5", 0.5)])
    for bad in ("eps", "=1,2", "eps="):
        with pytest.raises(InvalidValueError):
            parse_pool(bad)


def test_pool_option_trains_the_members_and_records_the_pool(store):
    from loradar_cli.store.pools import load_pool

    make_base(store)
    result = _train(store, "--name", "P", "--recipe", "pgd-at", "--pool", "eps=0.02,1/20")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["pool"]["members"] == ["P-eps-0.02", "P-eps-1_20"] == load_pool(store.root, "P").members
    eps = [m["attack_config"]["config"]["eps"] for m in out["members"]]
    assert eps == pytest.approx([0.02, 0.05])  # the pool's values override --eps
    assert runner.invoke(app, ["eval", "--adapter", "P", "--store", str(store.root), "--limit", "8"]).exit_code == 0
