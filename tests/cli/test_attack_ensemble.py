"""CLI of attack against an ensemble: the route decision's accuracy on the set, and bad options in one line."""

import json

import pytest
import torch

from loradar_cli.errors import EXIT_CODES
from tests.cli._invoke import call
from tests.conftest import make_adapter, make_base


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """Base 'tiny' with adapters a (pgd) and b (fgsm)."""
    from loradar_cli.store.store import Store

    folder = tmp_path_factory.mktemp("cli-attack-ensemble") / "store"
    store = Store(folder)
    make_base(store)
    make_adapter(store, "tiny", "a", seed=1, attack="pgd")
    make_adapter(store, "tiny", "b", seed=2, attack="fgsm")
    return folder


def test_attack_against_route_records_the_routed_decisions_accuracy(store_dir, tmp_path):
    """The printed target accuracy is route's (the most confident adapter classifies), computed here by hand."""
    from loradar_cli.advset import load_adv_set
    from loradar_cli.loading import load_model
    from loradar_cli.store.store import Store

    out = tmp_path / "route.safetensors"
    args = ["attack", "--base", "tiny", "--members", "a,b", "--decision", "route", "--attack", "fgsm", "--eps", "0.2"]
    code, stdout, stderr = call(
        [*args, "--data", "digits", "--limit", "16", "--out", str(out), "--json", "--store", str(store_dir)]
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["target"]["members"] == ["a", "b"] and report["target"]["through"] == ["routed decision"]
    adv = load_adv_set(out)
    store = Store(store_dir)
    with torch.no_grad():
        probs = torch.stack([load_model(store, "tiny", n).eval()(adv.x).softmax(-1) for n in ("a", "b")])
    routed = probs.max(-1).values.argmax(0)
    pred = probs[routed, torch.arange(len(adv.y))].argmax(-1)
    assert report["target_accuracy"] == pytest.approx((pred == adv.y).float().mean().item())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--members", "a,b", "--decision", "nope"], "valid: majority, soft, weighted, route"),
        (["--identifier", "x"], "give --members and --decision route"),
        (["--members", "a", "--adapter", "b"], "not both"),
    ],
)
def test_bad_ensemble_options_are_one_line(store_dir, tmp_path, extra, message):
    args = ["attack", "--base", "tiny", "--attack", "fgsm", "--data", "digits", "--limit", "4"]
    code, _, stderr = call([*args, "--out", str(tmp_path / "x.safetensors"), *extra, "--store", str(store_dir)])
    assert code == EXIT_CODES["InvalidValueError"] and message in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "x.safetensors").exists()
