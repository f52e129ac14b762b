"""jobs.fit_identifier: fit on crafted sets, store, load and predict the held-out part again; route with it."""

import json

import pytest
import torch

from loradar_cli.errors import CorruptError, IncompatibleError
from loradar_cli.identifier import load_identifier
from loradar_cli.jobs.ensemble_vote import vote_sets
from loradar_cli.jobs.fit_identifier import fit_identifier_from_sets
from loradar_cli.jobs.identify import identify_sets
from loradar_cli.loading import load_model
from loradar_cli.members import adapter_models, ensemble_probs
from loradar_cli.ops.identify import accuracy, stratified_split


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
