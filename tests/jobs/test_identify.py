"""jobs.identify: the LoRADAR rule (absolute and relative) on constructed and crafted sets."""

import pytest
import torch

from loradar_cli.advset import AdvSet, save_adv_set
from loradar_cli.data import load_data
from loradar_cli.jobs.identify import identify_sets
from loradar_cli.loading import load_model
from loradar_cli.lora.state import PEFT_PREFIX
from loradar_cli.ops.identify import (
    clean_confidence_stats,
    identify_relative,
    identify_rule,
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
