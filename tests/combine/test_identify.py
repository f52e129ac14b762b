"""combine.identify: the LoRADAR rule and calibrated identifiers on constructed and real sets."""

import json

import pytest
import torch

from loradar_cli.advset import AdvSet, save_adv_set
from loradar_cli.combine import (
    adapter_models,
    ensemble_probs,
    fit_identifier_from_sets,
    identify_sets,
    load_identifier,
    vote_sets,
)
from loradar_cli.data import load_data
from loradar_cli.errors import CorruptError, IncompatibleError
from loradar_cli.loading import load_model
from loradar_cli.lora.inject import PEFT_PREFIX
from loradar_cli.ops.identify import identify_rule
from tests.combine.conftest import naive_probs


@pytest.fixture(scope="module")
def loud(pool) -> str:
    """An adapter 'loud' (attack roa) whose head is scaled ×1000: it is (almost) certain on every input."""
    adapter = pool.load_adapter("a")
    tensors = {k: (v * 1000 if k.startswith(f"{PEFT_PREFIX}fc.") else v) for k, v in adapter.tensors.items()}
    pool.save_adapter(adapter.meta.model_copy(update={"name": "loud", "attack": "roa"}), tensors)
    return "loud"


def test_identify_rule_on_constructed_cases(pool, loud, tmp_path):
    data = load_data("digits", "test", limit=10, channels=1, size=16)
    roa_set = save_adv_set(tmp_path / "roa.safetensors", AdvSet(data.x, data.y, "roa"))
    report = identify_sets(pool, ["b", loud], data="digits", limit=10, adv_sets=[roa_set])
    assert report["sets"]["clean"]["predicted"] == {"roa": 10}
    assert report["sets"]["roa.safetensors"]["accuracy"] == 1.0
    assert report["accuracy"] == 0.5
    assert report["confusion"] == {"labels": ["clean", "roa"], "matrix": [[0, 10], [0, 10]]}
    as_clean = identify_sets(pool, ["b", loud], clean=loud, data="digits", limit=10)
    assert as_clean["sets"]["clean"]["predicted"] == {"clean": 10} and as_clean["accuracy"] == 1.0
    undecided = identify_sets(pool, ["b", loud], margin=1.0, data="digits", limit=10)
    assert undecided["sets"]["clean"]["predicted"] == {"unknown": 10}


@pytest.fixture(scope="module")
def adv_files(pool, tmp_path_factory):
    """FGSM and PGD sets crafted against the base (small, fast)."""
    from loradar_cli.jobs.attack import craft_adv_set

    folder = tmp_path_factory.mktemp("sets")
    paths = []
    for attack, options in (("fgsm", {"eps": 0.3}), ("pgd", {"eps": 0.3, "steps": 3})):
        path = folder / f"{attack}.safetensors"
        craft_adv_set(pool, path, base="tiny", attack=attack, data="digits", attack_options=options, limit=24)
        paths.append(path)
    return paths


def test_identify_rule_end_to_end_matches_the_rule_on_naive_probs(pool, adv_files):
    report = identify_sets(pool, ["a", "b"], adv_sets=adv_files, margin=0.05)
    from loradar_cli.advset import load_adv_set

    for path in adv_files:
        adv = load_adv_set(path)
        probs = torch.cat([naive_probs(pool, ["a", "b"], adv.x), load_model(pool, "tiny")(adv.x).softmax(-1)[None]])
        expected = identify_rule(probs, ["pgd", "fgsm", "clean"], margin=0.05, clean_index=2)
        counts = {k: expected.count(k) for k in sorted(set(expected))}
        assert report["sets"][path.name]["predicted"] == counts


def test_calibrated_identifier_fit_predict_round_trip_and_route(pool, adv_files, tmp_path):
    meta, fitted = fit_identifier_from_sets(
        pool, ["a", "b"], name="idf", adv_sets=adv_files, data="digits", split="val", limit=24, epochs=150
    )
    assert fitted["classes"] == ["clean", "fgsm", "pgd"] and meta.members == ["a", "b", ":base"]
    assert (pool.root / "identifiers" / "idf" / "identifier.json").is_file()
    report = identify_sets(
        pool, [], mode="calibrated", identifier="idf", adv_sets=adv_files, data="digits", split="val", limit=24
    )
    assert report["accuracy"] == pytest.approx(fitted["accuracy"])
    assert report["confusion"] == fitted["confusion"]
    ident = load_identifier(pool, "idf")
    vote_sets(
        pool, ["a", "b"], methods=["route"], identifier="idf", adv_sets=adv_files[:1], out=tmp_path / "route.json"
    )
    from loradar_cli.advset import load_adv_set

    adv = load_adv_set(adv_files[0])
    members = [*adapter_models(pool, None, ["a", "b"]), load_model(pool, "tiny")]
    models = dict(zip(["a", "b", ":base"], ensemble_probs(members, adv.x), strict=True))
    attacks = ident.predict(models)
    confident = torch.stack([models["a"], models["b"]]).max(-1).values.argmax(0).tolist()
    expected = [{"pgd": "a", "fgsm": "b"}.get(atk, ["a", "b"][c]) for atk, c in zip(attacks, confident, strict=True)]
    saved = json.loads((tmp_path / "route.json").read_text())["sets"]["fgsm.safetensors"]
    assert saved["routed_to"] == expected
    with pytest.raises(IncompatibleError, match="fitted on adapters"):
        identify_sets(pool, ["b", "a"], mode="calibrated", identifier="idf", data="digits", limit=4)
    (pool.identifier_dir("idf") / "identifier.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptError):
        load_identifier(pool, "idf")
