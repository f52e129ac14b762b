"""`loradar trim` reports the energy it kept and, given --data, accuracy before and after."""

import json

import pytest
import torch

from loradar_cli.lora.state import PEFT_PREFIX
from tests.cli._invoke import call


def test_trim_reports_energy_and_before_after_accuracy(tiny):
    store, _, adapter, model = tiny
    args = ["trim", adapter.name, "--name", "cut", "--rank", "1", "--data", "digits", "--limit", "48"]
    code, stdout, stderr = call([*args, "--store", str(store.root), "--json"])
    assert code == 0, stderr
    report = json.loads(stdout)
    tensors = store.load_adapter(adapter.name).tensors
    energies = []
    for name in adapter.lora.targets:  # independent: σ₁² / Σσ² of each layer's B·A
        a, b = tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        s = torch.linalg.svdvals((b.flatten(1) @ a.flatten(1)).double())
        energies.append(float(s[0] ** 2 / (s**2).sum()))
    assert report["energy_kept"]["mean"] == pytest.approx(sum(energies) / len(energies))
    assert report["energy_kept"]["min"] == pytest.approx(min(energies))
    from loradar_cli.data import load_data
    from loradar_cli.loading import load_model

    data = load_data("digits", "test", limit=48, channels=1, size=16)
    trimmed = load_model(store, "tiny", "cut")
    before = (model.eval()(data.x).argmax(1) == data.y).float().mean().item()
    after = (trimmed(data.x).argmax(1) == data.y).float().mean().item()
    accuracy = report["accuracy"]
    assert accuracy["before"]["clean"] == pytest.approx(before) and accuracy["after"]["clean"] == pytest.approx(after)
    assert accuracy["attack"] == {"pgd": {}} and accuracy["before"]["n"] == 48
    assert accuracy["before"]["robust"] <= accuracy["before"]["clean"]


def test_trim_with_bad_data_writes_nothing(tiny):
    store, _, adapter, _ = tiny
    before = sorted(p.name for p in store.root.rglob("*"))
    code, stdout, stderr = call(
        ["trim", adapter.name, "--name", "cut", "--rank", "1", "--data", "nosuch", "--store", str(store.root)]
    )
    assert code == 2 and stdout == "" and stderr.startswith("error: unknown dataset 'nosuch'")
    assert sorted(p.name for p in store.root.rglob("*")) == before
