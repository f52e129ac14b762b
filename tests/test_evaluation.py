import pytest
import torch
from torch import nn

from loradar_cli.data import ImageData
from loradar_cli.evaluation import evaluate, evaluate_group


class Lookup(nn.Module):
    """Predicts class 1 where the first pixel is > 0.5, else class 0."""

    def forward(self, x):
        hit = (x.flatten(1)[:, 0] > 0.5).float()
        return torch.stack([1 - hit, hit], dim=1)


def test_worst_case_is_per_point_and_attacks_see_the_model():
    x = torch.zeros(6, 1, 2, 2)
    x[3:, 0, 0, 0] = 1.0
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    data = ImageData(x, y, 2, "toy")
    seen = []

    def flip_first_two(model, xb, yb):  # breaks points 0 and 1
        seen.append(model)
        out = xb.clone()
        out[:2, 0, 0, 0] = 1.0
        return out

    def flip_last(model, xb, yb):  # breaks point 5
        out = xb.clone()
        out[5, 0, 0, 0] = 0.0
        return out

    model = Lookup()
    row = evaluate(model, "toy", data, {"a": flip_first_two, "b": flip_last}, batch_size=8)
    assert row.clean == 1.0
    assert row.attacks == pytest.approx({"a": 4 / 6, "b": 5 / 6})
    assert abs(row.worst_case - 3 / 6) < 1e-6  # points 0, 1 and 5 fall; a mean of the two would give 0.75
    assert seen == [model]  # the attack is crafted against the evaluated model itself


def test_a_group_is_attacked_once_through_its_target_and_each_model_judged():
    """Models sharing a target see one attack per batch; correctness and worst case are each model's own."""
    x = torch.zeros(4, 1, 2, 2)
    y = torch.tensor([0, 0, 0, 1])
    data = ImageData(x, y, 2, "toy")
    seen = []

    def flip_first(model, xb, yb):  # the first point of each batch: points 0 and 2
        seen.append(model)
        out = xb.clone()
        out[0, 0, 0, 0] = 1.0
        return out

    class Always(nn.Module):
        def forward(self, inp):
            return torch.tensor([[0.0, 1.0]]).expand(len(inp), 2)

    target = nn.Identity()
    rows = evaluate_group(
        {"lookup": Lookup(), "always": Always()}, target, data, {"a": flip_first}, batch_size=2, attacked="mean logits"
    )
    assert seen == [target, target]  # two batches, one attack each, shared by both models
    by_name = {r.model: r for r in rows}
    assert by_name["lookup"].clean == 0.75 and by_name["lookup"].attacks["a"] == 0.25  # only point 1 survives
    assert by_name["always"].clean == 0.25 and by_name["always"].attacks["a"] == 0.25  # point 3, untouched
    assert by_name["lookup"].worst_case == 0.25 and all(r.attacked == "mean logits" for r in rows)
