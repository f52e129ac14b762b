"""The one evaluation path: a stream of batches through every attack, sharded over processes, gathered per point."""

import functools
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from loradar_cli.attacks import Attack, AttackConfig
from loradar_cli.data import ImageData
from loradar_cli.device import Engine
from loradar_cli.distributed import World, spread
from loradar_cli.evaluation import evaluate_suite, run_suite, stream_suite, suite_attacks
from loradar_cli.loader import TensorSource, open_split
from tests.attacks.conftest import fit_digits


class Lookup(nn.Module):
    """Predicts class 1 where the first pixel is > 0.5, else class 0."""

    def forward(self, x):
        hit = (x.flatten(1)[:, 0] > 0.5).float()
        return torch.stack([1 - hit, hit], dim=1)


class _EditConfig(AttackConfig):
    rows: tuple[int, ...] = ()
    value: float = 0.0


class _Edit(Attack[_EditConfig]):
    """Sets the first pixel of some points of the batch (by position in the batch); records the models it saw."""

    name = "edit"
    threat_model = "linf"
    config_cls = _EditConfig
    seen: ClassVar[list[nn.Module]] = []

    def _generate(self, model, x, y, generator):
        type(self).seen.append(model)
        out = x.clone()
        out[list(self.config.rows), 0, 0, 0] = self.config.value
        return out


def _edit(rows: list[int], value: float) -> _Edit:
    return _Edit(_EditConfig(rows=tuple(rows), value=value))


def _toy() -> ImageData:
    x = torch.zeros(6, 1, 2, 2)
    x[3:, 0, 0, 0] = 1.0
    return ImageData(x, torch.tensor([0, 0, 0, 1, 1, 1]), 2, "toy")


def test_worst_case_is_per_point_and_attacks_see_the_model():
    data, model = _toy(), Lookup()
    attacks = {"a": _edit([0, 1], 1.0), "b": _edit([5], 0.0)}  # a breaks points 0 and 1, b point 5
    _Edit.seen = []
    full = run_suite(model, data.x, data.y, attacks, batch_size=8, early_stop=False)
    assert full.clean.all()
    assert [r.robust_alone for r in full.records] == pytest.approx([4 / 6, 5 / 6])
    assert full.robust.tolist() == [False, False, True, True, True, False]  # a mean of the two would give 0.75
    assert _Edit.seen == [model, model]  # crafted against the evaluated model itself
    stopped = run_suite(model, data.x, data.y, attacks, batch_size=8)
    assert torch.equal(stopped.robust, full.robust)
    assert [(r.attacked, r.fooled) for r in stopped.records] == [(6, 2), (4, 1)]  # b only on a's survivors
    row = evaluate_suite("toy", model, data, attacks)
    assert (row.clean, row.attacks, row.worst_case) == (1.0, pytest.approx({"a": 4 / 6, "b": 3 / 6}), 0.5)


class _Recording(TensorSource):
    """A source that records the index lists it is asked for."""

    def __init__(self, data: ImageData) -> None:
        super().__init__(data)
        self.asked: list[list[int]] = []

    def __getitem__(self, indices):
        self.asked.append(list(indices))
        return super().__getitem__(indices)


def test_the_data_is_read_once_in_point_order_and_every_attack_runs_batch_by_batch():
    """One pass over the source whatever the number of attacks: memory holds a batch, never the split."""
    digits = fit_digits()
    source = _Recording(ImageData(digits.x, digits.y, 10, "digits"))
    attacks = suite_attacks("quick", eps=0.1, seed=0, steps=3)
    streamed = stream_suite(digits.model, source, attacks, batch_size=64)
    assert source.asked == [list(range(i, min(i + 64, 200))) for i in range(0, 200, 64)]
    in_memory = run_suite(digits.model, digits.x, digits.y, attacks, batch_size=64)
    assert torch.equal(streamed.robust, in_memory.robust) and 0 < streamed.robust.sum() < streamed.clean.sum()
    assert [r.model_dump(exclude={"seconds"}) for r in streamed.records] == [
        r.model_dump(exclude={"seconds"}) for r in in_memory.records
    ]


