"""jobs.identify: the LoRADAR rule and calibrated identifiers on constructed and real sets."""

import json

import pytest
import torch

from loradar_cli.advset import AdvSet, save_adv_set
from loradar_cli.data import load_data
from loradar_cli.errors import CorruptError, IncompatibleError
from loradar_cli.jobs.ensemble_vote import vote_sets
from loradar_cli.jobs.identify import fit_identifier_from_sets, identify_sets, load_identifier
from loradar_cli.loading import load_model
from loradar_cli.lora.state import PEFT_PREFIX
from loradar_cli.members import adapter_models, ensemble_probs
from loradar_cli.ops.identify import (
    accuracy,
    clean_confidence_stats,
    identify_relative,
    identify_rule,
    stratified_split,
)
from tests.jobs.conftest import naive_probs


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
    report = identify_sets(pool, ["b", loud], mode="rule", data="digits", limit=10, adv_sets=[roa_set])
    assert report.sets["clean"].predicted == {"roa": 10}
    assert report.sets["roa.safetensors"].accuracy == 1.0
    assert report.accuracy == 0.5
    assert report.confusion is not None and report.confusion.model_dump() == {
        "rows": ["clean", "roa"],
        "columns": ["clean", "roa", "unknown"],
        "matrix": [[0, 10, 0], [0, 10, 0]],
    }
    assert report.per_class["roa"].model_dump() == {"precision": 0.5, "recall": 1.0, "support": 10}
    keys = ["base", "members", "mode", "margin", "clean", "labels", "accuracy", "unknown_rate", "per_class"]
    assert list(report.model_dump(mode="json")) == [*keys, "confusion", "sets"]  # no calibrated-only fields
    as_clean = identify_sets(pool, ["b", loud], mode="rule", clean=loud, data="digits", limit=10)
    assert as_clean.sets["clean"].predicted == {"clean": 10} and as_clean.accuracy == 1.0
    undecided = identify_sets(pool, ["b", loud], mode="rule", margin=1.0, data="digits", limit=10)
    assert undecided.sets["clean"].predicted == {"unknown": 10}


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
    report = identify_sets(pool, ["a", "b"], mode="rule", adv_sets=adv_files, margin=0.05)
    from loradar_cli.advset import load_adv_set

    for path in adv_files:
        adv = load_adv_set(path)
        probs = torch.cat([naive_probs(pool, ["a", "b"], adv.x), load_model(pool, "tiny")(adv.x).softmax(-1)[None]])
        expected = identify_rule(probs, ["pgd", "fgsm", "clean"], margin=0.05, clean_index=2)
        counts = {k: expected.count(k) for k in sorted(set(expected))}
        assert report.sets[path.name].predicted == counts


def test_relative_rule_matches_the_ops_rule_on_clean_statistics_of_the_other_split(pool, adv_files):
    from loradar_cli.advset import load_adv_set

    report = identify_sets(pool, ["a", "b"], adv_sets=adv_files[:1], data="digits", split="test", limit=12)
    assert report.mode == "relative-rule" and "split val" in (report.calibration or "")
    assert list(report.model_dump(mode="json"))[3:7] == ["margin", "clean", "labels", "calibration"]
    clean = load_data("digits", "val", limit=12, channels=1, size=16)
    base = load_model(pool, "tiny")
    stack = lambda x: torch.cat([naive_probs(pool, ["a", "b"], x), base(x).softmax(-1)[None]])  # noqa: E731
    mean, std = clean_confidence_stats(stack(clean.x))
    adv = load_adv_set(adv_files[0])
    expected = identify_relative(stack(adv.x[:12]), ["pgd", "fgsm", "clean"], mean, std, margin=0.0, clean_index=2)
    counts = {k: expected.count(k) for k in sorted(set(expected))}
    assert report.sets[adv_files[0].name].predicted == counts


