"""Saved adversarial sets: labels and images are checked when a set is read."""

import pytest
import torch
from safetensors.torch import save_file

from loradar_cli.advset import FORMAT, AdvSet, labelled_adv_sets, load_adv_set, save_adv_set
from loradar_cli.errors import CorruptError, IncompatibleError


def _raw(path, x, y, **meta):
    save_file({"x_adv": x, "y": y}, str(path), metadata={"loradar.format": FORMAT, "attack": "pgd", **meta})
    return path


def test_round_trip_and_label_range(tmp_path):
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 2, 9])
    path = save_adv_set(tmp_path / "s.safetensors", AdvSet(x, y, "pgd", {"eps": 0.1}))
    adv = load_adv_set(path)
    assert torch.equal(adv.x, x) and torch.equal(adv.y, y) and adv.info == {"eps": 0.1}
    assert list(labelled_adv_sets([path], (1, 4, 4), num_classes=10)) == ["s.safetensors"]
    with pytest.raises(CorruptError, match="label 9 is out of range for a base with 9 classes"):
        labelled_adv_sets([path], (1, 4, 4), num_classes=9)
    with pytest.raises(IncompatibleError):
        labelled_adv_sets([path], (3, 4, 4))


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.rand(2, 1, 4, 4), torch.tensor([0.0, 1.0]), "integer"),
        (torch.rand(2, 1, 4, 4), torch.tensor([0, -3]), ">= 0, found -3"),
        (torch.rand(2, 1, 4, 4), torch.tensor([True, False]), "integer"),
        (torch.full((2, 1, 4, 4), float("nan")), torch.tensor([0, 1]), r"finite floats in \[0, 1\]"),
        (torch.full((2, 1, 4, 4), 2.0), torch.tensor([0, 1]), r"finite floats in \[0, 1\]"),
        ((torch.rand(2, 1, 4, 4) * 255).to(torch.uint8), torch.tensor([0, 1]), "floats"),
    ],
)
def test_bad_labels_and_images_are_refused(tmp_path, x, y, message):
    with pytest.raises(CorruptError, match=message):
        load_adv_set(_raw(tmp_path / "s.safetensors", x, y))


def test_info_that_is_not_json_is_corrupt(tmp_path):
    path = _raw(tmp_path / "s.safetensors", torch.rand(1, 1, 2, 2), torch.tensor([0]), info="{nope")
    with pytest.raises(CorruptError, match="not JSON"):
        load_adv_set(path)