def test_an_image_folder_streams_to_the_flags_of_its_decoded_tensors(tmp_path: Path):
    from PIL import Image

    digits = fit_digits()
    pixels = (digits.x[:40, 0] * 255).round().to(torch.uint8).numpy()
    for i, (image, label) in enumerate(zip(pixels, digits.y[:40].tolist(), strict=True)):
        for split in ("train", "test"):
            folder = tmp_path / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    source = open_split(f"imagefolder:{tmp_path}", "test", channels=1, size=8, crop_pct=1.0)
    _, x, y = source[list(range(len(source)))]
    attacks = suite_attacks("quick", eps=0.1, seed=0, steps=3)
    streamed = stream_suite(digits.model, source, attacks, batch_size=16)
    decoded = run_suite(digits.model, x, y, attacks, batch_size=16)
    assert torch.equal(streamed.clean, decoded.clean) and torch.equal(streamed.robust, decoded.robust)
    assert np.isclose(streamed.clean.float().mean().item(), 1.0, atol=0.2)  # the PNGs hold the digits


def _rank(rank: int, rendezvous: str, out: str) -> None:
    """One of two gloo processes: the quick suite with random starts, early stopping and two targets."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        digits = fit_digits()
        attacks = suite_attacks("quick", eps=0.1, seed=3, steps=3)
        targets = {"model": digits.model, "scaled": _Scaled(digits.model)}
        source = TensorSource(ImageData(digits.x, digits.y, 10, "digits"))
        result = stream_suite(
            digits.model, source, attacks, targets=targets, batch_size=24, engine=Engine(world=World(rank, 2))
        )
        row = evaluate_suite("mlp", digits.model, source, attacks, batch_size=24, engine=Engine(world=World(rank, 2)))
        jobs = [functools.partial(_where, f"job {i}", rank) for i in range(3)]
        shared = spread(World(rank, 2), jobs, costs=[1.0, 3.0, 1.0])
        torch.save({**_flat(result), "row": _row(row), "shared": shared}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _where(job: str, rank: int) -> str:
    return f"{job} on rank {rank}"


class _Scaled(nn.Module):
    """A second target: the same decision at a tenth of the logits (different gradients' scale)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) / 10


def _row(row) -> dict:
    """A row without compute seconds (summed over processes, the one field that may differ)."""
    return row.model_dump(exclude={"records": {"__all__": {"seconds"}}})


def _flat(result) -> dict:
    return {
        "clean": result.clean,
        "robust": result.robust,
        "fooled_by": result.fooled_by,
        "records": [r.model_dump(exclude={"seconds"}) for r in result.records],
    }


@pytest.mark.slow
def test_two_ranks_give_the_per_point_flags_and_records_of_one(tmp_path: Path):
    """Batches dealt out to 2 gloo processes and gathered: per point equal to one process, worst case exact."""
    out = tmp_path / "two.pt"
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path / "rdv"), str(out)), nprocs=2, join=True)
    two, other = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    digits = fit_digits()
    targets = {"model": digits.model, "scaled": _Scaled(digits.model)}
    attacks = suite_attacks("quick", eps=0.1, seed=3, steps=3)
    one = _flat(run_suite(digits.model, digits.x, digits.y, attacks, targets=targets, batch_size=24))
    assert torch.equal(one["clean"], two["clean"]) and torch.equal(one["robust"], two["robust"])
    assert all(torch.equal(one["fooled_by"][k], two["fooled_by"][k]) for k in one["fooled_by"])
    assert one["records"] == two["records"]
    assert 0 < one["robust"].sum() < one["clean"].sum()
    row = evaluate_suite("mlp", digits.model, ImageData(digits.x, digits.y, 10, "digits"), attacks, batch_size=24)
    assert two["row"] == other["row"] == _row(row)  # the checks ran on rank 0, their flags handed to rank 1
    assert torch.equal(two["robust"], other["robust"])
    # the costliest job first, to rank 0; then the others to the least loaded rank: rank 1 takes both
    assert two["shared"] == other["shared"] == ["job 0 on rank 1", "job 1 on rank 0", "job 2 on rank 1"]