def test_calibrated_identifier_fit_store_load_predict_reproduces_held_out_and_routes(pool, adv_files, tmp_path):
    meta, fitted = fit_identifier_from_sets(
        pool, ["a", "b"], name="idf", adv_sets=adv_files, data="digits", split="val", limit=24, epochs=150
    )
    assert fitted.classes == ["clean", "fgsm", "pgd"] and meta.members == ["a", "b", ":base"]
    assert meta.feature_groups == fitted.features and meta.training["selection"]["history"]
    assert fitted.held_out.n == meta.training["n_held_out"] == 18  # a quarter of 24 per class
    assert (pool.root / "identifiers" / "idf" / "identifier.json").is_file()
    out = tmp_path / "pred.json"
    report = identify_sets(
        pool, [], identifier="idf", adv_sets=adv_files, data="digits", split="val", limit=24, out=out
    )
    assert report.mode == "calibrated"
    assert list(report.model_dump(mode="json"))[3:8] == ["identifier", "classes", "features", "reject", "accuracy"]
    saved = json.loads(out.read_text())["sets"]
    pred = [p for label in ("clean", *(f.name for f in adv_files)) for p in saved[label]["predicted"]]
    truth = [a for a in ("clean", "fgsm", "pgd") for _ in range(24)]
    _, held = stratified_split(truth, 0.25, seed=0)
    assert accuracy([truth[i] for i in held], [pred[i] for i in held]) == pytest.approx(fitted.held_out.accuracy)
    ident = load_identifier(pool, "idf")
    from loradar_cli.advset import load_adv_set

    adv = load_adv_set(adv_files[0])
    members = [*adapter_models(pool, None, ["a", "b"]), load_model(pool, "tiny")]
    models = dict(zip(["a", "b", ":base"], ensemble_probs(members, adv.x), strict=True))
    attacks = ident.predict(models, adv.x)
    assert attacks == saved[adv_files[0].name]["predicted"]
    soft = ident.probabilities(models, adv.x)
    assert soft.shape == (24, 3) and torch.allclose(soft.sum(dim=1), torch.ones(24))
    vote_sets(
        pool, ["a", "b"], methods=["route"], identifier="idf", adv_sets=adv_files[:1], out=tmp_path / "route.json"
    )
    confident = torch.stack([models["a"], models["b"]]).max(-1).values.argmax(0).tolist()
    expected = [{"pgd": "a", "fgsm": "b"}.get(atk, ["a", "b"][c]) for atk, c in zip(attacks, confident, strict=True)]
    routed = json.loads((tmp_path / "route.json").read_text())["sets"]["fgsm.safetensors"]
    assert routed["routed_to"] == expected
    with pytest.raises(IncompatibleError, match="fitted on adapters"):
        identify_sets(pool, ["b", "a"], mode="calibrated", identifier="idf", data="digits", limit=4)
    (pool.identifier_dir("idf") / "identifier.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptError):
        load_identifier(pool, "idf")


def test_balance_is_recorded_and_changes_nothing_when_classes_are_equal(pool, adv_files):
    common = {"adv_sets": adv_files, "data": "digits", "split": "val", "limit": 24, "epochs": 50}
    balanced, _ = fit_identifier_from_sets(pool, ["a", "b"], name="idbal", balance=True, **common)
    plain, _ = fit_identifier_from_sets(pool, ["a", "b"], name="idplain", **common)
    assert balanced.training["balance"] is True and plain.training["balance"] is False
    stored = json.loads((pool.root / "identifiers" / "idbal" / "identifier.json").read_text())
    assert stored["training"]["balance"] is True
    # 24 inputs per class: equal weights, the same selection (balanced accuracy = accuracy) and the same fit
    assert balanced.feature_groups == plain.feature_groups and balanced.tensors_sha256 == plain.tensors_sha256


def test_identifier_without_feature_groups_loads_as_the_confidence_group(pool, x):
    """An identifier stored before input features (no feature_groups) predicts from member confidences as it did."""
    from loradar_cli.models import weights_fingerprint
    from loradar_cli.ops.identify import IdentifierModel, identity_feature_names, identity_features

    g = torch.Generator().manual_seed(0)
    n_features = len(identity_feature_names(3))
    model = IdentifierModel(
        torch.randn(2, n_features, generator=g),
        torch.zeros(2),
        torch.zeros(n_features),
        torch.ones(n_features),
        ["clean", "pgd"],
    )
    tensors = model.state_dict()
    base = pool.base_meta("tiny")
    meta = {
        "schema_version": 1,
        "name": "old",
        "base": "tiny",
        "base_fingerprint": base.fingerprint,
        "members": ["a", "b", ":base"],
        "member_labels": {"a": "pgd", "b": "fgsm"},
        "classes": ["clean", "pgd"],
        "feature_names": identity_feature_names(3),
        "tensors_sha256": weights_fingerprint(tensors),
    }
    pool.save_identifier("old", meta, tensors)
    ident = load_identifier(pool, "old", base)
    assert ident.meta.feature_groups == ["confidence"] and not ident.needs_input
    probs = dict(
        zip(
            ["a", "b", ":base"],
            torch.cat([naive_probs(pool, ["a", "b"], x), load_model(pool, "tiny")(x).softmax(-1)[None]]),
            strict=True,
        )
    )
    stack = torch.stack([probs[m] for m in ["a", "b", ":base"]])
    expected = [["clean", "pgd"][i] for i in (identity_features(stack) @ model.weight.T).argmax(dim=1).tolist()]
    assert ident.predict(probs) == expected
